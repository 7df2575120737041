"""Fault injection: kills at random points, preemption and a full disk, survived with nothing lost.

Every test here injects faults into the real entry points (`python -m train`,
`python -m launch`, `python -m soups`), restarts the same command, and
asserts the end state is bit-identical to an uninterrupted run. The kill
points are drawn from a seeded generator (reproducible, but not chosen by
hand) over the outputs (checkpoints, results, soup files) the uninterrupted
run writes: a kill lands after a random one of them appears, plus a random
fraction of a second. Each injected fault is tallied in the session's
reliability summary (tests/conftest.py).
"""

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import fashion_mnist
from soups import ingredients as ingredients_lib
from soups import soup_step
from tests.helpers import REPO
from tests.helpers import run_module
from train import checkpoint
from train import preemption
from train import pretrained
from train import trainer

pytestmark = pytest.mark.slow

KILLS_PER_TARGET = 3
TRAIN = ("--config=configs/fashion_mnist.py:stage=pretrain,runlocal,variant=mu/4",
         "--config.total_steps=150", "--config.model.dropout=0.1",
         "--config.checkpoint.every_steps=25", "--config.log_every_steps=25")


def _start(module, *args):
  """`python -m module args` in its own process group, as a scheduler starts a job."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)


def _kill_at_random_progress(rng, progress, final, module, *args):
  """Starts and SIGKILLs (the whole process group) `KILLS_PER_TARGET` times, each time once
  `progress()` (a count of outputs on disk) reaches a target drawn at random in
  [1, final - 1), plus a random fraction of a second; the targets grow, as each restart
  resumes. Returns the kills that landed: those after which the process's exit status
  says SIGKILL ended it (not one that had already exited by itself)."""
  landed = 0
  targets = sorted(rng.choice(np.arange(1, final - 1), KILLS_PER_TARGET, replace=False))
  for target in targets:
    proc = _start(module, *args)
    try:
      deadline = time.monotonic() + 300
      while progress() < target and proc.poll() is None:
        assert time.monotonic() < deadline, f"no progress to {target} outputs in 300 s"
        time.sleep(0.02)
      time.sleep(rng.uniform(0, 0.3))  # Mid-step, mid-write or mid-log.
    finally:  # Also when the deadline passed: nothing is left running.
      with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # A process that exited is a zombie: unchanged.
      proc.wait()
    landed += proc.returncode == -signal.SIGKILL
  return landed


def _same_npz_files(dir_a, dir_b, relpaths):
  for relpath in relpaths:
    a, b = pretrained.load_npz(os.path.join(dir_a, relpath)), pretrained.load_npz(
        os.path.join(dir_b, relpath))
    assert a.keys() == b.keys(), relpath
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"{relpath}: {key}")


FINAL_WEIGHTS = [f"final/{name}.npz" for name in checkpoint.WEIGHT_NAMES]


@pytest.fixture(scope="module")
def reference_train(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp("reference_train"))
  run_module("train", *TRAIN, f"--workdir={workdir}", f"--config.input.data_dir={data_dir}")
  return workdir


def test_training_killed_at_random_points_ends_bit_identical(reference_train, tmp_path, data_dir,
                                                             reliability):
  """Kills land after random checkpoints (resumed runs are shorter than a fresh one)."""
  reference = reference_train
  args = (*TRAIN, f"--workdir={tmp_path}", f"--config.input.data_dir={data_dir}")
  rng = np.random.default_rng(1)
  for target in sorted(rng.choice(np.arange(25, 126, 25), KILLS_PER_TARGET, replace=False)):
    proc = _start("train", *args)
    _wait_for_checkpoint(proc, tmp_path, target)
    time.sleep(rng.uniform(0, 0.5))  # Mid-step, mid-write or mid-log.
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # The kill landed: SIGKILL ended the run, before it finished.
    assert proc.returncode == -signal.SIGKILL, (target, proc.returncode, proc.stderr.read()[-2000:])
    assert not (tmp_path / "results.json").exists(), target
  run_module("train", *args)
  _same_npz_files(reference, str(tmp_path), FINAL_WEIGHTS)
  with open(tmp_path / "results.json") as f, open(os.path.join(reference, "results.json")) as g:
    assert json.load(f) == json.load(g)
  with open(tmp_path / "metrics.jsonl") as f:
    steps = [json.loads(line)["step"] for line in f if "loss" in line]
  assert steps == list(range(25, 151, 25)), "metrics.jsonl must read as one uninterrupted run"
  reliability.record("SIGKILL of a training run", KILLS_PER_TARGET, survived=KILLS_PER_TARGET)


def _write_sweep(path, data_dir):
  path.write_text(
      "def get_config(arg=None):\n"
      "  return {'base': 'configs/fashion_mnist.py:stage=pretrain,runlocal,variant=mu/4',\n"
      f"          'common': {{'input.data_dir': {data_dir!r}, 'total_steps': 20,\n"
      "                      'checkpoint.every_steps': 10, 'final_eval_weights': ('params',)},\n"
      "          'grid': [{'lr': 0.001}, {'lr': 0.01}]}\n")
  return str(path)


@pytest.fixture(scope="module")
def reference_sweep(tmp_path_factory, data_dir):
  root = tmp_path_factory.mktemp("reference_sweep")
  sweep = _write_sweep(root / "sweep.py", data_dir)
  run_module("launch", f"--sweep={sweep}", f"--sweep_dir={root / 'sweep'}", "--parallel=2")
  return sweep, str(root / "sweep")


def _sweep_outputs(sweep_dir):
  """Checkpoints and results.json files written so far by a sweep's runs."""
  return sum(len(glob.glob(os.path.join(sweep_dir, "*", pattern)))
             for pattern in ("checkpoints/[0-9]*", "results.json"))


