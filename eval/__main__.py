r"""Accuracy of any weights on a split or a shift suite: prints a table, writes JSON.

  python -m eval --weights=runs/demo/finetune/final/ema_low.npz --suite=fashion_mnist_shifts
  python -m eval --weights=runs/x/checkpoints/300/params --suite=test --out=/tmp/test.json

Weights inside a run directory (`<run>/final/<name>.npz`,
`<run>/checkpoints/<step>/<name>`) use that run's config.json for the model
and data; elsewhere pass --run_config=<config.json>.
"""

import json
import os

from absl import app
from absl import flags
import jax
import ml_collections
import orbax.checkpoint as ocp

from eval import evaluators as eval_lib
from train import files
from train import pretrained
from train import run_log
from train import sharding
from train import trees
from train import vit

_WEIGHTS = flags.DEFINE_string("weights", None, "An .npz file or an orbax checkpoint directory.",
                               required=True)
_SUITE = flags.DEFINE_string("suite", "test", f"One of {eval_lib.known_suites()}.")
_RUN_CONFIG = flags.DEFINE_string("run_config", "", "config.json of the run (default: found "
                                  "from --weights).")
_OUT = flags.DEFINE_string("out", "", "JSON output; default <run>/eval/<weights>.<suite>.json.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Evaluation batch size; 0: the run's.")


def run_config_path(weights):
  """<run>/config.json for weights at <run>/final/x.npz or <run>/checkpoints/<step>/<name>."""
  weights = os.path.abspath(weights.rstrip("/"))
  for up in (2, 3):
    run = weights
    for _ in range(up):
      run = os.path.dirname(run)
    if os.path.exists(os.path.join(run, "config.json")):
      return os.path.join(run, "config.json")
  raise FileNotFoundError(f"no run config.json found above {weights}; pass --run_config")


def load_weights(path):
  """Host numpy tree of an .npz or an orbax checkpoint, with errors naming the file."""
  if path.endswith(".npz"):
    return trees.unflatten(pretrained.load_npz(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"weights {path} are neither an .npz file nor an orbax directory")
  try:
    return jax.device_get(ocp.StandardCheckpointer().restore(os.path.abspath(path)))
  except Exception as e:  # orbax raises many types for unreadable checkpoints.
    raise ValueError(f"cannot read the orbax checkpoint {path}: {e}") from e


def evaluate(weights_path, suite, config, batch_size=0):
  """{dataset: {'accuracy', 'loss', 'num_examples'}} plus 'average' accuracy over the suite."""
  model = vit.build_model(config.model, config.num_classes)
  mesh = sharding.make_mesh((("data", -1),))
  params = jax.device_put(load_weights(weights_path), sharding.replicated(mesh))
  evaluators = eval_lib.Evaluators(config, model, mesh, sharding.replicated(mesh), batch_size)
  results = {name: ev.evaluate(params) for name, ev in evaluators.suite(suite).items()}
  return {"weights": os.path.abspath(weights_path), "suite": suite, "datasets": results,
          "average_accuracy": sum(r["accuracy"] for r in results.values()) / len(results)}


def format_table(result):
  lines = [f"{'dataset':<16} {'accuracy':>9} {'loss':>8} {'examples':>9}"]
  for name, r in result["datasets"].items():
    lines.append(f"{name:<16} {100 * r['accuracy']:>8.2f}% {r['loss']:>8.4f} {r['num_examples']:>9}")
  lines.append(f"{'average':<16} {100 * result['average_accuracy']:>8.2f}%")
  return "\n".join(lines)


def main(argv):
  del argv
  run_log.quiet_library_logs()
  if _SUITE.value not in eval_lib.known_suites():
    raise app.UsageError(f"unknown --suite={_SUITE.value!r}; known: {eval_lib.known_suites()}")
  config_path = _RUN_CONFIG.value or run_config_path(_WEIGHTS.value)
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  result = evaluate(_WEIGHTS.value, _SUITE.value, config, _BATCH.value)
  print(format_table(result))
  run_dir = os.path.dirname(os.path.abspath(config_path))
  label = os.path.relpath(os.path.abspath(_WEIGHTS.value), run_dir).replace("/", "_")
  out = _OUT.value or os.path.join(run_dir, "eval", f"{label.removesuffix('.npz')}.{_SUITE.value}.json")
  if jax.process_index() == 0:
    files.write_json_atomic(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
