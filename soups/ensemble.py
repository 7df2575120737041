"""Logit ensemble: the mean of the ingredients' logits, the baseline with N× inference cost.

The soup step evaluates each ingredient once; the same forward pass adds its
logits to running sums per evaluation dataset (examples × classes, on the
host), so the ensemble costs no extra pass. The sums are saved with the
names they include, so an interrupted soup step neither loses nor double
counts an ingredient.
"""

import io
import os

import numpy as np

from train import accuracy
from train import files

LOGITS_FILE = "ensemble_logits.npz"


class LogitSums:
  """{dataset: summed logits} over `members`, with each dataset's labels and mask."""

  def __init__(self, path):
    self.path, self.members, self.sums, self.targets = path, [], {}, {}
    if os.path.exists(path):
      with np.load(path, allow_pickle=False) as saved:
        self.members = list(saved["members"])
        for key in saved.files:
          kind, _, dataset = key.partition(":")
          if kind == "sum":
            self.sums[dataset] = saved[key]
            self.targets[dataset] = (saved[f"labels:{dataset}"], saved[f"mask:{dataset}"])

  def add(self, name, predictions):
    """Adds one ingredient's {dataset: (logits, labels, mask)}."""
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
