"""Accuracy of one weight set, or the logit ensemble of several, on a split or a suite."""

import itertools
import os

import flax
import jax

from eval import evaluators as eval_lib
from eval import weights as weights_lib
from train import errors
from train import run_dir
from train import sharding
from train import vit


def evaluate(weights, suite, config, batch_size=0, split=""):
  """{'datasets': {name: {'accuracy', 'loss', 'num_examples', 'split'}}, 'average_accuracy', ...}.

  `weights`: one path (accuracy) or a list of paths (the logit ensemble).
  """
  paths = [weights] if isinstance(weights, str) else list(weights)
  mesh = sharding.make_mesh(config.mesh)
  rules = config.param_sharding
  first = weights_lib.load(paths[0], mesh, rules)
  # An SSF run's checkpoints hold the SSF vectors, its exported .npz the merged plain ViT.
  model = vit.build_model(vit.config_for_weights(config.model, first), config.num_classes)
  evaluators = eval_lib.Evaluators(config, model, mesh,
                                   jax.tree.map(lambda a: a.sharding, first), batch_size)
  kind = "accuracy" if len(paths) == 1 else "ensemble"
  if kind == "ensemble":
    del first  # An ensemble streams its weight sets from disk, one at a time, per dataset.
  results = {}
  for name, dataset in evaluators.suite_datasets(suite, split).items():
    evaluator = evaluators.make(kind, dataset)
    try:
      if kind == "accuracy":
        result = evaluator.evaluate(first)
      else:
        result = evaluator.evaluate(weights_lib.load(p, mesh, rules) for p in paths)
    except flax.errors.FlaxError as e:  # Parameters of another shape or name than the model's.
      raise errors.UserError(f"weights {', '.join(paths)} do not fit config.model (variant="
                             f"{config.model.variant!r}, num_classes={config.num_classes}): "
                             f"{str(e).splitlines()[0]}") from e
    results[name] = {**result, "split": dataset.split.name}
  return {"weights": [os.path.abspath(p) for p in paths], "evaluator": kind, "suite": suite,
          "datasets": results,
          "average_accuracy": sum(r["accuracy"] for r in results.values()) / len(results)}


def format_table(result):
  width = max(len(name) for name in itertools.chain(result["datasets"], ["average"]))
  split_width = max(len(r["split"]) for r in result["datasets"].values())
  lines = [f"{'dataset':<{width}}  {'split':<{split_width}}  {'accuracy':>9}  {'loss':>8}  "
           f"{'examples':>8}"]
  for name, r in result["datasets"].items():
    lines.append(f"{name:<{width}}  {r['split']:<{split_width}}  {100 * r['accuracy']:>8.2f}%  "
                 f"{r['loss']:>8.4f}  {r['num_examples']:>8}")
  average = 100 * result["average_accuracy"]
  lines.append(f"{'average':<{width}}  {'':<{split_width}}  {average:>8.2f}%")
  return "\n".join(lines)


def default_out(weights, suite):
  """<run>/eval/<weights path in the run, '_'-joined>.<suite>.json, or beside the weights."""
  run = run_dir.containing(weights)
  base = run or os.path.dirname(os.path.abspath(weights))
  label = os.path.relpath(os.path.abspath(weights), base).replace("/", "_").removesuffix(".npz")
  return os.path.join(run_dir.eval_dir(base), f"{label}.{suite}.json")
