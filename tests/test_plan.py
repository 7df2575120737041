"""The pod plan (`python -m launch plan`) and the ImageNet configs it plans."""

import os
import types

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bench import flops
from configs import fashion_mnist
from configs import imagenet
from configs.sweeps import imagenet_vit_g
from launch import plan as plan_lib
from launch import sweep as sweep_lib
from tests.helpers import run_module
from train import data
from train import vit

F32 = 4  # Bytes.


def _config(**overrides):
  config = fashion_mnist.get_config("variant=mu/8")
  config.update_from_flattened_dict({"batch_size": 64, "eval_batch_size": 64, **overrides})
  return config


def _per_device(shapes, shards):
  """Bytes per device when every leaf with a dimension divisible by `shards` is split over it."""
  return sum(int(np.prod(s)) * F32 // (shards if any(d % shards == 0 for d in s) else 1)
             for s in shapes)


@pytest.mark.slow
def test_plan_memory_is_the_arithmetic_of_parameter_optimizer_and_ema_bytes():
  """Replicated SGD with momentum: one copy of the weights per device for each of params,
  momentum, ema_low and ema_high. FSDP Adam over the 8 devices: two moment copies, every
  divisible leaf an eighth per device. FLOPs match the model's analytic count."""
  replicated = plan_lib.plan_run(_config(), ["sgd"])
  params = vit.VisionTransformer(num_classes=5, **vit.decode_variant("mu/8"))
  shapes = [x.shape for x in jax.tree.leaves(jax.eval_shape(
      lambda: params.init(jax.random.key(0), np.zeros((1, 28, 28, 1))))["params"])]
  count = sum(int(np.prod(s)) for s in shapes)
  assert replicated.params == count
  assert replicated.image_shape == (28, 28, 1)
  for name in ("params", "ema_low", "ema_high"):
    assert replicated.state_bytes[name] == count * F32, name
  assert count * F32 <= replicated.state_bytes["opt_state"] <= count * F32 + 64  # + step counts.
  train = replicated.train
  assert train.argument_bytes >= sum(replicated.state_bytes.values())
  assert train.alias_bytes >= 0.99 * sum(replicated.state_bytes.values())  # Donated state.
  analytic = flops.model_flops("mu/8", 28, 1, 5, 64) / 8
  assert analytic <= train.flops <= 1.3 * analytic  # XLA also counts elementwise ops.

  fsdp = plan_lib.plan_run(_config(**{"optimizer.name": "adam",
                                      "param_sharding": ((".*", 'fsdp(axis="data")'),)}),
                           ["adam"])
  sharded = _per_device(shapes, 8)
  assert sharded < count * F32
  for name in ("params", "ema_low", "ema_high"):
    assert fsdp.state_bytes[name] == sharded, name
  assert 2 * sharded <= fsdp.state_bytes["opt_state"] <= 2 * sharded + 64
  # XLA's memory analysis is one device's: the sharded state and an eighth of the batch.
  state = sum(fsdp.state_bytes.values())
  assert state <= fsdp.train.argument_bytes <= state + 64 * (28 * 28 + 5) * F32 // 8 + 1024


@pytest.mark.slow
def test_scanned_and_rematerialised_plans_count_the_models_flops_and_need_less_memory():
  plain = plan_lib.plan_run(_config(**{"model.variant": "pico/8"}), ["plain"])
  large = plan_lib.plan_run(_config(**{"model.variant": "pico/8", "model.scan_layers": True,
                                       "model.remat": True}), ["large"])
  assert large.train.flops == pytest.approx(plain.train.flops, rel=1e-6)
  assert large.state_bytes == plain.state_bytes
  assert large.train.temp_bytes < plain.train.temp_bytes


def test_the_report_times_each_run_and_names_what_to_change_when_it_does_not_fit():
  plan = plan_lib.plan_run(_config(), ["a", "b"])
  plan.total_steps = {"a": 1000, "b": 3000}
  seconds = plan_lib.train_step_seconds(plan, 100.0, 0.5)
  assert seconds == pytest.approx(plan.train.flops / 50e12)
  text = plan_lib.report([plan], 8, 100.0, 2**40, 0.5)
  assert "fits" in text and "DOES NOT FIT" not in text
  hours = 4000 * seconds / 3600
  assert f"sweep: 2 runs, {hours:.2f} h on 8 devices" in text
  assert f"{1000 * seconds / 3600:.2f} h" in text and f"{3000 * seconds / 3600:.2f} h" in text
  small = plan_lib.report([plan], 8, 100.0, 1024, 0.5)
  assert "DOES NOT FIT" in small
  for change in ("config.model.remat=True", "config.grad_accum_steps", "config.batch_size"):
    assert change in small, change


