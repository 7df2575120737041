"""The FLOPs of a ViT training step, counted from its shapes (the benchmarks' yardstick)."""

from train import vit


def model_flops(variant, image_size, channels, num_classes, batch_size):
  """FLOPs (2 per multiply-add) of one training step: matmuls, patch embedding and attention."""
  v = vit.decode_variant(variant)
  patch, width = v["patch_size"][0], v["width"]
  tokens = (image_size // patch) ** 2
  embed = 2 * tokens * patch * patch * channels * width
  block = (2 * tokens * width * (4 * width + 2 * v["mlp_dim"])  # q, k, v, out; MLP.
           + 4 * tokens * tokens * width)  # Scores and their average of the values.
  forward = embed + v["depth"] * block + 2 * width * num_classes
  return batch_size * (3 * forward - embed)  # Backward is 2x forward; images need no gradient.
