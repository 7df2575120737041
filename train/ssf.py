"""SSF (Lian et al., NeurIPS 2022): a learned per-channel scale and shift after each op.

With `config.model.ssf`, the ViT applies `y = scale * x + shift` after the
patch embedding, every attention projection (query, key, value, out), both MLP
layers and every LayerNorm. Each pair lives in a sibling module named after
the op it follows (`.../MultiHeadDotProductAttention_0/query_ssf/{scale,shift}`),
so `merge` can fold it into that op: `W' = W * scale` (over the output
channels), `b' = b * scale + shift`. The merged tree is a plain ViT's, with no
extra inference cost. Only the SSF vectors and the head train.
"""

import re

import flax.linen as nn
import jax

from train import trees

SUFFIX = "_ssf"
# '/'-joined paths of the parameters that SSF adds, and of those that train.
PARAMS = rf"(.*/)?[^/]+{SUFFIX}/(scale|shift)"
TRAINABLE = rf"{PARAMS}|head/(kernel|bias)"


class ScaleShift(nn.Module):
  """y = scale * x + shift over the last `channel_dims` axes; identity at init."""
  channel_dims: int = 1

  @nn.compact
  def __call__(self, x):
    channels = x.shape[x.ndim - self.channel_dims:]
    scale = self.param("scale", nn.initializers.ones, channels)
    shift = self.param("shift", nn.initializers.zeros, channels)
    return x * scale.astype(x.dtype) + shift.astype(x.dtype)


def after(op_name, x, enabled, channel_dims=1):
  """`x` (the output of the op `op_name`) through its SSF pair when `enabled`."""
  if not enabled:
    return x
  return ScaleShift(channel_dims, name=op_name + SUFFIX)(x)


def is_ssf_param(path):
  return re.fullmatch(PARAMS, path) is not None


def has_ssf(params):
  """Whether a parameter tree (nested, or flat with '/'-joined keys) holds SSF vectors."""
  return any(is_ssf_param(path) for path in trees.flatten(params))


def is_trainable(path):
  """Whether SSF tunes the parameter at `path`: its scale/shift vectors and the head."""
  return re.fullmatch(TRAINABLE, path) is not None


def trainable_mask(params):
  """A tree of bools: True for the SSF vectors and the head, False for the frozen backbone."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: is_trainable(trees.path_str(path)), params)


def merge(params):
  """Folds every SSF pair into the op it follows; returns a plain ViT tree.

  Works on numpy or jax arrays (and under jit). The op's multiplicative
  parameter (`kernel`, or a LayerNorm's `scale`) is scaled over its output
  channels, which are its trailing axes; its `bias` becomes `bias * scale + shift`.
  """
  flat = trees.flatten(params)
  merged = {k: v for k, v in flat.items() if not is_ssf_param(k)}
  for key in sorted(k for k in flat if k.endswith(SUFFIX + "/scale")):
    module = key[:-len(SUFFIX + "/scale")]
    scale, shift = flat[key], flat[f"{module}{SUFFIX}/shift"]
    weight = f"{module}/kernel" if f"{module}/kernel" in flat else f"{module}/scale"
    if weight not in flat or f"{module}/bias" not in flat:
      raise ValueError(f"SSF pair {module}{SUFFIX} follows no op with a kernel (or LayerNorm "
                       f"scale) and a bias: {module!r} is not in the tree")
    merged[weight] = flat[weight] * scale
    merged[f"{module}/bias"] = flat[f"{module}/bias"] * scale + shift
  return trees.unflatten(merged)
