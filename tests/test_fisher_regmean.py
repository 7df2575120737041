"""Fisher merging and RegMean: numpy oracles, scores from the statistics pass, memory, meshes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from soups import fisher
from soups import regmean
from soups import restore as restore_lib
from tests.soup_helpers import npz_ingredients
from tests.soup_helpers import random_tree
from tests.soup_helpers import soup_abstract
from train import accuracy
from train import losses
from train import sharding
from train import trees
from train import vit

NUM_CLASSES = 5
IMAGE = (14, 14, 1)


def _mesh(devices=8):
  return sharding.make_mesh((("data", -1),), devices=jax.devices()[:devices])


def _host_batches(seed, valid=(16, 11), rows=16, image=IMAGE):
  """Random images and one-hot labels, `valid[i]` real rows of `rows` in batch i."""
  rng = np.random.default_rng(seed)
  return [{"image": rng.normal(size=(rows, *image)).astype(np.float32),
           "labels": np.eye(NUM_CLASSES, dtype=np.float32)[rng.integers(NUM_CLASSES, size=rows)],
           "mask": np.arange(rows) < n} for n in valid]


def _on_mesh(host_batches, mesh):
  """The held-out split as a recipe reads it: a callable giving global batches on `mesh`."""
  placed = [sharding.to_global(b, sharding.batch_sharding(mesh)) for b in host_batches]
  return lambda: iter(placed)


def _restore(abstract):
  return lambda ingredient: restore_lib.restore(ingredient, abstract)


def _vit():
  config = ml_collections.ConfigDict(
      {"variant": "mu/7", "pool_type": "gap", "dropout": 0.0, "dtype": "float32", "ssf": False})
  return vit.build_model(config, NUM_CLASSES)


def _perturbed(model, n, image=IMAGE, scale=0.05):
  """`n` flat trees: one random start (LayerNorm scales near 1, kernels ~ 1/sqrt(fan-in)),
  each leaf moved by its own noise."""
  shapes = trees.flatten(jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, *image))))["params"])
  rng = np.random.default_rng(1)
  start = {k: (k.endswith("scale") + rng.normal(size=a.shape)
               / np.sqrt(np.prod(a.shape[:-1]) if len(a.shape) > 1 else 10))
           for k, a in shapes.items()}
  return [{k: (v + scale * rng.normal(size=v.shape)).astype(np.float32) for k, v in start.items()}
          for _ in range(n)]


def _plain_scores(model, params, batches, loss_fn=losses.softmax_xent):
  """The ingredient's evaluation as `SplitAccuracy` does it: a batched forward per batch."""
  step = jax.jit(lambda p, b: accuracy.masked_sums(model.apply({"params": p}, b["image"]),
                                                   b["labels"], b["mask"], loss_fn))
  sums = [jax.device_get(step(params, b)) for b in batches()]
  count = sum(float(s["count"]) for s in sums)
  return (sum(float(s["correct"]) for s in sums) / count,
          sum(float(s["loss"]) for s in sums) / count)


def _flat_host(tree):
  return trees.flatten(sharding.to_host(tree))


# Fisher merging.


def test_fisher_weighted_mean_of_given_fishers_is_the_numpy_formula(tmp_path):
  flat_trees = [random_tree(i) for i in range(3)]
  ingredients = npz_ingredients(tmp_path, flat_trees)
  abstract = soup_abstract(ingredients, _mesh())
  rng = np.random.default_rng(7)
  fishers = [{k: rng.exponential(size=v.shape).astype(np.float32) for k, v in t.items()}
             for t in flat_trees]
  for f in fishers:
    f["head/bias"][:] = 0  # No ingredient's loss moves it: the uniform mean.
  floor = 1e-3
  running = fisher.FisherWeightedSum(abstract, fisher_floor=floor)
  for ingredient, f in zip(ingredients, fishers):
    running.add(trees.unflatten({k: jnp.asarray(v) for k, v in f.items()}),
                restore_lib.restore(ingredient, abstract))
  merged = running.mean()
  assert jax.tree.map(lambda x: x.sharding, merged) == jax.tree.map(lambda a: a.sharding, abstract)
  got = _flat_host(merged)
  for key in flat_trees[0]:
    weights = [f[key].astype(np.float64) + floor for f in fishers]
    expected = sum(w * t[key] for w, t in zip(weights, flat_trees)) / sum(weights)
    np.testing.assert_allclose(got[key], expected, rtol=1e-6, atol=1e-7, err_msg=key)
  np.testing.assert_allclose(got["head/bias"], np.mean([t["head/bias"] for t in flat_trees], 0),
                             rtol=1e-6)


