"""The logit ensemble: the mean of several weight sets' logits, the baseline with N× inference cost.

`LogitSums` holds, per dataset, the summed logits (examples × scored
classes, on the host) of its members with the labels and padding mask; it
scores them with the same top-1 rule as a single model
(`train.accuracy.accuracy_from_logits`) and saves itself with its members'
names, so the soup step, which adds each ingredient's logits during the
one pass that evaluates it, neither loses nor double counts one when
interrupted. `EnsembleAccuracy` is the evaluator `python -m eval` uses.
"""

import io
import os

import numpy as np

from train import accuracy
from train import files


class LogitSums:
  """{dataset: summed logits} over `members`, with each dataset's labels and mask."""

  def __init__(self, path=None):
    """`path`: an .npz the sums are saved to, and resumed from when it exists."""
    self.path, self.members, self.sums, self.targets = path, [], {}, {}
    if path and os.path.exists(path):
      with np.load(path, allow_pickle=False) as saved:
        self.members = list(saved["members"])
        for key in saved.files:
          kind, _, dataset = key.partition(":")
          if kind == "sum":
            self.sums[dataset] = saved[key]
            self.targets[dataset] = (saved[f"labels:{dataset}"], saved[f"mask:{dataset}"])

  def add(self, name, predictions):
    """Adds one member's {dataset: (logits, labels, mask)} (`SplitAccuracy.predictions`)."""
    for dataset, (logits, labels, mask) in predictions.items():
      self.sums[dataset] = logits + self.sums.get(dataset, 0.0)
      self.targets[dataset] = (labels, mask)
    self.members.append(name)

  def save(self):
    arrays = {"members": np.array(self.members)}
    for dataset, total in self.sums.items():
      labels, mask = self.targets[dataset]
      arrays.update({f"sum:{dataset}": total, f"labels:{dataset}": labels,
                     f"mask:{dataset}": mask})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    files.write_bytes_atomic(self.path, buffer.getvalue())

  def accuracy(self, dataset):
    labels, mask = self.targets[dataset]
    return accuracy.accuracy_from_logits(self.sums[dataset], labels, mask)

  def loss(self, dataset, loss_fn):
    """Mean loss of the mean logits over the unmasked examples."""
    labels, mask = self.targets[dataset]
    per_example = np.asarray(loss_fn(self.sums[dataset] / len(self.members), labels))
    return float(np.sum(per_example * mask) / np.sum(mask))

  def count(self, dataset):
    return int(np.sum(self.targets[dataset][1]))


class EnsembleAccuracy:
  """`evaluate(params_seq)` -> {'accuracy', 'loss', 'num_examples'} of the mean logits.

  Takes the same arguments as `train.accuracy.SplitAccuracy`, whose padded
  global batches and top-1 rule it reuses, so an ensemble of one weight set
  scores exactly as that set does. Streams over weight sets: each is used
  for one pass over the split and can be dropped before the next is loaded
  (pass a generator).
  """

  def __init__(self, model, mesh, split, preprocess_fn, batch_size, loss_fn,
               params_sharding, num_threads=0, class_subset=None):
    self.split_accuracy = accuracy.SplitAccuracy(model, mesh, split, preprocess_fn, batch_size,
                                                 loss_fn, params_sharding, num_threads,
                                                 class_subset)
    self.loss_fn = loss_fn

  def evaluate(self, params_seq):
    sums = LogitSums()
    for i, params in enumerate(params_seq):
      sums.add(str(i), {"split": self.split_accuracy.predictions(params)})
      del params  # Let a generator's previous weight set go before it loads the next.
    if not sums.members:
      raise ValueError("an ensemble needs at least one weight set")
    return {"accuracy": sums.accuracy("split"), "loss": sums.loss("split", self.loss_fn),
            "num_examples": sums.count("split")}
