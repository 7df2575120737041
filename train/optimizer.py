"""The optax optimizer and learning-rate schedule a config asks for.

`config.optimizer.name`: 'sgd' (momentum, optionally Nesterov), 'adam' or
'adamw'; `config.lr` with `config.schedule` (linear warmup, then 'cosine',
'linear' or 'constant' decay to `end_lr_fraction * lr`); gradient clipping by
global norm. Weight decay applies to the leaves matching
`config.optimizer.weight_decay_pattern`: as an L2 gradient term for 'sgd' and
'adam' (PyTorch's convention), decoupled and schedule-scaled for 'adamw'.
`config.optimizer.sam_rho > 0` wraps the whole optimizer in SAM
(`optax.contrib.sam` in opaque mode: `update` needs `grad_fn=`).
Only the leaves that `config.trainable` (and SSF, see train/trainable.py)
selects train: the frozen ones get zero updates and no optimizer state.
"""

import re

import jax
import optax

from train import errors
from train import trainable as trainable_lib
from train import trees

OPTIMIZERS = ("sgd", "adam", "adamw")
DECAYS = ("cosine", "linear", "constant")


def make_schedule(lr, schedule, total_steps):
  """Linear warmup from 0 to `lr`, then decay to `lr * end_lr_fraction` at `total_steps`."""
  if schedule.decay not in DECAYS:
    raise errors.UserError(f"config.schedule.decay={schedule.decay!r}; known: {DECAYS}")
  if not 0 <= schedule.warmup_steps < total_steps:
    raise errors.UserError(f"config.schedule.warmup_steps={schedule.warmup_steps} must be in "
                           f"[0, config.total_steps={total_steps})")
  decay_steps = total_steps - schedule.warmup_steps
  decay = {
      "cosine": lambda: optax.cosine_decay_schedule(lr, decay_steps,
                                                    alpha=schedule.end_lr_fraction),
      "linear": lambda: optax.linear_schedule(lr, lr * schedule.end_lr_fraction, decay_steps),
      "constant": lambda: optax.constant_schedule(lr),
  }[schedule.decay]()
  warmup = optax.linear_schedule(0.0, lr, schedule.warmup_steps)
  return optax.join_schedules([warmup, decay], [schedule.warmup_steps])


def _weight_decay(opt):
  pattern = re.compile(opt.weight_decay_pattern)
  mask = lambda params: jax.tree_util.tree_map_with_path(  # pylint: disable=g-long-lambda
      lambda path, _: bool(pattern.fullmatch(trees.path_str(path))), params)
  return optax.add_decayed_weights(opt.weight_decay, mask=mask)


def make_optimizer(config):
  """Returns (optax transform, schedule) for `config.optimizer`, `lr`, `schedule`."""
  opt = config.optimizer
  if opt.name not in OPTIMIZERS:
    raise errors.UserError(f"config.optimizer.name={opt.name!r}; known: {OPTIMIZERS}")
  schedule = make_schedule(config.lr, config.schedule, config.total_steps)
  decay = [_weight_decay(opt)] if opt.weight_decay else []
  clip = [optax.clip_by_global_norm(opt.grad_clip_norm)] if opt.grad_clip_norm > 0 else []
  if opt.name == "sgd":
    base = [optax.trace(decay=opt.momentum, nesterov=opt.nesterov)] if opt.momentum else []
    parts = clip + decay + base
  elif opt.name == "adam":
    parts = clip + decay + [optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps)]
  else:
    parts = clip + [optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps)] + decay
  tx = optax.chain(*parts, optax.scale_by_learning_rate(schedule))
  trainable = trainable_lib.mask_fn(config)
  if opt.sam_rho < 0:
    raise errors.UserError(f"config.optimizer.sam_rho={opt.sam_rho} must be >= 0 (0: off)")
  if opt.sam_rho:
    return with_sam(tx, opt.sam_rho, trainable), schedule
  return only_trainable(tx, trainable), schedule


def only_trainable(tx, trainable):
  """`tx` on the leaves where `trainable(params)` is True; the others never move.

  optax.multi_transform hands `tx` the trainable leaves alone, so gradient
  clipping and optimizer state see only them. `trainable=None`: `tx` as is.
  """
  if trainable is None:
    return tx
  labels = lambda params: jax.tree.map(  # pylint: disable=g-long-lambda
      lambda keep: "trainable" if keep else "frozen", trainable(params))
  return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)


def with_sam(tx, rho, trainable=None):
  """SAM around `tx`: the gradient is taken at w + rho * g / |g|, then `tx` steps from w.

  Opaque mode runs the ascent step inside `update` (one call per training
  step, through `grad_fn(params, i)`), so EMAs and step counts stay per step.
  With `trainable` (see `only_trainable`), both steps move only those leaves.
  """
  ascent = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
  return optax.contrib.sam(only_trainable(tx, trainable), only_trainable(ascent, trainable),
                           sync_period=2, opaque_mode=True)
