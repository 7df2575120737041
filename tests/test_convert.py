"""PyTorch checkpoints (timm, open_clip / model-soups, Hugging Face) give the source's logits here.

The fixtures are small random models built by the source libraries
(tests/fixtures/make_torch_vits.py, pinned in requirements-make.txt): their
weights as `.safetensors`, and their logits for a few images.
"""

import importlib.util
import os

import jax
import numpy as np
import pytest
import safetensors.numpy

from configs import common
from configs import model_soups_clip_b32
from eval import run_config
from soups import ingredients as ingredients_lib
from soups import soup_dir as soup_dir_lib
from soups import soup_step
from train import convert
from train import errors
from train import pp_spec
from train import preprocess
from train import pretrained
from train import torch_files
from train import trees
from train import vit

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
MODELS = ("timm_cls", "timm_gap", "open_clip", "hf")


def _fixture(name):
  return os.path.join(FIXTURES, f"torch_{name}.safetensors")


def _logits(npz_path):
  """Logits of the converted `.npz` on the fixture's images, with the config found next to it."""
  config = run_config.load(run_config.find(npz_path))
  model = vit.build_model(config.model, config.num_classes)
  params = trees.unflatten(pretrained.load_npz(npz_path))
  return np.asarray(model.apply({"params": params}, _reference(npz_path)["images"]))


def _reference(npz_path):
  return np.load(os.path.join(FIXTURES, os.path.basename(npz_path)))


@pytest.mark.parametrize("name", MODELS)
def test_converted_model_gives_the_source_libraries_logits(tmp_path, name):
  out = str(tmp_path / f"torch_{name}.npz")
  convert.to_npz(_fixture(name), out, common.base_config())
  np.testing.assert_allclose(_logits(out), _reference(out)["logits"], atol=1e-4, rtol=0)


def test_model_soups_layout_sets_clip_variants(tmp_path):
  out = str(tmp_path / "torch_open_clip.npz")
  config = convert.to_npz(_fixture("open_clip"), out, common.base_config(), source="open_clip")
  assert (config.model.gelu, config.model.ln_eps, config.model.ln_pre, config.model.proj_dim,
          config.model.normalize_features, config.model.variant) == (
              "quick", 1e-5, True, 16, True, "pico/8")
  assert config.num_classes == 5


@pytest.mark.parametrize("name", ("timm_cls", "timm_gap"))
def test_npz_safetensors_npz_round_trip_is_exact(tmp_path, name):
  first, back = str(tmp_path / f"torch_{name}.npz"), str(tmp_path / "back" / f"torch_{name}.npz")
  convert.to_npz(_fixture(name), first, common.base_config())
  convert.to_safetensors(first, str(tmp_path / "timm.safetensors"))
  # The written file is timm's layout: the source library's own state dict, bit for bit.
  written = safetensors.numpy.load_file(str(tmp_path / "timm.safetensors"))
  source = safetensors.numpy.load_file(_fixture(name))
  assert sorted(written) == sorted(source)
  for key, value in source.items():
    np.testing.assert_array_equal(written[key], value, err_msg=key)
  convert.to_npz(str(tmp_path / "timm.safetensors"), back, common.base_config())
  a, b = pretrained.load_npz(first), pretrained.load_npz(back)
  assert sorted(a) == sorted(b)
  for key, value in a.items():
    np.testing.assert_array_equal(b[key], value, err_msg=key)
  assert (run_config.load(run_config.find(back)).model.to_dict()
          == run_config.load(run_config.find(first)).model.to_dict())


def test_unknown_keys_are_refused_naming_them(tmp_path):
  state = safetensors.numpy.load_file(_fixture("timm_cls"))
  state["blocks.0.ls1.gamma"] = np.ones(64, np.float32)
  path = str(tmp_path / "layer_scale.safetensors")
  safetensors.numpy.save_file(state, path)
  with pytest.raises(errors.UserError, match=r"layer_scale.safetensors.*blocks\.0\.ls1\.gamma"):
    torch_files.convert(path)


def test_open_clip_without_a_head_is_refused(tmp_path):
  state = safetensors.numpy.load_file(_fixture("open_clip"))
  del state["classification_head.weight"], state["classification_head.bias"]
  path = str(tmp_path / "visual.safetensors")
  safetensors.numpy.save_file(state, path)
  with pytest.raises(errors.UserError, match="no classification head"):
    torch_files.convert(path, "open_clip")


def test_pickled_checkpoint_without_torch_says_what_to_do(tmp_path):
  if importlib.util.find_spec("torch"):
    pytest.skip("torch is installed: the message is for installs without it (make test's venv)")
  path = tmp_path / "model.pt"
  path.write_bytes(b"not read")
  with pytest.raises(errors.UserError, match="model.pt needs PyTorch"):
    torch_files.convert(str(path))


