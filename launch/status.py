"""`python -m launch status`: one line per run of a sweep, with its state, progress and accuracy."""

from launch import manifest as manifest_lib
from train import run_dir

BAR = 20
HEADER = ("run", "state", "step", "", "held-out")
ALIGN = "<<><>"  # Names and states to the left, numbers to the right.


def status_table(sweep_dir):
  """One line per run (the start run first): name, state, step with a bar, held-out accuracy.

  Every column is as wide as its widest cell, so long run names keep the
  table aligned; the bar column shows only while a run is running or
  interrupted. A last line counts the runs in each state.
  """
  manifest = manifest_lib.load(sweep_dir)
  if manifest is None:
    raise FileNotFoundError(f"{manifest_lib.path(sweep_dir)} does not exist: is {sweep_dir} a "
                            "sweep directory written by `python -m launch`?")
  rows, counts = [], {}
  for entry in manifest_lib.entries(manifest):
    state, step, heldout = manifest_lib.run_state(sweep_dir, entry)
    counts[state] = counts.get(state, 0) + 1
    run = manifest_lib.workdir(sweep_dir, entry)
    total = run_dir.read_config(run)["total_steps"] if run_dir.is_run(run) else None
    step = total if state == "done" else step
    filled = int(BAR * step / total) if total else 0
    rows.append((entry["name"], state, f"{step}/{total}" if total else "–",
                 f"[{'#' * filled}{' ' * (BAR - filled)}]" if state in ("running", "interrupted")
                 else "",
                 f"{100 * heldout:.2f}%" if heldout is not None else ""))
  lines = format_columns([HEADER, *rows], ALIGN)
  lines.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
  return "\n".join(lines)


def format_columns(rows, align):
  """Lines of `rows` (tuples of strings) in columns as wide as their widest cell, one space
  apart; `align` has '<' or '>' per column. Columns empty in every row are left out."""
  shown = [i for i in range(len(align)) if any(row[i] for row in rows)]
  widths = {i: max(len(row[i]) for row in rows) for i in shown}
  return [" ".join(f"{row[i]:{align[i]}{widths[i]}}" for i in shown).rstrip() for row in rows]
