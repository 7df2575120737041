"""What large models need: scanned and rematerialised blocks, the two checkpoint layouts,
bfloat16 compute with float32 weights and EMAs, gradient accumulation."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import common
from configs import fashion_mnist
from train import data
from train import errors
from train import layer_stack
from train import optimizer
from train import pretrained
from train import sharding
from train import trainer
from train import trees
from train import vit

IMAGES = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
LABELS = jax.nn.one_hot(jnp.arange(8) % 5, 5)


def _model(**options):
  config = ml_collections.ConfigDict({**common.base_config().model.to_dict(),
                                      "variant": "pico/8", **options})
  return vit.build_model(config, num_classes=5)


def _plain_params():
  """pico/8 (2 blocks) parameters in big_vision's layout, the head non-zero."""
  params = trees.flatten(_model().init(jax.random.key(1), IMAGES[:1])["params"])
  params["head/kernel"] = jax.random.normal(jax.random.key(2), params["head/kernel"].shape)
  return {k: np.asarray(v) for k, v in params.items()}


def _logits_and_grads(model, flat_params):
  params = trees.unflatten(layer_stack.to_layout(flat_params, model.scan_layers))

  def loss(p):
    return optax.softmax_cross_entropy(model.apply({"params": p}, IMAGES, train=True),
                                       LABELS).mean()

  grads = trees.flatten(jax.grad(loss)(params))
  return model.apply({"params": params}, IMAGES), layer_stack.unstack(
      {k: np.asarray(v) for k, v in grads.items()})


@pytest.mark.slow
def test_layer_stack_round_trip_is_exact_and_names_a_missing_block():
  flat = _plain_params()
  stacked = layer_stack.stack(flat)
  assert layer_stack.is_stacked(stacked) and not layer_stack.is_stacked(flat)
  assert stacked["Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"].shape == (2, 64, 256)
  back = layer_stack.unstack(stacked)
  assert sorted(back) == sorted(flat)
  for key in flat:
    np.testing.assert_array_equal(back[key], flat[key], err_msg=key)
  gap = {k: v for k, v in flat.items() if "encoderblock_0/LayerNorm_0/scale" not in k}
  with pytest.raises(errors.UserError, match=r"encoderblock_\*/LayerNorm_0/scale' are \[1\]"):
    layer_stack.stack(gap)


@pytest.mark.parametrize("options", [dict(scan_layers=True), dict(remat=True),
                                     dict(scan_layers=True, remat=True)])
@pytest.mark.slow
def test_scanned_and_rematerialised_blocks_give_the_same_logits_and_gradients(options):
  flat = _plain_params()
  expected_logits, expected_grads = _logits_and_grads(_model(), flat)
  logits, grads = _logits_and_grads(_model(**options), flat)
  np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-6)
  assert sorted(grads) == sorted(expected_grads)
  for key in grads:
    np.testing.assert_allclose(grads[key], expected_grads[key], rtol=1e-4, atol=1e-6,
                               err_msg=key)


def test_a_scanned_model_loads_big_vision_npz_and_exports_it_per_block(tmp_path):
  flat = _plain_params()
  pretrained.save_npz(tmp_path / "plain.npz", flat)
  scanned = _model(scan_layers=True)
  init = scanned.init(jax.random.key(3), IMAGES[:1])["params"]
  loaded = trees.flatten(pretrained.load_pretrained(jax.device_get(init), tmp_path / "plain.npz"))
  assert sorted(loaded) == sorted(trees.flatten(init))
  for key, value in layer_stack.stack(flat).items():
    np.testing.assert_array_equal(loaded[key], value, err_msg=key)
  pretrained.export_npz(tmp_path / "export.npz", loaded)
  exported = pretrained.load_npz(tmp_path / "export.npz")
  assert sorted(exported) == sorted(flat)
  for key in flat:
    np.testing.assert_array_equal(exported[key], flat[key], err_msg=key)
  # The plain model runs the export and the scanned one the loaded weights alike.
  np.testing.assert_allclose(
      _model().apply({"params": trees.unflatten(exported)}, IMAGES),
      scanned.apply({"params": trees.unflatten(loaded)}, IMAGES), rtol=1e-5, atol=1e-6)


def _step_config(**overrides):
  config = fashion_mnist.get_config("variant=pico/8")
  config.update_from_flattened_dict({"optimizer.name": "adam", "lr": 0.01, "num_classes": 10,
                                     **overrides})
  return config


