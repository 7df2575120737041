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

from train import tf_setup  # First: TensorFlow loads without its C++ start-up lines.

# isort: split

import os

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from eval import evaluate as evaluate_lib
from eval import evaluators as eval_lib
from eval import run_config
from eval import weights as weights_lib
from train import command
from train import errors
from train import files
from train import startup

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  tf_setup.hide_gpus_from_tensorflow()
  startup.init()
  weights, suite = _WEIGHTS.value, _SUITE.value
  if suite not in eval_lib.known_suites():
    raise errors.UserError(f"unknown --suite={suite!r}; known: {eval_lib.known_suites()}")
  if len(weights) > 1 and not _OUT.value:
    raise errors.UserError("--out is required with several --weights (an ensemble)")
  for path in weights:
    weights_lib.check_exists(path)
  config = _CONFIG.value
  if config is None:
    config_path = run_config.find(weights[0])
    if config_path is None:
      raise errors.UserError(f"no run config.json found above {weights[0]}; pass --config=<run>/"
                             "config.json or --config=configs/<file>.py:<arg>")
    config = run_config.load(config_path)
  result = evaluate_lib.evaluate(weights, suite, config, _BATCH.value, _SPLIT.value)
  print(evaluate_lib.format_table(result))
  out = _OUT.value or evaluate_lib.default_out(weights[0], suite)
  if jax.process_index() == 0:
    files.write_json_atomic(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
  command.run(main, flags_parser=parse_flags)
