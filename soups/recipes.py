"""The soup step's recipes: each `recipe(kitchen) -> Soup`, listed by name in `RECIPES`.

A recipe reads the `soup_step.Kitchen` (the ingredients, their evaluations,
the held-out logits, the evaluators, the options) and returns its soup;
`soup_step.cook` saves the weights, measures them and records them. Every
record says what the recipe cost: `checkpoint_reads` (ingredient restores)
and `heldout_passes` (full passes over the held-out split beyond the one
that evaluated each ingredient); `soup_step.cook` adds the soup's inference
cost in forward passes.
"""

import dataclasses
from typing import Any

import jax
import numpy as np

from eval import ensemble
from soups import averaging
from soups import fisher
from soups import greedy
from soups import greedy_ensemble
from soups import learned
from soups import regmean
from soups import soup_dir as soup_dir_lib
from soups import task_vectors
from train import errors
from train import run_log


@dataclasses.dataclass
class Soup:
  """A recipe's result: its ingredients, its weights (None for ensembles) and its own record.

  `scores`, when set, are the accuracies known without evaluating weights
  (an ensemble's, from its members' logits).
  """
  ingredients: list
  params: Any = None
  scores: dict = None
  record: dict = dataclasses.field(default_factory=dict)


def _cost(reads, heldout_passes):
  return {"checkpoint_reads": reads, "heldout_passes": heldout_passes}


def cook_uniform(kitchen):
  setup = kitchen.setup
  params = averaging.average(setup.ingredients, setup.restore, setup.abstract)
  return Soup([i.name for i in setup.ingredients], params,
              record=_cost(len(setup.ingredients), 0))


def _greedy_decision_line(entry):
  soup = entry.get("soup_heldout_acc")
  soup = (f"{soup:.2%}" if soup is not None
          else f"at most {entry['soup_heldout_acc_at_most']:.2%}, stopped early")
  return f"{entry['name']}: {entry['decision']} (soup with it {soup} on held-out)"


def cook_greedy(kitchen, search=greedy.greedy_soup):
  """The greedy soup; `search`: `greedy.greedy_soup` or a stand-in with its signature (bench)."""
  setup = kitchen.setup
  progress = run_log.CountProgress("soups", "greedy candidate", len(setup.ingredients))
  params, kept, _, stats = search(
      setup.ingredients, kitchen.heldout_acc(), setup.restore,
      averaging.RunningSum(setup.abstract), setup.heldout,
      soup_dir_lib.path(kitchen.soup_dir, soup_dir_lib.JOURNAL),
      early_abort=kitchen.options.greedy_early_abort, write=jax.process_index() == 0,
      on_decision=lambda entry: progress.advance(_greedy_decision_line(entry)))
  stats["batches_saved_by_early_abort"] = (stats["batches_full_evaluation"]
                                           - stats["batches_evaluated"])
  passes = stats["batches_evaluated"] / setup.heldout.num_batches()
  return Soup(kept, params,
              record={"search": stats, **_cost(len(setup.ingredients), round(passes, 2))})


def _coefficients(names, logits, mode):
  """{name: mixing weight}; per layer, the mean over tensors of each ingredient's weight."""
  weights = learned.mixing_weights(logits)
  if mode != "global":
    weights = np.mean(np.stack(jax.tree.leaves(weights)), axis=0)
  return dict(zip(names, map(float, weights)))


def cook_learned(kitchen):
  """The paper's learned soup: every ingredient stacked on the mesh (memory grows with N)."""
  setup, options = kitchen.setup, kitchen.options
  names = [i.name for i in setup.ingredients]
  stacked = learned.stack(setup.ingredients, setup.restore, setup.abstract)
  params, logits, epoch_losses = learned.fit(
      setup.model, stacked, options.learned_mode, setup.heldout, setup.loss_fn,
      epochs=options.learned_epochs, learning_rate=options.learned_lr)
  del stacked
  return Soup(names, params, record={
      "mode": options.learned_mode,
      "coefficients": _coefficients(names, logits, options.learned_mode),
      "heldout_loss_per_epoch": epoch_losses, **_cost(len(names), options.learned_epochs)})


def cook_learned_blocks(kitchen):
  """The learned soup with `learned_block_size` ingredients on the mesh at a time (flat in N)."""
  setup, options = kitchen.setup, kitchen.options
  names = [i.name for i in setup.ingredients]
  params, logits, epoch_losses, record = learned.fit_bounded(
      setup.model, setup.ingredients, setup.restore, setup.abstract, options.learned_mode,
      setup.heldout.global_batches, setup.loss_fn, options.learned_block_size,
      epochs=options.learned_epochs, learning_rate=options.learned_lr, seed=options.seed)
  return Soup(names, params, record={
      "coefficients": _coefficients(names, logits, options.learned_mode),
      "heldout_loss_per_epoch": epoch_losses, **record})


def cook_ensemble(kitchen):
  """Scores the summed logits the ingredient evaluation gathered: no extra forward pass."""
  sums = kitchen.logit_sums
  names = [i.name for i in kitchen.ingredients]
  if sorted(sums.members) != sorted(names):
    raise errors.UserError(f"{sums.path} sums {sums.members}, not this soup's ingredients {names}: "
                     "use a new --soup_dir")
  return Soup(names, scores={
      "heldout_acc": sums.accuracy("heldout"), "test_acc": sums.accuracy("test"),
      "shift_acc": {name: sums.accuracy(f"shift/{name}") for name in kitchen.scorer.shifts}},
      record=_cost(0, 0))


