"""Evaluators, ensembles, shift suites (offline; ImageNet-family stand-ins), weights, the CLI."""

import dataclasses
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder
from tensorflow_datasets.datasets.imagenet2012 import imagenet_common
from tensorflow_datasets.datasets.imagenet_a import imagenet_a_dataset_builder
from tensorflow_datasets.datasets.imagenet_r import imagenet_r_dataset_builder
from tensorflow_datasets.datasets.imagenet_sketch import imagenet_sketch_dataset_builder
from tensorflow_datasets.datasets.imagenet_v2 import imagenet_v2_dataset_builder

from configs import fashion_mnist
from eval import datasets
from eval import evaluate as evaluate_lib
from eval import run_config
from eval import shifts
from eval import weights as weights_lib
from tests.eval_helpers import direct_logits
from tests.eval_helpers import eval_setup
from tests.eval_helpers import random_params
from tests.eval_helpers import stored_run_config
from tests.eval_helpers import top1
from tests.helpers import run_module
from train import data
from train import losses
from train import preprocess
from train import pretrained
from train import sharding
from train import vit


@pytest.mark.parametrize("batch_size", [64, 300])
@pytest.mark.slow
def test_accuracy_counts_each_example_once_for_any_batch_size(data_dir, tmp_path, batch_size):
  config = stored_run_config(tmp_path, **{"input.data_dir": data_dir, "input.test_split": "test[:300]"})
  model, evaluators, (params,) = eval_setup(config, batch_size=batch_size)
  dataset = evaluators.run_split("test")
  assert len(dataset.split) % 64 and len(dataset.split) < 300  # 5 of the 10 classes.
  result = evaluators.split("test").evaluate(params)
  logits, labels = direct_logits(model, params, dataset)
  assert result["num_examples"] == len(dataset.split)
  assert result["accuracy"] == pytest.approx(top1(logits, labels), abs=1e-9)
  assert 0.05 < result["accuracy"] < 0.95  # Not a constant prediction.
  direct_loss = np.mean(losses.softmax_xent(logits, np.eye(config.num_classes)[labels]))
  assert result["loss"] == pytest.approx(float(direct_loss), rel=1e-4)
  # Any TFDS split of the run's dataset: a slice of the same split scores its own examples.
  sliced = evaluators.make("accuracy", evaluators.tfds_split("test[:100]")).evaluate(params)
  assert sliced["num_examples"] == len(evaluators.tfds_split("test[:100]").split) < 100


class _RecordingSource:
  """A split's data source that records which examples are read through it."""

  def __init__(self, source):
    self.source, self.read = source, set()

  def __len__(self):
    return len(self.source)

  def __getitems__(self, indices):
    self.read.update(indices)
    return self.source.__getitems__(indices)


def test_a_small_split_is_read_once_then_served_from_memory(data_dir, tmp_path):
  config = stored_run_config(tmp_path, **{"input.data_dir": data_dir, "input.test_split": "test[:300]"})
  _, evaluators, (params, other) = eval_setup(config, batch_size=64, seeds=(0, 1))
  recorded = lambda e: dataclasses.replace(e.split, source=_RecordingSource(e.split.source))
  cached, uncached = evaluators.split("test"), evaluators.split("test")
  uncached.cache_bytes = 0
  first = uncached.evaluate(params)
  cut_short = cached.batch_sums(params)
  next(cut_short)
  cut_short.close()  # A pass cut short (greedy's early abort) still completes the cache.
  cached.split, uncached.split = recorded(cached), recorded(uncached)
  assert cached.evaluate(params) == first
  assert cached.evaluate(other)["accuracy"] != first["accuracy"]
  assert not cached.split.source.read  # Served from memory.
  assert uncached.evaluate(params) == first
  assert uncached.split.source.read == set(uncached.split.indices.tolist())  # Read again.


