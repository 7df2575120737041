r"""report.md and plots of a soup directory, from its results.json and greedy journal.

  python -m soups.report --soup_dir=runs/demo/sweep/soups/ema_low

Writes `report.md` (a table of every ingredient and soup: held-out, test,
each shift and the shift average, in %) and three PNGs in the spirit of the
model-soups paper: held-out vs test accuracy, average shift accuracy vs test
accuracy, and the greedy soup's held-out accuracy as candidates are tried;
then the Diagnostics section when `python -m soups.diagnose` has run there.
"""

import io
import os

from absl import flags
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from soups import diagnostics_report  # pylint: disable=g-import-not-at-top
from soups import soup_dir as soup_dir_lib  # pylint: disable=g-import-not-at-top
from train import command  # pylint: disable=g-import-not-at-top
from train import files  # pylint: disable=g-import-not-at-top

# The order soups are listed in (results.json keeps its keys sorted): the paper's recipes
# first, then the later ones; soups/recipes.py's RECIPES, in its order.
SOUP_ORDER = ("uniform", "greedy", "learned", "learned_blocks", "ensemble", "greedy_ensemble",
              "model_stock", "model_stock_best2", "task_arithmetic", "ties", "dare", "fisher",
              "regmean")
SOUP_STYLE = {"uniform": ("s", "tab:blue"), "greedy": ("*", "tab:red"),
              "learned": ("D", "tab:green"), "ensemble": ("P", "tab:purple")}
OTHER_MARKERS = "^vhXp<>8d"  # Every other recipe, in the order cooked.
PLOTS = ("heldout_vs_test.png", "shift_vs_test.png", "greedy_progress.png")


def shift_average(row):
  shifts = row.get("shift_acc") or {}
  return sum(shifts.values()) / len(shifts) if shifts else None


def _pct(value):
  return "–" if value is None else f"{100 * value:.2f}"


def inference_cost(name, soup):
  """Forward passes per image at inference: 1 for a soup, one per member for an ensemble."""
  return soup.get("inference_forward_passes",
                  len(soup["ingredients"]) if name == "ensemble" else 1)


def soup_label(name, soup):
  cost = inference_cost(name, soup)
  return f"{name} soup" if cost == 1 else f"{name} ({cost}× cost)"


def _soups(results):
  """(name, result) of every soup, in `SOUP_ORDER` (others, a bench's say, after)."""
  rank = {name: i for i, name in enumerate(SOUP_ORDER)}
  return sorted(results["soups"].items(), key=lambda item: (rank.get(item[0], len(rank)), item[0]))


def _rows(results):
  """(table label, result) of every ingredient, then of every soup."""
  rows = [(i["name"], i) for i in results["ingredients"]]
  rows += [(f"**{soup_label(name, soup)}**", soup) for name, soup in _soups(results)]
  return rows


def _cost_lines(results):
  """What each recipe cost: its ingredients, inference passes, checkpoint reads, held-out passes."""
  lines = ["", "## What each recipe cost", "",
           "| recipe | ingredients used | inference (forward passes) | checkpoint reads | "
           "held-out passes |", "|---|---|---|---|---|"]
  for name, soup in _soups(results):
    cells = [name, str(len(soup["ingredients"])), str(inference_cost(name, soup)),
             str(soup.get("checkpoint_reads", "–")), str(soup.get("heldout_passes", "–"))]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def _warning_lines(results):
  """The soup step's pre-flight warnings (soups/preflight.py), as a list before the table."""
  warnings = results.get("warnings") or []
  return ["**Pre-flight warnings:**", "", *[f"- {w}" for w in warnings], ""] if warnings else []