def _runs(sweep_dir):
  with open(os.path.join(sweep_dir, "manifest.json")) as f:
    return json.load(f)["runs"]


def test_sweep_killed_at_random_points_ends_bit_identical(reference_sweep, tmp_path, reliability):
  sweep, reference_dir = reference_sweep
  args = (f"--sweep={sweep}", f"--sweep_dir={tmp_path / 'sweep'}", "--parallel=2")
  landed = _kill_at_random_progress(
      np.random.default_rng(2), lambda: _sweep_outputs(tmp_path / "sweep"),
      _sweep_outputs(reference_dir), "launch", *args)
  assert landed == KILLS_PER_TARGET
  run_module("launch", *args)
  runs = _runs(tmp_path / "sweep")
  assert [r["status"] for r in runs] == ["done"] * 2
  for run in runs:
    _same_npz_files(os.path.join(reference_dir, run["workdir"]),
                    os.path.join(tmp_path, "sweep", run["workdir"]), ["final/params.npz"])
  reliability.record("SIGKILL of a sweep (launcher and its runs)", landed, survived=landed)


def test_greedy_soup_killed_at_random_points_ends_bit_identical(reference_sweep, tmp_path,
                                                                reliability):
  _, sweep_dir = reference_sweep
  args = (f"--sweep_dir={sweep_dir}", "--weights=params", "--recipes=uniform,greedy")
  run_module("soups", *args, f"--soup_dir={tmp_path / 'reference'}")
  killed = (*args, f"--soup_dir={tmp_path / 'killed'}")
  soup_outputs = lambda: len(os.listdir(tmp_path / "killed")) if (tmp_path / "killed").exists() else 0
  landed = _kill_at_random_progress(np.random.default_rng(3), soup_outputs,
                                    len(os.listdir(tmp_path / "reference")), "soups", *killed)
  assert landed == KILLS_PER_TARGET
  run_module("soups", *killed)
  for name in ("results.json", "greedy_journal.jsonl"):
    assert (tmp_path / "killed" / name).read_text() == (tmp_path / "reference" / name).read_text()
  _same_npz_files(str(tmp_path / "reference"), str(tmp_path / "killed"),
                  ["uniform/params.npz", "greedy/params.npz"])
  reliability.record("SIGKILL of a soup step (uniform, greedy)", landed, survived=landed)


