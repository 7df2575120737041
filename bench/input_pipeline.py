r"""Input pipeline throughput with the paper's augmentations, against the train step.

Measures images/s of `train.data.train_batches` alone for a ladder of
augmentation settings, and in the same run the images/s that a jitted train
step of the same model consumes; the ratio says whether the host pipeline
keeps the accelerator fed (>= 1: it does). Prints a table, writes JSON.

  python -m bench.input_pipeline --data_dir=$TFDS_DATA_DIR --out=bench/results/input_pipeline.json
"""

from train import command
from train import tf_setup  # First: TensorFlow loads without its C++ start-up lines.

# isort: split

import time

from absl import flags
import jax

from bench import train_step
from configs import fashion_mnist
from train import data
from train import files
from train import mixing
from train import pp_spec
from train import preprocess

_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data dir holding fashion_mnist.")
_VARIANT = flags.DEFINE_string("variant", "pico/7",
                               "ViT variant of the train step (the embedded default).")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps", 40, "Batches timed per setting (after 5 warm-up).")
_OUT = flags.DEFINE_string("out", "", "Where to write the JSON results.")

SETTINGS = {  # name -> config overrides on the fashion_mnist fine-tune config.
    "no augmentation": {},
    "inception crop (8%)": {"aug.crop_min_area": 0.08},
    "crop + RandAugment(2, 10)": {"aug.crop_min_area": 0.08, "aug.randaug_layers": 2},
    "crop + RandAugment + mixup": {"aug.crop_min_area": 0.08, "aug.randaug_layers": 2,
                                   "aug.mixup_alpha": 0.2},
    "crop + RandAugment + mixup/CutMix": {"aug.crop_min_area": 0.08, "aug.randaug_layers": 2,
                                          "aug.mixup_alpha": 0.2, "aug.cutmix_alpha": 1.0},
}


def _config(overrides):
  config = fashion_mnist.get_config(f"variant={_VARIANT.value}")
  config.update_from_flattened_dict({"input.data_dir": _DATA_DIR.value,
                                     "batch_size": _BATCH.value, **overrides})
  return config


def _images_per_second(iterator, steps, batch_size):
  for _ in range(5):
    next(iterator)
  start = time.perf_counter()
  for _ in range(steps):
    next(iterator)
  return steps * batch_size / (time.perf_counter() - start)


def pipeline_rate(config, split):
  batches = data.train_batches(
      split, preprocess.build(pp_spec.resolve(config, "pp_train")), config.batch_size,
      config.seed, batch_fn=mixing.make_batch_mixer(
          config.aug.mixup_alpha, config.aug.cutmix_alpha, config.aug.cutmix_switch_prob))
  return _images_per_second(batches, _STEPS.value, config.batch_size)


def train_step_rate(config, image_shape):
  """Images/s consumed by the trainer's jitted step (bench/train_step.py), a fixed batch."""
  return config.batch_size * _STEPS.value / train_step.TrainStep(config, image_shape).time(
      _STEPS.value)


def main(argv):
  del argv
  tf_setup.hide_gpus_from_tensorflow()
  base = _config({})
  builder = data.dataset_builder(base.input.dataset, base.input.data_dir)
  split = data.open_split(builder, base.input.train_split, tuple(base.input.classes))
  first = next(data.train_batches(split, preprocess.build(pp_spec.resolve(base, "pp_train")),
                                  base.batch_size, 0))
  step_rate = train_step_rate(base, first["image"].shape[1:])
  rows = []
  for name, overrides in SETTINGS.items():
    rate = pipeline_rate(_config(overrides), split)
    rows.append({"setting": name, "pipeline_img_per_s": rate,
                 "ratio_to_train_step": rate / step_rate})
  print(f"train step ({_VARIANT.value}, batch {_BATCH.value}, {jax.devices()[0].platform}): "
        f"{step_rate:,.0f} img/s")
  print(f"{'pipeline setting':<38} {'img/s':>9} {'÷ train step':>13}")
  for row in rows:
    print(f"{row['setting']:<38} {row['pipeline_img_per_s']:>9,.0f} "
          f"{row['ratio_to_train_step']:>12.2f}x")
  if _OUT.value:
    files.write_json_atomic(_OUT.value, {
        "variant": _VARIANT.value, "batch_size": _BATCH.value,
        "train_step_img_per_s": step_rate, "settings": rows})


if __name__ == "__main__":
  command.run(main)
