"""Learned soup (Wortsman et al. 2022, Sec. 3.1): mixing coefficients fitted on held-out data.

The soup is sum_i softmax(a)_i * ingredient_i, with one logit vector `a` for
the whole model ('global') or one per parameter tensor ('per_layer'); the
logits start at zero (the uniform soup) and are fitted with Adam to minimise
the loss on the held-out split. Unlike the averaging recipes it holds every
ingredient on the mesh at once (stacked, each leaf sharded as the target
sharding says), as the paper's learned soup does.
"""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

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


def init_logits(stacked, mode):
  n = jax.tree.leaves(stacked)[0].shape[0]
  if mode == "global":
    return jnp.zeros((n,))
  if mode == "per_layer":
    return jax.tree.map(lambda _: jnp.zeros((n,)), stacked)
  raise ValueError(f"learned soup mode {mode!r}; known: {MODES}")


def mix(stacked, logits):
  """sum_i softmax(logits)_i * stacked[i], per leaf (logits: one vector, or a tree of them)."""
  if not isinstance(logits, dict):
    logits = jax.tree.map(lambda _: logits, stacked)
  return jax.tree.map(
      lambda s, a: jnp.tensordot(jax.nn.softmax(a), s.astype(jnp.float32), axes=1).astype(s.dtype),
      stacked, logits)


def mixing_weights(logits):
  """The softmax-normalised coefficients, as numpy (a vector, or {path: vector})."""
  if isinstance(logits, dict):
    return jax.tree.map(lambda a: np.asarray(jax.nn.softmax(a)), logits)
  return np.asarray(jax.nn.softmax(logits))


def fit(model, stacked, mode, heldout, loss_fn, epochs=5, learning_rate=0.1):
  """Fits the mixing logits on `heldout` (a `SplitAccuracy`); returns (params, logits, losses)."""
  logits = init_logits(stacked, mode)
  tx = optax.adam(learning_rate)
  opt_state = tx.init(logits)

  @jax.jit
  def step(logits, opt_state, stacked, batch):
    def mean_loss(logits):
      out = model.apply({"params": mix(stacked, logits)}, batch["image"])
      mask = batch["mask"].astype(jnp.float32)
      return jnp.sum(loss_fn(out, batch["labels"]) * mask) / jnp.maximum(mask.sum(), 1.0)
    loss, grads = jax.value_and_grad(mean_loss)(logits)
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