def test_a_split_too_big_for_the_cache_is_not_read_past_an_early_stop(data_dir, tmp_path,
                                                                      monkeypatch):
  config = stored_run_config(tmp_path, **{"input.data_dir": data_dir, "input.test_split": "test[:300]"})
  _, evaluators, (params,) = eval_setup(config, batch_size=64)
  pulled = []  # Bytes of each host batch the evaluator took from the input pipeline.
  read = data.eval_batches

  def counted(*args, **kwargs):
    for batch in read(*args, **kwargs):
      pulled.append(sum(batch[k].nbytes for k in ("image", "labels", "mask")))
      yield batch

  monkeypatch.setattr(data, "eval_batches", counted)
  uncached = evaluators.split("test")
  uncached.cache_bytes = 0
  expected = uncached.evaluate(params)
  num_batches = uncached.num_batches()
  assert len(pulled) == num_batches >= 3 and len(set(pulled)) == 1  # Padded to equal batches.
  evaluator = evaluators.split("test")
  evaluator.cache_bytes = int(1.5 * pulled[0])
  for batches_read in (2, 1):  # Read on until the cache overflows, then never past the stop.
    pulled.clear()
    stopped = evaluator.batch_sums(params)
    next(stopped)
    stopped.close()
    assert len(pulled) == batches_read
  pulled.clear()
  assert evaluator.evaluate(params) == expected and len(pulled) == num_batches


def test_ensemble_of_one_is_its_accuracy_and_of_two_the_mean_of_logits(data_dir, tmp_path):
  config = stored_run_config(tmp_path, **{"input.data_dir": data_dir})
  model, evaluators, (a, b) = eval_setup(config, batch_size=64, seeds=(0, 5))
  dataset = evaluators.run_split("test", "test[:300]")
  single = evaluators.make("accuracy", dataset).evaluate(a)
  ensemble = evaluators.make("ensemble", dataset)
  alone = ensemble.evaluate([a])
  assert alone["accuracy"] == single["accuracy"] and alone["num_examples"] == single["num_examples"]
  assert alone["loss"] == pytest.approx(single["loss"], rel=1e-5)
  pair = ensemble.evaluate(params for params in (a, b))  # Streamed: one weight set at a time.
  logits_a, labels = direct_logits(model, a, dataset)
  logits_b, _ = direct_logits(model, b, dataset)
  mean = (logits_a + logits_b) / 2
  assert (np.argmax(mean, -1) != np.argmax(logits_a, -1)).any()  # The average matters here.
  assert pair["accuracy"] == pytest.approx(top1(mean, labels), abs=1e-9)
  assert pair["loss"] == pytest.approx(
      float(np.mean(losses.softmax_xent(mean, np.eye(config.num_classes)[labels]))), rel=1e-4)
  assert pair["num_examples"] == len(dataset.split)
  with pytest.raises(ValueError, match=r"unknown evaluator 'mean'; known: \['accuracy', "):
    evaluators.make("mean", dataset)
  with pytest.raises(ValueError, match="at least one weight set"):
    ensemble.evaluate([])


def test_shifts_are_deterministic_change_images_and_predictions(data_dir, tmp_path):
  config = stored_run_config(tmp_path, **{"input.data_dir": data_dir})
  model, evaluators, (params,) = eval_setup(config, batch_size=64)
  suite = evaluators.suite_datasets("fashion_mnist_shifts", "test[:200]")
  assert list(suite) == [e.name for e in shifts.suite("fashion_mnist_shifts")]
  clean = evaluators.run_split("test", "test[:200]")
  clean_logits, labels = direct_logits(model, params, clean)
  clean_images, _ = clean.split.read(np.arange(4))
  decode = preprocess.build("decode(channels=1)")
  seed = tf.constant([0, 3], tf.int64)
  for name, dataset in suite.items():
    assert dataset.pp.startswith("decode(channels=1)|") and dataset.pp.endswith("|onehot(5)")
    fn = preprocess.build(dataset.pp.split("|value_range")[0], shifts.OPS)  # Up to the corruption.
    for image in clean_images:
      out = fn({"image": tf.constant(image)}, seed)["image"].numpy()
      np.testing.assert_array_equal(out, fn({"image": tf.constant(image)}, seed)["image"].numpy())
      assert out.shape == (28, 28, 1) and out.dtype == np.uint8
      moved = np.abs(out.astype(int) - decode({"image": tf.constant(image)}, seed)["image"].numpy())
      assert moved.mean() > 2, name
    logits, _ = direct_logits(model, params, dataset)
    assert np.mean(np.argmax(logits, -1) != np.argmax(clean_logits, -1)) > 0.05, name
  noise = evaluators.make("accuracy", suite["noise"])
  first = noise.evaluate(params)
  assert noise.evaluate(params) == first  # Noise drawn from the per-example seed: reproducible.
  assert first["accuracy"] == pytest.approx(
      top1(direct_logits(model, params, suite["noise"])[0], labels), abs=1e-9)


