"""The soup step: evaluate the ingredients once, cook the recipes, write weights and results.

`cook(...)` fills a soup directory (its files: soups/soup_dir.py). Every
piece is written atomically as soon as it is known and reused when the
command is re-run, so an interrupted soup step resumes where it stopped.
Ranking and selection use the held-out split only; test and shift accuracy
are measured after the choice.

A recipe is a function `recipe(kitchen) -> Soup` in `recipes.RECIPES`
(soups/recipes.py): it reads the `Kitchen` (the ingredients, their
evaluations and logits, the evaluators, the options) and returns its soup;
`cook` saves the weights, measures them and records them. WiSE-FT is a curve, not a soup: it runs
after the soups, from the greedy soup (or the best ingredient).
"""

import dataclasses
import os
import time

import jax
from ml_collections.config_flags import config_path
import numpy as np

from eval import ensemble
from eval import evaluators as eval_lib
from soups import averaging
from soups import fisher
from soups import ingredients as ingredients_lib
from soups import preflight
from soups import recipes as recipes_lib
from soups import regmean
from soups import report
from soups import restore as restore_lib
from soups import soup_dir as soup_dir_lib
from train import accuracy
from train import durations
from train import errors
from train import losses
from train import pretrained
from train import run_log
from train import sharding
from train import vit

# Config keys that must agree between ingredients for their soup to mean anything.
SHARED_KEYS = ("model", "num_classes", "input.dataset", "input.classes",
               "input.heldout_split", "input.test_split", "input.pp_eval")
WISE_FT = "wise_ft"


def _shared_value(config, dotted):
  """`config`'s value at a dotted key, a nested ConfigDict as a plain dict (compared, and named
  in the error)."""
  value = config_path.get_value(dotted, config)
  return value.to_dict() if hasattr(value, "to_dict") else value


def shared_config(ingredients):
  """The run config the soup evaluates with; runs that disagree on SHARED_KEYS are refused."""
  with_runs = [i for i in ingredients if i.has_config]
  if not with_runs:
    raise errors.UserError("no ingredient comes from a run directory (with config.json) or has a "
                           "<stem>.config.json: the soup step needs one to know the model and the "
                           "data (for PyTorch checkpoints: --ingredient_config, docs/interop.md)")
  reference = with_runs[0].config()
  for ingredient in with_runs[1:]:
    config = ingredient.config()
    for key in SHARED_KEYS:
      theirs, ours = _shared_value(reference, key), _shared_value(config, key)
      if ours != theirs:
        raise errors.UserError(
            f"config.{key} differs between ingredients {with_runs[0].name} "
            f"({theirs!r}) and {ingredient.name} ({ours!r})")
  return reference


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
    self.abstract = restore_lib.target_abstract(self.shared_metadata, self.mesh)
    # SSF runs: their checkpoints hold the SSF vectors (soups of those are exported
    # merged), their final/*.npz the merged plain ViT (soups of merged weights).
    self.model = vit.build_model(vit.config_for_weights(config.model, self.shared_metadata),
                                 config.num_classes)
    self.loss_fn = losses.get(config.loss)
    self.evaluators = eval_lib.Evaluators(config, self.model, self.mesh,
                                          jax.tree.map(lambda a: a.sharding, self.abstract),
                                          eval_batch_size)
    self.heldout = self.evaluators.split("heldout")

  def restore(self, ingredient):
    return restore_lib.restore(ingredient, self.abstract)

  def pretrained_init(self):
    """The runs' starting point θ0: their model_init loaded as the trainer loads it, sharded."""
    config = self.config
    if not config.model_init:
      raise errors.UserError("the runs' config.model_init is empty (they trained from scratch): "
                             "there is no shared pre-trained init")
    image = next(self.heldout.global_batches())["image"]
    init = jax.jit(lambda rng: self.model.init(rng, image[:1])["params"])(
        jax.random.key(config.seed))
    loaded = pretrained.load_pretrained(
        sharding.to_host(init), config.model_init, dont_load=config.model_load.dont_load,
        ignore=config.model_load.ignore)
    return jax.tree.map(lambda x, a: jax.device_put(np.asarray(x, a.dtype), a.sharding),
                        loaded, self.abstract)


