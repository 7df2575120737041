"""pp strings with config fields: `inception_crop(28, area_min={aug.crop_min_area})`.

The grid knobs that live in the per-example pipeline (crop size, RandAugment)
are config keys under `config.aug`, so a sweep varies them like any other key;
the pp string says where they go. `resolve` substitutes every `{dotted.key}`
with the key's value as a Python literal, and refuses knobs that are set but
not used, so a grid point can never silently ignore one.
"""

import string

from train import errors

# config.aug keys consumed by pp strings; None in the base config means unused.
PP_KNOBS = ("crop_min_area", "randaug_layers", "randaug_magnitude")


def _lookup(config, dotted, what):
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node:
      raise errors.UserError(f"{what} references {{{dotted}}}, which is not a config key")
    node = node[part]
  if node is None:
    raise errors.UserError(f"{what} uses {{{dotted}}} but config.{dotted} is not set")
  return node


def fields(spec):
  """The `{dotted.key}` fields a pp string references."""
  return [field for _, field, _, _ in string.Formatter().parse(spec) if field is not None]


def resolve(config, key):
  """`config.input.<key>` with every `{dotted.key}` replaced by that config value."""
  spec, what = config.input[key], f"config.input.{key}"
  try:
    parts = list(string.Formatter().parse(spec))
  except ValueError as e:
    raise errors.UserError(f"{what}={spec!r}: {e}") from e
  return "".join(literal + (repr(_lookup(config, field, what)) if field is not None else "")
                 for literal, field, _, _ in parts)


def check_knobs_used(config):
  """Every pp-level `config.aug` knob that is set must appear in `config.input.pp_train`."""
  used = set(fields(config.input.pp_train))
  for knob in PP_KNOBS:
    if config.aug[knob] is not None and f"aug.{knob}" not in used:
      raise errors.UserError(
          f"config.aug.{knob}={config.aug[knob]!r} is set but config.input.pp_train="
          f"{config.input.pp_train!r} does not use it; reference it as {{aug.{knob}}} "
          "(e.g. inception_crop(224, area_min={aug.crop_min_area}), "
          "randaug({aug.randaug_layers}, {aug.randaug_magnitude}))")
