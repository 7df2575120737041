"""Helpers every config file uses: its argument string and the trainer's full schema."""

import difflib

import ml_collections


def parse_arg(arg, **defaults):
  """Parses a config argument 'variant=S/16,runlocal' into a ConfigDict.

  Each key must be one of `defaults`, and its value is converted to the
  default's type; a bare key sets a bool to True.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, has_value, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      close = difflib.get_close_matches(key, defaults, n=1)
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}"
                       + (f"; did you mean {close[0]!r}?" if close else ""))
    kind = type(defaults[key])
    if kind is bool:
      if has_value and value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r} is not a bool")
      parsed[key] = not has_value or value.lower() in ("true", "1")
    else:
      try:
        parsed[key] = kind(value)
      except ValueError as e:
        raise ValueError(f"config argument {key}={value!r} is not a {kind.__name__}") from e
  return parsed


def base_config():
  """Every key the trainer reads, with its default; config files set what differs.

  The dict is returned unlocked for the config file to edit; `finalize`
  locks it so that a misspelled override is an error.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 128  # Global batch, split over every device of every process.
  c.grad_accum_steps = 1  # Micro-batches per step whose gradients are averaged (memory).
  c.num_classes = 10

  c.input = ml_collections.ConfigDict()
  c.input.dataset = "fashion_mnist"
  c.input.data_dir = ""  # Empty: TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
  c.input.train_split = "train[:98%]"
  c.input.heldout_split = "train[98%:]"  # Ranks runs and cooks soups; never trained on.
  c.input.test_split = "test"
  c.input.classes = ()  # A subset of labels to keep, renumbered 0..k-1; empty: all.
  c.input.pp_train = "decode|value_range(-1, 1)|onehot(10)"
  c.input.pp_eval = "decode|value_range(-1, 1)|onehot(10)"
  c.input.num_threads = 0  # tf.data threads; 0: one per CPU core.

  c.model = ml_collections.ConfigDict()
  c.model.variant = "mu/4"
  c.model.pool_type = "gap"
  c.model.dropout = 0.0
  c.model.dtype = "float32"  # Compute dtype (bfloat16 on accelerators); logits are float32.
  c.model.param_dtype = "float32"  # Stored weights; the EMAs are float32 whatever it is.
  c.model.remat = False  # Recompute each encoder block's activations in the backward pass.
  c.model.scan_layers = False  # One scanned, stacked block: compiles in seconds at any depth.
  # SSF tuning (train/ssf.py): the backbone is frozen, learned per-channel scales and
  # shifts after every op and the head train; exports fold them into the weights.
  c.model.ssf = False
  # Variants of PyTorch-trained ViTs; `python -m train.convert` sets them (docs/interop.md).
  c.model.gelu = "tanh"  # MLP activation: 'tanh' (big_vision), 'erf' (timm, HF), 'quick' (CLIP).
  c.model.ln_eps = 1e-6  # LayerNorm epsilon (open_clip: 1e-5, HF: 1e-12).
  c.model.posemb_cls = False  # pos_embedding has the class token's entry, added after it.
  c.model.ln_pre = False  # CLIP's LayerNorm before the encoder.
  c.model.fc_norm = False  # timm's avg-pool LayerNorm after pooling (and no encoder_norm).
  c.model.proj_dim = 0  # CLIP's bias-free projection before the head; 0: none.
  c.model.normalize_features = False  # Unit-norm features before the head (model-soups).

  # Regexes (fullmatch) of the parameter paths that train; the rest are frozen (a linear
  # probe: ('head/.*',)). Within SSF's own set when model.ssf is on.
  c.trainable = (".*",)

  c.model_init = ""  # big_vision-style .npz to start from; empty: random init.
  c.model_load = ml_collections.ConfigDict()
  c.model_load.dont_load = ()  # Regexes of model keys that keep their init.
  c.model_load.ignore = ()  # Regexes of checkpoint keys the model does not use.

  c.loss = "softmax_xent"
  c.label_smoothing = 0.0  # Targets become (1 - ε) one-hot + ε / num_classes.

  # The paper's augmentation knobs. The per-example ones are placeholders used
  # in pp_train as {aug.<key>} (see train/pp_spec.py); setting one that
  # pp_train does not use is an error. mixup/CutMix mix whole batches.
  c.aug = ml_collections.ConfigDict()
  c.aug.crop_min_area = ml_collections.config_dict.placeholder(float)  # inception_crop area_min.
  c.aug.randaug_layers = ml_collections.config_dict.placeholder(int)  # RandAugment N; 0: off.
  c.aug.randaug_magnitude = ml_collections.config_dict.placeholder(int)  # RandAugment M, 0..10+.
  c.aug.mixup_alpha = 0.0  # Beta(α, α) mixing ratio; 0: off.
  c.aug.cutmix_alpha = 0.0  # 0: off.
  c.aug.cutmix_switch_prob = 0.5  # With both on: chance a batch uses CutMix rather than mixup.
  c.lr = 0.01
  c.schedule = ml_collections.ConfigDict()
  c.schedule.warmup_steps = 0
  c.schedule.decay = "cosine"
  c.schedule.end_lr_fraction = 0.0
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.0
  c.optimizer.weight_decay_pattern = ".*/kernel"
  c.optimizer.grad_clip_norm = 1.0  # 0: no clipping.
  c.optimizer.sam_rho = 0.0  # SAM's neighbourhood radius (optax.contrib.sam); 0: plain optimizer.

  c.ema = ml_collections.ConfigDict()
  c.ema.low = 0.999
  c.ema.high = 0.9999999

  c.mesh = (("data", -1),)
  c.param_sharding = ((".*", "replicate"),)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 100
  c.checkpoint.keep = 2
  c.log_every_steps = 10
  c.eval_every_steps = 0  # Held-out accuracy during training; 0: only at the end.
  c.eval_batch_size = 256
  c.final_eval_weights = ("params", "ema_low", "ema_high")
  return c


def finalize(config):
  """Locks `config`: from here on, setting a key that does not exist is an error."""
  config.lock()
  return config
