"""Input: TFDS splits read by random access, in an order fixed by (seed, step).

A split is opened as a TFDS random-access data source (array_record), so the
global batch of step `s` is a pure function of (seed, s): a resumed run reads
exactly the batches it would have read, and every process of a multi-host job
reads its own slice of the same global batch. Records are read on the host,
decoded and preprocessed in a parallel `tf.data` map (TF image ops, outside the
GIL), batched and prefetched.
"""

import dataclasses

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from train import errors

PREPARE_HINTS = {
    "fashion_mnist": "python -m train.packaged_data --data_dir={data_dir}",
}
_LABEL_SCAN_CHUNK = 4096
_BATCH_SEED_TAG = 0x6D6978  # Separates batch-level seeds from per-example op seeds.


@dataclasses.dataclass(frozen=True)
class Split:
  """Random access to one TFDS split, optionally restricted to some classes.

  Attributes:
    name: 'dataset:split', for messages.
    source: TFDS data source yielding {'image': encoded bytes, 'label': int}.
    indices: source index of each example of the split, in the split's order.
    label_map: original label -> label seen by the model (identity when no
      class subset is asked for).
  """
  name: str
  source: object
  indices: np.ndarray
  label_map: np.ndarray

  def __len__(self):
    return len(self.indices)

  def read(self, positions):
    """Encoded images and labels of the examples at `positions` of the split."""
    records = self.source.__getitems__([int(i) for i in self.indices[positions]])
    images = np.array([r["image"] for r in records], dtype=object)
    labels = self.label_map[np.array([r["label"] for r in records], np.int64)]
    return images, labels

  def labels(self):
    """Label of every example of the split, in order.

    Reads every record once, in chunks, and parses only its label (TF's vectorised
    `parse_example` of the serialised records): about 3x faster than decoding whole
    examples, which matters since a class subset is found this way at every start.
    """
    raw_source = self.source.data_source  # The array_record source of serialised examples.
    label_feature = {"label": tf.io.FixedLenFeature([], tf.int64)}
    labels = np.empty(len(self), np.int64)
    for start in range(0, len(self), _LABEL_SCAN_CHUNK):
      chunk = [int(i) for i in self.indices[start:start + _LABEL_SCAN_CHUNK]]
      parsed = tf.io.parse_example(raw_source.__getitems__(chunk), label_feature)["label"]
      labels[start:start + len(chunk)] = self.label_map[parsed.numpy()]
    return labels


def dataset_builder(dataset, data_dir):
  """The TFDS builder of a prepared `dataset`, or an error saying how to prepare it."""
  builder = tfds.builder(dataset, data_dir=data_dir or None)
  if not builder.is_prepared():
    hint = PREPARE_HINTS.get(dataset, f"tfds build {dataset} --file_format=array_record "
                                      "--data_dir={data_dir}")
    raise FileNotFoundError(
        f"TFDS dataset {dataset!r} is not prepared in {builder.data_dir}; prepare it "
        f"with: {hint.format(data_dir=builder.data_dir_root)}")
  return builder


