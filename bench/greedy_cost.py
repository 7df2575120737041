r"""Cost of the greedy soup search with and without early abort, on a real sweep.

Cooks the greedy soup with `soups.soup_step.cook` into fresh soup directories,
`Options(greedy_early_abort=True)` and `False`, alternating which goes first
over --repeats, and counts what the search itself costs: held-out batches
(forward passes) and images, checkpoint reads, and wall time. Early abort is
exact, so both must select the same ingredients in the same order with the
same held-out accuracy; the benchmark exits non-zero if they do not.

What is and is not measured:
  * Every soup directory is pre-seeded with one shared copy of the
    ingredients' evaluations (`evaluations.json`, `ensemble_logits.npz`), so
    `cook` reuses them and no per-ingredient pass runs; both searches rank
    the same accuracies. Batches and images come from each cook's own
    results.json (`soups.greedy.search`) and greedy journal.
  * Wall time is that of `greedy.greedy_soup` alone, timed by a greedy
    recipe that wraps it, given to `cook` in place of the default one (not
    the test-set evaluation, weight export or report
    that follow it). Before the clock starts, the wrapper compiles the
    held-out step and the running sum and makes one full held-out pass,
    which also fills the held-out split's host cache, as the per-ingredient
    evaluation does in a first `cook`; its time is reported as `warmup_s`.
    `--nowarm_up` times the search as a resumed `cook` runs it, cold: with
    every evaluation cached nothing has filled the held-out cache yet, so
    the first candidate's pass decodes the split (an aborted pass is read
    to the end into the cache, without forward passes).
  * XLA compilation inside the timed search (`compile s`, from
    jax.monitoring) is shown beside its time, which includes it: zero for
    the warmed-up greedy rows; the re-average row's running sums share one
    set of compiled steps (`averaging._steps` is cached per tree).
  * With --naive, a third search re-averages the selected set from scratch
    for every candidate (`averaging.average` of kept + candidate, restored
    with `restore.restore`) and evaluates it in full: the cost of a
    search without the running sum. (The model-soups reference code does
    not do this: it keeps the soup in memory, one read per candidate, like
    the no-early-abort row.) It checks the selection by another path, too.

  python -m bench.greedy_cost --sweep=runs/demo/sweep --weights=ema_low --repeats=3 \
      --out=bench/results/greedy_cost.json
"""

from train import command
from train import tf_setup  # First: TensorFlow loads without its C++ start-up lines.

# isort: split

import functools
import os
import shutil
import statistics
import sys
import tempfile
import time

from absl import flags
import jax

from launch import manifest as manifest_lib
from soups import averaging
from soups import greedy
from soups import ingredients as ingredients_lib
from soups import recipes as recipes_lib
from soups import soup_dir as soup_dir_lib
from soups import soup_step
from train import checkpoint
from train import files
from train import run_log

_SWEEP = flags.DEFINE_string("sweep", "runs/demo/sweep",
                             "Sweep directory (its manifest.json lists the runs).")
_WEIGHTS = flags.DEFINE_enum("weights", "ema_low", checkpoint.WEIGHT_NAMES,
                             "Which weights of each run to soup.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Searches per row; the table shows the median time.")
_NAIVE = flags.DEFINE_bool("naive", True, "Also time the re-average-from-scratch search.")
_WARM_UP = flags.DEFINE_bool("warm_up", True,
                             "Compile and fill the held-out cache before the clock starts.")
_EVAL_BATCH = flags.DEFINE_integer("eval_batch_size", 0, "Held-out batch size (0: the runs' own).")
_OUT = flags.DEFINE_string("out", "bench/results/greedy_cost.json",
                           "Where to write the JSON results.")

ROWS = ("early_abort", "no_early_abort", "naive_reaverage")
LABELS = {"early_abort": "early abort", "no_early_abort": "no early abort",
          "naive_reaverage": "re-average from scratch"}
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


class CompileClock:
  """Seconds spent tracing, lowering and compiling with XLA since the process started."""

  def __init__(self):
    self.seconds = 0.0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    del kwargs
    if event in _COMPILE_EVENTS:
      self.seconds += duration


def _counting(restore):
  """`restore`, counting its calls in `.reads`: one call reads one checkpoint."""
  def counted(ingredient):
    counted.reads += 1
    return restore(ingredient)
  counted.reads = 0
  return counted


