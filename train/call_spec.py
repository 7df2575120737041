"""Parses big_vision-style call specs such as `resize(224)|value_range(-1, 1)`.

Preprocessing pipelines and sharding rules are written as strings in configs
so researchers edit them without touching code. Each step is a name or a call
with literal arguments; nothing is evaluated.
"""

import ast

from train import errors


def parse_call(spec, known):
  """'name(1, key="x")' -> (name, (1,), {'key': 'x'}); `name` must be in `known`."""
  text = spec.strip()
  try:
    node = ast.parse(text, mode="eval").body
  except SyntaxError as e:
    raise errors.UserError(f"cannot parse {text!r}: {e.msg}") from e
  if isinstance(node, ast.Name):
    name, args, kwargs = node.id, (), {}
  elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
    name = node.func.id
    try:
      args = tuple(ast.literal_eval(a) for a in node.args)
      kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except ValueError as e:
      raise errors.UserError(f"{text!r}: arguments must be literals ({e})") from e
  else:
    raise errors.UserError(f"{text!r} is not of the form name or name(args)")
  if name not in known:
    raise errors.UserError(f"unknown op {name!r} in {text!r}; known ops: {sorted(known)}")
  return name, args, kwargs


def parse_chain(spec, known, sep="|"):
  """'a|b(1)' -> [('a', (), {}), ('b', (1,), {})], checking every name."""
  return [parse_call(part, known) for part in spec.split(sep) if part.strip()]