@pytest.mark.parametrize("text,expected", [("32GiB", 32 * 2**30), ("80GB", 80 * 10**9),
                                           ("1.5 gib", int(1.5 * 2**30)), ("512MiB", 2**29)])
def test_device_memory_sizes_parse(text, expected):
  assert plan_lib.parse_bytes(text) == expected


def test_a_bad_device_memory_is_named():
  with pytest.raises(ValueError, match=r"--device_memory='32 GiBs': expected a size like 32GiB"):
    plan_lib.parse_bytes("32 GiBs")


def test_fake_devices_are_refused_once_jax_started_with_another_count(monkeypatch):
  """tests/conftest.py started JAX with 8 CPU devices: a plan for 8 goes on, for 256 cannot."""
  monkeypatch.setenv("XLA_FLAGS", os.environ["XLA_FLAGS"])  # Restored for later subprocesses.
  plan_lib.use_fake_devices(8)
  assert "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "")
  with pytest.raises(ValueError, match=r"already started its backend with 8 devices; .* for 256"):
    plan_lib.use_fake_devices(256)


def test_imagenet_config_holds_out_2_percent_of_train_disjoint_from_train_and_test():
  config = imagenet.get_config("variant=B/16,res=384,fsdp=16")
  assert config.input.dataset == "imagenet2012" and config.num_classes == 1000
  assert config.mesh == (("data", -1), ("fsdp", 16))
  splits = tfds.core.SplitDict([tfds.core.SplitInfo(name="train", shard_lengths=[1281167],
                                                    num_bytes=0),
                                tfds.core.SplitInfo(name="validation", shard_lengths=[50000],
                                                    num_bytes=0)])
  builder = types.SimpleNamespace(name="imagenet2012", info=types.SimpleNamespace(splits=splits))
  data.check_heldout_split(builder, config.input.train_split, config.input.heldout_split,
                           config.input.test_split)
  assert config.input.heldout_split == "train[98%:]" and config.input.test_split == "validation"
  assert plan_lib.image_shape(config) == (384, 384, 3)


def test_vit_g_sweep_varies_the_papers_knobs_and_keeps_both_emas():
  sweep = imagenet_vit_g.get_config("init=g14.npz")
  assert len(sweep_lib.expand(sweep, "configs/sweeps/imagenet_vit_g.py")) == 18
  config = sweep_lib.base_config(sweep["base"])
  assert config.model.variant == "G/14" and config.model_init == "g14.npz"
  points = sweep["grid"]
  assert sum(1 for p in points if p.get("optimizer.sam_rho")) == 4
  assert {p.get("loss", "softmax_xent") for p in points} == {"softmax_xent", "sigmoid_xent"}
  for key in ("lr", "schedule.decay", "aug.crop_min_area", "aug.randaug_layers",
              "aug.mixup_alpha", "aug.cutmix_alpha"):
    assert len({p.get(key) for p in points}) > 1, key
  assert sweep["common"]["ema.low"] == 0.999 and sweep["common"]["ema.high"] == 0.9999999


@pytest.mark.slow
def test_plan_cli_fakes_the_pods_devices_and_prints_the_sweep(tmp_path):
  sweep = tmp_path / "sweep.py"
  sweep.write_text(
      "def get_config(arg=None):\n"
      "  return {'base': 'configs/fashion_mnist.py:variant=mu/8',\n"
      "          'common': {'batch_size': 64, 'total_steps': 500},\n"
      "          'grid': [{'lr': 0.01}, {'lr': 0.03}]}\n")
  proc = run_module("launch", "plan", f"--sweep={sweep}", "--devices=4",
                    "--mesh=(('data',-1),)", "--accelerator=h100", "--mfu=0.5")
  assert "mesh {'data': 4}: 2 run(s)" in proc.stdout
  assert "at 989 TFLOP/s and MFU 0.5" in proc.stdout and "fits" in proc.stdout
  assert "sweep: 2 runs" in proc.stdout
  bad = run_module("launch", "plan", f"--sweep={sweep}", "--devices=4", check=False)
  assert bad.returncode == 2
  assert "plan needs --accelerator, or both --peak_tflops and --device_memory" in bad.stderr
