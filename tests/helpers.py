"""Helpers for tests that run the real entry points."""

import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module, *args, devices=1, timeout=900, check=True, env=None):
  """Runs `python -m module args` from the repo root like a user would; returns the process."""
  child_env = {**os.environ, **(env or {})}
  child_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=child_env,
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode:
    raise AssertionError(f"python -m {module} {' '.join(args)} failed ({proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
  return proc


def free_port():
  """A TCP port on localhost that nothing listens on now (for jax.distributed's coordinator)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start_processes(module, args, count, port, devices=1):
  """`python -m module args` as `count` processes joined by jax.distributed on localhost:port,
  each with `devices` CPU devices; returns the Popen objects (stdout and stderr piped)."""
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  return [subprocess.Popen(
      [sys.executable, "-m", module, *args, "--distributed=explicit",
       f"--coordinator_address=localhost:{port}", f"--num_processes={count}",
       f"--process_id={i}"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(count)]
