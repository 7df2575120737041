"""PyTorch ViT state dicts (timm, open_clip / model-soups, Hugging Face) <-> big_vision's tree.

Each reader takes {key: float32 numpy array} and returns the flat big_vision
parameters ('/'-joined keys, as in an `.npz`) and the model config keys
(train/vit.py `VARIANT_KEYS`, `variant`, `pool_type`) that run them. Every
array is an exact copy: transposes and reshapes only. Keys a reader does not
know are refused, naming them, rather than silently dropped.
"""

import re

import numpy as np

from train import errors
from train import vit

SOURCES = ("timm", "open_clip", "hf")
_BLOCK = "Transformer/encoderblock_{}/"


def _variant(params, patch, depth, num_heads=None):
  """The '<size>/<patch>' whose width, depth and MLP width are the checkpoint's."""
  width = params["embedding/kernel"].shape[-1]
  mlp_dim = params[_BLOCK.format(0) + "MlpBlock_0/Dense_0/kernel"].shape[-1]
  for size in vit.VARIANTS:
    shape = vit.decode_variant(f"{size}/{patch}")
    if (shape["width"], shape["depth"], shape["mlp_dim"]) == (width, depth, mlp_dim) and (
        num_heads in (None, shape["num_heads"])):
      return f"{size}/{patch}"
  raise errors.UserError(f"no ViT variant has width {width}, depth {depth}, MLP width {mlp_dim}"
                         f" (known: {list(vit.VARIANTS)} in train/vit.py)")


def _heads(variant):
  return vit.decode_variant(variant)["num_heads"]


class _Reader:
  """Pops keys off a state dict; `done()` refuses what is left."""

  def __init__(self, state, source):
    self.state, self.source = dict(state), source

  def __contains__(self, key):
    return key in self.state

  def pop(self, key):
    if key not in self.state:
      raise errors.UserError(f"{self.source} checkpoint has no key {key!r}")
    return np.asarray(self.state.pop(key), np.float32)

  def pair(self, module):
    """(`module`.weight, `module`.bias)."""
    return self.pop(f"{module}.weight"), self.pop(f"{module}.bias")

  def done(self):
    if self.state:
      raise errors.UserError(f"{self.source} checkpoint has keys this converter does not know: "
                             f"{sorted(self.state)[:8]}")


def _depth(state, prefix):
  """The number of blocks `prefix{i}.` in `state`."""
  depth = 0
  while any(k.startswith(f"{prefix}{depth}.") for k in state):
    depth += 1
  return depth


def _linear(out, name, weight, bias=None):
  """A torch Linear (weight [out, in]) as a flax Dense `name` (kernel [in, out])."""
  out[f"{name}/kernel"] = weight.T
  if bias is not None:
    out[f"{name}/bias"] = bias


def _norm(out, name, weight, bias):
  out[f"{name}/scale"], out[f"{name}/bias"] = weight, bias


def _encoder(r, out, options, patch, prefix, names, attention):
  """Every block `prefix<i>.`; sets options['variant'] from the shapes (its heads split q/k/v).

  `names`: the torch modules of the two LayerNorms and the MLP's two Linears;
  `attention(block prefix)` pops (q|k|v weight [3 D, D], its bias, out weight, out bias).
  """
  depth = _depth(r.state, prefix)
  for i in range(depth):
    b, p = _BLOCK.format(i), f"{prefix}{i}."
    _norm(out, b + "LayerNorm_0", *r.pair(p + names[0]))
    _norm(out, b + "LayerNorm_1", *r.pair(p + names[1]))
    _linear(out, b + "MlpBlock_0/Dense_0", *r.pair(p + names[2]))
    _linear(out, b + "MlpBlock_0/Dense_1", *r.pair(p + names[3]))
  options["variant"] = _variant(out, patch, depth)
  for i in range(depth):
    _attention(out, i, *attention(f"{prefix}{i}."), _heads(options["variant"]))


