"""The soup step: evaluate ingredients, cook the recipes, write weights and results.

`cook(...)` leaves in `soup_dir`:
  evaluations.json      every ingredient's held-out, test and shift accuracy
  ensemble_logits.npz   the ingredients' summed logits per dataset (the ensemble)
  greedy_journal.jsonl  one line per greedy candidate (see greedy.py)
  <recipe>/params.npz   each soup's weights, big_vision layout
  <recipe>/orbax/       the same, as an orbax checkpoint (sharded restore)
  results.json          {"ingredients": [...], "soups": {...}, "wise_ft": {...},
                         "warnings": [pre-flight warnings, soups/preflight.py]}
  report.md, *.png      the report (eval/report.py)

Every piece is written atomically as soon as it is known and reused when the
command is re-run, so an interrupted soup step resumes where it stopped.
Ranking and selection use the held-out split only; test and shift accuracy
are measured after the choice.
"""

import dataclasses
import json
import os

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from eval import evaluators as eval_lib
from eval import report
from soups import averaging
from soups import diagnostics_report
from soups import ensemble
from soups import greedy
from soups import ingredients as ingredients_lib
from soups import learned
from soups import preflight
from train import accuracy
from train import files
from train import losses
from train import pretrained
from train import sharding
from train import ssf
from train import vit

RECIPES = ("uniform", "greedy", "learned", "ensemble", "wise_ft")
RESULTS = "results.json"
EVALUATIONS = "evaluations.json"
# Config keys that must agree between ingredients for their soup to mean anything.
SHARED_KEYS = ("model", "num_classes", "input.dataset", "input.classes",
               "input.heldout_split", "input.test_split", "input.pp_eval")
# Every leaf split over all devices where a dimension divides; tiny leaves replicated.
SOUP_SHARDING = ((".*", 'fsdp(axis="data")'),)


def target_abstract(shared_metadata, mesh):
  """The soup's leaves as ShapeDtypeStructs, sharded over `mesh` by `SOUP_SHARDING`."""
  return ingredients_lib.abstract_params(
      shared_metadata, lambda tree: sharding.tree_shardings(mesh, tree, SOUP_SHARDING))


@dataclasses.dataclass
class Options:
  recipes: tuple = RECIPES
  greedy_early_abort: bool = True
  learned_mode: str = "global"
  learned_epochs: int = 5
  learned_lr: float = 0.1
  wise_ft_alphas: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
  eval_batch_size: int = 0  # 0: the runs' config.eval_batch_size.
  shift_suite: str = ""  # A suite of eval/shifts.py, e.g. 'fashion_mnist_shifts'.


def _get(config, dotted):
  for part in dotted.split("."):
    config = config[part]
  return config.to_dict() if hasattr(config, "to_dict") else config


def shared_config(ingredients):
  """The run config the soup evaluates with; ingredients whose runs disagree on SHARED_KEYS are refused."""
  with_runs = [i for i in ingredients if i.run_dir]
  if not with_runs:
    raise ValueError("no ingredient comes from a run directory (with config.json): the soup "
                     "step needs one to know the model and the data")
  reference = with_runs[0].config()
  for ingredient in with_runs[1:]:
    config = ingredient.config()
    for key in SHARED_KEYS:
      if _get(config, key) != _get(reference, key):
        raise ValueError(
            f"config.{key} differs between ingredients {with_runs[0].name} "
            f"({_get(reference, key)!r}) and {ingredient.name} ({_get(config, key)!r})")
  return reference


class _Writer:
  """results.json and evaluations.json, rewritten atomically on process 0 after each piece."""

  def __init__(self, soup_dir):
    self.soup_dir = soup_dir
    self.results = self._load(RESULTS) or {"ingredients": [], "soups": {}}
    self.evaluations = self._load(EVALUATIONS) or {}

  def _load(self, name):
    path = os.path.join(self.soup_dir, name)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)

  def save(self):
    if jax.process_index() == 0:
      files.write_json_atomic(os.path.join(self.soup_dir, EVALUATIONS), self.evaluations)
      files.write_json_atomic(os.path.join(self.soup_dir, RESULTS), self.results)


def _save_weights(soup_dir, recipe, params):
  """`<recipe>/params.npz` (SSF folded in), then `<recipe>/orbax/`, whose presence marks both complete.

  orbax renames its directory into place only when whole, so a kill at any
  point leaves either no orbax directory (and both are rewritten) or both files.
  """
  orbax_dir = os.path.join(os.path.abspath(soup_dir), recipe, "orbax")
  if os.path.exists(orbax_dir):
    return
  host = sharding.to_host(params)
  if jax.process_index() == 0:
    pretrained.save_npz(os.path.join(soup_dir, recipe, "params.npz"), ssf.merge(host))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(orbax_dir, params)
  checkpointer.wait_until_finished()


