"""Merges of task vectors τ_i = θ_i − θ0, each run's update of the shared pre-trained init θ0.

- Model Stock (Jang et al., "Model Stock: All we need is just a few fine-tuned
  models", ECCV 2024): per leaf, t·mean_i θ_i + (1 − t)·θ0 with t from the
  mean pairwise cosine of the updates; no held-out data.
- Task arithmetic (Ilharco et al., "Editing models with task arithmetic",
  ICLR 2023): θ0 + λ·Σ_i τ_i.
- TIES-Merging (Yadav et al., "TIES-Merging: Resolving interference when
  merging models", NeurIPS 2023): trim each τ_i to its largest magnitudes,
  elect a sign per element, average the agreeing entries; θ0 + λ·τ_merged.
- DARE (Yu et al., "Language models are Super Mario: absorbing abilities from
  homologous models as a free lunch", ICML 2024): drop each entry of τ_i with
  probability p, rescale the rest by 1/(1 − p); θ0 + λ·Σ_i τ̃_i.

Every recipe streams the ingredients one at a time (`averaging.fold`) through
jitted steps that add to float32 sums sharded like the soup (donated, outputs in
the target shardings), so memory per device is flat in the number of
ingredients. λ, the TIES density and the DARE drop rate are chosen on the
held-out split from the grids given; the result is cast to the ingredients'
dtypes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from soups import averaging
from train import errors
from train import sharding
from train import trees

F32 = jnp.float32


def _tau(x, x0):
  return x.astype(F32) - x0.astype(F32)


def _model_stock_add(state, tree, theta0):
  """Adds θ_i to Σθ, v_i = τ_i/|τ_i| (0 for a zero update) to Σv, and <v_i, Σ_{j<i} v_j> to the
  leaf's sum of pairwise cosines.

  Summing the pairs as they arrive gives Σ_{i<j} cos(τ_i, τ_j) without the
  cancellation of (|Σv|² − k)/2, which loses digits when the cosines are small.
  """
  out = []
  for total, units, pairs, x, x0 in zip(*state, tree, theta0):
    tau = _tau(x, x0)
    norm = jnp.sqrt(jnp.sum(jnp.square(tau)))
    unit = tau / jnp.where(norm > 0, norm, 1.0)
    out.append((total + x.astype(F32), units + unit, pairs + jnp.sum(unit * units)))
  return tuple(zip(*out))


def _model_stock_merge(state, theta0, k):
  """(merged leaves, t per leaf, mean pairwise cosine per leaf) from the pass's sums."""
  totals, _, pairs = state
  cos = tuple(2 * p / (k * (k - 1)) for p in pairs)
  acute = [jnp.maximum(c, 0.0) for c in cos]  # Updates pointing apart on average keep θ0.
  ratios = tuple(k * c / ((k - 1) * c + 1) for c in acute)
  merged = tuple((t * (total / k) + (1 - t) * x0.astype(F32)).astype(x0.dtype)
                 for t, total, x0 in zip(ratios, totals, theta0))
  return merged, ratios, cos


def _add_tau(total, tree, theta0):
  return tuple(s + _tau(x, x0) for s, x, x0 in zip(total, tree, theta0))


def dare_keep(seed, ingredient, leaf, shape, drop_rate):
  """DARE's mask of kept entries for ingredient number `ingredient`, leaf number `leaf` (the
  leaves in `jax.tree.flatten` order, i.e. sorted paths): uniform(key) >= drop_rate, with key
  fold_in(fold_in(jax.random.key(seed), ingredient), leaf).

  The bits are drawn with threefry partitionable, whatever the global setting
  (the default since jax 0.5), so a mask is the same on every mesh and sharding.
  """
  with jax.threefry_partitionable(True):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), ingredient), leaf)
    return jax.random.uniform(key, shape) >= drop_rate


def _add_dropped_tau(total, tree, theta0, seed, drop_rate, scale, index):
  return tuple(
      s + jnp.where(dare_keep(seed, index, j, s.shape, drop_rate), _tau(x, x0) * scale, 0.0)
      for j, (s, x, x0) in enumerate(zip(total, tree, theta0)))


