"""big_vision-style `.npz` checkpoints: load into our ViT, export back.

An `.npz` holds one array per parameter, keyed by the `/`-joined path
(`Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel`). Loading adapts a
checkpoint to the model being trained: the position embedding is resampled to
the new patch grid, the head is re-initialised to zeros when the class count
differs, and anything else that does not fit is an error naming the key.
"""

import io
import json
import os
import re
import zipfile

from absl import logging
from etils import epath
import numpy as np
import scipy.ndimage

from train import errors
from train import files
from train import layer_stack
from train import npz
from train import run_dir
from train import ssf
from train import trees
from train import vit

HEAD_KEYS = ("head/kernel", "head/bias")


def load_npz(path):
  """Reads an `.npz` into {key: np.ndarray}; a corrupt file names itself."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  try:
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as archive:
      return {key: archive[key] for key in archive.files}
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
    raise errors.UserError(f"checkpoint {path} is not a readable .npz file: {e}") from e


def save_npz(path, params):
  """Writes `params` (nested or already flat) to `path` atomically, as big_vision lays it out.

  Each array's data is 64-byte aligned in the file (train/npz.py), so the soup
  step maps it rather than copying it.
  """
  files.write_bytes_atomic(path, npz.aligned_npz_bytes(trees.flatten(params)))


def export_npz(path, params):
  """Writes weights to run elsewhere as a plain big_vision `.npz`: the encoder per block
  (train/layer_stack.py), SSF pairs folded in (train/ssf.py), every array float32."""
  plain = trees.flatten(ssf.merge(layer_stack.unstack(trees.flatten(params))))
  save_npz(path, {key: np.asarray(value, np.float32) for key, value in plain.items()})


def grid_size(num_tokens, what):
  """Side of the square patch grid that `num_tokens` position embeddings cover."""
  side = int(round(np.sqrt(num_tokens)))
  if side * side != num_tokens:
    raise errors.UserError(f"{what}: {num_tokens} position embeddings are not a square grid")
  return side


def resample_posemb(old, new_shape, what="pos_embedding"):
  """Resizes a (1, g*g, D) position embedding to `new_shape` (1, g'*g', D).

  Bilinear (order-1 spline) interpolation over the 2-D grid, as big_vision
  does for high-resolution fine-tuning.
  """
  if tuple(old.shape) == tuple(new_shape):
    return old
  if old.shape[0] != 1 or old.shape[2] != new_shape[2]:
    raise errors.UserError(f"{what}: cannot resample shape {tuple(old.shape)} to "
                           f"{tuple(new_shape)} (batch dim must be 1 and widths equal)")
  g_old = grid_size(old.shape[1], f"{what} (checkpoint)")
  g_new = grid_size(new_shape[1], f"{what} (model)")
  logging.info("Resampling %s from a %dx%d to a %dx%d grid", what, g_old, g_old, g_new, g_new)
  grid = np.asarray(old, np.float32).reshape(g_old, g_old, -1)
  grid = scipy.ndimage.zoom(grid, (g_new / g_old, g_new / g_old, 1), order=1)
  return grid.reshape(new_shape).astype(old.dtype)


def _split_class_token_posemb(restored, model_shape):
  """Older ViTs store the class token's position embedding as entry 0.

  Keep it: our ViT adds position embeddings before prepending the class token,
  so the class token's entry is folded into `cls` (identical function) and
  the remaining grid is what gets resampled. A model with `posemb_cls` takes
  it as it is.
  """
  posemb = restored.get("pos_embedding")
  if posemb is None or posemb.ndim != 3 or tuple(posemb.shape) == model_shape:
    return restored
  n = posemb.shape[1]
  side = int(round(np.sqrt(n - 1)))
  if n > 1 and side * side == n - 1 and int(round(np.sqrt(n))) ** 2 != n:
    restored = dict(restored, pos_embedding=posemb[:, 1:])
    if "cls" in restored:
      restored["cls"] = restored["cls"] + posemb[:, :1]
  return restored


def _rename_legacy_keys(restored):
  """Maps the original ViT release's `Transformer/posembed_input/...` name."""
  for legacy in ("Transformer/posembed_input/pos_embedding", "Transformer/pos_embedding"):
    if legacy in restored:
      restored = dict(restored)
      restored["pos_embedding"] = restored.pop(legacy)
  return restored


