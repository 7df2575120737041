"""Task-vector merges (Model Stock, task arithmetic, TIES, DARE) against direct numpy computations."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soups import restore as restore_lib
from soups import task_vectors
from tests.soup_helpers import npz_ingredients
from tests.soup_helpers import random_tree
from tests.soup_helpers import soup_abstract
from train import sharding
from train import trees

N = 4


def _cook(tmp_path, fine, theta0, mesh=None):
  """(ingredients, restore, abstract, θ0 placed) for the flat trees `fine` around `theta0`."""
  ingredients = npz_ingredients(tmp_path, fine)
  abstract = soup_abstract(ingredients, mesh)
  placed = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), trees.unflatten(theta0),
                        abstract)
  return ingredients, lambda i: restore_lib.restore(i, abstract), abstract, placed


def _host(params):
  return trees.flatten(sharding.to_host(params))


def _closeness(flat, target):
  """Minus the squared distance of the flat tree `flat` to `target`."""
  return -sum(float(np.sum((np.float64(v) - target[k]) ** 2)) for k, v in flat.items())


def _distance_to(target):
  """A held-out accuracy stub: how close the params are to `target`."""
  return lambda params: _closeness(_host(params), target)


def _taus(fine, theta0):
  """Each run's τ in float32, computed as the engine does."""
  return [{k: t[k].astype(np.float32) - theta0[k] for k in theta0} for t in fine]


def _assert_close(got, expected, rtol=1e-6, atol=1e-6):
  got = _host(got)
  assert sorted(got) == sorted(expected)
  for k in expected:
    np.testing.assert_allclose(got[k], expected[k], rtol=rtol, atol=atol, err_msg=k)
    assert got[k].dtype == expected[k].dtype, k


def _assert_grid(record, expected, chosen, reads):
  """The record scores every grid point as the stub does on the numpy candidates, and chose `chosen`."""
  assert [{k: v for k, v in p.items() if k != "heldout_acc"} for p in record["grid"]] == \
      [dict(point) for point, _ in expected]
  np.testing.assert_allclose([p["heldout_acc"] for p in record["grid"]],
                             [acc for _, acc in expected], rtol=1e-4, atol=1e-6)
  assert {k: v for k, v in record["chosen"].items() if k != "heldout_acc"} == chosen
  assert record["checkpoint_reads"] == reads
  assert record["heldout_passes"] == len(expected)


def _np_model_stock(fine, theta0):
  """{path: (cos, t, merged)}: the mean pairwise cosine by its definition, in float64."""
  k, out = len(fine), {}
  for key, x0 in theta0.items():
    taus = [np.float64(t[key]) - x0 for t in fine]
    cos = np.mean([0.0 if not (a.any() and b.any()) else
                   np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b))
                   for a, b in itertools.combinations(taus, 2)])
    c = max(cos, 0.0)
    t = k * c / ((k - 1) * c + 1)
    out[key] = cos, t, t * np.mean([np.float64(f[key]) for f in fine], axis=0) + (1 - t) * x0
  return out


