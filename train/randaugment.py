"""RandAugment (Cubuk et al., 2020) on one uint8 image, with stateless randomness.

`randaugment(image, num_layers, magnitude, seed)` applies `num_layers` ops
drawn uniformly from `OP_NAMES`, each at `magnitude` on the usual 0..10 scale
(larger values extrapolate, as in the TF models and timm versions). The op
list and magnitude ranges are the standard ones (AutoContrast, Equalize,
Invert, Rotate, Posterize, Solarize, SolarizeAdd, Color, Contrast, Brightness,
Sharpness, ShearX/Y, TranslateX/Y, Cutout), with timm's "increasing" mappings
so that a larger magnitude always distorts more.

Written here because the maintained TF implementations (tf-models-official,
keras-cv) draw from stateful RNGs: every random choice below comes from the
`seed` argument, so an augmented example is a pure function of (run seed,
example position) and resumed runs see identical images.
"""

import math

import tensorflow as tf

from train import warps

MAX_LEVEL = 10.0
FILL = 128  # Gray fill for pixels that geometric ops bring in from outside.


def _blend(image, degenerate, factor):
  """PIL's ImageEnhance: image + factor * (image - degenerate), clipped to uint8."""
  image, degenerate = tf.cast(image, tf.float32), tf.cast(degenerate, tf.float32)
  return tf.cast(tf.clip_by_value(degenerate + factor * (image - degenerate), 0, 255), tf.uint8)


def _grayscale(image):
  """Luma as an image of the same channel count (a 1-channel image is its own luma)."""
  if image.shape[-1] != 3:
    return image
  return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))


def _signed(value, seed):
  """`value` with a random sign, as every symmetric op needs."""
  return tf.where(tf.random.stateless_uniform([], seed) < 0.5, -value, value)


def auto_contrast(image, level, seed):
  del level, seed
  image = tf.cast(image, tf.float32)
  lo = tf.reduce_min(image, axis=(0, 1), keepdims=True)
  hi = tf.reduce_max(image, axis=(0, 1), keepdims=True)
  scaled = (image - lo) * 255.0 / tf.maximum(hi - lo, 1.0)
  return tf.cast(tf.where(hi > lo, scaled, image), tf.uint8)


