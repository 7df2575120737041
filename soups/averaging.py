"""Sharded, streaming weighted averages of parameter trees.

`RunningSum` keeps a float32 sum of ingredients on the mesh, every leaf
sharded as the target sharding says; ingredients are added one at a time and
dropped. The add is jitted with the sum donated, so it updates in place.
`average` reads the next ingredient on a background thread while the current
one is added, so reads and adds overlap and peak memory per device is about
(sum + two ingredients) / devices, whatever the number of ingredients.
"""

import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np

from soups import prefetch
from train import sharding


def _zeros(leaf, dtype=np.float32):
  """Zeros of `dtype` in `leaf`'s sharding, each of this process's shards made on the host.

  No compile (a jitted zeros costs as much to compile as the add). On CPU the
  shards alias numpy's untouched zero pages instead of copying them (0.1 s
  rather than 0.3 s for ViT-S/16 on 8 devices); the first add then writes a
  fresh sum, and every later add updates it in place.
  """
  shard_shape = leaf.sharding.shard_shape(leaf.shape)
  return jax.make_array_from_callback(leaf.shape, leaf.sharding,
                                      lambda index: np.zeros(shard_shape, dtype))


def zeros(abstract, dtype=np.float32):
  """Zeros of `dtype` for each leaf of `abstract` (sharded ShapeDtypeStructs), sharded like it."""
  return jax.tree.map(lambda leaf: _zeros(leaf, dtype), abstract)


def _add(total, tree, weight):
  return jax.tree.map(lambda t, x: t + weight * x.astype(jnp.float32), total, tree)


def _divide(total, weight):
  """total / weight, correctly rounded, as numpy divides.

  For some leaf shapes XLA rewrites a division by a broadcast scalar into a
  multiplication by its reciprocal, up to 1 ulp off; dividing by a
  broadcast it cannot see through keeps the division (at no measured cost).
  """
  return total / jax.lax.optimization_barrier(jnp.broadcast_to(weight, total.shape))


def _mean_with(total, count, tree, dtypes):
  """(total + tree) / (count + 1), cast back to the ingredients' dtypes: a candidate soup."""
  return jax.tree.map(lambda t, x, d: _divide(t + x.astype(jnp.float32), count + 1).astype(d),
                      total, tree, dtypes)


@functools.lru_cache(maxsize=16)
def _steps(treedef, dtypes, shardings):
  """The jitted add, mean and mean_with for one tree of (dtype, sharding) leaves.

  Shared by every `RunningSum` of that tree in the process (the uniform and
  the greedy soup, say), so each compiles once, not once per sum.
  """
  dtypes = jax.tree.unflatten(treedef, dtypes)
  shardings = jax.tree.unflatten(treedef, shardings)
  add = jax.jit(_add, donate_argnums=(0,), out_shardings=shardings)
  mean = jax.jit(lambda total, weight: jax.tree.map(
      lambda t, d: _divide(t, weight).astype(d), total, dtypes), out_shardings=shardings)
  mean_with = jax.jit(lambda total, count, tree: _mean_with(total, count, tree, dtypes),
                      out_shardings=shardings)
  return add, mean, mean_with