def _one_step(config, images, labels):
  """One step of the trainer's own jitted step on 8 devices; returns (state, metrics) on host."""
  mesh = sharding.make_mesh(config.mesh)
  model = vit.build_model(config.model, config.num_classes)
  tx, _ = optimizer.make_optimizer(config)
  plain = vit.VisionTransformer(num_classes=config.num_classes,
                                **vit.decode_variant(config.model.variant))
  params = trees.flatten(plain.init(jax.random.key(1), images[:1])["params"])
  params["head/kernel"] = jax.random.normal(jax.random.key(2), params["head/kernel"].shape)
  params = {k: v.astype(config.model.param_dtype) for k, v in params.items()}
  params = trees.unflatten(layer_stack.to_layout(params, config.model.scan_layers))
  make_state = lambda p: trainer.state_from_params(p, tx)
  shardings = sharding.tree_shardings(mesh, jax.eval_shape(make_state, params),
                                      config.param_sharding)
  state = jax.jit(make_state, out_shardings=shardings)(params)
  step = trainer.jit_train_step(config, model, tx, mesh, shardings)
  batch = sharding.to_global({"image": images, "labels": labels}, sharding.batch_sharding(mesh))
  return jax.device_get(step(state, batch, jnp.int32(0)))


@pytest.mark.slow
def test_accumulating_micro_batches_steps_like_one_batch():
  images = jax.random.normal(jax.random.key(4), (32, 16, 16, 3))
  labels = jax.nn.one_hot(jnp.arange(32) % 10, 10)
  one_state, one_metrics = _one_step(_step_config(), images, labels)
  for accum, scan in ((2, False), (4, True)):
    state, metrics = _one_step(_step_config(grad_accum_steps=accum,
                                            **{"model.scan_layers": scan}), images, labels)
    for name in ("loss", "grad_norm", "param_norm"):
      assert metrics[name] == pytest.approx(float(one_metrics[name]), rel=1e-5), (accum, name)
    for name in ("params", "ema_low", "ema_high"):
      got = layer_stack.unstack(trees.flatten(state[name]))
      for key, expected in trees.flatten(one_state[name]).items():
        np.testing.assert_allclose(got[key], expected, rtol=1e-5, atol=1e-6,
                                   err_msg=f"{accum} {name} {key}")


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_weights_optimizer_state_and_emas():
  images = jax.random.normal(jax.random.key(5), (16, 16, 16, 3))
  labels = jax.nn.one_hot(jnp.arange(16) % 10, 10)
  state, _ = _one_step(_step_config(**{"model.dtype": "bfloat16"}), images, labels)
  assert {leaf.dtype for leaf in jax.tree.leaves(state) if leaf.ndim} == {np.dtype("float32")}
  state, _ = _one_step(_step_config(**{"model.param_dtype": "bfloat16"}), images, labels)
  assert {x.dtype for x in jax.tree.leaves(state["params"])} == {jnp.dtype("bfloat16")}
  for name in ("ema_low", "ema_high"):
    assert {x.dtype for x in jax.tree.leaves(state[name])} == {np.dtype("float32")}
  flat = _plain_params()
  plain = _model().apply({"params": trees.unflatten(flat)}, IMAGES)
  half = _model(dtype="bfloat16").apply({"params": trees.unflatten(flat)}, IMAGES)
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(half, plain, atol=0.05 * float(jnp.abs(plain).max()))


@pytest.mark.parametrize("overrides,message", [
    ({"grad_accum_steps": 3}, r"config.grad_accum_steps=3 must be >= 1, and config.batch_size=128 "
                              r"a multiple of it times the 8 devices"),
    ({"grad_accum_steps": 2, "optimizer.sam_rho": 0.05},
     r"config.optimizer.sam_rho with config.grad_accum_steps > 1"),
    ({"model.param_dtype": "bf16"}, r"config.model.param_dtype='bf16'; known: \('float32'"),
])
def test_bad_large_model_settings_are_named(data_dir, overrides, message):
  config = fashion_mnist.get_config("")
  config.update_from_flattened_dict({"input.data_dir": data_dir, **overrides})
  builder = data.dataset_builder("fashion_mnist", data_dir)
  with pytest.raises(errors.UserError, match=message):
    trainer._check_config(config, builder)  # pylint: disable=protected-access


@pytest.mark.slow
def test_a_scanned_rematerialised_accumulating_run_exports_big_vision_npz(data_dir, tmp_path):
  """The whole trainer with every large-model key: exports in big_vision's per-block layout
  that `python -m eval`'s loader runs with the plain model."""
  config = fashion_mnist.get_config("runlocal,variant=mu/4")
  config.update_from_flattened_dict({
      "input.data_dir": data_dir, "total_steps": 4, "log_every_steps": 2,
      "final_eval_weights": ("params",), "input.heldout_split": "train[90%:91%]",
      "input.test_split": "test[:2%]", "model.scan_layers": True, "model.remat": True,
      "grad_accum_steps": 2, "batch_size": 32, "model.dtype": "bfloat16"})
  results = trainer.train_and_evaluate(config, str(tmp_path))
  exported = pretrained.load_npz(tmp_path / "final" / "params.npz")
  assert "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel" in exported
  assert not layer_stack.is_stacked(exported)
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["model"]["scan_layers"] is True
  from eval import evaluate  # pylint: disable=g-import-not-at-top
  direct = evaluate.evaluate(os.path.join(tmp_path, "final", "params.npz"), "test", config)
  assert direct["datasets"]["test"]["accuracy"] == pytest.approx(
      results["test"]["params"]["accuracy"], abs=0.02)