def open_split(builder, split, classes=(), what="split"):
  """Opens `split` (TFDS split syntax) of a prepared dataset.

  Args:
    builder: from `dataset_builder`.
    split: e.g. 'train[:98%]'.
    classes: if non-empty, keep only these labels and renumber them 0..k-1 in
      the given order.
    what: the config key being opened, named in errors.
  """
  name = f"{builder.name}:{split}"
  if not sum(stop - start for _, start, stop in _absolute_ranges(builder, split, what)):
    raise errors.UserError(f"{what}={split!r} of {builder.name} is empty")
  try:
    source = builder.as_data_source(
        split=split, decoders={"image": tfds.decode.SkipDecoding()})
  except NotImplementedError as e:
    raise errors.UserError(
        f"{what}={split!r}: {builder.name} in {builder.data_dir} is not in a random-access "
        f"format; convert it with: tfds convert_format --dataset_dir={builder.data_dir} "
        f"--out_file_format=array_record") from e
  num_labels = builder.info.features["label"].num_classes
  label_map = np.arange(num_labels, dtype=np.int64)
  indices = np.arange(len(source))
  if classes:
    bad = [c for c in classes if not 0 <= c < num_labels]
    if bad:
      raise errors.UserError(f"{what}: classes {bad} are not labels of {builder.name} "
                             f"(0..{num_labels - 1})")
    label_map = np.full(num_labels, -1, np.int64)
    label_map[list(classes)] = np.arange(len(classes))
    indices = np.flatnonzero(Split(name, source, indices, label_map).labels() >= 0)
  if not len(indices):
    raise errors.UserError(f"{what}={split!r} of {builder.name} has no example of "
                           f"classes {list(classes)}")
  return Split(name, source, indices, label_map)


def _absolute_ranges(builder, split, what):
  """TFDS split syntax -> {(split_name, start, stop)} of absolute example ranges."""
  try:
    instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(builder.info.splits)
  except (ValueError, KeyError, AssertionError) as e:
    raise errors.UserError(f"{what}={split!r} is not a valid split of {builder.name}: {e}") from e
  return {(i.splitname, i.from_ or 0,
           builder.info.splits[i.splitname].num_examples if i.to is None else i.to)
          for i in instructions}


def _overlap(ranges_a, ranges_b):
  """Number of examples two sets of absolute ranges share."""
  return sum(max(0, min(stop_a, stop_b) - max(start_a, start_b))
             for name_a, start_a, stop_a in ranges_a
             for name_b, start_b, stop_b in ranges_b if name_a == name_b)


def check_heldout_split(builder, train_split, heldout_split, test_split):
  """The held-out split ranks runs and cooks soups: it must be neither trained on nor the test set.

  Raises:
    ValueError naming the config keys when the held-out split shares examples
    with the training split or the test split.
  """
  train = _absolute_ranges(builder, train_split, "config.input.train_split")
  heldout = _absolute_ranges(builder, heldout_split, "config.input.heldout_split")
  test = _absolute_ranges(builder, test_split, "config.input.test_split")
  if shared := _overlap(train, heldout):
    raise errors.UserError(
        f"config.input.heldout_split={heldout_split!r} shares {shared} examples with "
        f"config.input.train_split={train_split!r}; carve the held-out split from "
        "data the run does not train on, e.g. train='train[:98%]', heldout='train[98%:]'")
  if heldout == test:
    raise errors.UserError(f"config.input.heldout_split={heldout_split!r} is the test split "
                           f"(config.input.test_split={test_split!r}); soups must never be "
                           "selected on test data")
  if shared := _overlap(heldout, test):
    raise errors.UserError(
        f"config.input.heldout_split={heldout_split!r} shares {shared} examples with "
        f"config.input.test_split={test_split!r}; soups must never be selected on test data")


class _EpochPermutations:
  """Example order of each epoch: a permutation drawn from (seed, epoch)."""

  def __init__(self, size, seed):
    self.size, self.seed, self._cache = size, seed, {}

  def positions(self, stream_positions):
    """Positions in the split of the examples at `stream_positions` of the shuffled stream."""
    epochs, offsets = np.divmod(stream_positions, self.size)
    out = np.empty_like(stream_positions)
    for epoch in np.unique(epochs):
      if epoch not in self._cache:
        if len(self._cache) > 1:
          self._cache.pop(min(self._cache))
        self._cache[epoch] = np.random.default_rng([self.seed, int(epoch)]).permutation(self.size)
      out[epochs == epoch] = self._cache[epoch][offsets[epochs == epoch]]
    return out


