"""The learned soup in bounded memory (soups/learned.fit_bounded): exact block gradients, the
same fit as the stacked mode, memory flat in the number of ingredients, 1 vs 8 devices."""

import types

import flax.linen as nn
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from soups import learned
from soups import restore as restore_lib
from tests.soup_helpers import npz_ingredients
from tests.soup_helpers import soup_abstract
from train import losses
from train import sharding
from train import trees

CLASSES = 4


class Classifier(nn.Module):
  hidden: int = 16

  @nn.compact
  def __call__(self, x):
    return nn.Dense(CLASSES)(nn.relu(nn.Dense(self.hidden)(x)))


def _data(seed=0, examples=240, batch=64, features=8):
  """Linearly separable classes (a random teacher), padded to whole batches (mask 0)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(examples, features)).astype(np.float32)
  labels = np.eye(CLASSES, dtype=np.float32)[np.argmax(x @ rng.normal(size=(features, CLASSES)),
                                                       axis=1)]
  pad = -examples % batch
  mask = np.concatenate([np.ones(examples), np.zeros(pad)]).astype(np.float32)
  x, labels = (np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for a in (x, labels))
  return [{"image": x[i:i + batch], "labels": labels[i:i + batch], "mask": mask[i:i + batch]}
          for i in range(0, len(x), batch)]


def _batches(data, mesh):
  """The `batches` callable of the soup step: the global batches, split over `mesh`."""
  placed = jax.device_put(data, sharding.batch_sharding(mesh))
  return lambda: iter(placed)


def _trained(model, data, steps=300):
  """A flat {path: array} classifier fitted to `data`: the shared start of the ingredients."""
  batch = {k: np.concatenate([b[k] for b in data]) for k in data[0]}
  params = model.init(jax.random.key(0), batch["image"][:1])["params"]
  tx = optax.adam(0.03)

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: learned.mean_loss(model, losses.softmax_xent, p, batch))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return trees.flatten(jax.device_get(params))


def _ingredients(base, n, noise=0.3):
  """n - 1 noisy copies of `base`, then a bad one: base with its head's classes rotated."""
  good = [{k: (v + noise * np.random.default_rng(i).normal(size=v.shape)).astype(np.float32)
           for k, v in base.items()} for i in range(n - 1)]
  bad = {**base, **{k: np.roll(base[k], 1, axis=-1) for k in ("Dense_1/kernel", "Dense_1/bias")}}
  return good + [bad]


def _accuracy(model, params, data):
  flat = jax.device_get(params)
  correct = total = 0
  for b in data:
    hits = np.argmax(model.apply({"params": flat}, b["image"]), -1) == np.argmax(b["labels"], -1)
    correct, total = correct + float(np.sum(hits * b["mask"])), total + float(b["mask"].sum())
  return correct / total


def _soup_of(flat_trees, weights):
  """sum_i w_i θ_i in float64 numpy; `weights` a vector or {'/'-path: vector}."""
  return {k: sum(np.float64(w) * t[k] for w, t in zip(
      weights[k] if isinstance(weights, dict) else weights, flat_trees)) for k in flat_trees[0]}


@pytest.fixture(scope="module")
def problem():
  model, data = Classifier(), _data()
  return model, data, _ingredients(_trained(model, data), n=5)


def _fit_bounded(problem, tmp_path, mesh, mode="global", block_size=2, epochs=3, at_read=None):
  """fit_bounded of the `problem`'s ingredients, read from .npz files; when a read starts, the
  number of model-sized arrays alive is appended to `at_read`."""
  model, data, flat_trees = problem
  ingredients = npz_ingredients(tmp_path, flat_trees)
  abstract = soup_abstract(ingredients, mesh)
  kernel = abstract["Dense_0"]["kernel"]
  models_alive = lambda: sum(x.shape == kernel.shape for x in jax.live_arrays())
  baseline = models_alive()

  def restore(ingredient):
    if at_read is not None:
      at_read.append(models_alive() - baseline)
    return restore_lib.restore(ingredient, abstract)

  return learned.fit_bounded(
      model, ingredients, restore, abstract, mode, _batches(data, mesh), losses.softmax_xent,
      block_size, epochs=epochs, learning_rate=0.1, seed=3)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _in_memory(flat_trees, mesh):
  """(abstract, restore, ingredients) for trees held in memory, placed as the soup step places."""
  shapes = trees.unflatten({k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                            for k, v in flat_trees[0].items()})
  abstract = sharding.placed_abstract_tree(mesh, shapes, restore_lib.SOUP_SHARDING)
  restore = lambda i: jax.tree.map(lambda x, a: jax.device_put(x, a.sharding),
                                   trees.unflatten(flat_trees[i]), abstract)
  return abstract, restore, list(range(len(flat_trees)))


