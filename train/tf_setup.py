"""TensorFlow only reads and preprocesses data on the host: every command keeps it off the GPUs,
and its C++ start-up log off the console.

A command that uses TensorFlow imports this module first, before anything else
imports TensorFlow (then `# isort: split`). TF_CPP_MIN_LOG_LEVEL defaults to 2
(TensorFlow's C++ INFO and WARNING lines hidden). TensorFlow's C++ log goes
through absl's, which writes every line to stderr until it is initialised,
whatever TF_CPP_MIN_LOG_LEVEL says (`I0000 ... port.cc:153] oneDNN custom
operations are on ...`): while TensorFlow loads, what it writes to stderr is
filtered by that level here. TF_CPP_MIN_LOG_LEVEL=0 shows everything.
"""

import contextlib
import os
import re
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# absl's C++ log line: severity letter, MMDD, time, thread, file:line].
_NATIVE_LOG_LINE = re.compile(rb"([IWE])\d{4} [\d:.]+ +\d+ \S+:\d+\] ")
_NATIVE_LOG_BANNER = b"WARNING: All log messages before absl::InitializeLog() is called"
_SEVERITY = {b"I": 0, b"W": 1, b"E": 2}


def _shown(line, min_level):
  """Whether TF_CPP_MIN_LOG_LEVEL=`min_level` lets a line TensorFlow wrote to stderr through."""
  if line.startswith(_NATIVE_LOG_BANNER):
    return min_level < 1
  match = _NATIVE_LOG_LINE.match(line)
  return match is None or _SEVERITY[match.group(1)] >= min_level


@contextlib.contextmanager
def _stderr_filtered(shown):
  """Captures file descriptor 2 during the block, then writes back the lines `shown` accepts."""
  sys.stderr.flush()
  try:
    saved = os.dup(2)
  except OSError:  # No stderr to filter.
    yield
    return
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      kept = b"".join(line for line in captured.read().splitlines(keepends=True)
                      if shown(line))
      while kept:
        kept = kept[os.write(2, kept):]


def _min_log_level():
  try:
    return int(os.environ["TF_CPP_MIN_LOG_LEVEL"])
  except ValueError:
    return 0


with _stderr_filtered(lambda line: _shown(line, _min_log_level())):
  import tensorflow as tf  # noqa: E402  # pylint: disable=g-import-not-at-top


def hide_gpus_from_tensorflow():
  """Leaves the accelerators to JAX; call first in a command's main, before TF runs any op."""
  tf.config.set_visible_devices([], "GPU")