class _SoftmaxRegression(nn.Module):
  @nn.compact
  def __call__(self, images):
    return nn.Dense(NUM_CLASSES, name="head")(images.reshape(images.shape[0], -1))


def test_fisher_of_a_softmax_regression_is_the_mean_squared_per_example_gradient():
  """d(-log softmax(xW + b)_y)/dW = x (p - y)ᵀ, /db = p - y, squared, mean over real rows;
  with chunks of 3 rows that do not divide the batches of 16."""
  model, mesh = _SoftmaxRegression(), _mesh()
  image = (4, 4, 2)
  rng = np.random.default_rng(3)
  params = {"head": {"kernel": rng.normal(size=(32, NUM_CLASSES)).astype(np.float32),
                     "bias": rng.normal(size=NUM_CLASSES).astype(np.float32)}}
  abstract = sharding.placed_abstract_tree(mesh, params, restore_lib.SOUP_SHARDING)
  host = _host_batches(4, image=image)
  placed = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), params, abstract)
  got, scores = fisher.heldout_fisher(model, losses.softmax_xent, placed, _on_mesh(host, mesh),
                                      abstract, examples_per_step=3)
  x = np.concatenate([b["image"].reshape(16, -1) for b in host]).astype(np.float64)
  y = np.concatenate([b["labels"] for b in host])
  mask = np.concatenate([b["mask"] for b in host])
  logits = x @ params["head"]["kernel"] + params["head"]["bias"]
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  kernel_grads = x[:, :, None] * (p - y)[:, None, :]
  expected = {"head/kernel": (kernel_grads[mask] ** 2).mean(0),
              "head/bias": ((p - y)[mask] ** 2).mean(0)}
  got = _flat_host(got)
  for key, value in expected.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-7, err_msg=key)
  assert scores["num_examples"] == 27
  correct = np.take_along_axis(y, logits.argmax(1)[:, None], 1)[:, 0] > 0
  assert scores["heldout_acc"] == pytest.approx(correct[mask].mean())


def _vit_ingredients(tmp_path, batches_seed):
  """Three perturbed tiny ViTs as .npz ingredients: (model, their trees, ingredients, the soup's
  target on 8 devices, held-out batches on the mesh)."""
  model, mesh = _vit(), _mesh()
  flat_trees = _perturbed(model, 3)
  ingredients = npz_ingredients(tmp_path, flat_trees)
  abstract = soup_abstract(ingredients, mesh)
  return model, flat_trees, ingredients, abstract, _on_mesh(_host_batches(batches_seed), mesh)


@pytest.mark.slow
def test_fisher_merge_is_the_weighted_mean_of_each_ingredients_fisher_and_scores_it(tmp_path):
  """The streamed merge equals the formula on each ingredient's held-out Fisher, and the
  accuracy it records is the ingredient's plain evaluation."""
  model, flat_trees, ingredients, abstract, batches = _vit_ingredients(tmp_path, 0)
  merged, record = fisher.fisher_merge(ingredients, _restore(abstract), abstract, model,
                                       losses.softmax_xent, batches, fisher_floor=1e-4,
                                       examples_per_step=16)
  fishers = []
  for ingredient, scores in zip(ingredients, record["ingredients"]):
    params = restore_lib.restore(ingredient, abstract)
    acc, loss = _plain_scores(model, params, batches)
    assert scores["name"] == ingredient.name and scores["num_examples"] == 27
    assert scores["heldout_acc"] == acc
    assert scores["heldout_loss"] == pytest.approx(loss, rel=1e-5)
    f, _ = fisher.heldout_fisher(model, losses.softmax_xent, params, batches, abstract,
                                 examples_per_step=16)
    fishers.append(_flat_host(f))
  assert any(np.any(f["head/kernel"] > 0) for f in fishers)
  got = _flat_host(merged)
  for key in flat_trees[0]:
    weights = [f[key].astype(np.float64) + 1e-4 for f in fishers]
    expected = sum(w * t[key] for w, t in zip(weights, flat_trees)) / sum(weights)
    np.testing.assert_allclose(got[key], expected, rtol=1e-5, atol=1e-6, err_msg=key)
  assert {k: record[k] for k in ("fisher_floor", "examples_per_step", "checkpoint_reads",
                                 "heldout_passes", "heldout_backward_passes")} == {
      "fisher_floor": 1e-4, "examples_per_step": 16, "checkpoint_reads": 3, "heldout_passes": 3,
      "heldout_backward_passes": 3}


# RegMean.