def markdown(results, journal, sections=()):
  """The report's text; `sections`: more markdown lines at the end (the soup diagnostics)."""
  shift_names = sorted({k for _, r in _rows(results) for k in (r.get("shift_acc") or {})})
  header = ["model", "held-out %", "test %"] + [f"{s} %" for s in shift_names]
  header += ["shift avg %"] if shift_names else []
  lines = ["# Soup report", "",
           f"{len(results['ingredients'])} ingredients. Accuracies in %; the held-out split "
           "ranks and selects, test and shifts are measured after.", "",
           *_warning_lines(results),
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for label, row in _rows(results):
    cells = [label, _pct(row["heldout_acc"]), _pct(row["test_acc"])]
    cells += [_pct((row.get("shift_acc") or {}).get(s)) for s in shift_names]
    cells += [_pct(shift_average(row))] if shift_names else []
    lines.append("| " + " | ".join(cells) + " |")
  best = max(results["ingredients"], key=lambda i: i["heldout_acc"])
  lines += ["", f"Best single run on held-out: {best['name']} (test {_pct(best['test_acc'])}%)."]
  if "greedy" in results["soups"]:
    greedy = results["soups"]["greedy"]
    lines.append(f"Greedy soup: {len(greedy['ingredients'])} ingredients "
                 f"({', '.join(greedy['ingredients'])}); test "
                 f"{100 * (greedy['test_acc'] - best['test_acc']):+.2f} points vs the best run.")
  lines += _cost_lines(results) if results["soups"] else []
  if journal:
    lines += ["", "## Greedy search", "",
              "| # | candidate | its held-out % | soup with it % | decision |",
              "|---|---|---|---|---|"]
    for i, e in enumerate(journal, 1):
      soup = (_pct(e["soup_heldout_acc"]) if e.get("soup_heldout_acc") is not None
              else f"≤ {_pct(e.get('soup_heldout_acc_at_most'))} (stopped early)")
      lines.append(f"| {i} | {e['name']} | {_pct(e['heldout_acc'])} | {soup} | {e['decision']} |")
  if "wise_ft" in results:
    wise = results["wise_ft"]
    lines += ["", f"## WiSE-FT: pre-trained → {wise['endpoint']}", "",
              "| α | held-out % | test % | shift avg % |", "|---|---|---|---|"]
    for p in wise["points"]:
      lines.append(f"| {p['alpha']:g} | {_pct(p['heldout_acc'])} | {_pct(p['test_acc'])} | "
                   f"{_pct(shift_average(p))} |")
  lines += ["", "Plots: " + ", ".join(f"![{p[:-4]}]({p})" for p in PLOTS), "", *sections]
  return "\n".join(lines)


def _save(fig, path):
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png")
  plt.close(fig)
  files.write_bytes_atomic(path, buffer.getvalue())


def _scatter(results, y_of, ylabel, title, path):
  fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
  ingredients = [(100 * i["test_acc"], 100 * y_of(i)) for i in results["ingredients"]
                 if y_of(i) is not None]
  if ingredients:
    ax.scatter(*zip(*ingredients), c="tab:gray", alpha=0.7, label="fine-tuned runs")
  others = iter(OTHER_MARKERS * 2)
  for name, soup in _soups(results):
    if y_of(soup) is not None:
      marker, color = SOUP_STYLE.get(name) or (next(others), None)
      ax.scatter(100 * soup["test_acc"], 100 * y_of(soup), marker=marker, s=140, c=color,
                 edgecolors="black", label=soup_label(name, soup),
                 zorder=4 if name == "greedy" else 3)  # The greedy soup stays visible on top.
  ax.set_xlabel("test accuracy (%)")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(loc="best", fontsize=8)
  else:
    ax.text(0.5, 0.5, "not measured\n(soup step run without --shift_suite)", ha="center",
            va="center", transform=ax.transAxes)
  fig.tight_layout()
  _save(fig, path)


def _greedy_plot(journal, path):
  """Each candidate's own held-out accuracy, the soup tried with it, and the kept soup."""
  fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
  steps = range(1, len(journal) + 1)
  ax.plot(steps, [100 * e["heldout_acc"] for e in journal], "o", c="tab:gray",
          label="candidate alone")
  skipped = [(s, 100 * e["soup_heldout_acc"]) for s, e in zip(steps, journal)
             if e["decision"] == "skip" and e.get("soup_heldout_acc") is not None]
  if skipped:
    ax.plot(*zip(*skipped), "x", ms=8, c="tab:orange", label="soup with candidate (skipped)")
  kept, soup_curve = None, []
  for e in journal:  # The first candidate is always added: it is the soup's start.
    kept = e["soup_heldout_acc"] if e["decision"] == "add" else kept
    soup_curve.append(100 * kept)
  ax.step(steps, soup_curve, where="post", c="tab:red", label="greedy soup")
  added = [(s, c) for s, c, e in zip(steps, soup_curve, journal) if e["decision"] == "add"]
  ax.plot(*zip(*added), "*", ms=12, c="tab:red", label="ingredient added")
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax.set_xlabel("candidates tried (sorted by held-out accuracy)")
  ax.set_ylabel("held-out accuracy (%)")
  ax.set_title("Greedy soup: held-out accuracy as ingredients are tried")
  ax.grid(alpha=0.3)
  ax.legend(loc="best", fontsize=8)
  fig.tight_layout()
  _save(fig, path)


def write_report(soup_dir):
  """Writes report.md (with the diagnostics when measured) and the plots; returns its path."""
  results = soup_dir_lib.read_results(soup_dir)
  journal = soup_dir_lib.read_journal(soup_dir)
  _scatter(results, lambda r: r["heldout_acc"], "held-out accuracy (%)",
           "Held-out vs test accuracy", os.path.join(soup_dir, PLOTS[0]))
  _scatter(results, shift_average, "average shift accuracy (%)",
           "Robustness: shift vs in-distribution accuracy", os.path.join(soup_dir, PLOTS[1]))
  if journal:
    _greedy_plot(journal, os.path.join(soup_dir, PLOTS[2]))
  path = soup_dir_lib.path(soup_dir, soup_dir_lib.REPORT)
  sections = diagnostics_report.markdown(soup_dir)
  files.write_bytes_atomic(path, markdown(results, journal, sections).encode())
  return path


def main(argv):
  del argv
  print(f"wrote {write_report(flags.FLAGS.soup_dir)}")


if __name__ == "__main__":
  # Defined here, not at import: the soup CLI imports this module and has its own --soup_dir.
  flags.DEFINE_string("soup_dir", None, "A soup directory with results.json.", required=True)
  command.run(main)
