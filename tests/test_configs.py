"""Every shipped config builds, is locked, and passes the trainer's own checks."""

import glob
import importlib
import os

import pytest

from configs import common
from launch import sweep as sweep_lib
from tests.helpers import REPO
from train import optimizer
from train import pp_spec
from train import preprocess
from train import vit

CONFIG_ARGS = {
    "fashion_mnist": ["", "stage=pretrain", "runlocal", "stage=pretrain,runlocal,variant=mu/4",
                      "init=pretrained.npz,variant=nano/4", "stage=linear_probe,init=p.npz"],
    "imagenet": ["", "variant=B/16,res=384,init=augreg_b16.npz", "variant=G/14,res=518,fsdp=16",
                 "variant=S/16,res=224,pool=gap"],
    "model_soups_clip_b32": ["", "data_dir=/data/tfds,heldout=train[:1%]"],
}


def test_every_config_file_is_covered():
  files = {os.path.basename(f)[:-3] for f in glob.glob(os.path.join(REPO, "configs", "*.py"))}
  assert files - {"__init__", "common", "grid"} == set(CONFIG_ARGS)  # common, grid: helpers.


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in CONFIG_ARGS.items() for a in args])
def test_config_builds_and_is_locked(name, arg):
  config = importlib.import_module(f"configs.{name}").get_config(arg)
  with pytest.raises(AttributeError):
    config.learning_rate = 0.1  # A key that does not exist.
  assert set(config.keys()) == set(common.base_config().keys())
  preprocess.parse(pp_spec.resolve(config, "pp_train"))
  preprocess.parse(pp_spec.resolve(config, "pp_eval"))
  pp_spec.check_knobs_used(config)
  vit.decode_variant(config.model.variant)
  optimizer.make_optimizer(config)


def test_config_argument_errors():
  with pytest.raises(ValueError, match=r"unknown config argument 'varient'; known: "):
    common.parse_arg("varient=B/16", variant="S/16")
  with pytest.raises(ValueError, match=r"config argument runlocal='maybe' is not a bool"):
    common.parse_arg("runlocal=maybe", runlocal=False)
  parsed = common.parse_arg("variant=B/16,runlocal,steps=10", variant="S/16", runlocal=False, steps=1)
  assert (parsed.variant, parsed.runlocal, parsed.steps) == ("B/16", True, 10)


@pytest.mark.parametrize("spec,arg,count,start", [
    ("configs/sweeps/imagenet_vit_g.py", "init=g14.npz", 18, None),
    ("configs/sweeps/imagenet_vit_g.py", "variant=B/16,res=384,fsdp=0", 18, None),
    ("configs/sweeps/fashion_mnist.py", "init=pretrained.npz", 12, "linear_probe"),
    ("configs/sweeps/fashion_mnist.py", "init=pretrained.npz,size=small,steps=40", 4,
     "linear_probe"),
    ("configs/sweeps/fashion_mnist.py", "init=pretrained.npz,regime=naive", 12, None),
    ("configs/sweeps/fashion_mnist.py", "init=pretrained.npz,ssf", 12, "linear_probe")])
def test_sweep_configs_expand_into_valid_runs(spec, arg, count, start):
  sweep = sweep_lib.load(os.path.join(REPO, spec) + ":" + arg)
  spec = f"{spec}:{arg}"
  start_run = sweep_lib.start_run(sweep, spec)
  assert (start_run and start_run.name) == start
  runs = sweep_lib.expand(sweep, spec, "sweep/linear_probe/final/params.npz" if start else "")
  assert len(runs) == count and len({r.name for r in runs}) == count
  if start:  # Every run fine-tunes the probe; the probe itself fits the pre-trained .npz.
    assert {r.overrides["model_init"] for r in runs} == {"sweep/linear_probe/final/params.npz"}
    assert start_run.base.endswith("stage=linear_probe,variant=pico/7,init=pretrained.npz")
    assert {r.overrides.get("loss", "softmax_xent") for r in runs} == {"softmax_xent"}