class _Tiny(nn.Module):
  """Tokens -> DenseGeneral to (2, 3) -> relu -> DenseGeneral over both -> mean -> LN -> head."""

  @nn.compact
  def __call__(self, images):
    x = images.reshape(images.shape[0], -1, images.shape[-1])
    x = nn.relu(nn.DenseGeneral((2, 3), name="up")(x))
    x = nn.DenseGeneral(4, axis=(-2, -1), name="down")(x)
    x = nn.LayerNorm(name="norm")(x.mean(axis=1))
    return nn.Dense(NUM_CLASSES, name="head")(x)


TINY_IMAGE = (3, 3, 4)


def _tiny_trees(n):
  shapes = {"up/kernel": (4, 2, 3), "up/bias": (2, 3), "down/kernel": (2, 3, 4),
            "down/bias": (4,), "norm/scale": (4,), "norm/bias": (4,),
            "head/kernel": (4, NUM_CLASSES), "head/bias": (NUM_CLASSES,)}
  return [random_tree(10 + i, shapes) for i in range(n)]


def _tiny_grams(t, host):
  """numpy: each Dense layer's masked input Gram for the flat tree `t`."""
  x = np.concatenate([b["image"].reshape(16, 9, 4) for b in host]).astype(np.float64)
  mask = np.concatenate([b["mask"] for b in host])[:, None]
  up = np.maximum(x @ t["up/kernel"].reshape(4, 6) + t["up/bias"].reshape(6), 0)
  down = (up @ t["down/kernel"].reshape(6, 4) + t["down/bias"]).mean(1)
  normed = (down - down.mean(1, keepdims=True)) / np.sqrt(down.var(1, keepdims=True) + 1e-6)
  head_in = normed * t["norm/scale"] + t["norm/bias"]
  gram = lambda rows, m: (rows * m).reshape(-1, rows.shape[-1]).T @ rows.reshape(
      -1, rows.shape[-1])
  return {"up/kernel": gram(x, mask[..., None]), "down/kernel": gram(up, mask[..., None]),
          "head/kernel": gram(head_in, mask)}


def test_regmean_closed_form_on_dense_layers_is_numpy(tmp_path):
  """W = (Σ G̃_i)⁻¹ Σ G̃_i W_i with each ingredient's own layer inputs (DenseGeneral kernels
  flattened to matrices); biases and the LayerNorm are the uniform mean."""
  model, mesh, alpha = _Tiny(), _mesh(), 0.7
  flat_trees = _tiny_trees(3)
  ingredients = npz_ingredients(tmp_path, flat_trees)
  abstract = soup_abstract(ingredients, mesh)
  host = _host_batches(5, image=TINY_IMAGE)
  merged, record = regmean.regmean(ingredients, _restore(abstract), abstract, model,
                                   losses.softmax_xent, _on_mesh(host, mesh), alpha=alpha)
  assert record["merged_kernels"] == ["down/kernel", "head/kernel", "up/kernel"]
  assert record["input_dims_without_inputs"] == {}
  assert (record["checkpoint_reads"], record["heldout_passes"]) == (3, 3)
  got = _flat_host(merged)
  grams = [_tiny_grams(t, host) for t in flat_trees]
  for key in record["merged_kernels"]:
    reg = [alpha * g[key] + (1 - alpha) * np.diag(np.diag(g[key])) for g in grams]
    kernels = [t[key].reshape(reg[0].shape[0], -1) for t in flat_trees]
    expected = np.linalg.solve(sum(reg), sum(r @ k for r, k in zip(reg, kernels)))
    np.testing.assert_allclose(got[key], expected.reshape(got[key].shape), rtol=1e-5,
                               atol=1e-6, err_msg=key)
    uniform = np.mean([t[key] for t in flat_trees], 0)
    # `up` sees the same images in every ingredient: equal Grams, the uniform mean.
    assert np.allclose(got[key], uniform, rtol=1e-4, atol=1e-5) == (key == "up/kernel"), key
  for key in ("up/bias", "down/bias", "norm/scale", "norm/bias", "head/bias"):
    np.testing.assert_allclose(got[key], np.mean([t[key] for t in flat_trees], 0), rtol=1e-6,
                               err_msg=key)


def test_regmean_input_dims_no_example_reaches_are_the_uniform_mean(tmp_path):
  model, mesh = _Tiny(), _mesh()
  flat_trees = _tiny_trees(2)
  ingredients = npz_ingredients(tmp_path, flat_trees)
  abstract = soup_abstract(ingredients, mesh)
  host = _host_batches(6, image=TINY_IMAGE)
  for b in host:
    b["image"][..., 1] = 0  # Input channel 1 of `up` is never reached.
  merged, record = regmean.regmean(ingredients, _restore(abstract), abstract, model,
                                   losses.softmax_xent, _on_mesh(host, mesh))
  assert record["input_dims_without_inputs"] == {"up/kernel": 1}
  got = _flat_host(merged)["up/kernel"]
  np.testing.assert_allclose(got[1], np.mean([t["up/kernel"][1] for t in flat_trees], 0),
                             rtol=1e-6)
  assert np.all(np.isfinite(got))


