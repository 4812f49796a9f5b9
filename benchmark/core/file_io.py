"""Output files: atomic writing (a partial output never sits under its final
name) and storage failures (disk full, read-only, permission) turned into
one-line errors naming the path."""

import contextlib
import errno
import glob
import io
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Optional, Sequence

from absl import logging

from benchmark.core import errors
from benchmark.data import formats

# The process umask, read once at import (reading it means setting it, which
# is not thread-safe later). mkstemp creates files 0600; final files get the
# permissions a plain open() would give them.
_UMASK = os.umask(0)


os.umask(_UMASK)


# errno -> what the user should do about it.
_STORAGE_ERRNO_ADVICE = {
    errno.ENOSPC: "free space there",
    errno.EDQUOT: "free space there (disk quota exceeded)",
    errno.EFBIG: "use a file system that allows larger files",
    errno.EROFS: "choose a writable location",
    errno.EACCES: "fix its permissions or choose another location",
    errno.EPERM: "fix its permissions or choose another location",
    errno.EIO: "check the device",
}


# The same failures as TensorFlow's C++ file system reports them (its errors
# carry the strerror text, not the errno).
_STORAGE_STRERRORS = {os.strerror(n): n for n in _STORAGE_ERRNO_ADVICE}


def storage_errno(error: BaseException) -> Optional[int]:
  """The errno when `error` is a storage failure, else None.

  A storage failure is an `OSError` whose errno is one of ENOSPC, EDQUOT,
  EFBIG, EROFS, EACCES, EPERM, EIO, or any exception (TensorFlow's
  `ResourceExhaustedError`, h5py's wrapped errors) whose text carries one of
  their messages ("No space left on device", ...). Chained causes are
  searched too.
  """
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _STORAGE_ERRNO_ADVICE:
      return error.errno
    text = str(error)
    for message, number in _STORAGE_STRERRORS.items():
      if message in text:
        return number
    error = error.__cause__ or error.__context__
  return None


def _without_temporary_part(path: str) -> str:
  """`path` up to the first component that is a library's temporary name
  (`.name.x.tmp`, `ckpt-1_temp`, `...tempstate123`): the output being
  written, as the user knows it."""
  parts = path.split(os.sep)
  for i, part in enumerate(parts):
    if i and ("_temp" in part or "tempstate" in part
              or (part.startswith(".") and part.endswith(".tmp"))):
      return os.sep.join(parts[:i]) or path
  return path


