"""SIGTERM, the preemption notice of TPU VMs, SLURM and Kubernetes: checkpoint, then stop.

One process: a handler notes the signal and the loop stops after its current
step. Several processes: JAX's preemption service (on with `jax.distributed`)
relays the notice to every host and names one step at which all of them stop,
so the checkpoint is written collectively at the same step.
"""

import signal

import jax
from jax.experimental import multihost_utils

EXIT_CODE = 128 + signal.SIGTERM  # What the shell reports for a SIGTERM'd process: not finished.


class Preempted(Exception):
  """Training stopped on a preemption notice after checkpointing `step`."""

  def __init__(self, step, directory):
    super().__init__(f"preempted (SIGTERM) after step {step}: checkpoint saved in {directory}; "
                     "re-run the same command to resume")
    self.step = step


class Notice:
  """`reached(step)`: whether to checkpoint and stop after `step`; a context manager."""

  def __init__(self):
    self._received = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1:  # Several processes: the preemption service handles SIGTERM.
      self._previous = signal.signal(signal.SIGTERM, self._note)
    return self

  def __exit__(self, *exc):
    """Restores the previous SIGTERM handler."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _note(self, signum, frame):
    del signum, frame
    self._received = True

  def reached(self, step):
    if jax.process_count() == 1:
      return self._received
    return multihost_utils.reached_preemption_sync_point(step)
