"""Fisher merging (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022).

Each ingredient's parameters are weighted, element by element, by its
diagonal Fisher information on the held-out split:

  F_i = mean over held-out examples of (d log p(y|x; θ_i) / dθ)²
  θ   = Σ_i (F_i + ε) θ_i / Σ_i (F_i + ε)

This is the empirical Fisher: y is the example's own label, and
log p(y|x) = -loss_fn(logits, y), the loss the runs trained with. For softmax
cross-entropy on one-hot labels that is the log-softmax of the true class; for
sigmoid cross-entropy on multi-hot labels, the summed Bernoulli
log-likelihood of every class. The floor ε (`fisher_floor`, 1e-6 as in the
paper's code) keeps the weights positive, so a parameter that no ingredient's
loss moves falls back to the uniform mean.

Streaming, one ingredient at a time: a held-out pass with per-example
gradients (jax.vmap over chunks of `examples_per_step` rows) accumulates F_i
on the mesh, sharded like the parameters; then (F_i + ε) θ_i and (F_i + ε) are
added to two running sums. The same pass scores the ingredient's held-out
accuracy from the forward it computes anyway. Memory per device: the two sums,
F_i, the ingredient and the one read ahead, and `examples_per_step`
per-example gradients, each about model / devices — flat in N.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from soups import averaging
from train import accuracy
from train import errors
from train import sharding

DEFAULT_FISHER_FLOOR = 1e-6
DEFAULT_EXAMPLES_PER_STEP = 8


def float32_abstract(abstract):
  """`abstract`'s shapes and shardings, in float32: the abstract of a sum of such trees."""
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=a.sharding), abstract)


def statistics_pass(step, statistics, params, batches):
  """One held-out pass: `statistics, sums = step(statistics, params, batch)` for every batch.

  `sums` are `accuracy.masked_sums` of the batch's logits, so the pass also
  scores `params`: returns (statistics, {'heldout_acc', 'heldout_loss',
  'num_examples'}), the accuracy and loss as `SplitAccuracy.evaluate` gives them.
  """
  totals = {"correct": 0.0, "loss": 0.0, "count": 0.0}
  for batch in batches():
    statistics, sums = step(statistics, params, batch)
    totals = jax.tree.map(lambda t, s: t + s, totals, sums)
  totals = jax.tree.map(lambda x: float(np.asarray(x)), totals)
  if not totals["count"]:
    raise errors.UserError("the held-out split has no examples")
  return statistics, {"heldout_acc": totals["correct"] / totals["count"],
                      "heldout_loss": totals["loss"] / totals["count"],
                      "num_examples": int(totals["count"])}


def _rows_in_chunks(x, size):
  """[rows, ...] -> [chunks, size, ...], zero rows appended to fill the last chunk."""
  x = jnp.pad(x, [(0, -x.shape[0] % size)] + [(0, 0)] * (x.ndim - 1))
  return x.reshape(-1, size, *x.shape[1:])


@functools.lru_cache(maxsize=8)
def _fisher_step(model, loss_fn, examples_per_step, treedef, shardings):
  """Jitted: (fisher sum, params, batch) -> (fisher sum + Σ_examples mask·g², batch's sums).

  Each chunk of rows is replicated and its per-example gradients sharded like
  the parameters: the devices share every chunk's work, and memory holds
  `examples_per_step` gradients / devices. Chunks split over the devices by
  row would be faster, but XLA's SPMD partitioner then gets the per-example
  gradients of a convolution's kernel wrong (jax 0.10.2 on CPU; the patch
  embedding's, in a ViT): tests/test_fisher_regmean.py compares 1 and 8 devices.
  """
  mesh = shardings[0].mesh
  fisher_shardings = jax.tree.unflatten(treedef, shardings)
  per_example = jax.tree.map(lambda s: NamedSharding(mesh, P(None, *s.spec)), fisher_shardings)

  def example(params, image, labels):
    logits = model.apply({"params": params}, image[None])
    return loss_fn(logits, labels[None])[0], logits[0]  # -log p(y|x), and the logits.

  def step(fisher, params, batch):
    mask = batch["mask"].astype(jnp.float32)
    rows = mask.shape[0]
    size = min(examples_per_step, rows)
    chunks = jax.tree.map(lambda x: _rows_in_chunks(x, size),
                          {"image": batch["image"], "labels": batch["labels"], "mask": mask})

    def chunk_step(fisher, chunk):
      chunk = jax.lax.with_sharding_constraint(chunk, sharding.replicated(mesh))
      grads, logits = jax.vmap(jax.grad(example, has_aux=True), in_axes=(None, 0, 0))(
          params, chunk["image"], chunk["labels"])
      grads = jax.lax.with_sharding_constraint(grads, per_example)
      fisher = jax.tree.map(
          lambda f, g: f + jnp.tensordot(chunk["mask"], jnp.square(g.astype(jnp.float32)), 1),
          fisher, grads)
      return fisher, logits

    fisher, logits = jax.lax.scan(chunk_step, fisher, chunks)
    logits = logits.reshape(-1, logits.shape[-1])[:rows]
    return fisher, accuracy.masked_sums(logits, batch["labels"], mask, loss_fn)

  return jax.jit(step, donate_argnums=(0,),
                 out_shardings=(fisher_shardings, sharding.replicated(mesh)))


@functools.partial(jax.jit, donate_argnums=(0,))
def _divide(tree, count):
  return jax.tree.map(lambda x: x / count, tree)


