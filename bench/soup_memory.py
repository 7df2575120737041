r"""Soup step memory and speed for N ingredients, against a plain numpy loop and the disk.

For each N, in fresh subprocesses (so peak RSS is per measurement):
  stockpot   `soups.averaging.average` over N `.npz` ingredients, restored one
             at a time into a float32 running sum sharded over the devices;
  numpy      the paper's loop: load each checkpoint fully on the host, add it
             to a float32 sum, divide;
  raw read   reading the same files' bytes, the disk's (or page cache's) bandwidth.
Reports wall time, peak RSS, and stockpot's read rate as a fraction of the raw
read. Peak RSS flat in N is the claim under test.

  python -m bench.soup_memory --variant=S/16 --counts=2,8,32 --out=bench/results/soup_memory.json
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

_VARIANT = flags.DEFINE_string("variant", "S/16", "ViT variant whose parameter shapes the ingredients have.")
_COUNTS = flags.DEFINE_list("counts", ["2", "8", "32"], "Numbers of ingredients.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Fake CPU devices for the sharded soup.")
_OUT = flags.DEFINE_string("out", "", "Where to write the JSON results.")
_WORKER = flags.DEFINE_string("worker", "", "Internal: run one measurement ('stockpot', 'numpy', 'raw').")
_DIR = flags.DEFINE_string("dir", "", "Internal: the ingredient directory.")


def _shapes(variant):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from train import trees  # pylint: disable=g-import-not-at-top
  from train import vit  # pylint: disable=g-import-not-at-top
  model = vit.build_model(ml_collections.ConfigDict(
      dict(variant=variant, pool_type="tok", dropout=0.0, dtype="float32")), 1000)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  return {k: v.shape for k, v in trees.flatten(abstract["params"]).items()}


def _write_ingredients(directory, count, shapes):
  from train import pretrained  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  base = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  for i in range(count):
    path = os.path.join(directory, f"ingredient{i:03d}.npz")
    if not os.path.exists(path):
      pretrained.save_npz(path, {k: v + np.float32(0.01 * i) for k, v in base.items()})
  return sorted(os.path.join(directory, f) for f in os.listdir(directory))[:count]


def _worker(kind, paths):
  start = time.perf_counter()
  if kind == "raw":
    for path in paths:
      with open(path, "rb") as f:
        while f.read(1 << 24):
          pass
  elif kind == "numpy":
    total = None
    for path in paths:
      with np.load(path) as npz:
        weights = {k: npz[k] for k in npz.files}  # The whole checkpoint on the host.
      total = weights if total is None else {k: total[k] + weights[k] for k in total}
    for value in total.values():
      value /= len(paths)  # The mean, in place, as the paper's loop computes it.
  else:
    import jax  # pylint: disable=g-import-not-at-top
    from soups import averaging  # pylint: disable=g-import-not-at-top
    from soups import ingredients as ingredients_lib  # pylint: disable=g-import-not-at-top
    from soups import soup_step  # pylint: disable=g-import-not-at-top
    from train import sharding  # pylint: disable=g-import-not-at-top
    ingredients = ingredients_lib.from_paths(paths, "params")
    mesh = sharding.make_mesh((("data", -1),))
    abstract = ingredients_lib.abstract_params(
        ingredients_lib.check_compatible(ingredients),
        lambda tree: sharding.tree_shardings(mesh, tree, soup_step.SOUP_SHARDING))
    start = time.perf_counter()  # Imports and compilation setup excluded, as for the peers.
    soup = averaging.average(ingredients, lambda i: ingredients_lib.restore(i, abstract), abstract)
    jax.block_until_ready(soup)
  seconds = time.perf_counter() - start
  print(json.dumps({"seconds": seconds,
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _measure(kind, directory, count):
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={_DEVICES.value}",
         "TF_CPP_MIN_LOG_LEVEL": "2"}
  proc = subprocess.run(
      [sys.executable, "-m", "bench.soup_memory", f"--worker={kind}", f"--dir={directory}",
       f"--counts={count}"], env=env, capture_output=True, text=True, check=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if _WORKER.value:
    count = int(_COUNTS.value[0])
    paths = sorted(os.path.join(_DIR.value, f) for f in os.listdir(_DIR.value))[:count]
    _worker(_WORKER.value, paths)
    return
  shapes = _shapes(_VARIANT.value)
  model_mb = sum(int(np.prod(s)) for s in shapes.values()) * 4 / 2**20
  rows = []
  with tempfile.TemporaryDirectory(prefix="soup_bench_") as directory:
    for count in map(int, _COUNTS.value):
      paths = _write_ingredients(directory, count, shapes)
      row = {"n": count, "bytes": sum(os.path.getsize(p) for p in paths)}
      for kind in ("raw", "numpy", "stockpot"):
        row[kind] = _measure(kind, directory, count)
      row["stockpot_fraction_of_raw_read"] = row["raw"]["seconds"] / row["stockpot"]["seconds"]
      rows.append(row)
  print(f"{_VARIANT.value}: {model_mb:,.0f} MB of float32 weights per ingredient; "
        f"stockpot on {_DEVICES.value} CPU devices")
  print(f"{'N':>3} {'raw read s':>10} {'numpy s':>8} {'stockpot s':>10} {'÷ raw':>6} "
        f"{'numpy RSS MB':>12} {'stockpot RSS MB':>15}")
  for r in rows:
    print(f"{r['n']:>3} {r['raw']['seconds']:>10.2f} {r['numpy']['seconds']:>8.2f} "
          f"{r['stockpot']['seconds']:>10.2f} {r['stockpot_fraction_of_raw_read']:>6.0%} "
          f"{r['numpy']['peak_rss_mb']:>12,.0f} {r['stockpot']['peak_rss_mb']:>15,.0f}")
  if _OUT.value:
    from train import files  # pylint: disable=g-import-not-at-top
    files.write_json_atomic(_OUT.value, {"variant": _VARIANT.value, "model_mb": model_mb,
                                         "devices": _DEVICES.value, "rows": rows})


if __name__ == "__main__":
  app.run(main)
