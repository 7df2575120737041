"""Soup ingredients: one weight set (`params`, `ema_low`, `ema_high`) of a finished run.

An ingredient is read from the orbax checkpoint of a run (`<run>/checkpoints/
<last step>/<weights>`), from an orbax item directory, or from a big_vision
`.npz`. Before any averaging, `check_compatible` compares every ingredient's
tree, shapes and dtypes from metadata alone; `restore` reads one ingredient
into the target sharding, every stored byte read (and decompressed) once,
an `.npz` mapped in place rather than copied;
`Prefetcher` reads the next ingredient on a background thread while the
caller works on the current one, so reading and adding overlap.
"""

import ctypes
import dataclasses
import io
import json
import math
import mmap
import os
import queue
import struct
import threading
import zipfile
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from zlib_ng import zlib_ng

from eval import run_config
from train import checkpoint
from train import trees

MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class Ingredient:
  """Where one ingredient's weights live.

  Attributes:
    name: unique, readable (the run's name).
    path: an orbax item directory or an `.npz` file.
    run_dir: the run that produced it (holds config.json), or '' if unknown.
  """
  name: str
  path: str
  run_dir: str = ""

  @property
  def is_npz(self):
    return self.path.endswith(".npz")

  def config(self):
    """The producing run's resolved config, or None when the run is unknown."""
    if not self.run_dir:
      return None
    return run_config.load(os.path.join(self.run_dir, "config.json"))


def _run_ingredient(run_dir, weights, name=None):
  """The `weights` item of a run's last checkpoint; the run must have finished."""
  run_dir = os.path.abspath(run_dir)
  if not os.path.exists(os.path.join(run_dir, "results.json")):
    raise ValueError(f"run {run_dir} has not finished (no results.json): finish it or leave "
                     "it out of the soup")
  steps = sorted(int(s) for s in os.listdir(checkpoint.checkpoint_dir(run_dir)) if s.isdigit())
  if not steps:
    raise FileNotFoundError(f"run {run_dir} has no checkpoint in {checkpoint.checkpoint_dir(run_dir)}")
  path = os.path.join(checkpoint.checkpoint_dir(run_dir), str(steps[-1]), weights)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint {path} is missing: run {run_dir} has no {weights!r} "
                            f"weights (known: {checkpoint.WEIGHT_NAMES})")
  return Ingredient(name or os.path.basename(run_dir), path, run_dir)


def from_sweep(sweep_dir, weights):
  """The finished runs of a sweep, in manifest order; unfinished runs are listed and skipped."""
  path = os.path.join(sweep_dir, MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: is {sweep_dir} a sweep directory "
                            "written by `python -m launch`?")
  with open(path) as f:
    runs = json.load(f)["runs"]
  finished = [r for r in runs if os.path.exists(os.path.join(sweep_dir, r["workdir"], "results.json"))]
  if not finished:
    raise ValueError(f"{path}: none of its {len(runs)} runs has finished")
  return [_run_ingredient(os.path.join(sweep_dir, r["workdir"]), weights, r["name"])
          for r in finished]


def from_paths(paths, weights):
  """Ingredients from run directories, orbax item directories or `.npz` files."""
  ingredients = []
  for path in paths:
    if path.endswith(".npz"):
      if not os.path.exists(path):
        raise FileNotFoundError(f"ingredient {path} does not exist")
      run_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))  # <run>/final/x.npz
      has_run = os.path.exists(os.path.join(run_dir, "config.json"))
      ingredients.append(Ingredient(
          os.path.basename(run_dir) if has_run else os.path.basename(path)[:-4],
          os.path.abspath(path), run_dir if has_run else ""))
    elif os.path.exists(os.path.join(path, "config.json")):
      ingredients.append(_run_ingredient(path, weights))
    elif os.path.isdir(path):
      ingredients.append(Ingredient(os.path.basename(os.path.normpath(path)), os.path.abspath(path)))
    else:
      raise FileNotFoundError(f"ingredient {path} is neither a run directory, an orbax "
                              "checkpoint directory nor an .npz file")
  names = [i.name for i in ingredients]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"ingredients share the names {duplicates}; give runs distinct directories")
  return ingredients


def _npy_header(f):
  """(shape, fortran_order, dtype) of the .npy header at `f`'s position, which it reads past."""
  read_header = (np.lib.format.read_array_header_1_0 if np.lib.format.read_magic(f) == (1, 0)
                 else np.lib.format.read_array_header_2_0)
  shape, fortran_order, dtype = read_header(f)
  return tuple(shape), fortran_order, np.dtype(dtype)