def _warm_up(evaluator, weights, running_sum=None):
  """Compiles the held-out step (and `running_sum`'s steps) and fills the split's host cache.

  The running sum is left exactly empty: x + (-1)·x is 0 in floating point.
  """
  evaluator.evaluate(weights)  # One full pass fills the cache, as a first `cook`'s does.
  if running_sum is not None:
    running_sum.add(weights)
    running_sum.mean()
    jax.block_until_ready(running_sum.mean_with(weights))
    running_sum.add(weights, -1.0)
    empty = all(bool((leaf == 0).all()) for leaf in jax.tree.leaves(running_sum.total))
    if running_sum.weight != 0 or not empty:
      raise RuntimeError("warm-up left the greedy running sum non-empty; the search would be wrong")


class SearchProbe:
  """Stands in for `greedy.greedy_soup` in the greedy recipe: warms up, then times the search."""

  def __init__(self, compile_clock):
    self.clock, self.last = compile_clock, None

  def __call__(self, ingredients, heldout_acc, restore, running_sum, evaluator, journal_path,
               **kwargs):
    start = time.perf_counter()
    if _WARM_UP.value:
      first = greedy.candidate_order(ingredients, heldout_acc)[0]
      _warm_up(evaluator, restore(first), running_sum)
    warmup = time.perf_counter() - start
    restore = _counting(restore)
    compiled = self.clock.seconds
    start = time.perf_counter()
    params, kept, acc, stats = greedy.greedy_soup(ingredients, heldout_acc, restore, running_sum,
                                       evaluator, journal_path, **kwargs)
    jax.block_until_ready(params)
    self.last = {"seconds": time.perf_counter() - start, "warmup_s": warmup,
                 "compile_s": self.clock.seconds - compiled, "reads": restore.reads,
                 "kept": list(kept), "search_heldout_acc": acc, "stats": dict(stats),
                 "batch_size": evaluator.batch_size, "examples": len(evaluator.split)}
    return params, kept, acc, stats


def _seed(ingredients, directory, options):
  """Evaluates every ingredient once; returns the kitchen (warm held-out cache) and its files."""
  kitchen, _ = soup_step.prepare(ingredients, directory, options)
  return kitchen, [soup_dir_lib.path(directory, n)
                   for n in (soup_dir_lib.EVALUATIONS, soup_dir_lib.ENSEMBLE_LOGITS)]


def _seed_state(soup_dir):
  """What re-evaluating the ingredients would change: evaluations.json and the logit sums.

  `cook` rewrites evaluations.json even when it reuses every entry, so its
  content is compared; the logit sums are saved only when an ingredient is added.
  """
  return (soup_dir_lib.read_evaluations(soup_dir),
          os.stat(soup_dir_lib.path(soup_dir, soup_dir_lib.ENSEMBLE_LOGITS)).st_mtime_ns)


def cook_once(ingredients, soup_dir, seed_files, early_abort, probe):
  """One greedy `cook` into a fresh, pre-seeded `soup_dir`; returns the search's measurements."""
  os.makedirs(soup_dir)
  for path in seed_files:
    shutil.copy2(path, soup_dir)
  seeded = _seed_state(soup_dir)
  options = soup_step.Options(recipes=("greedy",), greedy_early_abort=early_abort,
                              eval_batch_size=_EVAL_BATCH.value)
  probe.last = None
  start = time.perf_counter()
  timed = {**recipes_lib.RECIPES,
           "greedy": functools.partial(recipes_lib.cook_greedy, search=probe)}
  results = soup_step.cook(ingredients, soup_dir, options, timed)
  cook_seconds = time.perf_counter() - start
  if probe.last is None or _seed_state(soup_dir) != seeded:
    sys.exit(f"greedy_cost: cook in {soup_dir} did not run the search on the pre-seeded "
             "evaluations (it re-evaluated the ingredients or skipped the greedy recipe)")
  row = dict(probe.last)
  journal = soup_dir_lib.read_journal(soup_dir)
  batch, examples = row["batch_size"], row["examples"]
  greedy_result = results["soups"]["greedy"]
  row.update(
      cook_s=cook_seconds, stats=greedy_result["search"], kept=greedy_result["ingredients"],
      soup_heldout_acc=greedy_result["heldout_acc"],
      batches=greedy_result["search"]["batches_evaluated"],
      images=sum(min(e["batches_evaluated"] * batch, examples) for e in journal),
      tried=[(e["name"], e["decision"]) for e in journal],
      batches_per_candidate=[e["batches_evaluated"] for e in journal[1:]])
  return row


