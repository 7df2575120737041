"""RegMean: merging by regression on each layer's inputs.

Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language
Models", ICLR 2023. For a linear layer y = x W, the kernel whose outputs are
closest to every ingredient's own on its own inputs,
min_W Σ_i ||X_i W - X_i W_i||², is

  W = (Σ_i G_i)⁻¹ Σ_i G_i W_i,   G_i = X_iᵀ X_i,

with X_i ingredient i's inputs to that layer on the held-out split. As the
paper does, each Gram is regularised by shrinking its off-diagonal entries,
G̃ = α G + (1 - α) diag(G) (α = 0.9 by default). Every Dense and DenseGeneral
kernel of the model is merged this way (the ViT's attention query, key, value
and out, both MLP layers and the head; with SSF too); biases and every other
leaf are the uniform mean. A DenseGeneral's contracted input axes and its
output axes are flattened, so its kernel is a [d_in, d_out] matrix.

Inputs are caught with flax's `nn.intercept_methods` in one jitted forward
per held-out batch, which also scores the ingredient. Streaming, one
ingredient at a time: its held-out pass accumulates its Grams (padding rows
masked out); then G̃_i W_i and G̃_i are added to running sums per kernel and
the ingredient to a uniform running sum. Memory per device, whatever N: the
Grams and their sums (each about 2x the model for a ViT, most of it the MLP's
[mlp_dim, mlp_dim]), the product sums, the uniform sum and two ingredients,
all over the devices; plus about one layer's Gram whole: a device's partial
sum of a batch's Gram before it is reduced over the devices, and the Gram or
kernel gathered while that layer's product is added (one kernel at a time).

The solve uses a Cholesky factorisation: for α < 1, Σ_i G̃_i is positive
definite once every input dimension has a non-zero diagonal. An input
dimension that no held-out example of any ingredient reaches (a zero row and
column) leaves its kernel row undetermined by the data; that row is the
uniform mean, and the record counts such dimensions per kernel.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from soups import averaging
from soups import fisher
from soups import restore as restore_lib
from train import accuracy
from train import errors
from train import sharding
from train import trees

DEFAULT_ALPHA = 0.9
HIGHEST = jax.lax.Precision.HIGHEST  # f32 Grams and products also on TPUs.


def _contracted_axes(module, ndim):
  """The input axes a Dense/DenseGeneral contracts with its kernel, in the kernel's order."""
  if isinstance(module, nn.Dense):
    return (ndim - 1,)
  if module.batch_dims:
    raise ValueError(f"DenseGeneral {'/'.join(module.path)} has batch_dims: RegMean merges "
                     "kernels shared by every row only")
  axes = module.axis if isinstance(module.axis, tuple) else (module.axis,)
  return tuple(a % ndim for a in axes)


def _input_gram(module, inputs, mask):
  """Σ over the unmasked rows of x xᵀ, x a row of `inputs` flattened to d_in, in float32.

  The leading axis of `inputs` is the batch row that `mask` masks; every
  other axis that the layer does not contract (tokens, say) counts as rows too.
  """
  axes = _contracted_axes(module, inputs.ndim)
  if 0 in axes or inputs.shape[0] != mask.shape[0]:
    raise ValueError(f"{'/'.join(module.path)}: its input {inputs.shape} does not lead with "
                     f"the batch of {mask.shape[0]} rows")
  kept = inputs.ndim - len(axes)
  x = jnp.moveaxis(inputs, axes, tuple(range(kept, inputs.ndim)))
  rows = x.reshape(-1, math.prod(x.shape[kept:])).astype(jnp.float32)
  weights = jnp.broadcast_to(mask.reshape(-1, *[1] * (kept - 1)), x.shape[:kept]).reshape(-1)
  return jnp.matmul((rows * weights[:, None]).T, rows, precision=HIGHEST)


def forward_with_grams(model, params, images, mask):
  """(logits, {kernel path: masked Gram of that Dense layer's inputs}) in one forward."""
  grams = {}

  def capture(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.DenseGeneral)):
      path = "/".join(module.path) + "/kernel"
      gram = _input_gram(module, args[0] if args else kwargs["inputs"], mask)
      grams[path] = grams[path] + gram if path in grams else gram  # A layer used twice.
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(capture):
    logits = model.apply({"params": params}, images)
  return logits, grams


