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
                      "init=pretrained.npz,variant=nano/4"],
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


@pytest.mark.parametrize("arg,count", [("init=pretrained.npz", 12),
                                       ("init=pretrained.npz,size=small,steps=40", 4)])
def test_sweep_configs_expand_into_valid_runs(arg, count):
  spec = f"configs/sweeps/fashion_mnist.py:{arg}"
  runs = sweep_lib.expand(sweep_lib.load(os.path.join(REPO, spec.partition(":")[0]) + ":" + arg),
                          spec)
  assert len(runs) == count and len({r.name for r in runs}) == count
