"""Pre-flight checks of a soup's ingredients: what can be averaged but probably should not be.

Averaging needs one tree (checked in soups/ingredients.py). What makes the
average *work* is that every run started from the same weights and stayed
in one basin (Wortsman et al. 2022; Neyshabur et al. 2020): runs from
different inits, with heads initialised differently, or trained with
different losses (softmax and sigmoid logits have different scales) average
into a model worse than its parts. Each such split of the ingredients is a
warning naming the runs on each side; nothing is refused.
"""

import os

from train import run_dir

LP_FT_HINT = ("start every run from one shared linear probe (LP-FT: a sweep 'start' run, "
              "see docs/soups.md)")


def _groups(ingredients, key):
  """{identity: (label, [ingredient names])} over the ingredients that come from a run.

  `key(ingredient)` -> (identity, label): runs group by identity and are shown by label.
  """
  groups = {}
  for ingredient in ingredients:
    if ingredient.run_dir:
      identity, label = key(ingredient)
      groups.setdefault(identity, (label, []))[1].append(ingredient.name)
  return groups


def _init_identity(ingredient):
  """(SHA-256, 'path (sha256 …)') of the weights a run started from, as its trainer recorded them.

  Runs trained before init.json existed are identified by hashing the file now.
  """
  record = run_dir.read_init(ingredient.run_dir)
  if record is None:
    path = ingredient.config().model_init
    if not path:
      return "random", "a random init"
    if not os.path.exists(path):
      return path, f"{path} (no longer exists)"
    record = {"model_init": path, "sha256": run_dir.sha256_of(path)}
  return record["sha256"], f"{record['model_init']} (sha256 {record['sha256'][:12]})"


def _config_value(dotted):
  def key(ingredient):
    value = ingredient.config()
    for part in dotted.split("."):
      value = value[part]
    value = repr(tuple(value)) if isinstance(value, (tuple, list)) else str(value)
    return value, f"{dotted}={value}"
  return key


CHECKS = (
    ("did not start from the same weights", _init_identity, LP_FT_HINT),
    ("initialised their heads differently", _config_value("model_load.dont_load"), LP_FT_HINT),
    ("were trained with different losses (their logits have different scales)",
     _config_value("loss"), "soup runs of one loss"),
)


def warnings(ingredients):
  """One sentence per check the ingredients fail, naming the runs on each side."""
  found = []
  for what, key, hint in CHECKS:
    groups = _groups(ingredients, key).values()
    if len(groups) > 1:
      sides = "; ".join(f"{label}: {', '.join(names)}" for label, names in groups)
      found.append(f"the ingredients {what}: {sides}. Their average may leave the low-error "
                   f"basin; {hint}")
  return found
