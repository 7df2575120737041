"""Which parameters train: `config.trainable` (regexes of parameter paths), within SSF's set.

Everything else is frozen: it gets no gradient (the train step stops
gradients at frozen leaves, so no backward pass is spent on them), zero
updates and no optimizer state. A linear probe trains `('head/.*',)`; SSF
(`config.model.ssf`) trains only its scale/shift vectors and the head.
"""

import math
import re

import jax

from train import errors
from train import ssf
from train import trees

ALL = (".*",)


def mask_fn(config):
  """params -> tree of bools (True: trains), or None when every parameter trains."""
  patterns = tuple(config.trainable)
  if not patterns:
    raise errors.UserError(
        "config.trainable is empty: no parameter would train (use ('.*',) for all)")
  for pattern in patterns:
    try:
      re.compile(pattern)
    except re.error as e:
      raise errors.UserError(f"config.trainable has the invalid regex {pattern!r}: {e}") from e
  if patterns == ALL and not config.model.ssf:
    return None
  compiled = [re.compile(p) for p in patterns]

  def trains(path):
    return (any(p.fullmatch(path) for p in compiled)
            and (not config.model.ssf or ssf.is_trainable(path)))

  return lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: trains(trees.path_str(path)), params)


def count(params, mask):
  """(trainable, total) parameter counts of a tree of arrays or ShapeDtypeStructs."""
  sizes = [math.prod(leaf.shape) for leaf in jax.tree.leaves(params)]
  keeps = jax.tree.leaves(mask(params)) if mask else [True] * len(sizes)
  return sum(s for s, keep in zip(sizes, keeps) if keep), sum(sizes)


def stop_frozen_gradients(params, mask):
  """`params` with gradients stopped at the frozen leaves (identity when `mask` is None)."""
  if mask is None:
    return params
  return jax.tree.map(lambda p, keep: p if keep else jax.lax.stop_gradient(p), params, mask(params))
