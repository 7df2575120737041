r"""Cooks soups from the runs of a sweep or from explicit checkpoints.

  python -m soups --sweep_dir=runs/sweep --weights=ema_low \
      --recipes=uniform,greedy,learned,ensemble,wise_ft --soup_dir=runs/sweep/soups/ema_low
  python -m soups --ingredients=runs/a,runs/b/final/ema_low.npz --soup_dir=/tmp/soup
  python -m soups --sweep_dir=runs/sweep --recipes=all  # Every recipe (docs/soups.md).

Several hosts: start the same command on each with --distributed=auto (or
explicit); every process reads its shards, takes the same greedy decisions,
and process 0 writes (docs/soups.md#several-hosts).
"""

from train import tf_setup  # First: TensorFlow loads without its C++ start-up lines.

# isort: split

from absl import flags

from soups import cli
from soups import learned
from soups import recipes
from soups import soup_step
from train import command
from train import distributed
from train import errors
from train import startup

_DEFAULTS = soup_step.Options()
KNOWN_RECIPES = [*recipes.RECIPES, soup_step.WISE_FT]
_RECIPES = flags.DEFINE_list("recipes", list(_DEFAULTS.recipes),
                             f"Recipes to cook, of {KNOWN_RECIPES}, or 'all'.")
_SHIFT_SUITE = flags.DEFINE_string("shift_suite", "",
                                   "A distribution-shift suite of eval/ to report.")
_EARLY_ABORT = flags.DEFINE_bool("greedy_early_abort", True,
                                 "Stop evaluating a greedy candidate once it cannot be kept.")
_LEARNED_MODE = flags.DEFINE_enum("learned_mode", "global", learned.MODES,
                                  "One mixing coefficient per ingredient, or per tensor.")
_LEARNED_EPOCHS = flags.DEFINE_integer("learned_epochs", _DEFAULTS.learned_epochs,
                                       "Epochs over the held-out split.")
_LEARNED_BLOCK_SIZE = flags.DEFINE_integer(
    "learned_block_size", _DEFAULTS.learned_block_size,
    "learned_blocks: ingredients on the mesh at a time (memory flat in N).")
_SEED = flags.DEFINE_integer("seed", _DEFAULTS.seed, "learned_blocks' block order, DARE's masks.")
_FISHER_FLOOR = flags.DEFINE_float("fisher_floor", _DEFAULTS.fisher_floor,
                                   "fisher: added to every Fisher entry.")
_FISHER_EXAMPLES = flags.DEFINE_integer(
    "fisher_examples_per_step", _DEFAULTS.fisher_examples_per_step,
    "fisher: per-example gradients held at once (bounds memory).")
_REGMEAN_ALPHA = flags.DEFINE_float("regmean_alpha", _DEFAULTS.regmean_alpha,
                                    "regmean: weight of the Gram matrices' off-diagonal.")
_WISE_FT_ALPHAS = flags.DEFINE_list("wise_ft_alphas", ["0", "0.25", "0.5", "0.75", "1"],
                                    "Points from the pre-trained init (0) to the soup (1).")


def _grid(name, help_text):
  return flags.DEFINE_list(name, [f"{x:g}" for x in getattr(_DEFAULTS, name)],
                           f"{help_text} (a grid, chosen on held-out).")


_GRIDS = [
    _grid("task_arithmetic_lambdas", "task_arithmetic: λ scaling the sum of the updates"),
    _grid("ties_densities", "ties: the fraction of each update's entries kept"),
    _grid("ties_lambdas", "ties: λ scaling the disjoint mean of the updates"),
    _grid("dare_drop_rates", "dare: the probability of dropping an update's entry"),
    _grid("dare_lambdas", "dare: λ scaling the sum of the rescaled updates"),
]


def _numbers(flag, what):
  """A list flag's values as floats; anything else is a user error naming the flag."""
  try:
    return tuple(float(x) for x in flag.value)
  except ValueError as e:
    raise errors.UserError(f"--{flag.name}={','.join(flag.value)}: {e}; give {what}") from e


def _options():
  """soup_step.Options from the flags; a recipe or number it cannot take is a user error."""
  names = KNOWN_RECIPES if _RECIPES.value == ["all"] else _RECIPES.value
  unknown = sorted(set(names) - set(KNOWN_RECIPES))
  if unknown:
    raise errors.UserError(f"--recipes={','.join(_RECIPES.value)}: unknown recipes {unknown}; "
                           f"known: {KNOWN_RECIPES}, or 'all'")
  return soup_step.Options(
      recipes=tuple(names), greedy_early_abort=_EARLY_ABORT.value,
      learned_mode=_LEARNED_MODE.value, learned_epochs=_LEARNED_EPOCHS.value,
      learned_block_size=_LEARNED_BLOCK_SIZE.value, seed=_SEED.value,
      fisher_floor=_FISHER_FLOOR.value, fisher_examples_per_step=_FISHER_EXAMPLES.value,
      regmean_alpha=_REGMEAN_ALPHA.value,
      wise_ft_alphas=_numbers(_WISE_FT_ALPHAS, "numbers from 0 (the pre-trained init) to 1 "
                              "(the soup)"),
      shift_suite=_SHIFT_SUITE.value,
      **{grid.name: _numbers(grid, "numbers") for grid in _GRIDS})


def main(argv):
  del argv
  options = _options()
  tf_setup.hide_gpus_from_tensorflow()
  startup.init()
  distributed.initialize()
  ingredients, soup_dir = cli.ingredients_and_soup_dir()
  needs_init = sorted(set(options.recipes) & {*recipes.NEEDS_PRETRAINED, soup_step.WISE_FT})
  if needs_init and not soup_step.shared_config(ingredients).model_init:
    raise errors.UserError(f"--recipes has {needs_init}, but the runs trained from scratch "
                           "(config.model_init is empty): these start from the runs' shared "
                           "pre-trained init; leave them out of --recipes")
  print(f"[soups] cooking {len(ingredients)} ingredients into {soup_dir}", flush=True)
  results = soup_step.cook(ingredients, soup_dir, options)
  for name, soup in results["soups"].items():
    print(f"[{name}] held-out {soup['heldout_acc']:.4f} | test {soup['test_acc']:.4f} | "
          f"{len(soup['ingredients'])} ingredients")


if __name__ == "__main__":
  command.run(main)
