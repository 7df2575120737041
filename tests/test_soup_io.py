"""Reading soup ingredients fast: the .npz reader, orbax restores, read-ahead, bounded memory."""

import gc
import io
import os
import struct
import threading
import weakref
import zipfile
import zlib

import jax
import numpy as np
import pytest

from soups import averaging
from soups import ingredients as ingredients_lib
from soups import prefetch
from soups import restore as restore_lib
from tests.soup_helpers import assert_tree_equal
from tests.soup_helpers import npz_ingredients
from tests.soup_helpers import random_tree
from tests.soup_helpers import save_orbax_run
from tests.soup_helpers import SHAPES
from tests.soup_helpers import soup_abstract
from train import pretrained
from train import sharding


def _mean_in_order(flat_trees):
  """The float32 sum in ingredient order, divided: exactly what the soup computes."""
  total = {k: v.copy() for k, v in flat_trees[0].items()}
  for tree in flat_trees[1:]:
    total = {k: total[k] + tree[k] for k in total}
  return {k: v / np.float32(len(flat_trees)) for k, v in total.items()}


def _save_npz_with_long_extra_fields(path, tree):
  """An uncompressed .npz whose members carry 1 KB local extra fields (other zip writers do)."""
  with zipfile.ZipFile(path, "w") as archive:
    for key, value in tree.items():
      info = zipfile.ZipInfo(key + ".npy")
      info.extra = struct.pack("<2H", 0xCAFE, 1000) + bytes(1000)
      member = io.BytesIO()
      np.lib.format.write_array(member, value)
      archive.writestr(info, member.getvalue())


def test_npz_reader_matches_np_load_for_these_member_layouts(tmp_path):
  """Stored and deflated members, long extra fields, Fortran order, 0-d, float16, int32."""
  tree = {"a/kernel": np.asfortranarray(np.arange(48, dtype=np.float32).reshape(6, 8)),
          "a/bias": np.arange(8, dtype=np.float16), "b/step": np.array(7, np.int32),
          "b/scale": np.linspace(-1, 1, 16, dtype=np.float32)}
  stored = tmp_path / "stored.npz"
  pretrained.save_npz(str(stored), tree)
  deflated = tmp_path / "deflated.npz"
  np.savez_compressed(deflated, **tree)
  extra = tmp_path / "extra.npz"
  _save_npz_with_long_extra_fields(extra, tree)
  unaligned = tmp_path / "unaligned.npz"  # numpy's own layout: arrays copied, not mapped.
  np.savez(unaligned, **tree)
  for path in (stored, deflated, extra, unaligned):
    with np.load(path) as npz:  # Valid files, as numpy reads them.
      assert all(np.array_equal(npz[key], value) for key, value in tree.items())
    ingredients = ingredients_lib.from_paths([str(path)], "params")
    abstract = soup_abstract(ingredients)
    restored = restore_lib.restore(ingredients[0], abstract)
    assert_tree_equal(restored, tree)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
      assert got.sharding == want.sharding and got.dtype == want.dtype


def _mapped_ranges(path):
  """The address ranges at which this process maps `path` (Linux's /proc/self/maps)."""
  with open("/proc/self/maps") as f:
    return [tuple(int(a, 16) for a in line.split()[0].split("-"))
            for line in f if line.rstrip().endswith(" " + str(path))]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc")
def test_npz_leaves_are_the_mapped_file_until_the_ingredient_is_dropped(tmp_path):
  """No copy of a `save_npz` ingredient on CPU: each shard that is a contiguous slice of its
  leaf (split on the first axis, or replicated) is the leaf's bytes in the page cache."""
  shapes = {"a/kernel": (64, 8), "a/bias": (5,)}  # Split on rows; too small to split.
  [ingredient] = npz_ingredients(tmp_path, [random_tree(0, shapes)])
  abstract = soup_abstract([ingredient])
  restored = restore_lib.restore(ingredient, abstract)
  ranges = _mapped_ranges(ingredient.path)
  assert ranges, "the ingredient's file is not mapped"
  shards = [s.data for leaf in jax.tree.leaves(restored) for s in leaf.addressable_shards]
  assert len(shards) > len(jax.tree.leaves(restored))  # Split over the devices...
  outside = [s.shape for s in shards if s.size and not any(
      lo <= s.unsafe_buffer_pointer() < hi for lo, hi in ranges)]
  assert not outside  # ...each shard in place in the file's mapping.
  assert_tree_equal(restored, random_tree(0, shapes))
  del restored, shards
  gc.collect()
  assert not _mapped_ranges(ingredient.path)  # Dropped: nothing of the file stays mapped.


