"""Loading big_vision `.npz` checkpoints into the ViT, and exporting back."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import pretrained
from train import trees
from train import vit


def _init(image_size=28, num_classes=10, pool_type="tok", seed=0):
  model = vit.VisionTransformer(num_classes=num_classes, pool_type=pool_type,
                                **vit.decode_variant("mu/4"))
  params = model.init(jax.random.key(seed), jnp.zeros((1, image_size, image_size, 1)))["params"]
  return model, jax.tree.map(np.asarray, params)


def _randomized(params, seed=1):
  """Same tree, every leaf random (so a zero-initialised head is distinguishable)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype), params)


def _save_flat(path, flat):
  np.savez(path, **flat)
  return str(path)


def test_npz_round_trip_is_exact_and_uses_slash_keys(tmp_path):
  _, params = _init()
  params = _randomized(params)
  path = tmp_path / "vit.npz"
  pretrained.save_npz(path, params)
  flat = pretrained.load_npz(path)
  assert "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel" in flat
  assert flat.keys() == trees.flatten(params).keys()
  _, fresh = _init(seed=7)
  loaded = pretrained.load_pretrained(fresh, path)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  assert not list(tmp_path.glob(".*tmp")), "the atomic write left a temporary file"


def test_posemb_resample_is_bilinear_on_the_grid():
  g_old, g_new, width = 7, 14, 3
  i, j = np.meshgrid(np.arange(g_old), np.arange(g_old), indexing="ij")
  linear = np.stack([2.0 * i + 0.5 * j + 1, -i + 3.0 * j, i * 0 + 4.0], axis=-1)
  old = linear.reshape(1, g_old * g_old, width).astype(np.float32)
  new = pretrained.resample_posemb(old, (1, g_new * g_new, width))
  # Order-1 interpolation with aligned corners reproduces a linear function exactly.
  scale = (g_old - 1) / (g_new - 1)
  i2, j2 = np.meshgrid(np.arange(g_new) * scale, np.arange(g_new) * scale, indexing="ij")
  expected = np.stack([2.0 * i2 + 0.5 * j2 + 1, -i2 + 3.0 * j2, i2 * 0 + 4.0], axis=-1)
  np.testing.assert_allclose(new.reshape(g_new, g_new, width), expected, atol=1e-5)


@pytest.mark.slow
def test_load_at_a_new_resolution_resamples_only_the_posemb(tmp_path):
  _, params_28 = _init(image_size=28)
  params_28 = _randomized(params_28)
  path = tmp_path / "vit28.npz"
  pretrained.save_npz(path, params_28)
  _, params_56 = _init(image_size=56)
  loaded = pretrained.load_pretrained(params_56, path)
  assert loaded["pos_embedding"].shape == (1, 196, 32)
  np.testing.assert_allclose(
      loaded["pos_embedding"],
      pretrained.resample_posemb(params_28["pos_embedding"], (1, 196, 32)))
  for key, value in trees.flatten(loaded).items():
    if key != "pos_embedding":
      np.testing.assert_array_equal(value, trees.flatten(params_28)[key], err_msg=key)


def test_class_token_posemb_of_old_checkpoints_is_kept(tmp_path):
  _, params = _init()
  flat = trees.flatten(_randomized(params))
  grid = flat.pop("pos_embedding")
  cls_posemb = np.full((1, 1, 32), 0.25, np.float32)
  flat["Transformer/posembed_input/pos_embedding"] = np.concatenate([cls_posemb, grid], 1)
  loaded = pretrained.load_pretrained(params, _save_flat(tmp_path / "old.npz", flat))
  np.testing.assert_array_equal(loaded["pos_embedding"], grid)
  np.testing.assert_allclose(loaded["cls"], flat["cls"] + cls_posemb)


def test_head_is_reinitialised_to_zeros_when_class_count_differs(tmp_path):
  _, params_10 = _init(num_classes=10)
  path = tmp_path / "ten.npz"
  pretrained.save_npz(path, _randomized(params_10))
  _, params_5 = _init(num_classes=5)
  loaded = pretrained.load_pretrained(params_5, path)
  assert loaded["head"]["kernel"].shape == (32, 5)
  assert not loaded["head"]["kernel"].any() and not loaded["head"]["bias"].any()
  same = pretrained.load_pretrained(params_10, path)
  assert same["head"]["kernel"].any(), "a head with the right class count must be loaded"


def test_dont_load_keeps_init_and_ignore_skips_checkpoint_keys(tmp_path):
  _, params = _init()
  flat = trees.flatten(_randomized(params))
  flat["pre_logits/kernel"] = np.ones((32, 32), np.float32)
  path = _save_flat(tmp_path / "i21k.npz", flat)
  loaded = pretrained.load_pretrained(params, path, dont_load=["head/.*"], ignore=["pre_logits/.*"])
  np.testing.assert_array_equal(loaded["head"]["kernel"], params["head"]["kernel"])
  np.testing.assert_array_equal(loaded["embedding"]["kernel"], flat["embedding/kernel"])


def test_extra_key_is_an_error_naming_it(tmp_path):
  _, params = _init()
  flat = trees.flatten(params)
  flat["pre_logits/kernel"] = np.ones((32, 32), np.float32)
  path = _save_flat(tmp_path / "extra.npz", flat)
  with pytest.raises(ValueError, match=r"extra\.npz: key 'pre_logits/kernel' is not a parameter"):
    pretrained.load_pretrained(params, path)


def test_missing_key_is_an_error_naming_it(tmp_path):
  _, params = _init()
  flat = trees.flatten(params)
  del flat["Transformer/encoderblock_0/MlpBlock_0/Dense_1/bias"]
  path = _save_flat(tmp_path / "missing.npz", flat)
  with pytest.raises(ValueError, match=r"missing\.npz: model parameter "
                     r"'Transformer/encoderblock_0/MlpBlock_0/Dense_1/bias' is missing"):
    pretrained.load_pretrained(params, path)


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
  _, params = _init()
  flat = trees.flatten(params)
  flat["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"] = np.zeros((32, 64), np.float32)
  path = _save_flat(tmp_path / "wide.npz", flat)
  with pytest.raises(ValueError, match=r"wide\.npz: key 'Transformer/encoderblock_0/MlpBlock_0/"
                     r"Dense_0/kernel' has shape \(32, 64\) in the checkpoint but \(32, 128\)"):
    pretrained.load_pretrained(params, path)


def test_corrupt_and_missing_files_are_named(tmp_path):
  _, params = _init()
  path = tmp_path / "vit.npz"
  pretrained.save_npz(path, params)
  truncated = tmp_path / "truncated.npz"
  truncated.write_bytes(path.read_bytes()[:1000])
  with pytest.raises(ValueError, match=r"truncated\.npz is not a readable \.npz"):
    pretrained.load_pretrained(params, truncated)
  with pytest.raises(FileNotFoundError, match=r"nowhere\.npz does not exist"):
    pretrained.load_pretrained(params, tmp_path / "nowhere.npz")
