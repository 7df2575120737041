"""train/npz.py: aligned .npz files are ordinary .npz files whose arrays start on 64 bytes."""

import io
import struct
import zipfile

import numpy as np

from train import npz

LAYOUTS = {
    "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel":
        np.arange(48, dtype=np.float32).reshape(6, 8),
    "fortran": np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
    "big_endian": np.arange(5, dtype=">f4"),
    "scalar": np.array(7, np.int32),
    "half": np.linspace(-1, 1, 9, dtype=np.float16),
    "empty": np.zeros((0, 3), np.float32),
}


def _data_offsets(data):
  """{member: offset of its array data in the file}, from the zip and .npy headers."""
  offsets = {}
  with zipfile.ZipFile(io.BytesIO(data)) as archive:
    for info in archive.infolist():
      name_size, extra_size = struct.unpack_from("<2H", data, info.header_offset + 26)
      npy = info.header_offset + zipfile.sizeFileHeader + name_size + extra_size
      with archive.open(info) as member:
        np.lib.format.read_magic(member)
        np.lib.format.read_array_header_1_0(member)
        offsets[info.filename] = npy + member.tell()
  return offsets


def test_every_array_starts_on_the_alignment_and_numpy_reads_it_unchanged():
  data = npz.aligned_npz_bytes(LAYOUTS)
  offsets = _data_offsets(data)
  assert sorted(offsets) == sorted(f"{key}.npy" for key in LAYOUTS)
  assert {offset % npz.ALIGNMENT for offset in offsets.values()} == {0}
  with zipfile.ZipFile(io.BytesIO(data)) as archive:
    assert archive.testzip() is None  # Every member's CRC-32 holds.
  with np.load(io.BytesIO(data), allow_pickle=False) as loaded:
    for key, value in LAYOUTS.items():
      assert loaded[key].dtype == value.dtype, key
      np.testing.assert_array_equal(loaded[key], value, err_msg=key)
  assert np.load(io.BytesIO(data))["fortran"].flags.f_contiguous