@functools.lru_cache(maxsize=8)
def _gram_step(model, loss_fn, treedef, shardings):
  """Jitted: (Grams, params, batch) -> (Grams + this batch's, the batch's accuracy sums)."""

  def step(grams, params, batch):
    mask = batch["mask"].astype(jnp.float32)
    logits, batch_grams = forward_with_grams(model, params, batch["image"], mask)
    return (jax.tree.map(jnp.add, grams, batch_grams),
            accuracy.masked_sums(logits, batch["labels"], mask, loss_fn))

  return jax.jit(step, donate_argnums=(0,), out_shardings=(
      jax.tree.unflatten(treedef, shardings), sharding.replicated(shardings[0].mesh)))


def gram_abstract(model, abstract, batch):
  """{kernel path: [d_in, d_in] float32 ShapeDtypeStruct} of every Dense layer `model` applies.

  Each Gram is sharded as the soup shards its leaves; a Dense layer whose
  kernel is not a leaf of `abstract` is an error naming it.
  """
  shapes = jax.eval_shape(lambda p, b: forward_with_grams(
      model, p, b["image"], b["mask"].astype(jnp.float32))[1], abstract, batch)
  known = trees.flatten(abstract)
  for path in shapes:
    if path not in known:
      raise ValueError(f"Dense layer kernel {path!r} is not a parameter of the ingredients")
  mesh = jax.tree.leaves(abstract)[0].sharding.mesh
  return sharding.placed_abstract_tree(mesh, shapes, restore_lib.SOUP_SHARDING)


def _gram_step_for(model, loss_fn, grams_abstract):
  leaves, treedef = jax.tree.flatten(grams_abstract)
  return _gram_step(model, loss_fn, treedef, tuple(a.sharding for a in leaves))


def heldout_grams(model, loss_fn, params, batches, grams_abstract):
  """(Σ over the held-out rows of each Dense layer's x xᵀ, sharded as `grams_abstract`; scores)."""
  step = _gram_step_for(model, loss_fn, grams_abstract)
  return fisher.statistics_pass(step, averaging.zeros(grams_abstract), params, batches)


def gram_step_memory_analysis(model, loss_fn, abstract, grams_abstract, batch):
  """XLA's compiled memory analysis of one held-out batch's Gram step (per device)."""
  return _gram_step_for(model, loss_fn, grams_abstract).lower(
      grams_abstract, abstract, batch).compile().memory_analysis()


def _regularised(gram, alpha):
  """α G + (1 - α) diag(G): the paper's shrinkage of the off-diagonal entries."""
  return alpha * gram + (1 - alpha) * jnp.diag(jnp.diagonal(gram))


@functools.lru_cache(maxsize=64)
def _add_step(gram_sharding, kernel_sharding):
  """Jitted, for one kernel: (Σ G̃, Σ G̃ W, G, W, α) -> (Σ G̃ + G̃, Σ G̃ W + G̃ W).

  One kernel at a time: the product gathers a Gram or a kernel whole, so
  memory holds one layer's, not the model's.
  """

  def add(gram_sum, product_sum, gram, kernel, alpha):
    regularised = _regularised(gram, alpha)
    product = jnp.matmul(regularised, kernel.astype(jnp.float32).reshape(gram.shape[0], -1),
                         precision=HIGHEST)
    return gram_sum + regularised, product_sum + product.reshape(kernel.shape)

  return jax.jit(add, donate_argnums=(0, 1), out_shardings=(gram_sharding, kernel_sharding))


@functools.lru_cache(maxsize=64)
def _solver(kernel_sharding, dtype):
  """Jitted: (Σ G̃, Σ G̃ W, uniform mean kernel) -> (merged kernel, input dims without inputs)."""

  def solve(gram, product, mean):
    unseen = jnp.diagonal(gram) == 0  # Zero rows and columns: no input reaches these dims.
    gram = jnp.where(jnp.diag(unseen), 1.0, gram)
    product = product.reshape(gram.shape[0], -1)
    product = jnp.where(unseen[:, None], mean.reshape(product.shape).astype(jnp.float32),
                        product)
    with jax.default_matmul_precision("highest"):
      kernel = jax.scipy.linalg.solve(gram, product, assume_a="pos")
    return kernel.reshape(mean.shape).astype(dtype), jnp.sum(unseen)

  return jax.jit(solve, out_shardings=(
      kernel_sharding, sharding.replicated(kernel_sharding.mesh)))