class SoupSetup:
  """What every pass over a soup's ingredients needs: run config, mesh, target sharding, model.

  Built from the ingredients alone: their trees are checked compatible and
  their run configs agree on `SHARED_KEYS`.
  """

  def __init__(self, ingredients, eval_batch_size=0):
    self.ingredients = ingredients
    self.shared_metadata = ingredients_lib.check_compatible(ingredients)
    self.config = config = shared_config(ingredients)
    self.mesh = sharding.make_mesh((("data", -1),))
    self.abstract = target_abstract(self.shared_metadata, self.mesh)
    # SSF runs: their checkpoints hold the SSF vectors (soups of those are exported
    # merged), their final/*.npz the merged plain ViT (soups of merged weights).
    self.model = vit.build_model(ssf.model_config_for(config.model, self.shared_metadata),
                                 config.num_classes)
    self.loss_fn = losses.get(config.loss)
    self.evaluators = eval_lib.Evaluators(config, self.model, self.mesh,
                                          jax.tree.map(lambda a: a.sharding, self.abstract),
                                          eval_batch_size)
    self.heldout = self.evaluators.split("heldout")

  def restore(self, ingredient):
    return ingredients_lib.restore(ingredient, self.abstract)

  def pretrained_init(self):
    """The runs' starting point θ0: their model_init loaded as the trainer loads it, sharded."""
    config = self.config
    if not config.model_init:
      raise ValueError("the runs' config.model_init is empty (they trained from scratch): there "
                       "is no shared pre-trained init")
    image = next(self.heldout.global_batches())["image"]
    init = jax.jit(lambda rng: self.model.init(rng, image[:1])["params"])(
        jax.random.key(config.seed))
    loaded = pretrained.load_pretrained(
        sharding.to_host(init), config.model_init, dont_load=config.model_load.dont_load,
        ignore=config.model_load.ignore)
    return jax.tree.map(lambda x, a: jax.device_put(np.asarray(x, a.dtype), a.sharding),
                        loaded, self.abstract)


class SoupKitchen(SoupSetup):
  """A `SoupSetup` plus the test and shift evaluators and the soup directory's outputs."""

  def __init__(self, ingredients, soup_dir, options):
    super().__init__(ingredients, options.eval_batch_size)
    self.soup_dir, self.options = soup_dir, options
    self.test = self.evaluators.split("test")
    self.shifts = self.evaluators.suite(options.shift_suite) if options.shift_suite else {}
    os.makedirs(soup_dir, exist_ok=True)
    self.out = _Writer(soup_dir)
    self.out.results["warnings"] = preflight.warnings(ingredients)
    for warning in self.out.results["warnings"] if jax.process_index() == 0 else ():
      print(f"[soups] WARNING {warning}", flush=True)

  def evaluate(self, params, with_heldout=True):
    """{'heldout_acc', 'test_acc', 'shift_acc': {name: acc}} of one set of weights."""
    result = {"heldout_acc": self.heldout.evaluate(params)["accuracy"]} if with_heldout else {}
    result["test_acc"] = self.test.evaluate(params)["accuracy"]
    result["shift_acc"] = {name: ev.evaluate(params)["accuracy"]
                           for name, ev in self.shifts.items()}
    return result

  def _evaluators(self):
    return {"heldout": self.heldout, "test": self.test,
            **{f"shift/{name}": ev for name, ev in self.shifts.items()}}

  def evaluate_ingredients(self):
    """Evaluates each ingredient once (cached), adding its logits to the ensemble's sums."""
    logit_sums = ensemble.LogitSums(os.path.join(self.soup_dir, ensemble.LOGITS_FILE))
    for ingredient in self.ingredients:
      name = ingredient.name
      if name in self.out.evaluations and name in logit_sums.members:
        continue
      logging.info("Evaluating ingredient %s", name)
      params = self.restore(ingredient)
      predictions = {key: ev.predictions(params) for key, ev in self._evaluators().items()}
      acc = {key: accuracy.accuracy_from_logits(*p) for key, p in predictions.items()}
      if name not in logit_sums.members:  # A kill between the two saves must not count it twice.
        logit_sums.add(name, predictions)
        if jax.process_index() == 0:
          logit_sums.save()
      self.out.evaluations[name] = {
          "heldout_acc": acc["heldout"], "test_acc": acc["test"],
          "shift_acc": {k.partition("/")[2]: v for k, v in acc.items() if k.startswith("shift/")}}
      self.out.save()
    self.logit_sums = logit_sums
    self.out.results["ingredients"] = [
        {"name": i.name, **self.out.evaluations[i.name]} for i in self.ingredients]
    self.out.save()

  def record(self, recipe, params, kept, **extra):
    """Saves a soup's weights and its accuracies under results['soups'][recipe]."""
    _save_weights(self.soup_dir, recipe, params)
    self.out.results["soups"][recipe] = {**self.evaluate(params), "ingredients": kept, **extra}
    self.out.save()

  def done(self, recipe):
    return recipe in self.out.results["soups"]


def cook_uniform(kitchen):
  params = averaging.average(kitchen.ingredients, kitchen.restore, kitchen.abstract)
  kitchen.record("uniform", params, [i.name for i in kitchen.ingredients])


