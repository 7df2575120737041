"""Soup ingredients: where each weight set (`params`, `ema_low`, `ema_high`) lives, and its tree.

An ingredient is the orbax item of a finished run's last checkpoint
(`<run>/checkpoints/<last step>/<weights>`), an orbax item directory, a
big_vision `.npz`, or a PyTorch checkpoint (timm, open_clip / model-soups, Hugging
Face `.safetensors` or `.pt`), converted to big_vision's tree as it is read
(train/torch_files.py). Before any averaging, `check_compatible` compares every
ingredient's tree, shapes and dtypes from metadata alone. Reading one into
the soup's shardings is soups/restore.py's job.
"""

import dataclasses
import os

import numpy as np

from eval import run_config
from launch import manifest as manifest_lib
from train import checkpoint
from train import errors
from train import npz
from train import run_dir as run_dir_lib
from train import torch_files
from train import trees


@dataclasses.dataclass(frozen=True)
class Ingredient:
  """Where one ingredient's weights live.

  Attributes:
    name: unique, readable (the run's name).
    path: an orbax item directory or an `.npz` file.
    run_dir: the run that produced it (holds config.json), or '' if unknown.
    config_file: its run config when not a run's: <stem>.config.json next to a
      converted checkpoint, or `python -m soups --ingredient_config`; or ''.
  """
  name: str
  path: str
  run_dir: str = ""
  config_file: str = ""

  @property
  def is_npz(self):
    return self.path.endswith(".npz")

  @property
  def is_torch(self):
    return torch_files.is_torch_checkpoint(self.path)

  @property
  def has_config(self):
    return bool(self.run_dir or self.config_file)

  def config(self):
    """The producing run's resolved config (or `config_file`), or None when neither is known."""
    if not self.has_config:
      return None
    return run_config.load(self.config_file or run_dir_lib.config_path(self.run_dir))


def _run_ingredient(run_dir, weights, name=None):
  """The `weights` item of a run's last checkpoint; the run must have finished."""
  run_dir = os.path.abspath(run_dir)
  if not run_dir_lib.is_finished(run_dir):
    raise errors.UserError(f"run {run_dir} has not finished (no {run_dir_lib.RESULTS}): finish it "
                           "or leave it out of the soup")
  steps = run_dir_lib.checkpoint_steps(run_dir)
  if not steps:
    raise FileNotFoundError(f"run {run_dir} has no checkpoint in "
                            f"{run_dir_lib.checkpoint_dir(run_dir)}")
  path = run_dir_lib.checkpoint_item(run_dir, steps[-1], weights)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint {path} is missing: run {run_dir} has no {weights!r} "
                            f"weights (known: {checkpoint.WEIGHT_NAMES})")
  return Ingredient(name or os.path.basename(run_dir), path, run_dir)


def from_sweep(sweep_dir, weights):
  """The finished grid runs of a sweep, in manifest order; unfinished runs are skipped."""
  return [_run_ingredient(workdir, weights, name)
          for name, workdir in manifest_lib.finished_runs(sweep_dir)]


def _sibling_config(path):
  config = run_dir_lib.sibling_config(path)
  return config if os.path.isfile(config) else ""


def from_paths(paths, weights, default_config=""):
  """Ingredients from run directories, orbax item directories, `.npz` or PyTorch files.

  A file outside a run takes its run config from <stem>.config.json next to
  it, else from `default_config` (a run's config.json), if given.
  """
  ingredients = []
  for path in paths:
    if path.endswith(".npz") or torch_files.is_torch_checkpoint(path):
      if not os.path.exists(path):
        raise FileNotFoundError(f"ingredient {path} does not exist")
      run_dir = (run_dir_lib.exporting_run(path) or "") if path.endswith(".npz") else ""
      ingredients.append(Ingredient(
          os.path.basename(run_dir) if run_dir else os.path.splitext(os.path.basename(path))[0],
          os.path.abspath(path), run_dir,
          "" if run_dir else _sibling_config(path) or default_config))
    elif run_dir_lib.is_run(path):
      ingredients.append(_run_ingredient(path, weights))
    elif os.path.isdir(path):
      ingredients.append(Ingredient(os.path.basename(os.path.normpath(path)),
                                    os.path.abspath(path)))
    else:
      raise FileNotFoundError(f"ingredient {path} is neither a run directory, an orbax "
                              "checkpoint directory, an .npz file nor a PyTorch checkpoint "
                              "(.safetensors, .pt, .pth, .bin)")
  names = [i.name for i in ingredients]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise errors.UserError(
        f"ingredients share the names {duplicates}; give runs distinct directories")
  return ingredients


def metadata(ingredient):
  """{'/'-joined parameter path: (shape, dtype)} of an ingredient, read from metadata only."""
  if ingredient.is_torch:  # Converted whole: its tree is known only once converted.
    params, _ = torch_files.convert(ingredient.path)
    return {k: (tuple(v.shape), v.dtype) for k, v in params.items()}
  if ingredient.is_npz:
    try:
      return npz.metadata(ingredient.path)
    except npz.READ_ERRORS as e:
      raise errors.UserError(
          f"ingredient {ingredient.path} is not a readable .npz file: {e}") from e
  try:
    tree = checkpoint.item_metadata(ingredient.path)
  except Exception as e:  # orbax raises many types for unreadable checkpoints.
    raise errors.UserError(f"ingredient {ingredient.name}: cannot read the orbax checkpoint "
                           f"{ingredient.path}: {checkpoint.describe(e)}") from e
  return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in trees.flatten(tree).items()}


def check_compatible(ingredients):
  """Raises naming the first ingredient and parameter path that differ from the first ingredient.

  Returns the shared {path: (shape, dtype)}.
  """
  if not ingredients:
    raise errors.UserError("no ingredients: a soup needs at least one")
  reference = metadata(ingredients[0])
  for ingredient in ingredients[1:]:
    other = metadata(ingredient)
    for path in sorted(set(reference) | set(other)):
      if path not in other or path not in reference:
        has, lacks = ((ingredients[0], ingredient) if path not in other
                      else (ingredient, ingredients[0]))
        raise errors.UserError(f"ingredient {lacks.name} ({lacks.path}) has no parameter {path!r}, "
                               f"which {has.name} has: ingredients must share one architecture")
      if other[path] != reference[path]:
        raise errors.UserError(
            f"parameter {path!r}: {ingredient.name} has shape {other[path][0]} dtype "
            f"{other[path][1]}, {ingredients[0].name} has shape {reference[path][0]} dtype "
            f"{reference[path][1]} ({ingredient.path} vs {ingredients[0].path})")
  return reference
