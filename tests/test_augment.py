"""The paper's grid knobs: crop size, RandAugment, mixup, CutMix, label smoothing, SAM."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps
import pytest
import tensorflow as tf

from configs import fashion_mnist
from train import losses
from train import mixing
from train import optimizer
from train import pp_spec
from train import preprocess
from train import randaugment
from train import trainer


def _seed(i):
  return tf.constant([7, i], tf.int64)


def _coordinate_image(size=64):
  """Channel 0 holds the row index, channel 1 the column index: crops reveal their box."""
  rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  return np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8)


def _crop_area_fractions(area_min, n=400, size=64):
  crop = preprocess.inception_crop(size, area_min=area_min, method="nearest")
  image = tf.constant(_coordinate_image(size))
  fractions = []
  for i in range(n):
    out = crop({"image": image}, _seed(i))["image"].numpy().astype(int)
    height = out[..., 0].max() - out[..., 0].min() + 1
    width = out[..., 1].max() - out[..., 1].min() + 1
    fractions.append(height * width / size**2)
  return np.array(fractions)


def test_inception_crop_area_follows_the_minimum_crop_size():
  small = _crop_area_fractions(0.3)
  assert small.min() >= 0.3 - 0.03 and small.max() <= 1.0
  assert small.min() < 0.4 and 0.5 < small.mean() < 0.8  # Spread over [0.3, 1].
  large = _crop_area_fractions(0.9)
  assert large.min() >= 0.9 - 0.03
  assert large.mean() > small.mean() + 0.2


def test_flip_lr_mirrors_about_half_the_images():
  image = tf.constant(_coordinate_image(16))
  flip = preprocess.flip_lr()
  outs = [flip({"image": image}, _seed(i))["image"].numpy() for i in range(200)]
  flipped = [np.array_equal(o, image.numpy()[:, ::-1]) for o in outs]
  assert all(f or np.array_equal(o, image.numpy()) for f, o in zip(flipped, outs))
  assert 70 < sum(flipped) < 130


@pytest.fixture(scope="module")
def photo():
  """A smooth RGB image with a limited value range, so every op has something to change."""
  rows, cols = np.meshgrid(np.linspace(0, 1, 32), np.linspace(0, 1, 32), indexing="ij")
  image = np.stack([40 + 150 * rows, 60 + 120 * cols, 90 + 80 * rows * cols], -1)
  return image.round().astype(np.uint8)


@pytest.mark.parametrize("name,reference", [
    ("AutoContrast", ImageOps.autocontrast),
    ("Equalize", ImageOps.equalize),
    ("Invert", ImageOps.invert),
    ("Posterize", lambda im: ImageOps.posterize(im, 4)),  # Magnitude 10: keep 4 bits.
    ("Solarize", lambda im: ImageOps.solarize(im, 256 - 0.5 * 256)),  # Magnitude 5.
])
def test_pointwise_randaugment_ops_match_pil(photo, name, reference):
  magnitude = 5 if name == "Solarize" else 10
  ours = randaugment.apply_op(name, tf.constant(photo), magnitude, _seed(0)).numpy()
  expected = np.asarray(reference(Image.fromarray(photo)))
  np.testing.assert_allclose(ours.astype(int), expected.astype(int), atol=1)


@pytest.mark.parametrize("name,enhancer", [
    ("Color", ImageEnhance.Color), ("Contrast", ImageEnhance.Contrast),
    ("Brightness", ImageEnhance.Brightness), ("Sharpness", ImageEnhance.Sharpness)])
def test_enhance_ops_match_pil_at_the_drawn_factor(photo, name, enhancer):
  magnitude = 5
  for i in range(4):  # Both signs of the factor 1 ± 0.45 occur over a few seeds.
    ours = randaugment.apply_op(name, tf.constant(photo), magnitude, _seed(i)).numpy()
    candidates = [np.asarray(enhancer(Image.fromarray(photo)).enhance(f)) for f in (0.55, 1.45)]
    errors = [np.abs(ours.astype(int) - c.astype(int)).max() for c in candidates]
    assert min(errors) <= 2, (name, errors)


def test_randaugment_is_seeded_has_the_standard_ops_and_grows_with_magnitude(photo):
  assert set(randaugment.OP_NAMES) == {
      "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
      "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
      "TranslateY", "Cutout"}
  image = tf.constant(photo)
  run = lambda layers, magnitude, i: randaugment.randaugment(  # pylint: disable=g-long-lambda
      image, layers, magnitude, _seed(i)).numpy().astype(int)
  np.testing.assert_array_equal(run(2, 10, 1), run(2, 10, 1))
  np.testing.assert_array_equal(run(0, 10, 1), photo)
  assert len({run(2, 10, i).tobytes() for i in range(10)}) == 10
  change = lambda m: np.mean([np.abs(run(2, m, i) - photo).mean() for i in range(40)])
  assert change(2) < change(9)


def _batch(batch_size=8, size=8, num_classes=4):
  images = np.arange(batch_size, dtype=np.float32)[:, None, None, None] * np.ones(
      (1, size, size, 1), np.float32)
  labels = np.eye(num_classes, dtype=np.float32)[np.arange(batch_size) % num_classes]
  return {"image": tf.constant(images), "labels": tf.constant(labels)}


def test_mixup_mixes_images_and_labels_with_one_ratio():
  batch = _batch()
  mixed = mixing.make_batch_mixer(mixup_alpha=0.4, cutmix_alpha=0.0)(batch, _seed(3))
  images, labels = mixed["image"].numpy(), mixed["labels"].numpy()
  x = batch["image"].numpy()[:, 0, 0, 0]
  # Example i is ratio * x[i] + (1 - ratio) * x[-1 - i]; recover the ratio from image 0.
  ratio = (images[0, 0, 0, 0] - x[-1]) / (x[0] - x[-1])
  assert 0 < ratio < 1 and not np.isclose(ratio, 1.0)
  np.testing.assert_allclose(images[:, 0, 0, 0], ratio * x + (1 - ratio) * x[::-1], rtol=1e-5)
  y = batch["labels"].numpy()
  np.testing.assert_allclose(labels, ratio * y + (1 - ratio) * y[::-1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(labels.sum(-1), 1.0, rtol=1e-6)
  again = mixing.make_batch_mixer(mixup_alpha=0.4, cutmix_alpha=0.0)(batch, _seed(3))
  np.testing.assert_array_equal(again["image"].numpy(), images)


def test_cutmix_label_weight_is_the_pasted_area():
  batch = _batch(size=16)
  mixer = mixing.make_batch_mixer(mixup_alpha=0.0, cutmix_alpha=1.0)
  pasted_fractions = []
  for i in range(20):
    mixed = mixer(batch, _seed(i))
    images, labels = mixed["image"].numpy(), mixed["labels"].numpy()
    own = images[0, ..., 0] == 0.0  # Image 0 is all 0; its partner (image 7) all 7.
    pasted = 1.0 - own.mean()
    assert set(np.unique(images[0])) <= {0.0, 7.0}
    np.testing.assert_allclose(labels[0], (1 - pasted) * np.eye(4)[0] + pasted * np.eye(4)[3],
                               atol=1e-6)
    pasted_fractions.append(pasted)
  assert 0 < np.mean(pasted_fractions) < 1 and np.ptp(pasted_fractions) > 0.1


def test_both_mixes_alternate_by_switch_probability():
  batch = _batch(size=16)
  mixer = mixing.make_batch_mixer(mixup_alpha=1.0, cutmix_alpha=1.0, cutmix_switch_prob=0.5)
  kinds = []
  for i in range(40):
    values = np.unique(mixer(batch, _seed(i))["image"].numpy()[0])
    kinds.append("cutmix" if set(values) <= {0.0, 7.0} else "mixup")
  assert 10 < kinds.count("cutmix") < 30


def test_mixing_works_with_both_losses():
  mixed = mixing.make_batch_mixer(0.4, 1.0)(_batch(), _seed(0))["labels"].numpy()
  logits = jnp.zeros_like(mixed)
  for name in losses.LOSSES:
    value = losses.get(name)(logits, mixed)
    assert value.shape == (8,) and np.all(np.isfinite(value))


def test_label_smoothing():
  smoothed = losses.smooth_labels(jnp.eye(4)[:1], 0.2)
  np.testing.assert_allclose(smoothed, [[0.85, 0.05, 0.05, 0.05]], rtol=1e-6)


def test_sam_takes_the_gradient_at_the_ascent_point():
  """On f(w) = 1/2 w^T A w, SAM's step is -lr * A (w + rho * A w / |A w|)."""
  a = jnp.diag(jnp.array([1.0, 4.0]))
  loss = lambda w: 0.5 * w @ a @ w
  w = jnp.array([1.0, 1.0])
  rho, lr = 0.1, 0.5
  grad = jax.grad(loss)(w)
  sam = optimizer.with_sam(optax.sgd(lr), rho)
  updates, _ = sam.update(grad, sam.init(w), w, grad_fn=lambda p, _: jax.grad(loss)(p))
  ascent_point = w + rho * grad / jnp.linalg.norm(grad)
  np.testing.assert_allclose(updates, -lr * (a @ ascent_point), rtol=1e-6)
  assert not np.allclose(updates, -lr * grad)


