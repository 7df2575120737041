"""Grids for sweep configs: products, zips and seeded random samples of trainer overrides.

Each helper returns a list of override dicts ({'lr': 0.01, 'aug.mixup_alpha': 0.2});
`+` concatenates lists. Random samples are a pure function of their seed, as
in the paper's random hyperparameter search.
"""

import itertools
import math
import random as random_lib


def product(**axes):
  """Every combination: product(lr=[1, 2], loss=['a', 'b']) has 4 points."""
  keys = list(axes)
  return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


def zipped(**axes):
  """Points taken in lockstep: zipped(lr=[1, 2], steps=[10, 20]) has 2 points."""
  lengths = {k: len(v) for k, v in axes.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"zipped() needs lists of one length, got {lengths}")
  keys = list(axes)
  return [dict(zip(keys, values)) for values in zip(*axes.values())]


def cross(*grids):
  """Every combination of points of several grids, merged: cross(product(...), zipped(...))."""
  return [dict(itertools.chain.from_iterable(p.items() for p in points))
          for points in itertools.product(*grids)]


class LogUniform:
  def __init__(self, low, high):
    self.low, self.high = low, high

  def sample(self, rng):
    return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))


class Uniform:
  def __init__(self, low, high):
    self.low, self.high = low, high

  def sample(self, rng):
    return rng.uniform(self.low, self.high)


class Choice:
  def __init__(self, *options):
    self.options = options

  def sample(self, rng):
    return rng.choice(self.options)


def random(count, seed, rounding=3, **space):
  """`count` points drawn from `space` (LogUniform/Uniform/Choice per key) with `seed`.

  Floats are rounded to `rounding` significant digits so run names stay readable.
  """
  rng = random_lib.Random(seed)
  points = []
  for _ in range(count):
    point = {}
    for key, dist in space.items():
      value = dist.sample(rng)
      point[key] = float(f"{value:.{rounding}g}") if isinstance(value, float) else value
    points.append(point)
  return points
