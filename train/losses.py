"""Per-example classification losses on (logits, target distributions)."""

import optax

from train import errors


def softmax_xent(logits, labels):
  """Cross-entropy of softmax(logits) against `labels` (one-hot or soft) [batch]."""
  return optax.softmax_cross_entropy(logits, labels)


def sigmoid_xent(logits, labels):
  """Sum over classes of independent binary cross-entropies [batch]."""
  return optax.sigmoid_binary_cross_entropy(logits, labels).sum(axis=-1)


def smooth_labels(labels, smoothing):
  """Label smoothing: (1 - smoothing) * labels + smoothing / num_classes."""
  return labels * (1.0 - smoothing) + smoothing / labels.shape[-1]


LOSSES = {"softmax_xent": softmax_xent, "sigmoid_xent": sigmoid_xent}


def get(name):
  if name not in LOSSES:
    raise errors.UserError(f"config.loss={name!r}; known: {sorted(LOSSES)}")
  return LOSSES[name]
