"""Distribution-shift suites: named lists of datasets to report accuracy on.

A suite entry is a TFDS dataset and split, optionally with a corruption op
inserted into the run's `pp_eval` after decoding. Labels are matched to the
model's classes by name (see datasets.py), and ImageNet-R and ImageNet-A,
which cover 200 of the 1000 classes, are scored over those 200 logits only,
as in the model-soups paper.

`fashion_mnist_shifts` needs no download: fixed, deterministic corruptions of
the Fashion-MNIST test split (noise draws come from the stateless per-example
seed, so every evaluation sees the same images).
"""

import dataclasses
import math
import re

import numpy as np
import tensorflow as tf

from eval import datasets
from train import data
from train import errors
from train import preprocess
from train import warps


def gaussian_noise(sigma, key="image"):
  """Adds N(0, sigma²) noise (pixel units, 0..255) from the example's seed."""
  def op(example, seed):
    image = tf.cast(example[key], tf.float32)
    noisy = image + sigma * tf.random.stateless_normal(tf.shape(image), seed)
    return {**example, key: tf.cast(tf.clip_by_value(tf.round(noisy), 0, 255), tf.uint8)}
  return op


def gaussian_blur(sigma, key="image"):
  """Blurs with a Gaussian kernel of standard deviation `sigma` pixels (edges reflected)."""
  radius = max(1, int(math.ceil(3 * sigma)))
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  taps = (taps / taps.sum()).astype(np.float32)

  def op(example, seed):
    del seed
    image = tf.cast(example[key], tf.float32)[None]
    channels = image.shape[-1]
    padded = tf.pad(image, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    rows = tf.tile(tf.constant(taps)[:, None, None, None], [1, 1, channels, 1])
    cols = tf.tile(tf.constant(taps)[None, :, None, None], [1, 1, channels, 1])
    blurred = tf.nn.depthwise_conv2d(padded, rows, [1, 1, 1, 1], "VALID")
    blurred = tf.nn.depthwise_conv2d(blurred, cols, [1, 1, 1, 1], "VALID")[0]
    return {**example, key: tf.cast(tf.clip_by_value(tf.round(blurred), 0, 255), tf.uint8)}
  return op


def contrast(factor, key="image"):
  """Scales the deviation from the image mean by `factor` (< 1: less contrast)."""
  def op(example, seed):
    del seed
    image = tf.cast(example[key], tf.float32)
    mean = tf.reduce_mean(image)
    out = mean + factor * (image - mean)
    return {**example, key: tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)}
  return op


def rotate(degrees, key="image"):
  """Rotates by a fixed angle about the centre, filling with black."""
  angle = degrees * math.pi / 180.0
  cos, sin = math.cos(angle), math.sin(angle)

  def op(example, seed):
    del seed
    return {**example, key: warps.rotate(example[key], cos, sin, fill=0)}
  return op


def invert(key="image"):
  """Photographic negative."""
  def op(example, seed):
    del seed
    return {**example, key: 255 - example[key]}
  return op


SHIFT_OPS = {"gaussian_noise": gaussian_noise, "gaussian_blur": gaussian_blur,
             "contrast": contrast, "rotate": rotate, "invert": invert}
OPS = {**preprocess.OPS, **SHIFT_OPS}


@dataclasses.dataclass(frozen=True)
class ShiftDataset:
  """One entry of a suite.

  Attributes:
    name: the column name in reports.
    dataset: TFDS name; '' means the run's own `config.input.dataset`.
    split: TFDS split; '' means the run's `config.input.test_split`.
    corruption: a pp op (e.g. 'gaussian_noise(40)') inserted after decoding.
    covered_only: score only the model outputs of the classes this dataset
      covers (ImageNet-R and -A: 200 of the 1000).
  """
  name: str
  dataset: str = ""
  split: str = ""
  corruption: str = ""
  covered_only: bool = False


SUITES = {
    "fashion_mnist_shifts": (
        ShiftDataset("noise", corruption="gaussian_noise(48)"),
        ShiftDataset("blur", corruption="gaussian_blur(1.0)"),
        ShiftDataset("contrast", corruption="contrast(0.3)"),
        ShiftDataset("rotate", corruption="rotate(25)"),
        ShiftDataset("invert", corruption="invert"),
    ),
    # TFDS names and splits (each has a 'test' split only); labels use ImageNet's 1000 names.
    "imagenet_shifts": (
        ShiftDataset("imagenet_v2", "imagenet_v2/matched-frequency", "test"),
        ShiftDataset("imagenet_r", "imagenet_r", "test", covered_only=True),
        ShiftDataset("imagenet_sketch", "imagenet_sketch", "test"),
        ShiftDataset("imagenet_a", "imagenet_a", "test", covered_only=True),
    ),
}


def suite(name):
  """The entries of shift suite `name`."""
  if name not in SUITES:
    raise errors.UserError(f"unknown shift suite {name!r}; known: {sorted(SUITES)}")
  return SUITES[name]


def insert_after_decode(pp, op):
  """`decode(...)|rest` -> `decode(...)|op|rest`; the corruption acts on uint8 pixels."""
  steps = pp.split("|")
  decoded = [i for i, step in enumerate(steps) if re.match(r"\s*decode\b", step)]
  if not decoded:
    raise errors.UserError(f"pp_eval={pp!r} has no decode op to insert {op!r} after")
  return "|".join(steps[:decoded[0] + 1] + [op] + steps[decoded[0] + 1:])


def suite_datasets(name, config, run_builder, pp_eval, split=""):
  """{entry name: datasets.Dataset} of suite `name` for a run; `split` replaces each entry's."""
  out = {}
  for entry in suite(name):
    pp = insert_after_decode(pp_eval, entry.corruption) if entry.corruption else pp_eval
    if entry.dataset and entry.dataset != config.input.dataset:
      builder = data.dataset_builder(entry.dataset, config.input.data_dir)
      out[entry.name] = datasets.foreign_split(
          config, run_builder, builder, split or entry.split, entry.name, pp,
          entry.covered_only, full_split=entry.split)
    else:
      out[entry.name] = datasets.run_split(
          config, run_builder, split or entry.split or config.input.test_split, entry.name, pp,
          f"shift dataset {entry.name}")
  return out
