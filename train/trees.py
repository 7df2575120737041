"""Parameter trees and their `/`-joined paths, the names configs and checkpoints use."""

import flax
import jax


def path_str(path):
  """A pytree key path as 'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel'."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def flatten(tree):
  """Nested dict of arrays -> {'a/b/c': array}; an already flat dict is returned as is."""
  return flax.traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat):
  """{'a/b/c': array} -> nested dict of arrays."""
  return flax.traverse_util.unflatten_dict(flat, sep="/")
