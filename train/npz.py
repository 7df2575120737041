"""`.npz` files whose arrays start on 64-byte boundaries: readers can map them, not copy them.

The file is an uncompressed zip of `.npy` members, as `np.savez` writes
(numpy, big_vision and zip tools read it unchanged; like numpy, every local
header carries a zip64 field); each member's zip extra field also carries
the padding, as Android's `zipalign` pads APKs (header ID 0xD935: the
alignment, then zeros). A reader that maps the file (soups/ingredients.py)
then hands each array's bytes, in place in the page cache, to XLA, which
on CPU uses 64-byte-aligned host memory without a copy.
"""

import io
import struct
import zipfile

import numpy as np

ALIGNMENT = 64  # XLA:CPU's alignment for using host memory in place (and a cache line).
_ALIGNMENT_EXTRA_ID = 0xD935  # zipalign's extra field: u16 alignment, then padding.
_ALIGNMENT_EXTRA = struct.Struct("<3H")  # Header ID, data size, alignment.
_ZIP64_EXTRA_SIZE = struct.calcsize("<2H2Q")  # zipfile's zip64 field, after ours when forced.


def _npy_bytes(array):
  """The .npy file of `array` and the length of its header."""
  member = io.BytesIO()
  np.lib.format.write_array(member, array, allow_pickle=False)
  return member.getvalue(), member.tell() - array.nbytes


def _alignment_extra(header_offset, name, npy_header_size):
  """The extra field that puts a member's array data, after its local header, on ALIGNMENT."""
  data_offset = (header_offset + zipfile.sizeFileHeader + len(name.encode())
                 + _ALIGNMENT_EXTRA.size + _ZIP64_EXTRA_SIZE + npy_header_size)
  padding = -data_offset % ALIGNMENT
  return _ALIGNMENT_EXTRA.pack(_ALIGNMENT_EXTRA_ID, 2 + padding, ALIGNMENT) + bytes(padding)


def aligned_npz_bytes(arrays):
  """{key: array} as the bytes of an uncompressed `.npz`, every array's data ALIGNMENT-aligned."""
  out = io.BytesIO()
  with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
    for key, value in arrays.items():
      data, header_size = _npy_bytes(np.asarray(value))
      info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
      info.extra = _alignment_extra(out.tell(), info.filename, header_size)
      # zip64 forced, as np.savez does: zipfile would otherwise add its 20 bytes only to
      # members over ~1.9 GiB, moving their data off the alignment.
      with archive.open(info, "w", force_zip64=True) as member:
        member.write(data)
  return out.getvalue()