def _named_path(error: BaseException, path: str) -> str:
  """The output inside `path` that `error` names (an `OSError`'s filename, or
  a path starting with `path` in the message; temporary names cut off), else
  `path`."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.filename:
      return _without_temporary_part(os.fspath(error.filename))
    text = str(error)
    for prefix in {path, os.path.abspath(path)}:
      start = text.find(prefix)
      if start >= 0:
        end = start + len(prefix)
        while end < len(text) and text[end] not in " \t\n;:'\"),]":
          end += 1
        return _without_temporary_part(text[start:end])
    error = error.__cause__ or error.__context__
  return path


def output_write_error(path: str, error: BaseException,
                       flag: str = "--save_model_dir",
                       exact: bool = False) -> errors.OutputWriteError:
  """The one-line `OutputWriteError` for a storage failure writing `path`.

  Args:
    path: the output file or directory that could not be written.
    error: the exception raised (a storage failure, see `storage_errno`).
    flag: the flag that chose the location, named in the advice.
    exact: name `path` itself; otherwise the file inside `path` that the
      error names, when it names one.
  """
  number = storage_errno(error)
  reason = os.strerror(number) if number is not None else str(error)
  advice = _STORAGE_ERRNO_ADVICE.get(number, "check the location")
  if not exact:
    path = _named_path(error, path)
  return errors.OutputWriteError(
      f"cannot write {path}: {reason}; {advice} (or use another {flag}) and "
      "rerun the same command: it continues from what was saved completely")


@contextlib.contextmanager
def output_errors(path: str, flag: str = "--save_model_dir",
                  exact: bool = False) -> Iterator[None]:
  """Turns a storage failure inside the block into `OutputWriteError`.

  Args:
    path: the output (file or directory) named in the message.
    flag: the flag that chose the location.
    exact: always name `path`; otherwise name the file inside `path` that the
      error names, when it names one.

  Raises:
    errors.OutputWriteError: a storage failure (see `storage_errno`) was
      raised in the block; the original exception is its cause. Other
      exceptions propagate unchanged.
  """
  try:
    yield
  except errors.OutputWriteError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    if storage_errno(e) is None:
      raise
    raise output_write_error(path, e, flag, exact) from e


def _is_about(error: BaseException, paths: Sequence[str]) -> bool:
  """Whether a storage failure concerns one of `paths` (or names no file)."""
  if isinstance(error, OSError) and error.filename is not None:
    return os.fspath(error.filename) in paths
  text = str(error)
  names_a_path = any(p in text for p in paths)
  return names_a_path or "/" not in text


@contextlib.contextmanager
def atomic_path(path: str, flag: str = "--save_model_dir") -> Iterator[str]:
  """Yields a temporary path beside `path`; renames it to `path` on success.

  The temporary name starts with `.` and ends with `.tmp` (so readers that glob
  for `*.tfrecords` or `*.jpg` never see it). On an exception the temporary
  file is removed and the exception propagates; `path` is left untouched.
  Parent directories are created. The rename is atomic on POSIX file systems
  (`os.replace`). The final file gets mode 0666 minus the umask, like a file
  made by `open(path, "w")`.

  Raises:
    errors.OutputWriteError: the disk is full, the location read-only or not
      permitted, or the device failed, while creating, writing (a failure in
      the block that concerns the temporary file or `path`) or renaming the
      file; the message names `path` and `flag`. Nothing is left behind.
  """
  directory = os.path.dirname(os.path.abspath(path))
  with output_errors(directory, flag):
    os.makedirs(directory, exist_ok=True)
  with output_errors(path, flag, exact=True):
    fd, tmp = tempfile.mkstemp(
        dir=directory, prefix="." + os.path.basename(path) + ".",
        suffix=".tmp")
    os.close(fd)
  try:
    yield tmp
    with output_errors(path, flag, exact=True):
      if os.path.exists(tmp):
        os.chmod(tmp, 0o666 & ~_UMASK)
      os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    if (isinstance(e, Exception) and not isinstance(e, errors.OutputWriteError)
        and storage_errno(e) is not None and _is_about(e, (tmp, path))):
      raise output_write_error(path, e, flag, exact=True) from e
    raise


def drop_partial_last_line(path: str) -> None:
  """Truncates the text file `path` after its last newline, removing a line
  cut short by a failed append; does nothing when the file is missing or
  ends with a newline (a failure to tidy is logged, not raised)."""
  try:
    with open(path, "rb+") as f:
      text = f.read()
      if text and not text.endswith(b"\n"):
        f.truncate(text.rfind(b"\n") + 1)
  except FileNotFoundError:
    pass
  except OSError as e:
    logging.warning("could not tidy %s after a failed write: %s", path, e)


def drop_partial_last_record(path: str) -> None:
  """Truncates the TFRecord file `path` (e.g. a TensorBoard events file)
  after its last complete record, removing a record cut short by a failed
  append; does nothing when the file is missing or ends with a complete
  record (a failure to tidy is logged, not raised). Record lengths are
  followed, CRCs are not checked."""
  try:
    with open(path, "rb+") as f:
      _, end = formats.complete_tfrecords(f)
      if end < os.fstat(f.fileno()).st_size:
        f.truncate(end)
  except FileNotFoundError:
    pass
  except OSError as e:
    logging.warning("could not tidy %s after a failed write: %s", path, e)


def drop_partial_event_records(directory: str) -> None:
  """`drop_partial_last_record` on every TensorBoard events file
  (`events.out.tfevents.*`) under `directory`."""
  for root, _, names in os.walk(directory):
    for name in names:
      if name.startswith("events.out.tfevents."):
        drop_partial_last_record(os.path.join(root, name))


@contextlib.contextmanager
def summary_output(directory: str,
                   flag: str = "--save_model_dir") -> Iterator[None]:
  """For TensorBoard summaries written under `directory` (`tf.summary`, TFF's
  `TensorBoardReleaseManager`): on a storage failure in the block, a record
  cut short at the end of an events file is dropped (the file stays
  readable, earlier summaries kept) and `OutputWriteError` naming the events
  file is raised (cause: the original error). Other exceptions propagate
  unchanged."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    if isinstance(e, errors.OutputWriteError) or storage_errno(e) is None:
      raise
    drop_partial_event_records(directory)
    raise output_write_error(directory, e, flag) from e


