"""Logit ensemble: the mean of the ingredients' logits, the baseline with N× inference cost.

Streams over ingredients: one model's weights on the mesh at a time; the
running sum of logits over the split (examples × classes) is what is kept.
"""

import jax
import numpy as np

from train import sharding


def accuracy(model, ingredients, restore, evaluator):
  """Top-1 accuracy of the mean logits of `ingredients` on `evaluator`'s split."""
  logits_fn = jax.jit(lambda params, image: model.apply({"params": params}, image))
  summed, labels, masks = None, [], []
  for index, ingredient in enumerate(ingredients):
    params = restore(ingredient)
    batch_logits = []
    for batch in evaluator.global_batches():
      batch_logits.append(sharding.to_host(logits_fn(params, batch["image"])))
      if index == 0:
        labels.append(sharding.to_host(batch["labels"]))
        masks.append(sharding.to_host(batch["mask"]))
    del params
    stacked = np.concatenate(batch_logits)
    summed = stacked if summed is None else summed + stacked
  labels, mask = np.concatenate(labels), np.concatenate(masks)
  if evaluator.class_subset is not None:  # e.g. ImageNet-R: only its 200 classes compete.
    summed, labels = summed[:, evaluator.class_subset], labels[:, evaluator.class_subset]
  top1 = np.argmax(summed, axis=-1)
  correct = labels[np.arange(len(top1)), top1] > 0
  return float(np.sum(correct * mask) / np.sum(mask))


