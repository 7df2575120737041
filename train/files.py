"""Atomic file writes: a reader sees the old file or the whole new one, never a part."""

import json
import os
import tempfile

from etils import epath


def write_bytes_atomic(path, data):
  """Writes `data` to `path` (local or object store) so it appears whole or not at all."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if "://" in str(path):  # Object stores publish a blob only once it is complete.
    path.write_bytes(data)
    return
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def write_json_atomic(path, obj):
  """Writes `obj` as indented JSON to `path`, atomically."""
  write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
