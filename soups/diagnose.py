r"""Why a soup works or fails: the geometry of its ingredients around their shared init θ0.

  python -m soups.diagnose --sweep_dir=runs/demo/sweep --weights=ema_low

On the held-out split only, for ingredients fine-tuned from one init θ0 (the
runs' `model_init`):
  - the angle between every pair of updates θi − θ0, over the whole model
    and per layer (Wortsman et al. 2022, Fig. 3: the wider the angle between
    two good runs, the more their average gains);
  - for chosen pairs, accuracy and loss along the straight line between them
    (α = 0…1) and its barriers: the largest rise of the loss above the chord
    between its ends, and the largest drop of accuracy below it (Frankle et
    al. 2020); a pair with a barrier does not share a basin;
  - the soup-vs-ensemble gap of every pair: accuracy of their average minus
    that of their mean logits (the ensemble costs 2× at inference);
  - the error on the plane through θ0 and two runs (the paper's Fig. 2).
Everything streams: at most `--block` ingredients, θ0 and one more are on
the mesh at a time, each sharded like the soup step's sum.

Writes `diagnostics.json` and `diagnostics_*.png` into the soup directory
(default `<sweep_dir>/soups/<weights>`, as `python -m soups`), and re-renders
its `report.md` with a Diagnostics section when the soups are there.
"""

from train import tf_setup  # First: TensorFlow loads without its C++ start-up lines.

# isort: split

import itertools
import math
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from eval import ensemble
from soups import averaging
from soups import diagnostics_report
from soups import report
from soups import soup_dir as soup_dir_lib
from soups import soup_step
from train import command
from train import errors
from train import startup
from train import trees


def layer_of(path):
  """The layer a parameter belongs to: 'encoderblock_3', 'embedding', 'pos_embedding', 'head'."""
  parts = path.split("/")
  return parts[1] if parts[0] == "Transformer" and len(parts) > 2 else parts[0]


def _input_to_output(layer):
  """Sort key: embeddings, encoder blocks by number, the final norm, the head (then the rest)."""
  first = {"embedding": 0, "pos_embedding": 1, "cls": 2}
  if layer in first:
    return (first[layer], 0, "")
  if layer.startswith("encoderblock_") and layer[13:].isdigit():
    return (3, int(layer[13:]), "")
  return ({"encoder_norm": 4, "head": 5}.get(layer, 6), 0, layer)


@jax.jit
def _update_dots(a, b, theta0):
  """[<a − θ0, b − θ0> of each leaf], in float32, in `jax.tree.leaves` order."""
  def dot(x, y, t):
    t = t.astype(jnp.float32)
    return jnp.sum((x.astype(jnp.float32) - t) * (y.astype(jnp.float32) - t))
  return jnp.stack(jax.tree.leaves(jax.tree.map(dot, a, b, theta0)))


@jax.jit
def _plane_point(theta0, a, b, c_a, c_b):
  """θ0 + c_a (a − θ0) + c_b (b − θ0), in θ0's dtypes."""
  def point(t, x, y):
    t32 = t.astype(jnp.float32)
    return (t32 + c_a * (x.astype(jnp.float32) - t32)
            + c_b * (y.astype(jnp.float32) - t32)).astype(t.dtype)
  return jax.tree.map(point, theta0, a, b)


def angles_deg(gram):
  """Angles in degrees from a Gram matrix of updates; NaN where an update is zero."""
  norms = np.sqrt(np.clip(np.diag(gram), 0, None))
  with np.errstate(divide="ignore", invalid="ignore"):
    cosine = gram / np.outer(norms, norms)
  return np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0)))


class PairPass:
  """One streaming pass over every pair: update inner products, held-out logits, pair soups.

  Ingredients are taken in blocks of `block`: a block stays on the mesh while
  every later ingredient streams past it once, so the pass reads about
  N + N²/(2·block) ingredients and holds block + 1 of them (and θ0).
  """

  def __init__(self, setup, theta0, block=4, pair_soups=True):
    self.setup, self.theta0, self.block, self.pair_soups = setup, theta0, block, pair_soups
    self.paths = [trees.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(theta0)[0]]

  def run(self):
    n = len(self.setup.ingredients)
    dots = np.zeros((n, n, len(self.paths)))
    soup_acc = np.full((n, n), np.nan)
    predictions = [None] * n
    for start in range(0, n, self.block):
      held = {}
      for j in range(start, n):
        ingredient = self.setup.ingredients[j]
        print(f"[diagnose] pairs: block {start // self.block + 1}/{math.ceil(n / self.block)}, "
              f"{ingredient.name}", flush=True)
        params = self.setup.restore(ingredient)
        if start == 0:  # The first block's pass meets every ingredient once.
          predictions[j] = self.setup.heldout.predictions(params)
        if j < start + self.block:
          held[j] = params
        for i, other in held.items():
          dots[i, j] = dots[j, i] = np.asarray(_update_dots(other, params, self.theta0))
          if self.pair_soups and i < j:
            soup = averaging.interpolate(other, params, 0.5)
            soup_acc[i, j] = soup_acc[j, i] = self.setup.heldout.evaluate(soup)["accuracy"]
        del params
    return dots, soup_acc, predictions


