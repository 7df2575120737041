r"""Expands a sweep into runs and launches them; `status` shows where they stand.

  python -m launch \
      --sweep=configs/sweeps/fashion_mnist.py:init=runs/demo/pretrain/final/params.npz \
      --sweep_dir=runs/demo/sweep [--backend=local|slurm|tpu] [--parallel=2] [--dry_run]
  python -m launch status --sweep_dir=runs/demo/sweep

Idempotent: finished runs are skipped, interrupted ones resume from their last
checkpoint, and a grown grid adds runs without renaming the old ones.
"""

import os
import shlex
import subprocess
import sys

from absl import app
from absl import flags

from launch import backends
from launch import manifest as manifest_lib
from launch import status
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

def _to_run(sweep_dir, entries):
  return [e for e in entries
          if manifest_lib.run_state(sweep_dir, e)[0] in ("pending", "interrupted", "failed")]


def launch():
  if not _SWEEP.value:
    raise app.UsageError("--sweep=configs/sweeps/<file>.py:<arg> is required to launch")
  sweep = sweep_lib.load(_SWEEP.value)
  sweep_dir = _SWEEP_DIR.value
  start = sweep_lib.start_run(sweep, _SWEEP.value)
  init = manifest_lib.start_init(sweep_dir, start) if start else ""
  runs = sweep_lib.expand(sweep, _SWEEP.value, init)  # Every error surfaces before anything starts.
  manifest = manifest_lib.merge(sweep_dir, _SWEEP.value, sweep["base"], runs, start)
  if not _DRY_RUN.value:  # A dry run writes nothing.
    os.makedirs(sweep_dir, exist_ok=True)
    manifest = manifest_lib.refresh(sweep_dir, manifest)
  start_entry = manifest.get("start")
  start_todo = _to_run(sweep_dir, [start_entry]) if start_entry else []
  todo = _to_run(sweep_dir, manifest["runs"])
  if start_entry:
    print(f"[launch] start run {start_entry['name']} ({start_entry['base']}): "
          + ("to run first" if start_todo else start_entry["status"]))
    if not start_todo and start_entry["status"] != "done" and not _DRY_RUN.value:
      sys.exit(f"[launch] the start run {start_entry['name']} is {start_entry['status']} in "
               "another process; launch the grid once it is done")
  print(f"[launch] {len(manifest['runs'])} runs in {sweep_dir}: {len(todo)} to run, "
        f"{len(manifest['runs']) - len(todo)} done or running")
  if _BACKEND.value == "local":
    _launch_local(sweep_dir, manifest, start_todo, todo)
  elif _BACKEND.value == "slurm":
    _launch_slurm(sweep_dir, manifest, start_todo, todo)
  else:
    _launch_tpu(sweep_dir, manifest, start_todo, todo)


def _launch_local(sweep_dir, manifest, start_todo, todo):
  """The start run alone first (every grid run needs its export), then the grid."""
  for base, entries, parallel in ((manifest.get("start", {}).get("base"), start_todo, 1),
                                  (manifest["base"], todo, _PARALLEL.value)):
    if not entries:
      continue
    failed = backends.run_local(sweep_dir, base, entries, parallel, _GPUS.value, _DRY_RUN.value)
    if not _DRY_RUN.value:
      manifest_lib.refresh(sweep_dir, manifest)
    if failed:
      sys.exit(f"[launch] {len(failed)} runs failed: {failed}")


def _launch_slurm(sweep_dir, manifest, start_todo, todo):
  """One array job for the grid; with a start run to do, a job first that the array waits for."""
  args = (_NODES.value, _GPUS_PER_NODE.value, _TIME.value, _PARTITION.value)
  script = backends.slurm_script(sweep_dir, manifest["base"], todo, *args)
  print(f"[launch] wrote {script} ({len(todo)} array tasks)")
  start_script = None
  if start_todo:
    start_script = backends.slurm_script(sweep_dir, manifest["start"]["base"], start_todo, *args,
                                         job="start")
    print(f"[launch] wrote {start_script} (the start run; the array waits for it)")
  if not _SUBMIT.value or _DRY_RUN.value:
    print("submit with: " + (f"START_JOB=$(sbatch --parsable {start_script}) && sbatch "
                             f"--dependency=afterok:$START_JOB {script}" if start_script
                             else f"sbatch {script}"))
    return
  after = []
  if start_script:
    job = subprocess.run(["sbatch", "--parsable", start_script], check=True, text=True,
                         stdout=subprocess.PIPE).stdout.strip().split(";")[0]
    after = [f"--dependency=afterok:{job}"]
  subprocess.run(["sbatch", *after, script], check=True)


def _launch_tpu(sweep_dir, manifest, start_todo, todo):
  """The start run on every host first, then each grid run, one after another."""
  if not _TPU.value or not _ZONE.value:
    raise app.UsageError("--backend=tpu needs --tpu=<name> and --zone=<zone>")
  commands = []
  for base, entries in ((manifest.get("start", {}).get("base"), start_todo),
                        (manifest["base"], todo)):
    commands += backends.tpu_commands(sweep_dir, base, entries, _TPU.value, _ZONE.value,
                                      _REPO_DIR.value, _PROJECT.value) if entries else []
  for command in commands:
    print(shlex.join(command))
    if _EXECUTE.value and not _DRY_RUN.value:
      subprocess.run(command, check=True)


def main(argv):
  if argv[1:] == ["status"]:
    print(status.status_table(_SWEEP_DIR.value))
  elif len(argv) > 1:
    raise app.UsageError(f"unknown command {argv[1:]}; the only command is 'status'")
  else:
    launch()


if __name__ == "__main__":
  app.run(main)
