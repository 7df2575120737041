"""Accuracy of a logit ensemble: the mean logits of several weight sets, the N×-cost baseline.

Streams over weight sets: each is used for one pass over the split and can
be dropped before the next is loaded (pass a generator). What is kept is
the running sum of logits (examples × scored classes) and the labels,
sharded over the mesh like the batches.
"""

import jax
import numpy as np

from train import accuracy
from train import sharding





class EnsembleAccuracy:
  """`evaluate(params_seq)` -> {'accuracy', 'loss', 'num_examples'} of the mean logits.

  Takes the same arguments as `train.accuracy.SplitAccuracy`, whose padded
  global batches and top-1 rule (`labels[argmax] > 0`, masked padding) it
  reuses, so an ensemble of one weight set scores exactly as that set does.
  The loss is that of the mean logits.
  """

  def __init__(self, model, mesh, split, preprocess_fn, batch_size, loss_fn,
               params_sharding, num_threads=0, class_subset=None):
    self.batches = accuracy.SplitAccuracy(model, mesh, split, preprocess_fn, batch_size, loss_fn,
                                          params_sharding, num_threads, class_subset)
    batch_sharding = self.batches.batch_sharding
    columns = slice(None) if class_subset is None else np.asarray(class_subset)

    def logits(params, image):
      return model.apply({"params": params}, image)[:, columns]

    def add_logits(total, params, image):
      return total + logits(params, image)

    def batch_sums(total, count, labels, mask):
      return accuracy.masked_sums(total / count, labels[:, columns], mask, loss_fn)

    self._logits = jax.jit(logits, in_shardings=(params_sharding, batch_sharding),
                           out_shardings=batch_sharding)
    self._add_logits = jax.jit(add_logits, in_shardings=(batch_sharding, params_sharding,
                                                         batch_sharding),
                               out_shardings=batch_sharding, donate_argnums=0)
    self._batch_sums = jax.jit(batch_sums, out_shardings=sharding.replicated(mesh))

  def evaluate(self, params_seq):
    totals, targets, count = [], [], 0
    for params in params_seq:
      for i, batch in enumerate(self.batches.global_batches()):
        if count:
          totals[i] = self._add_logits(totals[i], params, batch["image"])
        else:
          totals.append(self._logits(params, batch["image"]))
          targets.append((batch["labels"], batch["mask"]))
      count += 1
      del params  # Let a generator's previous weight set go before it loads the next.
    if not count:
      raise ValueError("an ensemble needs at least one weight set")
    sums = {"correct": 0.0, "loss": 0.0, "count": 0.0}
    for total, (labels, mask) in zip(totals, targets):
      batch = self._batch_sums(total, float(count), labels, mask)
      sums = {k: sums[k] + float(np.asarray(batch[k])) for k in sums}
    return {"accuracy": sums["correct"] / sums["count"], "loss": sums["loss"] / sums["count"],
            "num_examples": int(sums["count"])}