def test_unknown_suite_and_bad_pp_are_clear_errors(data_dir, tmp_path):
  with pytest.raises(ValueError, match=r"unknown shift suite 'imagenet_c'; known: "):
    shifts.suite("imagenet_c")
  _, evaluators, _ = eval_setup(stored_run_config(tmp_path, **{"input.data_dir": data_dir}), seeds=())
  with pytest.raises(ValueError, match=r"unknown suite 'imagenet_c'; known: \['heldout', 'test', "
                                       r"'fashion_mnist_shifts', 'imagenet_shifts'\]"):
    evaluators.suite("imagenet_c")
  with pytest.raises(ValueError, match=r"has no decode op to insert 'invert' after"):
    shifts.insert_after_decode("resize(28)|onehot(5)", "invert")
  assert shifts.insert_after_decode("decode(channels=1)|onehot(5)", "invert") == \
      "decode(channels=1)|invert|onehot(5)"


# ImageNet-family stand-ins: the real TFDS builders (names, versions, features: labels with
# all 1000 ImageNet WordNet ids) writing a few random images instead of downloading.
R_CLASSES, A_CLASSES = (7, 2, 5), (900, 3, 2)
IMAGENET_NAMES = tfds.features.ClassLabel(names_file=imagenet_common.label_names_file()).names


def _standin(real, split, labels, config=None):
  class StandIn(real.Builder, skip_registration=True):
    name = real.Builder.name
    get_metadata = real.Builder.get_metadata

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples()}

    def _generate_examples(self):
      rng = np.random.default_rng(len(labels))
      for i, label in enumerate(labels):
        yield i, {"image": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
                  "label": int(label), "file_name": f"{i}.JPEG"}

  kwargs = {"config": config} if config else {}
  return StandIn, kwargs


