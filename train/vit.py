"""Vision Transformer whose parameter tree matches big_vision's `models/vit.py`.

Module names (`embedding`, `pos_embedding`, `cls`,
`Transformer/encoderblock_{i}/{LayerNorm_0,MultiHeadDotProductAttention_0,
LayerNorm_1,MlpBlock_0}`, `Transformer/encoder_norm`, `head`) and shapes are
big_vision's, so its `.npz` checkpoints load as they are (see `pretrained.py`).
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from train import errors
from train import layer_stack
from train import ssf as ssf_lib
from train import trees

# Reference: Table 2 of arXiv 2106.04560 (as in big_vision), plus tiny
# variants of our own for CPU tests and demos.
_WIDTH = {"mu": 32, "pico": 64, "nano": 128,
          "Ti": 192, "S": 384, "M": 512, "B": 768, "L": 1024, "So400m": 1152,
          "H": 1280, "g": 1408, "G": 1664, "e": 1792}
_DEPTH = {"mu": 1, "pico": 2, "nano": 4,
          "Ti": 12, "S": 12, "M": 12, "B": 12, "L": 24, "So400m": 27, "H": 32,
          "g": 40, "G": 48, "e": 56}
_MLP_DIM = {"mu": 128, "pico": 256, "nano": 512,
            "Ti": 768, "S": 1536, "M": 2048, "B": 3072, "L": 4096,
            "So400m": 4304, "H": 5120, "g": 6144, "G": 8192, "e": 15360}
_NUM_HEADS = {"mu": 2, "pico": 2, "nano": 4,
              "Ti": 3, "S": 6, "M": 8, "B": 12, "L": 16, "So400m": 16, "H": 16,
              "g": 16, "G": 16, "e": 16}
VARIANTS = tuple(_WIDTH)
POOL_TYPES = ("gap", "tok")
# The MLP's activation: flax's tanh-approximate GELU (big_vision), the exact erf GELU
# (timm, Hugging Face), or CLIP's QuickGELU x * sigmoid(1.702 x) (OpenAI weights).
GELUS = {"tanh": nn.gelu, "erf": lambda x: nn.gelu(x, approximate=False),
         "quick": lambda x: x * nn.sigmoid(1.702 * x)}


def decode_variant(variant):
  """'B/16' -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=(16, 16))."""
  match = re.fullmatch(r"([A-Za-z0-9]+)/(\d+)", variant)
  if not match or match.group(1) not in _WIDTH:
    raise errors.UserError(f"Unknown ViT variant {variant!r}: expected '<size>/<patch>' "
                           f"with size one of {list(VARIANTS)}, e.g. 'B/16'")
  size, patch = match.group(1), int(match.group(2))
  return dict(width=_WIDTH[size], depth=_DEPTH[size], mlp_dim=_MLP_DIM[size],
              num_heads=_NUM_HEADS[size], patch_size=(patch, patch))


def _layer_norm(name, x, dtype, param_dtype, ssf, eps=1e-6):
  """A LayerNorm named `name` (SSF-scaled and shifted when `ssf`), called from a compact method."""
  norm = nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)
  return ssf_lib.after(name, norm(x), ssf)


class PatchEmbedding(nn.Module):
  """`nn.Conv(width, patch_size, strides=patch_size, padding="VALID")`'s parameters and
  result, computed as a reshape of the image into patches and one matmul.

  Same `kernel` [ph, pw, channels, width] and `bias` (and their init) as the
  convolution, so checkpoints are unchanged; the matmul's forward and backward
  are cheaper than the strided convolution's on CPU (docs/benchmarks.md).
  """
  width: int
  patch_size: tuple
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    (ph, pw), (n, h, w, c) = self.patch_size, images.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (ph, pw, c, self.width),
                        self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.width,), self.param_dtype)
    rows, cols = h // ph, w // pw  # VALID: pixels past the last whole patch are dropped.
    patches = images[:, :rows * ph, :cols * pw].reshape(n, rows, ph, cols, pw, c)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(n, rows, cols, ph * pw * c)
    patches, kernel, bias = nn.dtypes.promote_dtype(patches, kernel, bias, dtype=self.dtype)
    return patches @ kernel.reshape(ph * pw * c, self.width) + bias


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention with flax's `MultiHeadDotProductAttention` parameter names.

  Written out (query/key/value/out `DenseGeneral`s) so that every projection is
  a named op that SSF can scale and shift; the tree equals flax's and
  big_vision's.
  """
  num_heads: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  ssf: bool = False

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    project = lambda name: ssf_lib.after(name, nn.DenseGeneral(  # pylint: disable=g-long-lambda
        (self.num_heads, head_dim), dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(), name=name)(x), self.ssf, channel_dims=2)
    y = jax.nn.dot_product_attention(project("query"), project("key"), project("value"))
    y = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=nn.initializers.xavier_uniform(), name="out")(y)
    return ssf_lib.after("out", y, self.ssf)


