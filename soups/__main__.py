r"""Cooks soups from the runs of a sweep or from explicit checkpoints.

  python -m soups --sweep_dir=runs/sweep --weights=ema_low \
      --recipes=uniform,greedy,learned,ensemble,wise_ft --soup_dir=runs/sweep/soups/ema_low
  python -m soups --ingredients=runs/a,runs/b/final/ema_low.npz --soup_dir=/tmp/soup
"""

from train import tf_setup  # First: TensorFlow loads without its C++ start-up lines.

# isort: split

from absl import flags

from soups import cli
from soups import soup_step
from train import command
from train import errors
from train import startup

KNOWN_RECIPES = [*soup_step.RECIPES, soup_step.WISE_FT]
_RECIPES = flags.DEFINE_list("recipes", list(soup_step.Options().recipes),
                             f"Recipes to cook, of {KNOWN_RECIPES}.")
_SHIFT_SUITE = flags.DEFINE_string("shift_suite", "",
                                   "A distribution-shift suite of eval/ to report.")
_EARLY_ABORT = flags.DEFINE_bool("greedy_early_abort", True,
                                 "Stop evaluating a greedy candidate once it cannot be kept.")
_LEARNED_MODE = flags.DEFINE_enum("learned_mode", "global", ("global", "per_layer"),
                                  "One mixing coefficient per ingredient, or per tensor.")
_LEARNED_EPOCHS = flags.DEFINE_integer("learned_epochs", 5, "Epochs over the held-out split.")
_WISE_FT_ALPHAS = flags.DEFINE_list("wise_ft_alphas", ["0", "0.25", "0.5", "0.75", "1"],
                                    "Points from the pre-trained init (0) to the soup (1).")


def _options():
  """soup_step.Options from the flags; a recipe or alpha it cannot take is a user error."""
  unknown = sorted(set(_RECIPES.value) - set(KNOWN_RECIPES))
  if unknown:
    raise errors.UserError(f"--recipes={','.join(_RECIPES.value)}: unknown recipes {unknown}; "
                           f"known: {KNOWN_RECIPES}")
  try:
    alphas = tuple(float(a) for a in _WISE_FT_ALPHAS.value)
  except ValueError as e:
    raise errors.UserError(f"--wise_ft_alphas={','.join(_WISE_FT_ALPHAS.value)}: {e}; give "
                           "numbers from 0 (the pre-trained init) to 1 (the soup)") from e
  return soup_step.Options(
      recipes=tuple(_RECIPES.value), greedy_early_abort=_EARLY_ABORT.value,
      learned_mode=_LEARNED_MODE.value, learned_epochs=_LEARNED_EPOCHS.value,
      wise_ft_alphas=alphas, shift_suite=_SHIFT_SUITE.value)


def main(argv):
  del argv
  options = _options()
  tf_setup.hide_gpus_from_tensorflow()
  startup.init()
  ingredients, soup_dir = cli.ingredients_and_soup_dir()
  if soup_step.WISE_FT in options.recipes and not soup_step.shared_config(ingredients).model_init:
    raise errors.UserError(f"--recipes has {soup_step.WISE_FT}, but the runs trained from scratch "
                           "(config.model_init is empty): WiSE-FT starts from their pre-trained "
                           "init; leave it out of --recipes")
  print(f"[soups] cooking {len(ingredients)} ingredients into {soup_dir}", flush=True)
  results = soup_step.cook(ingredients, soup_dir, options)
  for name, soup in results["soups"].items():
    print(f"[{name}] held-out {soup['heldout_acc']:.4f} | test {soup['test_acc']:.4f} | "
          f"{len(soup['ingredients'])} ingredients")


if __name__ == "__main__":
  command.run(main)