def _attention(out, i, qkv_w, qkv_b, proj_w, proj_b, heads):
  """Fused or split torch q/k/v ([3 D, D] weights) and out projection -> DenseGeneral kernels."""
  width = proj_w.shape[0]
  name = _BLOCK.format(i) + "MultiHeadDotProductAttention_0/"
  for j, part in enumerate(("query", "key", "value")):
    w, b = qkv_w[j * width:(j + 1) * width], qkv_b[j * width:(j + 1) * width]
    out[f"{name}{part}/kernel"] = w.T.reshape(width, heads, width // heads)
    out[f"{name}{part}/bias"] = b.reshape(heads, width // heads)
  out[f"{name}out/kernel"] = proj_w.T.reshape(heads, width // heads, width)
  out[f"{name}out/bias"] = proj_b


def _patch_embedding(out, weight, bias):
  """A torch Conv2d weight [D, C, p, p] -> flax Conv kernel [p, p, C, D]."""
  out["embedding/kernel"] = weight.transpose(2, 3, 1, 0)
  out["embedding/bias"] = np.zeros(weight.shape[0], np.float32) if bias is None else bias
  return weight.shape[-1]


def _posemb(out, options, posemb, has_cls):
  """Position embeddings [1, T, D]; with a class token and T = 1 + g*g they cover it too."""
  tokens = posemb.shape[1]
  options["posemb_cls"] = bool(has_cls and int(np.sqrt(tokens - 1)) ** 2 == tokens - 1
                               and int(np.sqrt(tokens)) ** 2 != tokens)
  out["pos_embedding"] = posemb


def read_timm(state, gelu="erf", ln_eps=1e-6):
  """timm's `VisionTransformer` (class token or avg pool, optional norm_pre / fc_norm)."""
  r, out = _Reader(state, "timm"), {}
  has_cls = "cls_token" in r
  options = dict(gelu=gelu, ln_eps=ln_eps, pool_type="tok" if has_cls else "gap",
                 ln_pre="norm_pre.weight" in r, fc_norm="fc_norm.weight" in r)
  if has_cls and options["fc_norm"]:
    raise errors.UserError("timm checkpoint pools its tokens (fc_norm) but has a class token: "
                           "pooling without the class token is not a stockpot variant")
  patch = _patch_embedding(out, *r.pair("patch_embed.proj"))
  if has_cls:
    out["cls"] = r.pop("cls_token")
  _posemb(out, options, r.pop("pos_embed"), has_cls)
  if options["ln_pre"]:
    _norm(out, "ln_pre", *r.pair("norm_pre"))
  _encoder(r, out, options, patch, "blocks.", ("norm1", "norm2", "mlp.fc1", "mlp.fc2"),
           lambda p: (*r.pair(p + "attn.qkv"), *r.pair(p + "attn.proj")))
  norm = "fc_norm" if options["fc_norm"] else "Transformer/encoder_norm"
  source = "fc_norm" if options["fc_norm"] else "norm"
  _norm(out, norm, *r.pair(source))
  _linear(out, "head", *r.pair("head"))
  r.done()
  return out, options


def read_open_clip(state, gelu="quick", ln_eps=1e-5):
  """An open_clip / OpenAI CLIP visual tower plus a linear head (model-soups' `ModelWrapper`).

  model-soups saves `model.visual.*` and `classification_head.*` (and what is
  left of the text tower, ignored); its features are unit-normalised before
  the head. A bare CLIP state dict (`visual.*`) needs a `head.*` to classify.
  """
  prefix = next((p for p in ("model.visual.", "visual.", "")
                 if f"{p}conv1.weight" in state), None)
  if prefix is None:
    raise errors.UserError("open_clip checkpoint has no visual tower (no 'model.visual.conv1."
                           "weight', 'visual.conv1.weight' or 'conv1.weight')")
  soups = "classification_head.weight" in state
  head = "classification_head." if soups else "head."
  r = _Reader({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, "open_clip")
  out = {}
  options = dict(gelu=gelu, ln_eps=ln_eps, pool_type="tok", ln_pre=True,
                 normalize_features=soups)
  patch = _patch_embedding(out, r.pop("conv1.weight"), None)
  out["cls"] = r.pop("class_embedding").reshape(1, 1, -1)
  _posemb(out, options, r.pop("positional_embedding")[None], True)
  _norm(out, "ln_pre", *r.pair("ln_pre"))
  _encoder(r, out, options, patch, "transformer.resblocks.",
           ("ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj"),
           lambda p: (r.pop(p + "attn.in_proj_weight"), r.pop(p + "attn.in_proj_bias"),
                      *r.pair(p + "attn.out_proj")))
  _norm(out, "Transformer/encoder_norm", *r.pair("ln_post"))
  if "proj" in r:
    out["proj/kernel"] = r.pop("proj")  # Used as x @ proj: already [in, out].
    options["proj_dim"] = out["proj/kernel"].shape[1]
  r.done()
  if f"{head}weight" not in state:
    raise errors.UserError("open_clip checkpoint has no classification head ('classification_head."
                           "weight' as model-soups saves it, or 'head.weight')")
  _linear(out, "head", np.asarray(state[f"{head}weight"], np.float32),
          np.asarray(state[f"{head}bias"], np.float32))
  return out, options


# transformers < 5 names -> the names transformers 5 saves (both are read; the Hub holds the first).
_HF_V4_NAMES = ((r"^vit\.encoder\.layer\.", "vit.layers."),
                (r"\.attention\.attention\.query\.", ".attention.q_proj."),
                (r"\.attention\.attention\.key\.", ".attention.k_proj."),
                (r"\.attention\.attention\.value\.", ".attention.v_proj."),
                (r"\.attention\.output\.dense\.", ".attention.o_proj."),
                (r"\.intermediate\.dense\.", ".mlp.fc1."), (r"\.output\.dense\.", ".mlp.fc2."))


def _hf_v5_key(key):
  for pattern, name in _HF_V4_NAMES:
    key = re.sub(pattern, name, key)
  return key


def read_hf(state, gelu="erf", ln_eps=1e-12):
  """Hugging Face `ViTForImageClassification` (`vit.*` and `classifier.*`), transformers 4 or 5."""
  r, out = _Reader({_hf_v5_key(k): v for k, v in state.items()}, "hf"), {}
  options = dict(gelu=gelu, ln_eps=ln_eps, pool_type="tok")
  e = "vit.embeddings."
  patch = _patch_embedding(out, *r.pair(e + "patch_embeddings.projection"))
  out["cls"] = r.pop(e + "cls_token")
  _posemb(out, options, r.pop(e + "position_embeddings"), True)
  def attention(p):
    q, k, v = (r.pair(f"{p}attention.{n}_proj") for n in "qkv")
    return (np.concatenate([q[0], k[0], v[0]]), np.concatenate([q[1], k[1], v[1]]),
            *r.pair(p + "attention.o_proj"))
  _encoder(r, out, options, patch, "vit.layers.",
           ("layernorm_before", "layernorm_after", "mlp.fc1", "mlp.fc2"), attention)
  _norm(out, "Transformer/encoder_norm", *r.pair("vit.layernorm"))
  _linear(out, "head", *r.pair("classifier"))
  r.done()
  return out, options


READERS = {"timm": read_timm, "open_clip": read_open_clip, "hf": read_hf}


def write_timm(params, model_config):
  """big_vision parameters -> timm `VisionTransformer` state dict (the inverse of `read_timm`).

  Class-token models keep the class token's position embedding in `pos_embed`
  when `posemb_cls` (timm's default), else timm needs `no_embed_class=True`.
  """
  unsupported = [k for k in ("proj_dim", "normalize_features") if model_config.get(k)]
  if unsupported:
    raise errors.UserError(f"model.{unsupported[0]} has no timm VisionTransformer equivalent")
  sd = {"patch_embed.proj.weight": params["embedding/kernel"].transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": params["embedding/bias"], "pos_embed": params["pos_embedding"],
        "head.weight": params["head/kernel"].T, "head.bias": params["head/bias"]}
  if "cls" in params:
    sd["cls_token"] = params["cls"]
  for ours, theirs in (("ln_pre", "norm_pre"), ("fc_norm", "fc_norm"),
                       ("Transformer/encoder_norm", "norm")):
    if f"{ours}/scale" in params:
      sd[f"{theirs}.weight"], sd[f"{theirs}.bias"] = params[f"{ours}/scale"], params[f"{ours}/bias"]
  i = 0
  while f"{_BLOCK.format(i)}LayerNorm_0/scale" in params:
    b, p = _BLOCK.format(i), f"blocks.{i}."
    for ours, theirs in (("LayerNorm_0", "norm1"), ("LayerNorm_1", "norm2")):
      sd[f"{p}{theirs}.weight"], sd[f"{p}{theirs}.bias"] = (params[f"{b}{ours}/scale"],
                                                            params[f"{b}{ours}/bias"])
    for ours, theirs in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
      sd[f"{p}mlp.{theirs}.weight"] = params[f"{b}MlpBlock_0/{ours}/kernel"].T
      sd[f"{p}mlp.{theirs}.bias"] = params[f"{b}MlpBlock_0/{ours}/bias"]
    a = f"{b}MultiHeadDotProductAttention_0/"
    width = params[f"{a}out/bias"].shape[0]
    sd[f"{p}attn.qkv.weight"] = np.concatenate(
        [params[f"{a}{n}/kernel"].reshape(width, width).T for n in ("query", "key", "value")])
    sd[f"{p}attn.qkv.bias"] = np.concatenate(
        [params[f"{a}{n}/bias"].reshape(width) for n in ("query", "key", "value")])
    sd[f"{p}attn.proj.weight"] = params[f"{a}out/kernel"].reshape(width, width).T
    sd[f"{p}attn.proj.bias"] = params[f"{a}out/bias"]
    i += 1
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}
