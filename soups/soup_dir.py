"""A soup directory: the one module that knows its file names and reads and writes its records.

  <soup_dir>/evaluations.json      every ingredient's held-out, test and shift accuracy
  <soup_dir>/ensemble_logits.npz   the ingredients' summed logits per dataset (eval/ensemble.py)
  <soup_dir>/heldout_logits/<ingredient>.npy
                                   each ingredient's held-out logits (the greedy ensemble's)
  <soup_dir>/greedy_journal.jsonl  one line per greedy candidate (soups/greedy.py)
  <soup_dir>/<recipe>/params.npz   each soup's weights, big_vision layout
  <soup_dir>/<recipe>/orbax/       the same, as an orbax checkpoint (sharded restore)
  <soup_dir>/results.json          {"ingredients": [{name, heldout_acc, test_acc, shift_acc}],
                                    "soups": {recipe: {heldout_acc, test_acc, shift_acc,
                                                       ingredients, ...its own keys}},
                                    "wise_ft": {endpoint, pretrained, points: [...]},
                                    "warnings": [pre-flight warnings, soups/preflight.py]}
  <soup_dir>/report.md, *.png      the report (soups/report.py)
  <soup_dir>/diagnostics.json, diagnostics_*.png
                                   `python -m soups.diagnose` (soups/diagnostics_report.py)

Accuracies are fractions in [0, 1]. Every record is replaced atomically.
"""

import io
import json
import os

import numpy as np
import orbax.checkpoint as ocp

from train import errors
from train import files

RESULTS = "results.json"
EVALUATIONS = "evaluations.json"
JOURNAL = "greedy_journal.jsonl"
ENSEMBLE_LOGITS = "ensemble_logits.npz"
REPORT = "report.md"
HELDOUT_LOGITS = "heldout_logits"


def path(soup_dir, name):
  """`<soup_dir>/<name>` for one of the file names above."""
  return os.path.join(soup_dir, name)


def weights_npz(soup_dir, recipe):
  return os.path.join(soup_dir, recipe, "params.npz")


def weights_orbax(soup_dir, recipe):
  """Absolute (orbax needs it) path of a soup's orbax checkpoint."""
  return os.path.join(os.path.abspath(soup_dir), recipe, "orbax")


def new_results():
  return {"ingredients": [], "soups": {}}


def _read_json(soup_dir, name):
  with open(path(soup_dir, name)) as f:
    return json.load(f)


def read_results(soup_dir):
  """results.json's content, or an error saying how to make it."""
  if not os.path.exists(path(soup_dir, RESULTS)):
    raise FileNotFoundError(f"{path(soup_dir, RESULTS)} does not exist; cook the soups first "
                            "(python -m soups)")
  return _read_json(soup_dir, RESULTS)


def read_evaluations(soup_dir):
  """{ingredient name: its accuracies}; empty before any ingredient was evaluated."""
  if not os.path.exists(path(soup_dir, EVALUATIONS)):
    return {}
  return _read_json(soup_dir, EVALUATIONS)


class Records:
  """results.json and evaluations.json as they are resumed, then rewritten after each piece."""

  def __init__(self, soup_dir, write=True):
    self.soup_dir, self.write = soup_dir, write
    self.results = (read_results(soup_dir) if os.path.exists(path(soup_dir, RESULTS))
                    else new_results())
    self.evaluations = read_evaluations(soup_dir)

  def save(self):
    """Writes both files atomically (only where `write`: process 0)."""
    if self.write:
      files.write_json_atomic(path(self.soup_dir, EVALUATIONS), self.evaluations)
      files.write_json_atomic(path(self.soup_dir, RESULTS), self.results)


def read_journal(soup_dir):
  """The greedy journal's entries (see `read_journal_file`)."""
  return read_journal_file(path(soup_dir, JOURNAL))


def read_journal_file(journal_path):
  """A greedy journal's entries; a torn last line (an interrupted soup step) is dropped."""
  if not os.path.exists(journal_path):
    return []
  with open(journal_path) as f:
    lines = [line for line in f.read().splitlines() if line.strip()]
  entries = []
  for number, line in enumerate(lines, 1):
    try:
      entries.append(json.loads(line))
    except json.JSONDecodeError as e:
      if number < len(lines):
        raise errors.UserError(f"{journal_path}: line {number} is not JSON: {e}") from e
  return entries


def rewrite_journal(journal_path, entries):
  """The journal as exactly `entries` (dropping a torn tail), atomically."""
  files.write_bytes_atomic(journal_path, "".join(json.dumps(e) + "\n" for e in entries).encode())


def append_journal(journal_path, entry):
  """Appends one decision and syncs it to disk before the search goes on."""
  with open(journal_path, "a") as f:
    f.write(json.dumps(entry) + "\n")
    f.flush()
    os.fsync(f.fileno())


def has_weights(soup_dir, recipe):
  """Whether both weight files of a soup are complete (orbax renames its directory in whole)."""
  return os.path.exists(weights_orbax(soup_dir, recipe))


def save_orbax(soup_dir, recipe, params):
  """`<recipe>/orbax/`; write `<recipe>/params.npz` first, as its presence marks both complete."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(weights_orbax(soup_dir, recipe), params)
  checkpointer.wait_until_finished()


def restore_orbax(soup_dir, recipe, abstract):
  """A soup's weights from its orbax checkpoint, in the shardings of `abstract`."""
  return ocp.StandardCheckpointer().restore(weights_orbax(soup_dir, recipe), abstract)


def _heldout_logits_path(soup_dir, ingredient_name):
  return os.path.join(soup_dir, HELDOUT_LOGITS, f"{ingredient_name}.npy")


def save_heldout_logits(soup_dir, ingredient_name, logits):
  """One ingredient's held-out logits [examples, scored classes], atomically."""
  buffer = io.BytesIO()
  np.save(buffer, np.asarray(logits), allow_pickle=False)
  files.write_bytes_atomic(_heldout_logits_path(soup_dir, ingredient_name), buffer.getvalue())


def load_heldout_logits(soup_dir, ingredient_name):
  """An ingredient's saved held-out logits, or None when the soup step has not saved them."""
  path_ = _heldout_logits_path(soup_dir, ingredient_name)
  return np.load(path_, allow_pickle=False) if os.path.exists(path_) else None
