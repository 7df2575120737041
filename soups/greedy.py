"""Greedy soup (Wortsman et al. 2022, Recipe 1), resumable and with exact early abort.

Ingredients are sorted by held-out accuracy, descending; the soup starts as
the best one, and each next candidate is kept only if the uniform average of
the soup plus it does not lower held-out accuracy. Each decision is appended
to `greedy_journal.jsonl` as it is taken, so an interrupted search replays
the journal and continues with the next candidate.

Early abort: a candidate needs at least as many correct held-out examples as
the current soup. Evaluation runs batch by batch and stops as soon as even
an all-correct remainder could not reach that count, which never changes a
decision; the journal records the batches evaluated. The counts are global
(replicated) scalars, so every host stops at the same batch and takes the
same decision.
"""

import contextlib
import os

from soups import soup_dir
from train import errors


class Journal:
  """Append-only record of greedy decisions; a torn last line (a kill mid-write) is dropped."""

  def __init__(self, path, order, write):
    self.path, self.write = path, write
    self.entries = soup_dir.read_journal_file(path)
    tried = [e["name"] for e in self.entries]
    if tried != order[:len(tried)]:
      raise errors.UserError(
          f"{path} tried {tried}, which is not the start of this soup's candidate order "
          f"{order}: it belongs to another set of ingredients; use a new --soup_dir")
    if self.write and os.path.exists(path):  # Rewrite without a torn tail, atomically.
      soup_dir.rewrite_journal(path, self.entries)

  def append(self, entry):
    self.entries.append(entry)
    if self.write:
      soup_dir.append_journal(self.path, entry)


def count_correct(evaluator, params, needed=None):
  """Correct held-out predictions of `params`; stops early once `needed` is out of reach.

  Returns (correct, examples seen, batches evaluated, whether it stopped early).
  """
  correct = seen = batches = 0
  total = len(evaluator.split)
  with contextlib.closing(evaluator.batch_sums(params)) as batch_sums:  # Closed here if stopped.
    for sums in batch_sums:
      correct += int(round(float(sums["correct"])))
      seen += int(round(float(sums["count"])))
      batches += 1
      if needed is not None and correct + (total - seen) < needed:
        return correct, seen, batches, True
  return correct, seen, batches, False


def candidate_order(ingredients, heldout_acc):
  """The order candidates are tried in: held-out accuracy descending, then name."""
  return sorted(ingredients, key=lambda i: (-heldout_acc[i.name], i.name))


def greedy_soup(ingredients, heldout_acc, restore, running_sum, evaluator, journal_path,
                early_abort=True, write=True, on_decision=None):
  """Runs (or resumes) the greedy search.

  Args:
    ingredients: candidates, any order.
    heldout_acc: {name: held-out accuracy of the ingredient alone}.
    restore: ingredient -> its weights, sharded.
    running_sum: an empty `averaging.RunningSum` of the right shapes and shardings.
    evaluator: held-out `SplitAccuracy` (with `batch_sums`); never the test split.
    journal_path: where decisions are recorded (and replayed from).
    early_abort: stop evaluating a candidate once it provably cannot be kept.
    write: False on processes other than 0.
    on_decision: called with each journal entry as it is taken or replayed (progress).

  Returns:
    (soup params, names kept in the order added, soup held-out accuracy,
     {'batches_evaluated', 'batches_full_evaluation'}).
  """
  order = candidate_order(ingredients, heldout_acc)
  journal = Journal(journal_path, [i.name for i in order], write)
  on_decision = on_decision or (lambda entry: None)
  total_examples = len(evaluator.split)
  num_batches = evaluator.num_batches()
  kept, best_correct = [], None
  stats = {"batches_evaluated": 0, "batches_full_evaluation": 0}
  for index, ingredient in enumerate(order):
    if index < len(journal.entries):  # Replay a decision already taken.
      entry = journal.entries[index]
      if index:  # The search's cost counts the replayed evaluations too.
        stats["batches_evaluated"] += entry["batches_evaluated"]
        stats["batches_full_evaluation"] += num_batches
      if entry["decision"] == "add":
        running_sum.add(restore(ingredient))
        kept.append(ingredient.name)
        best_correct = entry["soup_heldout_correct"]
      on_decision(entry)
      continue
    own = heldout_acc[ingredient.name]
    weights = restore(ingredient)
    if best_correct is None:  # The soup starts as the best ingredient.
      best_correct = int(round(own * total_examples))
      running_sum.add(weights)
      kept.append(ingredient.name)
      journal.append({"name": ingredient.name, "heldout_acc": own, "soup_heldout_acc": own,
                      "soup_heldout_correct": best_correct, "decision": "add",
                      "soup_size": 1, "batches_evaluated": 0})
      on_decision(journal.entries[-1])
      continue
    candidate = running_sum.mean_with(weights)
    correct, seen, batches, aborted = count_correct(
        evaluator, candidate, best_correct if early_abort else None)
    del candidate
    stats["batches_evaluated"] += batches
    stats["batches_full_evaluation"] += num_batches
    keep = not aborted and correct >= best_correct
    if keep:
      running_sum.add(weights)
      kept.append(ingredient.name)
      best_correct = correct
    journal.append({
        "name": ingredient.name, "heldout_acc": own,
        "soup_heldout_acc": None if aborted else correct / total_examples,
        "soup_heldout_correct": None if aborted else correct,
        # An aborted candidate's accuracy is only bounded: it could not reach the soup's.
        "soup_heldout_acc_at_most": (correct + total_examples - seen) / total_examples
                                    if aborted else None,
        "decision": "add" if keep else "skip", "soup_size": len(kept),
        "batches_evaluated": batches})
    on_decision(journal.entries[-1])
  return running_sum.mean(), kept, best_correct / total_examples, stats
