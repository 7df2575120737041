"""A training run's directory: the one module that knows its file names.

  <workdir>/config.json       the resolved config (written once the run starts)
  <workdir>/init.json         what the run started from: model_init and its SHA-256
  <workdir>/checkpoints/      orbax checkpoints, <step>/<item> (train/checkpoint.py)
  <workdir>/metrics.jsonl     one line of metrics per logged step
  <workdir>/tensorboard/      the same, for TensorBoard
  <workdir>/final/<name>.npz  every weight set, big_vision layout, at the end
  <workdir>/results.json      held-out and test accuracy; its presence marks the run finished
  <workdir>/eval/             `python -m eval` results of the run's weights
  <workdir>/train.log, RUNNING, FAILED
                              written by `python -m launch`: the run's output, the pid of
                              its process while it runs, its exit code when it failed

Everyone else asks this module for paths and contents.
"""

import hashlib
import json
import os

from etils import epath

from train import files

CONFIG = "config.json"
SIBLING_CONFIG = ".config.json"
INIT = "init.json"
RESULTS = "results.json"
METRICS = "metrics.jsonl"
FINAL = "final"
CHECKPOINTS = "checkpoints"
RUNNING = "RUNNING"
FAILED = "FAILED"


def config_path(workdir):
  return os.path.join(workdir, CONFIG)


def results_path(workdir):
  return os.path.join(workdir, RESULTS)


def metrics_path(workdir):
  return os.path.join(workdir, METRICS)


def tensorboard_dir(workdir):
  return os.path.join(workdir, "tensorboard")


def train_log_path(workdir):
  return os.path.join(workdir, "train.log")


def eval_dir(workdir):
  return os.path.join(workdir, "eval")


def exported_weights(workdir, name):
  """`<workdir>/final/<name>.npz`: weight set `name` exported at the end of the run."""
  return os.path.join(workdir, FINAL, f"{name}.npz")


def checkpoint_dir(workdir):
  """Absolute path of the run's checkpoint directory (orbax needs absolute paths)."""
  return epath.Path(workdir).absolute() / CHECKPOINTS


def checkpoint_item(workdir, step, item):
  """`<workdir>/checkpoints/<step>/<item>`: one orbax item (a weight set) of one checkpoint."""
  return os.path.join(checkpoint_dir(workdir), str(step), item)


def checkpoint_steps(workdir):
  """The steps of the run's complete checkpoints, ascending (orbax renames a step in when whole)."""
  directory = checkpoint_dir(workdir)
  if not directory.exists():
    return []
  return sorted(int(s) for s in os.listdir(directory) if s.isdigit())


def is_run(path):
  """Whether `path` is a run directory (it holds a config.json)."""
  return os.path.exists(config_path(path))


def exporting_run(npz_path):
  """The run that exported `npz_path` as <run>/final/<name>.npz (a run two levels up), or None."""
  run = os.path.dirname(os.path.dirname(os.path.abspath(npz_path)))
  return run if is_run(run) else None


def sibling_config(weights_path):
  """<stem>.config.json next to weights <stem>.<ext> (what `python -m train.convert` writes)."""
  return os.path.splitext(os.path.abspath(weights_path.rstrip("/")))[0] + SIBLING_CONFIG


def containing(weights_path):
  """The run directory holding weights at <run>/final/<name>.npz or <run>/checkpoints/<step>/<name>.

  None when no directory up to three levels above holds a config.json.
  """
  run = os.path.abspath(weights_path.rstrip("/"))
  for _ in range(3):
    run = os.path.dirname(run)
    if is_run(run):
      return run
  return None


def read_config(workdir):
  """The run's config.json as a dict (eval/run_config.py loads it as a locked ConfigDict)."""
  return _read_json(config_path(workdir))


def write_config(workdir, config_dict):
  files.write_json_atomic(config_path(workdir), config_dict)


def is_finished(workdir):
  return os.path.exists(results_path(workdir))


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def read_results(workdir):
  return _read_json(results_path(workdir))


def write_results(workdir, results):
  files.write_json_atomic(results_path(workdir), results)


def last_logged_step(workdir):
  """The step of metrics.jsonl's last line; 0 before the first log."""
  if not os.path.exists(metrics_path(workdir)):
    return 0
  with open(metrics_path(workdir)) as f:
    lines = [line for line in f if line.strip()]
  return json.loads(lines[-1])["step"] if lines else 0


def logged_metric(workdir, key):
  """Every value of `key` in metrics.jsonl, in order (lines without it are skipped)."""
  with open(metrics_path(workdir)) as f:
    values = [json.loads(line).get(key) for line in f if line.strip()]
  return [v for v in values if v is not None]


def _marker(workdir, marker):
  return os.path.join(workdir, marker)


def mark_running(workdir, pid):
  """Records the pid of the process training the run; clears an earlier failure."""
  _clear_marker(workdir, FAILED)
  files.write_bytes_atomic(_marker(workdir, RUNNING), str(pid).encode())


def mark_ended(workdir, returncode):
  """The run's process has ended: no longer running; failed when `returncode` is not 0."""
  _clear_marker(workdir, RUNNING)
  if returncode:
    files.write_bytes_atomic(_marker(workdir, FAILED), str(returncode).encode())


def _clear_marker(workdir, marker):
  if os.path.exists(_marker(workdir, marker)):
    os.remove(_marker(workdir, marker))


def has_failed(workdir):
  return os.path.exists(_marker(workdir, FAILED))


def running_pid_file(workdir):
  return _marker(workdir, RUNNING)


def sha256_of(path):
  """Hex SHA-256 of a file (local or object store), read in 16 MiB blocks."""
  digest = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      digest.update(block)
  return digest.hexdigest()


def write_init(workdir, model_init):
  """Records the file the run starts from, with its hash: soups check that ingredients share it."""
  files.write_json_atomic(os.path.join(workdir, INIT),
                          {"model_init": model_init, "sha256": sha256_of(model_init)})


def read_init(workdir):
  """{'model_init', 'sha256'} of a run started from a file; None if it has no record."""
  path = os.path.join(workdir, INIT)
  return _read_json(path) if os.path.exists(path) else None
