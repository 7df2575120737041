"""Soup ingredients: one weight set (`params`, `ema_low`, `ema_high`) of a finished run.

An ingredient is read from the orbax checkpoint of a run (`<run>/checkpoints/
<last step>/<weights>`), from an orbax item directory, or from a big_vision
`.npz`. Before any averaging, `check_compatible` compares every ingredient's
tree, shapes and dtypes from metadata alone, and `restore` reads one
ingredient straight into the target sharding, leaf by leaf.
"""

import dataclasses
import json
import os
import zipfile

import jax
import numpy as np
import orbax.checkpoint as ocp

from eval import run_config
from train import checkpoint
from train import trees

MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class Ingredient:
  """Where one ingredient's weights live.

  Attributes:
    name: unique, readable (the run's name).
    path: an orbax item directory or an `.npz` file.
    run_dir: the run that produced it (holds config.json), or '' if unknown.
  """
  name: str
  path: str
  run_dir: str = ""

  @property
  def is_npz(self):
    return self.path.endswith(".npz")

  def config(self):
    """The producing run's resolved config, or None when the run is unknown."""
    if not self.run_dir:
      return None
    return run_config.load(os.path.join(self.run_dir, "config.json"))


def _run_ingredient(run_dir, weights, name=None):
  """The `weights` item of a run's last checkpoint; the run must have finished."""
  run_dir = os.path.abspath(run_dir)
  if not os.path.exists(os.path.join(run_dir, "results.json")):
    raise ValueError(f"run {run_dir} has not finished (no results.json): finish it or leave "
                     "it out of the soup")
  steps = sorted(int(s) for s in os.listdir(checkpoint.checkpoint_dir(run_dir)) if s.isdigit())
  if not steps:
    raise FileNotFoundError(f"run {run_dir} has no checkpoint in {checkpoint.checkpoint_dir(run_dir)}")
  path = os.path.join(checkpoint.checkpoint_dir(run_dir), str(steps[-1]), weights)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint {path} is missing: run {run_dir} has no {weights!r} "
                            f"weights (known: {checkpoint.WEIGHT_NAMES})")
  return Ingredient(name or os.path.basename(run_dir), path, run_dir)


def from_sweep(sweep_dir, weights):
  """The finished runs of a sweep, in manifest order; unfinished runs are listed and skipped."""
  path = os.path.join(sweep_dir, MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: is {sweep_dir} a sweep directory "
                            "written by `python -m launch`?")
  with open(path) as f:
    runs = json.load(f)["runs"]
  finished = [r for r in runs if os.path.exists(os.path.join(sweep_dir, r["workdir"], "results.json"))]
  if not finished:
    raise ValueError(f"{path}: none of its {len(runs)} runs has finished")
  return [_run_ingredient(os.path.join(sweep_dir, r["workdir"]), weights, r["name"])
          for r in finished]


def from_paths(paths, weights):
  """Ingredients from run directories, orbax item directories or `.npz` files."""
  ingredients = []
  for path in paths:
    if path.endswith(".npz"):
      if not os.path.exists(path):
        raise FileNotFoundError(f"ingredient {path} does not exist")
      run_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))  # <run>/final/x.npz
      has_run = os.path.exists(os.path.join(run_dir, "config.json"))
      ingredients.append(Ingredient(
          os.path.basename(run_dir) if has_run else os.path.basename(path)[:-4],
          os.path.abspath(path), run_dir if has_run else ""))
    elif os.path.exists(os.path.join(path, "config.json")):
      ingredients.append(_run_ingredient(path, weights))
    elif os.path.isdir(path):
      ingredients.append(Ingredient(os.path.basename(os.path.normpath(path)), os.path.abspath(path)))
    else:
      raise FileNotFoundError(f"ingredient {path} is neither a run directory, an orbax "
                              "checkpoint directory nor an .npz file")
  names = [i.name for i in ingredients]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"ingredients share the names {duplicates}; give runs distinct directories")
  return ingredients


def _npz_metadata(path):
  """{key: (shape, dtype)} from the .npy headers inside an .npz, without reading the arrays."""
  try:
    with zipfile.ZipFile(path) as archive:
      out = {}
      for member in archive.namelist():
        with archive.open(member) as f:
          read_header = (np.lib.format.read_array_header_1_0
                         if np.lib.format.read_magic(f) == (1, 0)
                         else np.lib.format.read_array_header_2_0)
          shape, _, dtype = read_header(f)
        out[member[:-4] if member.endswith(".npy") else member] = (tuple(shape), np.dtype(dtype))
      return out
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
    raise ValueError(f"ingredient {path} is not a readable .npz file: {e}") from e


def metadata(ingredient):
  """{'/'-joined parameter path: (shape, dtype)} of an ingredient, read from metadata only."""
  if ingredient.is_npz:
    return _npz_metadata(ingredient.path)
  try:
    tree = checkpoint.item_metadata(ingredient.path)
  except Exception as e:  # orbax raises many types for unreadable checkpoints.
    raise ValueError(f"ingredient {ingredient.name}: cannot read the orbax checkpoint "
                     f"{ingredient.path}: {e}") from e
  return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in trees.flatten(tree).items()}


def check_compatible(ingredients):
  """Raises naming the first ingredient and parameter path that differ from the first ingredient.

  Returns the shared {path: (shape, dtype)}.
  """
  if not ingredients:
    raise ValueError("no ingredients: a soup needs at least one")
  reference = metadata(ingredients[0])
  for ingredient in ingredients[1:]:
    other = metadata(ingredient)
    for path in sorted(set(reference) | set(other)):
      if path not in other or path not in reference:
        has, lacks = (ingredients[0], ingredient) if path not in other else (ingredient, ingredients[0])
        raise ValueError(f"ingredient {lacks.name} ({lacks.path}) has no parameter {path!r}, "
                         f"which {has.name} has: ingredients must share one architecture")
      if other[path] != reference[path]:
        raise ValueError(
            f"parameter {path!r}: {ingredient.name} has shape {other[path][0]} dtype "
            f"{other[path][1]}, {ingredients[0].name} has shape {reference[path][0]} dtype "
            f"{reference[path][1]} ({ingredient.path} vs {ingredients[0].path})")
  return reference


def abstract_params(shared_metadata, shardings_fn):
  """Nested ShapeDtypeStructs carrying the target sharding, from `check_compatible`'s result."""
  abstract = trees.unflatten({k: jax.ShapeDtypeStruct(shape, dtype)
                              for k, (shape, dtype) in shared_metadata.items()})
  shardings = shardings_fn(abstract)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def restore(ingredient, abstract):
  """Reads one ingredient straight into the shardings of `abstract` (each host its shards)."""
  if not ingredient.is_npz:
    try:
      return ocp.StandardCheckpointer().restore(ingredient.path, abstract)
    except Exception as e:  # orbax and tensorstore raise many types for unreadable files.
      raise ValueError(f"ingredient {ingredient.name}: cannot restore {ingredient.path}: "
                       f"{checkpoint.describe(e)}") from e
  with np.load(ingredient.path, allow_pickle=False) as npz:
    def read(key_path, leaf):
      array = npz[trees.path_str(key_path)]  # One leaf on the host at a time.
      return jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda index: array[index])
    return jax.tree_util.tree_map_with_path(read, abstract)
