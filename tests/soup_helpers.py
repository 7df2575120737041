"""Small soup ingredients for the soup tests: random parameter trees saved as `.npz` runs."""

import numpy as np

from soups import ingredients as ingredients_lib
from soups import restore as restore_lib
from train import pretrained
from train import sharding

SHAPES = {"embedding/kernel": (4, 4, 1, 32), "head/kernel": (32, 5), "head/bias": (5,),
          "Transformer/encoder_norm/scale": (32,)}


def random_tree(seed, shapes=SHAPES):
  """{path: float32 normal array} of `shapes`, the same for the same seed."""
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def npz_ingredients(tmp_path, flat_trees):
  """Saves each tree as `run<i>.npz` under `tmp_path`; returns them as soup ingredients."""
  paths = []
  for i, tree in enumerate(flat_trees):
    paths.append(str(tmp_path / f"run{i}.npz"))
    pretrained.save_npz(paths[-1], tree)
  return ingredients_lib.from_paths(paths, "params")


def soup_abstract(ingredients, mesh=None):
  """The soup step's target for `ingredients` on `mesh` (default: every device on `data`)."""
  mesh = mesh or sharding.make_mesh((("data", -1),))
  return restore_lib.target_abstract(ingredients_lib.check_compatible(ingredients), mesh)