def ensemble_accuracy(predictions, members):
  """Held-out accuracy of the mean logits of `members` (indices into `predictions`)."""
  sums = ensemble.LogitSums()
  for m in members:
    sums.add(str(m), {"heldout": predictions[m]})
  return sums.accuracy("heldout")


def interpolation(setup, a, b, alphas):
  """Held-out accuracy and loss at (1 − α) a + α b for each α, and the line's barriers."""
  points = [setup.heldout.evaluate(averaging.interpolate(a, b, alpha)) for alpha in alphas]
  acc = np.array([p["accuracy"] for p in points])
  loss = np.array([p["loss"] for p in points])
  alphas = np.asarray(alphas, np.float64)
  chord = lambda v: (1 - alphas) * v[0] + alphas * v[-1]
  return {"alphas": alphas.tolist(), "heldout_acc": acc.tolist(), "heldout_loss": loss.tolist(),
          "loss_barrier": float(np.max(loss - chord(loss))),
          "acc_barrier": float(np.max(chord(acc) - acc))}


def landscape(setup, theta0, a, b, gram_ab, grid):
  """Held-out error on the plane through θ0, a and b, in an orthonormal basis of that plane.

  `gram_ab`: [[|u|², u·v], [u·v, |v|²]] for u = a − θ0, v = b − θ0. The x axis
  runs along u, so θ0 = (0, 0) and a = (|u|, 0). None when u and v are parallel.
  """
  uu, uv, vv = gram_ab[0, 0], gram_ab[0, 1], gram_ab[1, 1]
  u_norm = math.sqrt(uu)
  v_perp = math.sqrt(max(vv - uv * uv / uu, 0.0))
  if v_perp < 1e-6 * math.sqrt(vv):
    return None
  corners = np.array([[0.0, 0.0], [u_norm, 0.0], [uv / u_norm, v_perp]])
  low, high = corners.min(axis=0), corners.max(axis=0)
  margin = 0.25 * (high - low)
  xs = np.linspace(low[0] - margin[0], high[0] + margin[0], grid)
  ys = np.linspace(low[1] - margin[1], high[1] + margin[1], grid)
  error = np.zeros((grid, grid))
  for (iy, y), (ix, x) in itertools.product(enumerate(ys), enumerate(xs)):
    # x e1 + y e2 with e1 = u/|u|, e2 = (v − (u·v/|u|²) u)/|v⊥|, as c_a u + c_b v.
    c_b = y / v_perp
    c_a = x / u_norm - c_b * uv / uu
    params = _plane_point(theta0, a, b, jnp.float32(c_a), jnp.float32(c_b))
    error[iy, ix] = 1.0 - setup.heldout.evaluate(params)["accuracy"]
  return {"x": xs.tolist(), "y": ys.tolist(), "heldout_error": error.tolist(),
          "points": {"init": corners[0].tolist(), "a": corners[1].tolist(),
                     "b": corners[2].tolist()}}


def default_pairs(names, heldout_acc, angles):
  """The best run by held-out with the second best, and with the run at the widest angle from it."""
  order = sorted(range(len(names)), key=lambda i: (-heldout_acc[i], names[i]))
  if len(order) < 2:
    return []
  best = order[0]
  widest = max((i for i in order[1:] if not np.isnan(angles[best, i])),
               key=lambda i: angles[best, i], default=order[1])
  return list(dict.fromkeys([(best, order[1]), (best, widest)]))


def _parse_pairs(pairs, names):
  parsed = []
  for pair in pairs:
    a, sep, b = pair.partition(":")
    for name in (a, b):
      if name not in names:
        raise errors.UserError(f"--pairs={pair}: {name!r} is not an ingredient; known: {names}")
    if not sep or a == b:
      raise errors.UserError(f"--pairs={pair}: expected two different ingredients as a:b")
    parsed.append((names.index(a), names.index(b)))
  return parsed


