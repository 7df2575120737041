r"""ImageNet-1k fine-tuning of a big_vision ViT `.npz`: the model-soups paper's regime.

  python -m train --config=configs/imagenet.py:variant=B/16,res=384,init=<augreg B/16 .npz> \
      --workdir=runs/imagenet/b16

Data: TFDS `imagenet2012` (prepare it in array_record format: `tfds build
imagenet2012 --file_format=array_record` with the archives in TFDS's manual
dir). Held-out: the last 2% of the training split (the paper's "ImageNet2p",
which ranks runs and cooks greedy soups; the trainer checks it is disjoint
from train and test). Test: `validation`. Shifts: `imagenet_shifts` (ImageNet-V2,
-R, -Sketch, -A: `python -m eval --suite=`, `python -m soups --shift_suite=`).

Pre-processing is big_vision's for ImageNet fine-tuning: an Inception crop at
`res` (its minimum area a grid knob, `aug.crop_min_area`) and a random flip
for training; resize the shorter side to res / 0.875 and a central `res` crop
for evaluation. Optimizer and schedule are big_vision's published transfer
defaults (AugReg, arXiv 2106.10270): SGD with momentum 0.9, no weight decay,
global-norm clipping at 1, batch 512, 20k steps, 500 warmup steps, cosine.

Arguments: variant=<ViT variant of init> (default B/16), init=<.npz> (e.g. the
public AugReg ImageNet-21k B/16 checkpoint), res=<image side> (default 384),
fsdp=<size of an 'fsdp' mesh axis that shards weights, optimizer state and
EMAs; 0: data parallel only>, pool=tok|gap (default tok, as AugReg's ViTs).
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, variant="B/16", init="", res=384, fsdp=0, pool="tok")
  config = common.base_config()
  res = arg.res

  config.input.dataset = "imagenet2012"
  config.num_classes = 1000
  config.input.train_split = "train[:98%]"
  config.input.heldout_split = "train[98%:]"
  config.input.test_split = "validation"
  config.input.pp_train = (
      f"decode|inception_crop({res}, area_min={{aug.crop_min_area}})|flip_lr"
      "|randaug({aug.randaug_layers}, {aug.randaug_magnitude})"
      "|value_range(-1, 1)|onehot({num_classes})")
  config.input.pp_eval = (f"decode|resize_small({round(res / 0.875)})|central_crop({res})"
                          "|value_range(-1, 1)|onehot({num_classes})")
  config.aug.crop_min_area = 0.05  # big_vision's inception_crop default.
  config.aug.randaug_layers = 0
  config.aug.randaug_magnitude = 10

  config.model.variant = arg.variant
  config.model.pool_type = arg.pool
  config.model_init = arg.init
  # ImageNet-21k checkpoints carry a pre-logits layer and a 21k-class head: the first is
  # dropped, the second re-initialised (another class count).
  config.model_load.ignore = ("pre_logits/.*",)

  config.batch_size = 512
  config.total_steps = 20_000
  config.optimizer.name = "sgd"
  config.optimizer.momentum = 0.9
  config.optimizer.grad_clip_norm = 1.0
  config.lr = 0.03
  config.schedule.warmup_steps = 500
  config.schedule.decay = "cosine"
  config.checkpoint.every_steps = 1000
  config.log_every_steps = 50
  config.eval_batch_size = 1024
  if arg.fsdp:
    config.mesh = (("data", -1), ("fsdp", arg.fsdp))
    config.param_sharding = ((".*", 'fsdp(axis="fsdp")'),)
  return common.finalize(config)
