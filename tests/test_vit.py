"""The ViT's parameter tree is big_vision's, for every variant."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fashion_mnist
from train import ema
from train import losses
from train import optimizer
from train import trainer
from train import trees
from train import vit


def _shapes(variant, image_size, num_classes=1000, pool_type="tok", channels=3):
  model = vit.VisionTransformer(num_classes=num_classes, pool_type=pool_type,
                                **vit.decode_variant(variant))
  params = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, image_size, image_size, channels)))["params"]
  return {k: tuple(v.shape) for k, v in trees.flatten(params).items()}


def test_b16_tree_matches_big_vision_names_and_shapes():
  shapes = _shapes("B/16", 224)
  expected = {
      "embedding/kernel": (16, 16, 3, 768), "embedding/bias": (768,),
      "pos_embedding": (1, 196, 768), "cls": (1, 1, 768),
      "Transformer/encoder_norm/scale": (768,), "Transformer/encoder_norm/bias": (768,),
      "head/kernel": (768, 1000), "head/bias": (1000,),
  }
  for i in range(12):
    block = f"Transformer/encoderblock_{i}"
    for ln in ("LayerNorm_0", "LayerNorm_1"):
      expected[f"{block}/{ln}/scale"] = expected[f"{block}/{ln}/bias"] = (768,)
    for proj in ("query", "key", "value"):
      expected[f"{block}/MultiHeadDotProductAttention_0/{proj}/kernel"] = (768, 12, 64)
      expected[f"{block}/MultiHeadDotProductAttention_0/{proj}/bias"] = (12, 64)
    expected[f"{block}/MultiHeadDotProductAttention_0/out/kernel"] = (12, 64, 768)
    expected[f"{block}/MultiHeadDotProductAttention_0/out/bias"] = (768,)
    expected[f"{block}/MlpBlock_0/Dense_0/kernel"] = (768, 3072)
    expected[f"{block}/MlpBlock_0/Dense_0/bias"] = (3072,)
    expected[f"{block}/MlpBlock_0/Dense_1/kernel"] = (3072, 768)
    expected[f"{block}/MlpBlock_0/Dense_1/bias"] = (768,)
  assert shapes == expected
  # timm's vit_base_patch16_224 has 86,567,656 parameters, one of them a
  # 768-wide position embedding for the class token that big_vision's ViT lacks.
  assert sum(np.prod(s) for s in shapes.values()) == 86_567_656 - 768


@pytest.mark.parametrize("variant,width,depth,params_millions", [
    ("Ti/16", 192, 12, 5.7), ("S/16", 384, 12, 22.1), ("L/16", 1024, 24, 304.3),
    ("g/14", 1408, 40, 1011.0), ("G/14", 1664, 48, 1843.0)])
def test_variants_by_name(variant, width, depth, params_millions):
  shapes = _shapes(variant, 224)
  assert shapes["pos_embedding"][2] == width
  assert sum(k.endswith("LayerNorm_0/scale") for k in shapes) == depth
  count = sum(np.prod(s) for s in shapes.values()) / 1e6
  assert count == pytest.approx(params_millions, rel=0.01)


def test_gap_pool_has_no_class_token_and_tiny_variants_build():
  shapes = _shapes("mu/4", 28, num_classes=5, pool_type="gap", channels=1)
  assert "cls" not in shapes
  assert shapes["pos_embedding"] == (1, 49, 32)
  assert shapes["embedding/kernel"] == (4, 4, 1, 32)


def test_unknown_variant_and_pool_type_are_errors():
  with pytest.raises(ValueError, match=r"Unknown ViT variant 'X/16'.*'B'"):
    vit.decode_variant("X/16")
  model = vit.VisionTransformer(num_classes=2, pool_type="max", **vit.decode_variant("mu/4"))
  with pytest.raises(ValueError, match="pool_type 'max'"):
    model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))


def test_attention_equals_flax_multi_head_attention():
  x = jax.random.normal(jax.random.key(1), (2, 5, 32))
  reference = nn.MultiHeadDotProductAttention(num_heads=4)
  params = reference.init(jax.random.key(0), x)
  ours = vit.MultiHeadDotProductAttention(num_heads=4)
  np.testing.assert_allclose(ours.apply(params, x), reference.apply(params, x), atol=1e-5)


@pytest.mark.slow
def test_dropout_only_in_training():
  model = vit.VisionTransformer(num_classes=3, dropout=0.5, **vit.decode_variant("mu/4"))
  images = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  params = model.init(jax.random.key(1), images)["params"]
  # A zero-initialised head outputs zeros whatever dropout does: give it weights.
  params["head"]["kernel"] = jnp.ones_like(params["head"]["kernel"])
  evaluate = lambda: model.apply({"params": params}, images)
  np.testing.assert_array_equal(evaluate(), evaluate())
  train = lambda seed: model.apply({"params": params}, images, train=True,
                                   rngs={"dropout": jax.random.key(seed)})
  assert not np.allclose(train(0), evaluate())
  assert not np.allclose(train(0), train(1))


def _strided_convolution(width, patch_size, dtype, param_dtype, name):
  """The patch embedding before vit.PatchEmbedding: one strided convolution, for comparison."""
  return nn.Conv(width, patch_size, strides=patch_size, padding="VALID", dtype=dtype,
                 param_dtype=param_dtype, name=name)


def _init_logits_and_one_step(images, labels):
  """pico/7's init, logits and one trainer step (SGD, clipping, both EMAs) on `images`."""
  config = fashion_mnist.get_config("variant=pico/7")
  config.schedule.warmup_steps = 0  # The first step moves the weights.
  model = vit.build_model(config.model, 10)
  params = trees.flatten(model.init(jax.random.key(1), images)["params"])
  init = dict(params)
  params["head/kernel"] = jax.random.normal(jax.random.key(2), params["head/kernel"].shape)
  params = trees.unflatten(params)
  tx, _ = optimizer.make_optimizer(config)
  step = jax.jit(trainer.make_train_step(model, tx, losses.get(config.loss), 0.0,
                                         ema.decays(config.ema), jax.random.key(3)))
  state, _ = step(trainer.state_from_params(params, tx), {"image": images, "labels": labels}, 0)
  return init, model.apply({"params": params}, images), jax.device_get(state)


