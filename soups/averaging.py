"""Sharded, streaming weighted averages of parameter trees.

`RunningSum` keeps a float32 sum of ingredients on the mesh, every leaf
sharded as the target sharding says; ingredients are added one at a time and
dropped, so peak memory per device is about (sum + one ingredient) / devices,
whatever the number of ingredients. The add is jitted with the sum donated,
so it updates in place.
"""

import jax
import jax.numpy as jnp


def _shardings(abstract):
  return jax.tree.map(lambda a: a.sharding, abstract)


def _add(total, tree, weight):
  return jax.tree.map(lambda t, x: t + weight * x.astype(jnp.float32), total, tree)


def _mean_with(total, count, tree, dtypes):
  """(total + tree) / (count + 1), cast back to the ingredients' dtypes: a candidate soup."""
  return jax.tree.map(lambda t, x, d: ((t + x.astype(jnp.float32)) / (count + 1)).astype(d),
                      total, tree, dtypes)


class RunningSum:
  """sum_i w_i * ingredient_i in float32, sharded like `abstract` (ShapeDtypeStructs with shardings)."""

  def __init__(self, abstract):
    shardings = _shardings(abstract)
    self.dtypes = jax.tree.map(lambda a: a.dtype, abstract)
    zeros = lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), abstract)
    self.total = jax.jit(zeros, out_shardings=shardings)()
    self.weight = 0.0
    self._add = jax.jit(_add, donate_argnums=(0,), out_shardings=shardings)
    self._mean = jax.jit(lambda total, weight: jax.tree.map(
        lambda t, d: (t / weight).astype(d), total, self.dtypes), out_shardings=shardings)
    self._mean_with = jax.jit(lambda total, count, tree: _mean_with(
        total, count, tree, self.dtypes), out_shardings=shardings)

  def add(self, tree, weight=1.0):
    self.total = self._add(self.total, tree, jnp.float32(weight))
    self.weight += weight

  def mean(self):
    """The weighted average, in the ingredients' dtypes."""
    if not self.weight:
      raise ValueError("the average of no ingredients is undefined")
    return self._mean(self.total, jnp.float32(self.weight))

  def mean_with(self, tree):
    """The uniform average if `tree` were added (for unit weights), without adding it."""
    return self._mean_with(self.total, jnp.float32(self.weight), tree)

  def add_memory_analysis(self, abstract):
    """XLA's compiled memory analysis of one `add` step (per device)."""
    total = jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=t.sharding),
                         self.total)
    return self._add.lower(total, abstract, jnp.float32(1.0)).compile().memory_analysis()


def average(ingredients, restore, abstract, weights=None):
  """Weighted mean (default uniform) of `ingredients`, restored one at a time by `restore`."""
  weights = [1.0] * len(ingredients) if weights is None else weights
  running = RunningSum(abstract)
  for ingredient, weight in zip(ingredients, weights):
    running.add(restore(ingredient), weight)
  return running.mean()


@jax.jit
def _interpolate(start, end, alpha):
  return jax.tree.map(
      lambda x, y: ((1 - alpha) * x.astype(jnp.float32) + alpha * y.astype(jnp.float32)
                    ).astype(y.dtype), start, end)


def interpolate(start, end, alpha):
  """(1 - alpha) * start + alpha * end, leaf by leaf (WiSE-FT), in `end`'s dtypes."""
  return _interpolate(start, end, jnp.float32(alpha))
