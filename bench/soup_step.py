r"""Soup step speed and memory for N ingredients, against the disk and a plain numpy loop.

For each ingredient format (.npz, orbax), page-cache state (cold, warm) and
N, four measurements, each in a fresh subprocess (so peak RSS is its own):
  raw read   read the ingredients' files, 16 MiB at a time: the bandwidth of
             the disk (cold) or of the page cache (warm) in this same run;
  numpy      the paper's loop: load each checkpoint whole on the host
             (`np.load`; orbax restored to numpy), add it to a float32 sum,
             divide;
  stockpot   the soup step's averaging: `ingredients.check_compatible` (the
             metadata check), then `averaging.average` into a float32 sum
             sharded over --devices CPU devices; the first soup of a model,
             its persistent compilation cache (train/startup.py) empty;
  cached     the same, a later soup: its compiles are in the cache.
Reported: wall time (the median of --repeats interleaved runs), peak RSS
(their largest), and each loop's read rate as a fraction of the raw read's
(bytes are the same files', so the fraction is raw s / loop s). Wall time
excludes imports and the mesh; stockpot's includes its metadata check (also
shown alone, "check") and its XLA compiles.

Ingredients are written as runs write them: `.npz` with
`train.pretrained.save_npz` (a run's `final/<weights>.npz`), orbax with
`train.checkpoint.save` into a run directory (`checkpoints/1/params`,
replicated as the trainer's default `param_sharding` saves it; only the
`params` item, the one read), given to the soup step as that orbax item
(`ingredients.Ingredient`). Every ingredient is the same random normal
ViT-`--variant` plus its own offset: like trained weights, their mantissas
barely compress (orbax's zstd saves ~7%).

Cold cache: `sync` then `echo 3 > /proc/sys/vm/drop_caches` (root only);
without root, `posix_fadvise(DONTNEED)` on every ingredient file, which
evicts their clean pages. Each worker drops the cache itself, once its
imports are done, right before its clock starts, so every kind starts
reading in the same state (see `_worker`). The method used is printed and
recorded. This empties the guest's page cache only: on a virtual machine
the host may still cache the disk. Warm cache: the files are read once,
untimed, first. The 1-minute load average is printed before and after: on a
shared machine, compare rows of one run, not runs.

  python -m bench.soup_step --variant=S/16 --counts=2,8,32 --repeats=3 \
      --data_dir=/tmp/soup_bench --out=bench/results/soup_step.json
"""

import importlib
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

from train import command
from train import run_dir

FORMATS = ("npz", "orbax")
CACHES = ("cold", "warm")
KINDS = ("raw", "numpy", "stockpot", "cached")
SOUPS = ("stockpot", "cached")  # The kinds that run stockpot's soup step.

_VARIANT = flags.DEFINE_string("variant", "S/16",
                               "ViT variant whose parameter shapes the ingredients have.")
_COUNTS = flags.DEFINE_list("counts", ["2", "8", "32"], "Numbers of ingredients.")
_FORMATS = flags.DEFINE_list("formats", list(FORMATS), f"Ingredient formats, of {FORMATS}.")
_CACHES = flags.DEFINE_list("caches", list(CACHES), f"Page-cache states, of {CACHES}.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Fake CPU devices for the sharded soup.")
_REPEATS = flags.DEFINE_integer(
    "repeats", 1, "Measurements of each kind per row, interleaved; the median time is "
    "reported, and the largest peak RSS.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "", "Where the ingredients are written (and reused by a later run: empty it "
    "when runs change how they write files); default: a temporary directory, deleted at the end.")
_OUT = flags.DEFINE_string("out", "", "Where to write the JSON results.")
_WORKER = flags.DEFINE_string("worker", "",
                              f"Internal: run one measurement, of {', '.join(KINDS)}.")
_FORMAT = flags.DEFINE_string("format", "npz", "Internal: the worker's ingredient format.")
_DROP = flags.DEFINE_enum(
    "drop_cache", "", ["", "drop_caches", "fadvise"], "Internal: how the worker empties the "
    "page cache of its files as its clock starts (a cold row); empty for a warm row.")

DROP_CACHES = "/proc/sys/vm/drop_caches"


def _shapes(variant):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top

  from train import trees  # pylint: disable=g-import-not-at-top
  from train import vit  # pylint: disable=g-import-not-at-top
  model = vit.build_model(ml_collections.ConfigDict(dict(
      variant=variant, pool_type="tok", dropout=0.0, dtype="float32", ssf=False)), 1000)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  return {k: v.shape for k, v in trees.flatten(abstract["params"]).items()}


def _ingredient_paths(directory, fmt, count):
  """Ingredient i: `<dir>/npz/ingredientNNN.npz` or the run directory `<dir>/orbax/runNNN`."""
  if fmt == "npz":
    return [os.path.join(directory, "npz", f"ingredient{i:03d}.npz") for i in range(count)]
  return [run_dir.checkpoint_item(_orbax_run(directory, i), 1, "params") for i in range(count)]


def _orbax_run(directory, index):
  """The run directory whose checkpoint 1 holds orbax ingredient `index`."""
  return os.path.join(directory, "orbax", f"run{index:03d}")


def _files(path):
  """The files a soup reads for one ingredient: the .npz, or those of the orbax item."""
  if path.endswith(".npz"):
    return [path]
  return sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names)


