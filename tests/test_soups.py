"""The soup step: exact averages, ingredient checks, memory, greedy/learned soups on real runs."""

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest

from configs import fashion_mnist
from eval import evaluate as evaluate_lib
from eval import shifts
from launch import manifest as manifest_lib
from launch import sweep as sweep_lib
from soups import averaging
from soups import diagnose
from soups import diagnostics_report
from soups import greedy_ensemble
from soups import ingredients as ingredients_lib
from soups import preflight
from soups import report as report_lib
from soups import restore as restore_lib
from soups import soup_dir as soup_dir_lib
from soups import soup_step
from tests.helpers import run_module
from tests.soup_helpers import assert_tree_equal
from tests.soup_helpers import npz_ingredients
from tests.soup_helpers import random_tree
from tests.soup_helpers import save_orbax_run
from tests.soup_helpers import soup_abstract
from train import checkpoint
from train import pretrained
from train import sharding
from train import trainer


def test_uniform_soup_of_known_trees_is_the_numpy_mean_exactly(tmp_path):
  trees = [random_tree(i) for i in range(5)]
  ingredients = npz_ingredients(tmp_path, trees)
  mesh = sharding.make_mesh((("data", -1),))
  assert mesh.size == 8
  abstract = soup_abstract(ingredients, mesh)
  soup = averaging.average(ingredients, lambda i: restore_lib.restore(i, abstract), abstract)
  assert soup["embedding"]["kernel"].sharding.spec != jax.sharding.PartitionSpec()  # Sharded.
  for key in trees[0]:
    expected = trees[0][key].copy()
    for tree in trees[1:]:
      expected = expected + tree[key]  # float32, in ingredient order, as the soup sums.
    expected = expected / np.float32(len(trees))
    got = sharding.to_host(soup)
    for part in key.split("/"):
      got = got[part]
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(got, np.mean([t[key] for t in trees], axis=0), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("change,message", [
    (lambda t: {**t, "head/kernel": t["head/kernel"][:, :4]},
     r"parameter 'head/kernel': run1 has shape \(32, 4\) dtype float32, run0 has shape \(32, 5\)"),
    (lambda t: {k: v for k, v in t.items() if k != "head/bias"},
     r"ingredient run1 \(.*run1.npz\) has no parameter 'head/bias', which run0 has"),
    (lambda t: {**t, "extra/kernel": np.zeros(3, np.float32)},
     r"ingredient run0 \(.*\) has no parameter 'extra/kernel', which run1 has"),
    (lambda t: {**t, "head/bias": t["head/bias"].astype(np.float16)},
     r"parameter 'head/bias': run1 has shape \(5,\) dtype float16"),
])
def test_mismatched_ingredients_are_refused_naming_the_first_differing_path(
    tmp_path, change, message):
  ingredients = npz_ingredients(tmp_path, [random_tree(0), change(random_tree(1))])
  with pytest.raises(ValueError, match=message):
    ingredients_lib.check_compatible(ingredients)


def test_missing_and_corrupt_ingredients_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"ingredient .*nope.npz does not exist"):
    ingredients_lib.from_paths([str(tmp_path / "nope.npz")], "params")
  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"not a zip file")
  with pytest.raises(ValueError, match=r"ingredients share the names \['bad'\]"):
    ingredients_lib.from_paths([str(bad), str(bad)], "params")
  good = npz_ingredients(tmp_path, [random_tree(0)])
  with pytest.raises(ValueError, match=r"ingredient .*bad.npz is not a readable .npz"):
    ingredients_lib.check_compatible(good + ingredients_lib.from_paths([str(bad)], "params"))
  with pytest.raises(ValueError, match=r"no ingredients"):
    ingredients_lib.check_compatible([])


def test_soup_memory_per_device_is_flat_in_the_number_of_ingredients(tmp_path):
  """XLA's compiled memory of one streaming add, the sum and one ingredient: about 2x
  (model / devices), whatever N (the read ahead adds one more: tests/test_soup_io.py)."""
  shapes = {f"block{i}/kernel": (256, 512) for i in range(4)}
  shapes["head/bias"] = (10,)
  ingredients = npz_ingredients(tmp_path, [random_tree(0, shapes), random_tree(1, shapes)])
  mesh = sharding.make_mesh((("data", -1),))
  abstract = soup_abstract(ingredients, mesh)
  model_bytes = sum(np.prod(s) * 4 for s in shapes.values())
  memory = averaging.RunningSum(abstract).add_memory_analysis(abstract)
  per_device = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  share = model_bytes / mesh.size
  assert 1.9 * share <= per_device <= 2.5 * share, (per_device, share)
  assert memory.alias_size_in_bytes >= 0.99 * share  # The running sum is updated in place.


