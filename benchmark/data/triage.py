"""Bad records in prepared TFRecords: found before training (every user
file read once, no image decoded), skipped on request (a mirror of the
directory without them), and named when TensorFlow fails on one during
training (one line per user file)."""

import dataclasses
import inspect
import os
from typing import Optional

from absl import logging
import tensorflow as tf

from benchmark.core import constants
from benchmark.core import errors
from benchmark.core.errors import FlairInputError
from benchmark.data import formats
from benchmark.data import label_sets
from benchmark.data import pipeline

# The first bytes of every JPEG file (ITU-T T.81 Annex B).
_JPEG_MAGIC = b"\xff\xd8\xff"


# TF's record reader (length and CRC of every record checked, in C++), without
# the decorator that logs its deprecation notice when it is called: the
# replacement the notice names, one `tf.data.TFRecordDataset` per user file,
# is the same reader behind a dataset set up for each file: hundreds of
# times slower per file for FLAIR's small user files (docs/performance.md,
# "Checking user files").
_read_records = inspect.unwrap(tf.compat.v1.io.tf_record_iterator)


# Threads reading user files in `check_tfrecords` (reading is I/O bound and
# TF's record reader releases the GIL).
_CHECK_THREADS = 8


# Bad files named in the one-line-per-file error (the rest are counted).
_BAD_FILES_IN_ERROR = 50


@dataclasses.dataclass(frozen=True)
class FileCheck:
  """The result of checking one user file (`check_user_file`).

  Attributes:
    path: the user file.
    num_records: records read completely (good and bad).
    bad_records: 0-based indices of the records that cannot be used.
    unreadable_tail: the file is cut or corrupt after `num_records` records
      (what follows cannot be read, so its records cannot be counted).
    problem: the first problem found, naming the record; None if the file is
      good.
  """
  path: str
  num_records: int
  bad_records: tuple[int, ...] = ()
  unreadable_tail: bool = False
  problem: Optional[str] = None

  @property
  def ok(self) -> bool:
    """Whether every record of the file can be used."""
    return self.problem is None

  @property
  def num_skipped(self) -> int:
    """Records dropped when skipping bad records: the bad ones, plus one for
    an unreadable tail (at least one record was cut)."""
    return len(self.bad_records) + int(self.unreadable_tail)


def _record_problem(serialized: bytes,
                    label_spec: label_sets.LabelSpec) -> Optional[str]:
  """What is wrong with one serialized record, or None."""
  from google.protobuf import message  # pylint: disable=g-import-not-at-top
  try:
    example = tf.train.Example.FromString(serialized)
  except message.DecodeError:
    return "is not a tf.train.Example"
  feature = example.features.feature
  if constants.IMAGE_FEATURE not in feature:
    return f"has no {constants.IMAGE_FEATURE!r} feature"
  images = feature[constants.IMAGE_FEATURE].bytes_list.value
  if len(images) != 1 or not images[0].startswith(_JPEG_MAGIC):
    return f"feature {constants.IMAGE_FEATURE!r} is not one JPEG image"
  if label_spec.feature_key not in feature:
    return f"has no {label_spec.feature_key!r} feature"
  indices = feature[label_spec.feature_key].int64_list.value
  bad = [i for i in indices if not 0 <= i < label_spec.num_labels]
  if bad:
    return (f"has {label_spec.feature_key} index {bad[0]} outside the label "
            f"index (0..{label_spec.num_labels - 1}; was the directory "
            "prepared with another label index?)")
  return None


def check_user_file(path: str, label_spec: label_sets.LabelSpec) -> FileCheck:
  """Reads every record of one user file without decoding images.

  Checks that each record is readable (length and CRC, TF's record reader),
  is a `tf.train.Example`, holds one JPEG (by its first bytes) and the label
  feature of `label_spec` with indices inside the label index.

  Returns:
    A `FileCheck` (never raises for bad content; an unreadable file is a
    problem of the result).
  """
  bad, first, count, tail = [], None, 0, False
  try:
    for serialized in _read_records(path):
      problem = _record_problem(serialized, label_spec)
      if problem is not None:
        bad.append(count)
        if first is None:
          first = f"record {count} {problem}"
      count += 1
  except (tf.errors.OpError, OSError) as e:
    tail = True
    message = getattr(e, "message", None) or str(e)
    if first is None:
      first = (f"cannot be read after {count} record(s) (truncated or "
               f"corrupt file: {message.splitlines()[0] if message else e})")
  if first is None and count == 0:
    first = "holds no record"
  return FileCheck(path, count, tuple(bad), tail, first)