def _write_ingredients(directory, fmt, count, shapes):
  """Writes the missing ones of `count` ingredients, as runs write them."""
  import jax  # pylint: disable=g-import-not-at-top

  from train import checkpoint  # pylint: disable=g-import-not-at-top
  from train import pretrained  # pylint: disable=g-import-not-at-top
  from train import sharding  # pylint: disable=g-import-not-at-top
  from train import trees  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  base = None
  for i, path in enumerate(_ingredient_paths(directory, fmt, count)):
    if os.path.exists(path):  # orbax renames a checkpoint in when it is complete.
      continue
    if base is None:
      base = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    weights = {k: v + np.float32(0.01 * i) for k, v in base.items()}
    if fmt == "npz":
      pretrained.save_npz(path, weights)
      continue
    mesh = sharding.make_mesh((("data", -1),))
    params = jax.device_put(trees.unflatten(weights), sharding.replicated(mesh))
    manager = checkpoint.make_manager(_orbax_run(directory, i))
    checkpoint.save(manager, 1, {"params": params}, force=True)
    checkpoint.wait_until_written(manager)
    manager.close()
  subprocess.run(["sync"], check=True)  # Dirty pages would survive a cache drop.


def _cache_drop_method():
  """'drop_caches' when this process may write it, else 'fadvise' (per-file eviction)."""
  try:
    with open(DROP_CACHES, "w") as f:
      f.write("3\n")
    return "drop_caches"
  except OSError:
    return "fadvise"


def _drop_cache(method, files):
  subprocess.run(["sync"], check=True)
  if method == "drop_caches":
    with open(DROP_CACHES, "w") as f:
      f.write("3\n")
    return
  for path in files:
    fd = os.open(path, os.O_RDONLY)
    try:
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def _read_files(files):
  buffer = bytearray(1 << 24)
  for path in files:
    with open(path, "rb", buffering=0) as f:
      while f.readinto(buffer):
        pass


def _numpy_loop(fmt, paths):
  """The paper's loop: each checkpoint whole on the host, summed in float32, divided."""
  total = None
  for path in paths:
    if fmt == "npz":
      with np.load(path) as npz:
        weights = {k: npz[k] for k in npz.files}
    else:
      weights = _orbax_to_numpy(path)
    total = weights if total is None else {k: total[k] + weights[k] for k in total}
  for value in total.values():
    value /= len(paths)  # The mean, in place, as the paper's loop computes it.
  return total


