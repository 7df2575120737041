r"""The embedded default's fine-tuning grid: the paper's knobs on Fashion-MNIST.

  python -m launch --sweep=configs/sweeps/fashion_mnist.py:init=runs/demo/pretrain/final/params.npz \
      --sweep_dir=runs/demo/sweep

Arguments: init=<pre-trained .npz> (required), size=full|small (small: 4 runs,
for tests), steps=<fine-tuning steps per run>.
"""

from configs import common
from configs import grid


def get_config(arg=None):
  """{'base': trainer config 'file.py:arg', 'common': overrides of every run, 'grid': [overrides]}."""
  arg = common.parse_arg(arg, init="", size="full", steps=300)
  if not arg.init:
    raise ValueError("the sweep needs init=<pre-trained .npz>")
  base = f"configs/fashion_mnist.py:init={arg.init}"
  common_overrides = {"total_steps": arg.steps, "ema.low": 0.99}
  if arg.size == "small":
    points = grid.product(lr=[0.01, 0.03], label_smoothing=[0.0, 0.1])
  else:
    points = (
        grid.cross(grid.product(lr=[0.01, 0.03]), grid.zipped(
            **{"schedule.decay": ["cosine", "linear", "cosine"],
               "aug.crop_min_area": [1.0, 0.5, 0.35],
               "aug.randaug_layers": [0, 1, 2]}))
        + grid.product(**{"aug.mixup_alpha": [0.2]}, lr=[0.01, 0.03])
        + grid.product(**{"aug.cutmix_alpha": [1.0]}, label_smoothing=[0.1])
        + grid.product(loss=["sigmoid_xent"], lr=[0.03, 0.1])
        + grid.random(2, seed=0, lr=grid.LogUniform(0.005, 0.05),
                      label_smoothing=grid.Uniform(0.0, 0.2)))
  return {"base": base, "common": common_overrides, "grid": points}
