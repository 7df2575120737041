"""`diagnostics.json`, its plots and its section of report.md: the one module that knows them.

soups/diagnose.py measures; this module stores the measurements in the soup
directory and renders them:
  diagnostics.json                     every number (angles in degrees, accuracies in [0, 1])
  diagnostics_angles.png               angle between every pair of updates θi − θ0
  diagnostics_angles_per_layer.png     the same per layer (rows) and pair (columns)
  diagnostics_interpolation.png        held-out accuracy and loss along each chosen line
  diagnostics_soup_vs_ensemble.png     accuracy of each pair's average minus its ensemble's
  diagnostics_landscape.png            held-out error on the plane through θ0 and two runs
"""

import io
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from train import files  # pylint: disable=g-import-not-at-top

FILE = "diagnostics.json"
PLOTS = {"angles": "diagnostics_angles.png", "per_layer": "diagnostics_angles_per_layer.png",
         "interpolation": "diagnostics_interpolation.png",
         "gaps": "diagnostics_soup_vs_ensemble.png", "landscape": "diagnostics_landscape.png"}


def _matrix(array):
  """A square array as nested lists, NaN as None (JSON has no NaN)."""
  return None if array is None else [[None if np.isnan(v) else float(v) for v in row]
                                     for row in np.asarray(array, np.float64)]


def _array(matrix):
  return np.array([[np.nan if v is None else v for v in row] for row in matrix], np.float64)


def new(names, heldout_acc, init, angles, layers, angles_per_layer, pairs, pair_soup_acc,
        pair_ensemble_acc, plane):
  """The content of diagnostics.json."""
  return {"ingredients": list(names), "heldout_acc": [float(a) for a in heldout_acc],
          "init": init, "angle_deg": _matrix(angles), "layers": list(layers),
          "angle_deg_per_layer": {k: _matrix(v) for k, v in angles_per_layer.items()},
          "pairs": pairs, "pair_soup_acc": _matrix(pair_soup_acc),
          "pair_ensemble_acc": _matrix(pair_ensemble_acc), "plane": plane}


def path(soup_dir):
  return os.path.join(soup_dir, FILE)


def read(soup_dir):
  """diagnostics.json's content, or None when `python -m soups.diagnose` has not run there."""
  if not os.path.exists(path(soup_dir)):
    return None
  with open(path(soup_dir)) as f:
    return json.load(f)


def write(soup_dir, data):
  """Writes the plots, then diagnostics.json (atomically, each)."""
  _angle_heatmap(data, os.path.join(soup_dir, PLOTS["angles"]))
  _per_layer_heatmap(data, os.path.join(soup_dir, PLOTS["per_layer"]))
  _interpolation_plot(data, os.path.join(soup_dir, PLOTS["interpolation"]))
  if data["pair_soup_acc"] is not None:
    _gap_heatmap(data, os.path.join(soup_dir, PLOTS["gaps"]))
  if data["plane"] is not None:
    _landscape_plot(data, os.path.join(soup_dir, PLOTS["landscape"]))
  files.write_json_atomic(path(soup_dir), data)


def _off_diagonal(matrix):
  values = _array(matrix)
  return values[~np.eye(len(values), dtype=bool) & ~np.isnan(values)]


def summary(data):
  """A few lines a researcher reads first: angles, barriers, soup vs ensemble."""
  angles = _off_diagonal(data["angle_deg"])
  lines = [f"angle between updates θi − θ0 over {len(data['ingredients'])} ingredients: "
           f"mean {angles.mean():.1f}°, range {angles.min():.1f}°–{angles.max():.1f}°"
           if angles.size else "angles undefined (an update is zero)"]
  for pair in data["pairs"]:
    lines.append(
        f"{pair['a']} ↔ {pair['b']}: angle {pair['angle_deg']:.1f}°, loss barrier "
        f"{pair['loss_barrier']:.4f}, accuracy barrier {100 * pair['acc_barrier']:.2f} points; "
        f"their soup {100 * pair['soup_acc']:.2f}% vs ensemble {100 * pair['ensemble_acc']:.2f}%")
  if data["pair_soup_acc"] is not None:
    gaps = _off_diagonal(_array(data["pair_soup_acc"]) - _array(data["pair_ensemble_acc"]))
    lines.append(f"soup − ensemble over all {gaps.size // 2} pairs: mean "
                 f"{100 * gaps.mean():+.2f} points; the soup is at least the ensemble in "
                 f"{int(np.sum(gaps >= 0)) // 2}")
  return lines


def markdown(soup_dir):
  """The Diagnostics section of report.md as lines; none before diagnostics ran."""
  data = read(soup_dir)
  if data is None:
    return []
  lines = ["## Diagnostics (held-out split)", "",
           f"From `python -m soups.diagnose`, updates measured from the shared init "
           f"`{data['init']}`. A loss barrier above zero means the straight line between the "
           "two runs leaves their basin; the soup of a pair beats its ensemble only inside one.",
           ""]
  lines += [f"- {line}" for line in summary(data)]
  if data["pairs"]:
    lines += ["", "| pair | angle | loss barrier | accuracy barrier (points) | soup % | "
              "ensemble % |", "|---|---|---|---|---|---|"]
    for p in data["pairs"]:
      lines.append(f"| {p['a']} ↔ {p['b']} | {p['angle_deg']:.1f}° | {p['loss_barrier']:.4f} | "
                   f"{100 * p['acc_barrier']:.2f} | {100 * p['soup_acc']:.2f} | "
                   f"{100 * p['ensemble_acc']:.2f} |")
  shown = [p for key, p in PLOTS.items() if os.path.exists(os.path.join(soup_dir, p))]
  lines += ["", "Plots: " + ", ".join(f"![{p[:-4]}]({p})" for p in shown), ""]
  return lines


