"""The ViT's parameter tree is big_vision's, for every variant."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