def _trim(tau, kept):
  """τ with every entry below its `kept`-th largest magnitude zeroed (ties at it are kept).

  The threshold is found by bisection on the float32 bit patterns of |τ|
  (ordered as the magnitudes are): 31 counts, each a sharded sum, where a sort
  would gather the leaf onto every device.
  """
  bits = jax.lax.bitcast_convert_type(jnp.abs(tau), jnp.int32)

  def halve(_, bounds):  # Invariant: >= kept entries have bits >= lo; fewer have bits >= hi.
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(bits >= mid) >= kept
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

  lo, _ = jax.lax.fori_loop(0, 31, halve, (jnp.int32(0), jnp.int32(0x7F800001)))  # Above inf.
  return jnp.where(bits >= lo, tau, 0.0)


def _add_trimmed_tau(total, tree, theta0, kept):
  return tuple(s + _trim(_tau(x, x0), m) for s, x, x0, m in zip(total, tree, theta0, kept))


def _elect_signs(total):
  return tuple(jnp.sign(s).astype(jnp.int8) for s in total)


def _add_agreeing_tau(state, tree, theta0, signs, kept):
  """Adds the trimmed τ_i's entries whose sign is the elected one, and counts them.

  Those are its nonzero entries of the elected sign, and its zeros where the
  elected sign is 0: they add 0, and their mean stays 0.
  """
  out = []
  for total, count, x, x0, sign, m in zip(*state, tree, theta0, signs, kept):
    trimmed = _trim(_tau(x, x0), m)
    agree = jnp.sign(trimmed).astype(jnp.int8) == sign
    out.append((total + jnp.where(agree, trimmed, 0.0), count + agree))
  return tuple(zip(*out))


def _disjoint_mean(state):
  return tuple(jnp.where(c > 0, s / jnp.maximum(c, 1), 0.0) for s, c in zip(*state))


def _along(theta0, direction, lam):
  """θ0 + λ·direction, in θ0's dtypes: a candidate of task arithmetic, TIES or DARE."""
  return tuple((x0.astype(F32) + lam * d).astype(x0.dtype) for x0, d in zip(theta0, direction))


@functools.lru_cache(maxsize=64)
def _jit(fn, out_shardings, donate_argnums=()):
  """`fn` jitted with its outputs in `out_shardings`; shared by every soup of those shardings."""
  return jax.jit(fn, out_shardings=out_shardings, donate_argnums=donate_argnums)


class _Leaves:
  """The soup's leaves in `jax.tree.flatten` order, their shardings, and the steps over them."""

  def __init__(self, abstract):
    paths_leaves, self.treedef = jax.tree_util.tree_flatten_with_path(abstract)
    self.paths = [trees.path_str(path) for path, _ in paths_leaves]
    self.abstract = tuple(leaf for _, leaf in paths_leaves)
    self.shardings = tuple(leaf.sharding for leaf in self.abstract)
    self.replicated = (sharding.replicated(self.shardings[0].mesh),) * len(self.abstract)

  def like(self, dtype):
    """ShapeDtypeStructs of the leaves in `dtype`, sharded as they are."""
    return tuple(jax.ShapeDtypeStruct(a.shape, dtype, sharding=a.sharding) for a in self.abstract)

  def scalars(self, dtype):
    """One replicated scalar per leaf."""
    return tuple(jax.ShapeDtypeStruct((), dtype, sharding=s) for s in self.replicated)

  def steps(self):
    """{name: (the jitted per-ingredient step, its arguments as ShapeDtypeStructs)}."""
    f32, leaves, s = self.like(F32), self.abstract, self.shardings
    kept = self.scalars(jnp.int32)
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=self.replicated[0])
    return {
        "model_stock": (_jit(_model_stock_add, (s, s, self.replicated), (0,)),
                        ((f32, f32, self.scalars(F32)), leaves, leaves)),
        "task_arithmetic": (_jit(_add_tau, s, (0,)), (f32, leaves, leaves)),
        "ties_elect": (_jit(_add_trimmed_tau, s, (0,)), (f32, leaves, leaves, kept)),
        "ties_disjoint": (_jit(_add_agreeing_tau, (s, s), (0,)),
                          ((f32, self.like(jnp.int32)), leaves, leaves, self.like(jnp.int8),
                           kept)),
        "dare": (_jit(_add_dropped_tau, s, (0,)),
                 (f32, leaves, leaves, scalar(jnp.int32), scalar(F32), scalar(F32),
                  scalar(jnp.int32))),
    }

  def step(self, name):
    return self.steps()[name][0]

  def fold(self, ingredients, restore, step, state, *args, with_index=False):
    """`state = step(state, ingredient's leaves, *args)` for each ingredient, streamed; with
    `with_index`, the ingredient's position in `ingredients` is passed last."""
    return averaging.fold(ingredients, restore, lambda total, index, tree: step(
        total, tuple(self.treedef.flatten_up_to(tree)), *args,
        *((np.int32(index),) if with_index else ())), state)

  def zeros(self, dtype=np.float32):
    return tuple(averaging.zeros(self.abstract, dtype))

  def place(self, theta0):
    """θ0's leaves in the soup's shardings; refused unless its shapes and dtypes are the soup's."""
    leaves = tuple(self.treedef.flatten_up_to(theta0))
    for path, x, a in zip(self.paths, leaves, self.abstract):
      if (tuple(x.shape), np.dtype(x.dtype)) != (tuple(a.shape), np.dtype(a.dtype)):
        raise errors.UserError(f"θ0's {path!r} has shape {tuple(x.shape)} dtype {x.dtype}, the "
                               f"ingredients' {tuple(a.shape)} {a.dtype}")
    return tuple(jax.device_put(leaves, self.shardings))

  def unflatten(self, leaves):
    return jax.tree.unflatten(self.treedef, leaves)