@pytest.mark.slow
def test_soup_of_safetensors_ingredients_is_their_converted_mean(tmp_path):
  config = common.base_config()  # Fashion-MNIST as the fixtures' 32x32 RGB, 5 classes.
  config.input.classes = (0, 1, 2, 3, 4)
  config.input.pp_eval = "decode(channels=3)|resize(32)|value_range(-1, 1)|onehot(5)"
  config.input.heldout_split = config.input.test_split = "test[:64]"
  convert.to_npz(_fixture("timm_cls"), str(tmp_path / "reference.npz"), config)
  state = safetensors.numpy.load_file(_fixture("timm_cls"))
  rng = np.random.default_rng(0)
  moved = {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in state.items()}
  safetensors.numpy.save_file(moved, str(tmp_path / "moved.safetensors"))
  ingredients = ingredients_lib.from_paths(
      [_fixture("timm_cls"), str(tmp_path / "moved.safetensors")], "params",
      default_config=str(tmp_path / "reference.config.json"))
  soup_dir = str(tmp_path / "soup")
  results = soup_step.cook(ingredients, soup_dir, soup_step.Options(recipes=("uniform",)))
  assert [i["name"] for i in results["ingredients"]] == ["torch_timm_cls", "moved"]
  soup = pretrained.load_npz(soup_dir_lib.weights_npz(soup_dir, "uniform"))
  first = torch_files.convert(_fixture("timm_cls"))[0]
  second = torch_files.convert(str(tmp_path / "moved.safetensors"))[0]
  assert sorted(soup) == sorted(first)
  for key, value in soup.items():
    np.testing.assert_allclose(value, (first[key] + second[key]) / 2, atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_trainer_adopts_the_converted_architecture_and_loads_it_as_model_init(tmp_path):
  out = str(tmp_path / "torch_hf.npz")
  convert.to_npz(_fixture("hf"), out, common.base_config())
  config = common.base_config()  # mu/4, gap, tanh GELU: the trainer's defaults.
  changed = pretrained.adopt_architecture(config.model, out)
  assert changed == {"variant": "pico/8", "pool_type": "tok", "gelu": "erf", "ln_eps": 1e-12,
                     "posemb_cls": True}
  assert pretrained.adopt_architecture(config.model, out) == {}
  model = vit.build_model(config.model, 5)
  images = _reference(out)["images"]
  init = model.init(jax.random.key(0), images[:1])["params"]
  loaded = pretrained.load_pretrained(init, out)  # pos_embedding kept whole (class token too).
  np.testing.assert_allclose(np.asarray(model.apply({"params": loaded}, images)),
                             _reference(out)["logits"], atol=1e-4, rtol=0)



@pytest.mark.slow
def test_converted_clip_model_loads_into_a_scanned_rematerialised_model(tmp_path):
  out = str(tmp_path / "torch_open_clip.npz")
  convert.to_npz(_fixture("open_clip"), out, common.base_config())
  config = common.base_config()
  config.model.update(scan_layers=True, remat=True)
  pretrained.adopt_architecture(config.model, out)
  model = vit.build_model(config.model, 5)
  images = _reference(out)["images"]
  init = model.init(jax.random.key(0), images[:1])["params"]
  loaded = pretrained.load_pretrained(init, out)  # Stacked: one `encoderblock`.
  assert "encoderblock" in loaded["Transformer"]
  np.testing.assert_allclose(np.asarray(model.apply({"params": loaded}, images)),
                             _reference(out)["logits"], atol=1e-4, rtol=0)

def test_model_soups_reproduction_config_takes_the_converted_clip_model(tmp_path):
  clip = model_soups_clip_b32.get_config("data_dir=/data/tfds")
  preprocess.parse(pp_spec.resolve(clip, "pp_eval"))
  out = str(tmp_path / "torch_open_clip.npz")
  convert.to_npz(_fixture("open_clip"), out, clip)
  written = run_config.load(run_config.find(out))
  assert (written.input.dataset, written.input.data_dir, written.input.heldout_split) == (
      "imagenet2012", "/data/tfds", "train[98%:]")
  assert (written.model.gelu, written.model.normalize_features, written.num_classes) == (
      "quick", True, 5)


def test_model_soups_config_is_openai_clip_b32_with_its_head():
  config = model_soups_clip_b32.get_config()
  model = vit.build_model(config.model, config.num_classes)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.numpy.zeros((1, 224, 224, 3)))
  shapes = {k: v.shape for k, v in trees.flatten(shapes["params"]).items()}
  assert (shapes["pos_embedding"], shapes["cls"], shapes["proj/kernel"], shapes["head/kernel"],
          shapes["embedding/kernel"]) == ((1, 50, 768), (1, 1, 768), (768, 512), (512, 1000),
                                          (32, 32, 3, 768))
  assert "ln_pre/scale" in shapes and "fc_norm/scale" not in shapes
