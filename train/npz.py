"""`.npz` files whose arrays start on 64-byte boundaries, and a reader that maps, not copies, them.

Writing: the file is an uncompressed zip of `.npy` members, as `np.savez`
writes (numpy, big_vision and zip tools read it unchanged; like numpy,
every local header carries a zip64 field); each member's zip extra field
also carries the padding, as Android's `zipalign` pads APKs (header ID
0xD935: the alignment, then zeros).

Reading (`metadata`, `mapped_arrays`): shapes and dtypes come from the
`.npy` headers alone; arrays are views of the mapped file, CRC-checked, so
their bytes stay in the page cache, where XLA on CPU uses 64-byte-aligned
host memory without a copy. Any `.npz` reads (unaligned or compressed
members are copied once).
"""

import io
import math
import mmap
import os
import struct
import zipfile
import zlib

import numpy as np
from zlib_ng import zlib_ng

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


# Errors of unreadable .npz files: callers add the file's name (and its role) to the message.
READ_ERRORS = (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, struct.error)
# A zip member's local header: signature, versions, flags, ..., name and extra lengths.
_ZIP_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
_NPY_PREFIX = 512  # Bytes read at once for the local and .npy headers (a .npy header is ~128).
_npy_headers = {}  # .npy header bytes -> (shape, fortran_order, dtype).


def _npy_header(f):
  """(shape, fortran_order, dtype) of the .npy header at `f`'s position, which it reads past."""
  read_header = (np.lib.format.read_array_header_1_0 if np.lib.format.read_magic(f) == (1, 0)
                 else np.lib.format.read_array_header_2_0)
  shape, fortran_order, dtype = read_header(f)
  return tuple(shape), fortran_order, np.dtype(dtype)


def _key(member):
  return member[:-4] if member.endswith(".npy") else member


def _stored_npy_header(fd, info):
  """(header bytes, shape, fortran_order, dtype, data offset) of an uncompressed .npy member.

  One read of the zip local header and the .npy header behind it; parsed
  headers are cached, as every weight set of one model repeats them.
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


def metadata(path):
  """{key: (shape, dtype)} from the .npy headers inside an .npz, without reading the arrays.

  Raises one of READ_ERRORS when the file is not a readable .npz.
  """
  with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
    out = {}
    for info in archive.infolist():
      if info.compress_type == zipfile.ZIP_STORED:  # One small read per member.
        _, shape, _, dtype, _ = _stored_npy_header(f.fileno(), info)
      else:
        with archive.open(info) as member:
          shape, _, dtype = _npy_header(member)
      out[_key(info.filename)] = (shape, dtype)
    return out


def _map_stored_npy(fd, mapped, info):
  """An uncompressed (`np.savez`) member as an array over the mapped file, CRC-checked.

  No copy: the array's bytes are the page cache's. The CRC-32 the zip stores
  is checked as `np.load` checks it, so a flipped bit in a weight is an
  error, not a silently wrong result.
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
  """Asks the kernel to read the whole file now, so the disk streams while the caller works.

  A no-op where the OS has no posix_fadvise (macOS).
  """
  if hasattr(os, "posix_fadvise"):
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)


def mapped_arrays(path, keys):
  """Yields (key, array) for each of `keys`, in file order (sequential reads), as each is read.

  The file is mapped, not read into process memory: stored arrays are views
  of the page cache, alive while they are (the map is never closed by hand).
  Files replaced by renames, as stockpot writes them, leave a mapped file as
  it was; a file truncated in place while mapped would stop the process
  (SIGBUS), as for any mapped file. Raises one of READ_ERRORS when the file
  is not a readable .npz or lacks a key.
  """
  keys = set(keys)
  # One open file for the zip directory and the data: a rename between two opens
  # would pair one file's members with another's bytes.
  with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
    _read_ahead(f.fileno())
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    members = {_key(info.filename): info for info in archive.infolist()}
    missing = sorted(keys - set(members))
    if missing:
      raise ValueError(f"no parameter {missing[0]!r}")
    for key, info in sorted(members.items(), key=lambda item: item[1].header_offset):
      if key not in keys:
        continue
      if info.compress_type == zipfile.ZIP_STORED:
        yield key, _map_stored_npy(f.fileno(), mapped, info)
      else:  # `np.savez_compressed`: zipfile inflates and checks the CRC.
        with archive.open(info) as member:
          yield key, np.lib.format.read_array(member, allow_pickle=False)
