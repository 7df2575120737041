"""Multi-host set-up: `jax.distributed.initialize` from flags or the environment.

`--distributed=auto` lets JAX detect the cluster (SLURM, Cloud TPU pods,
Open MPI, Kubernetes) from its environment variables; `explicit` takes
`--coordinator_address`, `--num_processes` and `--process_id` (e.g. several
processes on one machine); `none` runs a single process.
"""

from absl import flags
import jax

from train import errors

MODES = ("none", "auto", "explicit")
_MODE = flags.DEFINE_enum("distributed", "none", MODES, "How processes find each other.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (explicit).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes in the job (explicit).")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index (explicit).")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout", 100, "Seconds without a heartbeat after which a process counts as "
    "lost and the others stop with an error instead of waiting on it.")


def initialize():
  """Joins the multi-process job the flags describe; a no-op for `--distributed=none`."""
  if _MODE.value == "none":
    return
  if _MODE.value == "auto":
    jax.distributed.initialize(heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value)
    return
  if not _COORDINATOR.value:
    raise errors.UserError("--distributed=explicit needs --coordinator_address=host:port")
  if not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
    raise errors.UserError(f"--process_id={_PROCESS_ID.value} is not in [0, --num_processes="
                           f"{_NUM_PROCESSES.value})")
  jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                             heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value)