def _heldout_logits(kitchen, ingredient):
  """An ingredient's held-out logits as the soup step saved them (computed if it did not)."""
  logits = soup_dir_lib.load_heldout_logits(kitchen.soup_dir, ingredient.name)
  if logits is None:  # A soup directory evaluated before the logits were kept.
    logits = kitchen.setup.heldout.predictions(kitchen.setup.restore(ingredient))[0]
    if jax.process_index() == 0:
      soup_dir_lib.save_heldout_logits(kitchen.soup_dir, ingredient.name, logits)
  return logits


def cook_greedy_ensemble(kitchen):
  """The greedy ensemble: chosen from the saved held-out logits, then its members' test and
  shift logits summed, one forward pass of each member per dataset."""
  by_name = {i.name: i for i in kitchen.ingredients}
  order = [i.name for i in greedy.candidate_order(kitchen.ingredients, kitchen.heldout_acc())]
  labels, mask = kitchen.logit_sums.targets["heldout"]
  kept, heldout_acc, decisions = greedy_ensemble.search(
      order, lambda name: _heldout_logits(kitchen, by_name[name]), labels, mask)
  datasets = {k: ev for k, ev in kitchen.scorer.datasets().items() if k != "heldout"}
  sums = ensemble.LogitSums()
  for name in kept:
    params = kitchen.setup.restore(by_name[name])
    sums.add(name, {key: ev.predictions(params) for key, ev in datasets.items()})
    del params
  return Soup(kept, scores={
      "heldout_acc": heldout_acc, "test_acc": sums.accuracy("test"),
      "shift_acc": {name: sums.accuracy(f"shift/{name}") for name in kitchen.scorer.shifts}},
      record={"decisions": decisions, **_cost(len(kept), 0)})


def _heldout_accuracy(kitchen):
  return lambda params: kitchen.setup.heldout.evaluate(params)["accuracy"]


def _cook_model_stock(kitchen, ingredients):
  setup = kitchen.setup
  params, record = task_vectors.model_stock(ingredients, setup.restore, setup.abstract,
                                            setup.pretrained_init())
  return Soup([i.name for i in ingredients], params, record=record)


def cook_model_stock(kitchen):
  """Model Stock of every ingredient: per layer, toward θ0 by the updates' angle."""
  return _cook_model_stock(kitchen, kitchen.ingredients)


def cook_model_stock_best2(kitchen):
  """The paper's cheap form: Model Stock of the two best ingredients on held-out."""
  return _cook_model_stock(kitchen, greedy.candidate_order(kitchen.ingredients,
                                                           kitchen.heldout_acc())[:2])


def cook_task_arithmetic(kitchen):
  setup = kitchen.setup
  params, record = task_vectors.task_arithmetic(
      setup.ingredients, setup.restore, setup.abstract, setup.pretrained_init(),
      _heldout_accuracy(kitchen), kitchen.options.task_arithmetic_lambdas)
  return Soup([i.name for i in setup.ingredients], params, record=record)


def cook_ties(kitchen):
  setup, options = kitchen.setup, kitchen.options
  params, record = task_vectors.ties(
      setup.ingredients, setup.restore, setup.abstract, setup.pretrained_init(),
      _heldout_accuracy(kitchen), options.ties_densities, options.ties_lambdas)
  return Soup([i.name for i in setup.ingredients], params, record=record)


def cook_dare(kitchen):
  setup, options = kitchen.setup, kitchen.options
  params, record = task_vectors.dare(
      setup.ingredients, setup.restore, setup.abstract, setup.pretrained_init(),
      _heldout_accuracy(kitchen), options.dare_drop_rates, options.dare_lambdas, options.seed)
  return Soup([i.name for i in setup.ingredients], params, record=record)


def cook_fisher(kitchen):
  """Fisher merging: each parameter weighted by its diagonal Fisher on held-out."""
  setup, options = kitchen.setup, kitchen.options
  params, record = fisher.fisher_merge(
      setup.ingredients, setup.restore, setup.abstract, setup.model, setup.loss_fn,
      setup.heldout.global_batches, fisher_floor=options.fisher_floor,
      examples_per_step=options.fisher_examples_per_step)
  return Soup([i.name for i in setup.ingredients], params, record=record)


def cook_regmean(kitchen):
  """RegMean: every Dense kernel in closed form from its inputs' Gram on held-out."""
  setup = kitchen.setup
  params, record = regmean.regmean(
      setup.ingredients, setup.restore, setup.abstract, setup.model, setup.loss_fn,
      setup.heldout.global_batches, alpha=kitchen.options.regmean_alpha)
  return Soup([i.name for i in setup.ingredients], params, record=record)


# The soups `soup_step.cook` knows, in the order they are listed.
RECIPES = {"uniform": cook_uniform, "greedy": cook_greedy, "learned": cook_learned,
           "learned_blocks": cook_learned_blocks, "ensemble": cook_ensemble,
           "greedy_ensemble": cook_greedy_ensemble, "model_stock": cook_model_stock,
           "model_stock_best2": cook_model_stock_best2, "task_arithmetic": cook_task_arithmetic,
           "ties": cook_ties, "dare": cook_dare, "fisher": cook_fisher, "regmean": cook_regmean}
# Recipes that start from the runs' shared pre-trained init θ0 (their config.model_init).
NEEDS_PRETRAINED = ("model_stock", "model_stock_best2", "task_arithmetic", "ties", "dare")
# Recipes whose soup is a logit ensemble: inference costs one forward pass per member.
ENSEMBLES = ("ensemble", "greedy_ensemble")
