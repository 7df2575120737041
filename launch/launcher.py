"""Launching a sweep: what must run, then running it here, as SLURM jobs or on a TPU pod.

`plan` expands the sweep and merges it into the manifest; `local`, `slurm`
and `tpu` run a plan's start run first (every grid run starts from its
export), then the grid. `python -m launch` maps its flags onto these.
"""

import dataclasses
import os
import shlex
import subprocess

from launch import backends
from launch import manifest as manifest_lib
from launch import sweep as sweep_lib

RESTARTABLE = ("pending", "interrupted", "failed")


@dataclasses.dataclass(frozen=True)
class Plan:
  """A sweep's manifest and the entries that must run: the start run's (if any), the grid's."""
  sweep_dir: str
  manifest: dict
  start_todo: list
  todo: list

  @property
  def start_base(self):
    return self.manifest.get("start", {}).get("base")


def to_run(sweep_dir, entries):
  """The entries whose runs are not done and not running."""
  return [e for e in entries if manifest_lib.run_state(sweep_dir, e)[0] in RESTARTABLE]


def plan(sweep_spec, sweep_dir, dry_run=False):
  """Expands `sweep_spec` (every error before anything starts) and merges it into the manifest.

  The manifest is written, with every run's state refreshed, unless `dry_run`.
  """
  sweep = sweep_lib.load(sweep_spec)
  start = sweep_lib.start_run(sweep, sweep_spec)
  init = manifest_lib.start_init(sweep_dir, start) if start else ""
  runs = sweep_lib.expand(sweep, sweep_spec, init)
  manifest = manifest_lib.merge(sweep_dir, sweep_spec, sweep["base"], runs, start)
  if not dry_run:
    os.makedirs(sweep_dir, exist_ok=True)
    manifest = manifest_lib.refresh(sweep_dir, manifest)
  start_entry = manifest.get("start")
  return Plan(sweep_dir, manifest, to_run(sweep_dir, [start_entry]) if start_entry else [],
              to_run(sweep_dir, manifest["runs"]))


def local(plan_, parallel=1, gpus=(), dry_run=False):
  """Trains the start run alone, then the grid `parallel` at a time; returns the failed runs."""
  for base, entries, at_once in ((plan_.start_base, plan_.start_todo, 1),
                                 (plan_.manifest["base"], plan_.todo, parallel)):
    if not entries:
      continue
    failed = backends.run_local(plan_.sweep_dir, base, entries, at_once, gpus, dry_run)
    if not dry_run:
      manifest_lib.refresh(plan_.sweep_dir, plan_.manifest)
    if failed:
      return failed
  return []


def slurm(plan_, nodes, gpus_per_node, time_limit, partition, submit=False, dry_run=False):
  """One array job for the grid; with a start run to do, a job first that the array waits for."""
  args = (nodes, gpus_per_node, time_limit, partition)
  script = backends.slurm_script(plan_.sweep_dir, plan_.manifest["base"], plan_.todo, *args)
  print(f"[launch] wrote {script} ({len(plan_.todo)} array tasks)")
  start_script = None
  if plan_.start_todo:
    start_script = backends.slurm_script(plan_.sweep_dir, plan_.start_base, plan_.start_todo,
                                         *args, job="start")
    print(f"[launch] wrote {start_script} (the start run; the array waits for it)")
  if not submit or dry_run:
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


def tpu(plan_, tpu_name, zone, project, repo_dir, execute=False, dry_run=False):
  """Prints (and with `execute` runs) the gcloud commands: the start run first, then each run."""
  commands = []
  for base, entries in ((plan_.start_base, plan_.start_todo),
                        (plan_.manifest["base"], plan_.todo)):
    commands += backends.tpu_commands(plan_.sweep_dir, base, entries, tpu_name, zone, repo_dir,
                                      project) if entries else []
  for command in commands:
    print(shlex.join(command))
    if execute and not dry_run:
      subprocess.run(command, check=True)
