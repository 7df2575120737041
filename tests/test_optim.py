"""Schedules, optimizers, weight decay, losses and the EMAs."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from train import ema
from train import losses
from train import optimizer
from train import trainable


def _config(**overrides):
  config = common.base_config()
  config.update_from_flattened_dict(overrides)
  return config


@pytest.mark.parametrize("decay,midpoint", [("cosine", 0.5), ("linear", 0.5), ("constant", 1.0)])
def test_warmup_then_decay(decay, midpoint):
  schedule = optimizer.make_schedule(
      1.0, ml_collections.ConfigDict(dict(warmup_steps=10, decay=decay, end_lr_fraction=0.0)), 110)
  assert schedule(0) == 0.0
  assert schedule(5) == pytest.approx(0.5)
  assert schedule(10) == pytest.approx(1.0)
  assert schedule(60) == pytest.approx(midpoint, abs=1e-6)
  assert schedule(110) == pytest.approx(0.0 if decay != "constant" else 1.0, abs=1e-6)


def test_schedule_and_optimizer_errors_name_the_key():
  with pytest.raises(ValueError, match=r"config.schedule.decay='exp'"):
    optimizer.make_optimizer(_config(**{"schedule.decay": "exp"}))
  with pytest.raises(ValueError, match=r"config.schedule.warmup_steps=2000 must be in \[0, "
                                       r"config.total_steps=1000\)"):
    optimizer.make_optimizer(_config(**{"schedule.warmup_steps": 2000}))
  with pytest.raises(ValueError, match=r"config.optimizer.name='lamb'; known"):
    optimizer.make_optimizer(_config(**{"optimizer.name": "lamb"}))


def _one_step(config, params, grads):
  tx, _ = optimizer.make_optimizer(config)
  updates, _ = tx.update(grads, tx.init(params), params)
  return jax.tree.map(lambda p, u: p + u, params, updates)


def test_sgd_momentum_step_and_l2_weight_decay_on_kernels_only():
  params = {"dense": {"kernel": jnp.ones(3), "bias": jnp.ones(3)}}
  grads = jax.tree.map(jnp.ones_like, params)
  config = _config(**{"lr": 0.1, "schedule.decay": "constant", "optimizer.weight_decay": 0.5,
                      "optimizer.grad_clip_norm": 0.0})
  new = _one_step(config, params, grads)
  np.testing.assert_allclose(new["dense"]["kernel"], 1 - 0.1 * (1 + 0.5 * 1))
  np.testing.assert_allclose(new["dense"]["bias"], 1 - 0.1 * 1)


def test_gradient_clipping_by_global_norm():
  params = {"w": jnp.zeros(4)}
  grads = {"w": jnp.full(4, 10.0)}  # Global norm 20.
  config = _config(**{"lr": 1.0, "schedule.decay": "constant", "optimizer.momentum": 0.0,
                      "optimizer.grad_clip_norm": 2.0})
  np.testing.assert_allclose(_one_step(config, params, grads)["w"], -1.0, rtol=1e-6)


def test_adamw_decay_is_decoupled_from_the_gradient_scaling():
  params = {"dense": {"kernel": jnp.full(2, 2.0)}}
  grads = {"dense": {"kernel": jnp.array([1e-3, 1e3])}}  # Adam normalises both to a unit step.
  base = {"lr": 0.01, "schedule.decay": "constant", "optimizer.weight_decay": 0.1,
          "optimizer.grad_clip_norm": 0.0}
  adamw = _one_step(_config(**base, **{"optimizer.name": "adamw"}), params, grads)
  np.testing.assert_allclose(adamw["dense"]["kernel"], 2.0 - 0.01 * (1.0 + 0.1 * 2.0), rtol=1e-5)
  # Adam with an L2 term normalises the decay away with the gradient: a unit step.
  adam_l2 = _one_step(_config(**base, **{"optimizer.name": "adam"}), params, grads)
  np.testing.assert_allclose(adam_l2["dense"]["kernel"], 2.0 - 0.01, rtol=1e-5)


def test_losses():
  logits = jnp.array([[2.0, 0.0, -1.0]])
  labels = jnp.array([[0.0, 1.0, 0.0]])
  expected = -jax.nn.log_softmax(logits)[0, 1]
  np.testing.assert_allclose(losses.get("softmax_xent")(logits, labels), [expected], rtol=1e-6)
  sig = losses.get("sigmoid_xent")(logits, labels)
  manual = -(jnp.log(1 - jax.nn.sigmoid(2.0)) + jnp.log(jax.nn.sigmoid(0.0))
             + jnp.log(1 - jax.nn.sigmoid(-1.0)))
  np.testing.assert_allclose(sig, [manual], rtol=1e-5)
  with pytest.raises(ValueError, match="config.loss='hinge'"):
    losses.get("hinge")


def test_ema_follows_the_weights_at_its_decay():
  init, target = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}
  state = init
  for _ in range(100):
    state = ema.update(state, target, 0.9)
  np.testing.assert_allclose(state["w"], 1 - 0.9 ** 100, rtol=1e-5)
  high = ema.update(init, target, 0.9999999)
  np.testing.assert_allclose(high["w"], 1e-7, rtol=1e-6)  # Not 1.19e-7, as float32(0.9999999) gives.
  with pytest.raises(ValueError, match=r"config.ema.low=1.0"):
    ema.decays(ml_collections.ConfigDict(dict(low=1.0, high=0.5)))


def test_frozen_leaves_get_no_gradient_no_update_and_no_state():
  """config.trainable=('head/.*',), a linear probe: only the head moves, and only it has state."""
  params = {"head": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
            "body": {"kernel": jnp.ones((2, 2))}}
  config = _config(**{"trainable": ("head/.*",), "lr": 0.1, "schedule.decay": "constant",
                      "optimizer.name": "adam"})
  mask = trainable.mask_fn(config)
  assert trainable.count(params, mask) == (9, 13)
  loss = lambda p: jnp.sum(p["body"]["kernel"] @ p["head"]["kernel"] + p["head"]["bias"])
  grads = jax.grad(lambda p: loss(trainable.stop_frozen_gradients(p, mask)))(params)
  assert not np.any(grads["body"]["kernel"]) and np.all(grads["head"]["kernel"] != 0)
  tx, _ = optimizer.make_optimizer(config)
  state = tx.init(params)
  sizes = sum(x.size for x in jax.tree.leaves(state) if x.ndim)
  assert sizes == 2 * 9  # Adam's two moments of the 9 head parameters, none of the body's.
  updates, _ = tx.update(grads, state, params)
  assert not np.any(updates["body"]["kernel"]) and np.all(updates["head"]["bias"] != 0)
  assert trainable.mask_fn(_config()) is None  # Everything trains: no mask, no stop_gradient.


@pytest.mark.parametrize("patterns,message", [
    ((), r"config.trainable is empty"),
    (("head/(",), r"config.trainable has the invalid regex 'head/\('"),
])
def test_bad_trainable_patterns_are_errors(patterns, message):
  with pytest.raises(ValueError, match=message):
    trainable.mask_fn(_config(trainable=patterns))