def _orbax_to_numpy(item):
  """An orbax item, every array whole in host memory (orbax's public API)."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  from train import checkpoint  # pylint: disable=g-import-not-at-top
  from train import trees  # pylint: disable=g-import-not-at-top
  meta = checkpoint.item_metadata(item)
  restore_args = jax.tree.map(
      lambda m: ocp.RestoreArgs(restore_type=np.ndarray, dtype=m.dtype), meta)
  tree = ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(
      item=jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta),
      restore_args=restore_args))
  return dict(trees.flatten(tree))


def _stockpot(paths, start_clock):
  """The soup step's averaging, from the metadata check to the mean on the devices.

  `start_clock()` is called once set up, and returns the start time. Returns
  (start, seconds the metadata check took).
  """
  import jax  # pylint: disable=g-import-not-at-top

  from soups import averaging  # pylint: disable=g-import-not-at-top
  from soups import ingredients as ingredients_lib  # pylint: disable=g-import-not-at-top
  from soups import restore as restore_lib  # pylint: disable=g-import-not-at-top
  from train import sharding  # pylint: disable=g-import-not-at-top
  from train import startup  # pylint: disable=g-import-not-at-top
  startup.init()  # As `python -m soups` starts; the compile cache directory is _measure's.
  mesh = sharding.make_mesh((("data", -1),))
  start = start_clock()
  ingredients = [ingredients_lib.Ingredient(f"ingredient{i:03d}", p) for i, p in enumerate(paths)]
  abstract = restore_lib.target_abstract(ingredients_lib.check_compatible(ingredients), mesh)
  checked = time.perf_counter()
  soup = averaging.average(ingredients, lambda i: restore_lib.restore(i, abstract), abstract)
  jax.block_until_ready(soup)
  return start, checked - start


def _peak_rss_mb():
  """This process's peak RSS since it started: Linux's VmHWM.

  Not `getrusage`'s ru_maxrss there: Linux carries it over fork and exec, so a
  worker would report the bench process's own peak (it grows writing the
  ingredients) whenever that is the larger. Elsewhere, ru_maxrss (kilobytes;
  bytes on macOS).
  """
  try:
    with open("/proc/self/status") as f:
      return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
  except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _worker(kind, fmt, paths, drop_method):
  files, out = [f for p in paths for f in _files(p)], {}

  def start_clock():
    """Set up and imports done: empties the page cache (a cold row) and starts the clock.

    Here, not before the process starts: on a VM whose guest reports free
    memory to its host (virtio-balloon free page reporting, as here), memory
    freed by the drop costs more to refill the longer it has been free, and
    a worker that imports JAX first (2-3 s) would read in a slower state than
    one that does not (a raw read right after a drop: 2.0 s; 10 s later: 3.7 s).
    """
    if drop_method:
      _drop_cache(drop_method, files)
    return time.perf_counter()

  if kind == "raw":
    start = start_clock()
    _read_files(files)
  elif kind == "numpy":
    if fmt == "orbax":  # Imports outside the clock, as for stockpot.
      importlib.import_module("orbax.checkpoint")
    start = start_clock()
    _numpy_loop(fmt, paths)
  else:  # As the soup CLI, for both soup kinds.
    start, out["check_seconds"] = _stockpot(paths, start_clock)
  out["seconds"] = time.perf_counter() - start
  out["peak_rss_mb"] = _peak_rss_mb()
  print(json.dumps(out))


def _measure(kind, fmt, directory, count, compile_cache_dir, drop_method=""):
  """One measurement in a fresh process; the soup kinds compile-cache into `compile_cache_dir`.

  `drop_method`: how the worker empties the page cache as its clock starts
  (a cold row); '' leaves it as it is (a warm row).
  """
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={_DEVICES.value}",
         "TF_CPP_MIN_LOG_LEVEL": "2"}
  with tempfile.TemporaryDirectory(prefix="soup_bench_xla_") as empty_cache:
    if kind in SOUPS:
      env["JAX_COMPILATION_CACHE_DIR"] = compile_cache_dir if kind == "cached" else empty_cache
    proc = subprocess.run(
        [sys.executable, "-m", "bench.soup_step", f"--worker={kind}", f"--format={fmt}",
         f"--data_dir={directory}", f"--counts={count}", f"--drop_cache={drop_method}"],
        env=env, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"{kind} worker ({fmt}, N={count}) failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _run(directory, shapes, compile_cache_dir):
  method = _cache_drop_method() if "cold" in _CACHES.value else None
  if method == "fadvise":
    print(f"cold cache: cannot write {DROP_CACHES} (not root); evicting the ingredient files "
          "with posix_fadvise(DONTNEED) instead", flush=True)
  rows = []
  counts = list(map(int, _COUNTS.value))
  for fmt in _FORMATS.value:
    # Fills the compile cache for the "cached" kind, once per format: the compiles do not
    # depend on N (the soup's weight is an argument), so the fewest ingredients will do.
    _write_ingredients(directory, fmt, min(counts), shapes)
    _measure("cached", fmt, directory, min(counts), compile_cache_dir)
    for count in counts:
      _write_ingredients(directory, fmt, count, shapes)
      paths = _ingredient_paths(directory, fmt, count)
      files = [f for p in paths for f in _files(p)]
      for cache in _CACHES.value:
        row = {"format": fmt, "cache": cache, "n": count,
               "bytes": sum(os.path.getsize(f) for f in files)}
        runs = {kind: [] for kind in KINDS}
        for repeat in range(_REPEATS.value):
          # Interleaved, each repeat in a rotated order: a change of load, or of the disk's
          # pace after a long read, hits every kind.
          for kind in KINDS[repeat % len(KINDS):] + KINDS[:repeat % len(KINDS)]:
            if cache == "warm":
              _read_files(files)
            runs[kind].append(_measure(kind, fmt, directory, count, compile_cache_dir,
                                       method if cache == "cold" else ""))
        for kind, measured in runs.items():
          row[kind] = {"seconds": float(np.median([m["seconds"] for m in measured])),
                       "peak_rss_mb": max(m["peak_rss_mb"] for m in measured),
                       "all_seconds": [m["seconds"] for m in measured]}
          if kind in SOUPS:
            row[kind]["check_seconds"] = float(np.median([m["check_seconds"] for m in measured]))
        for kind in ("numpy", *SOUPS):
          row[f"{kind}_fraction_of_raw_read"] = row["raw"]["seconds"] / row[kind]["seconds"]
        print(f"  {fmt} {cache} N={count}: raw {row['raw']['seconds']:.2f} s, numpy "
              f"{row['numpy']['seconds']:.2f} s, stockpot {row['stockpot']['seconds']:.2f} s "
              f"(cached compiles {row['cached']['seconds']:.2f} s)",
              flush=True)
        rows.append(row)
  return method, rows


def _print_table(rows, model_mb, method):
  print(f"\nViT-{_VARIANT.value}: {model_mb:,.0f} MB of float32 weights per ingredient; stockpot "
        f"on {_DEVICES.value} CPU devices; {os.cpu_count()} CPU cores"
        + (f"; cold cache by {method}" if method else ""))
  print(f"{'format':>6} {'cache':>5} {'N':>3} {'GB':>5} {'raw s':>6} {'raw MB/s':>8} "
        f"{'numpy s':>7} {'raw ÷':>6} {'stockpot s':>10} {'(check)':>7} {'raw ÷':>6} "
        f"{'cached s':>8} {'raw ÷':>6} {'numpy RSS MB':>12} {'stockpot RSS MB':>15}")
  for r in rows:
    print(f"{r['format']:>6} {r['cache']:>5} {r['n']:>3} {r['bytes'] / 1e9:>5.2f} "
          f"{r['raw']['seconds']:>6.2f} {r['bytes'] / 1e6 / r['raw']['seconds']:>8,.0f} "
          f"{r['numpy']['seconds']:>7.2f} {r['numpy_fraction_of_raw_read']:>6.0%} "
          f"{r['stockpot']['seconds']:>10.2f} {r['stockpot']['check_seconds']:>7.2f} "
          f"{r['stockpot_fraction_of_raw_read']:>6.0%} "
          f"{r['cached']['seconds']:>8.2f} {r['cached_fraction_of_raw_read']:>6.0%} "
          f"{r['numpy']['peak_rss_mb']:>12,.0f} {r['stockpot']['peak_rss_mb']:>15,.0f}")


def main(argv):
  del argv
  if _WORKER.value:
    _worker(_WORKER.value, _FORMAT.value,
            _ingredient_paths(_DATA_DIR.value, _FORMAT.value, int(_COUNTS.value[0])), _DROP.value)
    return
  for name, values, known in (("formats", _FORMATS.value, FORMATS),
                               ("caches", _CACHES.value, CACHES)):
    if set(values) - set(known):
      raise app.UsageError(f"--{name}={','.join(values)}: known are {','.join(known)}")
  # Before jax is imported: the orbax ingredients are saved from --devices devices.
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={_DEVICES.value}"
  shapes = _shapes(_VARIANT.value)
  model_mb = sum(int(np.prod(s)) for s in shapes.values()) * 4 / 2**20
  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory(prefix="soup_bench_") as scratch:
    compile_cache_dir = os.path.join(scratch, "xla")
    if _DATA_DIR.value:
      os.makedirs(_DATA_DIR.value, exist_ok=True)
      method, rows = _run(_DATA_DIR.value, shapes, compile_cache_dir)
    else:
      method, rows = _run(scratch, shapes, compile_cache_dir)
  _print_table(rows, model_mb, method)
  load_after = os.getloadavg()
  print(f"1-minute load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
        f"({os.cpu_count()} cores): above the core count, other work shared the CPU")
  if _OUT.value:
    from train import files  # pylint: disable=g-import-not-at-top
    files.write_json_atomic(_OUT.value, {
        "variant": _VARIANT.value, "model_mb": model_mb, "devices": _DEVICES.value,
        "cpu_count": os.cpu_count(), "cold_cache_method": method,
        "load_average_before_after": [load_before[0], load_after[0]], "rows": rows})


if __name__ == "__main__":
  command.run(main)