@pytest.mark.parametrize("mode", learned.MODES)
@pytest.mark.slow
def test_block_gradient_and_step_are_the_stacked_modes_exactly(problem, mode):
  """From random logits, the block formula w_i <g, θ_i - S> is jax.grad of the stacked loss
  (all ingredients as one block, and a block of two); one step moves the block's logits as
  Adam on that gradient does, leaves the others, and the soup it carries is the new mix."""
  model, data, flat_trees = problem
  mesh = sharding.make_mesh((("data", -1),))
  abstract, restore, ingredients = _in_memory(flat_trees[:4], mesh)
  stacked = learned.stack(ingredients, restore, abstract)
  logits = jax.tree.map(lambda a: jax.random.normal(jax.random.key(a.size), a.shape) * 0.5,
                        learned.init_logits(stacked, mode))
  batch = next(_batches(data, mesh)())
  steps = learned.BlockSteps(model, losses.softmax_xent, abstract, learning_rate=0.1)
  stacked_grad = jax.jit(jax.grad(
      lambda a: learned.stacked_loss(model, losses.softmax_xent, stacked, a, batch)))
  expected = stacked_grad(logits)
  updates, _ = steps.tx.update(expected, steps.tx.init(logits), logits)
  adam = optax.apply_updates(logits, updates)
  soup_shardings = jax.tree.map(lambda a: a.sharding, abstract)
  mix = jax.jit(lambda a: jax.tree.map(lambda x: x.astype(np.float32), learned.mix(stacked, a)),
                out_shardings=soup_shardings)
  soup = mix(logits)
  soup_grad = jax.jit(jax.grad(
      lambda s: learned.mean_loss(model, losses.softmax_xent, s, batch)))(soup)
  for idx in (np.array([2, 0, 3, 1]), np.array([3, 1])):
    block = tuple(restore(i) for i in idx)
    got = jax.jit(learned.block_gradient)(soup, soup_grad, block, idx, logits)
    for g, e in zip(_leaves(got), _leaves(expected)):
      np.testing.assert_allclose(g, e[idx], rtol=2e-5, atol=1e-8)

    state = jax.vmap(steps.tx.init)(logits)
    new, _, new_soup, _ = steps.step(logits, state, mix(logits), block, idx, batch)
    rest = np.setdiff1d(np.arange(4), idx)
    for n, a, old in zip(_leaves(new), _leaves(adam), _leaves(logits)):
      np.testing.assert_allclose(n[idx], a[idx], rtol=1e-5)
      np.testing.assert_array_equal(n[rest], old[rest])
    for got_leaf, mixed in zip(_leaves(new_soup), _leaves(mix(new))):
      np.testing.assert_allclose(got_leaf, mixed, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_one_block_of_all_ingredients_fits_as_the_stacked_mode(problem, mode="per_layer"):
  """block_size = N: the same Adam steps as `fit` on every batch, so the same logits (per layer:
  the mode with the most to get wrong; the first step of both is checked above)."""
  model, data, flat_trees = problem
  mesh = sharding.make_mesh((("data", -1),))
  abstract, restore, ingredients = _in_memory(flat_trees, mesh)
  batches = _batches(data, mesh)
  _, stacked_logits, stacked_losses = learned.fit(
      model, learned.stack(ingredients, restore, abstract), mode,
      types.SimpleNamespace(global_batches=batches), losses.softmax_xent, epochs=2)
  _, logits, epoch_losses, record = learned.fit_bounded(
      model, ingredients, restore, abstract, mode, batches, losses.softmax_xent,
      block_size=len(ingredients), epochs=2, seed=1)
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-6),
               logits, stacked_logits)
  np.testing.assert_allclose(epoch_losses, stacked_losses, rtol=1e-5)
  assert record["blocks_per_epoch"] == 1 and record["heldout_passes"] == 2


@pytest.fixture(scope="module")
def fitted(problem, tmp_path_factory):
  """fit_bounded on 8 devices: 5 ingredients in blocks of 2 (the last block of one), 3 epochs;
  and the number of models alive when each read started."""
  at_read = []
  return _fit_bounded(problem, tmp_path_factory.mktemp("bounded8"),
                      sharding.make_mesh((("data", -1),)), at_read=at_read), at_read


