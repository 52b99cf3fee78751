"""The file access of tables/ and figures/: run directories and outputs, local or ``gs://``.

Everything goes through :mod:`core.storage`; this module only adds the forgiving behaviour the
renderers want (a missing directory lists as empty), so swapping the storage backend touches
nothing else.
"""
from __future__ import annotations

from core import storage

join = storage.join
exists = storage.exists
isdir = storage.isdir
read_text = storage.read_text
read_bytes = storage.read_bytes
write_text = storage.write_text
write_bytes = storage.write_bytes
makedirs = storage.makedirs
is_remote = storage.is_remote


def listdir(path: str) -> list[str]:
  """Names (not paths) of a directory's entries, sorted; [] if it does not exist."""
  try:
    return storage.listdir(path)
  except FileNotFoundError:  # core.storage.NotFoundError
    return []
