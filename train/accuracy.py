"""Top-1 accuracy and loss of a model on a whole split, sharded over the mesh.

Examples are split over every mesh axis; the last, partial global batch is
padded and masked, so each example counts exactly once. A prediction is
correct when its top-1 class has a positive target (`labels[argmax] > 0`),
which also scores multi-label splits such as ImageNet-ReaL.

A split whose preprocessed examples fit in `CACHE_BYTES` is kept on the host
after its first pass (a pass stopped early is read on into the cache, without
forward passes, until the split is complete or turns out too big): the soup
step evaluates the same splits dozens of times, and decoding and shifting
images then costs more than the forward pass.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

from train import data
from train import sharding

CACHE_BYTES = 1 << 30  # Per split; ImageNet-sized splits stream from disk on every pass.


def masked_sums(logits, labels, mask, loss_fn):
  """Sums of correct predictions, loss and examples over the unmasked rows of a batch."""
  top1 = jnp.argmax(logits, axis=-1)
  correct = jnp.take_along_axis(labels, top1[:, None], axis=-1)[:, 0] > 0
  return {"correct": jnp.sum(correct * mask), "loss": jnp.sum(loss_fn(logits, labels) * mask),
          "count": jnp.sum(mask)}


def accuracy_from_logits(logits, labels, mask):
  """Host-side top-1 accuracy with the same rule as the sharded step (labels[argmax] > 0)."""
  top1 = np.argmax(logits, axis=-1)
  correct = np.take_along_axis(labels, top1[:, None], axis=-1)[:, 0] > 0
  return float(np.sum(correct * mask) / np.sum(mask))


def make_scored(model, class_subset=None):
  """`(params, batch) -> (logits, labels)`, over `class_subset`'s classes when given."""
  def scored(params, batch):
    logits, labels = model.apply({"params": params}, batch["image"]), batch["labels"]
    if class_subset is not None:
      logits, labels = logits[:, class_subset], labels[:, class_subset]
    return logits, labels
  return scored


def jit_eval_step(model, loss_fn, mesh, params_sharding, class_subset=None):
  """The compiled evaluation step `(params, batch) -> masked sums` (launch/plan.py lowers it)."""
  scored = make_scored(model, class_subset)

  def batch_sums(params, batch):
    logits, labels = scored(params, batch)
    return masked_sums(logits, labels, batch["mask"], loss_fn)

  return jax.jit(batch_sums, in_shardings=(params_sharding, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


class SplitAccuracy:
  """`evaluate(params)` -> {'accuracy', 'loss', 'num_examples'} on one split."""

  def __init__(self, model, mesh, split, preprocess_fn, batch_size, loss_fn,
               params_sharding, num_threads=0, class_subset=None, cache_bytes=CACHE_BYTES):
    """`class_subset`: score only these output classes (e.g. ImageNet-R's 200 of 1000).

    `cache_bytes`: keep the split's preprocessed batches in host memory after one
    full pass when they take at most this much (0: never).
    """
    self.mesh, self.split, self.preprocess_fn = mesh, split, preprocess_fn
    self.cache_bytes, self._cached, self._too_big = cache_bytes, None, False
    # Rounded up to split evenly over the devices; padding absorbs the difference.
    self.batch_size = -(-batch_size // mesh.size) * mesh.size
    self.num_threads = num_threads
    self.batch_sharding = sharding.batch_sharding(mesh)

    scored = make_scored(model, class_subset)
    self._batch_sums = jit_eval_step(model, loss_fn, mesh, params_sharding, class_subset)
    self._scored = jax.jit(scored, in_shardings=(params_sharding, self.batch_sharding))

  def num_batches(self):
    return -(-len(self.split) // self.batch_size)

  def _host_batches(self):
    """This process's batches, from the cache once a pass has filled it."""
    if self._cached is not None:
      yield from self._cached
      return
    kept, size = (None if self._too_big else []), 0

    def keep(host_batch):
      nonlocal kept, size
      size += sum(v.nbytes for v in host_batch.values())
      if size <= self.cache_bytes:
        kept.append(host_batch)
      else:
        kept, self._too_big = None, True  # Later passes neither keep nor read ahead.

    source = (
        {k: b[k] for k in ("image", "labels", "mask")}
        for b in data.eval_batches(
            self.split, self.preprocess_fn, self.batch_size,
            process_index=jax.process_index(), process_count=jax.process_count(),
            num_threads=self.num_threads))
    try:
      for host_batch in source:
        if kept is not None:
          keep(host_batch)
        yield host_batch
    except GeneratorExit:
      # A pass stopped early (greedy's early abort) still completes the cache of
      # a split that fits, so that the next pass does not decode it again; the
      # reading stops as soon as the split turns out not to fit.
      while kept is not None and (host_batch := next(source, None)) is not None:
        keep(host_batch)
      self._cached = kept
      raise
    self._cached = kept  # None when the split does not fit.

  def global_batches(self):
    """The split once, as padded global batches {'image', 'labels', 'mask'} on the mesh.

    Closing it early closes the host pass at once (errors of its read-ahead
    raised there), not whenever the garbage collector gets to it.
    """
    with contextlib.closing(self._host_batches()) as host_batches:
      for host_batch in host_batches:
        yield sharding.to_global(host_batch, self.batch_sharding)

  def batch_sums(self, params):
    """Yields {'correct', 'loss', 'count'} of each global batch in turn (replicated scalars).

    Callers that can decide before the end (greedy soup's early abort) stop
    iterating; every process sees the same sums and stops at the same batch.
    """
    with contextlib.closing(self.global_batches()) as batches:
      for batch in batches:
        yield self._batch_sums(params, batch)

  def predictions(self, params):
    """(logits, labels, mask) of the whole split on the host, scored classes only.

    For ensembles: logits of several models can be summed and scored with
    `accuracy_from_logits`, which applies the same rule as `evaluate`.
    """
    parts = []
    for batch in self.global_batches():
      logits, labels = sharding.to_host(self._scored(params, batch))
      parts.append((logits, labels, sharding.to_host(batch["mask"])))
    return tuple(np.concatenate(p) for p in zip(*parts))

  def evaluate(self, params):
    totals = {"correct": 0.0, "loss": 0.0, "count": 0.0}
    for sums in self.batch_sums(params):
      totals = jax.tree.map(lambda t, s: t + s, totals, sums)
    totals = jax.tree.map(lambda x: float(np.asarray(x)), totals)
    return {"accuracy": totals["correct"] / totals["count"],
            "loss": totals["loss"] / totals["count"], "num_examples": int(totals["count"])}