def per_ingredient_memory(abstract):
  """{step: XLA's compiled memory analysis (per device)} of every recipe's per-ingredient step."""
  return {name: step.lower(*args).compile().memory_analysis()
          for name, (step, args) in _Leaves(abstract).steps().items()}


def model_stock(ingredients, restore, abstract, theta0):
  """Model Stock of `ingredients` (k >= 2) around θ0, in one pass; no held-out data.

  Per leaf, with cosθ the mean of cos(τ_i, τ_j) over the k(k−1)/2 pairs
  i < j: t = k·c / ((k−1)·c + 1), c = max(cosθ, 0), and the merged leaf is
  t·mean_i θ_i + (1−t)·θ0. Edge cases: the cosine with a zero update (a frozen
  leaf) counts as 0, as in the authors' code (eps-guarded cosine); leaves whose
  updates point apart on average (cosθ <= 0, outside the paper's acute-angle
  geometry, where t would pass through a pole at cosθ = −1/(k−1)) keep θ0
  (t = 0). So a leaf no run changed is θ0 exactly, and no t is NaN.

  Returns (params sharded like `abstract`, record): the record holds k, and
  per '/'-joined leaf path its cosθ and t.
  """
  k = len(ingredients)
  if k < 2:
    raise errors.UserError(f"Model Stock needs at least 2 fine-tuned ingredients, got {k}")
  leaves = _Leaves(abstract)
  theta0 = leaves.place(theta0)
  state = (leaves.zeros(), leaves.zeros(), tuple(averaging.zeros(leaves.scalars(F32))))
  state = leaves.fold(ingredients, restore, leaves.step("model_stock"), state, theta0)
  merge = _jit(_model_stock_merge, (leaves.shardings, leaves.replicated, leaves.replicated))
  merged, ratios, cos = merge(state, theta0, F32(k))
  ratios, cos = sharding.to_host((ratios, cos))
  return leaves.unflatten(merged), {
      "k": k, "per_leaf": {path: {"cos": float(c), "t": float(t)}
                           for path, c, t in zip(leaves.paths, cos, ratios)},
      "checkpoint_reads": k, "heldout_passes": 0}


class _GridSearch:
  """Scores each grid point's candidate on held-out; keeps the best's params (the first on ties)."""

  def __init__(self, leaves, theta0, heldout_accuracy, lambdas):
    if not lambdas:
      raise errors.UserError("no lambdas to choose from")
    self.leaves, self.theta0 = leaves, theta0
    self.heldout_accuracy, self.lambdas = heldout_accuracy, [float(lam) for lam in lambdas]
    self.grid, self.chosen, self.params = [], None, None
    self.along = _jit(_along, leaves.shardings)

  def try_lambdas(self, direction, **knobs):
    """Scores θ0 + λ·direction for every λ."""
    for lam in self.lambdas:
      candidate = self.along(self.theta0, direction, F32(lam))
      point = {**knobs, "lambda": lam,
               "heldout_acc": float(self.heldout_accuracy(self.leaves.unflatten(candidate)))}
      self.grid.append(point)
      if self.chosen is None or point["heldout_acc"] > self.chosen["heldout_acc"]:
        self.chosen, self.params = point, candidate
      del candidate  # Else a rejected candidate would live on while the next one is made.

  def result(self, checkpoint_reads, **knobs):
    return self.leaves.unflatten(self.params), {
        **knobs, "lambdas": self.lambdas, "grid": self.grid, "chosen": self.chosen,
        "checkpoint_reads": checkpoint_reads, "heldout_passes": len(self.grid)}


