"""Helpers for tests that run the real entry points."""

import os
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
