"""Atomic file writing: a partial output never sits under its final name."""

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path beside `path`; renames it to `path` on success.

  The temporary name starts with `.` and ends with `.tmp` (so readers that glob
  for `*.tfrecords` or `*.jpg` never see it). On an exception the temporary
  file is removed and the exception propagates; `path` is left untouched.
  Parent directories are created. The rename is atomic on POSIX file systems
  (`os.replace`).
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(
      dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  os.close(fd)
  try:
    yield tmp
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