def task_arithmetic(ingredients, restore, abstract, theta0, heldout_accuracy, lambdas):
  """θ0 + λ·Σ_i τ_i, λ the best of `lambdas` on held-out; one pass over the ingredients.

  `heldout_accuracy(params) -> float` scores a candidate on the held-out split.
  Returns (params, record: lambdas, grid, chosen, checkpoint_reads, heldout_passes).
  """
  leaves = _Leaves(abstract)
  search = _GridSearch(leaves, leaves.place(theta0), heldout_accuracy, lambdas)
  total = leaves.fold(ingredients, restore, leaves.step("task_arithmetic"), leaves.zeros(),
                      search.theta0)
  search.try_lambdas(total)
  return search.result(len(ingredients))


def _kept_counts(leaves, density):
  """Entries TIES keeps per leaf: max(1, round(density · size)), halves rounded up."""
  return tuple(np.int32(max(1, int(np.floor(density * a.size + 0.5)))) for a in leaves.abstract)


def ties(ingredients, restore, abstract, theta0, heldout_accuracy, densities, lambdas):
  """TIES-Merging: θ0 + λ·τ_merged, (density, λ) the best of the grid on held-out.

  Trim: per ingredient and leaf of size n, keep the m = max(1, round(density·n))
  largest |τ_i| and every entry tied with the m-th largest (so ties can keep
  more than m; a zero entry is kept only where it is such a tie, which adds
  nothing). Elect: sign(Σ_i trimmed τ_i) per entry. Disjoint mean: the mean of
  the trimmed τ_i that are nonzero and have the elected sign, 0 where none do.
  Two passes per density (elect, then the mean): 2N reads each.
  Returns (params, record: densities, lambdas, grid, chosen, checkpoint_reads,
  heldout_passes).
  """
  densities = [float(d) for d in densities]
  if not densities or not all(0 < d <= 1 for d in densities):
    raise errors.UserError(f"--ties_densities: each must be in (0, 1], got {densities}")
  leaves = _Leaves(abstract)
  search = _GridSearch(leaves, leaves.place(theta0), heldout_accuracy, lambdas)
  elect = _jit(_elect_signs, leaves.shardings)
  disjoint_mean = _jit(_disjoint_mean, leaves.shardings)
  for density in densities:
    kept = _kept_counts(leaves, density)
    signs = elect(leaves.fold(ingredients, restore, leaves.step("ties_elect"), leaves.zeros(),
                              search.theta0, kept))
    state = leaves.fold(ingredients, restore, leaves.step("ties_disjoint"),
                        (leaves.zeros(), leaves.zeros(np.int32)), search.theta0, signs, kept)
    del signs
    search.try_lambdas(disjoint_mean(state), density=density)
  return search.result(2 * len(ingredients) * len(densities), densities=densities)


def dare(ingredients, restore, abstract, theta0, heldout_accuracy, drop_rates, lambdas, seed=0):
  """DARE: θ0 + λ·Σ_i τ̃_i, τ̃_i = τ_i ⊙ mask_i / (1 − p), (p, λ) the best of the grid on held-out.

  mask_i of each leaf is `dare_keep(seed, i, leaf number, shape, p)`, i the
  ingredient's position in `ingredients`: the same masks on every mesh. One
  pass per drop rate. Returns (params, record: drop_rates, seed, lambdas, grid,
  chosen, checkpoint_reads, heldout_passes).
  """
  drop_rates = [float(p) for p in drop_rates]
  if not drop_rates or not all(0 <= p < 1 for p in drop_rates):
    raise errors.UserError(f"--dare_drop_rates: each must be in [0, 1), got {drop_rates}")
  leaves = _Leaves(abstract)
  search = _GridSearch(leaves, leaves.place(theta0), heldout_accuracy, lambdas)
  for p in drop_rates:
    total = leaves.fold(ingredients, restore, leaves.step("dare"), leaves.zeros(), search.theta0,
                        np.int32(seed), F32(p), F32(1 / (1 - p)), with_index=True)
    search.try_lambdas(total, drop_rate=p)
  return search.result(len(ingredients) * len(drop_rates), drop_rates=drop_rates, seed=seed)