class RegMeanSums:
  """The streamed state of a RegMean merge: per Dense kernel, Σ_i G̃_i and Σ_i G̃_i W_i in
  float32, sharded as its Gram and its kernel; and the uniform sum of every leaf."""

  def __init__(self, abstract, grams_abstract, alpha=DEFAULT_ALPHA):
    if not 0 <= alpha < 1:
      raise errors.UserError(
          f"alpha={alpha}: must be in [0, 1); alpha=1 (no regularisation) leaves "
          "Σ G singular whenever a layer's inputs span fewer than d_in directions")
    self.alpha = alpha
    flat = trees.flatten(abstract)
    self.kernels = sorted(grams_abstract)
    self.kernels_abstract = {path: flat[path] for path in self.kernels}
    self.grams_abstract = grams_abstract
    self.gram_sums = averaging.zeros(grams_abstract)
    self.product_sums = averaging.zeros(self.kernels_abstract)
    self.uniform = averaging.RunningSum(abstract)

  def _step(self, path):
    return _add_step(self.grams_abstract[path].sharding, self.kernels_abstract[path].sharding)

  def add(self, grams, params):
    """Adds one ingredient: its held-out Grams and its (nested) parameters."""
    flat = trees.flatten(params)
    for path in self.kernels:
      self.gram_sums[path], self.product_sums[path] = self._step(path)(
          self.gram_sums[path], self.product_sums[path], grams[path], flat[path],
          jnp.float32(self.alpha))
    self.uniform.add(params)

  def block_until_ready(self):
    """Waits for the adds in flight (`jax.block_until_ready` calls it on a streamed state)."""
    jax.block_until_ready((self.gram_sums, self.product_sums, self.uniform.total))
    return self

  def merge(self):
    """The merged parameters: the uniform mean of every leaf, each Dense kernel solved;
    and the counts of input dimensions per kernel that no held-out input reached (if any)."""
    flat = trees.flatten(self.uniform.mean())
    unseen = {}
    for path in self.kernels:
      solve = _solver(self.kernels_abstract[path].sharding,
                      np.dtype(self.kernels_abstract[path].dtype))
      flat[path], count = solve(self.gram_sums[path], self.product_sums[path], flat[path])
      if int(count):
        unseen[path] = int(count)
    return trees.unflatten(flat), unseen

  def add_memory_analysis(self, path):
    """XLA's compiled memory analysis of the add step of kernel `path` (per device)."""
    gram, kernel = self.grams_abstract[path], self.kernels_abstract[path]
    return self._step(path).lower(gram, fisher.float32_abstract(kernel), gram, kernel,
                                  jnp.float32(self.alpha)).compile().memory_analysis()


def regmean(ingredients, restore, abstract, model, loss_fn, batches, alpha=DEFAULT_ALPHA,
            ahead=1):
  """The RegMean merge of `ingredients`: returns (params sharded like `abstract`, record).

  `batches()`: the held-out split as padded global batches {'image', 'labels',
  'mask'}; its first batch fixes the Gram shapes (read, not a pass).
  `loss_fn` only scores each ingredient's forward. The record holds alpha,
  the merged kernel paths, the input dimensions that fell back to the mean,
  each ingredient's held-out accuracy and loss (from its Gram pass), and the cost.
  """
  if not ingredients:
    raise ValueError("the RegMean merge of no ingredients is undefined")
  grams_abstract = gram_abstract(model, abstract, next(iter(batches())))
  scores = []

  def add(sums, index, params):
    grams, score = heldout_grams(model, loss_fn, params, batches, grams_abstract)
    sums.add(grams, params)
    scores.append({"name": ingredients[index].name, **score})
    return sums

  sums = averaging.fold(ingredients, restore, add,
                        RegMeanSums(abstract, grams_abstract, alpha), ahead)
  params, unseen = sums.merge()
  record = {"alpha": alpha, "merged_kernels": sums.kernels, "input_dims_without_inputs": unseen,
            "ingredients": scores, "checkpoint_reads": len(ingredients),
            "heldout_passes": len(ingredients)}
  return params, record