def _npz_key(member):
  return member[:-4] if member.endswith(".npy") else member


# A zip member's local header: signature, versions, flags, ..., name and extra lengths.
_ZIP_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
_NPY_PREFIX = 512  # Bytes read at once for the local and .npy headers (a .npy header is ~128).
_npy_headers = {}  # .npy header bytes -> (shape, fortran_order, dtype).


def _stored_npy_header(fd, info):
  """(header bytes, shape, fortran_order, dtype, data offset) of an uncompressed .npy member.

  One read of the zip local header and the .npy header behind it; parsed
  headers are cached, as every ingredient of a soup repeats them.
  """
  prefix = os.pread(fd, _ZIP_LOCAL_HEADER.size + len(info.filename.encode()) + _NPY_PREFIX,
                    info.header_offset)
  if len(prefix) < _ZIP_LOCAL_HEADER.size:
    raise ValueError(f"member {info.filename} is truncated")
  local = _ZIP_LOCAL_HEADER.unpack_from(prefix)
  if local[0] != zipfile.stringFileHeader:
    raise ValueError(f"member {info.filename} has no zip local header at {info.header_offset}")
  start = _ZIP_LOCAL_HEADER.size + local[-2] + local[-1]  # After the name and extra field.
  if len(prefix) < start + 12:  # A long extra field: read again, past it.
    prefix = os.pread(fd, start + _NPY_PREFIX, info.header_offset)
    if len(prefix) < start + 12:
      raise ValueError(f"member {info.filename} is truncated")
  version = prefix[start + 6:start + 8]
  size_format, size_bytes = ("<H", 2) if version == b"\x01\x00" else ("<I", 4)
  header_size = 8 + size_bytes + struct.unpack_from(size_format, prefix, start + 8)[0]
  if start + header_size > len(prefix):
    prefix = os.pread(fd, start + header_size, info.header_offset)
  header = prefix[start:start + header_size]
  if header not in _npy_headers:
    _npy_headers[header] = _npy_header(io.BytesIO(header))
  shape, fortran_order, dtype = _npy_headers[header]
  return header, shape, fortran_order, dtype, info.header_offset + start + header_size


def _npz_metadata(path):
  """{key: (shape, dtype)} from the .npy headers inside an .npz, without reading the arrays."""
  try:
    with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
      out = {}
      for info in archive.infolist():
        if info.compress_type == zipfile.ZIP_STORED:  # One small read per member.
          _, shape, _, dtype, _ = _stored_npy_header(f.fileno(), info)
        else:
          with archive.open(info) as member:
            shape, _, dtype = _npy_header(member)
        out[_npz_key(info.filename)] = (shape, dtype)
      return out
  except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, struct.error) as e:
    raise ValueError(f"ingredient {path} is not a readable .npz file: {e}") from e


def metadata(ingredient):
  """{'/'-joined parameter path: (shape, dtype)} of an ingredient, read from metadata only."""
  if ingredient.is_npz:
    return _npz_metadata(ingredient.path)
  try:
    tree = checkpoint.item_metadata(ingredient.path)
  except Exception as e:  # orbax raises many types for unreadable checkpoints.
    raise ValueError(f"ingredient {ingredient.name}: cannot read the orbax checkpoint "
                     f"{ingredient.path}: {checkpoint.describe(e)}") from e
  return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in trees.flatten(tree).items()}


def check_compatible(ingredients):
  """Raises naming the first ingredient and parameter path that differ from the first ingredient.

  Returns the shared {path: (shape, dtype)}.
  """
  if not ingredients:
    raise ValueError("no ingredients: a soup needs at least one")
  reference = metadata(ingredients[0])
  for ingredient in ingredients[1:]:
    other = metadata(ingredient)
    for path in sorted(set(reference) | set(other)):
      if path not in other or path not in reference:
        has, lacks = (ingredients[0], ingredient) if path not in other else (ingredient, ingredients[0])
        raise ValueError(f"ingredient {lacks.name} ({lacks.path}) has no parameter {path!r}, "
                         f"which {has.name} has: ingredients must share one architecture")
      if other[path] != reference[path]:
        raise ValueError(
            f"parameter {path!r}: {ingredient.name} has shape {other[path][0]} dtype "
            f"{other[path][1]}, {ingredients[0].name} has shape {reference[path][0]} dtype "
            f"{reference[path][1]} ({ingredient.path} vs {ingredients[0].path})")
  return reference