class MlpBlock(nn.Module):
  """Transformer feed-forward block: Dense_0 -> gelu -> dropout -> Dense_1."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  ssf: bool = False
  gelu: str = "tanh"  # A key of GELUS.

  @nn.compact
  def __call__(self, x, train):
    inits = dict(kernel_init=nn.initializers.xavier_uniform(),
                 bias_init=nn.initializers.normal(stddev=1e-6), dtype=self.dtype,
                 param_dtype=self.param_dtype)
    y = ssf_lib.after("Dense_0", nn.Dense(self.mlp_dim, name="Dense_0", **inits)(x), self.ssf)
    y = nn.Dropout(rate=self.dropout)(GELUS[self.gelu](y), deterministic=not train)
    return ssf_lib.after("Dense_1", nn.Dense(x.shape[-1], name="Dense_1", **inits)(y), self.ssf)


class Encoder1DBlock(nn.Module):
  """Pre-norm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)).

  `scanned`: returns `(x, None)`, the (carry, output) pair `nn.scan` expects.
  """
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  ssf: bool = False
  gelu: str = "tanh"
  ln_eps: float = 1e-6
  scanned: bool = False

  @nn.compact
  def __call__(self, x, train):
    y = _layer_norm("LayerNorm_0", x, self.dtype, self.param_dtype, self.ssf, self.ln_eps)
    y = MultiHeadDotProductAttention(self.num_heads, self.dtype, self.param_dtype, self.ssf,
                                     name="MultiHeadDotProductAttention_0")(y)
    x = x + nn.Dropout(rate=self.dropout)(y, deterministic=not train)
    y = _layer_norm("LayerNorm_1", x, self.dtype, self.param_dtype, self.ssf, self.ln_eps)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.param_dtype, self.ssf, self.gelu,
                 name="MlpBlock_0")(y, train)
    x = x + nn.Dropout(rate=self.dropout)(y, deterministic=not train)
    return (x, None) if self.scanned else x


class Encoder(nn.Module):
  """`depth` blocks named `encoderblock_{i}` (or one scanned `encoderblock`), then `encoder_norm`
  (unless not `final_norm`).

  `remat`: each block's activations are recomputed in the backward pass instead
  of kept (memory for compute). `scan`: the blocks are one `nn.scan` over a
  stacked block (parameters with a leading `depth` axis, see
  train/layer_stack.py): one block to compile, whatever the depth.
  """
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  ssf: bool = False
  remat: bool = False
  scan: bool = False
  gelu: str = "tanh"
  ln_eps: float = 1e-6
  final_norm: bool = True

  @nn.compact
  def __call__(self, x, train):
    block = Encoder1DBlock
    if self.remat:  # static_argnums counts self: `train` (argument 2) stays a Python bool.
      block = nn.remat(block, prevent_cse=not self.scan, static_argnums=(2,))
    settings = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
                    dtype=self.dtype, param_dtype=self.param_dtype, ssf=self.ssf,
                    gelu=self.gelu, ln_eps=self.ln_eps)
    if self.scan:
      scanned = nn.scan(block, variable_axes={"params": 0}, in_axes=nn.broadcast,
                        split_rngs={"params": True, "dropout": True}, length=self.depth)
      x, _ = scanned(scanned=True, name="encoderblock", **settings)(x, train)
    else:
      for i in range(self.depth):
        x = block(name=f"encoderblock_{i}", **settings)(x, train)
    if not self.final_norm:
      return x
    return _layer_norm("encoder_norm", x, self.dtype, self.param_dtype, self.ssf, self.ln_eps)


class VisionTransformer(nn.Module):
  """ViT classifier; `__call__(images, train)` returns logits [batch, num_classes]."""
  num_classes: int
  patch_size: tuple = (16, 16)
  width: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  pool_type: str = "gap"
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32  # Compute dtype.
  param_dtype: jnp.dtype = jnp.float32
  ssf: bool = False  # SSF vectors after every op (train/ssf.py).
  remat: bool = False  # Rematerialise each encoder block (Encoder).
  scan_layers: bool = False  # One scanned, stacked encoder block (Encoder).
  # Variants of PyTorch-trained ViTs (train/torch_layouts.py), each off by default.
  gelu: str = "tanh"  # A key of GELUS.
  ln_eps: float = 1e-6  # Every LayerNorm's epsilon (PyTorch's default: 1e-5).
  posemb_cls: bool = False  # pos_embedding covers the class token too, added after it.
  ln_pre: bool = False  # CLIP's LayerNorm `ln_pre` before the encoder.
  fc_norm: bool = False  # timm's avg pool: LayerNorm `fc_norm` after pooling, no encoder_norm.
  proj_dim: int = 0  # CLIP's bias-free projection `proj` before the head; 0: none.
  normalize_features: bool = False  # Unit-norm features before the head (model-soups).

  @nn.compact
  def __call__(self, images, train=False):
    if self.pool_type not in POOL_TYPES:
      raise errors.UserError(f"Unknown pool_type {self.pool_type!r}; known: {POOL_TYPES}")
    x = PatchEmbedding(self.width, self.patch_size, self.dtype, self.param_dtype,
                       name="embedding")(images)
    x = ssf_lib.after("embedding", x, self.ssf)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    tokens = h * w + (self.pool_type == "tok" and self.posemb_cls)
    posemb = self.param("pos_embedding",
                        nn.initializers.normal(stddev=1 / np.sqrt(c)), (1, tokens, c),
                        self.param_dtype)
    if not self.posemb_cls:
      x = x + posemb.astype(x.dtype)  # Position embedding first, then the class token.
    if self.pool_type == "tok":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, c), self.param_dtype)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (n, 1, 1)), x], axis=1)
    if self.posemb_cls:
      x = x + posemb.astype(x.dtype)
    if self.ln_pre:
      x = _layer_norm("ln_pre", x, self.dtype, self.param_dtype, self.ssf, self.ln_eps)
    x = nn.Dropout(rate=self.dropout)(x, deterministic=not train)
    x = Encoder(self.depth, self.mlp_dim, self.num_heads, self.dropout, self.dtype,
                self.param_dtype, self.ssf, self.remat, self.scan_layers, self.gelu, self.ln_eps,
                final_norm=not self.fc_norm, name="Transformer")(x, train)
    x = x[:, 0] if self.pool_type == "tok" else x.mean(axis=1)
    if self.fc_norm:
      x = _layer_norm("fc_norm", x, self.dtype, self.param_dtype, self.ssf, self.ln_eps)
    if self.proj_dim:
      x = nn.Dense(self.proj_dim, use_bias=False, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="proj")(x)
    if self.normalize_features:
      x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                      dtype=self.dtype, param_dtype=self.param_dtype, name="head")(x)
    return logits.astype(jnp.float32)


def build_model(model_config, num_classes):
  """Builds the ViT that `model_config` (variant, pool_type, dropout, dtypes, ssf, remat,
  scan_layers, ...) names; keys that runs of earlier versions lack take their defaults,
  the PyTorch-interop keys (`VARIANT_KEYS`) included."""
  if model_config.get("gelu", "tanh") not in GELUS:
    raise errors.UserError(f"Unknown model.gelu {model_config.gelu!r}; known: {list(GELUS)}")
  return VisionTransformer(
      num_classes=num_classes, pool_type=model_config.pool_type,
      dropout=model_config.dropout, dtype=jnp.dtype(model_config.dtype),
      param_dtype=jnp.dtype(model_config.get("param_dtype", "float32")), ssf=model_config.ssf,
      remat=model_config.get("remat", False), scan_layers=model_config.get("scan_layers", False),
      **{k: model_config[k] for k in VARIANT_KEYS if k in model_config},
      **decode_variant(model_config.variant))


# Model config keys of PyTorch-trained ViTs' variants (VisionTransformer's fields of the same name).
VARIANT_KEYS = ("gelu", "ln_eps", "posemb_cls", "ln_pre", "fc_norm", "proj_dim",
                "normalize_features")


def config_for_weights(model_config, params):
  """`model_config` with `ssf` and `scan_layers` set to fit `params`, the weights to run.

  A run trained with SSF exports merged, plain weights, and a scanned run
  exports big_vision's per-block layout: evaluating or souping those needs the
  plain, unscanned model; its checkpoints need the model it trained.
  """
  adapted = ml_collections.ConfigDict(model_config.to_dict())
  adapted.ssf = ssf_lib.has_ssf(params)
  adapted.scan_layers = layer_stack.is_stacked(trees.flatten(params))
  return adapted
