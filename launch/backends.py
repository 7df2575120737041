"""Where runs execute: this machine, a SLURM array, or every host of a TPU pod.

Every backend runs the same trainer command per run,
`python -m train --config=<base> --workdir=<sweep_dir>/<name> --config.k=v ...`;
the multi-host ones add `--distributed=auto` so each process joins its job
through `jax.distributed` from the SLURM or TPU environment.
"""

import os
import shlex
import subprocess
import sys
import time

from launch import sweep as sweep_lib
from train import durations
from train import errors
from train import files
from train import run_dir

BACKENDS = ("local", "slurm", "tpu")


def train_command(base, run_entry, sweep_dir, python=sys.executable, extra=()):
  return [python, "-m", "train", f"--config={base}",
          f"--workdir={os.path.join(sweep_dir, run_entry['workdir'])}",
          *sweep_lib.override_flags(run_entry["overrides"]), *extra]


def _device_slots(gpus, parallel):
  """Splits the listed accelerator ids into `parallel` disjoint slots (env per slot)."""
  if not gpus:
    return [{} for _ in range(parallel)]
  if len(gpus) < parallel:
    raise errors.UserError(f"--gpus={','.join(gpus)} has fewer devices than --parallel={parallel}")
  per_slot = len(gpus) // parallel
  return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * per_slot:(i + 1) * per_slot])}
          for i in range(parallel)]


def run_local(sweep_dir, base, entries, parallel=1, gpus=(), dry_run=False, log=print):
  """Runs `entries` of trainer config `base` here, `parallel` at a time; returns the failed ones."""
  commands = {e["name"]: train_command(base, e, sweep_dir) for e in entries}
  if dry_run:
    for command in commands.values():
      log(shlex.join(command))
    return []
  slots = _device_slots(list(gpus), parallel)
  queue, running, failed = list(entries), {}, []
  start, finished = time.monotonic(), 0
  while queue or running:
    while queue and len(running) < parallel:
      entry = queue.pop(0)
      slot = next(i for i in range(parallel) if i not in {s for s, _, _ in running.values()})
      workdir = os.path.join(sweep_dir, entry["workdir"])
      os.makedirs(workdir, exist_ok=True)
      with open(run_dir.train_log_path(workdir), "ab") as out:
        proc = subprocess.Popen(commands[entry["name"]], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **slots[slot]})
      run_dir.mark_running(workdir, proc.pid)  # A retry clears the old failure.
      running[entry["name"]] = (slot, proc, workdir)
      log(f"[launch] started {entry['name']} (pid {proc.pid})")
    time.sleep(0.5)
    for name, (_, proc, workdir) in list(running.items()):
      if proc.poll() is None:
        continue
      del running[name]
      run_dir.mark_ended(workdir, proc.returncode)
      if proc.returncode:
        failed.append(name)
        log(f"[launch] {name} FAILED (exit {proc.returncode}); see "
            f"{run_dir.train_log_path(workdir)}")
      else:
        log(f"[launch] {name} done")
      finished += 1
      remaining = len(entries) - finished
      eta = (time.monotonic() - start) / finished * remaining
      log(f"[launch] {finished}/{len(entries)} runs finished | "
          f"ETA {durations.format_duration(eta)}")
  return failed


def slurm_script(sweep_dir, base, entries, nodes=1, gpus_per_node=0, time_limit="24:00:00",
                 partition="", max_parallel=0, job="sweep"):
  """Writes `<sweep_dir>/launch/{<job>.commands.txt,<job>.sbatch}`: one array task per run."""
  launch_dir = os.path.join(os.path.abspath(sweep_dir), "launch")
  lines = [shlex.join(train_command(base, e, os.path.abspath(sweep_dir), "python",
                                    ("--distributed=auto",) if nodes > 1 else ()))
           for e in entries]
  commands = os.path.join(launch_dir, f"{job}.commands.txt")
  files.write_bytes_atomic(commands, ("\n".join(lines) + "\n").encode())
  array = f"0-{len(entries) - 1}" + (f"%{max_parallel}" if max_parallel else "")
  header = [
      "#!/bin/bash",
      f"#SBATCH --job-name=stockpot-{job}",
      f"#SBATCH --array={array}",
      f"#SBATCH --nodes={nodes}",
      "#SBATCH --ntasks-per-node=1",
      f"#SBATCH --time={time_limit}",
      f"#SBATCH --output={launch_dir}/slurm-%A_%a.out",
  ] + ([f"#SBATCH --gres=gpu:{gpus_per_node}"] if gpus_per_node else []) \
    + ([f"#SBATCH --partition={partition}"] if partition else [])
  body = [
      "# One run per array task; with --nodes > 1, srun starts one process per node and",
      "# jax.distributed.initialize() reads SLURM's variables (--distributed=auto).",
      f"cd {shlex.quote(os.getcwd())}",
      f'COMMAND=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {commands})',
      'srun bash -c "$COMMAND"',
  ]
  script = os.path.join(launch_dir, f"{job}.sbatch")
  files.write_bytes_atomic(script, ("\n".join(header + [""] + body) + "\n").encode())
  return script


def tpu_commands(sweep_dir, base, entries, tpu_name, zone, repo_dir="~/stockpot", project=""):
  """The gcloud commands that run each run on every host of a TPU pod, one run after another."""
  commands = []
  for entry in entries:
    train = shlex.join(train_command(base, entry, sweep_dir, "python3",
                                     ("--distributed=auto",)))
    commands.append(
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu_name, f"--zone={zone}", "--worker=all"]
        + ([f"--project={project}"] if project else [])
        + [f"--command=cd {repo_dir} && {train}"])
  return commands