def abstract_params(shared_metadata, shardings_fn):
  """Nested ShapeDtypeStructs carrying the target sharding, from `check_compatible`'s result."""
  abstract = trees.unflatten({k: jax.ShapeDtypeStruct(shape, dtype)
                              for k, (shape, dtype) in shared_metadata.items()})
  shardings = shardings_fn(abstract)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def _put(array, sharding):
  """A host array -> a global array in `sharding`, this process's shards only.

  As fast as one batched `jax.device_put` of a whole tree, and correct across
  processes. On CPU a shard that is a contiguous, 64-byte-aligned slice of
  `array` is that memory, not a copy.
  """
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _map_stored_npy(fd, mapped, info):
  """An uncompressed (`np.savez`) member as an array over the mapped file, CRC-checked.

  No copy: the array's bytes are the page cache's, where XLA:CPU uses them in
  place when 64-byte aligned (train/npz.py writes them so) and copies them
  into the shards otherwise. The CRC-32 the zip stores is checked as
  `np.load` checks it, so a flipped bit in a weight is an error, not a
  silently wrong soup.
  """
  header, shape, fortran_order, dtype, offset = _stored_npy_header(fd, info)
  if dtype.hasobject:
    raise ValueError(f"member {info.filename} holds Python objects, not numbers")
  size = math.prod(shape) * dtype.itemsize
  if len(header) + size != info.file_size or offset + size > len(mapped):
    raise ValueError(f"member {info.filename} is truncated")
  data = np.frombuffer(mapped, np.uint8, size, offset)
  # zlib-ng's CRC-32 (SIMD) is 3x zlib's on this CPU; it lets go of the GIL meanwhile.
  if zlib_ng.crc32(data, zlib_ng.crc32(header)) != info.CRC:
    raise ValueError(f"member {info.filename} is corrupt (CRC-32 mismatch)")
  array = data.view(dtype).reshape(shape, order="F" if fortran_order else "C")
  return array if dtype.isnative else array.astype(dtype.newbyteorder("="))


def _read_ahead(fd):
  """Asks the kernel to read the whole file now, so the disk streams while leaves are placed.

  Without it the disk idles whenever a leaf is checked and placed in its
  shards. A no-op where the OS has no posix_fadvise (macOS).
  """
  if hasattr(os, "posix_fadvise"):
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)


def _restore_npz(ingredient, abstract):
  """Every leaf of an `.npz`, in file order (sequential reads), placed as soon as it is read.

  Every process reads the whole file: a zip member has no index to read a
  shard from. The file is mapped, not read into process memory: its stored
  leaves are views of the page cache, alive while the ingredient is (the map
  is never closed by hand: views of it may outlive this call). stockpot
  replaces files by renames, which leave a mapped file as it was; a file
  truncated in place while mapped would stop the process (SIGBUS), as for
  any mapped file, so do not overwrite ingredients while a soup reads them.
  """
  leaves = dict(trees.flatten(abstract))
  placed = {}
  try:
    # One open file for the zip directory and the data: a rename between two opens
    # would pair one file's members with another's bytes.
    with open(ingredient.path, "rb") as f, zipfile.ZipFile(f) as archive:
      _read_ahead(f.fileno())
      mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
      members = {_npz_key(info.filename): info for info in archive.infolist()}
      missing = sorted(set(leaves) - set(members))
      if missing:
        raise ValueError(f"no parameter {missing[0]!r}")
      for key, info in sorted(members.items(), key=lambda item: item[1].header_offset):
        if key not in leaves:
          continue
        if info.compress_type == zipfile.ZIP_STORED:
          array = _map_stored_npy(f.fileno(), mapped, info)
        else:  # `np.savez_compressed`: zipfile inflates and checks the CRC.
          with archive.open(info) as member:
            array = np.lib.format.read_array(member, allow_pickle=False)
        leaf = leaves[key]
        native = np.dtype(leaf.dtype).newbyteorder("=")
        if array.shape != tuple(leaf.shape) or array.dtype != native:
          raise ValueError(f"parameter {key!r} has shape {array.shape} dtype {array.dtype}, "
                           f"expected {tuple(leaf.shape)} {leaf.dtype}")
        placed[key] = _put(array, leaf.sharding)
        del array
  except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, struct.error) as e:
    raise ValueError(f"ingredient {ingredient.name}: cannot read {ingredient.path}: {e}") from e
  return trees.unflatten(placed)