# Real ingredients: a pico/7 pre-trained upstream, fine-tuned downstream 4 ways.
FINETUNES = {"lr0.003": {"lr": 0.003}, "lr0.01": {"lr": 0.01},
             "lr0.03_smooth": {"lr": 0.03, "label_smoothing": 0.1},
             "lr0.01_crop": {"lr": 0.01, "aug.crop_min_area": 0.5}}


@pytest.fixture(scope="module")
def finetuned_runs(tmp_path_factory, pretrained_npz, data_dir):
  root = tmp_path_factory.mktemp("finetunes")
  for name, overrides in FINETUNES.items():
    config = fashion_mnist.get_config(f"init={pretrained_npz}")
    config.update_from_flattened_dict({
        "input.data_dir": data_dir, "total_steps": 80, "log_every_steps": 40,
        "checkpoint.every_steps": 80, "ema.low": 0.9, "final_eval_weights": ("ema_low",),
        "schedule.warmup_steps": 5, "input.heldout_split": "train[90%:95%]",
        "input.test_split": "test[:20%]", **overrides})
    trainer.train_and_evaluate(config, str(root / name))
  return [str(root / name) for name in FINETUNES]


@pytest.fixture(scope="module")
def cooked(finetuned_runs, tmp_path_factory):
  soup_dir = str(tmp_path_factory.mktemp("soup"))
  ingredients = ingredients_lib.from_paths(finetuned_runs, "ema_low")
  options = soup_step.Options(recipes=("uniform", "greedy", "learned", "ensemble",
                                       "greedy_ensemble", "wise_ft"),
                              learned_epochs=2, wise_ft_alphas=(0.0, 0.5, 1.0),
                              shift_suite="fashion_mnist_shifts")
  return soup_dir, soup_step.cook(ingredients, soup_dir, options)


def _journal(soup_dir):
  with open(soup_dir_lib.path(soup_dir, soup_dir_lib.JOURNAL)) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_greedy_soup_is_at_least_the_best_ingredient_on_heldout(cooked):
  soup_dir, results = cooked
  best = max(i["heldout_acc"] for i in results["ingredients"])
  soups = results["soups"]
  assert soups["greedy"]["heldout_acc"] >= best
  assert set(soups) == {"uniform", "greedy", "learned", "ensemble", "greedy_ensemble"}
  for soup in soups.values():
    assert 0.5 < soup["test_acc"] <= 1.0
  journal = _journal(soup_dir)
  order = sorted(results["ingredients"], key=lambda i: (-i["heldout_acc"], i["name"]))
  assert [e["name"] for e in journal] == [i["name"] for i in order]
  assert [e["name"] for e in journal if e["decision"] == "add"] == soups["greedy"]["ingredients"]
  assert journal[0]["decision"] == "add" and journal[0]["heldout_acc"] == best
  for name in ("uniform", "greedy", "learned"):
    assert os.path.exists(os.path.join(soup_dir, name, "params.npz"))
    assert os.path.isdir(os.path.join(soup_dir, name, "orbax"))
  alphas = [p["alpha"] for p in results["wise_ft"]["points"]]
  assert alphas == [0.0, 0.5, 1.0] and results["wise_ft"]["endpoint"] == "greedy"
  assert results["wise_ft"]["points"][-1]["test_acc"] == pytest.approx(soups["greedy"]["test_acc"])


