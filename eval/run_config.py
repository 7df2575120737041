"""A run's resolved `config.json` as a locked ConfigDict: the model and data its weights need.

As a config file: `--config=eval/run_config.py:runs/x/config.json` (python
-m eval also takes `--config=runs/x/config.json` and rewrites it so), with
`--config.key=value` overrides such as `--config.input.data_dir=/data/tfds`.
"""

import json
import os

from etils import epath
import ml_collections

from train import errors
from train import run_dir

# The keys evaluation reads; a config.json without one of them is refused, naming it.
REQUIRED_KEYS = (
    "model.variant", "model.pool_type", "model.dropout", "model.dtype", "num_classes",
    "input.dataset", "input.data_dir", "input.classes", "input.test_split",
    "input.heldout_split", "input.pp_eval", "input.num_threads", "eval_batch_size", "loss",
    "mesh", "param_sharding")


def _tuples(value):
  """JSON lists back to the tuples the trainer's configs hold (mesh, classes, rules)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def load(path):
  """The locked ConfigDict of a run's config.json; errors name the file and a missing key."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"run config {path} does not exist")
  try:
    raw = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise errors.UserError(f"run config {path} is not valid JSON: {e}") from e
  for key in REQUIRED_KEYS:
    node = raw
    for part in key.split("."):
      if not isinstance(node, dict) or part not in node:
        raise errors.UserError(f"run config {path} has no key {key!r}; is it a config.json the "
                               "trainer wrote?")
      node = node[part]
  config = ml_collections.ConfigDict(_tuples(raw))
  config.lock()
  return config


def find(weights_path):
  """<run>/config.json of weights at <run>/final/<name>.npz or <run>/checkpoints/<step>/<name>.

  Or <stem>.config.json next to <stem>.npz (a converted checkpoint). Returns
  None when there is neither.
  """
  if os.path.isfile(run_dir.sibling_config(weights_path)):
    return run_dir.sibling_config(weights_path)
  workdir = run_dir.containing(weights_path)
  return run_dir.config_path(workdir) if workdir else None


def get_config(path):
  """config_flags entry point: `--config=eval/run_config.py:<path to config.json>`."""
  return load(path)