def test_orbax_ingredients_average_to_the_numpy_mean_exactly(tmp_path):
  flat_trees = [random_tree(i) for i in range(3)]
  mesh = sharding.make_mesh((("data", -1),))
  for i, tree in enumerate(flat_trees):
    save_orbax_run(tmp_path / f"run{i}", {"params": tree}, mesh)
  ingredients = ingredients_lib.from_paths([str(tmp_path / f"run{i}") for i in range(3)],
                                           "params")
  abstract = soup_abstract(ingredients)
  restored = restore_lib.restore(ingredients[1], abstract)
  assert_tree_equal(restored, flat_trees[1])
  assert jax.tree.leaves(restored)[0].sharding == jax.tree.leaves(abstract)[0].sharding
  soup = averaging.average(ingredients, lambda i: restore_lib.restore(i, abstract), abstract)
  assert_tree_equal(soup, _mean_in_order(flat_trees))


# orbax leaves tensorstore callbacks behind a failed restore ("Event loop is closed").
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_orbax_ingredient_with_missing_data_is_named(tmp_path):
  mesh = sharding.make_mesh((("data", -1),))
  save_orbax_run(tmp_path / "good", {"params": random_tree(0)}, mesh)
  save_orbax_run(tmp_path / "broken", {"params": random_tree(1)}, mesh)
  ingredients = ingredients_lib.from_paths([str(tmp_path / "good"), str(tmp_path / "broken")],
                                           "params")
  abstract = soup_abstract(ingredients)  # The metadata is intact...
  item = tmp_path / "broken" / "checkpoints" / "1" / "params"
  for root, _, names in os.walk(item):  # ...the arrays' data files are gone.
    if os.path.basename(root) == "d":
      for name in names:
        os.remove(os.path.join(root, name))
  with pytest.raises(ValueError,
                     match=r"ingredient broken: cannot restore .*broken/checkpoints/1/params"):
    averaging.average(ingredients, lambda i: restore_lib.restore(i, abstract), abstract)


class _Weights:
  """A stand-in for a restored tree that knows how many of its kind are alive."""

  def __init__(self, index, alive):
    self.index = index
    with alive["lock"]:
      alive["count"] += 1
    weakref.finalize(self, _drop, alive)


def _drop(alive):
  with alive["lock"]:
    alive["count"] -= 1


@pytest.mark.parametrize("ahead", [1, 2])
def test_prefetcher_yields_in_order_and_reads_at_most_ahead(ahead):
  names = [f"ing{i}" for i in range(6)]
  alive = {"count": 0, "lock": threading.Lock(), "most_at_read": 0}
  started = {name: threading.Event() for name in names}

  def restore(name):
    with alive["lock"]:
      alive["most_at_read"] = max(alive["most_at_read"], alive["count"])
    started[name].set()
    return _Weights(names.index(name), alive)

  seen = []
  with prefetch.Prefetcher(names, restore, ahead) as stream:
    for name, weights in stream:
      seen.append((name, weights.index))
      i = names.index(name)
      if i + ahead < len(names):  # Let the reader go as far ahead as it may.
        assert started[names[i + ahead]].wait(timeout=60)
      del weights
  assert seen == [(name, i) for i, name in enumerate(names)]
  # When a read starts, the caller's ingredient and at most ahead - 1 more are alive.
  assert alive["most_at_read"] <= ahead
  assert alive["count"] == 0


def test_prefetcher_closed_early_stops_reading():
  calls = []
  read = lambda i: calls.append(i) or i
  with prefetch.Prefetcher(list(range(10)), read, ahead=1) as stream:
    assert next(stream) == (0, 0)
  assert calls in ([0], [0, 1])  # The held ingredient and at most one ahead; then it stops.
  with pytest.raises(ValueError, match="ahead=0"):
    prefetch.Prefetcher([], lambda i: i, ahead=0)


def _member_data(path, member):
  """(ZipInfo, offset of the stored bytes) of `member`, past its local header and extra field."""
  with zipfile.ZipFile(path) as archive:
    info = archive.getinfo(member)
  with open(path, "rb") as f:
    f.seek(info.header_offset)
    name_length, extra_length = struct.unpack("<2H", f.read(30)[26:30])
  return info, info.header_offset + 30 + name_length + extra_length


