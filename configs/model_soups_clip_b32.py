r"""The run config of model-soups' 72 CLIP ViT-B/32 ImageNet ingredients (Wortsman et al. 2022).

The paper's checkpoints (mlfoundations/model-soups releases, `model_<i>.pt`)
are converted as they are read; this config gives them TFDS ImageNet with
CLIP's preprocessing. The whole path (docs/interop.md):

  python -m train.convert --config=configs/model_soups_clip_b32.py \
      --in=ckpts/model_0.pt --out=ckpts/model_0.npz   # also writes model_0.config.json
  python -m soups --ingredients=$(ls ckpts/model_*.pt | paste -sd,) \
      --ingredient_config=ckpts/model_0.config.json --recipes=uniform,greedy \
      --soup_dir=soups/clip_b32

Arguments: data_dir=<TFDS data dir>, heldout=<TFDS split that ranks the
ingredients and cooks greedy> (default train[98%:], see below), test=<split>.
The paper's held-out set is 2% of ImageNet train chosen by its
`imagenet_98_idxs.npy`, which the checkpoints never saw; TFDS cannot select
those images, and train[98%:] overlaps what they were fine-tuned on.
"""

from configs import common

# CLIP's pixel mean and standard deviation (RGB, on [0, 1] values).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def get_config(arg=None):
  arg = common.parse_arg(arg, data_dir="", heldout="train[98%:]", test="validation")
  config = common.base_config()
  config.input.dataset = "imagenet2012"
  config.input.data_dir = arg.data_dir
  config.num_classes = 1000
  config.input.train_split = "train[:98%]"
  config.input.heldout_split = arg.heldout
  config.input.test_split = arg.test
  config.input.pp_eval = ("decode|resize_small(224, method='bicubic')|central_crop(224)"
                          f"|value_range(0, 1)|normalize({CLIP_MEAN}, {CLIP_STD})"
                          "|onehot({num_classes})")
  config.input.pp_train = config.input.pp_eval
  config.eval_batch_size = 512
  # OpenAI's CLIP ViT-B/32 visual tower and model-soups' head (python -m train.convert sets
  # the same from the checkpoints; here for a config that reads as what it runs).
  config.model.update(variant="B/32", pool_type="tok", gelu="quick", ln_eps=1e-5,
                      posemb_cls=True, ln_pre=True, proj_dim=512, normalize_features=True)
  return common.finalize(config)
