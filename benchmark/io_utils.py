"""Atomic file writing: a partial output never sits under its final name."""

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator

# The process umask, read once at import (reading it means setting it, which
# is not thread-safe later). mkstemp creates files 0600; final files get the
# permissions a plain open() would give them.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path beside `path`; renames it to `path` on success.

  The temporary name starts with `.` and ends with `.tmp` (so readers that glob
  for `*.tfrecords` or `*.jpg` never see it). On an exception the temporary
  file is removed and the exception propagates; `path` is left untouched.
  Parent directories are created. The rename is atomic on POSIX file systems
  (`os.replace`). The final file gets mode 0666 minus the umask, like a file
  made by `open(path, "w")`.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(
      dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  os.close(fd)
  try:
    yield tmp
    if os.path.exists(tmp):
      os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically."""
  with atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes `obj` as indented, key-sorted JSON to `path` atomically."""
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