def adopt_architecture(model_config, path):
  """Sets `model_config`'s architecture keys to those recorded next to a converted `.npz`.

  `python -m train.convert` writes <stem>.config.json; its variant, pool type
  and PyTorch-variant keys (vit.VARIANT_KEYS) are what the weights need.
  Returns {key: value} of the keys changed; {} when there is no such file.
  """
  sibling = path and run_dir.sibling_config(path)
  if not sibling or not os.path.isfile(sibling):
    return {}
  with open(sibling) as f:
    recorded = json.load(f).get("model", {})
  changed = {k: recorded[k] for k in ("variant", "pool_type") + vit.VARIANT_KEYS
             if k in recorded and model_config.get(k) != recorded[k]}
  model_config.update(changed)
  return changed


def _matches(key, patterns):
  return any(re.fullmatch(p, key) for p in patterns)


def load_pretrained(init_params, path, dont_load=(), ignore=()):
  """Returns `init_params` with values taken from the `.npz` at `path`.

  Args:
    init_params: the model's freshly initialised parameters (nested dict), its
      encoder per block or stacked (train/layer_stack.py).
    path: big_vision-style `.npz` (per-block or stacked); keys and the patterns
      below are matched in the per-block layout.
    dont_load: regexes of model keys that keep their init value (e.g. the head).
    ignore: regexes of checkpoint keys the model has no use for (e.g.
      `pre_logits/.*` of an ImageNet-21k checkpoint).

  Raises:
    ValueError naming the file, the key and both shapes on any mismatch other
    than the position-embedding grid and the head's class count.
  """
  # Matched in big_vision's per-block layout, whichever layout the model and file use.
  stacked = layer_stack.is_stacked(trees.flatten(init_params))
  model_flat = layer_stack.unstack(trees.flatten(init_params))
  restored = _split_class_token_posemb(_rename_legacy_keys(layer_stack.unstack(load_npz(path))),
                                       tuple(getattr(model_flat.get("pos_embedding"), "shape", ())))
  extra = sorted(k for k in restored if k not in model_flat and not _matches(k, ignore))
  # SSF vectors start at the identity unless the checkpoint has them (train/ssf.py).
  dont_load = tuple(re.escape(k) for k in model_flat
                    if ssf.is_ssf_param(k) and k not in restored) + tuple(dont_load)
  missing = sorted(k for k in model_flat
                   if k not in restored and not _matches(k, dont_load))
  if extra:
    raise errors.UserError(f"{path}: key {extra[0]!r} is not a parameter of the model "
                           f"({len(extra)} extra keys: {extra[:5]}); add a pattern to "
                           "config.model_load.ignore to skip it")
  if missing:
    raise errors.UserError(f"{path}: model parameter {missing[0]!r} is missing from the "
                           f"checkpoint ({len(missing)} missing keys: {missing[:5]}); add "
                           "a pattern to config.model_load.dont_load to keep its init")
  loaded = {}
  for key, init in model_flat.items():
    if _matches(key, dont_load):
      loaded[key] = init
      continue
    value = restored[key]
    if key == "pos_embedding":
      value = resample_posemb(value, init.shape, f"{path}: pos_embedding")
    elif key in HEAD_KEYS and value.shape[:-1] == init.shape[:-1] and value.shape != init.shape:
      logging.info("%s: %s has %d classes, the model %d: re-initialising the head to zeros",
                   path, key, value.shape[-1], init.shape[-1])
      value = np.zeros(init.shape, init.dtype)
    if tuple(value.shape) != tuple(init.shape):
      raise errors.UserError(f"{path}: key {key!r} has shape {tuple(value.shape)} in the "
                             f"checkpoint but {tuple(init.shape)} in the model")
    loaded[key] = np.asarray(value, dtype=init.dtype)
  return trees.unflatten(layer_stack.to_layout(loaded, stacked))