def _knob_config(**overrides):
  config = fashion_mnist.get_config("")
  config.update_from_flattened_dict(overrides)
  return config


def test_pp_strings_take_the_grid_knobs_from_the_config():
  config = _knob_config(**{"aug.crop_min_area": 0.35, "aug.randaug_layers": 2,
                           "aug.randaug_magnitude": 15})
  assert pp_spec.resolve(config, "pp_train") == (
      "decode(channels=1)|inception_crop(28, area_min=0.35)|randaug(2, 15)"
      "|value_range(-1, 1)|onehot(5)")


@pytest.mark.parametrize("pp_train,overrides,message", [
    ("decode|value_range(-1, 1)|onehot(5)", {"aug.crop_min_area": 0.5},
     r"config.aug.crop_min_area=0.5 is set but config.input.pp_train=.* does not use it"),
    ("decode|randaug({aug.layers}, 9)|onehot(5)", {},
     r"references \{aug.layers\}, which is not a config key"),
    ("decode|randaug({aug.randaug_layers}, 9)|onehot(5)", {"aug.randaug_layers": None},
     r"uses \{aug.randaug_layers\} but config.aug.randaug_layers is not set"),
    ("decode|randaugment(2, 9)|onehot(5)", {},
     r"config.input.pp_train: unknown op 'randaugment'.*known ops: \[.*'randaug'"),
])
def test_knob_misuse_is_an_error_naming_the_key(pp_train, overrides, message, data_dir, tmp_path):
  config = fashion_mnist.get_config("")
  config.input.pp_train = pp_train
  config.input.data_dir = data_dir
  config.update_from_flattened_dict({"aug.crop_min_area": None, "aug.randaug_layers": None,
                                     "aug.randaug_magnitude": None, **overrides})
  with pytest.raises(ValueError, match=message):
    trainer.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize("key,value,message", [
    ("aug.mixup_alpha", -0.2, r"config.aug.mixup_alpha=-0.2 must be >= 0"),
    ("aug.cutmix_switch_prob", 1.5, r"config.aug.cutmix_switch_prob=1.5 must be in \[0, 1\]"),
    ("label_smoothing", 1.0, r"config.label_smoothing=1.0 must be in \[0, 1\)"),
    ("optimizer.sam_rho", -0.05, r"config.optimizer.sam_rho=-0.05 must be >= 0"),
])
def test_bad_knob_values_are_errors(key, value, message, data_dir, tmp_path):
  config = _knob_config(**{key: value, "input.data_dir": data_dir})
  with pytest.raises(ValueError, match=message):
    trainer.train_and_evaluate(config, str(tmp_path))