@pytest.mark.slow
def test_regmean_on_the_vit_merges_every_dense_kernel_and_means_the_rest(tmp_path):
  model, flat_trees, ingredients, abstract, batches = _vit_ingredients(tmp_path, 1)
  merged, record = regmean.regmean(ingredients, _restore(abstract), abstract, model,
                                   losses.softmax_xent, batches)
  block = "Transformer/encoderblock_0"
  attention = f"{block}/MultiHeadDotProductAttention_0"
  assert record["merged_kernels"] == sorted(
      [f"{attention}/{name}/kernel" for name in ("query", "key", "value", "out")]
      + [f"{block}/MlpBlock_0/Dense_{i}/kernel" for i in (0, 1)] + ["head/kernel"])
  got = _flat_host(merged)
  for key in flat_trees[0]:
    uniform = np.mean([t[key] for t in flat_trees], 0)
    if key in record["merged_kernels"]:
      assert not np.allclose(got[key], uniform, rtol=1e-3), key
    else:
      np.testing.assert_allclose(got[key], uniform, rtol=1e-6, atol=1e-7, err_msg=key)
  for ingredient, scores in zip(ingredients, record["ingredients"]):
    acc, loss = _plain_scores(model, restore_lib.restore(ingredient, abstract), batches)
    assert scores["heldout_acc"] == acc
    assert scores["heldout_loss"] == pytest.approx(loss, rel=1e-5)


# Both recipes: knobs, memory, meshes.


def test_knobs_out_of_range_are_clear_errors(tmp_path):
  ingredients = npz_ingredients(tmp_path, _tiny_trees(1))
  abstract = soup_abstract(ingredients, _mesh())
  with pytest.raises(ValueError, match=r"fisher_floor=0: must be positive"):
    fisher.FisherWeightedSum(abstract, fisher_floor=0)
  with pytest.raises(ValueError, match=r"alpha=1.0: must be in \[0, 1\)"):
    regmean.RegMeanSums(abstract, {}, alpha=1.0)
  with pytest.raises(ValueError, match=r"examples_per_step=0: must be at least 1"):
    fisher.heldout_fisher(_Tiny(), losses.softmax_xent, None, None, abstract, 0)


class _Mlp(nn.Module):
  """Dense layers (of 512 and 256 units by default): big kernels, small activations."""
  widths: tuple = (512, 256)

  @nn.compact
  def __call__(self, images):
    x = images.reshape(images.shape[0], -1)
    for i, width in enumerate(self.widths):
      x = nn.relu(nn.Dense(width, name=f"Dense_{i}")(x))
    return nn.Dense(NUM_CLASSES, name="head")(x)


MLP_IMAGE = (16, 16, 1)


def _bytes(tree):
  return sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def _per_device(memory):
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes
          - memory.alias_size_in_bytes + memory.temp_size_in_bytes)


def test_per_ingredient_steps_hold_a_few_models_over_the_devices():
  """XLA's memory of each per-ingredient step: the sums updated in place, per-example
  gradients and Grams sharded, one layer gathered at a time; nothing of size N."""
  model, mesh = _Mlp(), _mesh()
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *MLP_IMAGE))))
  abstract = sharding.placed_abstract_tree(mesh, shapes["params"], restore_lib.SOUP_SHARDING)
  share = _bytes(abstract) / mesh.size
  memory = fisher.FisherWeightedSum(abstract).add_memory_analysis(abstract)
  # The two sums (in place), the Fisher and the ingredient.
  assert 3.9 * share <= _per_device(memory) <= 4.5 * share, (_per_device(memory), share)
  assert memory.alias_size_in_bytes >= 1.99 * share
  batch = _host_batches(0, image=MLP_IMAGE)[0]
  batch = sharding.abstract_tree(
      batch, jax.tree.map(lambda _: sharding.batch_sharding(mesh), batch))
  memory = fisher.fisher_step_memory_analysis(model, losses.softmax_xent, abstract, batch,
                                              examples_per_step=4)
  # The ingredient, the Fisher sum (in place) and at most 4 per-example gradients, sharded.
  assert 2 * share <= _per_device(memory) <= (2 + 4) * share, (_per_device(memory), share)
  grams = regmean.gram_abstract(model, abstract, batch)
  gram_share = _bytes(grams) / mesh.size
  memory = regmean.gram_step_memory_analysis(model, losses.softmax_xent, abstract, grams, batch)
  # The ingredient, the Grams (in place), and a device's partial sum of one layer's Gram.
  largest = max(_bytes(gram) for gram in grams.values())
  assert share + gram_share <= _per_device(memory) <= share + gram_share + largest
  assert memory.alias_size_in_bytes >= 0.99 * gram_share
  sums = regmean.RegMeanSums(abstract, grams)
  for path in sums.kernels:
    gram, kernel = _bytes(grams[path]), _bytes(sums.kernels_abstract[path])
    memory = sums.add_memory_analysis(path)
    # Both sums (in place), the Gram and the kernel, over the devices; one of them gathered.
    floor = 2 * (gram + kernel) / mesh.size
    assert floor <= _per_device(memory) <= floor + 1.5 * max(gram, kernel), path
    assert memory.alias_size_in_bytes >= (gram + kernel) / mesh.size


