"""SSF: the merged plain ViT equals the SSF model, only SSF vectors and the head train,
runs export merged weights, and soups of SSF runs work on either form."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from configs import fashion_mnist
from eval import evaluate as evaluate_lib
from eval import weights as weights_lib
from soups import ingredients as ingredients_lib
from soups import soup_step
from train import optimizer
from train import pretrained
from train import sharding
from train import ssf
from train import trainable as trainable_lib
from train import trainer
from train import trees
from train import vit


def _model(variant="pico/4", num_classes=5, pool_type="gap", use_ssf=True):
  config = common.base_config()
  config.model.update(variant=variant, pool_type=pool_type, ssf=use_ssf)
  return vit.build_model(config.model, num_classes)


def _perturbed(params, seed):
  """Every leaf moved off its init (SSF vectors off the identity, the zero head nonzero)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("pool_type", ["gap", "tok"])
@pytest.mark.slow
def test_merged_weights_are_a_plain_vit_with_the_same_logits(pool_type):
  images = jax.random.normal(jax.random.key(1), (4, 28, 28, 1))
  ssf_model, plain_model = _model(pool_type=pool_type), _model(pool_type=pool_type, use_ssf=False)
  params = _perturbed(ssf_model.init(jax.random.key(0), images)["params"], seed=2)
  merged = ssf.merge(params)
  plain_shapes = jax.eval_shape(lambda: plain_model.init(jax.random.key(0), images)["params"])
  assert jax.tree.map(lambda a: a.shape, merged) == jax.tree.map(lambda a: a.shape, plain_shapes)
  assert not ssf.has_ssf(merged) and ssf.has_ssf(params)
  np.testing.assert_allclose(plain_model.apply({"params": merged}, images),
                             ssf_model.apply({"params": params}, images), rtol=1e-5, atol=1e-5)


def test_trainable_parameters_of_vit_b16_are_the_papers_count():
  """Lian et al. report 0.28M trainable parameters for ViT-B/16 on CIFAR-100."""
  shapes = jax.eval_shape(lambda: _model("B/16", 100).init(
      jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"])
  width, mlp, depth = 768, 3072, 12
  per_block = 2 * (2 * width + 3 * width + width + mlp + width)  # 2 LNs, q/k/v, out, 2 MLP.
  vectors = 2 * width + depth * per_block + 2 * width  # Patch embedding, blocks, encoder_norm.
  trainable, total = trainable_lib.count(shapes, ssf.trainable_mask)
  assert vectors == 205_824
  assert trainable == vectors + width * 100 + 100 == 282_724
  assert total - trainable == 85_797_120  # ViT-B/16 (gap pooling, no class token), frozen.


@pytest.mark.parametrize("overrides", [
    {"optimizer.name": "sgd"},
    {"optimizer.name": "adamw", "optimizer.weight_decay": 0.1},
    {"optimizer.name": "sgd", "optimizer.sam_rho": 0.05},
])
@pytest.mark.slow
def test_frozen_backbone_gets_exactly_zero_updates(overrides):
  config = common.base_config()
  config.update_from_flattened_dict({"model.ssf": True, "model.variant": "mu/4",
                                     "total_steps": 10, **overrides})
  model = _model("mu/4")
  images = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
  params = _perturbed(model.init(jax.random.key(0), images)["params"], seed=3)
  tx, _ = optimizer.make_optimizer(config)
  grad_fn = lambda p, _: jax.grad(lambda q: jnp.sum(model.apply({"params": q}, images) ** 2))(p)
  state = tx.init(params)
  for _ in range(3):  # SAM alternates ascent and descent steps.
    updates, state = tx.update(grad_fn(params, 0), state, params, grad_fn=grad_fn)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    flat = trees.flatten(updates)
    mask = trees.flatten(ssf.trainable_mask(updates))
    assert all(not np.any(flat[k]) for k in flat if not mask[k]), "a frozen leaf moved"
  assert all(np.any(flat[k]) for k in flat if mask[k]), "a trainable leaf did not move"


@pytest.fixture(scope="module")
def ssf_runs(tmp_path_factory, pretrained_npz, data_dir):
  """Two short SSF fine-tunes from the shared pre-trained init."""
  root = tmp_path_factory.mktemp("ssf_runs")
  for lr in (0.3, 1.0):
    config = fashion_mnist.get_config(f"init={pretrained_npz}")
    config.update_from_flattened_dict({
        "model.ssf": True, "lr": lr, "input.data_dir": data_dir, "total_steps": 60,
        "log_every_steps": 30, "checkpoint.every_steps": 60, "ema.low": 0.9,
        "final_eval_weights": ("params",), "schedule.warmup_steps": 5,
        "input.heldout_split": "train[90%:95%]", "input.test_split": "test[:25%]"})
    trainer.train_and_evaluate(config, str(root / f"lr{lr}"))
  return [str(root / f"lr{lr}") for lr in (0.3, 1.0)]


@pytest.mark.slow
def test_ssf_run_trains_only_its_vectors_and_exports_merged_weights(ssf_runs, pretrained_npz):
  init = pretrained.load_npz(pretrained_npz)
  run = ssf_runs[0]
  ingredient = ingredients_lib.from_paths([run], "params")[0]  # The last checkpoint.
  params = trees.flatten(sharding.to_host(weights_lib.load(
      ingredient.path, sharding.make_mesh((("data", -1),)), ((".*", "replicate"),))))
  for key, value in params.items():
    if ssf.is_ssf_param(key) or key.startswith("head/"):
      assert not np.array_equal(value, init.get(key, np.ones_like(value))), f"{key} did not train"
    else:
      np.testing.assert_array_equal(value, init[key], err_msg=f"frozen {key} moved")
  exported = pretrained.load_npz(os.path.join(run, "final", "params.npz"))
  assert set(exported) == set(init)
  merged = trees.flatten(ssf.merge(trees.unflatten(params)))
  for key in exported:
    np.testing.assert_allclose(exported[key], merged[key], rtol=1e-6, err_msg=key)

  # The exported plain ViT scores what the SSF model scored in training.
  with open(os.path.join(run, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  with open(os.path.join(run, "results.json")) as f:
    trained = json.load(f)["heldout"]["params"]["accuracy"]
  direct = evaluate_lib.evaluate(os.path.join(run, "final", "params.npz"), "heldout", config)
  assert direct["datasets"]["heldout"]["accuracy"] == pytest.approx(trained, abs=2e-3)
  assert trained > 0.8


@pytest.mark.slow
def test_soups_of_ssf_vectors_and_of_merged_weights_agree(ssf_runs, tmp_path):
  """Folding is linear in (scale, shift) over a shared frozen backbone: both soups are one model."""
  options = soup_step.Options(recipes=("uniform",))
  vectors = soup_step.cook(ingredients_lib.from_paths(ssf_runs, "params"),
                           str(tmp_path / "vectors"), options)
  merged = soup_step.cook(ingredients_lib.from_paths(
      [os.path.join(r, "final", "params.npz") for r in ssf_runs], "params"),
                          str(tmp_path / "merged"), options)
  for key in ("heldout_acc", "test_acc"):
    assert vectors["soups"]["uniform"][key] == pytest.approx(merged["soups"]["uniform"][key],
                                                             abs=2e-3)
  a = pretrained.load_npz(tmp_path / "vectors" / "uniform" / "params.npz")
  b = pretrained.load_npz(tmp_path / "merged" / "uniform" / "params.npz")
  assert set(a) == set(b) and not ssf.has_ssf(a)
  for key in a:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
