"""Small soup ingredients for the soup tests: random parameter trees saved as `.npz` files
or as the orbax checkpoints of finished runs."""

import jax
import numpy as np

from soups import ingredients as ingredients_lib
from soups import restore as restore_lib
from train import checkpoint
from train import pretrained
from train import run_dir as run_dir_lib
from train import sharding
from train import trees

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


def save_orbax_run(run_dir, items, mesh, steps=(1,), finished=True, results=None):
  """A run as the trainer leaves it, written with the library's own writers.

  For each of `steps`, an orbax checkpoint holding `checkpoints/<step>/<item>` for each
  `{item: tree}` of `items` (a tree: a flat {path: array}, or a function of the step giving
  one), replicated on `mesh`; config.json; and, when `finished`, results.json (`results`).
  """
  manager = checkpoint.make_manager(str(run_dir))
  for step in steps:
    state = {name: jax.device_put(trees.unflatten(tree(step) if callable(tree) else tree),
                                  sharding.replicated(mesh))
             for name, tree in items.items()}
    checkpoint.save(manager, step, state, force=True)
    checkpoint.wait_until_written(manager)
  manager.close()
  run_dir_lib.write_config(str(run_dir), {})
  if finished:
    run_dir_lib.write_results(str(run_dir), results or {})


def assert_tree_equal(got, expected):
  """A (sharded, nested) tree equals the flat {path: array} `expected`, exactly."""
  got = trees.flatten(sharding.to_host(got))
  assert sorted(got) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)
