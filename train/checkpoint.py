"""orbax checkpoints of a run: `<workdir>/checkpoints/<step>/{params,ema_low,ema_high,opt_state}`.

Each weight set is its own orbax item, so the soup step can restore
`ema_low` alone, with the sharding it wants, without reading the optimizer
state. Saves are asynchronous and atomic (orbax writes to a temporary
directory and renames it when complete); a step directory that exists is a
whole checkpoint.
"""

from etils import epath
import jax
import orbax.checkpoint as ocp

WEIGHT_NAMES = ("params", "ema_low", "ema_high")
STATE_ITEMS = WEIGHT_NAMES + ("opt_state",)


def checkpoint_dir(workdir):
  """Absolute path of a run's checkpoint directory (orbax needs absolute paths)."""
  return epath.Path(workdir).absolute() / "checkpoints"


def make_manager(workdir, every_steps=1, keep=None, read_only=False):
  """A CheckpointManager saving every `every_steps` steps and keeping the last `keep`."""
  options = ocp.CheckpointManagerOptions(
      save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(every_steps),
      max_to_keep=keep, create=not read_only,
      read_only=read_only, cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=STATE_ITEMS)


def save(manager, step, state, force=False):
  """Starts an async save of the train state dict; returns whether one started."""
  return manager.save(step, args=ocp.args.Composite(
      **{k: ocp.args.StandardSave(v) for k, v in state.items()}), force=force)


def item_metadata(path):
  """Tree of an orbax item's array metadata (`.shape`, `.dtype`), read without the arrays."""
  meta = ocp.StandardCheckpointer().metadata(path)
  return getattr(getattr(meta, "item_metadata", meta), "tree", meta)


def abstract_tree(tree, shardings):
  """ShapeDtypeStructs carrying `shardings`: orbax restores each array straight into place."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def restore(manager, step, abstract_state):
  """Restores the items named in `abstract_state` (a dict of ShapeDtypeStruct trees)."""
  restored = manager.restore(step, args=ocp.args.Composite(
      **{k: ocp.args.StandardRestore(v) for k, v in abstract_state.items()}))
  return {k: restored[k] for k in abstract_state}
