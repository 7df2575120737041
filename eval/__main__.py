r"""Accuracy of weights on a split or a shift suite: prints a table, writes JSON.

  python -m eval --weights=runs/demo/finetune/final/ema_low.npz --suite=fashion_mnist_shifts
  python -m eval --weights=runs/x/checkpoints/300/params --suite=test --split='test[:1000]'
  python -m eval --weights=soup/greedy/params.npz --config=runs/x/config.json --out=greedy.json
  python -m eval --weights=runs/a/final/ema_low.npz,runs/b/final/ema_low.npz --out=ens.json

Weights inside a run directory (`<run>/final/<name>.npz`,
`<run>/checkpoints/<step>/<name>`) use that run's config.json for the model
and data; elsewhere pass --config (a run's config.json or a configs/*.py
file, with --config.key=value overrides). Several --weights are scored as
a logit ensemble (the mean of their logits).
"""

import itertools
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF only preprocesses on the host.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import flax
import jax
from ml_collections import config_flags

from eval import evaluators as eval_lib
from eval import run_config
from eval import weights as weights_lib
from train import files
from train import sharding
from train import ssf
from train import startup
from train import tf_setup
from train import vit

_WEIGHTS = flags.DEFINE_list("weights", None, "An .npz file or an orbax checkpoint directory; "
                             "several (comma-separated): their logit ensemble.", required=True)
_SUITE = flags.DEFINE_string("suite", "test", f"One of {eval_lib.known_suites()}.")
_SPLIT = flags.DEFINE_string("split", "", "TFDS split read instead of each dataset's own, "
                             "e.g. 'test[:1000]'.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The run's config.json, or a configs/*.py:arg file (default: the "
    "config.json of the run holding --weights).", lock_config=True)
_OUT = flags.DEFINE_string("out", "", "JSON output; default <run>/eval/<weights>.<suite>.json.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Evaluation batch size; 0: the run's.")

_RUN_CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_config.py")


def parse_flags(argv):
  """absl parsing, reading `--config=<file>.json` as a run config (through run_config.py)."""
  return flags.FLAGS([f"--config={_RUN_CONFIG_FILE}:{a.partition('=')[2]}"
                      if a.startswith("--config=") and a.endswith(".json") else a for a in argv])


def evaluate(weights, suite, config, batch_size=0, split=""):
  """{'datasets': {name: {'accuracy', 'loss', 'num_examples', 'split'}}, 'average_accuracy', ...}.

  `weights`: one path (accuracy) or a list of paths (the logit ensemble).
  """
  paths = [weights] if isinstance(weights, str) else list(weights)
  mesh = sharding.make_mesh(config.mesh)
  rules = config.param_sharding
  first = weights_lib.load(paths[0], mesh, rules)
  # An SSF run's checkpoints hold the SSF vectors, its exported .npz the merged plain ViT.
  model = vit.build_model(ssf.model_config_for(config.model, first), config.num_classes)
  evaluators = eval_lib.Evaluators(config, model, mesh,
                                   jax.tree.map(lambda a: a.sharding, first), batch_size)
  kind = "accuracy" if len(paths) == 1 else "ensemble"
  if kind == "ensemble":
    del first  # An ensemble streams its weight sets from disk, one at a time, per dataset.
  results = {}
  for name, dataset in evaluators.suite_datasets(suite, split).items():
    evaluator = evaluators.make(kind, dataset)
    try:
      if kind == "accuracy":
        result = evaluator.evaluate(first)
      else:
        result = evaluator.evaluate(weights_lib.load(p, mesh, rules) for p in paths)
    except flax.errors.FlaxError as e:  # Parameters of another shape or name than the model's.
      raise ValueError(f"weights {', '.join(paths)} do not fit config.model (variant="
                       f"{config.model.variant!r}, num_classes={config.num_classes}): "
                       f"{str(e).splitlines()[0]}") from e
    results[name] = {**result, "split": dataset.split.name}
  return {"weights": [os.path.abspath(p) for p in paths], "evaluator": kind, "suite": suite,
          "datasets": results,
          "average_accuracy": sum(r["accuracy"] for r in results.values()) / len(results)}


def format_table(result):
  width = max(len(name) for name in itertools.chain(result["datasets"], ["average"]))
  split_width = max(len(r["split"]) for r in result["datasets"].values())
  lines = [f"{'dataset':<{width}}  {'split':<{split_width}}  {'accuracy':>9}  {'loss':>8}  "
           f"{'examples':>8}"]
  for name, r in result["datasets"].items():
    lines.append(f"{name:<{width}}  {r['split']:<{split_width}}  {100 * r['accuracy']:>8.2f}%  "
                 f"{r['loss']:>8.4f}  {r['num_examples']:>8}")
  average = 100 * result["average_accuracy"]
  lines.append(f"{'average':<{width}}  {'':<{split_width}}  {average:>8.2f}%")
  return "\n".join(lines)


def default_out(weights, suite):
  """<run>/eval/<weights path in the run, '_'-joined>.<suite>.json, or beside the weights."""
  config_path = run_config.find(weights)
  base = os.path.dirname(config_path) if config_path else os.path.dirname(os.path.abspath(weights))
  label = os.path.relpath(os.path.abspath(weights), base).replace("/", "_").removesuffix(".npz")
  return os.path.join(base, "eval", f"{label}.{suite}.json")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  tf_setup.hide_gpus_from_tensorflow()
  startup.init()
  weights, suite = _WEIGHTS.value, _SUITE.value
  if suite not in eval_lib.known_suites():
    sys.exit(f"FATAL unknown --suite={suite!r}; known: {eval_lib.known_suites()}")
  if len(weights) > 1 and not _OUT.value:
    sys.exit("FATAL --out is required with several --weights (an ensemble)")
  config = _CONFIG.value
  try:
    if config is None:
      config_path = run_config.find(weights[0])
      if config_path is None:
        sys.exit(f"FATAL no run config.json found above {weights[0]}; pass --config=<run>/"
                 "config.json or --config=configs/<file>.py:<arg>")
      config = run_config.load(config_path)
    result = evaluate(weights, suite, config, _BATCH.value, _SPLIT.value)
  except (FileNotFoundError, ValueError) as e:  # Bad input: one line naming the file or key.
    sys.exit(f"FATAL {e}")
  print(format_table(result))
  out = _OUT.value or default_out(weights[0], suite)
  if jax.process_index() == 0:
    files.write_json_atomic(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
