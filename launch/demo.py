r"""stockpot's main job on the embedded default, end to end and offline: `make demo`.

  1. pre-train a pico/7 ViT on 5 Fashion-MNIST classes, export big_vision .npz;
  2. fit a linear probe of it on the other 5 classes (the sweep's start run),
     then fine-tune a grid of runs from the probe (LP-FT, the paper's knobs);
  3. cook uniform, greedy, learned soups, the ensemble and WiSE-FT from the
     runs' low-EMA weights; evaluate on held-out, test and the offline shift
     suite; write report.md and plots;
  4. diagnose the soups: angles between the runs' updates, loss barriers,
     soup vs ensemble per pair, the error landscape (a section of report.md).

Everything lands under --out (default runs/demo). Each stage skips what is
already done, so re-running after a kill continues where it stopped.

  python -m launch.demo --out=runs/demo [--size=small --pretrain_steps=300 --finetune_steps=60]
  python -m launch.demo --out=runs/demo_naive --regime=naive  # the first wave's regime, to compare
"""

import os
import subprocess
import sys
import time

from absl import flags

from launch import sweep as sweep_lib
from soups import diagnostics_report
from train import command
from train import durations
from train import run_dir

_OUT = flags.DEFINE_string("out", "runs/demo", "Where everything is written.")
_SIZE = flags.DEFINE_enum("size", "full", ("full", "small"),
                          "Grid size (small: 4 runs, a coarser landscape, for tests).")
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", 1500, "Upstream pre-training steps.")
_FINETUNE_STEPS = flags.DEFINE_integer("finetune_steps", 200, "Steps of each fine-tuning run.")
_PARALLEL = flags.DEFINE_integer("parallel", 2, "Fine-tuning runs at a time.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data dir (default: $TFDS_DATA_DIR).")
_VARIANT = flags.DEFINE_string("variant", "pico/7", "The ViT variant (train/vit.py).")
_REGIME = flags.DEFINE_enum("regime", "lp_ft", ("lp_ft", "naive"),
                            "The sweep's regime (configs/sweeps/fashion_mnist.py).")
STAGES = 4


def _stage(index, text, eta_seconds=None):
  eta = f" | ETA {durations.format_duration(eta_seconds)}" if eta_seconds else ""
  print(f"[demo {index}/{STAGES}] {text}{eta}", flush=True)


def _run(*args):
  """Runs `python -m <args>`, streaming its output; stops the demo if it fails."""
  proc = subprocess.run([sys.executable, "-m", *args])
  if proc.returncode == command.EXIT_USER_ERROR:  # A user mistake: its FATAL line is the last.
    sys.exit(command.EXIT_USER_ERROR)
  if proc.returncode:
    sys.exit(f"[demo] failed: python -m {' '.join(args)} (exit {proc.returncode}); re-run "
             "`make demo` to continue from here")


def _images_per_second(workdir):
  """Training throughput measured by the pre-training run, for the next stages' ETA."""
  rates = [r for r in run_dir.logged_metric(workdir, "img_per_sec") if r]
  return sum(rates) / len(rates) if rates else None


def main(argv):
  del argv
  out = _OUT.value
  data = [f"--config.input.data_dir={_DATA_DIR.value}"] if _DATA_DIR.value else []
  start = time.monotonic()
  pretrain_dir = os.path.join(out, "pretrain")
  _stage(1, f"pre-training {_VARIANT.value} on the upstream classes ({_PRETRAIN_STEPS.value} "
            f"steps) -> {pretrain_dir}")
  _run("train", f"--config=configs/fashion_mnist.py:stage=pretrain,variant={_VARIANT.value}",
       f"--workdir={pretrain_dir}",
       f"--config.total_steps={_PRETRAIN_STEPS.value}", *data)
  npz = run_dir.exported_weights(pretrain_dir, "params")

  sweep = (f"configs/sweeps/fashion_mnist.py:init={npz},size={_SIZE.value},"
           f"steps={_FINETUNE_STEPS.value},data_dir={_DATA_DIR.value},regime={_REGIME.value},"
           f"variant={_VARIANT.value}")
  runs = len(sweep_lib.load(sweep)["grid"])
  rate = _images_per_second(pretrain_dir)
  eta = runs * (_FINETUNE_STEPS.value * 128 / rate + 15) if rate else None  # +15 s: start, eval.
  start_run = ("a linear probe of it, then " if _REGIME.value == "lp_ft" else "")
  _stage(2, f"fine-tuning {start_run}{runs} runs from {npz} -> {out}/sweep", eta)
  sweep_dir = os.path.join(out, "sweep")
  _run("launch", f"--sweep={sweep}", f"--sweep_dir={sweep_dir}", f"--parallel={_PARALLEL.value}")

  soup_dir = os.path.join(out, "soup")
  # About 60k images per ingredient are evaluated (held-out, test and 5 shifts, greedy
  # candidates, learned-soup epochs, the soups); a forward pass costs about a third of
  # a training step.
  _stage(3, f"cooking soups of the runs' ema_low weights -> {soup_dir}",
         runs * 60_000 / (3 * rate) if rate else None)
  _run("soups", f"--sweep_dir={sweep_dir}", "--weights=ema_low", f"--soup_dir={soup_dir}",
       "--shift_suite=fashion_mnist_shifts")
  # The pair pass reads each pair once and scores its average; lines and plane ~100 passes.
  heldout_passes = runs * (runs - 1) / 2 + runs + 100
  _stage(4, f"diagnosing the soups (angles, barriers, soup vs ensemble, landscape) -> {soup_dir}",
         heldout_passes * 3000 / (3 * rate) if rate else None)
  if not diagnostics_report.read(soup_dir):
    small = ("--landscape_grid=5", "--alphas=6") if _SIZE.value == "small" else ()
    _run("soups.diagnose", f"--sweep_dir={sweep_dir}", "--weights=ema_low",
         f"--soup_dir={soup_dir}", *small)
  minutes = (time.monotonic() - start) / 60
  print(f"[demo] done in {minutes:.1f} min: report in {os.path.join(soup_dir, 'report.md')}")


if __name__ == "__main__":
  command.run(main)
