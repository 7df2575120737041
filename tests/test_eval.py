"""Evaluators, shift suites (offline and ImageNet-style on stand-ins), the eval CLI."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import fashion_mnist
from eval import evaluators as eval_lib
from eval import shifts
from tests.helpers import run_module
from train import data
from train import pp_spec
from train import preprocess
from train import sharding
from train import vit


def _run_config(data_dir, **overrides):
  config = fashion_mnist.get_config("variant=mu/4")
  config.update_from_flattened_dict({"input.data_dir": data_dir, **overrides})
  return ml_collections.ConfigDict(json.loads(config.to_json()))


def _model_and_params(config, image_shape=(28, 28, 1), seed=0):
  model = vit.build_model(config.model, config.num_classes)
  params = model.init(jax.random.key(seed), jnp.zeros((1, *image_shape)))["params"]
  return model, params


def _direct_accuracy(model, params, split, pp, class_subset=None):
  """Top-1 accuracy computed example by example in numpy, no batching at all."""
  fn = preprocess.build(pp, shifts.OPS)
  images, labels = split.read(np.arange(len(split)))
  correct = 0
  for position, (image, label) in enumerate(zip(images, labels)):
    example = fn({"image": tf.constant(image), "label": tf.constant(label)},
                 tf.constant([0, position], tf.int64))
    logits = np.asarray(model.apply({"params": params}, example["image"].numpy()[None]))[0]
    if class_subset is not None:
      correct += class_subset[np.argmax(logits[class_subset])] == label
    else:
      correct += np.argmax(logits) == label
  return correct / len(split)


@pytest.mark.parametrize("batch_size", [64, 96, 300])
def test_accuracy_counts_each_example_once_for_any_batch_size(data_dir, batch_size):
  config = _run_config(data_dir, **{"input.test_split": "test[:300]"})
  model, params = _model_and_params(config)
  mesh = sharding.make_mesh((("data", -1),))
  evaluator = eval_lib.Evaluators(config, model, mesh, sharding.replicated(mesh), batch_size)
  result = evaluator.split("test").evaluate(params)
  assert result["num_examples"] == len(evaluator.split("test").split) < 300  # 5 of 10 classes.
  expected = _direct_accuracy(model, params, evaluator.split("test").split,
                              pp_spec.resolve(config, "pp_eval"))
  assert result["accuracy"] == pytest.approx(expected, abs=1e-9)


def test_shift_corruptions_are_deterministic_and_change_the_images(data_dir):
  builder = data.dataset_builder("fashion_mnist", data_dir)
  split = data.open_split(builder, "test[:4]")
  images, _ = split.read(np.arange(4))
  clean = preprocess.build("decode(channels=1)")
  seed = tf.constant([0, 3], tf.int64)
  for entry in shifts.suite("fashion_mnist_shifts"):
    fn = preprocess.build(f"decode(channels=1)|{entry.corruption}", shifts.OPS)
    for image in images:
      example = {"image": tf.constant(image)}
      out = fn(example, seed)["image"].numpy()
      np.testing.assert_array_equal(out, fn(example, seed)["image"].numpy())
      assert out.shape == (28, 28, 1) and out.dtype == np.uint8
      assert np.abs(out.astype(int) - clean(example, seed)["image"].numpy()).mean() > 2, entry.name


def test_unknown_suite_and_bad_pp_are_clear_errors():
  with pytest.raises(ValueError, match=r"unknown shift suite 'imagenet_c'; known: "):
    shifts.suite("imagenet_c")
  with pytest.raises(ValueError, match=r"has no decode op to insert 'invert' after"):
    shifts.insert_after_decode("resize(28)|onehot(5)", "invert")
  assert shifts.insert_after_decode("decode(channels=1)|onehot(5)", "invert") == \
      "decode(channels=1)|invert|onehot(5)"


# Stand-ins for ImageNet and ImageNet-R: the same label machinery, built in the test.
WNIDS = [f"n{i:08d}" for i in range(10)]
R_WNIDS = [WNIDS[7], WNIDS[2], WNIDS[5]]  # A subset, in another order, as ImageNet-R's 200.


class _StandIn(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")
  NAMES = WNIDS

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(8, 8, 3)),
        "label": tfds.features.ClassLabel(names=self.NAMES)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"test": self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(len(self.NAMES))
    for i in range(45):
      yield i, {"image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
                "label": i % len(self.NAMES)}


class StandinImagenet(_StandIn):
  """10 classes named by WordNet-style ids."""


class StandinImagenetR(_StandIn):
  """3 of them, reordered."""
  NAMES = R_WNIDS


def test_imagenet_r_style_subsets_map_labels_by_name_and_score_only_their_classes(tmp_path):
  for cls in (StandinImagenet, StandinImagenetR):
    cls(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  config = ml_collections.ConfigDict(json.loads(fashion_mnist.get_config("variant=mu/4").to_json()))
  config.update_from_flattened_dict({
      "input.dataset": "standin_imagenet", "input.data_dir": str(tmp_path), "input.classes": (),
      "num_classes": 10, "input.test_split": "test", "input.pp_eval": "decode|onehot(10)"})
  model, params = _model_and_params(config, (8, 8, 3), seed=3)
  entry = shifts.ShiftDataset("r", "standin_imagenet_r", "test")
  builder = data.dataset_builder("standin_imagenet", str(tmp_path))
  split, subset = shifts.open_entry(entry, config, builder)
  np.testing.assert_array_equal(split.label_map, [7, 2, 5])
  np.testing.assert_array_equal(subset, [2, 5, 7])
  _, labels = split.read(np.arange(len(split)))
  assert set(labels) == {2, 5, 7}
  mesh = sharding.make_mesh((("data", -1),))
  evaluators = eval_lib.Evaluators(config, model, mesh, sharding.replicated(mesh), 16)
  shifts.SUITES["standin_shifts"] = (entry,)
  try:
    result = evaluators.suite("standin_shifts")["r"].evaluate(params)
  finally:
    del shifts.SUITES["standin_shifts"]
  expected = _direct_accuracy(model, params, split, "decode|onehot(10)", subset)
  assert result["accuracy"] == pytest.approx(expected, abs=1e-9) and result["num_examples"] == 45
  full = _direct_accuracy(model, params, split, "decode|onehot(10)")
  assert expected >= full  # Fewer competing classes never lowers top-1 accuracy.


@pytest.mark.slow
def test_eval_cli_prints_a_table_and_writes_json(pretrained_npz, tmp_path):
  out = tmp_path / "shifts.json"
  proc = run_module("eval", f"--weights={pretrained_npz}", "--suite=fashion_mnist_shifts",
                    f"--out={out}", "--batch_size=500")
  result = json.loads(out.read_text())
  names = [e.name for e in shifts.suite("fashion_mnist_shifts")]
  assert sorted(result["datasets"]) == sorted(names)
  for name in names:
    assert f"{name} " in proc.stdout
    assert result["datasets"][name]["num_examples"] == 5000
  accuracies = [result["datasets"][n]["accuracy"] for n in names]
  assert result["average_accuracy"] == pytest.approx(np.mean(accuracies))
  clean = json.loads(run_module("eval", f"--weights={pretrained_npz}", "--suite=test",
                                f"--out={tmp_path / 'test.json'}").stdout and
                     (tmp_path / "test.json").read_text())["datasets"]["test"]["accuracy"]
  assert clean > 0.6 and min(accuracies) < clean - 0.05  # The shifts do hurt.
  bad = run_module("eval", f"--weights={tmp_path / 'missing.npz'}", "--suite=test",
                   f"--run_config={os.path.dirname(os.path.dirname(pretrained_npz))}/config.json",
                   check=False)
  assert bad.returncode != 0 and "missing.npz does not exist" in bad.stderr