@pytest.mark.parametrize("k", [2, 4])
def test_model_stock_is_the_papers_ratio_of_the_pairwise_cosine_per_leaf(tmp_path, k):
  theta0 = random_tree(100)
  fine = [random_tree(i) for i in range(k)]
  frozen = "Transformer/encoder_norm/scale"
  for tree in fine:
    tree[frozen] = theta0[frozen].copy()  # No run changed it: θ0 exactly, t = 0, no NaN.
  fine[1]["head/kernel"] = theta0["head/kernel"].copy()  # One zero update: cos with it is 0.
  if k == 2:  # Opposite updates (cos -1): outside the acute geometry, θ0.
    fine[1]["head/bias"] = 2 * theta0["head/bias"] - fine[0]["head/bias"]
  params, record = task_vectors.model_stock(*_cook(tmp_path, fine, theta0))
  expected = _np_model_stock(fine, theta0)
  assert record["k"] == k and record["checkpoint_reads"] == k and record["heldout_passes"] == 0
  assert sorted(record["per_leaf"]) == sorted(theta0)
  for key, (cos, t, _) in expected.items():
    np.testing.assert_allclose(record["per_leaf"][key]["cos"], cos, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(record["per_leaf"][key]["t"], t, atol=1e-6, err_msg=key)
  assert 0.3 < record["per_leaf"]["embedding/kernel"]["t"] < 1  # A shared -θ0 in every τ.
  assert record["per_leaf"][frozen] == {"cos": 0.0, "t": 0.0}
  _assert_close(params, {key: m.astype(np.float32) for key, (_, _, m) in expected.items()},
                rtol=1e-5)
  np.testing.assert_array_equal(_host(params)[frozen], theta0[frozen])
  if k == 2:
    np.testing.assert_allclose(record["per_leaf"]["head/bias"]["cos"], -1, atol=1e-6)
    np.testing.assert_array_equal(_host(params)["head/bias"], theta0["head/bias"])


def test_model_stock_needs_two_runs(tmp_path):
  with pytest.raises(ValueError, match="at least 2 fine-tuned ingredients, got 1"):
    task_vectors.model_stock(*_cook(tmp_path, [random_tree(0)], random_tree(100)))


def test_task_arithmetic_is_theta0_plus_lambda_sum_of_task_vectors(tmp_path):
  theta0, fine = random_tree(100), [random_tree(i) for i in range(N)]
  taus = _taus(fine, theta0)
  expected = {}
  for lam in (0.2, 0.5, 1.0):
    expected[lam] = {}
    for k, x0 in theta0.items():
      total = np.zeros_like(x0)
      for tau in taus:
        total = total + tau[k]  # float32, in ingredient order, as the engine sums.
      expected[lam][k] = x0 + np.float32(lam) * total
  cooked = _cook(tmp_path, fine, theta0)
  heldout = _distance_to(expected[0.5])
  params, record = task_vectors.task_arithmetic(*cooked, heldout, lambdas=(0.2, 0.5, 1.0))
  _assert_close(params, expected[0.5])
  _assert_grid(record, [({"lambda": lam}, _closeness(e, expected[0.5]))
                        for lam, e in expected.items()], {"lambda": 0.5}, reads=N)
  assert record["lambdas"] == [0.2, 0.5, 1.0]
  _, tied = task_vectors.task_arithmetic(*cooked, lambda p: 0.5, lambdas=(0.2, 0.5, 1.0))
  assert tied["chosen"] == {"lambda": 0.2, "heldout_acc": 0.5}  # Ties: the first grid point.


def _np_trim(tau, density):
  """The m = max(1, round(density * n)) largest |tau|, ties with the m-th kept, the rest 0."""
  kept = max(1, int(np.floor(density * tau.size + 0.5)))
  threshold = np.sort(np.abs(tau).ravel())[::-1][kept - 1]
  return np.where(np.abs(tau) >= threshold, tau, np.float32(0))


def test_ties_trims_with_ties_at_the_threshold_kept():
  tau = jnp.array([3.0, -1.0, 2.0, -2.0, 0.0, 0.5, -0.0, 1e-30])
  expected = np.float32([[3, 0, 0, 0, 0, 0, 0, 0], [3, 0, 2, -2, 0, 0, 0, 0],
                          [3, 0, 2, -2, 0, 0, 0, 0], [3, -1, 2, -2, 0, 0, 0, 0],
                          [3, -1, 2, -2, 0, 0.5, 0, 0], [3, -1, 2, -2, 0, 0.5, 0, 1e-30]])
  for kept, want in zip(range(1, 7), expected):
    np.testing.assert_array_equal(task_vectors._trim(tau, jnp.int32(kept)), want, err_msg=kept)
    np.testing.assert_array_equal(_np_trim(np.asarray(tau), kept / tau.size), want)
  # Seven or eight kept: the zeros tie at the threshold, which changes nothing.
  np.testing.assert_array_equal(task_vectors._trim(tau, jnp.int32(8)), tau)


def test_ties_is_trim_elect_and_disjoint_mean(tmp_path):
  theta0, fine = random_tree(100), [random_tree(i) for i in range(N)]
  # Equal magnitudes in one run: ties at the threshold are kept, more than m entries.
  fine[0]["head/bias"] = theta0["head/bias"] + np.float32([1, -1, 1, 0.5, 0])
  taus = _taus(fine, theta0)
  densities, lambdas = (0.2, 0.5), (0.5, 1.0)
  expected = {}
  for density in densities:
    merged = {}
    for k, x0 in theta0.items():
      trimmed = [_np_trim(tau[k], density) for tau in taus]
      total = np.zeros_like(x0)
      for t in trimmed:
        total = total + t
      sign = np.sign(total)
      agree = [(t != 0) & (np.sign(t) == sign) for t in trimmed]
      count = np.sum(agree, axis=0)
      summed = np.zeros_like(x0)
      for t, a in zip(trimmed, agree):
        summed = summed + np.where(a, t, np.float32(0))
      merged[k] = np.where(count > 0, summed / np.float32(np.maximum(count, 1)), np.float32(0))
      if density == 0.2 and k == "head/bias":
        assert np.count_nonzero(trimmed[0]) == 3  # m = 1, and the two ties.
    for lam in lambdas:
      expected[density, lam] = {k: x0 + np.float32(lam) * merged[k] for k, x0 in theta0.items()}
  heldout = _distance_to(expected[0.2, 1.0])
  params, record = task_vectors.ties(*_cook(tmp_path, fine, theta0), heldout, densities, lambdas)
  _assert_close(params, expected[0.2, 1.0])
  _assert_grid(record, [({"density": d, "lambda": lam}, _closeness(e, expected[0.2, 1.0]))
                        for (d, lam), e in expected.items()],
               {"density": 0.2, "lambda": 1.0}, reads=2 * N * len(densities))
  assert record["densities"] == [0.2, 0.5]


def test_dare_masks_keep_one_minus_p_and_do_not_depend_on_the_mesh():
  masks = {p: np.asarray(task_vectors.dare_keep(7, 0, 0, (200_000,), p)) for p in (0.1, 0.5, 0.9)}
  for p, mask in masks.items():
    assert abs(mask.mean() - (1 - p)) < 0.005, (p, mask.mean())
  assert masks[0.5][masks[0.9]].all()  # One uniform draw: kept at p=0.9 is kept at p=0.5.
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(7), 1), 2)  # Ingredient 1, leaf 2.
  np.testing.assert_array_equal(task_vectors.dare_keep(7, 1, 2, (1000,), 0.5),
                                jax.random.uniform(key, (1000,)) >= 0.5)
  others = [task_vectors.dare_keep(*args, (200_000,), 0.5) for args in
            ((8, 0, 0), (7, 1, 0), (7, 0, 1))]
  for other in others:  # Another seed, ingredient or leaf: another mask.
    assert 0.45 < np.mean(np.asarray(other) == masks[0.5]) < 0.55
  mesh = sharding.make_mesh((("data", -1),))
  sharded = jax.jit(lambda: task_vectors.dare_keep(7, 0, 0, (200_000,), 0.5),
                    out_shardings=sharding.batch_sharding(mesh))()
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_array_equal(sharded, masks[0.5])