def _batches(read, batch_ids, preprocess_fn, local_batch, seed, num_threads, batch_fn=None):
  """tf.data pipeline: read(batch_id) on the host, a parallel per-example preprocess, batch_fn.

  `batch_fn(batch, seed)` (e.g. mixup) gets a seed drawn from (seed, stream
  position of the batch's first example): unique per step and process.
  """
  def read_np(batch_id):
    images, labels, positions, mask = read(int(batch_id))
    return images.astype(object), labels, positions.astype(np.int64), mask

  def read_tf(batch_id):
    images, labels, positions, mask = tf.numpy_function(
        read_np, [batch_id], [tf.string, tf.int64, tf.int64, tf.bool], stateful=False)
    for t in (images, labels, positions, mask):
      t.set_shape([local_batch])
    return dict(image=images, label=labels, _position=positions, mask=mask)

  def preprocess(example):
    position = example.pop("_position")
    example_seed = tf.stack([tf.constant(seed, tf.int64), position])
    return {**preprocess_fn(example, example_seed), "_position": position}

  def finish_batch(batch):
    position = batch.pop("_position")[0]
    if batch_fn is None:
      return batch
    batch_seed = tf.random.experimental.stateless_fold_in(
        tf.stack([tf.constant(seed, tf.int64), position]), _BATCH_SEED_TAG)
    return batch_fn(batch, batch_seed)

  ds = batch_ids.map(read_tf).unbatch()
  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.map(finish_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(2)
  options = tf.data.Options()
  options.deterministic = True
  if num_threads:
    options.threading.private_threadpool_size = num_threads
  return ds.with_options(options).as_numpy_iterator()


def _local_batch_size(global_batch, process_count, what):
  if global_batch % process_count:
    raise errors.UserError(
        f"{what}={global_batch} is not divisible by the {process_count} processes")
  return global_batch // process_count


def train_batches(split, preprocess_fn, global_batch, seed, start_step=0, end_step=None, *,
                  process_index=0, process_count=1, num_threads=0, batch_fn=None):
  """Iterator of this process's slice of the global batch of steps [start_step, end_step).

  Batch `s` holds the examples at stream positions [s*B, (s+1)*B) of an endless
  stream that visits the split once per epoch in an order drawn from
  (seed, epoch); this process gets its `process_index`-th slice. Each example's
  augmentation seed is (seed, stream position), so everything is a function of
  (seed, step). `batch_fn(batch, seed)` (mixup/CutMix) runs on each local batch.

  `end_step=None`: endless. A bounded stream lets the pipeline's threads run dry
  when training ends, so the process exits at once instead of waiting for
  batches it will never use.

  Yields: dicts of numpy arrays, e.g. image [B/P, H, W, C], labels, label, mask.
  """
  local_batch = _local_batch_size(global_batch, process_count, "config.batch_size")
  order = _EpochPermutations(len(split), seed)

  def read(step):
    stream = step * global_batch + process_index * local_batch + np.arange(local_batch)
    images, labels = split.read(order.positions(stream))
    return images, labels, stream, np.ones(local_batch, bool)

  steps = tf.data.Dataset.range(
      start_step, np.iinfo(np.int64).max if end_step is None else end_step)
  return _batches(read, steps, preprocess_fn, local_batch, seed, num_threads, batch_fn)


def eval_batches(split, preprocess_fn, global_batch, *, process_index=0,
                 process_count=1, num_threads=0):
  """One pass over `split` in order, padded to whole global batches.

  Padding examples repeat example 0 and have mask False, so every example is
  counted exactly once whatever the batch size. Yields this process's slices.
  """
  local_batch = _local_batch_size(global_batch, process_count, "eval batch size")
  num_batches = -(-len(split) // global_batch)

  def read(batch_id):
    positions = batch_id * global_batch + process_index * local_batch + np.arange(local_batch)
    mask = positions < len(split)
    images, labels = split.read(np.where(mask, positions, 0))
    return images, labels, positions, mask

  batch_ids = tf.data.Dataset.range(num_batches)
  return _batches(read, batch_ids, preprocess_fn, local_batch, 0, num_threads)