def test_greedy_ensemble_search_keeps_a_candidate_only_if_the_mean_logits_do_not_lose():
  """Three members on 4 examples (labels 0, 1, 2, 0): 'a' is right on 2; adding 'b' makes the
  sum right on all 4, 'c' (confidently wrong on example 1) would drop it to 3: skipped."""
  labels = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
  mask = np.ones(4, np.float32)
  logits = {"a": np.array([[2, 0, 0], [1, 0, 0], [0, 1, 0], [1, 0, 0]], np.float32),
            "b": np.array([[0, 0, 0], [0, 3, 0], [0, 0, 3], [0, 0, 0]], np.float32),
            "c": np.array([[0, 0, 0], [9, 0, 0], [0, 0, 0], [0, 0, 0]], np.float32)}
  kept, acc, decisions = greedy_ensemble.search(["a", "b", "c"], logits.get, labels, mask)
  assert kept == ["a", "b"] and acc == 1.0
  assert [(d["name"], d["decision"], d["ensemble_heldout_acc"]) for d in decisions] == [
      ("a", "add", 0.5), ("b", "add", 1.0), ("c", "skip", 0.75)]


@pytest.mark.slow
def test_greedy_ensemble_is_chosen_on_heldout_and_scored_as_its_members_logits(
    cooked, finetuned_runs):
  """The greedy ensemble starts from the best run on held-out, keeps a candidate only when the
  mean logits do not lose held-out accuracy, and its test accuracy is that of the kept runs'
  logit ensemble evaluated directly (`python -m eval`'s ensemble of their exports)."""
  soup_dir, results = cooked
  soup = results["soups"]["greedy_ensemble"]
  own = {i["name"]: i["heldout_acc"] for i in results["ingredients"]}
  decisions = soup["decisions"]
  assert [d["name"] for d in decisions] == sorted(own, key=lambda n: (-own[n], n))
  assert soup["ingredients"][0] == decisions[0]["name"] and decisions[0]["decision"] == "add"
  best = own[decisions[0]["name"]]
  for decision in decisions[1:]:
    assert (decision["decision"] == "add") == (decision["ensemble_heldout_acc"] >= best)
    best = decision["ensemble_heldout_acc"] if decision["decision"] == "add" else best
  assert soup["heldout_acc"] == best >= max(own.values())
  assert soup["inference_forward_passes"] == len(soup["ingredients"]) == soup["checkpoint_reads"]
  with open(os.path.join(finetuned_runs[0], "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  runs = {os.path.basename(r): r for r in finetuned_runs}
  members = [os.path.join(runs[name], "final", "ema_low.npz") for name in soup["ingredients"]]
  direct = evaluate_lib.evaluate(members if len(members) > 1 else members[0], "test", config)
  assert direct["datasets"]["test"]["accuracy"] == pytest.approx(soup["test_acc"], abs=1e-6)


@pytest.mark.slow
def test_every_recipe_cooks_on_real_runs_and_is_reported(cooked, finetuned_runs, tmp_path):
  """The later recipes on the cooked soup directory (resumed: the ingredients are not evaluated
  again; no shift suite, held-out and test only): each writes its weights and results.json
  row with its costs, grid choices are the grid's best held-out point, the exported weights
  score what results.json says, and the report lists every soup's row and cost."""
  source, _ = cooked
  soup_dir = tmp_path / "soup"
  shutil.copytree(source, soup_dir)
  later = ("learned_blocks", "model_stock", "model_stock_best2", "task_arithmetic", "ties", "dare",
           "fisher", "regmean")
  options = soup_step.Options(recipes=later, learned_epochs=1, learned_block_size=2,
                              ties_densities=(0.2,), ties_lambdas=(0.5, 1.0),
                              dare_drop_rates=(0.5,), task_arithmetic_lambdas=(0.25, 0.5),
                              dare_lambdas=(0.25, 0.5), fisher_examples_per_step=32)
  ingredients = ingredients_lib.from_paths(finetuned_runs, "ema_low")
  results = soup_step.cook(ingredients, str(soup_dir), options)
  names = [i.name for i in ingredients]
  own = {i["name"]: i["heldout_acc"] for i in results["ingredients"]}
  for recipe in later:
    soup = results["soups"][recipe]
    assert soup["inference_forward_passes"] == 1 and soup["checkpoint_reads"] >= 2, recipe
    assert os.path.exists(soup_dir / recipe / "params.npz"), recipe
    if "grid" in soup:  # Chosen on held-out: the grid's best point, its accuracy the soup's.
      best = max(soup["grid"], key=lambda point: point["heldout_acc"])
      assert soup["chosen"] == best, recipe
      assert soup["heldout_acc"] == pytest.approx(best["heldout_acc"], abs=1e-9), recipe
  assert results["soups"]["model_stock_best2"]["ingredients"] == sorted(
      names, key=lambda n: (-own[n], n))[:2]
  with open(os.path.join(finetuned_runs[0], "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  direct = evaluate_lib.evaluate(str(soup_dir / "regmean" / "params.npz"), "test", config)
  assert direct["datasets"]["test"]["accuracy"] == pytest.approx(
      results["soups"]["regmean"]["test_acc"], abs=1e-6)
  report = (soup_dir / "report.md").read_text()
  for name, soup in results["soups"].items():
    assert f"| **{report_lib.soup_label(name, soup)}** |" in report, name
    assert f"| {name} | {len(soup['ingredients'])} |" in report, name


@pytest.mark.slow
def test_greedy_resume_early_abort_and_test_split_independence(cooked, finetuned_runs, tmp_path):
  soup_dir, results = cooked
  full = _journal(soup_dir)
  ingredients = ingredients_lib.from_paths(finetuned_runs, "ema_low")
  # Resume: a journal cut after two decisions (and a torn third line) ends the same.
  resumed_dir = tmp_path / "resumed"
  resumed_dir.mkdir()
  with open(resumed_dir / soup_dir_lib.JOURNAL, "w") as f:
    f.write("".join(json.dumps(e) + "\n" for e in full[:2]) + '{"name": "lr0.0')
  with open(resumed_dir / soup_dir_lib.EVALUATIONS, "w") as f:
    json.dump({i["name"]: {k: i[k] for k in ("heldout_acc", "test_acc", "shift_acc")}
               for i in results["ingredients"]}, f)
  resumed = soup_step.cook(ingredients, str(resumed_dir), soup_step.Options(recipes=("greedy",)))
  assert _journal(resumed_dir) == full
  assert resumed["soups"]["greedy"]["ingredients"] == results["soups"]["greedy"]["ingredients"]
  assert resumed["soups"]["greedy"]["search"] == results["soups"]["greedy"]["search"]
  # Without early abort: the same decisions, at least as many forward passes.
  exhaustive_dir = tmp_path / "exhaustive"
  exhaustive = soup_step.cook(ingredients, str(exhaustive_dir), soup_step.Options(
      recipes=("greedy",), greedy_early_abort=False))
  assert [e["decision"] for e in _journal(exhaustive_dir)] == [e["decision"] for e in full]
  search = results["soups"]["greedy"]["search"]
  assert exhaustive["soups"]["greedy"]["search"]["batches_evaluated"] == \
      search["batches_full_evaluation"] >= search["batches_evaluated"]
  assert search["batches_saved_by_early_abort"] == (search["batches_full_evaluation"]
                                                   - search["batches_evaluated"])
  # Greedy never looks at the test split: another test split, the same journal.
  copies = []
  for run in finetuned_runs:
    copy = tmp_path / "runs" / os.path.basename(run)
    shutil.copytree(run, copy)
    with open(copy / "config.json") as f:
      config = json.load(f)
    config["input"]["test_split"] = "test[:10%]"
    with open(copy / "config.json", "w") as f:
      json.dump(config, f)
    copies.append(str(copy))
  other_dir = tmp_path / "other_test"
  other = soup_step.cook(ingredients_lib.from_paths(copies, "ema_low"), str(other_dir),
                         soup_step.Options(recipes=("greedy",)))
  assert [{k: e[k] for k in ("name", "decision", "soup_heldout_acc")} for e in _journal(other_dir)] \
      == [{k: e[k] for k in ("name", "decision", "soup_heldout_acc")} for e in full]
  assert other["soups"]["greedy"]["heldout_acc"] == results["soups"]["greedy"]["heldout_acc"]


@pytest.mark.slow
def test_learned_soup_turns_away_from_a_bad_ingredient(finetuned_runs, tmp_path):
  """Two real runs and a bad one (run 0 with its head's classes rotated: confidently wrong).
  The fitted coefficients in results.json give the bad one the least weight, below the
  uniform 1/3, the learned soup's weights are exactly that mix, and it is at least as good
  on held-out as the uniform soup of the same three."""
  good = [os.path.join(r, "final", "ema_low.npz") for r in finetuned_runs[:2]]
  weights = [pretrained.load_npz(path) for path in good]
  rotated = {**weights[0], "head/kernel": np.roll(weights[0]["head/kernel"], 1, axis=-1),
             "head/bias": np.roll(weights[0]["head/bias"], 1, axis=-1)}
  bad = _run_copy(finetuned_runs[0], tmp_path, "rotated_head", rotated)
  ingredients = ingredients_lib.from_paths(good + [bad], "ema_low")
  names = [i.name for i in ingredients]
  soup_dir = tmp_path / "soup"
  results = soup_step.cook(ingredients, str(soup_dir), soup_step.Options(
      recipes=("uniform", "learned"), learned_epochs=3))
  own = {i["name"]: i["heldout_acc"] for i in results["ingredients"]}
  assert own["rotated_head"] < 0.5 * min(own[n] for n in names[:2])  # It is bad.
  uniform, soup = results["soups"]["uniform"], results["soups"]["learned"]
  assert soup["mode"] == "global" and soup["ingredients"] == names
  coefficients = soup["coefficients"]
  assert list(coefficients) == names and sum(coefficients.values()) == pytest.approx(1, abs=1e-6)
  assert coefficients["rotated_head"] < min(coefficients[n] for n in names[:2])
  assert coefficients["rotated_head"] < 1 / 3 - 0.05, coefficients
  losses = soup["heldout_loss_per_epoch"]
  assert len(losses) == 3 and losses[-1] < losses[0]
  assert soup["heldout_acc"] >= uniform["heldout_acc"], (soup, uniform)
  mixed = pretrained.load_npz(soup_dir / "learned" / "params.npz")
  for key in weights[0]:
    expected = sum(np.float64(coefficients[name]) * tree[key]
                   for name, tree in zip(names, weights + [rotated]))
    np.testing.assert_allclose(mixed[key], expected, rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_one_and_eight_device_soups_are_equal(finetuned_runs, tmp_path):
  args = [f"--ingredients={','.join(finetuned_runs)}", "--recipes=uniform,greedy"]
  outputs = {}
  for devices in (1, 8):
    soup_dir = tmp_path / f"devices{devices}"
    run_module("soups", *args, f"--soup_dir={soup_dir}", devices=devices)
    with open(soup_dir / "results.json") as f:
      outputs[devices] = (json.load(f), {r: pretrained.load_npz(soup_dir / r / "params.npz")
                                         for r in ("uniform", "greedy")})
  (results1, weights1), (results8, weights8) = outputs[1], outputs[8]
  for recipe in ("uniform", "greedy"):
    assert results1["soups"][recipe]["ingredients"] == results8["soups"][recipe]["ingredients"]
    for key in weights1[recipe]:
      np.testing.assert_allclose(weights1[recipe][key], weights8[recipe][key], rtol=1e-6, atol=1e-7)
    assert results1["soups"][recipe]["heldout_acc"] == pytest.approx(
        results8["soups"][recipe]["heldout_acc"], abs=1e-3)


def test_sweep_ingredients_are_the_finished_runs_of_the_manifest(tmp_path):
  """A sweep directory as `python -m launch` and the trainer leave it (their own writers),
  with small orbax checkpoints: the finished runs, in manifest order, at their last step."""
  sweep_dir = tmp_path / "sweep"
  mesh = sharding.make_mesh((("data", -1),))
  names = ["zeta", "still_running", "alpha"]  # Manifest order, not alphabetical.
  weights = lambda name, step, item: random_tree(
      100 * names.index(name) + 10 * step + checkpoint.WEIGHT_NAMES.index(item))
  for name in names:
    save_orbax_run(sweep_dir / name,
                   {item: lambda step, name=name, item=item: weights(name, step, item)
                    for item in checkpoint.WEIGHT_NAMES},
                   mesh, steps=(5, 10) if name != "still_running" else (5,),
                   finished=name != "still_running",
                   results={"heldout": {"ema_high": {"accuracy": 0.5}}})
  manifest = manifest_lib.merge(str(sweep_dir), "sweep.py", "base.py",
                                [sweep_lib.Run(name, {"lr": i}) for i, name in enumerate(names)])
  manifest_lib.refresh(str(sweep_dir), manifest)  # Writes manifest.json.
  ingredients = ingredients_lib.from_sweep(str(sweep_dir), "ema_high")
  assert [i.name for i in ingredients] == ["zeta", "alpha"]
  abstract = soup_abstract(ingredients, mesh)
  for ingredient in ingredients:  # Step 10, not 5 (nor "5" > "10" as strings); ema_high.
    assert ingredient.path == str(sweep_dir / ingredient.name / "checkpoints" / "10" / "ema_high")
    assert ingredient.run_dir == str(sweep_dir / ingredient.name)
    assert_tree_equal(restore_lib.restore(ingredient, abstract),
                      weights(ingredient.name, 10, "ema_high"))
  with pytest.raises(FileNotFoundError, match=r"manifest.json does not exist"):
    ingredients_lib.from_sweep(str(sweep_dir / "still_running"), "ema_low")


@pytest.mark.slow
def test_report_matches_results_and_direct_evaluation(cooked, finetuned_runs):
  soup_dir, results = cooked
  report = open(os.path.join(soup_dir, "report.md")).read()
  shift_names = sorted(results["ingredients"][0]["shift_acc"])
  assert shift_names == sorted(e.name for e in shifts.suite("fashion_mnist_shifts"))
  rows = {line.split(" | ")[0].strip("| *"): line.split(" | ")[1:]
          for line in report.splitlines() if line.startswith("| ") and " | " in line}
  for name, soup in results["soups"].items():
    label = report_lib.soup_label(name, soup)
    cells = [c.strip(" |") for c in rows[label]]
    assert cells[0] == f"{100 * soup['heldout_acc']:.2f}" and cells[1] == f"{100 * soup['test_acc']:.2f}"
    average = np.mean([soup["shift_acc"][s] for s in shift_names])
    assert cells[-1] == f"{100 * average:.2f}"
  # The greedy soup's exported weights, evaluated directly, give the reported test accuracy.
  with open(os.path.join(finetuned_runs[0], "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  direct = evaluate_lib.evaluate(os.path.join(soup_dir, "greedy", "params.npz"), "test", config)
  assert direct["datasets"]["test"]["accuracy"] == pytest.approx(
      results["soups"]["greedy"]["test_acc"], abs=1e-6)
  for plot in report_lib.PLOTS:
    path = os.path.join(soup_dir, plot)
    assert os.path.getsize(path) > 10_000, plot
    with Image.open(path) as image:
      assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50, plot


def _run_copy(run, root, name, weights=None, **config_changes):
  """A copy of `run`'s config.json (with `config_changes`, dotted keys) and init record as
  <root>/<name>, holding `weights` (or the run's own) as final/ema_low.npz."""
  copy = root / name
  (copy / "final").mkdir(parents=True)
  config = json.loads(open(os.path.join(run, "config.json")).read())
  for key, value in config_changes.items():
    node = config
    *parents, last = key.split(".")
    for part in parents:
      node = node[part]
    node[last] = value
  (copy / "config.json").write_text(json.dumps(config))
  shutil.copy(os.path.join(run, "init.json"), copy / "init.json")
  if weights is None:
    weights = pretrained.load_npz(os.path.join(run, "final", "ema_low.npz"))
  pretrained.save_npz(str(copy / "final" / "ema_low.npz"), weights)
  return str(copy / "final" / "ema_low.npz")


@pytest.mark.slow
def test_diagnostics_of_known_geometry(finetuned_runs, pretrained_npz, tmp_path):
  """A run, an exact copy (0°) and its reflection through the init (180°), among real runs."""
  run = finetuned_runs[0]
  weights = pretrained.load_npz(os.path.join(run, "final", "ema_low.npz"))
  init = pretrained.load_npz(pretrained_npz)  # θ0: the runs load every key of it.
  reflected = {k: (2 * init[k].astype(np.float64) - v).astype(np.float32) for k, v in weights.items()}
  paths = [os.path.join(r, "final", "ema_low.npz") for r in finetuned_runs]
  paths += [_run_copy(run, tmp_path, "copy"), _run_copy(run, tmp_path, "reflected", reflected)]
  ingredients = ingredients_lib.from_paths(paths, "ema_low")
  names = [i.name for i in ingredients]
  first, second = names[0], names[1]
  data = diagnose.diagnose(ingredients, str(tmp_path / "soup"), pairs=[f"{first}:{second}",
                           f"{first}:copy"], alphas=5, landscape_grid=3, block=4)
  angle = lambda a, b: data["angle_deg"][names.index(a)][names.index(b)]
  assert angle(first, "copy") == pytest.approx(0.0, abs=0.01)
  assert angle(first, "reflected") == pytest.approx(180.0, abs=0.5)
  assert 0.5 < angle(first, second) < 179.5
  for layer in data["layers"]:
    layer_angle = data["angle_deg_per_layer"][layer][names.index(first)][names.index("copy")]
    assert layer_angle is None or layer_angle == pytest.approx(0.0, abs=0.01), layer
  assert {"embedding", "encoderblock_0", "head"} <= set(data["layers"])
  # The block pass (2 blocks of 4) met every pair: the matrix is full and symmetric.
  angles = np.array(data["angle_deg"], dtype=np.float64)
  np.testing.assert_allclose(angles, angles.T)
  own = dict(zip(names, data["heldout_acc"]))
  line, same = data["pairs"]
  assert line["heldout_acc"][0] == own[first] and line["heldout_acc"][-1] == own[second]
  assert line["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0] and line["loss_barrier"] >= 0
  assert same["soup_acc"] == same["ensemble_acc"] == own[first] and same["acc_barrier"] == 0
  soups = np.array(data["pair_soup_acc"], dtype=np.float64)
  ensembles = np.array(data["pair_ensemble_acc"], dtype=np.float64)
  i, j = names.index(first), names.index("copy")
  assert soups[i, j] == ensembles[i, j] == own[first]
  assert soups[i, names.index(second)] == line["heldout_acc"][2]  # The midpoint, twice measured.
  plane = data["plane"]
  assert plane["pair"] == [first, second] and np.array(plane["heldout_error"]).shape == (3, 3)
  assert plane["points"]["init"] == [0.0, 0.0] and plane["points"]["a"][1] == 0.0
  for plot in diagnostics_report.PLOTS.values():
    assert os.path.getsize(tmp_path / "soup" / plot) > 10_000, plot
  assert diagnostics_report.read(str(tmp_path / "soup")) == json.loads(json.dumps(data))
  section = "\n".join(diagnostics_report.markdown(str(tmp_path / "soup")))
  assert "## Diagnostics (held-out split)" in section and f"{first} ↔ copy | 0.0°" in section


@pytest.mark.slow
def test_preflight_warns_on_mixed_inits_heads_and_losses(finetuned_runs, tmp_path):
  ingredients = ingredients_lib.from_paths(finetuned_runs, "ema_low")
  assert preflight.warnings(ingredients) == []  # One init, one head init, one loss.
  other_init = _run_copy(finetuned_runs[0], tmp_path, "other_init")
  record = json.loads(open(tmp_path / "other_init" / "init.json").read())
  (tmp_path / "other_init" / "init.json").write_text(json.dumps({**record, "sha256": "f" * 64}))
  sigmoid = _run_copy(finetuned_runs[1], tmp_path, "sigmoid", loss="sigmoid_xent")
  fresh_head = _run_copy(finetuned_runs[2], tmp_path, "fresh_head",
                         **{"model_load.dont_load": ["head/.*"]})
  mixed = ingredients + ingredients_lib.from_paths([other_init, sigmoid, fresh_head], "ema_low")
  init_warning, head_warning, loss_warning = preflight.warnings(mixed)
  assert "did not start from the same weights" in init_warning
  assert "(sha256 ffffffffffff): other_init" in init_warning and "LP-FT" in init_warning
  assert "initialised their heads differently" in head_warning
  assert "model_load.dont_load=('head/.*',): fresh_head" in head_warning
  assert "trained with different losses" in loss_warning and "loss=sigmoid_xent: sigmoid" in loss_warning
  soup_dir = tmp_path / "soup"
  results = soup_step.cook(mixed, str(soup_dir), soup_step.Options(recipes=("uniform",)))
  assert results["warnings"] == [init_warning, head_warning, loss_warning]
  assert f"- {loss_warning}" in (soup_dir / "report.md").read_text()
