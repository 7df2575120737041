"""Where arrays live: one mesh from the config, parameter placement by path rules.

`config.mesh` names the axes, e.g. `(('data', -1),)` or
`(('data', -1), ('fsdp', 4))` (-1: all remaining devices). Batches are split
over every mesh axis. `config.param_sharding` is a list of
`(path_regex, strategy)`; the first regex that matches the end of a leaf's
path (`params/Transformer/.../kernel`, `opt_state/.../kernel`) decides:

  'replicate'            a full copy on every device;
  'fsdp(axis="fsdp")'    split the largest dimension divisible by the axis
                         size over that axis (replicated if none divides).
"""

import re

import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from train import call_spec
from train import errors
from train import trees


def make_mesh(mesh_spec, devices=None):
  """Builds a `jax.sharding.Mesh` from `(('axis', size), ...)`; one size may be -1."""
  devices = jax.devices() if devices is None else devices
  names = tuple(name for name, _ in mesh_spec)
  sizes = [size for _, size in mesh_spec]
  if sizes.count(-1) > 1:
    raise errors.UserError(f"config.mesh={mesh_spec!r}: at most one axis may have size -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise errors.UserError(f"config.mesh={mesh_spec!r}: {len(devices)} devices are not "
                             f"divisible by the fixed axes' product {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise errors.UserError(f"config.mesh={mesh_spec!r} needs {int(np.prod(sizes))} devices, "
                           f"there are {len(devices)}")
  # Auto axes: XLA propagates shardings from jit's in/out shardings (pjit style).
  return jax.make_mesh(tuple(sizes), names, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def batch_sharding(mesh):
  """Leading (batch) dimension split over all mesh axes, the rest replicated."""
  return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh):
  return NamedSharding(mesh, P())


def _replicate(mesh, shape):
  del shape
  return P()


def _fsdp(mesh, shape, axis="data"):
  if axis not in mesh.shape:
    raise errors.UserError(f"fsdp axis {axis!r} is not a mesh axis {tuple(mesh.shape)}")
  size = mesh.shape[axis]
  for dim in np.argsort(shape)[::-1]:
    if shape[dim] % size == 0 and shape[dim] >= size:
      spec = [None] * len(shape)
      spec[dim] = axis
      return P(*spec)
  return P()


STRATEGIES = {"replicate": _replicate, "fsdp": _fsdp}


def tree_shardings(mesh, tree, rules):
  """NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs) from `rules`."""
  parsed = [(re.compile(f"(^|.*/)(?:{pattern})$"), call_spec.parse_call(strategy, STRATEGIES))
            for pattern, strategy in rules]

  def leaf_sharding(path, leaf):
    name = trees.path_str(path)
    for regex, (strategy, args, kwargs) in parsed:
      if regex.match(name):
        return NamedSharding(mesh, STRATEGIES[strategy](mesh, leaf.shape, *args, **kwargs))
    raise errors.UserError(f"no rule of config.param_sharding matches {name!r}; end the list "
                           "with ('.*', 'replicate')")

  return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def abstract_tree(tree, shardings=None):
  """ShapeDtypeStructs of `tree`'s leaves (arrays, structs, orbax metadata), with any `shardings`.

  With shardings, orbax and `jax.jit` place each array straight into them.
  """
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=s),
                      tree, shardings)


def placed_abstract_tree(mesh, tree, rules):
  """ShapeDtypeStructs of `tree`'s leaves, each sharded over `mesh` by `rules` (tree_shardings)."""
  shapes = abstract_tree(tree)
  return abstract_tree(shapes, tree_shardings(mesh, shapes, rules))


def to_global(host_batch, batch_sharding):
  """This process's slice of a batch (numpy) -> global jax arrays split over the mesh."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(batch_sharding, x), host_batch)


def to_host(tree):
  """Global (possibly sharded, multi-host) arrays -> full numpy arrays on every process."""
  if all(x.is_fully_addressable for x in jax.tree.leaves(tree)):
    return jax.device_get(tree)  # One process: no collective needed.
  return multihost_utils.process_allgather(tree, tiled=True)