@contextlib.contextmanager
def tff_output(path: str, flag: str = "--save_model_dir") -> Iterator[None]:
  """For an output that TFF's file program-state and release managers write:
  they write `<path>_temp<N>` and rename it to `path`, or append to a CSV
  `path` in place. On a storage failure in the block the temporary
  `<path>_temp*` files or directories are removed and a line cut short at the
  end of a file `path` is dropped, then `OutputWriteError` naming `path` is
  raised (cause: the original error). Other exceptions propagate unchanged.
  """
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    if isinstance(e, errors.OutputWriteError) or storage_errno(e) is None:
      raise
    for leftover in glob.glob(glob.escape(path) + "_temp*"):
      if os.path.isdir(leftover):
        shutil.rmtree(leftover, ignore_errors=True)
      else:
        with contextlib.suppress(OSError):
          os.remove(leftover)
    if os.path.isfile(path):
      drop_partial_last_line(path)
    raise output_write_error(path, e, flag, exact=True) from e


def write_bytes_atomic(path: str, data: bytes,
                       flag: str = "--save_model_dir") -> None:
  """Writes `data` to `path` atomically and flushes it to the disk (fsync),
  so a full disk is reported here rather than lost later.

  Raises:
    errors.OutputWriteError: see `atomic_path`.
  """
  with atomic_path(path, flag) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())


def save_keras_weights_h5(model, path: str) -> None:
  """Saves `model`'s weights as a Keras HDF5 weights file at `path`.

  The same format as `model.save_weights(path, save_format="h5")` (readable
  by `model.load_weights`), but the HDF5 file is built in memory and then
  written with `write_bytes_atomic`: HDF5 writing straight to a full disk
  leaves the library in a state that crashes the process at exit
  (segmentation fault).

  Args:
    model: a built `tf.keras.Model`.
    path: the final `.h5` path.

  Raises:
    errors.OutputWriteError: disk full, read-only, permission or I/O error
      writing `path` (nothing left under `path` or a temporary name).
  """
  import h5py  # pylint: disable=g-import-not-at-top
  from keras.src.saving.legacy import hdf5_format  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  with h5py.File(buffer, "w") as f:
    hdf5_format.save_weights_to_hdf5_group(f, model)
  write_bytes_atomic(path, buffer.getvalue())


def write_text_atomic(path: str, text: str,
                      flag: str = "--save_model_dir") -> None:
  """Writes `text` (UTF-8) to `path` atomically (see `write_bytes_atomic`;
  `OutputWriteError` on a storage failure, naming `path` and `flag`)."""
  write_bytes_atomic(path, text.encode("utf-8"), flag)


def write_json_atomic(path: str, obj: Any,
                      flag: str = "--save_model_dir") -> None:
  """Writes `obj` as indented, key-sorted JSON to `path` atomically
  (`OutputWriteError` on a storage failure, naming `path` and `flag`)."""
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n",
                    flag)
