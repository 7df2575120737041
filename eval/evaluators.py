"""Evaluators of a run's weights: held-out, test, and shift suites, sharded over the mesh.

Built from a run's resolved config (its `config.json`), on top of
`train.accuracy.SplitAccuracy`, which pads and masks the last partial batch
so each example counts once. The soup step and `python -m eval` use these.
"""

from train import accuracy
from train import data
from train import losses
from train import pp_spec
from train import preprocess

from eval import shifts

SPLIT_SUITES = ("heldout", "test")  # The run's own config.input.{heldout,test}_split.


class Evaluators:
  """Makes `SplitAccuracy` objects for one run config, model, mesh and parameter sharding."""

  def __init__(self, config, model, mesh, params_sharding, batch_size=0):
    self.config, self.model, self.mesh = config, model, mesh
    self.params_sharding = params_sharding
    self.batch_size = batch_size or config.eval_batch_size
    self.builder = data.dataset_builder(config.input.dataset, config.input.data_dir)
    self.pp_eval = pp_spec.resolve(config, "pp_eval")
    self.loss_fn = losses.get(config.loss)

  def _make(self, split, pp, class_subset=None):
    return accuracy.SplitAccuracy(
        self.model, self.mesh, split, preprocess.build(pp, shifts.OPS), self.batch_size,
        self.loss_fn, self.params_sharding, self.config.input.num_threads, class_subset)

  def split(self, key):
    """The run's 'heldout' or 'test' split."""
    split_key = f"{key}_split"
    split = data.open_split(self.builder, self.config.input[split_key],
                            tuple(self.config.input.classes), f"config.input.{split_key}")
    return self._make(split, self.pp_eval)

  def suite(self, name):
    """{dataset name: SplitAccuracy} of a shift suite (or of 'heldout'/'test' alone)."""
    if name in SPLIT_SUITES:
      return {name: self.split(name)}
    out = {}
    for entry in shifts.suite(name):
      split, subset = shifts.open_entry(entry, self.config, self.builder)
      pp = (shifts.insert_after_decode(self.pp_eval, entry.corruption) if entry.corruption
            else self.pp_eval)
      out[entry.name] = self._make(split, pp, subset)
    return out


def known_suites():
  return list(SPLIT_SUITES) + sorted(shifts.SUITES)
