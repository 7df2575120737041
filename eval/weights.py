"""Loads one weight set (a big_vision `.npz` or an orbax checkpoint item) onto the mesh.

Each leaf is placed by the run's `config.param_sharding` rules; an orbax item
is restored straight into that placement, shard by shard. Errors name the file.
"""

import os

import jax
import orbax.checkpoint as ocp

from train import checkpoint
from train import pretrained
from train import sharding
from train import trees


def _orbax_abstract(path, mesh, rules):
  shapes = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
                        checkpoint.item_metadata(path))
  return checkpoint.abstract_tree(shapes, sharding.tree_shardings(mesh, shapes, rules))


def load(path, mesh, rules):
  """The parameter tree at `path`, each leaf sharded over `mesh` by `rules`."""
  if path.endswith(".npz"):
    params = trees.unflatten(pretrained.load_npz(path))
    return jax.device_put(params, sharding.tree_shardings(mesh, params, rules))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"weights {path} do not exist (expected an .npz file or an orbax "
                            "checkpoint directory such as <run>/checkpoints/<step>/params)")
  try:
    return ocp.StandardCheckpointer().restore(os.path.abspath(path),
                                              _orbax_abstract(os.path.abspath(path), mesh, rules))
  except Exception as e:  # orbax raises many types for unreadable checkpoints.
    raise ValueError(f"cannot read the orbax checkpoint {path}: {e}") from e