def _with_file_size_limit(max_bytes, command):
  """`command` run with a full disk, as a process sees it: writes past `max_bytes` fail.

  util-linux's `prlimit` sets RLIMIT_FSIZE and execs the command (no Python code runs in
  the forked child, as `preexec_fn` would, under JAX's threads). Python ignores SIGXFSZ
  itself, so the write fails with EFBIG instead of a signal.
  """
  return ["prlimit", f"--fsize={max_bytes}", *command]


def _wait_for_checkpoint(proc, workdir, at_least):
  deadline = time.monotonic() + 300
  while not any(d.isdigit() and int(d) >= at_least
                for d in (os.listdir(workdir / "checkpoints") if (workdir / "checkpoints").exists()
                          else ())):
    assert proc.poll() is None and time.monotonic() < deadline, "the run ended too soon"
    time.sleep(0.05)


def test_preemption_then_a_full_disk_then_resume_ends_bit_identical(reference_train, tmp_path,
                                                                     data_dir, reliability):
  """SIGTERM checkpoints the current step and exits; resumed on a full disk, the next
  checkpoint write fails with a clear error and no partial checkpoint; with space, the
  same command finishes bit-identical to the uninterrupted run."""
  args = (*TRAIN, f"--workdir={tmp_path}", f"--config.input.data_dir={data_dir}")
  proc = _start("train", *args)
  _wait_for_checkpoint(proc, tmp_path, 50)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == preemption.EXIT_CODE, stderr[-2000:]
  stopped = int(stderr.split("preempted (SIGTERM) after step ")[1].split(":")[0])
  assert "Traceback" not in stderr and f"checkpoint saved in {tmp_path}" in stderr
  steps = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
  assert max(steps) == stopped and not (tmp_path / "results.json").exists()
  reliability.record("SIGTERM (preemption) of a training run", 1, survived=1)

  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  full = subprocess.run(  # A checkpoint's files do not fit.
      _with_file_size_limit(30_000, [sys.executable, "-m", "train", *args]), cwd=REPO, env=env,
      capture_output=True, text=True, timeout=600)
  assert full.returncode == 1
  assert f"FATAL writing a checkpoint to {tmp_path}/checkpoints failed" in full.stderr
  assert "File too large" in full.stderr  # EFBIG, in the OS's words: the cause is kept.
  assert f"The last complete checkpoint is step {stopped}; free space" in full.stderr
  assert not (tmp_path / "results.json").exists()

  run_module("train", *args)  # Space freed: the same command resumes and finishes.
  _same_npz_files(reference_train, str(tmp_path), FINAL_WEIGHTS)
  assert not [d for d in os.listdir(tmp_path / "checkpoints") if "tmp" in d], "partial output left"
  reliability.record("disk full during a checkpoint write", 1, survived=1)


def _short_config(data_dir, **overrides):
  config = fashion_mnist.get_config("stage=pretrain,runlocal,variant=mu/4")
  config.update_from_flattened_dict({"input.data_dir": data_dir, **overrides})
  return config


def _truncate_data_files(item_dir):
  for path in item_dir.rglob("*"):
    if path.is_file() and path.parent.name == "d":
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture(scope="module")
def finished_short_run(tmp_path_factory, data_dir):
  """runlocal mu/4, 20 steps, checkpoints at 10 and 20."""
  workdir = tmp_path_factory.mktemp("short_run")
  trainer.train_and_evaluate(_short_config(data_dir), str(workdir))
  return workdir