@pytest.mark.slow
def test_dare_is_task_arithmetic_of_the_dropped_and_rescaled_task_vectors(tmp_path):
  theta0, fine = random_tree(100), [random_tree(i) for i in range(N)]
  taus = _taus(fine, theta0)
  paths = [trees.path_str(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(trees.unflatten(theta0))[0]]
  drop_rates, lambdas, seed = (0.0, 0.5), (0.3, 0.6), 3
  expected = {}
  for p in drop_rates:
    total, kept = {}, []
    for j, k in enumerate(paths):
      total[k] = np.zeros_like(theta0[k])
      for i, tau in enumerate(taus):
        keep = np.asarray(task_vectors.dare_keep(seed, i, j, tau[k].shape, p))
        kept.append(keep.ravel())
        total[k] = total[k] + np.where(keep, tau[k] * np.float32(1 / (1 - p)), np.float32(0))
    assert abs(np.concatenate(kept).mean() - (1 - p)) < 0.05, p  # 2836 entries.
    for lam in lambdas:
      expected[p, lam] = {k: x0 + np.float32(lam) * total[k] for k, x0 in theta0.items()}
  heldout = _distance_to(expected[0.5, 0.3])
  params, record = task_vectors.dare(*_cook(tmp_path, fine, theta0), heldout, drop_rates, lambdas,
                                     seed=seed)
  _assert_close(params, expected[0.5, 0.3])
  _assert_grid(record, [({"drop_rate": p, "lambda": lam}, _closeness(e, expected[0.5, 0.3]))
                        for (p, lam), e in expected.items()],
               {"drop_rate": 0.5, "lambda": 0.3}, reads=N * len(drop_rates))
  assert record["drop_rates"] == [0.0, 0.5] and record["seed"] == seed


def test_bfloat16_runs_give_bfloat16_soups_in_the_soups_shardings():
  mesh = sharding.make_mesh((("data", -1),))
  bf16 = lambda seed: {k: v.astype(jnp.bfloat16) for k, v in random_tree(seed).items()}
  abstract = sharding.placed_abstract_tree(mesh, trees.unflatten(bf16(0)),
                                           restore_lib.SOUP_SHARDING)
  place = lambda flat: jax.tree.map(lambda x, a: jax.device_put(x, a.sharding),
                                    trees.unflatten(flat), abstract)
  fine, theta0 = [bf16(i) for i in range(3)], bf16(100)
  runs = [place(tree) for tree in fine]  # In memory: the ingredients are their indices.
  cooked = ([0, 1, 2], runs.__getitem__, abstract, place(theta0))
  zero = lambda params: 0.0
  expected = {k: (np.float32(x0) + np.float32(0.5) * sum(np.float32(t[k]) - np.float32(x0)
                                                         for t in fine)).astype(jnp.bfloat16)
              for k, x0 in theta0.items()}
  arithmetic = task_vectors.task_arithmetic(*cooked, zero, (0.5,))[0]  # TIES, DARE cast alike.
  for params in (task_vectors.model_stock(*cooked)[0], arithmetic):
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(abstract)):
      assert (got.dtype, got.sharding) == (want.dtype, want.sharding)
  _assert_close(arithmetic, expected, rtol=0, atol=0)


