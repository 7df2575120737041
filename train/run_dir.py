"""A training run's directory: the one module that knows its file names.

  <workdir>/config.json       the resolved config (written once the run starts)
  <workdir>/init.json         what the run started from: model_init and its SHA-256
  <workdir>/checkpoints/      orbax checkpoints (train/checkpoint.py)
  <workdir>/final/<name>.npz  every weight set, big_vision layout, at the end
  <workdir>/results.json      held-out and test accuracy; its presence marks the run finished

Everyone else asks this module for paths and contents.
"""

import hashlib
import json
import os

from etils import epath

from train import files

CONFIG = "config.json"
INIT = "init.json"
RESULTS = "results.json"
FINAL = "final"


def config_path(workdir):
  return os.path.join(workdir, CONFIG)


def results_path(workdir):
  return os.path.join(workdir, RESULTS)


def exported_weights(workdir, name):
  """`<workdir>/final/<name>.npz`: weight set `name` exported at the end of the run."""
  return os.path.join(workdir, FINAL, f"{name}.npz")


def containing(weights_path):
  """The run directory holding weights at <run>/final/<name>.npz or <run>/checkpoints/<step>/<name>.

  None when no directory up to three levels above holds a config.json.
  """
  run = os.path.abspath(weights_path.rstrip("/"))
  for _ in range(3):
    run = os.path.dirname(run)
    if os.path.exists(config_path(run)):
      return run
  return None


def read_config(workdir):
  """The run's config.json as a dict (eval/run_config.py loads it as a locked ConfigDict)."""
  return _read_json(config_path(workdir))


def is_finished(workdir):
  return os.path.exists(results_path(workdir))


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def read_results(workdir):
  return _read_json(results_path(workdir))


def write_results(workdir, results):
  files.write_json_atomic(results_path(workdir), results)


def sha256_of(path):
  """Hex SHA-256 of a file (local or object store), read in 16 MiB blocks."""
  digest = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      digest.update(block)
  return digest.hexdigest()


def write_init(workdir, model_init):
  """Records the file the run starts from, with its hash: the soup step checks ingredients share it."""
  files.write_json_atomic(os.path.join(workdir, INIT),
                          {"model_init": model_init, "sha256": sha256_of(model_init)})


def read_init(workdir):
  """{'model_init', 'sha256'} of a run started from a file; None if it has no record."""
  path = os.path.join(workdir, INIT)
  return _read_json(path) if os.path.exists(path) else None