def _first_losses(data_dir, workdir, **overrides):
  config = fashion_mnist.get_config("runlocal,variant=mu/4")
  config.update_from_flattened_dict({
      "input.data_dir": data_dir, "total_steps": 3, "log_every_steps": 1,
      "final_eval_weights": (), "input.heldout_split": "train[90%:90.5%]",
      "input.test_split": "test[:1%]", "schedule.warmup_steps": 0, **overrides})
  trainer.train_and_evaluate(config, str(workdir))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f if '"loss"' in line]


@pytest.mark.slow
def test_every_knob_changes_what_the_trainer_does(data_dir, tmp_path):
  """Each knob, set alone, changes the loss curve of the same 3 steps: none is ignored."""
  baseline = _first_losses(data_dir, tmp_path / "baseline")
  knobs = {
      "crop": {"aug.crop_min_area": 0.3},
      "randaug": {"aug.randaug_layers": 2},
      "mixup": {"aug.mixup_alpha": 0.5},
      "cutmix": {"aug.cutmix_alpha": 1.0},
      "smoothing": {"label_smoothing": 0.2},
      "sigmoid": {"loss": "sigmoid_xent"},
      "sam": {"optimizer.sam_rho": 0.5},
      "lr": {"lr": 0.003},
  }
  for name, overrides in knobs.items():
    curve = _first_losses(data_dir, tmp_path / name, **overrides)
    assert all(np.isfinite(curve)), name
    assert not np.allclose(curve[:3], baseline, rtol=1e-6, atol=0), (name, curve, baseline)
