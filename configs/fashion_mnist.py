r"""Fashion-MNIST, the embedded default: pre-train upstream, fine-tune downstream.

The ten classes are split in two tasks. Upstream (T-shirt, trouser, coat,
sandal, bag: every kind of garment, as ImageNet-21k covers ImageNet-1k's
kinds) pre-trains a small ViT from scratch and exports it as a big_vision
`.npz`; downstream (pullover, dress, shirt, sneaker, ankle boot) fine-tunes
from that `.npz`, as one would fine-tune an ImageNet-21k ViT.
Data builds offline from Debian's dataset-fashion-mnist (see README).

Pre-train; fit a linear probe of the exported weights on the downstream
classes; fine-tune from the probe (LP-FT, Kumar et al. 2022):

  python -m train --config=configs/fashion_mnist.py:stage=pretrain \
      --workdir=runs/pretrain
  python -m train \
      --config=configs/fashion_mnist.py:stage=linear_probe,init=runs/pretrain/final/params.npz \
      --workdir=runs/probe
  python -m train \
      --config=configs/fashion_mnist.py:init=runs/probe/final/params.npz \
      --workdir=runs/finetune --config.lr=0.05

Arguments: stage=pretrain|linear_probe|finetune (default finetune), init=<npz>
(linear_probe, finetune), variant=<ViT variant> (default pico/7), runlocal (a
smoke run of a few steps). `linear_probe` trains a fresh head on the frozen
backbone of `init`; a sweep's runs start from its export
(configs/sweeps/fashion_mnist.py, docs/soups.md).
"""

from configs import common

UPSTREAM_CLASSES = (0, 1, 4, 5, 8)
DOWNSTREAM_CLASSES = (2, 3, 6, 7, 9)
STAGES = ("pretrain", "linear_probe", "finetune")


def get_config(arg=None):
  arg = common.parse_arg(arg, stage="finetune", init="", variant="pico/7", runlocal=False)
  if arg.stage not in STAGES:
    raise ValueError(f"stage={arg.stage!r}: expected one of {STAGES}")
  pretrain, probe = arg.stage == "pretrain", arg.stage == "linear_probe"
  config = common.base_config()

  config.input.dataset = "fashion_mnist"
  config.input.classes = UPSTREAM_CLASSES if pretrain else DOWNSTREAM_CLASSES
  config.num_classes = len(config.input.classes)
  config.input.train_split = "train[:90%]"
  config.input.heldout_split = "train[90%:]"
  config.input.test_split = "test"
  config.input.pp_eval = "decode(channels=1)|value_range(-1, 1)|onehot({num_classes})"
  if pretrain or probe:
    config.input.pp_train = config.input.pp_eval
  else:  # The grid's per-example knobs; these defaults leave images unchanged.
    config.input.pp_train = (
        "decode(channels=1)|inception_crop(28, area_min={aug.crop_min_area})"
        "|randaug({aug.randaug_layers}, {aug.randaug_magnitude})"
        "|value_range(-1, 1)|onehot({num_classes})")
    config.aug.crop_min_area = 1.0
    config.aug.randaug_layers = 0
    config.aug.randaug_magnitude = 10

  config.model.variant = arg.variant
  # Dropout in pre-training (as AugReg's ViTs on small data): better features for the probe
  # and fine-tuned runs that average better (measured on held-out: docs/soups.md).
  config.model.dropout = 0.1 if pretrain else 0.0
  config.model_init = "" if pretrain else arg.init

  config.batch_size = 128
  config.total_steps = 1500 if pretrain else 300
  config.optimizer.name = "adamw" if pretrain else "sgd"
  config.optimizer.weight_decay = 1e-4 if pretrain else 0.0
  config.lr = 1e-3 if pretrain else 0.01
  config.schedule.warmup_steps = 100 if pretrain else 20
  config.schedule.decay = "cosine"
  if probe:  # A fresh head fitted on the frozen backbone's features (LP of LP-FT).
    config.trainable = ("head/.*",)
    config.model_load.dont_load = ("head/.*",)
    config.optimizer.name = "adam"
    config.lr = 0.3  # Chosen on held-out accuracy: docs/soups.md.
    config.optimizer.grad_clip_norm = 0.0
  config.checkpoint.every_steps = 100
  config.log_every_steps = 25

  if arg.runlocal:
    config.total_steps = 20
    config.batch_size = 32
    config.schedule.warmup_steps = 2
    config.checkpoint.every_steps = 10
    config.log_every_steps = 5
    config.input.heldout_split = "train[90%:92%]"
    config.input.test_split = "test[:10%]"
  return common.finalize(config)