@pytest.mark.slow
def test_live_arrays_when_each_ingredient_is_read_do_not_grow_with_n(tmp_path):
  """Bytes of live device arrays whenever a read starts (beyond those before the merge),
  for N = 2 and N = 4: at most the recipe's sums, its statistics and one ingredient."""
  model, mesh = _Mlp(widths=(64,)), _mesh()
  batches = _on_mesh(_host_batches(2, image=MLP_IMAGE), mesh)
  for n in (2, 4):
    ingredients = npz_ingredients(tmp_path / str(n), _perturbed(model, n, MLP_IMAGE))
    abstract = soup_abstract(ingredients, mesh)
    model_bytes = _bytes(abstract)
    grams = regmean.gram_abstract(model, abstract, next(batches()))
    kernel_bytes = sum(_bytes(trees.flatten(abstract)[path]) for path in grams)
    budgets = {  # The two sums, the Fisher, the ingredient; for RegMean, the Grams and their
        # sums, the product sums, the uniform sum and the ingredient.
        "fisher": 4 * model_bytes,
        "regmean": 2 * _bytes(grams) + kernel_bytes + 2 * model_bytes}
    for name, recipe in (("fisher", fisher.fisher_merge), ("regmean", regmean.regmean)):
      at_read = []

      def restore(ingredient, abstract=abstract, at_read=at_read):
        at_read.append(sum(x.nbytes for x in jax.live_arrays()))
        return restore_lib.restore(ingredient, abstract)

      before = sum(x.nbytes for x in jax.live_arrays())
      recipe(ingredients, restore, abstract, model, losses.softmax_xent, batches)
      assert len(at_read) == n
      assert max(at_read) - before <= budgets[name] + 1024, (name, n, at_read, budgets)


@pytest.mark.slow
def test_fisher_merge_on_one_and_eight_devices_is_the_same(tmp_path):
  """On the ViT: its patch embedding's per-example kernel gradients are where XLA's SPMD
  partitioner went wrong with examples split over the devices (soups/fisher.py)."""
  model = _vit()
  ingredients = npz_ingredients(tmp_path, _perturbed(model, 2))
  merged = []
  for devices in (1, 8):
    mesh = _mesh(devices)
    abstract = soup_abstract(ingredients, mesh)
    params, _ = fisher.fisher_merge(ingredients, _restore(abstract), abstract, model,
                                    losses.softmax_xent, _on_mesh(_host_batches(3), mesh),
                                    examples_per_step=16)
    merged.append(_flat_host(params))
  for key, value in merged[0].items():
    np.testing.assert_allclose(merged[1][key], value, rtol=1e-6, atol=1e-7, err_msg=key)


def test_regmean_on_one_and_eight_devices_is_the_same(tmp_path):
  model = _Tiny()
  ingredients = npz_ingredients(tmp_path, _tiny_trees(3))
  merged = []
  for devices in (1, 8):
    mesh = _mesh(devices)
    abstract = soup_abstract(ingredients, mesh)
    params, record = regmean.regmean(ingredients, _restore(abstract), abstract, model,
                                     losses.softmax_xent,
                                     _on_mesh(_host_batches(3, image=TINY_IMAGE), mesh))
    merged.append(_flat_host(params))
  # The Grams agree to float32 rounding (summed in another order on 8 devices); the solve
  # magnifies that by their condition number.
  for key, value in merged[0].items():
    rtol = 1e-5 if key in record["merged_kernels"] else 1e-6
    np.testing.assert_allclose(merged[1][key], value, rtol=rtol, atol=1e-7, err_msg=key)
