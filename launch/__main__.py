r"""Expands a sweep into runs and launches them; `status` shows where they stand.

  python -m launch \
      --sweep=configs/sweeps/fashion_mnist.py:init=runs/demo/pretrain/final/params.npz \
      --sweep_dir=runs/demo/sweep [--backend=local|slurm|tpu] [--parallel=2] [--dry_run]
  python -m launch status --sweep_dir=runs/demo/sweep
  python -m launch plan --sweep=configs/sweeps/imagenet_vit_g.py --devices=256 \
      --mesh="(('data',-1),('fsdp',16))" --accelerator=v4   # memory, FLOPs, hours (plan.py)

Idempotent: finished runs are skipped, interrupted ones resume from their last
checkpoint, and a grown grid adds runs without renaming the old ones.
"""

import sys

from absl import app
from absl import flags

from launch import backends
from launch import launcher
from launch import plan as plan_lib
from launch import status
from train import command
from train import errors

_SWEEP = flags.DEFINE_string("sweep", "", "Sweep config, configs/sweeps/<file>.py:<arg>.")
_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "Directory of the sweep's runs and manifest.")
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


def launch():
  if not _SWEEP.value:
    raise app.UsageError("--sweep=configs/sweeps/<file>.py:<arg> is required to launch")
  if _BACKEND.value == "tpu" and not (_TPU.value and _ZONE.value):
    raise app.UsageError("--backend=tpu needs --tpu=<name> and --zone=<zone>")
  plan = launcher.plan(_SWEEP.value, _SWEEP_DIR.value, _DRY_RUN.value)
  start_entry, runs = plan.manifest.get("start"), plan.manifest["runs"]
  if start_entry:
    print(f"[launch] start run {start_entry['name']} ({start_entry['base']}): "
          + ("to run first" if plan.start_todo else start_entry["status"]))
    if not plan.start_todo and start_entry["status"] != "done" and not _DRY_RUN.value:
      raise errors.UserError(f"the start run {start_entry['name']} is {start_entry['status']} "
                             "in another process; launch the grid once it is done")
  print(f"[launch] {len(runs)} runs in {plan.sweep_dir}: {len(plan.todo)} to run, "
        f"{len(runs) - len(plan.todo)} done or running")
  if _BACKEND.value == "local":
    failed = launcher.local(plan, _PARALLEL.value, _GPUS.value, _DRY_RUN.value)
    if failed:
      sys.exit(f"[launch] {len(failed)} runs failed: {failed}")
  elif _BACKEND.value == "slurm":
    launcher.slurm(plan, _NODES.value, _GPUS_PER_NODE.value, _TIME.value, _PARTITION.value,
                   _SUBMIT.value, _DRY_RUN.value)
  else:
    launcher.tpu(plan, _TPU.value, _ZONE.value, _PROJECT.value, _REPO_DIR.value, _EXECUTE.value,
                 _DRY_RUN.value)


def main(argv):
  if argv[1:] == ["plan"]:
    plan_lib.main(_SWEEP.value)
    return
  if not _SWEEP_DIR.value:
    raise app.UsageError("--sweep_dir is required")
  if argv[1:] == ["status"]:
    print(status.status_table(_SWEEP_DIR.value))
  elif len(argv) > 1:
    raise app.UsageError(f"unknown command {argv[1:]}; the commands are 'status' and 'plan'")
  else:
    launch()


if __name__ == "__main__":
  command.run(main)