def _fisher_step_for(model, loss_fn, abstract, examples_per_step):
  if examples_per_step < 1:
    raise errors.UserError(f"examples_per_step={examples_per_step}: must be at least 1")
  leaves, treedef = jax.tree.flatten(abstract)
  return _fisher_step(model, loss_fn, examples_per_step, treedef,
                      tuple(a.sharding for a in leaves))


def fisher_step_memory_analysis(model, loss_fn, abstract, batch,
                                examples_per_step=DEFAULT_EXAMPLES_PER_STEP):
  """XLA's compiled memory analysis of one held-out batch's Fisher step (per device)."""
  return _fisher_step_for(model, loss_fn, abstract, examples_per_step).lower(
      float32_abstract(abstract), abstract, batch).compile().memory_analysis()


def heldout_fisher(model, loss_fn, params, batches, abstract,
                   examples_per_step=DEFAULT_EXAMPLES_PER_STEP):
  """(diagonal empirical Fisher of `params` on `batches`, sharded like `abstract`; its scores).

  One pass with gradients; the Fisher is float32, the mean over unmasked rows.
  """
  step = _fisher_step_for(model, loss_fn, abstract, examples_per_step)
  fisher_sum, scores = statistics_pass(step, averaging.zeros(abstract), params, batches)
  return _divide(fisher_sum, jnp.float32(scores["num_examples"])), scores


@functools.lru_cache(maxsize=8)
def _merge_steps(treedef, dtypes, shardings):
  """The jitted add of one ingredient to the weighted sums, and the final division."""
  dtypes = jax.tree.unflatten(treedef, dtypes)
  shardings = jax.tree.unflatten(treedef, shardings)

  def add(sums, fisher, params, floor):
    weights = jax.tree.map(lambda f: f + floor, fisher)
    return {"weighted": jax.tree.map(lambda s, w, x: s + w * x.astype(jnp.float32),
                                     sums["weighted"], weights, params),
            "weights": jax.tree.map(jnp.add, sums["weights"], weights)}

  divide = lambda sums: jax.tree.map(lambda s, w, d: (s / w).astype(d),
                                     sums["weighted"], sums["weights"], dtypes)
  return (jax.jit(add, donate_argnums=(0,),
                  out_shardings={"weighted": shardings, "weights": shardings}),
          jax.jit(divide, out_shardings=shardings))


class FisherWeightedSum:
  """Σ_i (F_i + floor) θ_i and Σ_i (F_i + floor), float32, sharded like `abstract`."""

  def __init__(self, abstract, fisher_floor=DEFAULT_FISHER_FLOOR):
    if not fisher_floor > 0:
      raise errors.UserError(f"fisher_floor={fisher_floor}: must be positive, or a parameter with "
                             "zero Fisher in every ingredient would divide 0 by 0")
    leaves, treedef = jax.tree.flatten(abstract)
    self.floor = fisher_floor
    self.sums = {"weighted": averaging.zeros(abstract), "weights": averaging.zeros(abstract)}
    self._add, self._divide = _merge_steps(
        treedef, tuple(np.dtype(a.dtype) for a in leaves), tuple(a.sharding for a in leaves))

  def add(self, fisher, params):
    self.sums = self._add(self.sums, fisher, params, jnp.float32(self.floor))

  def mean(self):
    """The Fisher-weighted mean, in the ingredients' dtypes."""
    return self._divide(self.sums)

  def block_until_ready(self):
    """Waits for the adds in flight (`jax.block_until_ready` calls it on a streamed state)."""
    jax.block_until_ready(self.sums)
    return self

  def add_memory_analysis(self, abstract):
    """XLA's compiled memory analysis of one `add` step (per device)."""
    sums = {"weighted": float32_abstract(abstract), "weights": float32_abstract(abstract)}
    return self._add.lower(sums, float32_abstract(abstract), abstract, jnp.float32(self.floor)
                           ).compile().memory_analysis()


def fisher_merge(ingredients, restore, abstract, model, loss_fn, batches,
                 fisher_floor=DEFAULT_FISHER_FLOOR, examples_per_step=DEFAULT_EXAMPLES_PER_STEP,
                 ahead=1):
  """The Fisher-weighted merge of `ingredients`: returns (params sharded like `abstract`, record).

  `batches()`: the held-out split as padded global batches {'image', 'labels',
  'mask'}; `loss_fn(logits, labels)`: the per-example loss the runs trained
  with, taken as -log p(y|x). The record holds the knobs, each ingredient's
  held-out accuracy and loss (from the Fisher pass), and the cost.
  """
  if not ingredients:
    raise ValueError("the Fisher merge of no ingredients is undefined")
  scores = []

  def add(running, index, params):
    fisher, score = heldout_fisher(model, loss_fn, params, batches, abstract, examples_per_step)
    running.add(fisher, params)
    scores.append({"name": ingredients[index].name, **score})
    return running

  running = averaging.fold(ingredients, restore, add, FisherWeightedSum(abstract, fisher_floor),
                           ahead)
  record = {"fisher_floor": fisher_floor, "examples_per_step": examples_per_step,
            "log_likelihood": "-loss_fn(logits, labels): empirical Fisher at the true labels",
            "ingredients": scores, "checkpoint_reads": len(ingredients),
            "heldout_passes": len(ingredients), "heldout_backward_passes": len(ingredients)}
  return running.mean(), record
