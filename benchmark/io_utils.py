"""Output files: atomic writing (a partial output never sits under its final
name), storage failures (disk full, read-only, permission) turned into
one-line errors naming the path, and the run identity of a trainer's
`--save_model_dir` (what run a directory holds; another run is refused)."""

import contextlib
import datetime
import errno
import fnmatch
import glob
import hashlib
import io
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Mapping, Optional, Sequence

from absl import logging

from benchmark import constants
from benchmark import errors
from benchmark import formats

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


def labels_identity(names: Sequence[str], use_fine_grained_labels: bool,
                    binary_label: Optional[str]) -> dict[str, Any]:
  """The label part of a run identity.

  Args:
    names: the label set's names in index order (`data.LabelSpec.names`).
    use_fine_grained_labels: fine-grained instead of coarse labels.
    binary_label: the single label predicted, or None.

  Returns:
    `{"set": "coarse"|"fine-grained", "binary_label": ..., "num_labels": n,
    "names_sha256": hex digest of the names in index order}`: two runs with
    the same label index file agree; a label index with another label or
    another order does not.
  """
  digest = hashlib.sha256(
      json.dumps(list(names), ensure_ascii=False).encode("utf-8")).hexdigest()
  return {"set": "fine-grained" if use_fine_grained_labels else "coarse",
          "binary_label": binary_label, "num_labels": len(names),
          "names_sha256": digest}


def model_identity(pretrained: bool, num_outputs: int) -> dict[str, Any]:
  """The model part of a run identity: ResNet-18 with GroupNorm, or with
  frozen BatchNorm when fine-tuned from `--restore_model_path`
  (`pretrained`), and its number of outputs."""
  return {"architecture": "resnet18",
          "normalization": "batch" if pretrained else "group",
          "num_outputs": int(num_outputs)}


def run_identity(trainer: str, labels: Mapping[str, Any],
                 model: Mapping[str, Any],
                 settings: Mapping[str, Any]) -> dict[str, Any]:
  """What a run is, as recorded in `<save_model_dir>/run.json`.

  Args:
    trainer: "central" or "federated".
    labels: `labels_identity(...)`.
    model: the model built, e.g. `{"architecture": "resnet18",
      "normalization": "group", "num_outputs": 17}`.
    settings: flag name -> value, for the flags that change results (not the
      output directory, batch sizes of evaluation, checkpoint frequency, or
      the number of epochs/rounds when more of them continue the same run).

  Returns:
    A JSON-serialisable dict; two runs may share a directory only when their
    identities are equal.
  """
  return {"trainer": trainer, "labels": dict(labels), "model": dict(model),
          "settings": dict(settings)}


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """Human-readable differences between two run identities."""
  if old.get("trainer") != new.get("trainer"):
    return [f"it holds a {old.get('trainer')} run, this is a "
            f"{new.get('trainer')} run"]
  found = []
  old_settings = old.get("settings") or {}
  new_settings = new.get("settings") or {}
  for name in sorted(set(old_settings) | set(new_settings)):
    if old_settings.get(name, "(unset)") != new_settings.get(name, "(unset)"):
      found.append(f"--{name} is {old_settings.get(name, '(unset)')!r} there, "
                   f"{new_settings.get(name, '(unset)')!r} now")
  old_labels = old.get("labels") or {}
  new_labels = new.get("labels") or {}
  if old_labels != new_labels and not found:
    found.append(
        f"its label set differs ({old_labels.get('num_labels')} "
        f"{old_labels.get('set')} labels there, {new_labels.get('num_labels')}"
        f" {new_labels.get('set')} labels now from the label index of "
        "--tfrecords_dir)")
  if (old.get("model") or {}) != (new.get("model") or {}) and not found:
    found.append(f"its model differs ({old.get('model')} there, "
                 f"{new.get('model')} now)")
  if not found and dict(old) != dict(new):
    found.append("its recorded run identity differs")
  return found


def run_outputs_in(save_model_dir: str) -> list[str]:
  """The names in `save_model_dir` that a trainer writes (sorted): the
  `constants.RUN_OUTPUT_NAMES`, best-weights files and temporary files of
  `atomic_path` for them. Other files are not a run's and are never
  touched."""
  try:
    names = os.listdir(save_model_dir)
  except FileNotFoundError:
    return []
  weights = constants.BEST_WEIGHTS_FILE_PATTERN.format(trainer="*",
                                                       num_outputs="*")
  found = []
  for name in names:
    base = name
    if name.startswith(".") and name.endswith(".tmp"):
      base = name[1:name.rfind(".", 0, len(name) - len(".tmp"))]
    if base in constants.RUN_OUTPUT_NAMES or fnmatch.fnmatch(base, weights):
      found.append(name)
  return sorted(found)


