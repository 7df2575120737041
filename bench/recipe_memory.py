r"""Per-device memory of every soup recipe's step, from XLA's compiled memory analysis.

Nothing is read or run: each recipe's jitted step (the one whose live
arrays bound the recipe's peak) is lowered and compiled for a ViT's
parameter tree as ShapeDtypeStructs, sharded as the soup step shards them
over --devices fake CPU devices, and its per-device bytes (arguments +
outputs - donated + temporaries) are reported in units of one model's
float32 share (model bytes / devices). The streaming recipes' steps take one
ingredient whatever N; the learned soup's stacked step takes all N, its
block step `--block_size`: both are compiled for each of --counts.

  python -m bench.recipe_memory --variant=S/16 --res=224 --classes=1000 \
      --counts=4,12,36 --out=bench/results/recipe_memory.json
"""

import os
import sys

if "jax" not in sys.modules:  # Fake devices must be asked for before JAX starts.
  _devices = next((a.split("=")[1] for a in sys.argv if a.startswith("--devices=")), "8")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={_devices}").strip()

# isort: split

from train import tf_setup  # noqa: E402,F401  First: TensorFlow loads without its C++ lines.

# isort: split

from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from soups import averaging  # noqa: E402
from soups import fisher  # noqa: E402
from soups import learned  # noqa: E402
from soups import regmean  # noqa: E402
from soups import restore as restore_lib  # noqa: E402
from soups import task_vectors  # noqa: E402
from train import command  # noqa: E402
from train import files  # noqa: E402
from train import losses  # noqa: E402
from train import sharding  # noqa: E402
from train import vit  # noqa: E402

_VARIANT = flags.DEFINE_string("variant", "S/16", "The ViT variant (train/vit.py).")
_RES = flags.DEFINE_integer("res", 224, "Image resolution.")
_CLASSES = flags.DEFINE_integer("classes", 1000, "Classes of the head.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Fake CPU devices the soup is sharded over.")
_BATCH = flags.DEFINE_integer("batch", 64, "Global held-out batch (learned, fisher, regmean).")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", 4, "learned_blocks' ingredients at a time.")
_COUNTS = flags.DEFINE_list("counts", ["4", "12", "36"], "Numbers of ingredients N.")
_OUT = flags.DEFINE_string("out", "", "Also write the table as JSON here.")


def per_device_bytes(memory):
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes
          - memory.alias_size_in_bytes + memory.temp_size_in_bytes)


def _setup():
  """(model, abstract params sharded as the soup shards them, an abstract held-out batch)."""
  mesh = sharding.make_mesh((("data", -1),))
  model = vit.build_model(ml_collections.ConfigDict(
      {"variant": _VARIANT.value, "pool_type": "gap", "dropout": 0.0, "dtype": "float32",
       "ssf": False}), _CLASSES.value)
  image = jax.ShapeDtypeStruct((1, _RES.value, _RES.value, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x)["params"], image)
  abstract = sharding.placed_abstract_tree(mesh, shapes, restore_lib.SOUP_SHARDING)
  batch_sharding = sharding.batch_sharding(mesh)
  batch = {"image": ((_BATCH.value, _RES.value, _RES.value, 3), jnp.float32),
           "labels": ((_BATCH.value, _CLASSES.value), jnp.float32),
           "mask": ((_BATCH.value,), jnp.float32)}
  batch = {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sharding) for k, (s, d) in batch.items()}
  return model, abstract, batch


def _learned_steps(model, abstract, batch, n):
  """{'learned (stacked)': bytes, 'learned_blocks': bytes} of one held-out step with N = n."""
  loss_fn = losses.softmax_xent
  mesh = jax.tree.leaves(abstract)[0].sharding.mesh
  stacked = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      (n, *a.shape), a.dtype, sharding=NamedSharding(mesh, P(None, *a.sharding.spec))), abstract)
  stacked_step = jax.jit(jax.value_and_grad(
      lambda s, logits, b: learned.stacked_loss(model, loss_fn, s, logits, b), argnums=1))
  logits = jax.ShapeDtypeStruct((n,), jnp.float32)
  steps = learned.BlockSteps(model, loss_fn, abstract, learning_rate=0.1)
  block_logits, opt_state = steps.init(n, abstract, "global")
  soup = fisher.float32_abstract(abstract)
  block = tuple(abstract for _ in range(min(_BLOCK_SIZE.value, n)))
  return {
      "learned (stacked)": per_device_bytes(
          stacked_step.lower(stacked, logits, batch).compile().memory_analysis()),
      "learned_blocks": per_device_bytes(steps.step.lower(
          block_logits, opt_state, soup, block, np.arange(len(block)), batch
      ).compile().memory_analysis()),
  }


def measure():
  """{step: {N or 'any': per-device bytes}} and the model's share in bytes per device."""
  model, abstract, batch = _setup()
  share = sum(a.size * 4 for a in jax.tree.leaves(abstract)) / _DEVICES.value
  table = {"uniform (add)": {"any": per_device_bytes(
      averaging.RunningSum(abstract).add_memory_analysis(abstract))}}
  for name, memory in task_vectors.per_ingredient_memory(abstract).items():
    table[name] = {"any": per_device_bytes(memory)}
  table["fisher (batch)"] = {"any": per_device_bytes(fisher.fisher_step_memory_analysis(
      model, losses.softmax_xent, abstract, batch))}
  grams = regmean.gram_abstract(model, abstract, batch)
  table["regmean (grams, batch)"] = {"any": per_device_bytes(regmean.gram_step_memory_analysis(
      model, losses.softmax_xent, abstract, grams, batch))}
  for n in map(int, _COUNTS.value):
    for name, value in _learned_steps(model, abstract, batch, n).items():
      table.setdefault(name, {})[str(n)] = value
  return table, share


def main(argv):
  del argv
  table, share = measure()
  counts = ["any"] + _COUNTS.value
  print(f"ViT-{_VARIANT.value} at {_RES.value}px, {_CLASSES.value} classes, "
        f"{_DEVICES.value} devices, held-out batch {_BATCH.value}: one model's float32 share "
        f"is {share / 2**20:.1f} MiB per device")
  print("| step | " + " | ".join(f"N={c}" if c != "any" else "any N" for c in counts) + " |")
  print("|---|" + "---|" * len(counts))
  for name, row in table.items():
    cells = [f"{row[c] / share:.1f}×" if c in row else "" for c in counts]
    print(f"| {name} | " + " | ".join(cells) + " |")
  if _OUT.value:
    files.write_json_atomic(_OUT.value, {"variant": _VARIANT.value, "res": _RES.value,
                                         "classes": _CLASSES.value, "devices": _DEVICES.value,
                                         "batch": _BATCH.value, "share_bytes": share,
                                         "per_device_bytes": table})


if __name__ == "__main__":
  command.run(main)