def _equalize_channel(channel):
  """Histogram equalization of one uint8 channel, as PIL.ImageOps.equalize."""
  histogram = tf.histogram_fixed_width(tf.cast(channel, tf.int32), [0, 255], nbins=256)
  last_nonzero = tf.gather(histogram, tf.reduce_max(tf.where(histogram > 0)))
  step = (tf.reduce_sum(histogram) - last_nonzero) // 255
  lut = (tf.cumsum(histogram) + step // 2) // tf.maximum(step, 1)
  lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
  equalized = tf.gather(lut, tf.cast(channel, tf.int32))
  return tf.cast(tf.where(step == 0, tf.cast(channel, tf.int32), equalized), tf.uint8)


def equalize(image, level, seed):
  del level, seed
  return tf.stack([_equalize_channel(image[..., c]) for c in range(image.shape[-1])], -1)


def invert(image, level, seed):
  del level, seed
  return 255 - image


def rotate(image, level, seed):
  degrees = _signed(level / MAX_LEVEL * 30.0, seed)
  angle = degrees * math.pi / 180.0
  return warps.rotate(image, tf.cos(angle), tf.sin(angle), FILL)


def posterize(image, level, seed):
  del seed
  shift = tf.cast(tf.clip_by_value(tf.floor(level / MAX_LEVEL * 4.0), 0, 7), tf.uint8)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize(image, level, seed):
  del seed
  threshold = 256.0 - level / MAX_LEVEL * 256.0
  return tf.where(tf.cast(image, tf.float32) >= threshold, 255 - image, image)


def solarize_add(image, level, seed):
  del seed
  added = tf.clip_by_value(tf.cast(image, tf.float32) + level / MAX_LEVEL * 110.0, 0, 255)
  return tf.where(image < 128, tf.cast(added, tf.uint8), image)


def _enhance(degenerate_fn):
  """An ImageEnhance-style op: factor 1 ± 0.9 * level / 10 towards/away from `degenerate`."""
  def op(image, level, seed):
    factor = 1.0 + _signed(level / MAX_LEVEL * 0.9, seed)
    return _blend(image, degenerate_fn(image), factor)
  return op


def _mean_gray(image):
  return tf.cast(tf.fill(tf.shape(image), tf.reduce_mean(tf.cast(_grayscale(image), tf.float32))),
                 tf.uint8)


def _smoothed(image):
  """PIL's SMOOTH filter on the interior, original pixels on the border."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  channels = image.shape[-1]
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
  blurred = tf.nn.depthwise_conv2d(tf.cast(image, tf.float32)[None], kernel, [1, 1, 1, 1], "VALID")
  blurred = tf.cast(tf.clip_by_value(tf.round(blurred[0]), 0, 255), tf.uint8)
  interior = tf.pad(tf.ones_like(blurred, tf.bool), [[1, 1], [1, 1], [0, 0]])
  return tf.where(interior, tf.pad(blurred, [[1, 1], [1, 1], [0, 0]]), image)


def _shear(axis):
  def op(image, level, seed):
    s = _signed(level / MAX_LEVEL * 0.3, seed)
    return warps.project(image, [1.0, s, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0] if axis == "x"
                         else [1.0, 0.0, 0.0, s, 1.0, 0.0, 0.0, 0.0], FILL)
  return op


def _translate(axis):
  def op(image, level, seed):
    size = tf.cast(tf.shape(image)[1 if axis == "x" else 0], tf.float32)
    pixels = _signed(level / MAX_LEVEL * 0.45 * size, seed)
    return warps.project(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0, 0.0, 0.0] if axis == "x"
                         else [1.0, 0.0, 0.0, 0.0, 1.0, pixels, 0.0, 0.0], FILL)
  return op


def cutout(image, level, seed):
  """A gray square of side level/10 * 40% of the shorter side, centred at a random pixel."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  half = tf.cast(level / MAX_LEVEL * 0.2 * tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
  cy = tf.random.stateless_uniform([], seed, 0, h, tf.int32)
  cx = tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(seed, 1),
                                   0, w, tf.int32)
  rows, cols = tf.range(h)[:, None, None], tf.range(w)[None, :, None]
  inside = (tf.abs(rows - cy) < half) & (tf.abs(cols - cx) < half)
  return tf.where(inside, tf.constant(FILL, tf.uint8), image)


OPS = {
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Invert": invert,
    "Rotate": rotate,
    "Posterize": posterize,
    "Solarize": solarize,
    "SolarizeAdd": solarize_add,
    "Color": _enhance(_grayscale),
    "Contrast": _enhance(_mean_gray),
    "Brightness": _enhance(tf.zeros_like),
    "Sharpness": _enhance(_smoothed),
    "ShearX": _shear("x"),
    "ShearY": _shear("y"),
    "TranslateX": _translate("x"),
    "TranslateY": _translate("y"),
    "Cutout": cutout,
}
OP_NAMES = tuple(OPS)


def apply_op(name, image, magnitude, seed):
  """One named op at `magnitude` (0..10 scale); for tests and visual checks."""
  return OPS[name](image, tf.constant(float(magnitude)), seed)


def randaugment(image, num_layers, magnitude, seed):
  """`num_layers` uniformly drawn ops at `magnitude` on a uint8 [H, W, C] image."""
  level = tf.constant(float(magnitude))
  for layer in range(num_layers):
    layer_seed = tf.random.experimental.stateless_fold_in(seed, layer)
    choice = tf.random.stateless_uniform([], layer_seed, 0, len(OPS), tf.int32)
    op_seed = tf.random.experimental.stateless_fold_in(layer_seed, 1)
    shape = image.shape
    image = tf.switch_case(choice, [
        (lambda fn=fn, img=image, op_seed=op_seed: fn(img, level, op_seed)) for fn in OPS.values()])
    image.set_shape(shape)
  return image