class Scorer:
  """Held-out, test and shift accuracy of a weight set: what soups and ingredients are scored on."""

  def __init__(self, setup, shift_suite=""):
    self.heldout = setup.heldout
    self.test = setup.evaluators.split("test")
    self.shifts = setup.evaluators.suite(shift_suite) if shift_suite else {}

  def evaluate(self, params):
    """{'heldout_acc', 'test_acc', 'shift_acc': {name: acc}}."""
    return {"heldout_acc": self.heldout.evaluate(params)["accuracy"],
            "test_acc": self.test.evaluate(params)["accuracy"],
            "shift_acc": {name: ev.evaluate(params)["accuracy"]
                          for name, ev in self.shifts.items()}}

  def datasets(self):
    """{dataset key: evaluator}: the keys of the ensemble's logit sums."""
    return {"heldout": self.heldout, "test": self.test,
            **{f"shift/{name}": ev for name, ev in self.shifts.items()}}


@dataclasses.dataclass
class Options:
  recipes: tuple = ("uniform", "greedy", "learned", "ensemble", WISE_FT)
  greedy_early_abort: bool = True
  learned_mode: str = "global"
  learned_epochs: int = 5
  learned_lr: float = 0.1
  learned_block_size: int = 4  # learned_blocks: ingredients on the mesh at a time.
  seed: int = 0  # learned_blocks' block order; DARE's masks.
  # Grids searched on held-out; λ scales the sum of the updates (TIES: their disjoint mean).
  task_arithmetic_lambdas: tuple = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
  ties_densities: tuple = (0.1, 0.2, 0.5)
  ties_lambdas: tuple = (0.5, 1.0, 1.5)
  dare_drop_rates: tuple = (0.5, 0.9)
  dare_lambdas: tuple = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
  fisher_floor: float = fisher.DEFAULT_FISHER_FLOOR
  fisher_examples_per_step: int = fisher.DEFAULT_EXAMPLES_PER_STEP
  regmean_alpha: float = regmean.DEFAULT_ALPHA
  wise_ft_alphas: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
  eval_batch_size: int = 0  # 0: the runs' config.eval_batch_size.
  shift_suite: str = ""  # A suite of eval/shifts.py, e.g. 'fashion_mnist_shifts'.


@dataclasses.dataclass(frozen=True)
class Kitchen:
  """What every recipe reads: made by `prepare`, once every ingredient has been evaluated."""
  setup: SoupSetup
  scorer: Scorer
  evaluations: dict  # {ingredient name: {'heldout_acc', 'test_acc', 'shift_acc'}}
  logit_sums: ensemble.LogitSums
  options: Options
  soup_dir: str

  @property
  def ingredients(self):
    return self.setup.ingredients

  def heldout_acc(self):
    return {name: e["heldout_acc"] for name, e in self.evaluations.items()}


def _evaluate_ingredients(setup, scorer, records, logit_sums):
  """Evaluates each ingredient once (resumed from `records`), adding its logits to `logit_sums`."""
  progress = run_log.CountProgress("soups", "evaluating ingredient", len(setup.ingredients))
  for ingredient in setup.ingredients:
    name = ingredient.name
    if name in records.evaluations and name in logit_sums.members:
      progress.advance(f"{name}: evaluated before")
      continue
    params = setup.restore(ingredient)
    predictions = {key: ev.predictions(params) for key, ev in scorer.datasets().items()}
    acc = {key: accuracy.accuracy_from_logits(*p) for key, p in predictions.items()}
    if jax.process_index() == 0:  # For the greedy ensemble.
      soup_dir_lib.save_heldout_logits(records.soup_dir, name, predictions["heldout"][0])
    if name not in logit_sums.members:  # A kill between the two saves must not count it twice.
      logit_sums.add(name, predictions)
      if jax.process_index() == 0:
        logit_sums.save()
    records.evaluations[name] = {
        "heldout_acc": acc["heldout"], "test_acc": acc["test"],
        "shift_acc": {k.partition("/")[2]: v for k, v in acc.items() if k.startswith("shift/")}}
    records.save()
    progress.advance(f"{name}: held-out {acc['heldout']:.2%}, test {acc['test']:.2%}")
  records.results["ingredients"] = [
      {"name": i.name, **records.evaluations[i.name]} for i in setup.ingredients]
  records.save()


def prepare(ingredients, soup_dir, options):
  """Checks the ingredients, warns, evaluates each once; returns (Kitchen, soup_dir.Records)."""
  setup = SoupSetup(ingredients, options.eval_batch_size)
  scorer = Scorer(setup, options.shift_suite)
  os.makedirs(soup_dir, exist_ok=True)
  records = soup_dir_lib.Records(soup_dir, write=jax.process_index() == 0)
  records.results["warnings"] = preflight.warnings(ingredients)
  for warning in records.results["warnings"] if jax.process_index() == 0 else ():
    print(f"[soups] WARNING {warning}", flush=True)
  logit_sums = ensemble.LogitSums(soup_dir_lib.path(soup_dir, soup_dir_lib.ENSEMBLE_LOGITS))
  _evaluate_ingredients(setup, scorer, records, logit_sums)
  return Kitchen(setup, scorer, dict(records.evaluations), logit_sums, options, soup_dir), records