def claim_save_dir(save_model_dir: str, identity: Mapping[str, Any],
                   flag_values: Mapping[str, Any],
                   overwrite: bool = False) -> bool:
  """Makes `save_model_dir` this run's: refuses another run's directory.

  Creates the directory, then:
  * with `overwrite`, removes every output of an earlier run there
    (`run_outputs_in`; other files are kept) and starts afresh;
  * if `run.json` holds the same identity, the run resumes (returns True);
  * if it holds another identity, or outputs of a run are there without a
    `run.json` (a run of an older version, whose settings are unknown), the
    run is refused;
  * otherwise (a new or empty directory) the run starts afresh.
  Then writes `run.json` and `flags.json` (every flag value; a warning lists
  the flags whose values changed since the last run here, e.g. a longer
  `--num_epochs`).

  Args:
    save_model_dir: the run's output directory (created with parents).
    identity: `run_identity(...)` of this run.
    flag_values: every flag of the command, name -> JSON-serialisable value.
    overwrite: the `--overwrite` flag.

  Returns:
    True when an earlier part of the same run is resumed, False for a fresh
    start.

  Raises:
    FlairInputError: the directory cannot be created, or it holds another
      run without `overwrite`: one line naming the directory, the settings
      that differ and what to do (another --save_model_dir or --overwrite).
    OutputWriteError: a storage failure removing old files or writing
      `run.json`/`flags.json`.
  """
  try:
    os.makedirs(save_model_dir, exist_ok=True)
  except OSError as e:
    raise errors.FlairInputError(
        f"--save_model_dir {save_model_dir!r} cannot be created: "
        f"{e.strerror}") from e
  run_path = os.path.join(save_model_dir, constants.RUN_IDENTITY_FILE)
  outputs = run_outputs_in(save_model_dir)
  what_to_do = ("use another --save_model_dir, or add --overwrite to delete "
                "that run's files and start afresh")
  resumed = False
  if outputs and overwrite:
    with output_errors(save_model_dir):
      for name in outputs:
        path = os.path.join(save_model_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
          shutil.rmtree(path)
        else:
          os.remove(path)
    logging.warning("--overwrite: removed %d output(s) of the earlier run in "
                    "%s (%s)", len(outputs), save_model_dir, ", ".join(outputs))
  elif outputs:
    try:
      with open(run_path, encoding="utf-8") as f:
        previous = json.load(f)
    except FileNotFoundError:
      raise errors.FlairInputError(
          f"--save_model_dir {save_model_dir!r} holds outputs of an earlier "
          f"run whose settings were not recorded ({', '.join(outputs[:4])}"
          f"{', ...' if len(outputs) > 4 else ''}); {what_to_do}") from None
    except (OSError, ValueError) as e:
      raise errors.FlairInputError(
          f"--save_model_dir {save_model_dir!r}: {run_path} cannot be read "
          f"({e}); {what_to_do}") from e
    differences = _differences(previous, identity)
    if differences:
      raise errors.FlairInputError(
          f"--save_model_dir {save_model_dir!r} holds a different run: "
          f"{'; '.join(differences)}; {what_to_do}")
    resumed = True
    logging.info("%s holds an earlier part of this run; resuming it.",
                 save_model_dir)
  write_json_atomic(run_path, dict(identity))
  path = os.path.join(save_model_dir, constants.FLAGS_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      previous_flags = json.load(f)
  except (OSError, ValueError):
    previous_flags = {}
  changed = sorted(k for k in flag_values
                   if k in previous_flags and previous_flags[k] != flag_values[k])
  if changed:
    logging.warning(
        "%s was written by a run with other values of %s; the resumed run "
        "continues with the new values.", path,
        ", ".join(f"--{k} ({previous_flags[k]!r} -> {flag_values[k]!r})"
                  for k in changed))
  write_json_atomic(path, dict(flag_values))
  return resumed


def fresh_run_dir(trainer: str, parent: str = constants.DEFAULT_RUNS_DIR,
                  now: Optional[datetime.datetime] = None) -> str:
  """A new directory name for a run: `<parent>/<trainer>-<UTC time>`, with
  `-2`, `-3`, ... appended when that exists. Not created here.

  Args:
    trainer: "central" or "federated".
    parent: the runs directory (default `./runs`).
    now: the time to use (default: now, UTC).

  Returns:
    e.g. `runs/central-20260131-142501`.
  """
  now = now or datetime.datetime.now(datetime.timezone.utc)
  base = os.path.join(parent, f"{trainer}-{now:%Y%m%d-%H%M%S}")
  candidate, n = base, 1
  while os.path.exists(candidate):
    n += 1
    candidate = f"{base}-{n}"
  return candidate