class BadTFRecordsError(FlairInputError):
  """User files that cannot be trained on; `checks` lists every bad one.

  The message is a summary line followed by one line per bad file."""

  def __init__(self, message: str, checks: list[FileCheck]):
    super().__init__(message)
    self.checks = checks


def _user_files(tfrecords_dir: str) -> list[str]:
  """Every user file of the three partitions."""
  paths = []
  for partition in constants.PARTITIONS:
    paths += formats.user_files(
        pipeline._partition_dir(tfrecords_dir, partition)).values()
  return paths


def check_tfrecords(tfrecords_dir: str, label_spec: label_sets.LabelSpec,
                    skip_bad_records: bool = False) -> list[FileCheck]:
  """Checks every user file of a prepared directory before training.

  A fast pass (records read and parsed, images not decoded; threads in
  parallel) over train, val and test.

  Args:
    tfrecords_dir: the `--tfrecords_dir`.
    label_spec: the labels the run trains on.
    skip_bad_records: report bad files in the log and return them instead of
      raising.

  Returns:
    The checks of the bad files (empty when all are good).

  Raises:
    FlairInputError: a missing directory or partition (see `load_partition`).
    BadTFRecordsError: without `skip_bad_records`, when any file is bad; the
      message lists every bad file, one line each.
  """
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  paths = _user_files(tfrecords_dir)
  start = time.monotonic()
  with concurrent.futures.ThreadPoolExecutor(_CHECK_THREADS) as pool:
    checks = list(pool.map(lambda p: check_user_file(p, label_spec), paths))
  bad = [c for c in checks if not c.ok]
  logging.info("Checked %d user files (%d records) of %s in %.1f s: %d bad.",
               len(paths), sum(c.num_records for c in checks), tfrecords_dir,
               time.monotonic() - start, len(bad))
  if not bad:
    return []
  lines = [f"{c.path}: {c.problem}" for c in bad[:_BAD_FILES_IN_ERROR]]
  if len(bad) > _BAD_FILES_IN_ERROR:
    lines.append(f"... and {len(bad) - _BAD_FILES_IN_ERROR} more file(s)")
  if not skip_bad_records:
    raise BadTFRecordsError(
        f"{len(bad)} of the {len(paths)} user files in --tfrecords_dir "
        f"{tfrecords_dir!r} cannot be trained on (rerun prepare_tfrecords.py "
        "on the dataset, or pass --skip_bad_records to train without the bad "
        "records):\n  " + "\n  ".join(lines), bad)
  logging.warning(
      "--skip_bad_records: skipping %d bad record(s) in %d user file(s):\n  %s",
      sum(c.num_skipped for c in bad), len(bad), "\n  ".join(lines))
  return bad


def mirror_without_bad_records(tfrecords_dir: str, bad: list[FileCheck],
                               target_dir: str) -> str:
  """A copy of `tfrecords_dir` to train on without the bad records.

  `target_dir` (recreated) gets the label index and, per partition, a
  symbolic link to each good user file and, for each file in `bad`, a new
  file with its good records only (records before an unreadable tail, minus
  the bad ones), written atomically; a user with no good record is left
  out.

  Args:
    tfrecords_dir: the checked directory.
    bad: `check_tfrecords(..., skip_bad_records=True)`.
    target_dir: where the mirror goes (inside the run's save directory).

  Returns:
    `target_dir`, to use as the run's TFRecords directory.

  Raises:
    OutputWriteError: a storage failure writing the mirror.
  """
  import shutil  # pylint: disable=g-import-not-at-top

  from benchmark.core import file_io
  bad_by_path = {os.path.abspath(c.path): c for c in bad}
  with file_io.output_errors(target_dir):
    shutil.rmtree(target_dir, ignore_errors=True)
    os.makedirs(target_dir)
    index_path = formats.find_label_index_file(tfrecords_dir)
    shutil.copyfile(index_path,
                    os.path.join(target_dir, os.path.basename(index_path)))
  for path in _user_files(tfrecords_dir):
    partition = os.path.basename(os.path.dirname(path))
    target = os.path.join(target_dir, partition, os.path.basename(path))
    with file_io.output_errors(target):
      os.makedirs(os.path.dirname(target), exist_ok=True)
    check = bad_by_path.get(os.path.abspath(path))
    if check is None:
      with file_io.output_errors(target):
        os.symlink(os.path.abspath(path), target)
      continue
    skipped = set(check.bad_records)
    if check.num_records == len(skipped):
      logging.warning("%s has no usable record; its user is left out.", path)
      continue
    with file_io.atomic_path(target) as tmp:
      with tf.io.TFRecordWriter(tmp) as writer:
        records = _read_records(path)
        for index in range(check.num_records):
          serialized = next(records)
          if index not in skipped:
            writer.write(serialized)
  return target_dir