def naive_search(kitchen, heldout_acc, clock):
  """Greedy search that re-averages kept + candidate from scratch and evaluates it in full."""
  evaluator, examples = kitchen.setup.heldout, len(kitchen.setup.heldout.split)
  restore = _counting(kitchen.setup.restore)
  compiled, start = clock.seconds, time.perf_counter()
  order = greedy.candidate_order(kitchen.ingredients, heldout_acc)
  kept = [order[0]]
  soup = restore(order[0])
  best = int(round(heldout_acc[order[0].name] * examples))
  batches = images = 0
  tried = [(order[0].name, "add")]
  for candidate in order[1:]:
    params = averaging.average(kept + [candidate], restore, kitchen.setup.abstract)
    correct, seen, evaluated, _ = greedy.count_correct(evaluator, params)
    batches, images = batches + evaluated, images + seen
    keep = correct >= best  # greedy.py's rule: keep unless held-out accuracy drops.
    if keep:
      kept, best, soup = kept + [candidate], correct, params
    tried.append((candidate.name, "add" if keep else "skip"))
  jax.block_until_ready(soup)
  return {"seconds": time.perf_counter() - start, "compile_s": clock.seconds - compiled,
          "reads": restore.reads, "kept": [i.name for i in kept], "batches": batches,
          "images": images, "search_heldout_acc": best / examples, "tried": tried}


def _check_identical(runs):
  """Exits non-zero unless every search selected the same ingredients, order and accuracy."""
  (reference_name, reference), *others = runs
  for name, run in others:
    for key in ("kept", "search_heldout_acc", "tried"):
      if run[key] != reference[key]:
        sys.exit(f"greedy_cost: {name} and {reference_name} disagree on {key}: "
                 f"{run[key]!r} vs {reference[key]!r}. Early abort is exact and re-averaging "
                 "computes the same average, so every search must take the same decisions")
  heldout = {name: run["soup_heldout_acc"] for name, run in runs if "soup_heldout_acc" in run}
  if len(set(heldout.values())) > 1:
    sys.exit(f"greedy_cost: the cooked soups' held-out accuracies differ: {heldout}")


def _summary(runs):
  seconds = [r["seconds"] for r in runs]
  first = runs[0]
  row = {"batches": first["batches"], "images": first["images"], "reads": first["reads"],
         "seconds_median": statistics.median(seconds), "seconds": seconds,
         "compile_s_median": statistics.median(r["compile_s"] for r in runs)}
  if "warmup_s" in first:
    row.update(warmup_s=[r["warmup_s"] for r in runs], cook_s=[r["cook_s"] for r in runs],
               search=first["stats"], batches_per_candidate=first["batches_per_candidate"])
  for key in ("batches", "images", "reads"):
    if any(r[key] != first[key] for r in runs):
      sys.exit(f"greedy_cost: {key} differ between repeats of one search: "
               f"{[r[key] for r in runs]}")
  return row


