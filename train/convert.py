"""Converts PyTorch ViT checkpoints to big_vision `.npz` and back to timm `.safetensors`.

  python -m train.convert --from=open_clip --in=model_soups/model_0.pt --out=soups/m0.npz
  python -m train.convert --to=safetensors --in=soups/greedy/params.npz \
      --run_config=soups/m0.config.json --out=greedy.safetensors

To `.npz`, it also writes <out stem>.config.json: the run config (data from
--config, by default configs/common.py's) with the model keys and class count
of the checkpoint, which `python -m eval` and `python -m soups` find next to
the weights. To `.safetensors`, the `.npz`'s model config is its run's or its
<stem>.config.json. See docs/interop.md.
"""

import json

from absl import flags
from ml_collections import config_flags

from configs import common
from eval import run_config
from train import command
from train import errors
from train import files
from train import pretrained
from train import run_dir
from train import torch_files
from train import torch_layouts

_FROM = flags.DEFINE_enum("from", None, torch_layouts.SOURCES,
                          "The checkpoint's layout; default: found from its keys.")
_IN = flags.DEFINE_string("in", None, "A .safetensors/.pt/.pth/.bin file, a Hugging Face model "
                          "directory, or (with --to=safetensors) a stockpot .npz.", required=True)
_OUT = flags.DEFINE_string("out", None, "The .npz (or .safetensors) to write.", required=True)
_TO = flags.DEFINE_enum("to", "npz", ("npz", "safetensors"), "The output format.")
_GELU = flags.DEFINE_enum("gelu", "", ("",) + ("tanh", "erf", "quick"),
                          "Override the source's activation (timm's CLIP ViTs: quick).")
_LN_EPS = flags.DEFINE_float("ln_eps", 0.0, "Override the source's LayerNorm epsilon; 0: its own.")
_RUN_CONFIG = flags.DEFINE_string(
    "run_config", "", "--to=safetensors: the run config (.json) of --in when it has none next to "
    "it or above it (a soup's <soup_dir>/<recipe>/params.npz: its ingredients' config).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The run config the .npz's config.json starts from (data, eval); default "
    "configs/common.py's base config.")


def to_npz(path, out, config, source="", gelu="", ln_eps=0.0):
  """Writes `out` (.npz) and its <stem>.config.json from `config`; returns the config."""
  if not out.endswith(".npz"):
    raise errors.UserError(f"--out={out} must end in .npz (or pass --to=safetensors)")
  params, options = torch_files.convert(path, source, gelu, ln_eps)
  config.unlock()
  config.model.update(options)
  config.num_classes = int(params["head/bias"].shape[0])
  config.model_init = ""
  pretrained.save_npz(out, params)
  files.write_json_atomic(run_dir.sibling_config(out), json.loads(config.to_json()))
  return config


def to_safetensors(path, out, config_path=""):
  """Writes the .npz at `path` to `out` in timm's layout; its model from `config_path` or found."""
  config_path = config_path or run_config.find(path)
  if config_path is None:
    raise errors.UserError(f"no run config.json or {run_dir.SIBLING_CONFIG} found for {path}: "
                           "pass --run_config=<the ingredients' config.json>")
  model = run_config.load(config_path).model.to_dict()
  torch_files.write_safetensors(out, pretrained.load_npz(path), model)


def main(argv):
  del argv
  if _TO.value == "safetensors":
    to_safetensors(_IN.value, _OUT.value, _RUN_CONFIG.value)
  else:
    to_npz(_IN.value, _OUT.value, _CONFIG.value or common.base_config(), _FROM.value or "",
           _GELU.value, _LN_EPS.value)
  print(f"[convert] wrote {_OUT.value}")


if __name__ == "__main__":
  command.run(main)
