"""Geometric warps of uint8 images, shared by RandAugment and the eval shifts: both rotate alike."""

import tensorflow as tf


def project(image, transform, fill):
  """Resamples a uint8 [H, W, C] image bilinearly; `transform` maps output (x, y) to input.

  Args:
    image: uint8 [H, W, C].
    transform: the 8 coefficients [a0, a1, a2, b0, b1, b2, c0, c1] of
      tf.raw_ops.ImageProjectiveTransformV3.
    fill: the value of pixels brought in from outside the image.
  """
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=tf.cast(image[None], tf.float32), transforms=tf.cast(transform, tf.float32)[None],
      output_shape=tf.shape(image)[:2], fill_value=float(fill), interpolation="BILINEAR",
      fill_mode="CONSTANT")
  return tf.cast(tf.clip_by_value(tf.round(out[0]), 0, 255), tf.uint8)


def rotate(image, cos, sin, fill):
  """Rotates a uint8 [H, W, C] image about its centre by the angle of cosine `cos`, sine `sin`.

  The caller computes `cos` and `sin` (Python floats or float32 scalars), so a
  fixed angle keeps its float64 trigonometry and a drawn one its float32.
  """
  h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  cx, cy = (w - 1) / 2, (h - 1) / 2
  # Inverse rotation about the centre: output (x, y) reads input R^-1 (x - c) + c.
  return project(image, [cos, -sin, cx - cos * cx + sin * cy,
                         sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0], fill)
