"""Every command's start-up: the persistent XLA compilation cache lands where the user expects."""

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

# A command's start, then one compile: what `python -m train/eval/soups` do first.
_COMPILE_ONCE = """
from train import startup
startup.init()
import jax, jax.numpy as jnp
jax.block_until_ready(jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((8, 8))))
"""


def _start_and_compile(tmp_path, **env):
  """Runs _COMPILE_ONCE with the user's cache home in tmp_path; returns the cache entries made."""
  child_env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}  # conftest's.
  child_env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), JAX_PLATFORMS="cpu",
                   # Every compile counts, however quick (the user's setting wins over ours).
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **env)
  proc = subprocess.run([sys.executable, "-c", _COMPILE_ONCE], cwd=REPO, env=child_env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return {d: sorted(os.listdir(tmp_path / d)) if (tmp_path / d).exists() else []
          for d in ("xdg/stockpot/xla", "mine")}


@pytest.mark.slow
def test_compiles_are_cached_under_the_users_cache_home_by_default(tmp_path):
  entries = _start_and_compile(tmp_path)
  assert any(name.startswith("jit_") for name in entries["xdg/stockpot/xla"]), entries


@pytest.mark.slow
def test_the_users_jax_cache_settings_win(tmp_path):
  entries = _start_and_compile(tmp_path, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "mine"))
  assert entries["xdg/stockpot/xla"] == [] and any(n.startswith("jit_") for n in entries["mine"])


@pytest.mark.slow
def test_the_cache_can_be_turned_off(tmp_path):
  entries = _start_and_compile(tmp_path, JAX_ENABLE_COMPILATION_CACHE="false")
  assert entries == {"xdg/stockpot/xla": [], "mine": []}