def _save(fig, out):
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png")
  plt.close(fig)
  files.write_bytes_atomic(out, buffer.getvalue())


def _index_labels(data):
  return [f"{i}" for i in range(len(data["ingredients"]))]


def _legend_text(data):
  return "\n".join(f"{i}: {n}" for i, n in enumerate(data["ingredients"]))


def _heatmap(ax, values, labels, cmap, vmin, vmax, annotate_format):
  image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax)
  ax.set_xticks(range(len(labels)), labels)
  ax.set_yticks(range(len(labels)), labels)
  if len(labels) <= 16:
    for (row, col), value in np.ndenumerate(values):
      if not np.isnan(value):
        ax.text(col, row, annotate_format.format(value), ha="center", va="center", fontsize=6)
  return image


def _with_legend(fig, data):
  """The ingredient names of the numbered ticks, right of the colour bar."""
  fig.subplots_adjust(left=0.06, right=0.56)
  fig.text(0.64, 0.5, _legend_text(data), fontsize=6, va="center", ha="left", family="monospace")


def _angle_heatmap(data, out):
  fig, ax = plt.subplots(figsize=(12, 6), dpi=120)
  image = _heatmap(ax, _array(data["angle_deg"]), _index_labels(data), "viridis", 0, 180, "{:.0f}")
  fig.colorbar(image, ax=ax, label="angle between θi − θ0 and θj − θ0 (degrees)")
  ax.set_title("Angles between fine-tuning updates (whole model)")
  _with_legend(fig, data)
  _save(fig, out)


def _per_layer_heatmap(data, out):
  n = len(data["ingredients"])
  pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
  values = np.array([[_array(data["angle_deg_per_layer"][layer])[i, j] for i, j in pairs]
                     for layer in data["layers"]])
  fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(pairs) + 3), 0.35 * len(data["layers"]) + 2),
                         dpi=120)
  image = ax.imshow(values, cmap="viridis", vmin=0, vmax=180, aspect="auto")
  ax.set_yticks(range(len(data["layers"])), data["layers"], fontsize=7)
  if len(pairs) <= 120:
    ax.set_xticks(range(len(pairs)), [f"{i}-{j}" for i, j in pairs], rotation=90, fontsize=6)
  ax.set_xlabel("pair of ingredients (numbered as in diagnostics_angles.png)")
  fig.colorbar(image, ax=ax, label="angle (degrees)")
  ax.set_title("Angles between updates, per layer")
  fig.tight_layout()
  _save(fig, out)


def _interpolation_plot(data, out):
  fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120)
  for pair in data["pairs"]:
    alphas = pair["alphas"]
    label = f"{pair['a'][:24]} → {pair['b'][:24]}"
    line, = acc_ax.plot(alphas, [100 * a for a in pair["heldout_acc"]], "o-", ms=3, label=label)
    acc_ax.plot([0, 1], [100 * pair["heldout_acc"][0], 100 * pair["heldout_acc"][-1]], "--",
                c=line.get_color(), alpha=0.5)
    loss_ax.plot(alphas, pair["heldout_loss"], "o-", ms=3, c=line.get_color())
    loss_ax.plot([0, 1], [pair["heldout_loss"][0], pair["heldout_loss"][-1]], "--",
                 c=line.get_color(), alpha=0.5)
  acc_ax.set_ylabel("held-out accuracy (%)")
  loss_ax.set_ylabel("held-out loss")
  for ax in (acc_ax, loss_ax):
    ax.set_xlabel("α  ((1 − α)·a + α·b)")
    ax.grid(alpha=0.3)
  acc_ax.legend(fontsize=7, loc="best")
  fig.suptitle("Along the line between two runs (dashed: the chord between the ends)")
  fig.tight_layout()
  _save(fig, out)


def _gap_heatmap(data, out):
  gaps = 100 * (_array(data["pair_soup_acc"]) - _array(data["pair_ensemble_acc"]))
  limit = max(float(np.nanmax(np.abs(gaps))), 0.1) if np.any(~np.isnan(gaps)) else 1.0
  fig, ax = plt.subplots(figsize=(12, 6), dpi=120)
  image = _heatmap(ax, gaps, _index_labels(data), "RdBu", -limit, limit, "{:+.1f}")
  fig.colorbar(image, ax=ax, label="soup of the pair − ensemble of the pair (points)")
  ax.set_title("Soup vs ensemble, every pair (held-out)")
  _with_legend(fig, data)
  _save(fig, out)


def _landscape_plot(data, out):
  plane = data["plane"]
  fig, ax = plt.subplots(figsize=(6.5, 5), dpi=120)
  error = 100 * np.asarray(plane["heldout_error"])
  contours = ax.contourf(plane["x"], plane["y"], error, levels=20, cmap="magma_r")
  fig.colorbar(contours, ax=ax, label="held-out error (%)")
  a, b = plane["pair"]
  for key, label, marker in (("init", "θ0 (init)", "o"), ("a", a[:28], "*"), ("b", b[:28], "*")):
    x, y = plane["points"][key]
    ax.plot(x, y, marker, ms=12, c="white", mec="black")
    ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=7, c="white")
  ax.set_xlabel("along θa − θ0")
  ax.set_ylabel("orthogonal, towards θb − θ0")
  ax.set_title("Held-out error on the plane through the init and two runs")
  fig.tight_layout()
  _save(fig, out)
