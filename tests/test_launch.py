"""Sweeps: grids, stable run names, manifest, local/SLURM/TPU backends, multi-host training."""

import json
import os

import numpy as np
import pytest

from configs import grid
from launch import backends
from launch import manifest as manifest_lib
from launch import sweep as sweep_lib
from tests.helpers import free_port
from tests.helpers import run_module
from tests.helpers import start_processes
from train import pretrained

BASE = "configs/fashion_mnist.py:stage=pretrain,runlocal,variant=mu/4"


def _write_sweep(tmp_path, points, common=None, base=BASE, name="sweep.py", start=None):
  path = tmp_path / name
  path.write_text(
      "def get_config(arg=None):\n"
      f"  return {{'base': {base!r}, 'common': {common or {}!r}, 'grid': {points!r}"
      + (f", 'start': {start!r}" if start else "") + "}\n")
  return str(path)


def test_grid_helpers():
  assert grid.product(a=[1, 2], b=["x", "y"]) == [
      {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
  assert grid.zipped(a=[1, 2], b=[3, 4]) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
  assert grid.cross(grid.product(a=[1, 2]), grid.zipped(b=[3], c=[4])) == [
      {"a": 1, "b": 3, "c": 4}, {"a": 2, "b": 3, "c": 4}]
  with pytest.raises(ValueError, match="lists of one length"):
    grid.zipped(a=[1, 2], b=[3])
  space = dict(lr=grid.LogUniform(1e-4, 1e-1), smoothing=grid.Uniform(0, 0.2),
               loss=grid.Choice("softmax_xent", "sigmoid_xent"))
  draws = grid.random(20, seed=3, **space)
  assert draws == grid.random(20, seed=3, **space) != grid.random(20, seed=4, **space)
  assert all(1e-4 <= d["lr"] <= 1e-1 and 0 <= d["smoothing"] <= 0.2 for d in draws)
  assert {d["loss"] for d in draws} == {"softmax_xent", "sigmoid_xent"}


def test_run_names_are_readable_stable_and_survive_a_growing_grid(tmp_path):
  small = sweep_lib.expand(sweep_lib.load(_write_sweep(tmp_path, grid.product(lr=[0.1, 0.3]))), "s")
  grown = sweep_lib.expand(sweep_lib.load(_write_sweep(
      tmp_path, grid.product(lr=[0.05, 0.1, 0.3]) + [{"loss": "sigmoid_xent"}], name="g.py")), "g")
  assert [r.name for r in small] == [r.name for r in grown[1:3]]
  assert small[0].name.startswith("lr0.1-") and grown[3].name.startswith("losssigmoid_xent-")
  assert len({r.name for r in grown}) == 4
  manifest = manifest_lib.merge(str(tmp_path), "s", BASE, small)
  manifest_lib.refresh(str(tmp_path), manifest)
  manifest = manifest_lib.merge(str(tmp_path), "g", BASE, grown)
  assert [r["name"] for r in manifest["runs"]] == [r.name for r in small] + [grown[0].name, grown[3].name]


@pytest.mark.parametrize("points,common,message", [
    ([{"lr": 0.1}, {"learning_rate": 0.1}], {}, r"grid point 1 .*'learning_rate' is not a key"),
    ([{"aug.mixup": 0.2}], {}, r"'aug.mixup' is not a key of the trainer config"),
    ([{"total_steps": "many"}], {}, r"total_steps='many' has the wrong type"),
    ([], {}, r"the grid is empty"),
    ([{"lr": 0.1}, {"lr": 0.1}], {}, r"grid points 0 and 1 are the same run"),
])
def test_bad_grids_are_errors_before_anything_starts(tmp_path, points, common, message):
  path = _write_sweep(tmp_path, points, common)
  with pytest.raises(ValueError, match=message):
    sweep_lib.expand(sweep_lib.load(path), path)
  assert os.listdir(tmp_path) == ["sweep.py"]


def test_a_sweep_dir_of_another_sweep_is_refused(tmp_path):
  runs = sweep_lib.expand(sweep_lib.load(_write_sweep(tmp_path, [{"lr": 0.1}])), "s")
  manifest_lib.refresh(str(tmp_path), manifest_lib.merge(str(tmp_path), "s", BASE, runs))
  with pytest.raises(ValueError, match=r"manifest.json belongs to another sweep"):
    manifest_lib.merge(str(tmp_path), "t", "configs/fashion_mnist.py:stage=finetune", runs)


def test_slurm_and_tpu_backends_write_the_commands(tmp_path):
  runs = sweep_lib.expand(sweep_lib.load(_write_sweep(tmp_path, grid.product(lr=[0.1, 0.3]))), "s")
  manifest = manifest_lib.merge(str(tmp_path / "sw"), "s", BASE, runs)
  script = backends.slurm_script(str(tmp_path / "sw"), BASE, manifest["runs"], nodes=2,
                                 gpus_per_node=8, max_parallel=1)
  text = open(script).read()
  assert "#SBATCH --array=0-1%1" in text and "#SBATCH --nodes=2" in text
  assert "#SBATCH --gres=gpu:8" in text and 'srun bash -c "$COMMAND"' in text
  commands = open(os.path.join(os.path.dirname(script), "sweep.commands.txt")).read().splitlines()
  assert len(commands) == 2 and all("--distributed=auto" in c for c in commands)
  assert f"--workdir={tmp_path}/sw/{runs[0].name}" in commands[0] and "--config.lr=0.1" in commands[0]
  tpu = backends.tpu_commands(str(tmp_path / "sw"), BASE, manifest["runs"], "pod", "us-east5-b")
  assert tpu[0][:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=us-east5-b"]
  assert "--worker=all" in tpu[0] and "python3 -m train" in tpu[0][-1]
  assert "--distributed=auto" in tpu[0][-1]


@pytest.mark.slow
def test_local_sweep_runs_skips_finished_runs_and_reports_status(tmp_path, data_dir):
  sweep = _write_sweep(tmp_path, grid.product(lr=[0.001, 0.003]),
                       {"input.data_dir": data_dir, "total_steps": 10, "final_eval_weights": ("params",)})
  sweep_dir = tmp_path / "sweep"
  dry = run_module("launch", f"--sweep={sweep}", f"--sweep_dir={sweep_dir}", "--dry_run")
  assert dry.stdout.count("-m train --config=") == 2 and not sweep_dir.exists()
  first = run_module("launch", f"--sweep={sweep}", f"--sweep_dir={sweep_dir}", "--parallel=2")
  assert "2 to run" in first.stdout and first.stdout.count(" done") >= 2
  manifest = json.loads((sweep_dir / "manifest.json").read_text())
  assert [r["status"] for r in manifest["runs"]] == ["done", "done"]
  again = run_module("launch", f"--sweep={sweep}", f"--sweep_dir={sweep_dir}")
  assert "0 to run" in again.stdout and "started" not in again.stdout
  status = run_module("launch", "status", f"--sweep_dir={sweep_dir}").stdout
  for run in manifest["runs"]:
    assert run["name"] in status
  assert "10/10" in status and "2 done" in status and "%" in status


def test_a_start_run_gives_every_run_its_model_init_and_comes_first_on_slurm(tmp_path):
  start = {"name": "linear_probe", "base": "configs/fashion_mnist.py:stage=linear_probe,runlocal",
           "overrides": {"total_steps": 10}}
  sweep = _write_sweep(tmp_path, grid.product(lr=[0.1, 0.3]), start=start)
  sweep_dir = tmp_path / "sw"
  printed = run_module("launch", f"--sweep={sweep}", f"--sweep_dir={sweep_dir}", "--backend=slurm")
  assert "start run linear_probe (configs/fashion_mnist.py:stage=linear_probe,runlocal): to run first" \
      in printed.stdout
  init = f"--config.model_init={sweep_dir}/linear_probe/final/params.npz"
  grid_commands = (sweep_dir / "launch" / "sweep.commands.txt").read_text().splitlines()
  assert len(grid_commands) == 2 and all(init in c for c in grid_commands)
  start_commands = (sweep_dir / "launch" / "start.commands.txt").read_text().splitlines()
  assert len(start_commands) == 1 and "stage=linear_probe" in start_commands[0]
  assert f"--workdir={sweep_dir}/linear_probe" in start_commands[0]
  assert (f"START_JOB=$(sbatch --parsable {sweep_dir}/launch/start.sbatch) && sbatch "
          f"--dependency=afterok:$START_JOB {sweep_dir}/launch/sweep.sbatch") in printed.stdout
  manifest = json.loads((sweep_dir / "manifest.json").read_text())
  assert manifest["start"]["name"] == "linear_probe" and manifest["start"]["status"] == "pending"
  assert "linear_probe" in run_module("launch", "status", f"--sweep_dir={sweep_dir}").stdout


@pytest.mark.parametrize("start,points,message", [
    ({"overrides": {}}, [{"lr": 0.1}], r"'start' needs 'base'"),
    ({"base": BASE, "weights": "ema_mid"}, [{"lr": 0.1}], r"start weights 'ema_mid'"),
    ({"base": BASE, "overrides": {"lr_typo": 1}}, [{"lr": 0.1}], r"start run.*'lr_typo' is not a key"),
    ({"base": BASE}, [{"model_init": "x.npz"}], r"grid point 0: sets model_init, but the sweep's "
                                                r"start run gives every run its model_init"),
])
def test_bad_start_runs_are_errors(tmp_path, start, points, message):
  path = _write_sweep(tmp_path, points, start=start)
  with pytest.raises(ValueError, match=message):
    sweep = sweep_lib.load(path)
    sweep_lib.start_run(sweep, path)
    sweep_lib.expand(sweep, path, "start.npz")


@pytest.mark.slow
def test_two_processes_train_one_run_like_a_single_process(tmp_path, data_dir):
  args = [f"--config={BASE}", f"--config.input.data_dir={data_dir}", "--config.total_steps=20",
          "--config.model.dropout=0.1"]
  run_module("train", *args, f"--workdir={tmp_path / 'single'}", devices=2)
  procs = start_processes("train", [*args, f"--workdir={tmp_path / 'multi'}"], 2, free_port())
  outputs = ["".join(p.communicate(timeout=600)) for p in procs]
  assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
  assert "[train] step 20/20" in outputs[0] and "[train]" not in outputs[1]  # Logs: process 0.
  for name in ("params", "ema_low"):
    single = pretrained.load_npz(tmp_path / "single" / "final" / f"{name}.npz")
    multi = pretrained.load_npz(tmp_path / "multi" / "final" / f"{name}.npz")
    for key in single:
      np.testing.assert_allclose(multi[key], single[key], rtol=1e-5, atol=1e-6)
