r"""The model-soups paper's ViT-G/14 sweep: fine-tune one JFT-pre-trained ViT-G/14 on ImageNet.

  python -m launch plan --sweep=configs/sweeps/imagenet_vit_g.py:init=<G/14 .npz> \
      --devices=256 --accelerator=v4            # does it fit, how long, what it costs
  python -m launch --sweep=configs/sweeps/imagenet_vit_g.py:init=<G/14 .npz> \
      --sweep_dir=runs/imagenet_vit_g --backend=tpu --tpu=<pod> --zone=<zone>
  python -m soups --sweep_dir=runs/imagenet_vit_g --weights=ema_low --recipes=uniform,greedy \
      --shift_suite=imagenet_shifts              # greedy soup of the low-EMA weights

What the paper states (Wortsman et al., ICML 2022, section 3.3.2 and appendix):
runs vary the learning rate, the decay schedule, the loss (softmax or sigmoid
cross-entropy), the minimum crop size, and optionally RandAugment, mixup and
CutMix; four runs use SAM; every run keeps a low (0.999) and a high
(0.9999999) EMA of the weights; the greedy soup is cooked from the low-EMA
weights, ranked on ImageNet2p (the last 2% of train, held out).

What the paper does not state here, so these values are ours, taken from
big_vision's published fine-tuning settings (AugReg, arXiv 2106.10270;
"Scaling Vision Transformers", arXiv 2106.04560, for G/14's 518x518
fine-tuning resolution): the learning-rate values {0.01, 0.03} (SGD with
momentum, batch 512, 20k steps, 500 warmup steps), the crop areas {0.05,
0.5}, RandAugment (2, 10), mixup 0.2 (alpha) and CutMix 1.0, SAM's rho 0.05,
and the size of the grid (18 runs, against the paper's 58).

Large-model settings: weights, optimizer state and EMAs sharded over an
'fsdp' mesh axis (argument fsdp=, default 16), one scanned encoder block
(compiles in seconds), rematerialised blocks, bfloat16 compute with float32
weights and EMAs (docs/training.md#large-models).

Arguments: init=<G/14 .npz> (required to launch; the plan needs none), res=
(default 518), fsdp= (default 16; 0: data parallel only), variant= (default
G/14; the same grid for another ViT, e.g. variant=B/16,res=384,fsdp=0).
"""

from configs import common
from configs import grid


def get_config(arg=None):
  """{'base', 'common', 'grid'} (see launch/sweep.py)."""
  arg = common.parse_arg(arg, init="", variant="G/14", res=518, fsdp=16)
  base = (f"configs/imagenet.py:variant={arg.variant},res={arg.res},fsdp={arg.fsdp},"
          f"init={arg.init}")
  common_overrides = {"model.scan_layers": True, "model.remat": True,
                      "model.dtype": "bfloat16", "ema.low": 0.999, "ema.high": 0.9999999}
  schedules = grid.product(lr=[0.01, 0.03], **{"schedule.decay": ["cosine", "linear"]})
  points = (grid.cross(schedules, grid.product(loss=["softmax_xent", "sigmoid_xent"]))
            + grid.product(lr=[0.01, 0.03], **{"aug.crop_min_area": [0.5]})
            + [{"lr": 0.01, "aug.randaug_layers": 2, "aug.randaug_magnitude": 10},
               {"lr": 0.01, "aug.mixup_alpha": 0.2},
               {"lr": 0.01, "aug.cutmix_alpha": 1.0},
               {"lr": 0.03, "aug.randaug_layers": 2, "aug.mixup_alpha": 0.2}]
            + grid.product(lr=[0.01, 0.03], **{"schedule.decay": ["cosine", "linear"],
                                               "optimizer.sam_rho": [0.05]}))
  return {"base": base, "common": common_overrides, "grid": points}
