"""Input pipeline: split checks, deterministic order, sharding over processes, eval padding."""

import numpy as np
import pytest

from train import data
from train import preprocess

PP = "decode(channels=1)|value_range(-1, 1)|onehot(10)"


@pytest.fixture(scope="module")
def builder(data_dir):
  return data.dataset_builder("fashion_mnist", data_dir)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


@pytest.mark.parametrize("train,heldout,test,message", [
    ("train[:98%]", "train[97%:]", "test", r"shares 600 examples with config.input.train_split"),
    ("train[:98%]", "test", "test", r"is the test split"),
    ("train[:98%]", "test[:10]", "test", r"shares 10 examples with config.input.test_split"),
    ("train", "train[98%:]", "test", r"heldout_split='train\[98%:\]' shares 1200 examples"),
])
def test_heldout_split_must_be_disjoint_from_train_and_test(builder, train, heldout, test, message):
  with pytest.raises(ValueError, match=message):
    data.check_heldout_split(builder, train, heldout, test)


def test_valid_heldout_split_passes(builder):
  data.check_heldout_split(builder, "train[:98%]", "train[98%:]", "test")


def test_bad_splits_and_unprepared_datasets_are_clear_errors(builder, tmp_path):
  with pytest.raises(ValueError, match=r"config.input.test_split='validation' is not a valid split"):
    data.open_split(builder, "validation", what="config.input.test_split")
  with pytest.raises(ValueError, match=r"config.input.heldout_split='train\[5:5\]' of "
                                       r"fashion_mnist is empty"):
    data.open_split(builder, "train[5:5]", what="config.input.heldout_split")
  with pytest.raises(FileNotFoundError, match=r"not prepared in .*python -m train.packaged_data"):
    data.dataset_builder("fashion_mnist", str(tmp_path))
  with pytest.raises(ValueError, match=r"classes \[10\] are not labels"):
    data.open_split(builder, "train[:10]", classes=(3, 10))


def test_train_order_is_a_function_of_seed_and_step(builder):
  split = data.open_split(builder, "train[:2000]")
  pp = preprocess.build(PP)
  from_start = _take(data.train_batches(split, pp, 64, seed=3), 6)
  resumed = _take(data.train_batches(split, pp, 64, seed=3, start_step=4), 2)
  for a, b in zip(from_start[4:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
  other_seed = _take(data.train_batches(split, pp, 64, seed=4), 1)[0]
  assert not np.array_equal(other_seed["image"], from_start[0]["image"])


def test_an_epoch_visits_every_example_once():
  order = data._EpochPermutations(100, seed=0)  # pylint: disable=protected-access
  first, second = order.positions(np.arange(100)), order.positions(np.arange(100, 200))
  assert sorted(first) == list(range(100)) == sorted(second)
  assert not np.array_equal(first, second), "each epoch is shuffled anew"


def test_processes_read_slices_of_the_same_global_batch(builder):
  split = data.open_split(builder, "train[:1000]")
  pp = preprocess.build(PP)
  whole = _take(data.train_batches(split, pp, 32, seed=0), 3)
  halves = [_take(data.train_batches(split, pp, 32, seed=0, process_index=p, process_count=2), 3)
            for p in range(2)]
  for step in range(3):
    np.testing.assert_array_equal(
        np.concatenate([halves[0][step]["image"], halves[1][step]["image"]]),
        whole[step]["image"])


def test_eval_counts_every_example_once_with_a_partial_last_batch(builder):
  split = data.open_split(builder, "test[:1000]")
  pp = preprocess.build(PP)
  expected = np.array([r["label"] for r in split.source.__getitems__(list(range(1000)))])
  for process_count in (1, 2):
    labels = []
    for p in range(process_count):
      batches = list(data.eval_batches(split, pp, 384, process_index=p,
                                       process_count=process_count))
      assert len(batches) == 3  # ceil(1000 / 384)
      labels.append(np.concatenate([b["label"][b["mask"]] for b in batches]))
    # Process p holds positions [b*384 + p*L, b*384 + (p+1)*L) of each global batch b.
    local = 384 // process_count
    counted = np.concatenate(
        [labels[p][i * local:(i + 1) * local] for i in range(3) for p in range(process_count)])
    np.testing.assert_array_equal(counted, expected)


def test_class_subset_keeps_and_renumbers_labels(builder):
  full = data.open_split(builder, "train[:3000]")
  subset = data.open_split(builder, "train[:3000]", classes=(7, 2))
  raw = np.array([r["label"] for r in full.source.__getitems__(list(range(3000)))])
  assert len(subset) == np.isin(raw, (7, 2)).sum()
  _, labels = subset.read(np.arange(len(subset)))
  np.testing.assert_array_equal(labels, np.where(raw[np.isin(raw, (7, 2))] == 7, 0, 1))


def test_unknown_pp_op_lists_the_known_ones():
  with pytest.raises(ValueError, match=r"unknown op 'flip_up' in 'flip_up'; known ops: "
                                       r"\['central_crop', 'decode'"):
    preprocess.build("decode|flip_up")
  with pytest.raises(ValueError, match="arguments must be literals"):
    preprocess.build("resize(size)")


def test_normalize_scales_each_channel_by_its_mean_and_std():
  op = preprocess.build("value_range(0, 1)|normalize((0.5, 0.25, 0.0), (0.5, 0.25, 2.0))")
  image = np.full((1, 1, 3), 255, np.uint8)
  out = op({"image": image}, np.zeros(2, np.int64))["image"].numpy()
  np.testing.assert_allclose(out[0, 0], [1.0, 3.0, 0.5])
