"""Loads one weight set (a big_vision `.npz` or an orbax checkpoint item) onto the mesh.

Each leaf is placed by the run's `config.param_sharding` rules; an orbax item
is restored straight into that placement, shard by shard. Errors name the file.
"""

import os

import jax
import orbax.checkpoint as ocp

from train import checkpoint
from train import errors
from train import pretrained
from train import sharding
from train import trees


def check_exists(path):
  """A FileNotFoundError naming `path` unless it is an .npz file or a directory."""
  if path.endswith(".npz"):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"checkpoint {path} does not exist")
  elif not os.path.isdir(path):
    raise FileNotFoundError(f"weights {path} do not exist (expected an .npz file or an orbax "
                            "checkpoint directory such as <run>/checkpoints/<step>/params)")


def load(path, mesh, rules):
  """The parameter tree at `path`, each leaf sharded over `mesh` by `rules`."""
  check_exists(path)
  if path.endswith(".npz"):
    params = trees.unflatten(pretrained.load_npz(path))
    return jax.device_put(params, sharding.tree_shardings(mesh, params, rules))
  try:
    return ocp.StandardCheckpointer().restore(os.path.abspath(path),
                                              sharding.placed_abstract_tree(
        mesh, checkpoint.item_metadata(os.path.abspath(path)), rules))
  except Exception as e:  # orbax raises many types for unreadable checkpoints.
    raise errors.UserError(f"cannot read the orbax checkpoint {path}: {e}") from e