def _malloc_trim():
  """glibc's `malloc_trim`, or None where the C library has none."""
  try:
    return ctypes.CDLL(None).malloc_trim
  except (OSError, AttributeError):
    return None


# orbax's reads allocate whole arrays on tensorstore's threads; glibc keeps what they free
# in per-thread arenas, and fragments, so without a trim RSS creeps up with every ingredient.
_MALLOC_TRIM = _malloc_trim()


def _restore_orbax(ingredient, abstract):
  """An orbax item in the target shardings, each stored chunk decompressed once.

  On one process, every leaf's shards are all local: orbax reads each array
  whole, into host memory, and `_put` slices it into the shards. Reading into
  the shardings instead would decompress every stored chunk once per shard
  that overlaps it (orbax stores a trainer's replicated array as one chunk
  per device along the first dimension; the soup shards the largest one),
  8x the work on 8 devices. Across processes each reads only its own shards,
  through orbax with the target sharding, as before.
  """
  if _MALLOC_TRIM is not None:
    _MALLOC_TRIM(0)  # Returns to the OS what the previous ingredient's reads freed.
  try:
    if all(leaf.sharding.is_fully_addressable for leaf in jax.tree.leaves(abstract)):
      restore_args = jax.tree.map(
          lambda leaf: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
      host = ocp.PyTreeCheckpointer().restore(
          ingredient.path, args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args))
      return jax.tree.map(lambda array, leaf: _put(array, leaf.sharding), host, abstract)
    return ocp.StandardCheckpointer().restore(ingredient.path, abstract)
  except Exception as e:  # orbax and tensorstore raise many types for unreadable files.
    raise ValueError(f"ingredient {ingredient.name}: cannot restore {ingredient.path}: "
                     f"{checkpoint.describe(e)}") from e


def restore(ingredient, abstract):
  """Reads one ingredient into the shardings of `abstract`; errors name the ingredient."""
  if ingredient.is_npz:
    return _restore_npz(ingredient, abstract)
  return _restore_orbax(ingredient, abstract)


class Prefetcher:
  """Yields `(ingredient, restore(ingredient))` in order, reading ahead on a background thread.

  Reading starts when the Prefetcher is made, so the caller's own set-up (a
  compile) overlaps the first reads; afterwards the read of ingredient i+1
  overlaps the caller's work on ingredient i. Memory stays flat in N: the
  caller must be done with an ingredient (its references dropped, its
  computations finished) when it asks for the next one, and at most `ahead`
  ingredients are read beyond the one it holds. A failed read is raised on
  the caller's thread when it reaches that ingredient, as `restore` raised it
  (naming the ingredient); nothing after it is read. Use it as a context
  manager, or call `close()`, so a caller that stops early stops the reader.
  """

  def __init__(self, ingredients, restore_fn, ahead=1):
    if ahead < 1:
      raise ValueError(f"ahead={ahead}: read at least one ingredient ahead")
    self._ingredients = list(ingredients)
    self._restore = restore_fn
    self._slots = threading.Semaphore(ahead + 1)  # The caller's ingredient and `ahead` more.
    self._ready = queue.Queue()
    self._closed = threading.Event()
    self._taken = 0
    self._thread = threading.Thread(target=self._read_all, name="soup-prefetch", daemon=True)
    self._thread.start()

  def _read_all(self):
    for ingredient in self._ingredients:
      self._slots.acquire()
      if self._closed.is_set():
        return
      try:
        tree = self._restore(ingredient)
      except BaseException as e:  # pylint: disable=broad-except  Raised on the caller's thread.
        self._ready.put((ingredient, None, e))
        return
      self._ready.put((ingredient, tree, None))
      del tree

  def __iter__(self):
    return self

  def __next__(self):
    if self._taken:
      self._slots.release()  # The caller is done with the previous ingredient.
    if self._taken == len(self._ingredients) or self._closed.is_set():
      raise StopIteration
    ingredient, tree, error = self._ready.get()
    self._taken += 1
    if error is not None:
      self.close()
      raise error
    return ingredient, tree

  def close(self):
    """Stops reading ahead and waits for a read in progress to end."""
    self._closed.set()
    self._slots.release()  # Wakes a reader waiting for a slot.
    self._thread.join()
    while not self._ready.empty():
      self._ready.get_nowait()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()