def main(argv):
  del argv
  tf_setup.hide_gpus_from_tensorflow()
  run_log.quiet_library_logs()
  manifest = manifest_lib.path(_SWEEP.value)
  if not os.path.exists(manifest):
    raise FileNotFoundError(f"{manifest} does not exist. Run `make demo` first to make the "
                            "demo sweep (runs/demo/sweep), or pass --sweep=<a sweep directory "
                            "from python -m launch>")
  ingredients = ingredients_lib.from_sweep(_SWEEP.value, _WEIGHTS.value)
  clock = CompileClock()
  probe = SearchProbe(clock)
  load = [os.getloadavg()[0]]
  runs = {name: [] for name in ROWS}
  with tempfile.TemporaryDirectory(prefix="greedy_cost_") as tmp:
    options = soup_step.Options(recipes=("greedy",), eval_batch_size=_EVAL_BATCH.value)
    print(f"evaluating {len(ingredients)} ingredients once (shared by every search)...", flush=True)
    kitchen, seed_files = _seed(ingredients, os.path.join(tmp, "seed"), options)
    heldout_acc = kitchen.heldout_acc()
    if _NAIVE.value:
      best = greedy.candidate_order(ingredients, heldout_acc)[0]
      _warm_up(kitchen.setup.heldout, kitchen.setup.restore(best))
    rows = [r for r in ROWS if _NAIVE.value or r != "naive_reaverage"]
    for repeat in range(_REPEATS.value):
      shift = repeat % len(rows)  # Rotate the order, so no row always runs first.
      for name in rows[shift:] + rows[:shift]:
        if name == "naive_reaverage":
          run = naive_search(kitchen, heldout_acc, clock)
        else:
          run = cook_once(ingredients, os.path.join(tmp, f"{repeat}_{name}"), seed_files,
                          name == "early_abort", probe)
        runs[name].append(run)
        print(f"  repeat {repeat + 1}/{_REPEATS.value} {LABELS[name]:<24} "
              f"{run['seconds']:6.2f} s, {run['batches']} batches", flush=True)
  load.append(os.getloadavg()[0])
  _check_identical([(f"{n}#{i}", r) for n in rows for i, r in enumerate(runs[n])])
  summary = {name: _summary(runs[name]) for name in rows}
  full = summary["no_early_abort"]
  if full["search"]["batches_evaluated"] != full["search"]["batches_full_evaluation"]:
    sys.exit(f"greedy_cost: without early abort the search evaluated {full['search']} batches, "
             "not every candidate in full")
  for row in summary.values():
    row["ratio_to_no_early_abort"] = {
        "batches": row["batches"] / full["batches"], "images": row["images"] / full["images"],
        "reads": row["reads"] / full["reads"],
        "seconds": row["seconds_median"] / full["seconds_median"]}
  reference = runs["early_abort"][0]
  examples, batch = reference["examples"], reference["batch_size"]
  print(f"\ngreedy search over {len(ingredients)} ingredients ({_WEIGHTS.value}) of "
        f"{_SWEEP.value}; held-out {examples:,} images in {-(-examples // batch)} batches of "
        f"{batch}; {jax.device_count()} {jax.devices()[0].platform} device(s), {os.cpu_count()} "
        f"cores, load {load[0]:.1f}→{load[1]:.1f}; median of {_REPEATS.value}"
        f"{'' if _WARM_UP.value else '; cold (no warm-up)'}")
  print(f"{'search':<24} {'batches':>7} {'images':>8} {'reads':>5} {'search s':>8} "
        f"{'compile s':>9} {'batches ÷':>9} {'images ÷':>8} {'time ÷':>6}")
  for name, row in summary.items():
    ratio = row["ratio_to_no_early_abort"]
    print(f"{LABELS[name]:<24} {row['batches']:>7} {row['images']:>8,} {row['reads']:>5} "
          f"{row['seconds_median']:>8.2f} {row['compile_s_median']:>9.2f} "
          f"{ratio['batches']:>9.2f} {ratio['images']:>8.2f} {ratio['seconds']:>6.2f}")
  print(f"(÷: over no early abort.) All {sum(map(len, runs.values()))} searches selected the same "
        f"{len(reference['kept'])} ingredient(s) in the same order, held-out accuracy "
        f"{reference['search_heldout_acc']:.4f}: {reference['kept']}")
  print(f"early abort, batches per candidate (of {-(-examples // batch)}): "
        f"{summary['early_abort']['batches_per_candidate']}")
  if _OUT.value:
    files.write_json_atomic(_OUT.value, {
        "sweep": _SWEEP.value, "weights": _WEIGHTS.value, "ingredients": len(ingredients),
        "heldout_examples": examples, "batch_size": batch, "repeats": _REPEATS.value,
        "warm_up": _WARM_UP.value, "devices": str(jax.devices()), "cpu_count": os.cpu_count(),
        "load_average_1min": load, "jax": jax.__version__,
        "selected": reference["kept"], "search_heldout_acc": reference["search_heldout_acc"],
        "soup_heldout_acc": reference["soup_heldout_acc"], "candidates": reference["tried"],
        "rows": summary, "runs": runs})
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  command.run(main)
