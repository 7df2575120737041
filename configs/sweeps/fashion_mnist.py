r"""The embedded default's fine-tuning grid: the paper's knobs on Fashion-MNIST.

  python -m launch \
      --sweep=configs/sweeps/fashion_mnist.py:init=runs/demo/pretrain/final/params.npz \
      --sweep_dir=runs/demo/sweep

Arguments: init=<pre-trained .npz> (required), regime=lp_ft|naive,
variant=<ViT variant of init> (default pico/7),
size=full|small (small: 4 runs and smaller evaluation splits, for tests),
steps=<fine-tuning steps per run>, data_dir=<TFDS data dir>, ssf (SSF tuning
of the frozen init, learning rates scaled by `SSF_LR_SCALE`).

Regimes (docs/soups.md compares them):
  lp_ft  the paper's: a linear probe of `init` first (the sweep's start run),
         then every run fine-tunes from it, gently: one loss, learning rates
         over a decade, schedules, seeds, mild augmentation, one mixup and one
         label-smoothing run.
  naive  the first wave's: every run from `init` with its upstream head as it
         is, SGD up to 0.3, softmax and sigmoid losses, strong augmentation.
"""

from configs import common
from configs import grid

SSF_LR_SCALE = 3.0
REGIMES = ("lp_ft", "naive")


def _lp_ft_grid(lr):
  """12 runs around `lr`: a decade of rates x two schedules, seeds, mild knobs."""
  return (grid.product(lr=[round(lr / 3, 4), lr, round(3 * lr, 4)],
                       **{"schedule.decay": ["cosine", "linear"]})
          + grid.product(seed=[1, 2], lr=[lr])
          + [{"lr": lr, "seed": 3, "aug.crop_min_area": 0.9},
             {"lr": lr, "seed": 4, "aug.randaug_layers": 1, "aug.randaug_magnitude": 2},
             {"lr": lr, "seed": 5, "aug.mixup_alpha": 0.1},
             {"lr": lr, "seed": 6, "label_smoothing": 0.05}])


def _naive_grid():
  """The first wave's 12 runs: rates up to 0.3, strong knobs, two losses."""
  return (grid.cross(grid.product(lr=[0.03, 0.1]), grid.zipped(
      **{"schedule.decay": ["cosine", "linear", "cosine"],
         "aug.crop_min_area": [1.0, 0.7, 1.0],
         "aug.randaug_layers": [0, 0, 1], "aug.randaug_magnitude": [10, 10, 5]}))
          + grid.product(**{"aug.mixup_alpha": [0.2]}, lr=[0.05, 0.1])
          + [{"aug.cutmix_alpha": 1.0, "label_smoothing": 0.1, "lr": 0.1}]
          + grid.product(loss=["sigmoid_xent"], lr=[0.1, 0.3])
          + grid.random(1, seed=0, lr=grid.LogUniform(0.03, 0.15),
                        label_smoothing=grid.Uniform(0.0, 0.15)))


def get_config(arg=None):
  """{'base', 'common', 'grid'} and, for lp_ft, the 'start' run (see launch/sweep.py)."""
  arg = common.parse_arg(arg, init="", regime="lp_ft", variant="pico/7", size="full", steps=200,
                         data_dir="", ssf=False)
  if not arg.init:
    raise ValueError("the sweep needs init=<pre-trained .npz>")
  if arg.regime not in REGIMES:
    raise ValueError(f"regime={arg.regime!r}: expected one of {REGIMES}")
  data = {"input.data_dir": arg.data_dir} if arg.data_dir else {}
  # ema.low 0.95: over a run of a few hundred steps, the paper's 0.999 would still be mostly the
  # init. The soup step re-evaluates every weight set, so runs only score the one souped.
  common_overrides = {"total_steps": arg.steps, "ema.low": 0.95,
                      "final_eval_weights": ("ema_low",), **data}
  small = arg.size == "small"
  if small:  # For tests: 4 runs, smaller evaluation splits.
    common_overrides.update({"input.heldout_split": "train[90%:95%]",
                             "input.test_split": "test[:20%]"})
  sweep = {"common": common_overrides}
  if arg.regime == "lp_ft":
    # The start run gives every run its model_init.
    sweep["base"] = f"configs/fashion_mnist.py:variant={arg.variant}"
    sweep["start"] = {"name": "linear_probe",
                      "base": f"configs/fashion_mnist.py:stage=linear_probe,variant={arg.variant},"
                              f"init={arg.init}",
                      "overrides": {**data, **({k: common_overrides[k] for k in (
                          "input.heldout_split", "input.test_split")} if small else {})}}
    points = grid.product(lr=[0.02, 0.05], seed=[1, 2]) if small else _lp_ft_grid(0.05)
  else:
    sweep["base"] = f"configs/fashion_mnist.py:variant={arg.variant},init={arg.init}"
    points = grid.product(lr=[0.03, 0.1], label_smoothing=[0.0, 0.1]) if small else _naive_grid()
  if arg.ssf:  # Scales and shifts near 1 and 0 move slowly: the same grid at larger rates.
    common_overrides["model.ssf"] = True
    points = [{**p, "lr": round(p["lr"] * SSF_LR_SCALE, 6)} for p in points]
  sweep["grid"] = points
  return sweep