@pytest.mark.slow
def test_patch_embedding_as_a_matmul_equals_the_strided_convolution(monkeypatch):
  # 30 x 29 pixels in 7 x 7 patches: 4 x 4 patches, the pixels past them dropped as VALID does.
  images = jax.random.normal(jax.random.key(0), (4, 30, 29, 3))
  labels = jax.nn.one_hot(jnp.arange(4) % 10, 10)
  init, logits, state = _init_logits_and_one_step(images, labels)
  monkeypatch.setattr(vit, "PatchEmbedding", _strided_convolution)
  conv_init, conv_logits, conv_state = _init_logits_and_one_step(images, labels)
  assert init.keys() == conv_init.keys()
  for key in init:
    np.testing.assert_array_equal(init[key], conv_init[key], err_msg=key)
  np.testing.assert_allclose(logits, conv_logits, rtol=1e-5, atol=1e-5)
  assert np.abs(logits).max() > 0.1
  for name in ("params", "ema_low", "ema_high"):
    for key, value in trees.flatten(state[name]).items():
      np.testing.assert_allclose(value, trees.flatten(conv_state[name])[key], rtol=1e-5,
                                 atol=1e-6, err_msg=f"{name} {key}")
  moved = trees.flatten(state["params"])["embedding/kernel"] - init["embedding/kernel"]
  assert np.abs(moved).max() > 1e-4  # The step reached the patch embedding.


def test_patch_embedding_takes_rectangular_patches_and_compute_dtypes():
  images = jax.random.normal(jax.random.key(0), (2, 7, 9, 2))
  for dtype in (jnp.float32, jnp.bfloat16):
    matmul = vit.PatchEmbedding(5, (3, 2), dtype, jnp.float32)
    params = matmul.init(jax.random.key(1), images)
    conv = _strided_convolution(5, (3, 2), dtype, jnp.float32, None)
    got, expected = matmul.apply(params, images), conv.apply(params, images)
    assert got.shape == expected.shape == (2, 2, 4, 5) and got.dtype == expected.dtype == dtype
    np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32),
                               rtol=2e-2 if dtype == jnp.bfloat16 else 1e-5, atol=1e-2)
