"""Preprocessing as a string: `decode|resize(32)|value_range(-1, 1)|onehot(10)`.

Each op is a factory `op(*args, **kwargs)` returning a function
`(example, seed) -> example` on one example's dict of TF tensors. `seed` is a
stateless-RNG seed (int64[2]) unique to the example and the op's position in
the pipeline, so random ops are reproducible from (run seed, example position)
and independent of threading. Ops live in `OPS`; an unknown name is an error
listing the known ones.
"""

import tensorflow as tf

from train import call_spec
from train import errors
from train import randaugment


def decode(channels=3, key="image"):
  """Decodes encoded image bytes (PNG/JPEG/...) into uint8 [H, W, channels]."""
  def op(example, seed):
    del seed
    image = tf.io.decode_image(example[key], channels=channels, expand_animations=False)
    return {**example, key: image}
  return op


def resize(size, method="bilinear", key="image"):
  """Resizes to `size` (int: square, or (height, width)), keeping the dtype."""
  size = (size, size) if isinstance(size, int) else tuple(size)
  def op(example, seed):
    del seed
    image = example[key]
    resized = tf.image.resize(image, size, method=method)
    return {**example, key: tf.cast(resized, image.dtype) if image.dtype == tf.uint8 else resized}
  return op


def resize_small(smaller_size, method="area", key="image"):
  """Resizes so that the shorter side is `smaller_size`, keeping the aspect ratio."""
  def op(example, seed):
    del seed
    image = example[key]
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    ratio = tf.cast(smaller_size, tf.float32) / tf.cast(tf.minimum(h, w), tf.float32)
    new_h = tf.cast(tf.round(tf.cast(h, tf.float32) * ratio), tf.int32)
    new_w = tf.cast(tf.round(tf.cast(w, tf.float32) * ratio), tf.int32)
    resized = tf.image.resize(image, (new_h, new_w), method=method)
    return {**example, key: tf.cast(resized, image.dtype)}
  return op


def central_crop(size, key="image"):
  """Crops the central `size` (int or (height, width)) window."""
  size = (size, size) if isinstance(size, int) else tuple(size)
  def op(example, seed):
    del seed
    image = example[key]
    top = (tf.shape(image)[0] - size[0]) // 2
    left = (tf.shape(image)[1] - size[1]) // 2
    return {**example, key: image[top:top + size[0], left:left + size[1]]}
  return op


def inception_crop(size, area_min=0.05, area_max=1.0, method="bilinear", key="image"):
  """Inception-style random resized crop: a box of [area_min, area_max] of the image area.

  The box has a random aspect ratio in [3/4, 4/3] (log-uniform as in the
  Inception and big_vision crops) and is resized to `size` (int or (h, w)).
  `area_min` is the paper's "minimum crop size" knob.
  """
  size = (size, size) if isinstance(size, int) else tuple(size)
  if not 0 < area_min <= area_max <= 1:
    raise errors.UserError(
        f"inception_crop: need 0 < area_min={area_min} <= area_max={area_max} <= 1")
  def op(example, seed):
    image = example[key]
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.zeros([1, 0, 4], tf.float32), seed=seed,
        area_range=(area_min, area_max), aspect_ratio_range=(3 / 4, 4 / 3),
        min_object_covered=0.0, max_attempts=20, use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, crop_size)
    crop.set_shape([None, None, image.shape[-1]])
    resized = tf.image.resize(crop, size, method=method)
    return {**example, key: tf.cast(resized, image.dtype) if image.dtype == tf.uint8 else resized}
  return op


def flip_lr(key="image"):
  """Mirrors the image left-right with probability 1/2."""
  def op(example, seed):
    return {**example, key: tf.image.stateless_random_flip_left_right(example[key], seed)}
  return op


def randaug(num_layers=2, magnitude=10, key="image"):
  """RandAugment: `num_layers` ops at `magnitude` (0..10) on a uint8 image; 0 layers: off."""
  def op(example, seed):
    return {**example, key: randaugment.randaugment(example[key], num_layers, magnitude, seed)}
  return op


def value_range(vmin, vmax, in_min=0.0, in_max=255.0, key="image"):
  """Maps pixel values linearly from [in_min, in_max] to float32 [vmin, vmax]."""
  def op(example, seed):
    del seed
    image = tf.cast(example[key], tf.float32)
    image = (image - in_min) / (in_max - in_min)
    return {**example, key: vmin + image * (vmax - vmin)}
  return op


def normalize(mean, std, key="image"):
  """(x - mean) / std per channel, after value_range(0, 1): CLIP's and timm's input scaling."""
  def op(example, seed):
    del seed
    return {**example, key: (tf.cast(example[key], tf.float32) - mean) / std}
  return op


def onehot(depth, key="label", key_result="labels", on=1.0, off=0.0):
  """Integer label -> float32 one-hot vector of `depth` classes in `key_result`."""
  def op(example, seed):
    del seed
    return {**example, key_result: tf.one_hot(example[key], depth, on_value=on, off_value=off)}
  return op


OPS = {
    "decode": decode,
    "resize": resize,
    "resize_small": resize_small,
    "central_crop": central_crop,
    "inception_crop": inception_crop,
    "flip_lr": flip_lr,
    "randaug": randaug,
    "value_range": value_range,
    "normalize": normalize,
    "onehot": onehot,
}


def parse(spec, ops=None):
  """Checks a pp string and returns its op list; raises ValueError naming bad ops.

  `ops` (default `OPS`) lets other packages add ops, e.g. eval's shifts.
  """
  return call_spec.parse_chain(spec, OPS if ops is None else ops)


def build(spec, ops=None):
  """Returns `fn(example, seed) -> example` running every op of `spec` in order."""
  ops = OPS if ops is None else ops
  ops = [ops[name](*args, **kwargs) for name, args, kwargs in parse(spec, ops)]
  def preprocess(example, seed):
    for i, op in enumerate(ops):
      example = op(example, tf.random.experimental.stateless_fold_in(seed, i))
    return example
  return preprocess
