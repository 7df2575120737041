"""Evaluators as plug-ins by name, built from a run's resolved config (its config.json).

`Evaluators(config, model, mesh, params_sharding)` resolves what to score:
the run's held-out or test split, any TFDS split of its dataset, or the
datasets of a shift suite. `make(kind, dataset)` builds the evaluator
registered under `kind` in `KINDS`:

  accuracy  `evaluate(params)`, train.accuracy.SplitAccuracy
  ensemble  `evaluate(params_seq)`, the mean logits of several weight sets

Both return {'accuracy', 'loss', 'num_examples'} and pad and mask the last
partial batch, so each example counts once. The soup step and `python -m
eval` use these.
"""

from eval import datasets
from eval import ensemble
from eval import shifts
from train import accuracy
from train import data
from train import errors
from train import losses
from train import pp_spec
from train import preprocess

SPLIT_SUITES = ("heldout", "test")  # The run's own config.input.{heldout,test}_split.
KINDS = {"accuracy": accuracy.SplitAccuracy, "ensemble": ensemble.EnsembleAccuracy}


def known_suites():
  return list(SPLIT_SUITES) + sorted(shifts.SUITES)


class Evaluators:
  """Builds evaluators for one run config, model, mesh and parameter sharding."""

  def __init__(self, config, model, mesh, params_sharding, batch_size=0):
    self.config, self.model, self.mesh = config, model, mesh
    self.params_sharding = params_sharding
    self.batch_size = batch_size or config.eval_batch_size
    self.builder = data.dataset_builder(config.input.dataset, config.input.data_dir)
    self.pp_eval = pp_spec.resolve(config, "pp_eval")
    self.loss_fn = losses.get(config.loss)

  def make(self, kind, dataset):
    """The evaluator `kind` (a key of KINDS) on a `datasets.Dataset`."""
    if kind not in KINDS:
      raise errors.UserError(f"unknown evaluator {kind!r}; known: {sorted(KINDS)}")
    return KINDS[kind](
        self.model, self.mesh, dataset.split, preprocess.build(dataset.pp, shifts.OPS),
        self.batch_size, self.loss_fn, self.params_sharding, self.config.input.num_threads,
        dataset.class_subset)

  def tfds_split(self, split):
    """Any TFDS split of the run's dataset (e.g. 'test[:1000]'), its classes and pp_eval."""
    return datasets.run_split(self.config, self.builder, split, split, self.pp_eval, "split")

  def run_split(self, key, split=""):
    """The run's 'heldout' or 'test' split (`split`, if given, replaces it)."""
    split_key = f"{key}_split"
    what = f"split (for {key})" if split else f"config.input.{split_key}"
    return datasets.run_split(self.config, self.builder, split or self.config.input[split_key],
                              key, self.pp_eval, what)

  def suite_datasets(self, name, split=""):
    """{dataset name: datasets.Dataset} of suite `name`; `split` replaces each dataset's split."""
    if name not in known_suites():
      raise errors.UserError(f"unknown suite {name!r}; known: {known_suites()}")
    if name in SPLIT_SUITES:
      return {name: self.run_split(name, split)}
    return shifts.suite_datasets(name, self.config, self.builder, self.pp_eval, split)

  def split(self, key, kind="accuracy"):
    """The evaluator `kind` on the run's 'heldout' or 'test' split."""
    return self.make(kind, self.run_split(key))

  def suite(self, name, kind="accuracy", split=""):
    """{dataset name: evaluator `kind`} of a suite (a shift suite, or 'heldout'/'test' alone)."""
    return {key: self.make(kind, dataset)
            for key, dataset in self.suite_datasets(name, split).items()}
