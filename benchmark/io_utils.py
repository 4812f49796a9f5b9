"""Atomic file writing: a partial output never sits under its final name."""

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator, Mapping

from absl import logging

from benchmark import constants
from benchmark import errors

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


def prepare_save_dir(save_model_dir: str, flag_values: Mapping[str, Any]
                     ) -> None:
  """Creates a trainer's `--save_model_dir` and writes `flags.json` there.

  Args:
    save_model_dir: the run's output directory (created with parents).
    flag_values: every flag of the command, name -> JSON-serialisable value.

  Warns (absl logging) when `flags.json` from an earlier run in the same
  directory has other values: a rerun resumes with the new ones.

  Raises:
    FlairInputError: the directory cannot be created (names the flag).
  """
  try:
    os.makedirs(save_model_dir, exist_ok=True)
  except OSError as e:
    raise errors.FlairInputError(
        f"--save_model_dir {save_model_dir!r} cannot be created: "
        f"{e.strerror}") from e
  path = os.path.join(save_model_dir, constants.FLAGS_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      previous = json.load(f)
  except (OSError, ValueError):
    previous = {}
  changed = sorted(k for k in flag_values
                   if k in previous and previous[k] != flag_values[k])
  if changed:
    logging.warning(
        "%s was written by a run with other values of %s; a resumed run "
        "continues with the new values.", path,
        ", ".join(f"--{k} ({previous[k]!r} -> {flag_values[k]!r})"
                  for k in changed))
  write_json_atomic(path, dict(flag_values))
