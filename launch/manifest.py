"""manifest.json of a sweep directory: which sweep it belongs to and every run's state.

{"sweep": "configs/sweeps/x.py:arg", "base": "configs/x.py:arg",
 "start": {"name", "base", "overrides", "weights", "workdir", "status"},  (optional)
 "runs": [{"name", "overrides", "workdir", "status"}]}

`workdir` is relative to the sweep directory. Runs are only ever appended:
re-launching a grown grid keeps existing names and directories. The start
run (see launch/sweep.py) is trained before the grid; every run's
`model_init` is its export.
"""

import json
import os

from train import errors
from train import files
from train import run_dir

MANIFEST = "manifest.json"
STATES = ("pending", "running", "interrupted", "done", "failed")


def path(sweep_dir):
  return os.path.join(sweep_dir, MANIFEST)


def load(sweep_dir):
  """The manifest's content, or None when `sweep_dir` has none."""
  if not os.path.exists(path(sweep_dir)):
    return None
  with open(path(sweep_dir)) as f:
    return json.load(f)


def workdir(sweep_dir, entry):
  """The run directory of a manifest entry."""
  return os.path.join(sweep_dir, entry["workdir"])


def finished_runs(sweep_dir):
  """(name, run directory) of every finished grid run, in manifest order; an error if none."""
  manifest = load(sweep_dir)
  if manifest is None:
    raise FileNotFoundError(f"{path(sweep_dir)} does not exist: is {sweep_dir} a sweep "
                            "directory written by `python -m launch`?")
  runs = manifest["runs"]
  finished = [(r["name"], workdir(sweep_dir, r)) for r in runs
              if run_dir.is_finished(workdir(sweep_dir, r))]
  if not finished:
    raise errors.UserError(f"{path(sweep_dir)}: none of its {len(runs)} runs has finished")
  return finished


def start_init(sweep_dir, start):
  """The start run's exported weights: the `model_init` of every grid run."""
  return run_dir.exported_weights(os.path.join(sweep_dir, start.name), start.weights)


def _start_entry(start):
  return {"name": start.name, "base": start.base, "overrides": start.overrides,
          "weights": start.weights, "workdir": start.name, "status": "pending"}


def merge(sweep_dir, sweep_spec, base, runs, start=None):
  """The manifest with `runs` (and the `sweep.Start` run) added.

  A sweep_dir of another base config or another start run is refused: its
  runs were trained from something else.
  """
  existing = load(sweep_dir)
  if existing is not None and existing["base"] != base:
    raise errors.UserError(
        f"{path(sweep_dir)} belongs to another sweep (base config {existing['base']!r}, "
        f"not {base!r}): use another --sweep_dir")
  start_entry = _start_entry(start) if start else None
  if existing is not None and _identity(existing.get("start")) != _identity(start_entry):
    raise errors.UserError(
        f"{path(sweep_dir)} belongs to a sweep with another start run "
        f"({_identity(existing.get('start'))}, not {_identity(start_entry)}): use another "
        "--sweep_dir")
  manifest = existing or {"sweep": sweep_spec, "base": base, "runs": []}
  if start_entry and "start" not in manifest:
    manifest["start"] = start_entry
  manifest["sweep"] = sweep_spec
  known = {r["name"] for r in manifest["runs"]}
  for run in runs:
    if run.name not in known:
      manifest["runs"].append({"name": run.name, "overrides": run.overrides,
                               "workdir": run.name, "status": "pending"})
  return manifest


def _identity(start_entry):
  """What makes two start runs the same run (not their status), as JSON reads it back."""
  if start_entry is None:
    return None
  return json.loads(json.dumps({k: start_entry[k] for k in ("name", "base", "overrides",
                                                             "weights")}))


def run_state(sweep_dir, entry):
  """(state, last logged step, held-out accuracy or None) from the run directory itself."""
  run = workdir(sweep_dir, entry)
  if run_dir.is_finished(run):
    heldout = run_dir.read_results(run)["heldout"]
    accuracy = max((r["accuracy"] for r in heldout.values()), default=None)
    return "done", None, accuracy
  step = run_dir.last_logged_step(run)
  if run_dir.has_failed(run):
    return "failed", step, None
  if alive(run_dir.running_pid_file(run)):
    return "running", step, None
  return ("interrupted" if step else "pending"), step, None


def entries(manifest):
  """The start run's entry (if any), then every grid run's."""
  return ([manifest["start"]] if "start" in manifest else []) + manifest["runs"]


def alive(pid_file):
  """Whether the run process whose pid is in `pid_file` (on this host) still runs.

  A killed run's pid can linger as a zombie, or be reused by an unrelated
  process: neither counts, so a re-launched sweep restarts the run.
  """
  if not os.path.exists(pid_file):
    return False
  try:
    with open(pid_file) as f:
      pid = int(f.read().strip())
    os.kill(pid, 0)
  except (ValueError, ProcessLookupError, PermissionError):
    return False
  try:
    with open(f"/proc/{pid}/stat") as f:
      state = f.read().rsplit(")", 1)[1].split()[0]
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      cmdline = f.read().decode(errors="replace")
  except OSError:  # No /proc (macOS): the pid is all there is.
    return True
  return state != "Z" and os.path.basename(os.path.dirname(os.path.abspath(pid_file))) in cmdline


def refresh(sweep_dir, manifest):
  """Updates every run's status from its directory and writes the manifest atomically."""
  for entry in entries(manifest):
    entry["status"] = run_state(sweep_dir, entry)[0]
  files.write_json_atomic(path(sweep_dir), manifest)
  return manifest