def test_a_corrupt_latest_checkpoint_names_itself_and_the_earlier_one(finished_short_run,
                                                                      tmp_path, data_dir,
                                                                      reliability):
  workdir = tmp_path / "run"
  shutil.copytree(finished_short_run, workdir)
  for done in ("results.json", "final"):  # Killed after the last checkpoint, before the export.
    shutil.rmtree(workdir / done) if (workdir / done).is_dir() else (workdir / done).unlink()
  _truncate_data_files(workdir / "checkpoints" / "20" / "params")
  with pytest.raises(ValueError, match=r"checkpoint .*/checkpoints/20 cannot be restored: .* "
                                       r"Move it out of the way to resume from step 10") as error:
    trainer.train_and_evaluate(_short_config(data_dir), str(workdir))
  shutil.move(workdir / "checkpoints" / "20", tmp_path / "moved_away")
  trainer.train_and_evaluate(_short_config(data_dir), str(workdir))
  _same_npz_files(str(finished_short_run), str(workdir), FINAL_WEIGHTS)
  reliability.bad_input("truncated latest checkpoint on resume", str(error.value))


@pytest.mark.parametrize("what", ["truncated", "other architecture"])
def test_a_bad_pretrained_npz_stops_the_run_before_it_writes_anything(
    finished_short_run, tmp_path, data_dir, what, reliability):
  good = finished_short_run / "final" / "params.npz"
  bad = tmp_path / "init.npz"
  if what == "truncated":
    bad.write_bytes(good.read_bytes()[:1000])
    message = r"init.npz is not a readable .npz file"
  else:
    shutil.copy(good, bad)  # mu/4 weights (1 block) into a pico/7 model (2 blocks).
    message = r"init.npz: model parameter 'Transformer/encoderblock_1/\S+' is missing from the checkpoint"
  config = _short_config(data_dir, model_init=str(bad), **{"model.variant": "pico/7"})
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=message) as error:
    trainer.train_and_evaluate(config, str(workdir))
  assert not (workdir / "config.json").exists()
  assert not [d for d in os.listdir(workdir / "checkpoints") if d.isdigit()]
  if what == "truncated":  # Fixed, the same workdir starts.
    trainer.train_and_evaluate(_short_config(data_dir, model_init=str(good)), str(workdir))
    assert (workdir / "results.json").exists()
  reliability.bad_input(f"{what} pre-trained .npz", str(error.value))


def test_soup_ingredients_missing_or_corrupt_are_named(finished_short_run, tmp_path, reliability):
  no_checkpoints = tmp_path / "no_checkpoints"
  shutil.copytree(finished_short_run, no_checkpoints, ignore=shutil.ignore_patterns("checkpoints"))
  (no_checkpoints / "checkpoints").mkdir()
  with pytest.raises(FileNotFoundError, match=r"run .*no_checkpoints has no checkpoint in") as error:
    ingredients_lib.from_paths([str(finished_short_run), str(no_checkpoints)], "ema_low")
  reliability.bad_input("soup ingredient run without checkpoints", str(error.value))

  corrupt = tmp_path / "corrupt"
  shutil.copytree(finished_short_run, corrupt)
  _truncate_data_files(corrupt / "checkpoints" / "20" / "ema_low")
  with pytest.raises(ValueError, match=r"ingredient corrupt: cannot read the orbax checkpoint "
                                       r"\S*/checkpoints/20/ema_low: \S") as error:
    soup_step.cook(ingredients_lib.from_paths([str(finished_short_run), str(corrupt)], "ema_low"),
                   str(tmp_path / "soup"), soup_step.Options(recipes=("uniform",)))
  # One line, orbax's cause without tensorstore's spec (pages of JSON): train/checkpoint.describe.
  assert "\n" not in str(error.value) and "tensorstore_spec" not in str(error.value)
  assert not (tmp_path / "soup" / "uniform").exists(), "no partial soup is left"
  reliability.bad_input("corrupt soup ingredient checkpoint", str(error.value))