def diagnose(ingredients, soup_dir, pairs=(), alphas=11, landscape_grid=9, block=4,
             pair_gaps=True, eval_batch_size=0):
  """Measures everything above; writes diagnostics.json and the plots; returns the data."""
  if len(ingredients) < 2:
    raise errors.UserError(f"diagnostics compare ingredients in pairs: give at least two, not "
                           f"{len(ingredients)}")
  setup = soup_step.SoupSetup(ingredients, eval_batch_size)
  theta0 = setup.pretrained_init()
  names = [i.name for i in ingredients]
  pair_pass = PairPass(setup, theta0, block, pair_soups=pair_gaps)
  dots, soup_acc, predictions = pair_pass.run()
  heldout_acc = [ensemble_accuracy(predictions, [i]) for i in range(len(names))]
  gram = dots.sum(axis=-1)
  angles = angles_deg(gram)
  layers = sorted({layer_of(p) for p in pair_pass.paths}, key=_input_to_output)
  per_layer = {layer: angles_deg(dots[:, :, [layer_of(p) == layer for p in pair_pass.paths]]
                                 .sum(axis=-1)) for layer in layers}
  chosen = _parse_pairs(pairs, names) if pairs else default_pairs(names, heldout_acc, angles)
  alpha_values = np.linspace(0.0, 1.0, alphas).tolist()
  pair_results, plane = [], None
  for index, (i, j) in enumerate(chosen):
    print(f"[diagnose] line {index + 1}/{len(chosen)}: {names[i]} -> {names[j]}", flush=True)
    a, b = setup.restore(ingredients[i]), setup.restore(ingredients[j])
    line = interpolation(setup, a, b, alpha_values)
    pair_results.append({"a": names[i], "b": names[j], "angle_deg": float(angles[i, j]), **line,
                         "soup_acc": setup.heldout.evaluate(averaging.interpolate(a, b, 0.5))[
                             "accuracy"],
                         "ensemble_acc": ensemble_accuracy(predictions, [i, j])})
    if index == 0 and landscape_grid:
      print(f"[diagnose] plane through the init, {names[i]} and {names[j]}: "
            f"{landscape_grid}x{landscape_grid} points", flush=True)
      plane = landscape(setup, theta0, a, b, gram[np.ix_([i, j], [i, j])], landscape_grid)
      if plane is not None:
        plane["pair"] = [names[i], names[j]]
    del a, b
  ensemble_pairs = np.full_like(soup_acc, np.nan)
  if pair_gaps:
    for i, j in itertools.combinations(range(len(names)), 2):
      ensemble_pairs[i, j] = ensemble_pairs[j, i] = ensemble_accuracy(predictions, [i, j])
  data = diagnostics_report.new(
      names=names, heldout_acc=heldout_acc, init=setup.config.model_init,
      angles=angles, layers=layers, angles_per_layer=per_layer, pairs=pair_results,
      pair_soup_acc=soup_acc if pair_gaps else None,
      pair_ensemble_acc=ensemble_pairs if pair_gaps else None, plane=plane)
  if jax.process_index() == 0:
    diagnostics_report.write(soup_dir, data)
    if os.path.exists(soup_dir_lib.path(soup_dir, soup_dir_lib.RESULTS)):
      report.write_report(soup_dir)
  return data


def _define_flags():
  """The diagnostics' own flags, beside soups/cli.py's; defined only when run as a program."""
  flags.DEFINE_list("pairs", [], "Pairs a:b of ingredient names for the line and plane (default: "
                    "the best run by held-out with the second best and with the run at the "
                    "widest angle from it).")
  flags.DEFINE_integer("alphas", 11, "Points on each line, α = 0 to 1.")
  flags.DEFINE_integer("landscape_grid", 9, "Points per side of the plane (0: no plane).")
  flags.DEFINE_integer("block", 4, "Ingredients held on the mesh at a time in the pair pass.")
  flags.DEFINE_bool("pair_gaps", True, "Soup vs ensemble for every pair (N²/2 held-out passes); "
                    "off: only the chosen pairs.")


def main(argv):
  del argv
  tf_setup.hide_gpus_from_tensorflow()
  startup.init()
  f = flags.FLAGS
  if f.alphas < 2 or f.block < 1 or f.landscape_grid < 0:
    raise app.UsageError("--alphas must be >= 2, --block >= 1 and --landscape_grid >= 0")
  ingredients, soup_dir = cli.ingredients_and_soup_dir()
  if len(ingredients) >= 2 and not soup_step.shared_config(ingredients).model_init:
    raise errors.UserError("the runs trained from scratch (config.model_init is empty): the "
                           "diagnostics measure each run's update from their shared pre-trained "
                           "init")
  data = diagnose(ingredients, soup_dir, f.pairs, f.alphas, f.landscape_grid, f.block,
                  f.pair_gaps)
  for line in diagnostics_report.summary(data):
    print(f"[diagnose] {line}")
  print(f"[diagnose] wrote {diagnostics_report.path(soup_dir)} and its plots")


if __name__ == "__main__":
  from soups import cli  # pylint: disable=g-import-not-at-top  # Defines flags: programs only.
  _define_flags()
  command.run(main)