def _save_weights(soup_dir, recipe, params):
  """`<recipe>/params.npz` (SSF folded in), then `<recipe>/orbax/`, whose presence marks both done.

  orbax renames its directory into place only when whole, so a kill at any
  point leaves either no orbax directory (and both are rewritten) or both files.
  """
  if soup_dir_lib.has_weights(soup_dir, recipe):
    return
  host = sharding.to_host(params)
  if jax.process_index() == 0:
    pretrained.export_npz(soup_dir_lib.weights_npz(soup_dir, recipe), host)
  soup_dir_lib.save_orbax(soup_dir, recipe, params)


def cook_wise_ft(kitchen, endpoint_params, endpoint_name):
  """results.json's `wise_ft`: the pre-trained init interpolated to `endpoint_params`, per alpha."""
  start = kitchen.setup.pretrained_init()
  points = []
  for alpha in kitchen.options.wise_ft_alphas:
    mixed = averaging.interpolate(start, endpoint_params, alpha)
    points.append({"alpha": float(alpha), **kitchen.scorer.evaluate(mixed)})
  return {"endpoint": endpoint_name, "pretrained": kitchen.setup.config.model_init,
          "points": points}


def _wise_ft_endpoint(kitchen, records, cooked):
  """(weights, name) WiSE-FT ends at: the greedy soup if cooked, else the best on held-out."""
  if "greedy" in records.results["soups"]:
    if "greedy" in cooked:
      return cooked["greedy"], "greedy"
    return soup_dir_lib.restore_orbax(kitchen.soup_dir, "greedy", kitchen.setup.abstract), "greedy"
  heldout_acc = kitchen.heldout_acc()
  best = max(heldout_acc, key=heldout_acc.get)
  return kitchen.setup.restore(next(i for i in kitchen.ingredients if i.name == best)), best


def _say(line):
  """A progress line on the console, from process 0 only."""
  if jax.process_index() == 0:
    print(line, flush=True)


def cook(ingredients, soup_dir, options=None, recipes=None):
  """Cooks every recipe in `options.recipes` (resuming); returns results.json's content.

  `recipes`: {name: recipe(kitchen) -> Soup}, default `recipes.RECIPES`.
  """
  options = options or Options()
  recipes = recipes_lib.RECIPES if recipes is None else recipes
  unknown = set(options.recipes) - set(recipes) - {WISE_FT}
  if unknown:
    raise errors.UserError(f"unknown recipes {sorted(unknown)}; known: {[*recipes, WISE_FT]}")
  kitchen, records = prepare(ingredients, soup_dir, options)
  cooked = {}  # Weights cooked in this process, by recipe.
  for number, name in enumerate(options.recipes, 1):
    stage = f"[soups] recipe {number}/{len(options.recipes)}: {name}"
    if name == WISE_FT:
      continue
    if name in records.results["soups"]:
      _say(f"{stage}: cooked before, in {soup_dir}")
      continue
    _say(f"{stage}: cooking from {len(ingredients)} ingredients")
    start = time.monotonic()
    soup = recipes[name](kitchen)
    if soup.params is not None:
      _save_weights(soup_dir, name, soup.params)
      cooked[name] = soup.params
    scores = soup.scores if soup.scores is not None else kitchen.scorer.evaluate(soup.params)
    inference = len(soup.ingredients) if name in recipes_lib.ENSEMBLES else 1
    records.results["soups"][name] = {**scores, "ingredients": soup.ingredients,
                                      "inference_forward_passes": inference, **soup.record}
    records.save()
    _say(f"{stage}: held-out {scores['heldout_acc']:.2%}, test {scores['test_acc']:.2%}, "
         f"{len(soup.ingredients)} ingredients, took "
         f"{durations.format_duration(time.monotonic() - start)}")
  if WISE_FT in options.recipes and WISE_FT not in records.results:
    _say(f"[soups] recipe {options.recipes.index(WISE_FT) + 1}/{len(options.recipes)}: "
         f"{WISE_FT}: {len(options.wise_ft_alphas)} points from the pre-trained init")
    records.results[WISE_FT] = cook_wise_ft(kitchen, *_wise_ft_endpoint(kitchen, records, cooked))
    records.save()
  if jax.process_index() == 0:
    report.write_report(soup_dir)
  return records.results
