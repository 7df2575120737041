"""Learned soup (Wortsman et al. 2022, Sec. 3.1): mixing coefficients fitted on held-out data.

The soup is sum_i softmax(a)_i * ingredient_i, with one logit vector `a` for
the whole model ('global') or one per parameter tensor ('per_layer'); the
logits start at zero (the uniform soup) and are fitted with Adam to minimise
the loss on the held-out split.

Two ways to fit them. `fit` holds every ingredient on the mesh at once
(stacked, each leaf sharded as the target sharding says), as the paper's
learned soup does: memory grows with N (its reference needed 490 GB for 72
CLIP models). `fit_bounded` holds at most `block_size` ingredients at a time,
in the spirit of MEHL-Soup (Li et al., ECCV 2024): each epoch visits the
ingredients in random blocks and fits only the block's logits, the others'
held fixed (block-coordinate descent). Its gradients are exact, not
approximate: with w = softmax(a) and S = sum_j w_j θ_j, dS/da_i = w_i (θ_i - S),
so dL/da_i = w_i <dL/dS, θ_i - S> needs only the running soup S, its
gradient and the block's θ_i, whatever N.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from soups import prefetch
from train import errors

MODES = ("global", "per_layer")


def _stacked_shardings(abstract):
  return jax.tree.map(lambda a: NamedSharding(a.sharding.mesh, P(None, *a.sharding.spec)),
                      abstract)


def stack(ingredients, restore, abstract):
  """All ingredients in one tree with a leading ingredient axis, filled one at a time."""
  shardings = _stacked_shardings(abstract)
  n = len(ingredients)
  stacked = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros((n, *a.shape), a.dtype), abstract),
                    out_shardings=shardings)()
  put = jax.jit(lambda s, x, i: jax.tree.map(lambda s_, x_: s_.at[i].set(x_), s, x),
                donate_argnums=(0,), out_shardings=shardings)
  for i, ingredient in enumerate(ingredients):
    stacked = put(stacked, restore(ingredient), i)
  return stacked


def _zero_logits(n, tree, mode):
  """Zero logits for `n` ingredients: one vector, or one per leaf of `tree` ('per_layer')."""
  if mode == "global":
    return jnp.zeros((n,))
  if mode == "per_layer":
    return jax.tree.map(lambda _: jnp.zeros((n,)), tree)
  raise ValueError(f"learned soup mode {mode!r}; known: {MODES}")


def init_logits(stacked, mode):
  return _zero_logits(jax.tree.leaves(stacked)[0].shape[0], stacked, mode)


def _leaf_logits(logits, tree):
  """The logit vector of each leaf of `tree`: its own ('per_layer'), or the one global vector."""
  return logits if isinstance(logits, dict) else jax.tree.map(lambda _: logits, tree)


def mix(stacked, logits):
  """sum_i softmax(logits)_i * stacked[i], per leaf (logits: one vector, or a tree of them)."""
  return jax.tree.map(
      lambda s, a: jnp.tensordot(jax.nn.softmax(a), s.astype(jnp.float32), axes=1).astype(s.dtype),
      stacked, _leaf_logits(logits, stacked))


def mixing_weights(logits):
  """The softmax-normalised coefficients, as numpy (a vector, or {path: vector})."""
  if isinstance(logits, dict):
    return jax.tree.map(lambda a: np.asarray(jax.nn.softmax(a)), logits)
  return np.asarray(jax.nn.softmax(logits))


def mean_loss(model, loss_fn, params, batch):
  """The mean per-example loss of `params` over the batch's real (unmasked) rows."""
  out = model.apply({"params": params}, batch["image"])
  mask = batch["mask"].astype(jnp.float32)
  return jnp.sum(loss_fn(out, batch["labels"]) * mask) / jnp.maximum(mask.sum(), 1.0)


def stacked_loss(model, loss_fn, stacked, logits, batch):
  """The held-out loss of the soup of `stacked` mixed by `logits`: what both fits minimise."""
  return mean_loss(model, loss_fn, mix(stacked, logits), batch)