class RunningSum:
  """sum_i w_i * ingredient_i in float32, sharded like `abstract` (sharded ShapeDtypeStructs)."""

  def __init__(self, abstract):
    leaves, treedef = jax.tree.flatten(abstract)
    self.total = zeros(abstract)
    self.weight = 0.0
    self._compiling = None
    self._add, self._mean, self._mean_with = _steps(
        treedef, tuple(np.dtype(a.dtype) for a in leaves), tuple(a.sharding for a in leaves))

  def add(self, tree, weight=1.0):
    self.total = self._add(self.total, tree, jnp.float32(weight))
    self.weight += weight

  def mean(self):
    """The weighted average, in the ingredients' dtypes."""
    if not self.weight:
      raise ValueError("the average of no ingredients is undefined")
    self.finish_compiles()  # The mean's compile is cached: the call below runs it.
    return self._mean(self.total, jnp.float32(self.weight))

  def mean_with(self, tree):
    """The uniform average if `tree` were added (for unit weights), without adding it."""
    return self._mean_with(self.total, jnp.float32(self.weight), tree)

  def compile(self, abstract):
    """Compiles `add` for ingredients like `abstract` now, and `mean` on a background thread.

    Compiles cost as much as reading a few ingredients; the mean is needed
    only at the end, so its compile overlaps the reads and adds.
    """
    weight = jax.ShapeDtypeStruct((), jnp.float32)
    total = self._total_abstract()
    self._compiling = threading.Thread(
        target=lambda: self._mean.lower(total, weight).compile(), name="soup-compile", daemon=True)
    self._compiling.start()
    self._add.lower(total, abstract, weight).compile()

  def finish_compiles(self):
    """Waits for the background compile that `compile` started, if any."""
    if self._compiling is not None:
      self._compiling.join()

  def _total_abstract(self):
    return sharding.abstract_tree(self.total, jax.tree.map(lambda t: t.sharding, self.total))

  def add_memory_analysis(self, abstract):
    """XLA's compiled memory analysis of one `add` step (per device)."""
    return lowered_add(abstract).compile().memory_analysis()


def lowered_add(abstract):
  """The soup step's `add` (running sum += weight * ingredient) lowered for ingredients like
  `abstract`, allocating nothing: launch/plan.py reads its memory and FLOPs."""
  leaves, treedef = jax.tree.flatten(abstract)
  add, _, _ = _steps(treedef, tuple(np.dtype(a.dtype) for a in leaves),
                     tuple(a.sharding for a in leaves))
  total = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, np.float32, sharding=a.sharding), abstract)
  return add.lower(total, abstract, jax.ShapeDtypeStruct((), jnp.float32))


def average(ingredients, restore, abstract, weights=None, ahead=1):
  """Weighted mean (default uniform) of `ingredients`, restored one at a time by `restore`.

  `ahead` ingredients are read on a background thread while one is added
  (memory: the sum and `ahead` + 1 ingredients); the sums are the same, in
  the same order, as reading and adding in turn.
  """
  weights = [1.0] * len(ingredients) if weights is None else list(weights)
  if len(weights) != len(ingredients):
    raise ValueError(f"{len(weights)} weights for {len(ingredients)} ingredients")
  with prefetch.Prefetcher(ingredients, restore, ahead) as stream:
    running = RunningSum(abstract)  # The first reads overlap these compiles.
    try:
      running.compile(abstract)
      for weight in weights:
        running.add(next(stream)[1], weight)  # No reference to the ingredient outlives the add...
        jax.block_until_ready(running.total)  # ...whose end lets the next read start.
    finally:
      running.finish_compiles()  # Not left compiling while a failed read's error exits.
  return running.mean()


def fold(ingredients, restore, step, state, ahead=1):
  """`state = step(state, index, tree)` for each ingredient in order, streamed like `average`.

  The next `ahead` ingredients are read on a background thread while `step`
  runs; a step has finished, and its ingredient is dropped, before a further
  read starts. With `step` donating `state`, memory is `state` and `ahead` + 1
  ingredients, whatever the number of ingredients.
  """
  with prefetch.Prefetcher(ingredients, restore, ahead) as stream:
    for index in range(len(ingredients)):
      state = step(state, index, next(stream)[1])  # As in `average`: no reference outlives it.
      jax.block_until_ready(state)
  return state


@jax.jit
def _interpolate(start, end, alpha):
  return jax.tree.map(
      lambda x, y: ((1 - alpha) * x.astype(jnp.float32) + alpha * y.astype(jnp.float32)
                    ).astype(y.dtype), start, end)


def interpolate(start, end, alpha):
  """(1 - alpha) * start + alpha * end, leaf by leaf (WiSE-FT), in `end`'s dtypes."""
  return _interpolate(start, end, jnp.float32(alpha))
