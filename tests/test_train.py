"""The trainer end to end, through its real entry point `python -m train`."""

import concurrent.futures
import hashlib
import json
import os

import numpy as np
import pytest

from configs import fashion_mnist
from tests.helpers import run_module
from train import checkpoint
from train import data
from train import pretrained
from train import trainer

# README, "Tests": pico/7 pre-trained 300 steps upstream, probed 60 steps and fine-tuned
# 150 steps downstream (LP-FT): the accuracy it reaches, and the measured value.
FINETUNE_HELDOUT_ACCURACY = 0.80

# A short run that exercises dropout (its RNG must resume exactly) and checkpoints often.
SHORT_RUN = ("--config=configs/fashion_mnist.py:stage=pretrain,runlocal,variant=mu/4",
             "--config.total_steps=400", "--config.model.dropout=0.1",
             "--config.checkpoint.every_steps=50", "--config.log_every_steps=50")
FSDP_RULES = "--config.param_sharding=(('.*/kernel', 'fsdp(axis=\"data\")'), ('.*', 'replicate'))"


def _final_weights(workdir):
  return {name: pretrained.load_npz(os.path.join(workdir, "final", f"{name}.npz"))
          for name in checkpoint.WEIGHT_NAMES}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_dir):
  """The short run, uninterrupted, on one device."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  proc = run_module("train", *SHORT_RUN, f"--workdir={workdir}",
                    f"--config.input.data_dir={data_dir}")
  return workdir, proc


@pytest.mark.slow
def test_run_writes_config_metrics_exports_and_results(reference_run):
  workdir, proc = reference_run
  assert "[train] step 400/400" in proc.stdout and "img/s" in proc.stdout
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["total_steps"] == 400
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert [m["step"] for m in lines if "loss" in m] == list(range(50, 401, 50))
  assert all(m["img_per_sec"] > 0 for m in lines if "loss" in m and m["step"] > 50)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))
  weights = _final_weights(workdir)
  assert weights["params"].keys() == weights["ema_low"].keys() == weights["ema_high"].keys()
  assert "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel" in weights["params"]
  kernel = "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"
  params, low, high = (weights[n][kernel] for n in checkpoint.WEIGHT_NAMES)
  # 400 steps: the low EMA (decay 0.999) lags the weights, the high one barely moved
  # from the init, so the three sets are distinct and ordered by distance.
  assert np.abs(high - params).max() > np.abs(low - params).max() > 0
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  for split in ("heldout", "test"):
    for name in checkpoint.WEIGHT_NAMES:
      assert 0.0 <= results[split][name]["accuracy"] <= 1.0
  assert results["heldout"]["params"]["num_examples"] > 0


@pytest.mark.slow
def test_rerunning_a_finished_run_changes_nothing(reference_run, data_dir):
  workdir, _ = reference_run
  before = os.path.getmtime(os.path.join(workdir, "results.json"))
  proc = run_module("train", *SHORT_RUN, f"--workdir={workdir}",
                    f"--config.input.data_dir={data_dir}")
  # One line saying so, no training step.
  assert proc.stdout.strip() == (f"[train] {os.path.join(workdir, 'results.json')} exists: "
                                 "the run is complete")
  assert os.path.getmtime(os.path.join(workdir, "results.json")) == before


@pytest.mark.slow
def test_eight_devices_with_fsdp_match_one_device(reference_run, tmp_path, data_dir):
  workdir = str(tmp_path / "eight")
  run_module("train", *SHORT_RUN, f"--workdir={workdir}", f"--config.input.data_dir={data_dir}",
             FSDP_RULES, "--config.mesh=(('data', 4), ('fsdp', 2))", devices=8)
  reference = _final_weights(reference_run[0])
  for name, weights in _final_weights(workdir).items():
    for key, value in weights.items():
      if key.endswith("/key/bias"):
        # Softmax ignores a shift shared by all keys: this bias's gradient is zero up to
        # rounding, which Adam scales up to full steps, so it drifts with reduction order.
        continue
      np.testing.assert_allclose(value, reference[name][key], atol=2e-3, rtol=1e-3,
                                 err_msg=f"{name}/{key}")


@pytest.mark.slow
def test_lp_ft_probe_trains_a_fresh_head_on_a_bit_identical_backbone_then_fine_tunes(
    pretrained_npz, tmp_path, data_dir):
  """LP-FT: a linear probe of the pre-trained model, then a fine-tune from it, against scratch."""
  finetune = ("--config.total_steps=150", "--config.log_every_steps=50",
              "--config.final_eval_weights=('params',)", f"--config.input.data_dir={data_dir}")
  with concurrent.futures.ThreadPoolExecutor(1) as pool:  # Scratch needs no probe: run beside it.
    scratch = pool.submit(run_module, "train", "--config=configs/fashion_mnist.py",
                          f"--workdir={tmp_path / 'scratch'}", *finetune)
    _probe_then_finetune(pretrained_npz, tmp_path, data_dir, finetune)
    scratch.result()
  accuracies = {}
  for run in ("finetune", "scratch"):
    with open(tmp_path / run / "results.json") as f:
      accuracies[run] = json.load(f)["heldout"]["params"]["accuracy"]
  assert accuracies["finetune"] >= FINETUNE_HELDOUT_ACCURACY, accuracies
  assert accuracies["finetune"] > accuracies["scratch"] + 0.01, accuracies


def _probe_then_finetune(pretrained_npz, tmp_path, data_dir, finetune):
  """The probe: only a fresh head moves; then a fine-tune from its export."""
  probe = tmp_path / "probe"
  proc = run_module("train", f"--config=configs/fashion_mnist.py:stage=linear_probe,"
                    f"init={pretrained_npz}", f"--workdir={probe}", "--config.total_steps=60",
                    "--config.log_every_steps=30", f"--config.input.data_dir={data_dir}")
  assert "config.trainable=('head/.*',): 325 trainable parameters of 104,645" in proc.stdout
  assert "WARNING" not in proc.stdout  # A fresh head: nothing of the upstream labels is kept.
  init = pretrained.load_npz(pretrained_npz)
  for name, weights in _final_weights(probe).items():
    assert weights.keys() == init.keys()
    for key in init:
      if not key.startswith("head/"):
        np.testing.assert_array_equal(weights[key], init[key], err_msg=f"{name} {key}")
    assert not np.array_equal(weights["head/kernel"], init["head/kernel"])
  with open(probe / "results.json") as f:
    assert json.load(f)["heldout"]["params"]["accuracy"] > 0.6  # 5 classes, chance 0.2.
  with open(probe / "init.json") as f:
    record = json.load(f)
  assert record == {"model_init": pretrained_npz, "sha256": hashlib.sha256(
      open(pretrained_npz, "rb").read()).hexdigest()}
  run_module("train", f"--config=configs/fashion_mnist.py:init={probe / 'final' / 'params.npz'}",
             f"--workdir={tmp_path / 'finetune'}", *finetune)


def test_a_loaded_head_of_other_classes_is_named_with_both_label_sets(tmp_path, data_dir,
                                                                     capsys):
  upstream = tmp_path / "upstream"
  upstream.mkdir()
  (upstream / "config.json").write_text(
      fashion_mnist.get_config("stage=pretrain").to_json())  # What the upstream run wrote.
  builder = data.dataset_builder("fashion_mnist", data_dir)

  def warning(**overrides):
    config = fashion_mnist.get_config(f"init={upstream / 'final' / 'params.npz'}")
    config.update_from_flattened_dict(overrides)
    trainer.warn_if_foreign_head(config, builder)
    return capsys.readouterr().out

  assert ("carries a head trained on fashion_mnist classes (0, 1, 4, 5, 8) [T-shirt/top, "
          "Trouser, Coat, Sandal, Bag], and this run loads it for fashion_mnist classes "
          "(2, 3, 6, 7, 9) [Pullover, Dress, Shirt, Sneaker, Ankle boot]") in warning()
  assert warning(**{"model_load.dont_load": ("head/.*",)}) == ""  # A fresh head.
  assert warning(**{"input.classes": fashion_mnist.UPSTREAM_CLASSES}) == ""  # The same labels.


@pytest.mark.slow
def test_misspelled_or_mistyped_config_key_is_an_error(tmp_path):
  proc = run_module("train", "--config=configs/fashion_mnist.py:runlocal",
                    f"--workdir={tmp_path}", "--config.optimizer.momentun=0.5", check=False)
  assert proc.returncode != 0
  assert "--config.optimizer.momentun: the config has no key 'momentun'; did you mean 'momentum'?" in proc.stderr
  proc = run_module("train", "--config=configs/fashion_mnist.py:runlocal",
                    f"--workdir={tmp_path}", "--config.total_steps=many", check=False)
  assert proc.returncode != 0 and "total_steps" in proc.stderr
  assert not os.listdir(tmp_path), "a bad config must not start a run"


def _config(data_dir, **overrides):
  """The runlocal pre-training config with dotted-key overrides, as --config.a.b=v would set."""
  config = fashion_mnist.get_config("stage=pretrain,runlocal,variant=mu/4")
  config.update_from_flattened_dict({"input.data_dir": data_dir, **overrides})
  return config


@pytest.mark.parametrize("overrides,message", [
    ({"num_classes": 10}, r"config.num_classes=10 but the data has 5 classes"),
    ({"input.pp_train": "decode|flip_up"}, r"config.input.pp_train: unknown op 'flip_up'"),
    ({"input.heldout_split": "train[85%:]"}, r"heldout_split='train\[85%:\]' shares 3000 examples"),
    ({"loss": "hinge"}, r"config.loss='hinge'; known"),
    ({"final_eval_weights": ("params", "ema_mid")}, r"final_eval_weights has \['ema_mid'\]"),
])
def test_bad_configs_fail_before_training(data_dir, tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    trainer.train_and_evaluate(_config(data_dir, **overrides), str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


def test_workdir_of_another_config_is_refused(data_dir, tmp_path):
  with open(tmp_path / "config.json", "w") as f:
    json.dump(json.loads(_config(data_dir, lr=0.5).to_json()), f)
  with pytest.raises(ValueError, match=r"config.json was written by a different config "
                                       r"\(keys \['lr'\] differ\)"):
    trainer.train_and_evaluate(_config(data_dir), str(tmp_path))


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
  # The learning rate warms up from 0 (step 1 is harmless) to 1e38 (step 2 overflows).
  config = _config(data_dir, **{"lr": 1e38, "log_every_steps": 1, "checkpoint.every_steps": 1,
                                "optimizer.grad_clip_norm": 0.0, "schedule.warmup_steps": 2})
  with pytest.raises(FloatingPointError, match=r"step 2: non-finite .*param_norm=(nan|inf).* "
                                               r"The last good checkpoint is step 1"):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
