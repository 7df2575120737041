"""Greedy ensemble (Wortsman et al. 2022, the baseline beside the greedy soup).

The logit ensemble grown as the greedy soup grows: candidates in the same
order (held-out accuracy descending), each kept when the mean logits of the
members with it are not less accurate on held-out than without. Decisions
use the ingredients' held-out logits that the soup step saved while it
evaluated them, so the search itself needs no forward pass; the chosen
ensemble costs one forward pass per member at inference.
"""

import numpy as np

from train import accuracy


def search(order, heldout_logits, labels, mask):
  """Grows the ensemble over `order` (names); `heldout_logits(name)` -> [examples, classes].

  Returns (kept names, held-out accuracy of the kept ensemble, one decision per candidate).
  """
  kept, total, best, decisions = [], None, None, []
  for name in order:
    logits = np.asarray(heldout_logits(name), np.float32)
    candidate = logits if total is None else total + logits
    acc = accuracy.accuracy_from_logits(candidate, labels, mask)
    keep = best is None or acc >= best
    if keep:
      kept.append(name)
      total, best = candidate, acc
    decisions.append({"name": name, "ensemble_heldout_acc": acc,
                      "decision": "add" if keep else "skip", "ensemble_size": len(kept)})
  return kept, best, decisions