def skipped_records_summary(bad: list[FileCheck]) -> dict:
  """`{"count": n, "files": {path: n}}`: the records skipped with
  `--skip_bad_records` (for final_metrics.json); an unreadable tail counts
  as one record."""
  return {"count": sum(c.num_skipped for c in bad),
          "files": {c.path: c.num_skipped for c in bad}}


def record_skipped_records(save_model_dir: str, final: dict,
                           bad: list[FileCheck]) -> dict:
  """Adds `"skipped_records"` (`skipped_records_summary`) to a run's final
  metrics and rewrites `final_metrics.json`; returns the new dict."""
  from benchmark.core import file_io  # pylint: disable=g-import-not-at-top
  final = dict(final, skipped_records=skipped_records_summary(bad))
  file_io.write_json_atomic(
      os.path.join(save_model_dir, constants.FINAL_METRICS_FILE), final)
  logging.warning("Trained without %d bad record(s) (--skip_bad_records); "
                  "see skipped_records in %s.", final["skipped_records"][
                      "count"], constants.FINAL_METRICS_FILE)
  return final


def find_files_failing_in_tensorflow(
    tfrecords_dir: str, label_spec: label_sets.LabelSpec) -> list[str]:
  """Reads every user file through the training parse function (records,
  features, labels and a full JPEG decode by TensorFlow) and returns one
  line `"<file>: <problem>"` per file that fails. Slower than
  `check_tfrecords` (every image is decoded); meant for after a data error
  during training, to name the file."""
  dataset_fn = pipeline.create_dataset_fn(label_spec)
  lines = []
  for path in _user_files(tfrecords_dir):
    try:
      dataset_fn(path).reduce(tf.constant(0, tf.int64),
                              lambda count, _: count + 1)
    except tf.errors.OpError as e:
      message = (e.message or str(e)).strip().splitlines()
      lines.append(f"{os.path.realpath(path)}: "
                   f"{message[0] if message else type(e).__name__}")
  return lines


# Texts of TensorFlow errors caused by the data (seen through the TFF worker's
# gRPC errors too, which carry only the text): a JPEG that does not decode, a
# record that does not read or parse, a label index out of range (the
# assertions of `create_parse_fn`), a user file gone.
_DATA_ERROR_TEXTS = (
    "DecodeJpeg", "jpeg::Uncompress", "Invalid JPEG data", "corrupted record",
    "truncated record", "DataLossError", "ParseExample", "ParseSingleExample",
    "label index >= ", "negative label index", ".tfrecords")


def _error_text(error: BaseException) -> str:
  details = getattr(error, "details", None)  # grpc.RpcError
  if callable(details):
    try:
      return str(details() or "")
    except Exception:  # pylint: disable=broad-except
      pass
  return str(getattr(error, "message", None) or error)


def is_data_error(error: BaseException) -> bool:
  """Whether an exception raised while training is a data error: a
  client's data that could not be read (`errors.ClientDataError`), a
  TensorFlow `InvalidArgumentError`, `DataLossError` or `NotFoundError`, or
  any exception (e.g. the TFF worker's gRPC error) whose text names a JPEG
  decode, record read or parse failure or a label index assertion."""
  if isinstance(error, (errors.ClientDataError,
                        tf.errors.InvalidArgumentError,
                        tf.errors.DataLossError, tf.errors.NotFoundError)):
    return True
  text = _error_text(error)
  return any(t in text for t in _DATA_ERROR_TEXTS)


def training_data_error(tfrecords_dir: str, label_spec: label_sets.LabelSpec,
                        error: BaseException) -> FlairInputError:
  """The one-line-per-file error for a data error raised during training
  (`tf.errors.InvalidArgumentError`, `DataLossError`, ...): names the user
  files that fail (`find_files_failing_in_tensorflow`) and what to do."""
  text = _error_text(error).strip()
  first = text.splitlines()[0] if text else type(error).__name__
  logging.error("Data error during training (%s); reading every user file "
                "to find the bad one.", first)
  lines = find_files_failing_in_tensorflow(tfrecords_dir, label_spec)
  if not lines:
    return FlairInputError(
        f"data error during training ({first}), but every user file of "
        f"--tfrecords_dir {tfrecords_dir!r} reads correctly now (was a file "
        "changed during the run?); rerun the same command to resume")
  return FlairInputError(
      f"data error during training in {len(lines)} user file(s) of "
      f"--tfrecords_dir {tfrecords_dir!r}; replace them (rerun "
      "prepare_tfrecords.py) or pass --skip_bad_records, then rerun the same "
      "command to resume:\n  " + "\n  ".join(lines))