def fit(model, stacked, mode, heldout, loss_fn, epochs=5, learning_rate=0.1):
  """Fits the mixing logits on `heldout` (a `SplitAccuracy`); returns (params, logits, losses)."""
  logits = init_logits(stacked, mode)
  tx = optax.adam(learning_rate)
  opt_state = tx.init(logits)

  @jax.jit
  def step(logits, opt_state, stacked, batch):
    loss, grads = jax.value_and_grad(
        lambda logits: stacked_loss(model, loss_fn, stacked, logits, batch))(logits)
    updates, opt_state = tx.update(grads, opt_state, logits)
    return optax.apply_updates(logits, updates), opt_state, loss

  epoch_losses = []
  for _ in range(epochs):
    losses = []
    for batch in heldout.global_batches():
      logits, opt_state, loss = step(logits, opt_state, stacked, batch)
      losses.append(float(loss))
    epoch_losses.append(float(np.mean(losses)))
  return jax.jit(mix)(stacked, logits), logits, epoch_losses


# The bounded-memory fit. The block is a tuple of k ingredient trees and `idx` their indices.

def block_gradient(soup, soup_grad, block, idx, logits):
  """dL/da[idx], exactly: w_i <g, θ_i - S> per leaf (summed over leaves for global logits).

  `soup` is S = sum_j softmax(logits)_j θ_j (float32), `soup_grad` g = dL/dS.
  """
  per_leaf = jax.tree.map(
      lambda s, g, a, *thetas: jax.nn.softmax(a)[idx] * jnp.stack(
          [jnp.sum(g * (t.astype(jnp.float32) - s)) for t in thetas]),
      soup, soup_grad, _leaf_logits(logits, soup), *block)
  return per_leaf if isinstance(logits, dict) else sum(jax.tree.leaves(per_leaf))


def _remixed(soup, block, idx, old, new):
  """The soup of logits `new` from the soup of `old`, which differ only at `idx`.

  Z = sum_j exp(a_j): the others' weights scale by Z/Z', the block's change,
  S' = (Z/Z') (S - sum_block w_i θ_i) + sum_block w'_i θ_i.
  """
  def leaf(s, a, b, *thetas):
    ratio = jnp.exp(jax.nn.logsumexp(a) - jax.nn.logsumexp(b))
    change = jax.nn.softmax(b)[idx] - ratio * jax.nn.softmax(a)[idx]
    return ratio * s + sum(c * t.astype(jnp.float32) for c, t in zip(change, thetas))
  return jax.tree.map(leaf, soup, _leaf_logits(old, soup), _leaf_logits(new, soup), *block)


def _block_step(model, loss_fn, tx, dtypes, logits, opt_state, soup, block, idx, batch):
  """One Adam step on the block's logits from one held-out batch; the soup follows them.

  `opt_state` holds one Adam state per ingredient (its own step count), so
  a block's step leaves every other ingredient's state as it was.
  """
  loss, soup_grad = jax.value_and_grad(lambda s: mean_loss(
      model, loss_fn, jax.tree.map(lambda x, d: x.astype(d), s, dtypes), batch))(soup)
  grads = block_gradient(soup, soup_grad, block, idx, logits)
  take = lambda tree: jax.tree.map(lambda x: x[idx], tree)
  updates, block_state = jax.vmap(tx.update)(grads, take(opt_state), take(logits))
  new = jax.tree.map(lambda a, u: a.at[idx].add(u), logits, updates)
  opt_state = jax.tree.map(lambda x, b: x.at[idx].set(b), opt_state, block_state)
  return new, opt_state, _remixed(soup, block, idx, logits, new), loss


def _accumulate(total, block, idx, logits, shift):
  """total + sum_block exp(a_i - shift) θ_i, per leaf: the soup's numerator, streamed."""
  return jax.tree.map(
      lambda t, a, c, *thetas: t + sum(
          w * x.astype(jnp.float32) for w, x in zip(jnp.exp(a[idx] - c), thetas)),
      total, _leaf_logits(logits, total), _leaf_logits(shift, total), *block)


def _normalised(total, logits, shift):
  """The soup sum_i softmax(a)_i θ_i from its numerator (`_accumulate` over all ingredients)."""
  return jax.tree.map(lambda t, a, c: t / jnp.sum(jnp.exp(a - c)),
                      total, _leaf_logits(logits, total), _leaf_logits(shift, total))


