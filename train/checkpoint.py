"""orbax checkpoints of a run: `<workdir>/checkpoints/<step>/{params,ema_low,ema_high,opt_state}`.

Each weight set is its own orbax item, so the soup step can restore
`ema_low` alone, with the sharding it wants, without reading the optimizer
state. Saves are asynchronous and atomic (orbax writes to a temporary
directory and renames it when complete); a step directory that exists is a
whole checkpoint.
"""

from etils import epath
import orbax.checkpoint as ocp

from train import errors
from train import run_dir

WEIGHT_NAMES = ("params", "ema_low", "ema_high")
STATE_ITEMS = WEIGHT_NAMES + ("opt_state",)


def make_manager(workdir, every_steps=1, keep=None, read_only=False):
  """A CheckpointManager saving every `every_steps` steps and keeping the last `keep`."""
  options = ocp.CheckpointManagerOptions(
      save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(every_steps),
      max_to_keep=keep, create=not read_only,
      read_only=read_only, cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(run_dir.checkpoint_dir(workdir), options=options,
                               item_names=STATE_ITEMS)


class WriteError(OSError):
  """A checkpoint could not be written (a full disk, a lost mount); earlier ones are intact."""


def describe(error):
  """The first line of an orbax/tensorstore error, which names the file, without tensorstore's spec.

  Their messages run to pages: the spec alone (every context option, as JSON)
  is longer than the part that says what went wrong.
  """
  first_line = (str(error).splitlines() or [repr(error)])[0]
  return first_line.split(" [tensorstore_spec=")[0][:600]


def _complete_steps(manager):
  """The complete checkpoints' steps of a `make_manager` manager (its directory is the run's)."""
  return run_dir.checkpoint_steps(epath.Path(manager.directory).parent)


def _write_error(manager, error):
  steps = _complete_steps(manager)
  return WriteError(
      f"writing a checkpoint to {manager.directory} failed: {describe(error)}. "
      + (f"The last complete checkpoint is step {steps[-1]}" if steps
         else "No checkpoint is complete")
      + "; free space and re-run the same command to resume.")


def save(manager, step, state, force=False):
  """Starts an async save of the train state dict; returns whether one started.

  A failure of the previous async save surfaces here as a `WriteError`.
  """
  try:
    return manager.save(step, args=ocp.args.Composite(
        **{k: ocp.args.StandardSave(v) for k, v in state.items()}), force=force)
  except Exception as e:  # orbax re-raises whatever its write threads hit.
    raise _write_error(manager, e) from e


def wait_until_written(manager):
  """Blocks until the save in flight is on disk; a failed write raises `WriteError`."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # orbax re-raises whatever its write threads hit.
    raise _write_error(manager, e) from e


def item_metadata(path):
  """Tree of an orbax item's array metadata (`.shape`, `.dtype`), read without the arrays."""
  # The handler, not a Checkpointer: an item directory has no step metadata to warn about.
  meta = ocp.StandardCheckpointHandler().metadata(epath.Path(path))
  tree = getattr(meta, "tree", meta)
  if not isinstance(tree, dict):  # Not saved as a tree of arrays (unreadable files raise above).
    raise errors.UserError(f"orbax checkpoint {path} does not hold a tree of arrays")
  return tree


def restore(manager, step, abstract_state):
  """Restores the items named in `abstract_state` (a dict of ShapeDtypeStruct trees).

  An unreadable checkpoint (truncated or corrupted files, another model's
  shapes) is a ValueError naming it and the step the run could resume from.
  """
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        **{k: ocp.args.StandardRestore(v) for k, v in abstract_state.items()}))
  except Exception as e:  # orbax and tensorstore raise many types for unreadable files.
    earlier = [s for s in _complete_steps(manager) if s < step]
    raise errors.UserError(
        f"checkpoint {manager.directory / str(step)} cannot be restored: {describe(e)}. Move it "
        "out of the way to resume from "
        + (f"step {earlier[-1]}" if earlier else "the start") + " with the same command") from e
  return {k: restored[k] for k in abstract_state}
