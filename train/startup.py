"""What every stockpot command does first: quiet library logs, an XLA compile cache, a lighter GC.

The runs of a sweep compile the same train and eval steps, and every soup of
a model the same averaging steps: with a persistent compilation cache only
the first process pays for a compile, later ones load the executable. JAX's
own settings win where the user gives them (`JAX_COMPILATION_CACHE_DIR`,
`JAX_ENABLE_COMPILATION_CACHE=false` to turn the cache off,
`JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`, `JAX_COMPILATION_CACHE_MAX_SIZE`);
on a pod, point the directory at storage every host shares.
"""

import gc
import os

import jax

from train import run_log

# Compiles faster than this are not worth a file (eager ops, tiny jits).
MIN_COMPILE_SECONDS = 0.1
# Beyond this size jax deletes the least recently used entries.
MAX_CACHE_BYTES = 4 << 30


def default_compile_cache_dir():
  """`$XDG_CACHE_HOME/stockpot/xla`, or `~/.cache/stockpot/xla`."""
  cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache_home, "stockpot", "xla")


def enable_compile_cache():
  """Turns JAX's persistent compilation cache on, with stockpot's defaults for unset settings."""
  defaults = (("jax_compilation_cache_dir", default_compile_cache_dir()),
              ("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS),
              ("jax_compilation_cache_max_size", MAX_CACHE_BYTES))
  for name, value in defaults:
    if name.upper() not in os.environ:  # jax read the user's setting from there.
      jax.config.update(name, value)


def init():
  """Call first in a command's main, once its imports are done."""
  run_log.quiet_library_logs()
  enable_compile_cache()
  # The ~0.4 M objects the imports made (jax, TensorFlow, orbax) live as long as the
  # process: frozen, the collector stops re-scanning them, 0.1-0.2 s per full collection.
  gc.freeze()
