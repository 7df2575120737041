"""The flags with which every soup command names its ingredients and its output directory.

Imported by the programs only (`python -m soups`, `python -m soups.diagnose`),
never by library modules: `python -m eval` defines a `--weights` flag too.
"""

import os

from absl import app
from absl import flags

from soups import ingredients as ingredients_lib
from soups import soup_step
from train import checkpoint

SWEEP_DIR = flags.DEFINE_string("sweep_dir", "",
                                "A sweep directory (its manifest.json lists the runs).")
INGREDIENTS = flags.DEFINE_list(
    "ingredients", [],
    "Run directories, orbax item directories, .npz files or PyTorch checkpoints (.safetensors, "
    ".pt: timm, open_clip / model-soups, Hugging Face; converted as read) instead of --sweep_dir.")
INGREDIENT_CONFIG = flags.DEFINE_string(
    "ingredient_config", "", "The run config (.json, e.g. `python -m train.convert`'s "
    "<stem>.config.json) of --ingredients files that have none next to them.")
WEIGHTS = flags.DEFINE_enum("weights", "ema_low", checkpoint.WEIGHT_NAMES,
                            "Which weight set of each run to soup (the paper uses the low EMA).")
SOUP_DIR = flags.DEFINE_string("soup_dir", "",
                               "Output directory; default <sweep_dir>/soups/<weights>.")


def ingredients_and_soup_dir():
  """The ingredients the flags name, and the soup directory (with --sweep_dir, a default)."""
  if bool(SWEEP_DIR.value) == bool(INGREDIENTS.value):
    raise app.UsageError("give exactly one of --sweep_dir and --ingredients")
  if INGREDIENTS.value and not SOUP_DIR.value:
    raise app.UsageError("--soup_dir is required with --ingredients")
  if SWEEP_DIR.value:
    ingredients = ingredients_lib.from_sweep(SWEEP_DIR.value, WEIGHTS.value)
  else:
    ingredients = ingredients_lib.from_paths(INGREDIENTS.value, WEIGHTS.value,
                                             INGREDIENT_CONFIG.value)
  soup_step.shared_config(ingredients)  # Runs that disagree are refused before any read.
  return ingredients, SOUP_DIR.value or os.path.join(SWEEP_DIR.value, "soups", WEIGHTS.value)

