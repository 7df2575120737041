"""What an evaluator scores: a split, its preprocessing, and the model outputs that compete.

A run's own splits keep its `config.input.classes`. Another dataset (e.g.
ImageNet-R for an ImageNet model) is matched to the model's outputs by class
name (TFDS ClassLabel names; ImageNet's are WordNet ids), so label numbering
may differ between datasets.
"""

import dataclasses

from absl import logging
import numpy as np

from train import data
from train import errors


@dataclasses.dataclass(frozen=True)
class Dataset:
  """One evaluation dataset.

  Attributes:
    name: its name in results and reports.
    split: examples, with labels already numbered as the model's outputs.
    pp: the preprocessing string applied to each example.
    class_subset: sorted model outputs that compete in the argmax (None: all).
  """
  name: str
  split: data.Split
  pp: str
  class_subset: np.ndarray | None = None


def class_names(config, builder):
  """Name of each model output: the run dataset's label names, restricted to its classes."""
  names = builder.info.features["label"].names
  return [names[c] for c in config.input.classes] if config.input.classes else list(names)


def run_split(config, builder, split, name, pp, what):
  """`split` of the run's own dataset (`builder`), keeping the run's classes."""
  return Dataset(name, data.open_split(builder, split, tuple(config.input.classes), what), pp)


def foreign_split(config, run_builder, builder, split, name, pp, covered_only=False,
                  full_split=None):
  """`split` of another dataset, its labels renumbered as the model's outputs by class name.

  Examples of classes the model does not have are left out (as the run's own
  splits leave out classes outside `config.input.classes`). With
  `covered_only`, only the model outputs of classes that occur in
  `full_split` (default: `split`) compete, as the model-soups paper scores
  ImageNet-R and ImageNet-A over their 200 classes; TFDS labels those with
  all 1000 ImageNet names, so the classes are found by reading the labels.
  """
  what = f"shift dataset {name} ({builder.name})"
  model_index = {n: i for i, n in enumerate(class_names(config, run_builder))}
  names = builder.info.features["label"].names
  known = [label for label, n in enumerate(names) if n in model_index]
  if not known:
    raise errors.UserError(f"{what}: none of its classes {names[:3]}... is a class of the model "
                           f"(config.input.dataset={config.input.dataset!r}); cannot score it")
  classes = () if len(known) == len(names) else tuple(known)
  if classes:
    logging.info("%s: scoring the %d of its %d classes the model has", what, len(known), len(names))
  to_model = np.array([model_index[names[label]] for label in known], np.int64)

  def open_mapped(split_name):
    opened = data.open_split(builder, split_name, classes, what)
    # open_split numbers labels by position in `known` (-1: left out); map those to model outputs.
    label_map = np.where(opened.label_map >= 0, to_model[np.maximum(opened.label_map, 0)], -1)
    return dataclasses.replace(opened, label_map=label_map)

  opened = open_mapped(split)
  subset = None
  if covered_only:
    full = opened if full_split in (None, split) else open_mapped(full_split)
    covered = np.unique(full.labels())  # Reads every record once.
    subset = covered if len(covered) < len(model_index) else None
  return Dataset(name, opened, pp, subset)
