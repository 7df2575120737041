"""`python -m launch status`: one line per run of a sweep, with its state, progress and accuracy."""

from launch import manifest as manifest_lib
from train import run_dir

BAR = 20


def status_table(sweep_dir):
  """One line per run (the start run first): name, state, step with a bar, held-out accuracy."""
  manifest = manifest_lib.load(sweep_dir)
  if manifest is None:
    raise FileNotFoundError(f"{manifest_lib.path(sweep_dir)} does not exist")
  entries = manifest_lib.entries(manifest)
  width = max(len("run"), *(len(e["name"]) for e in entries))
  lines = [f"{'run':<{width}} {'state':<12} {'step':>13} {'':<{BAR + 2}} {'held-out':>8}"]
  counts = {}
  for entry in entries:
    state, step, heldout = manifest_lib.run_state(sweep_dir, entry)
    counts[state] = counts.get(state, 0) + 1
    run = manifest_lib.workdir(sweep_dir, entry)
    total = run_dir.read_config(run)["total_steps"] if run_dir.is_run(run) else None
    step = total if state == "done" else step
    progress = f"{step}/{total}" if total else "–"
    filled = int(BAR * step / total) if total else 0
    bar = f"[{'#' * filled}{' ' * (BAR - filled)}]" if state in ("running", "interrupted") else ""
    accuracy = f"{100 * heldout:.2f}%" if heldout is not None else ""
    lines.append(f"{entry['name']:<{width}} {state:<12} {progress:>13} {bar:<{BAR + 2}} "
                 f"{accuracy:>8}")
  lines.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
  return "\n".join(lines)