def cook_greedy(kitchen):
  heldout_acc = {name: e["heldout_acc"] for name, e in kitchen.out.evaluations.items()}
  params, kept, _, stats = greedy.greedy_soup(
      kitchen.ingredients, heldout_acc, kitchen.restore, averaging.RunningSum(kitchen.abstract),
      kitchen.heldout, os.path.join(kitchen.soup_dir, greedy.JOURNAL),
      early_abort=kitchen.options.greedy_early_abort, write=jax.process_index() == 0)
  stats["batches_saved_by_early_abort"] = (stats["batches_full_evaluation"]
                                           - stats["batches_evaluated"])
  kitchen.record("greedy", params, kept, search=stats)
  return params


def cook_learned(kitchen):
  options = kitchen.options
  stacked = learned.stack(kitchen.ingredients, kitchen.restore, kitchen.abstract)
  params, logits, epoch_losses = learned.fit(
      kitchen.model, stacked, options.learned_mode, kitchen.heldout, kitchen.loss_fn,
      epochs=options.learned_epochs, learning_rate=options.learned_lr)
  del stacked
  weights = learned.mixing_weights(logits)
  if options.learned_mode == "global":
    coefficients = dict(zip([i.name for i in kitchen.ingredients], map(float, weights)))
  else:  # Per layer: the mean over tensors of each ingredient's coefficient.
    mean = np.mean(np.stack(jax.tree.leaves(weights)), axis=0)
    coefficients = dict(zip([i.name for i in kitchen.ingredients], map(float, mean)))
  kitchen.record("learned", params, [i.name for i in kitchen.ingredients],
                 mode=options.learned_mode, coefficients=coefficients,
                 heldout_loss_per_epoch=epoch_losses)


def cook_ensemble(kitchen):
  """Scores the summed logits the ingredient evaluation gathered: no extra forward pass."""
  sums = kitchen.logit_sums
  names = [i.name for i in kitchen.ingredients]
  if sorted(sums.members) != sorted(names):
    raise ValueError(f"{sums.path} sums {sums.members}, not this soup's ingredients {names}: "
                     "use a new --soup_dir")
  kitchen.out.results["soups"]["ensemble"] = {
      "heldout_acc": sums.accuracy("heldout"), "test_acc": sums.accuracy("test"),
      "shift_acc": {name: sums.accuracy(f"shift/{name}") for name in kitchen.shifts},
      "ingredients": names}
  kitchen.out.save()


def cook_wise_ft(kitchen, endpoint_params, endpoint_name):
  """Interpolates from the pre-trained init to `endpoint_params` over the configured alphas."""
  start = kitchen.pretrained_init()
  points = []
  for alpha in kitchen.options.wise_ft_alphas:
    mixed = averaging.interpolate(start, endpoint_params, alpha)
    points.append({"alpha": float(alpha), **kitchen.evaluate(mixed)})
  kitchen.out.results["wise_ft"] = {"endpoint": endpoint_name,
                                    "pretrained": kitchen.config.model_init, "points": points}
  kitchen.out.save()


def cook(ingredients, soup_dir, options=None):
  """Runs every recipe in `options.recipes` (resuming); returns results.json's content."""
  options = options or Options()
  unknown = set(options.recipes) - set(RECIPES)
  if unknown:
    raise ValueError(f"unknown recipes {sorted(unknown)}; known: {list(RECIPES)}")
  kitchen = SoupKitchen(ingredients, soup_dir, options)
  kitchen.evaluate_ingredients()
  greedy_params = None
  for recipe in options.recipes:
    if recipe == "wise_ft":
      continue
    if kitchen.done(recipe):
      logging.info("%s soup already in %s", recipe, soup_dir)
      continue
    logging.info("Cooking the %s soup of %d ingredients", recipe, len(ingredients))
    out = {"uniform": cook_uniform, "greedy": cook_greedy, "learned": cook_learned,
           "ensemble": cook_ensemble}[recipe](kitchen)
    if recipe == "greedy":
      greedy_params = out
  if "wise_ft" in options.recipes and "wise_ft" not in kitchen.out.results:
    if "greedy" in kitchen.out.results["soups"]:
      endpoint = "greedy"
      params = greedy_params if greedy_params is not None else _restore_soup(kitchen, "greedy")
    else:
      endpoint = max(kitchen.out.evaluations, key=lambda n: kitchen.out.evaluations[n]["heldout_acc"])
      params = kitchen.restore(next(i for i in ingredients if i.name == endpoint))
    cook_wise_ft(kitchen, params, endpoint)
  if jax.process_index() == 0:
    report.write_report(soup_dir, diagnostics_report.markdown(soup_dir))
  return kitchen.out.results


def _restore_soup(kitchen, recipe):
  orbax_dir = os.path.join(os.path.abspath(kitchen.soup_dir), recipe, "orbax")
  return ocp.StandardCheckpointer().restore(orbax_dir, kitchen.abstract)
