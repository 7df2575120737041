"""Reads one ingredient into the soup's shardings: every stored byte read (and decompressed) once.

An `.npz` is mapped, not copied (train/npz.py): a leaf whose shard is a
contiguous, aligned slice of the file is the page cache's memory on every
device. An orbax item is read whole per array on one process, sliced into
shards; across processes each reads its own shards.
"""

import ctypes

import jax
import numpy as np
import orbax.checkpoint as ocp

from train import checkpoint
from train import errors
from train import npz
from train import sharding
from train import torch_files
from train import trees

# Every leaf split over all devices where a dimension divides; tiny leaves replicated.
SOUP_SHARDING = ((".*", 'fsdp(axis="data")'),)


def target_abstract(shared_metadata, mesh):
  """The soup's leaves as ShapeDtypeStructs sharded over `mesh` by `SOUP_SHARDING`.

  `shared_metadata`: {'/'-joined path: (shape, dtype)}, `ingredients.check_compatible`'s result.
  """
  shapes = trees.unflatten({k: jax.ShapeDtypeStruct(shape, dtype)
                            for k, (shape, dtype) in shared_metadata.items()})
  return sharding.placed_abstract_tree(mesh, shapes, SOUP_SHARDING)


def _put(array, leaf_sharding):
  """A host array -> a global array in `leaf_sharding`, this process's shards only.

  As fast as one batched `jax.device_put` of a whole tree, and correct across
  processes. On CPU a shard that is a contiguous, 64-byte-aligned slice of
  `array` is that memory, not a copy.
  """
  return jax.make_array_from_callback(array.shape, leaf_sharding, lambda index: array[index])


def _place(arrays, leaves):
  """{key: array} pairs from `arrays`, each placed in its leaf's sharding as soon as it comes."""
  placed = {}
  for key, array in arrays:
    leaf = leaves[key]
    native = np.dtype(leaf.dtype).newbyteorder("=")
    if array.shape != tuple(leaf.shape) or array.dtype != native:
      raise errors.UserError(f"parameter {key!r} has shape {array.shape} dtype {array.dtype}, "
                             f"expected {tuple(leaf.shape)} {leaf.dtype}")
    placed[key] = _put(array, leaf.sharding)
    del array
  return trees.unflatten(placed)


def _restore_npz(ingredient, abstract):
  """Every leaf of an `.npz`, in file order, placed as soon as it is read.

  Every process reads the whole file: a zip member has no index to read a
  shard from. Do not overwrite ingredients in place while a soup reads them
  (see `npz.mapped_arrays`).
  """
  leaves = dict(trees.flatten(abstract))
  try:
    return _place(npz.mapped_arrays(ingredient.path, leaves), leaves)
  except npz.READ_ERRORS as e:
    raise errors.UserError(
        f"ingredient {ingredient.name}: cannot read {ingredient.path}: {e}") from e


def _restore_torch(ingredient, abstract):
  """A PyTorch checkpoint converted on the host (one ingredient at a time), then placed."""
  leaves = dict(trees.flatten(abstract))
  params, _ = torch_files.convert(ingredient.path)
  unknown = sorted(set(params) - set(leaves))
  if unknown:
    raise errors.UserError(f"ingredient {ingredient.name} ({ingredient.path}) has parameters the "
                           f"other ingredients lack: {unknown[:5]}")
  return _place(params.items(), leaves)


def _malloc_trim():
  """glibc's `malloc_trim`, or None where the C library has none."""
  try:
    return ctypes.CDLL(None).malloc_trim
  except (OSError, AttributeError):
    return None


# orbax's reads allocate whole arrays on tensorstore's threads; glibc keeps what they free
# in per-thread arenas, and fragments, so without a trim RSS creeps up with every ingredient.
_MALLOC_TRIM = _malloc_trim()

def _restore_orbax(ingredient, abstract):
  """An orbax item in the target shardings, each stored chunk decompressed once.

  On one process, every leaf's shards are all local: orbax reads each array
  whole, into host memory, and `_put` slices it into the shards. Reading into
  the shardings instead would decompress every stored chunk once per shard
  that overlaps it (orbax stores a trainer's replicated array as one chunk
  per device along the first dimension; the soup shards the largest one),
  8x the work on 8 devices. Across processes each reads only its own shards,
  through orbax with the target sharding, as before.
  """
  if _MALLOC_TRIM is not None:
    _MALLOC_TRIM(0)  # Returns to the OS what the previous ingredient's reads freed.
  try:
    if all(leaf.sharding.is_fully_addressable for leaf in jax.tree.leaves(abstract)):
      restore_args = jax.tree.map(
          lambda leaf: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
      host = ocp.PyTreeCheckpointer().restore(
          ingredient.path, args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args))
      return jax.tree.map(lambda array, leaf: _put(array, leaf.sharding), host, abstract)
    return ocp.StandardCheckpointer().restore(ingredient.path, abstract)
  except Exception as e:  # orbax and tensorstore raise many types for unreadable files.
    raise errors.UserError(f"ingredient {ingredient.name}: cannot restore {ingredient.path}: "
                           f"{checkpoint.describe(e)}") from e


def restore(ingredient, abstract):
  """Reads one ingredient into the shardings of `abstract`; errors name the ingredient."""
  if ingredient.is_torch:
    return _restore_torch(ingredient, abstract)
  if ingredient.is_npz:
    return _restore_npz(ingredient, abstract)
  return _restore_orbax(ingredient, abstract)