def test_bounded_fit_turns_away_from_the_bad_ingredient(problem, fitted):
  """Blocks of 2 of 5 ingredients, the last (a rotated head) bad: it gets the least weight, the
  held-out loss falls, the accuracy is the stacked mode's, and the params are the recorded
  weights' mix."""
  model, data, flat_trees = problem
  (params, logits, epoch_losses, record), at_read = fitted
  # A read starts while at most the block, the running soup and its rebuilding sum are alive.
  assert len(at_read) == 5 * 4 and max(at_read) == 2 + 2, at_read
  weights = learned.mixing_weights(logits)
  assert np.argmin(weights) == 4 and weights[4] < 1 / 5 - 0.05, weights
  assert len(epoch_losses) == 3 and epoch_losses[-1] < epoch_losses[0] - 0.05, epoch_losses
  mesh = sharding.make_mesh((("data", -1),))
  abstract, restore, ingredients = _in_memory(flat_trees, mesh)
  stacked_params, _, _ = learned.fit(
      model, learned.stack(ingredients, restore, abstract), "global",
      types.SimpleNamespace(global_batches=_batches(data, mesh)), losses.softmax_xent, epochs=3)
  uniform = _soup_of(flat_trees, np.full(5, 0.2))
  accuracy = _accuracy(model, params, data)
  assert accuracy >= _accuracy(model, trees.unflatten(uniform), data)
  assert abs(accuracy - _accuracy(model, stacked_params, data)) <= 0.02
  for key, value in _soup_of(flat_trees, weights).items():
    np.testing.assert_allclose(trees.flatten(jax.device_get(params))[key], value,
                               rtol=1e-5, atol=1e-6, err_msg=key)
  assert params["Dense_0"]["kernel"].sharding == abstract["Dense_0"]["kernel"].sharding
  assert record == {"mode": "global", "block_size": 2, "epochs": 3, "learning_rate": 0.1,
                    "seed": 3, "blocks_per_epoch": 3, "checkpoint_reads": 5 * 4,
                    "heldout_passes": 3 * 3, "heldout_backward_passes": 3 * 3}


def test_per_layer_bounded_fit_is_the_mix_of_its_per_tensor_weights(problem, tmp_path):
  _, _, flat_trees = problem
  params, logits, epoch_losses, _ = _fit_bounded(
      problem, tmp_path, sharding.make_mesh((("data", -1),)), mode="per_layer", epochs=2)
  weights = trees.flatten(learned.mixing_weights(logits))
  assert epoch_losses[-1] < epoch_losses[0]
  assert weights["Dense_1/kernel"][4] < 1 / 5  # The rotated head loses weight.
  for key, value in _soup_of(flat_trees, weights).items():
    np.testing.assert_allclose(trees.flatten(jax.device_get(params))[key], value,
                               rtol=1e-5, atol=1e-6, err_msg=key)


def test_one_and_eight_device_bounded_fits_are_equal(problem, fitted, tmp_path):
  (params8, logits8, losses8, _), _ = fitted
  params1, logits1, losses1, _ = _fit_bounded(
      problem, tmp_path, sharding.make_mesh((("data", -1),), devices=jax.devices()[:1]))
  np.testing.assert_allclose(logits1, logits8, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(losses1, losses8, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               jax.device_get(params1), jax.device_get(params8))


def _per_device_bytes(compiled):
  memory = compiled.memory_analysis()
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes
          - memory.alias_size_in_bytes + memory.temp_size_in_bytes)


def test_bounded_step_memory_is_flat_in_the_number_of_ingredients():
  """XLA's compiled memory per device of one block step (block of 2) is the same for 4 and 12
  ingredients; the stacked mode's loss-and-gradient step grows by a model share per ingredient."""
  model = Classifier(hidden=1024)
  mesh = sharding.make_mesh((("data", -1),))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 128)))["params"])
  abstract = sharding.placed_abstract_tree(mesh, shapes, restore_lib.SOUP_SHARDING)
  share = sum(a.size * 4 for a in jax.tree.leaves(abstract)) / mesh.size
  soup = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, np.float32, sharding=a.sharding),
                      abstract)
  batch_sharding = sharding.batch_sharding(mesh)
  batch = {"image": jax.ShapeDtypeStruct((64, 128), np.float32, sharding=batch_sharding),
           "labels": jax.ShapeDtypeStruct((64, CLASSES), np.float32, sharding=batch_sharding),
           "mask": jax.ShapeDtypeStruct((64,), np.float32, sharding=batch_sharding)}
  steps = learned.BlockSteps(model, losses.softmax_xent, abstract, learning_rate=0.1)
  stacked_step = jax.jit(jax.value_and_grad(
      lambda stacked, logits, batch: learned.stacked_loss(model, losses.softmax_xent, stacked,
                                                          logits, batch), argnums=1))
  bounded, stacked = {}, {}
  for n in (4, 12):
    logits, state = steps.init(n, abstract, "global")
    bounded[n] = _per_device_bytes(steps.step.lower(
        logits, state, soup, (abstract, abstract), np.arange(2), batch).compile())
    stacked_abstract = jax.tree.map(
        lambda a, n=n: jax.ShapeDtypeStruct((n, *a.shape), a.dtype, sharding=NamedSharding(
            mesh, P(None, *a.sharding.spec))), abstract)
    stacked[n] = _per_device_bytes(stacked_step.lower(stacked_abstract, logits, batch).compile())
  print(f"share {share:.0f} B/device; bounded {bounded}; stacked {stacked}")
  assert abs(bounded[12] - bounded[4]) <= 1024, bounded  # Only the logits and Adam state grow.
  assert bounded[4] <= 8 * share, (bounded, share)
  assert stacked[12] - stacked[4] >= 0.9 * 8 * share, (stacked, share)