def _flip_last_data_byte(path, member):
  """Corrupts one weight of `member` in place; the zip and .npy headers stay valid."""
  info, offset = _member_data(path, member)
  with open(path, "r+b") as f:
    f.seek(offset + info.file_size - 1)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x01]))


def test_a_failed_prefetched_read_is_raised_in_order_naming_the_ingredient(tmp_path):
  shapes = {**SHAPES, "Transformer/encoderblock_0/kernel": (64, 256)}  # Past the header reads.
  ingredients = npz_ingredients(tmp_path, [random_tree(i, shapes) for i in range(4)])
  _flip_last_data_byte(ingredients[2].path, "Transformer/encoderblock_0/kernel.npy")
  abstract = soup_abstract(ingredients)  # Headers intact: the metadata check passes.
  reads = []

  def restore(ingredient):
    reads.append(ingredient.name)
    return restore_lib.restore(ingredient, abstract)

  yielded = []
  message = (r"ingredient run2: cannot read .*run2.npz: member "
             r"Transformer/encoderblock_0/kernel.npy is corrupt \(CRC-32 mismatch\)")
  with pytest.raises(ValueError, match=message):
    with prefetch.Prefetcher(ingredients, restore, ahead=1) as stream:
      for ingredient, _ in stream:
        yielded.append(ingredient.name)
  assert yielded == ["run0", "run1"]
  assert reads == ["run0", "run1", "run2"]  # Nothing after the failed read.
  with pytest.raises(ValueError, match=message):
    averaging.average(ingredients, lambda i: restore_lib.restore(i, abstract), abstract)


def test_a_corrupt_deflated_member_names_the_ingredient(tmp_path):
  path = tmp_path / "run0.npz"
  np.savez_compressed(path, **random_tree(0, {**SHAPES, "head/kernel": (64, 256)}))
  _, offset = _member_data(path, "head/kernel.npy")
  with open(path, "r+b") as f:  # A reserved block type: zlib itself fails, before any CRC.
    f.seek(offset)
    f.write(b"\xff")
  ingredients = ingredients_lib.from_paths([str(path)], "params")
  with pytest.raises(ValueError, match=r"ingredient .*run0.npz is not a readable .npz file: ") \
      as error:
    soup_abstract(ingredients)  # The metadata check reads the member's (compressed) header.
  assert isinstance(error.value.__cause__, zlib.error)  # Inflating failed, not a CRC check.


def test_average_holds_at_most_the_sum_and_two_ingredients(tmp_path, monkeypatch):
  """Counts live device arrays whenever a read starts: at most the sum and the ingredient
  being added (the one being read is the second), for any N."""
  shapes = {f"block{i}/kernel": (8, 16) for i in range(12)}
  flat_trees = [random_tree(i, shapes) for i in range(6)]
  ingredients = npz_ingredients(tmp_path, flat_trees)
  abstract = soup_abstract(ingredients)
  leaves = len(jax.tree.leaves(abstract))
  baseline = len(jax.live_arrays())
  at_read = []
  read = {i.name: threading.Event() for i in ingredients}

  def restore(ingredient):
    at_read.append(len(jax.live_arrays()) - baseline)
    tree = restore_lib.restore(ingredient, abstract)
    read[ingredient.name].set()
    return tree

  add = averaging.RunningSum.add
  added = []

  def slow_add(self, tree, weight=1.0):
    """Lets the reader get as far ahead as it is allowed before each add."""
    if len(added) + 1 < len(ingredients):
      assert read[ingredients[len(added) + 1].name].wait(timeout=60)
    added.append(True)
    add(self, tree, weight)

  monkeypatch.setattr(averaging.RunningSum, "add", slow_add)
  soup = averaging.average(ingredients, restore, abstract)
  assert_tree_equal(soup, _mean_in_order(flat_trees))
  # A read starts while at most the running sum and the ingredient being added are alive
  # (the one it reads is the second); a weight scalar or two may be alive too.
  assert max(at_read) <= 2 * leaves + 2, (at_read, leaves)
  with pytest.raises(ValueError, match="3 weights for 6 ingredients"):
    averaging.average(ingredients, restore, abstract, weights=[1.0, 2.0, 3.0])
