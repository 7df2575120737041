"""Reads PyTorch ViT checkpoints into big_vision parameters, and writes timm `.safetensors`.

`.safetensors` files are read with the `safetensors` package's numpy API (no
PyTorch); pickled `.pt`/`.pth`/`.bin` state dicts need torch, imported only
for them. A Hugging Face model directory is read with its `config.json` (the
activation and LayerNorm epsilon). The source layout is told by `--from` or
found from the keys (`detect_source`).
"""

import json
import os

import numpy as np
import safetensors
import safetensors.numpy

from train import errors
from train import files
from train import torch_layouts

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
# The model config a `--to=safetensors` file carries in its metadata, to be read back exactly.
METADATA_KEY = "stockpot.model"
# Hugging Face `hidden_act` -> model.gelu.
_HF_GELU = {"gelu": "erf", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "quick_gelu": "quick"}


def is_torch_checkpoint(path):
  return path.endswith((".safetensors",) + TORCH_SUFFIXES)


def _load_pickle(path):
  try:
    import torch  # pylint: disable=g-import-not-at-top  # Only pickled checkpoints need it.
  except ImportError as e:
    raise errors.UserError(f"reading {path} needs PyTorch (pip install torch), or convert it to "
                           ".safetensors first: stockpot reads .safetensors without torch") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(state, dict) and "state_dict" in state:
    state = state["state_dict"]
  if not isinstance(state, dict):
    raise errors.UserError(f"{path} holds a {type(state).__name__}, not a state dict")
  return {k: v.float().numpy() for k, v in state.items() if hasattr(v, "float")}


def _hf_dir(path):
  """A Hugging Face model directory's weights file and config.json contents."""
  for name in ("model.safetensors", "pytorch_model.bin"):
    if os.path.isfile(os.path.join(path, name)):
      config = os.path.join(path, "config.json")
      hf_config = json.loads(open(config).read()) if os.path.isfile(config) else {}
      return os.path.join(path, name), hf_config
  raise FileNotFoundError(f"{path} holds neither model.safetensors nor pytorch_model.bin")


def read_state(path):
  """{key: float32 array}, the model config stored with it ({} if none), HF's config.json."""
  hf_config = {}
  if os.path.isdir(path):
    path, hf_config = _hf_dir(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  if path.endswith(".safetensors"):
    try:
      with safetensors.safe_open(path, "np") as f:
        stored = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
      state = safetensors.numpy.load_file(path)
    except (safetensors.SafetensorError, OSError, ValueError) as e:
      raise errors.UserError(f"{path} is not a readable .safetensors file: {e}") from e
    return {k: v.astype(np.float32) for k, v in state.items()}, stored, hf_config
  if path.endswith(TORCH_SUFFIXES):
    return _load_pickle(path), {}, hf_config
  raise errors.UserError(f"{path}: expected a .safetensors, {'/'.join(TORCH_SUFFIXES)} file or "
                         "a Hugging Face model directory")


def detect_source(state, path):
  """'timm', 'open_clip' or 'hf', from the keys of `state` (read from `path`)."""
  if "patch_embed.proj.weight" in state:
    return "timm"
  if any(k.endswith("conv1.weight") for k in state):
    return "open_clip"
  if any(k.startswith("vit.embeddings.") for k in state):
    return "hf"
  raise errors.UserError(f"{path}: not a timm, open_clip (model-soups) or Hugging Face ViT "
                         f"state dict (first keys: {sorted(state)[:5]})")


def convert(path, source="", gelu="", ln_eps=0.0):
  """(flat big_vision params, model config keys) of the checkpoint at `path`.

  `gelu`/`ln_eps` override the source's defaults (e.g. timm's CLIP models use
  QuickGELU and 1e-5, which their weights do not tell).
  """
  state, stored, hf_config = read_state(path)
  source = source or detect_source(state, path)
  if source not in torch_layouts.READERS:
    raise errors.UserError(f"unknown source {source!r}; known: {torch_layouts.SOURCES}")
  overrides = {k: v for k, v in stored.items() if k in ("gelu", "ln_eps")}
  if hf_config:
    act = hf_config.get("hidden_act", "gelu")
    if act not in _HF_GELU:
      raise errors.UserError(f"{path}: hidden_act {act!r} is not one of {list(_HF_GELU)}")
    overrides = dict(gelu=_HF_GELU[act], ln_eps=hf_config.get("layer_norm_eps", 1e-12))
  overrides.update({k: v for k, v in (("gelu", gelu), ("ln_eps", ln_eps)) if v})
  try:
    return torch_layouts.READERS[source](state, **overrides)
  except errors.UserError as e:
    raise errors.UserError(f"{path}: {e}") from e


def write_safetensors(path, params, model_config):
  """timm's layout of `params` to `path`, with `model_config` in the file's metadata."""
  state = torch_layouts.write_timm(params, model_config)
  metadata = {METADATA_KEY: json.dumps(dict(model_config))}
  files.write_bytes_atomic(path, safetensors.numpy.save(state, metadata=metadata))