def test_per_ingredient_steps_memory_is_flat_in_the_number_of_ingredients(tmp_path):
  """XLA's compiled memory of each recipe's streaming step: its sums, the ingredient and θ0,
  plus temporaries (|τ| bits, random bits) under 2.75 (model / devices), the same for 2 and 8
  ingredients; the sums updated in place."""
  shapes = {f"block{i}/kernel": (256, 512) for i in range(4)}
  shapes["head/bias"] = (10,)
  mesh = sharding.make_mesh((("data", -1),))
  share = sum(np.prod(s) * 4 for s in shapes.values()) / mesh.size
  # Model-sized arguments of each step: sums (float32; TIES' count int32, its signs int8),
  # the ingredient and θ0.
  arguments = {"model_stock": 4, "task_arithmetic": 3, "ties_elect": 3, "ties_disjoint": 4.25,
               "dare": 3}
  per_n = {}
  for n in (2, 8):
    (tmp_path / f"n{n}").mkdir()
    ingredients = npz_ingredients(tmp_path / f"n{n}", [random_tree(i, shapes) for i in range(n)])
    per_n[n] = task_vectors.per_ingredient_memory(soup_abstract(ingredients, mesh))
  assert sorted(per_n[2]) == sorted(arguments)
  for name, memory in per_n[2].items():
    per_device = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                  - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    assert 0.99 * arguments[name] * share <= per_device <= (arguments[name] + 2.75) * share, \
        (name, per_device / share)
    assert memory.alias_size_in_bytes >= 0.99 * share, name  # The float32 sum, in place.
    other = per_n[8][name]
    assert (other.argument_size_in_bytes, other.temp_size_in_bytes) == \
        (memory.argument_size_in_bytes, memory.temp_size_in_bytes), name


@pytest.mark.slow
def test_one_and_eight_devices_cook_the_same_weights(tmp_path):
  theta0, fine = random_tree(100), [random_tree(i) for i in range(N)]
  target = trees.unflatten(random_tree(200))
  heldout = _distance_to(trees.flatten(jax.tree.map(lambda a, b: 0.5 * (a + b),
                                                    trees.unflatten(theta0), target)))
  recipes = {
      "model_stock": lambda *cooked: task_vectors.model_stock(*cooked),
      "task_arithmetic": lambda *c: task_vectors.task_arithmetic(*c, heldout, (0.1, 0.3)),
      "ties": lambda *c: task_vectors.ties(*c, heldout, (0.3, 1.0), (0.5, 1.0)),
      "dare": lambda *c: task_vectors.dare(*c, heldout, (0.3,), (0.2, 0.4), seed=5),
  }
  results = {}
  for devices in (1, 8):
    mesh = sharding.make_mesh((("data", -1),), devices=jax.devices()[:devices])
    directory = tmp_path / str(devices)
    directory.mkdir()
    cooked = _cook(directory, fine, theta0, mesh)
    results[devices] = {name: recipe(*cooked) for name, recipe in recipes.items()}
  for name in recipes:
    (one, one_record), (eight, eight_record) = results[1][name], results[8][name]
    assert json.loads(json.dumps(eight_record)) == eight_record  # results.json can hold it.
    assert len(eight["head"]["kernel"].sharding.device_set) == 8
    _assert_close(eight, _host(one), rtol=1e-6, atol=1e-7)
    if name == "model_stock":
      for key, leaf in one_record["per_leaf"].items():
        np.testing.assert_allclose(list(eight_record["per_leaf"][key].values()),
                                   list(leaf.values()), rtol=1e-6, atol=1e-7)
    else:
      assert eight_record["chosen"].keys() == one_record["chosen"].keys()
      assert {k: v for k, v in eight_record["chosen"].items() if k != "heldout_acc"} == \
          {k: v for k, v in one_record["chosen"].items() if k != "heldout_acc"}
