r"""Expands a sweep into runs and launches them; `status` shows where they stand.

  python -m launch --sweep=configs/sweeps/fashion_mnist.py:init=runs/demo/pretrain/final/params.npz \
      --sweep_dir=runs/demo/sweep [--backend=local|slurm|tpu] [--parallel=2] [--dry_run]
  python -m launch status --sweep_dir=runs/demo/sweep

Idempotent: finished runs are skipped, interrupted ones resume from their last
checkpoint, and a grown grid adds runs without renaming the old ones.
"""

import json
import os
import shlex
import subprocess
import sys

from absl import app
from absl import flags

from launch import backends
from launch import manifest as manifest_lib
from launch import sweep as sweep_lib

_SWEEP = flags.DEFINE_string("sweep", "", "Sweep config, configs/sweeps/<file>.py:<arg>.")
_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "Directory of the sweep's runs and manifest.",
                                 required=True)
_BACKEND = flags.DEFINE_enum("backend", "local", backends.BACKENDS, "Where the runs execute.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print what would run; start nothing.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "local: runs at a time.")
_GPUS = flags.DEFINE_list("gpus", [], "local: accelerator ids to split between parallel runs.")
_SUBMIT = flags.DEFINE_bool("submit", False, "slurm: submit the array with sbatch.")
_NODES = flags.DEFINE_integer("nodes", 1, "slurm: nodes per run (multi-host runs).")
_GPUS_PER_NODE = flags.DEFINE_integer("gpus_per_node", 0, "slurm: --gres=gpu:N.")
_PARTITION = flags.DEFINE_string("partition", "", "slurm: partition.")
_TIME = flags.DEFINE_string("time", "24:00:00", "slurm: time limit per run.")
_TPU = flags.DEFINE_string("tpu", "", "tpu: TPU VM (pod) name.")
_ZONE = flags.DEFINE_string("zone", "", "tpu: zone.")
_PROJECT = flags.DEFINE_string("project", "", "tpu: GCP project.")
_REPO_DIR = flags.DEFINE_string("repo_dir", "~/stockpot", "tpu: checkout on every host.")
_EXECUTE = flags.DEFINE_bool("execute", False, "tpu: run the gcloud commands (default: print).")

BAR = 20


def status_table(sweep_dir):
  """One line per run: name, state, step with a bar, held-out accuracy."""
  manifest = manifest_lib.load(sweep_dir)
  if manifest is None:
    raise FileNotFoundError(f"{manifest_lib.path(sweep_dir)} does not exist")
  lines = [f"{'run':<48} {'state':<12} {'step':>13} {'':<{BAR + 2}} {'held-out':>8}"]
  counts = {}
  for entry in manifest["runs"]:
    state, step, heldout = manifest_lib.run_state(sweep_dir, entry)
    counts[state] = counts.get(state, 0) + 1
    config_path = os.path.join(sweep_dir, entry["workdir"], "config.json")
    total = None
    if os.path.exists(config_path):
      with open(config_path) as f:
        total = json.load(f)["total_steps"]
    step = total if state == "done" else step
    progress = f"{step}/{total}" if total else "–"
    filled = int(BAR * step / total) if total else 0
    bar = f"[{'#' * filled}{' ' * (BAR - filled)}]" if state in ("running", "interrupted") else ""
    accuracy = f"{100 * heldout:.2f}%" if heldout is not None else ""
    lines.append(f"{entry['name']:<48} {state:<12} {progress:>13} {bar:<{BAR + 2}} {accuracy:>8}")
  lines.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
  return "\n".join(lines)


def launch():
  if not _SWEEP.value:
    raise app.UsageError("--sweep=configs/sweeps/<file>.py:<arg> is required to launch")
  sweep = sweep_lib.load(_SWEEP.value)
  runs = sweep_lib.expand(sweep, _SWEEP.value)  # Every error surfaces before anything starts.
  sweep_dir = _SWEEP_DIR.value
  manifest = manifest_lib.merge(sweep_dir, _SWEEP.value, sweep["base"], runs)
  if not _DRY_RUN.value:  # A dry run writes nothing.
    os.makedirs(sweep_dir, exist_ok=True)
    manifest = manifest_lib.refresh(sweep_dir, manifest)
  todo = [e for e in manifest["runs"]
          if manifest_lib.run_state(sweep_dir, e)[0] in ("pending", "interrupted", "failed")]
  print(f"[launch] {len(manifest['runs'])} runs in {sweep_dir}: {len(todo)} to run, "
        f"{len(manifest['runs']) - len(todo)} done or running")
  if _BACKEND.value == "local":
    failed = backends.run_local(sweep_dir, manifest, todo, _PARALLEL.value, _GPUS.value,
                                _DRY_RUN.value)
    if not _DRY_RUN.value:
      manifest_lib.refresh(sweep_dir, manifest)
    if failed:
      sys.exit(f"[launch] {len(failed)} runs failed: {failed}")
  elif _BACKEND.value == "slurm":
    script = backends.slurm_script(sweep_dir, manifest, todo, _NODES.value, _GPUS_PER_NODE.value,
                                   _TIME.value, _PARTITION.value)
    print(f"[launch] wrote {script} ({len(todo)} array tasks)")
    if _SUBMIT.value and not _DRY_RUN.value:
      subprocess.run(["sbatch", script], check=True)
    else:
      print(f"submit with: sbatch {script}")
  else:
    if not _TPU.value or not _ZONE.value:
      raise app.UsageError("--backend=tpu needs --tpu=<name> and --zone=<zone>")
    for command in backends.tpu_commands(sweep_dir, manifest, todo, _TPU.value, _ZONE.value,
                                         _REPO_DIR.value, _PROJECT.value):
      print(shlex.join(command))
      if _EXECUTE.value and not _DRY_RUN.value:
        subprocess.run(command, check=True)


def main(argv):
  if argv[1:] == ["status"]:
    print(status_table(_SWEEP_DIR.value))
  elif len(argv) > 1:
    raise app.UsageError(f"unknown command {argv[1:]}; the only command is 'status'")
  else:
    launch()


if __name__ == "__main__":
  app.run(main)
