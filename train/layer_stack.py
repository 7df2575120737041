"""The encoder's blocks in two layouts: big_vision's per-block keys, or one stacked block.

With `config.model.scan_layers` the ViT holds its blocks as one scanned
`Transformer/encoderblock` whose every parameter has a leading `depth` axis
(`train/vit.py`); `.npz` files always hold big_vision's per-block
`Transformer/encoderblock_{i}` keys. These functions convert flat
{path: array} trees between the two, exactly (stacking and slicing only).
"""

import re

import numpy as np

from train import errors

STACKED_PREFIX = "Transformer/encoderblock/"
_PER_BLOCK = re.compile(r"Transformer/encoderblock_(\d+)/(.+)")


def is_stacked(keys):
  """Whether the '/'-joined parameter paths `keys` hold the encoder as one stacked block."""
  return any(key.startswith(STACKED_PREFIX) for key in keys)


def stack(flat):
  """Per-block tree -> stacked tree: `encoderblock_{i}/p` become `encoderblock/p`[i]."""
  blocks, rest = {}, {}
  for key, value in flat.items():
    match = _PER_BLOCK.fullmatch(key)
    if match:
      blocks.setdefault(match.group(2), {})[int(match.group(1))] = value
    else:
      rest[key] = value
  for name, by_index in blocks.items():
    if sorted(by_index) != list(range(len(by_index))):
      raise errors.UserError(f"encoder blocks of 'Transformer/encoderblock_*/{name}' are "
                             f"{sorted(by_index)}: expected 0..{len(by_index) - 1}")
    rest[STACKED_PREFIX + name] = np.stack([np.asarray(by_index[i]) for i in range(len(by_index))])
  return rest


def unstack(flat):
  """Stacked tree -> per-block tree (big_vision's `.npz` layout); per-block trees pass as is."""
  out = {}
  for key, value in flat.items():
    if key.startswith(STACKED_PREFIX):
      name = key[len(STACKED_PREFIX):]
      for i, block in enumerate(np.asarray(value)):
        out[f"Transformer/encoderblock_{i}/{name}"] = block
    else:
      out[key] = value
  return out


def to_layout(flat, stacked):
  """`flat` in the stacked layout when `stacked`, else in big_vision's per-block one."""
  if is_stacked(flat) == stacked:
    return flat
  return stack(flat) if stacked else unstack(flat)