class BlockSteps:
  """The jitted steps of `fit_bounded` for one model and target: the soups stay float32 on the
  mesh, sharded like `abstract`, and are updated in place (donated)."""

  def __init__(self, model, loss_fn, abstract, learning_rate):
    self.tx = optax.adam(learning_rate)
    mesh = jax.tree.leaves(abstract)[0].sharding.mesh
    self.replicated = NamedSharding(mesh, P())
    soup = jax.tree.map(lambda a: a.sharding, abstract)
    dtypes = jax.tree.map(lambda a: a.dtype, abstract)
    self.step = jax.jit(functools.partial(_block_step, model, loss_fn, self.tx, dtypes),
                        donate_argnums=(2,),
                        out_shardings=(self.replicated, self.replicated, soup, self.replicated))
    self.zeros = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), abstract),
                         out_shardings=soup)
    self.accumulate = jax.jit(_accumulate, donate_argnums=(0,), out_shardings=soup)
    self.normalised = jax.jit(_normalised, donate_argnums=(0,), out_shardings=soup)
    self.cast = jax.jit(lambda s: jax.tree.map(lambda x, d: x.astype(d), s, dtypes),
                        out_shardings=soup)

  def init(self, n, abstract, mode):
    """(logits, opt_state): zero logits (the uniform soup) and one Adam state per ingredient."""
    logits = jax.device_put(_zero_logits(n, abstract, mode), self.replicated)
    return logits, jax.device_put(jax.vmap(self.tx.init)(logits), self.replicated)


def fit_bounded(model, ingredients, restore, abstract, mode, batches, loss_fn, block_size,
                epochs=5, learning_rate=0.1, seed=0):
  """Fits the mixing logits holding at most `block_size` ingredients on the mesh at a time.

  Each epoch splits a permutation of the ingredients (drawn from `seed`) into
  blocks of `block_size`; each block is read once and makes one full pass
  over the held-out `batches()` (a zero-argument callable giving padded
  global batches), an Adam step on the block's logits per batch, so every
  logit gets as many steps per epoch as in `fit`. Each step also updates the
  float32 running soup S (`_remixed`, exact in exact arithmetic); so that
  float drift does not add up, S is rebuilt at each epoch's end from the
  ingredients' weighted sum, gathered while each block is on the mesh (a
  block's logits are final for the epoch once its pass ends): the rebuild
  costs no read. The first epoch starts from the uniform soup, one more read
  of each ingredient. Memory per device: S, its gradient, that sum, the block
  and one ingredient read ahead, about (block_size + 4) models / devices plus
  the activations, whatever N.

  Returns (params, logits, epoch_losses, record): params = sum_i softmax(a)_i θ_i
  for the final logits, sharded like `abstract`, in the ingredients' dtypes;
  the held-out loss per epoch (the mean over its steps); and the knobs and
  costs, JSON-serialisable.
  """
  n = len(ingredients)
  if block_size < 1:
    raise errors.UserError(f"--learned_block_size={block_size}: hold at least one ingredient")
  block_size = min(block_size, n)
  steps = BlockSteps(model, loss_fn, abstract, learning_rate)
  logits, opt_state = steps.init(n, abstract, mode)
  rng = np.random.default_rng(seed)
  orders = [np.arange(n)] + [rng.permutation(n) for _ in range(epochs)]  # Uniform soup first.
  epoch_losses, passes = [], 0
  schedule = [ingredients[i] for order in orders for i in order]
  soup = None  # The first read of the ingredients, with no steps, makes the uniform soup.
  with prefetch.Prefetcher(schedule, restore) as stream:
    for epoch, order in enumerate(orders):
      shift = jax.tree.map(jax.nn.logsumexp, logits)  # Keeps exp(a - shift) in range.
      total, losses = steps.zeros(), []
      for start in range(0, n, block_size):
        idx = order[start:start + block_size]
        block = tuple(next(stream)[1] for _ in idx)
        if epoch:
          for batch in batches():
            logits, opt_state, soup, loss = steps.step(logits, opt_state, soup, block, idx, batch)
            losses.append(loss)
          passes += 1
        total = steps.accumulate(total, block, idx, logits, shift)
        jax.block_until_ready((total, soup))  # The block's uses end before the next read.
        del block
      soup = steps.normalised(total, logits, shift)
      if epoch:
        epoch_losses.append(float(np.mean(jax.device_get(losses))))
  record = {"mode": mode, "block_size": block_size, "epochs": epochs,
            "learning_rate": learning_rate, "seed": seed,
            "blocks_per_epoch": len(range(0, n, block_size)),
            "checkpoint_reads": len(schedule), "heldout_passes": passes,
            "heldout_backward_passes": passes}
  return steps.cast(soup), logits, epoch_losses, record
