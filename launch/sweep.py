"""A sweep: a base trainer config plus a grid of overrides, expanded into named runs.

A sweep file `configs/sweeps/<x>.py` has `get_config(arg)` returning
{'base': 'configs/<file>.py:<arg>', 'common': {overrides of every run},
 'grid': [{overrides}, ...]} (see configs/grid.py), and optionally
'start': {'base': 'configs/<file>.py:<arg>', 'overrides': {...}, 'name': 'linear_probe',
 'weights': 'params'}: one run that the launcher trains first and whose exported
weights every grid run starts from (its `model_init`), e.g. the linear probe
of LP-FT. Each grid point becomes a run named `<short human name>-<hash of its
overrides>`, so names depend only on what a run is, never on its position in
the grid: growing the grid never renames a run. Every point is checked
against the trainer's locked config before anything starts.
"""

import dataclasses
import hashlib
import importlib.util
import json
import re

from train import checkpoint
from train import errors

START_KEYS = ("base", "overrides", "name", "weights")


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  overrides: dict


@dataclasses.dataclass(frozen=True)
class Start:
  """The run every grid run starts from; its `weights` export becomes their `model_init`."""
  name: str
  base: str
  overrides: dict
  weights: str


def _load_module(path):
  spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load(sweep_spec):
  """'configs/sweeps/x.py:arg' -> the dict its get_config(arg) returns, checked for shape."""
  path, _, arg = sweep_spec.partition(":")
  try:
    sweep = _load_module(path).get_config(arg or None)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"--sweep={sweep_spec}: no sweep file {path}") from e
  except ValueError as e:  # The sweep file's own check of its argument.
    raise errors.UserError(f"--sweep={sweep_spec}: {e}") from e
  missing = {"base", "grid"} - set(sweep)
  if missing:
    raise errors.UserError(f"sweep {path}: get_config() must return 'base' and 'grid'; "
                           f"missing {sorted(missing)}")
  if not sweep["grid"]:
    raise errors.UserError(f"sweep {sweep_spec}: the grid is empty")
  start = sweep.get("start")
  if start is not None:
    unknown = set(start) - set(START_KEYS)
    if "base" not in start or unknown:
      raise errors.UserError(f"sweep {path}: 'start' needs 'base' and takes only {START_KEYS}; got "
                             f"{sorted(start)}")
    if start.get("weights", "params") not in checkpoint.WEIGHT_NAMES:
      raise errors.UserError(f"sweep {path}: start weights {start['weights']!r}; known: "
                             f"{checkpoint.WEIGHT_NAMES}")
  return sweep


def base_config(base_spec):
  """The trainer's locked ConfigDict for 'configs/<file>.py:<arg>'."""
  path, _, arg = base_spec.partition(":")
  try:
    return _load_module(path).get_config(arg or None)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"config {base_spec}: no config file {path}") from e
  except ValueError as e:  # The config file's own check of its argument.
    raise errors.UserError(f"config {base_spec}: {e}") from e


def _canonical(overrides):
  return json.dumps(overrides, sort_keys=True, default=list)


def _short(value):
  if isinstance(value, float):
    return f"{value:g}"
  if isinstance(value, (list, tuple)):
    return "_".join(map(_short, value))
  return re.sub(r"[^A-Za-z0-9._]+", "", str(value))


def run_name(overrides):
  """'lr0.01-mixup_alpha0.2-3f9c2a1b': the varied keys' last parts and values, plus a hash."""
  digest = hashlib.sha1(_canonical(overrides).encode()).hexdigest()[:8]
  human = "-".join(f"{key.split('.')[-1]}{_short(value)}"
                   for key, value in sorted(overrides.items()))
  return f"{human[:60]}-{digest}" if human else digest


def check_overrides(config, overrides, where):
  """Applies `overrides` to a copy of the locked config: a bad key or type names itself."""
  config = config.copy_and_resolve_references()
  config.lock()
  for key, value in overrides.items():
    try:
      config.update_from_flattened_dict({key: value})
    except (KeyError, AttributeError) as e:
      raise errors.UserError(f"{where}: {key!r} is not a key of the trainer config: {e}") from e
    except TypeError as e:
      raise errors.UserError(f"{where}: {key}={value!r} has the wrong type: {e}") from e


def start_run(sweep, sweep_spec):
  """The sweep's `Start` run, its overrides checked; None when the sweep has none."""
  start = sweep.get("start")
  if start is None:
    return None
  start = Start(start.get("name", "start"), start["base"], dict(start.get("overrides", {})),
                start.get("weights", "params"))
  check_overrides(base_config(start.base), start.overrides, f"{sweep_spec}, start run")
  return start


def expand(sweep, sweep_spec, start_init=""):
  """The sweep's runs, each checked; two points resolving to the same run is an error.

  `start_init`: the start run's exported weights, every run's `model_init`.
  """
  config = base_config(sweep["base"])
  runs, seen = [], {}
  for index, point in enumerate(sweep["grid"]):
    overrides = {**sweep.get("common", {}), **point}
    if start_init:
      if "model_init" in overrides:
        raise errors.UserError(f"{sweep_spec}, grid point {index}: sets model_init, but the "
                               "sweep's start run gives every run its model_init")
      overrides["model_init"] = start_init
    check_overrides(config, overrides, f"{sweep_spec}, grid point {index} {point}")
    key = _canonical(overrides)
    if key in seen:
      raise errors.UserError(f"{sweep_spec}: grid points {seen[key]} and {index} are the same run "
                             f"{point}; remove one")
    seen[key] = index
    runs.append(Run(run_name(point), overrides))
  return runs


def override_flags(overrides):
  """--config.key=value flags that reproduce `overrides` on the command line."""
  def literal(value):
    if isinstance(value, (list, tuple)):
      return repr(tuple(value))
    return str(value)
  return [f"--config.{k}={literal(v)}" for k, v in sorted(overrides.items())]


