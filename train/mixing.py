"""mixup and CutMix: batch-level augmentations that mix images and their labels.

Run on the host in the input pipeline after batching, on float images and
one-hot (or smoothed) `labels`. Each batch is mixed with itself reversed, with
one ratio λ ~ Beta(α, α) per batch (as in timm); CutMix pastes a box covering
a fraction 1 - λ of the image and mixes labels by the box's exact area. When
both are on, a batch uses CutMix with probability `cutmix_switch_prob`, else
mixup. Randomness comes from the batch's seed, so mixing is a function of
(run seed, step). Soft labels work with both losses: softmax cross-entropy
takes the mixed distribution, sigmoid takes per-class targets in [0, 1].
"""

import tensorflow as tf

from train import errors

fold_in = tf.random.experimental.stateless_fold_in


def sample_beta(alpha, seed):
  """λ ~ Beta(alpha, alpha) as X / (X + Y) with X, Y ~ Gamma(alpha)."""
  x = tf.random.stateless_gamma([], fold_in(seed, 0), alpha)
  y = tf.random.stateless_gamma([], fold_in(seed, 1), alpha)
  return x / (x + y)


def mixup(images, labels, ratio):
  """Convex combination of each example with its partner in the reversed batch."""
  mix = lambda t: ratio * t + (1 - ratio) * tf.reverse(t, [0])
  return mix(images), mix(labels)


def cutmix_box(height, width, ratio, seed):
  """A box [top, bottom) x [left, right) of about (1 - ratio) of the image, centred at random."""
  cut = tf.sqrt(1.0 - ratio)
  cut_h = tf.cast(tf.cast(height, tf.float32) * cut, tf.int32)
  cut_w = tf.cast(tf.cast(width, tf.float32) * cut, tf.int32)
  cy = tf.random.stateless_uniform([], fold_in(seed, 2), 0, height, tf.int32)
  cx = tf.random.stateless_uniform([], fold_in(seed, 3), 0, width, tf.int32)
  top, bottom = tf.maximum(cy - cut_h // 2, 0), tf.minimum(cy + cut_h // 2, height)
  left, right = tf.maximum(cx - cut_w // 2, 0), tf.minimum(cx + cut_w // 2, width)
  return top, bottom, left, right


def cutmix(images, labels, ratio, seed):
  """Pastes the partner's box into each image; labels mix by the pasted area."""
  height, width = tf.shape(images)[1], tf.shape(images)[2]
  top, bottom, left, right = cutmix_box(height, width, ratio, seed)
  rows = tf.range(height)[:, None]
  cols = tf.range(width)[None, :]
  inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  mixed = tf.where(inside[None, :, :, None], tf.reverse(images, [0]), images)
  kept = 1.0 - tf.cast((bottom - top) * (right - left), tf.float32) / tf.cast(
      height * width, tf.float32)
  return mixed, kept * labels + (1 - kept) * tf.reverse(labels, [0])


def make_batch_mixer(mixup_alpha, cutmix_alpha, cutmix_switch_prob=0.5):
  """`fn(batch, seed) -> batch` mixing 'image' and 'labels', or None when both alphas are 0."""
  for name, alpha in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
    if alpha < 0:
      raise errors.UserError(f"config.aug.{name}={alpha} must be >= 0 (0: off)")
  if not 0 <= cutmix_switch_prob <= 1:
    raise errors.UserError(f"config.aug.cutmix_switch_prob={cutmix_switch_prob} must be in [0, 1]")
  if not mixup_alpha and not cutmix_alpha:
    return None

  def mix(batch, seed):
    images, labels = batch["image"], tf.cast(batch["labels"], tf.float32)
    with_mixup = lambda: mixup(images, labels, sample_beta(mixup_alpha, seed))
    with_cutmix = lambda: cutmix(images, labels, sample_beta(cutmix_alpha, seed), seed)
    if not cutmix_alpha:
      images, labels = with_mixup()
    elif not mixup_alpha:
      images, labels = with_cutmix()
    else:
      switch = tf.random.stateless_uniform([], fold_in(seed, 4)) < cutmix_switch_prob
      images, labels = tf.cond(switch, with_cutmix, with_mixup)
    return {**batch, "image": images, "labels": labels}
  return mix