class RenamedSubset(tfds.core.GeneratorBasedBuilder):
  """A 200-class-style dataset with its own label numbering: 3 ImageNet wnids and a stranger."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(16, 16, 3)),
        "label": tfds.features.ClassLabel(
            names=[IMAGENET_NAMES[c] for c in R_CLASSES] + ["n99999999"])}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"test": self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(4)
    for i in range(20):
      yield i, {"image": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "label": i % 4}


@pytest.fixture(scope="module")
def imagenet_standins(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  spread = np.arange(30) * 33 % 1000
  for real, split, labels, config in [
      (imagenet2012_dataset_builder, "validation", spread, None),
      (imagenet_v2_dataset_builder, "test", spread, "matched-frequency"),
      (imagenet_sketch_dataset_builder, "test", spread[::-1], None),
      (imagenet_r_dataset_builder, "test", np.tile(R_CLASSES, 8), None),
      (imagenet_a_dataset_builder, "test", np.tile(A_CLASSES, 6), None)]:
    cls, kwargs = _standin(real, split, labels, config)
    cls(data_dir=data_dir, file_format="array_record", **kwargs).download_and_prepare()
  RenamedSubset(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def _imagenet_config(tmp_path, data_dir):
  return stored_run_config(tmp_path, **{
      "input.dataset": "imagenet2012", "input.data_dir": data_dir, "input.classes": (),
      "num_classes": 1000, "input.test_split": "validation", "input.heldout_split": "validation",
      "input.pp_eval": "decode|resize(16)|value_range(-1, 1)|onehot({num_classes})"})


@pytest.mark.slow
def test_imagenet_shifts_score_r_and_a_over_their_classes_only(imagenet_standins, tmp_path):
  config = _imagenet_config(tmp_path, imagenet_standins)
  model, evaluators, (params,) = eval_setup(config, (16, 16, 3), batch_size=16, seeds=(3,))
  suite = evaluators.suite_datasets("imagenet_shifts")
  assert list(suite) == ["imagenet_v2", "imagenet_r", "imagenet_sketch", "imagenet_a"]
  assert suite["imagenet_v2"].class_subset is None and suite["imagenet_sketch"].class_subset is None
  np.testing.assert_array_equal(suite["imagenet_r"].class_subset, sorted(R_CLASSES))
  np.testing.assert_array_equal(suite["imagenet_a"].class_subset, sorted(A_CLASSES))
  results = {name: ev.evaluate(params) for name, ev in evaluators.suite("imagenet_shifts").items()}
  for name, dataset in suite.items():
    logits, labels = direct_logits(model, params, dataset)
    assert results[name]["num_examples"] == len(labels) == len(dataset.split)
    assert results[name]["accuracy"] == pytest.approx(
        top1(logits, labels, dataset.class_subset), abs=1e-9), name
    if dataset.class_subset is not None:  # Over 1000 logits a random head is ~never right.
      assert results[name]["accuracy"] > top1(logits, labels) + 0.1, name
  # A slice keeps the classes of the whole split.
  sliced = evaluators.suite_datasets("imagenet_shifts", split="test[:2]")
  assert len(sliced["imagenet_r"].split) == 2
  np.testing.assert_array_equal(sliced["imagenet_r"].class_subset, sorted(R_CLASSES))


def test_labels_are_matched_by_class_name_and_unknown_classes_left_out(imagenet_standins,
                                                                        tmp_path):
  config = _imagenet_config(tmp_path, imagenet_standins)
  run_builder = tfds.builder("imagenet2012", data_dir=imagenet_standins)
  builder = tfds.builder("renamed_subset", data_dir=imagenet_standins)
  assert run_builder.info.features["label"].names == IMAGENET_NAMES
  dataset = datasets.foreign_split(config, run_builder, builder, "test", "renamed",
                                   "decode|onehot(1000)", covered_only=True)
  np.testing.assert_array_equal(dataset.split.label_map[:3], R_CLASSES)
  _, labels = dataset.split.read(np.arange(len(dataset.split)))
  assert len(labels) == 15 and set(labels) == set(R_CLASSES)  # The 5 'n99999999' left out.
  np.testing.assert_array_equal(dataset.class_subset, sorted(R_CLASSES))
  other = stored_run_config(tmp_path)  # Fashion-MNIST: no class in common.
  with pytest.raises(ValueError, match=r"none of its classes .* is a class of the model"):
    datasets.foreign_split(other, tfds.builder("fashion_mnist"), builder, "test", "x", "decode")


def test_weights_load_npz_and_orbax_onto_the_mesh_and_name_bad_files(tmp_path):
  mesh = sharding.make_mesh((("data", -1),))
  rules = ((".*/kernel", 'fsdp(axis="data")'), (".*", "replicate"))
  model = vit.build_model(fashion_mnist.get_config("variant=mu/4").model, 5)
  params = random_params(model, (28, 28, 1), 0)
  pretrained.save_npz(tmp_path / "w.npz", params)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "orbax", params)
  checkpointer.wait_until_finished()
  for path in (str(tmp_path / "w.npz"), str(tmp_path / "orbax")):
    loaded = weights_lib.load(path, mesh, rules)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    kernel = loaded["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "data"), path
  (tmp_path / "bad.npz").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match=r"bad.npz is not a readable .npz file"):
    weights_lib.load(str(tmp_path / "bad.npz"), mesh, rules)
  with pytest.raises(FileNotFoundError, match=r"weights .*missing do not exist"):
    weights_lib.load(str(tmp_path / "missing"), mesh, rules)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=r"cannot read the orbax checkpoint .*empty"):
    weights_lib.load(str(tmp_path / "empty"), mesh, rules)


@pytest.mark.slow
def test_weights_that_do_not_fit_the_model_are_named(data_dir, tmp_path):
  config = stored_run_config(tmp_path, **{"input.data_dir": data_dir})
  other = vit.build_model(fashion_mnist.get_config("variant=pico/4").model, config.num_classes)
  pretrained.save_npz(tmp_path / "pico.npz", random_params(other, (28, 28, 1), 0))
  with pytest.raises(ValueError, match=r"weights .*pico.npz do not fit config.model \(variant="
                                       r"'mu/4', num_classes=5\): For parameter"):
    evaluate_lib.evaluate(str(tmp_path / "pico.npz"), "test", config, split="test[:20]")


def test_run_config_is_found_from_the_weights_and_checked(tmp_path):
  run = tmp_path / "run"
  (run / "checkpoints" / "300" / "params").mkdir(parents=True)
  (run / "final").mkdir()
  (run / "config.json").write_text(json.dumps({"model": {"variant": "mu/4"}}))
  for weights in ("final/ema_low.npz", "checkpoints/300/params", "checkpoints/300/params/"):
    assert run_config.find(str(run / weights)) == str(run / "config.json")
  assert run_config.find(str(tmp_path / "elsewhere.npz")) is None
  with pytest.raises(ValueError, match=r"config.json has no key 'model.pool_type'"):
    run_config.load(str(run / "config.json"))
  config = stored_run_config(tmp_path)
  assert config.mesh == (("data", -1),) and isinstance(config.input.classes, tuple)


@pytest.mark.slow
def test_eval_cli_prints_a_table_writes_json_and_names_bad_input(pretrained_npz, data_dir,
                                                                 tmp_path):
  run_dir = os.path.dirname(os.path.dirname(pretrained_npz))
  count = len(data.open_split(tfds.builder("fashion_mnist", data_dir=data_dir), "test[:1000]",
                              fashion_mnist.UPSTREAM_CLASSES))
  out = tmp_path / "shifts.json"
  proc = run_module("eval", f"--weights={pretrained_npz}", "--suite=fashion_mnist_shifts",
                    "--split=test[:1000]", f"--out={out}")
  result = json.loads(out.read_text())
  names = [e.name for e in shifts.suite("fashion_mnist_shifts")]
  assert sorted(result["datasets"]) == sorted(names) and result["evaluator"] == "accuracy"
  for name in names:
    row = result["datasets"][name]
    assert row["num_examples"] == count and row["split"] == "fashion_mnist:test[:1000]"
    assert f"{name} " in proc.stdout and f"{100 * row['accuracy']:.2f}%" in proc.stdout
  accuracies = [result["datasets"][n]["accuracy"] for n in names]
  assert result["average_accuracy"] == pytest.approx(np.mean(accuracies))
  assert "average" in proc.stdout.splitlines()[-2]
  # The same weights twice as an ensemble, with the run's config.json and an override.
  ens = tmp_path / "ens.json"
  run_module("eval", f"--weights={pretrained_npz},{pretrained_npz}", "--suite=test",
             f"--config={run_dir}/config.json", "--config.input.test_split=test[:1000]",
             f"--out={ens}")
  clean = json.loads(ens.read_text())
  assert clean["evaluator"] == "ensemble" and clean["datasets"]["test"]["num_examples"] == count
  assert clean["datasets"]["test"]["accuracy"] > 0.6
  assert max(accuracies) < clean["datasets"]["test"]["accuracy"]  # Every shift hurts.
  for args, message in [
      ((f"--weights={tmp_path / 'missing.npz'}", f"--config={run_dir}/config.json"),
       "checkpoint missing.npz does not exist"),
      ((f"--weights={pretrained_npz}", "--suite=imagenet_c"),
       "unknown --suite='imagenet_c'; known: ['heldout', 'test', 'fashion_mnist_shifts', "
       "'imagenet_shifts']")]:
    bad = run_module("eval", *args, check=False)
    assert bad.returncode != 0 and f"FATAL {message}" in bad.stderr.replace(str(tmp_path) + "/", "")
  assert not list(tmp_path.glob("**/*.json.*"))  # No partial output.
