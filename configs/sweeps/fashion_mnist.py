r"""The embedded default's fine-tuning grid: the paper's knobs on Fashion-MNIST.

  python -m launch --sweep=configs/sweeps/fashion_mnist.py:init=runs/demo/pretrain/final/params.npz \
      --sweep_dir=runs/demo/sweep

Arguments: init=<pre-trained .npz> (required), size=full|small (small: 4 runs
and smaller evaluation splits, for tests), steps=<fine-tuning steps per run>,
data_dir=<TFDS data dir>, ssf (SSF tuning of the frozen init, learning rates
scaled by `SSF_LR_SCALE`).
"""

from configs import common
from configs import grid

SSF_LR_SCALE = 3.0


def get_config(arg=None):
  """{'base': trainer config 'file.py:arg', 'common': overrides of every run, 'grid': [overrides]}."""
  arg = common.parse_arg(arg, init="", size="full", steps=200, data_dir="", ssf=False)
  if not arg.init:
    raise ValueError("the sweep needs init=<pre-trained .npz>")
  base = f"configs/fashion_mnist.py:init={arg.init}"
  # ema.low 0.95: over a run of a few hundred steps, the paper's 0.999 would still be mostly the
  # init. The soup step re-evaluates every weight set, so runs only score the one souped.
  common_overrides = {"total_steps": arg.steps, "ema.low": 0.95,
                      "final_eval_weights": ("ema_low",),
                      **({"input.data_dir": arg.data_dir} if arg.data_dir else {})}
  if arg.size == "small":  # For tests: 4 runs, smaller evaluation splits.
    points = grid.product(lr=[0.03, 0.1], label_smoothing=[0.0, 0.1])
    common_overrides.update({"input.heldout_split": "train[90%:95%]",
                             "input.test_split": "test[:20%]"})
  else:  # 12 runs over the paper's knobs, mild enough for a few hundred steps on 28x28.
    points = (
        grid.cross(grid.product(lr=[0.03, 0.1]), grid.zipped(
            **{"schedule.decay": ["cosine", "linear", "cosine"],
               "aug.crop_min_area": [1.0, 0.7, 1.0],
               "aug.randaug_layers": [0, 0, 1], "aug.randaug_magnitude": [10, 10, 5]}))
        + grid.product(**{"aug.mixup_alpha": [0.2]}, lr=[0.05, 0.1])
        + [{"aug.cutmix_alpha": 1.0, "label_smoothing": 0.1, "lr": 0.1}]
        + grid.product(loss=["sigmoid_xent"], lr=[0.1, 0.3])
        + grid.random(1, seed=0, lr=grid.LogUniform(0.03, 0.15),
                      label_smoothing=grid.Uniform(0.0, 0.15)))
  if arg.ssf:  # Scales and shifts near 1 and 0 move slowly: the same grid at larger rates.
    common_overrides["model.ssf"] = True
    points = [{**p, "lr": round(p["lr"] * SSF_LR_SCALE, 6)} for p in points]
  return {"base": base, "common": common_overrides, "grid": points}
