"""Per-user FLAIR TFRecords as TFF client data, and client preprocessing.

A prepared TFRecords directory (docs/formats.md, "Per-user TFRecords") is

    <tfrecords_dir>/label_index.json   (or label_to_index.json)
    <tfrecords_dir>/<partition>/<user_id>.tfrecords

with partitions `train`, `val` (also accepted as `dev`) and `test`. Each user
file holds one `tf.train.Example` per image with the JPEG bytes and the int64
indices of its coarse and fine-grained labels. Here each partition becomes a
`tff.simulation.datasets.FilePerUserClientData` with one client per user file
(client id = file name without `.tfrecords` = the FLAIR user id), whose
elements are `(image, label)`:

* `image`: `tf.uint8`, shape `[256, 256, 3]`, the decoded JPEG;
* `label`: `tf.int32`, shape `[num_outputs]`: a multi-hot vector over the
  coarse (17) or fine-grained labels, or, with a binary label, a single 0/1
  value that is 1 iff the image carries that label.

Decoding and preprocessing are pure `tf.data` / TF ops, so the client datasets
can be built inside TFF computations (`serializable_dataset_fn`).

The layout follows TFF's `FilePerUserClientData` and the preprocessing mirrors
TFF's baseline `ClientSpec` (shuffle, take `max_elements`, repeat epochs,
batch).
"""

import dataclasses
import difflib
import os
from typing import Callable, Optional

from absl import logging
import tensorflow as tf
import tensorflow_federated as tff

from benchmark import constants
from benchmark import formats
from benchmark import validate
from benchmark.errors import FlairInputError

# Above this many valid names, an unknown-label error lists close matches
# instead of every name (the fine-grained set has ~1,628).
_MAX_NAMES_IN_ERROR = 50

PreprocessFn = Callable[[tf.data.Dataset], tf.data.Dataset]


@dataclasses.dataclass(frozen=True)
class LabelSpec:
  """Which labels a model predicts.

  Attributes:
    names: label names in index order (the index in the label index JSON), of
      the coarse labels or, with `use_fine_grained_labels`, the fine-grained
      ones.
    use_fine_grained_labels: read the `fine_grained_labels` feature instead of
      the coarse `labels`.
    binary_label: when set, the one label (a member of `names`) that becomes a
      single 0/1 target.
  """
  names: tuple[str, ...]
  use_fine_grained_labels: bool = False
  binary_label: Optional[str] = None

  def __post_init__(self):
    if not isinstance(self.names, tuple) or not self.names:
      raise FlairInputError("LabelSpec.names must be a non-empty tuple of "
                            "label names")
    if len(set(self.names)) != len(self.names):
      raise FlairInputError("LabelSpec.names has duplicate label names")
    if self.binary_label is not None and self.binary_label not in self.names:
      raise FlairInputError(
          f"LabelSpec.binary_label {self.binary_label!r} is not one of the "
          f"{self.kind} labels")

  @property
  def kind(self) -> str:
    """`"fine-grained"` or `"coarse"`."""
    return "fine-grained" if self.use_fine_grained_labels else "coarse"

  @property
  def feature_key(self) -> str:
    """The `tf.train.Example` feature holding this label set's indices."""
    return (constants.FINE_GRAINED_LABELS_FEATURE
            if self.use_fine_grained_labels else constants.LABELS_FEATURE)

  @property
  def num_labels(self) -> int:
    """Size of the label set (`len(names)`)."""
    return len(self.names)

  @property
  def num_outputs(self) -> int:
    """Model outputs: 1 with a binary label, else the number of labels."""
    return 1 if self.binary_label is not None else len(self.names)

  @property
  def binary_index(self) -> Optional[int]:
    """The index of `binary_label`, or None."""
    if self.binary_label is None:
      return None
    return self.names.index(self.binary_label)


def _unknown_label_message(label: str, spec_kind: str,
                           names: tuple[str, ...], path: str) -> str:
  if len(names) <= _MAX_NAMES_IN_ERROR:
    valid = ", ".join(names)
    return (f"--binary_label {label!r} is not a {spec_kind} label; valid "
            f"names: {valid}")
  close = difflib.get_close_matches(label, names, n=10)
  hint = (f"close matches: {', '.join(close)}" if close
          else "no close matches")
  return (f"--binary_label {label!r} is not one of the {len(names)} "
          f"{spec_kind} labels listed in {path} ({hint})")


def load_label_spec(tfrecords_dir: str,
                    use_fine_grained_labels: bool = False,
                    binary_label: Optional[str] = None) -> LabelSpec:
  """Reads the label index of a TFRecords directory into a `LabelSpec`.

  Args:
    tfrecords_dir: a directory written by `prepare_tfrecords.py`.
    use_fine_grained_labels: use the fine-grained label set instead of the 17
      coarse labels.
    binary_label: optional name of one label (of the chosen set) to predict as
      a single 0/1 output.

  Returns:
    The label spec, `names` in index order.

  Raises:
    FlairInputError: if the directory or label index is missing or malformed,
      or `binary_label` is not a label of the chosen set (the message lists
      the valid names, or close matches for the fine-grained set).
  """
  path, index = formats.read_label_index(tfrecords_dir)
  key = (constants.FINE_GRAINED_LABELS_KEY if use_fine_grained_labels
         else constants.LABELS_KEY)
  names = index[key]
  if not names:
    raise FlairInputError(f"{path}: {key!r} holds no labels")
  kind = "fine-grained" if use_fine_grained_labels else "coarse"
  if binary_label is not None and binary_label not in names:
    raise FlairInputError(
        _unknown_label_message(binary_label, kind, names, path))
  return LabelSpec(names=names,
                   use_fine_grained_labels=bool(use_fine_grained_labels),
                   binary_label=binary_label)


def create_parse_fn(label_spec: LabelSpec
                   ) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
  """Returns a pure-TF function: serialized `tf.train.Example` -> example.

  The returned function maps a scalar `tf.string` to `(image, label)`, image
  `tf.uint8 [256, 256, 3]` (decoded JPEG, channels forced to 3; a JPEG of
  another size fails at run time with an `InvalidArgumentError`), label
  `tf.int32 [label_spec.num_outputs]` (multi-hot over `label_spec.names`, or
  `[1]` / `[0]` for the binary label). A label index outside
  `[0, num_labels)` fails at run time with an `InvalidArgumentError`.
  """
  num_labels = label_spec.num_labels
  binary_index = label_spec.binary_index
  features = {
      constants.IMAGE_FEATURE: tf.io.FixedLenFeature([], tf.string),
      label_spec.feature_key: tf.io.VarLenFeature(tf.int64),
  }

  def parse(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    parsed = tf.io.parse_single_example(serialized, features)
    image = tf.io.decode_jpeg(parsed[constants.IMAGE_FEATURE], channels=3)
    image = tf.ensure_shape(image, constants.IMAGE_SHAPE)
    indices = parsed[label_spec.feature_key].values
    checks = [
        tf.debugging.assert_non_negative(
            indices, message="negative label index in a TFRecord"),
        tf.debugging.assert_less(
            indices, tf.constant(num_labels, tf.int64),
            message=f"label index >= {num_labels} in a TFRecord "
            "(does the label index JSON match the records?)"),
    ]
    with tf.control_dependencies(checks):
      if binary_index is not None:
        present = tf.reduce_any(tf.equal(indices, binary_index))
        label = tf.reshape(tf.cast(present, tf.int32), [1])
      else:
        counts = tf.math.bincount(tf.cast(indices, tf.int32),
                                  minlength=num_labels, maxlength=num_labels,
                                  dtype=tf.int32)
        label = tf.minimum(counts, 1)
    label = tf.ensure_shape(label, [label_spec.num_outputs])
    return image, label

  return parse


def create_dataset_fn(
    label_spec: LabelSpec,
    max_records: Optional[int] = None) -> Callable[[str], tf.data.Dataset]:
  """Returns `path -> tf.data.Dataset` of parsed examples of one user file.

  `path` may be a Python string or a scalar `tf.string` tensor (as TFF's
  `FilePerUserClientData.serializable_dataset_fn` passes it). With
  `max_records`, only the file's first `max_records` records are read and
  decoded (for a fixed subset of a user's images, as
  `scripts/bench_vs_pfl.py` trains central on).

  Raises:
    FlairInputError: if `max_records` is not None or a positive integer.
  """
  validate.check_int("max_records", max_records, allow_none=True)
  parse = create_parse_fn(label_spec)

  def dataset_fn(path) -> tf.data.Dataset:
    records = tf.data.TFRecordDataset(path)
    if max_records is not None:
      records = records.take(max_records)
    return records.map(
        parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  return dataset_fn


def _partition_dir(tfrecords_dir: str, partition: str) -> str:
  """Resolves `partition` (or its alias) to its one existing directory."""
  path = formats.find_partition_dir(tfrecords_dir, partition)
  if path is None:
    candidates = formats.partition_folder_names(partition)
    raise FlairInputError(
        f"partition {candidates[0]!r} not found in --tfrecords_dir "
        f"{tfrecords_dir!r}: expected a subdirectory "
        f"{' or '.join(repr(c + '/') for c in candidates)}")
  return path


def load_partition(tfrecords_dir: str, partition: str,
                   label_spec: LabelSpec
                  ) -> tff.simulation.datasets.FilePerUserClientData:
  """Loads one partition as TFF client data, one client per user file.

  Args:
    tfrecords_dir: a directory written by `prepare_tfrecords.py`.
    partition: `train`, `val` or `test`; `dev` is accepted for `val`, and a
      `dev/` directory is read in place of `val/` (both is an error).
    label_spec: from `load_label_spec` on the same directory.

  Returns:
    Client data whose client ids are the user file stems (user ids) and whose
    elements are `(image uint8 [256, 256, 3], label int32 [num_outputs])`.

  Raises:
    FlairInputError: if the directory or partition is missing, the partition
      name is unknown, both `val/` and `dev/` exist, or the partition holds
      no `*.tfrecords` file.
  """
  return tff.simulation.datasets.FilePerUserClientData(
      partition_files(tfrecords_dir, partition), create_dataset_fn(label_spec))


def partition_files(tfrecords_dir: str, partition: str) -> dict[str, str]:
  """The user files of one partition: `{user id: path}`, sorted by user id.

  Raises:
    FlairInputError: as `load_partition`.
  """
  directory = _partition_dir(tfrecords_dir, partition)
  files = formats.user_files(directory)
  if not files:
    raise FlairInputError(
        f"partition directory {directory!r} holds no "
        f"*{constants.TFRECORD_SUFFIX} files "
        "(expected one file per user)")
  return files


def load_client_data(
    tfrecords_dir: str, label_spec: LabelSpec
) -> dict[str, tff.simulation.datasets.FilePerUserClientData]:
  """Loads all three partitions: `{"train": ..., "val": ..., "test": ...}`.

  Raises:
    FlairInputError: as `load_partition`, for any partition.
  """
  return {partition: load_partition(tfrecords_dir, partition, label_spec)
          for partition in constants.PARTITIONS}


@dataclasses.dataclass(frozen=True)
class ClientSpec:
  """How a training client turns its examples into batches.

  Attributes:
    num_epochs: passes over the (possibly truncated) client data, >= 1.
    batch_size: examples per batch, >= 1 (the last batch may be smaller).
    max_elements: at most this many examples per client (>= 1), or None for
      all of them.
    shuffle_buffer_size: buffer of `tf.data.Dataset.shuffle`, >= 1; 1 means no
      shuffling.
  """
  num_epochs: int
  batch_size: int
  max_elements: Optional[int] = None
  shuffle_buffer_size: int = 1000

  def __post_init__(self):
    validate.check_int("ClientSpec.num_epochs", self.num_epochs)
    validate.check_int("ClientSpec.batch_size", self.batch_size)
    validate.check_int("ClientSpec.max_elements", self.max_elements,
                       allow_none=True)
    validate.check_int("ClientSpec.shuffle_buffer_size",
                       self.shuffle_buffer_size)


def create_train_preprocess_fn(spec: ClientSpec,
                               seed: Optional[int] = None) -> PreprocessFn:
  """Returns the training preprocessing for one client's dataset.

  The client's examples are shuffled once (buffer `spec.shuffle_buffer_size`),
  the first `spec.max_elements` are kept, that same sequence is repeated
  `spec.num_epochs` times, and the result is batched by `spec.batch_size`
  (the last batch may be smaller). The shuffle is drawn afresh each time the
  dataset is built (each round, in TFF), from `seed` when it is given (then
  every build gives the same order) or at random when it is None.

  The function uses only `tf.data` ops, so it can be traced inside a TFF
  computation.

  Args:
    spec: the validated client spec.
    seed: optional shuffle seed.

  Returns:
    `dataset -> dataset` of batches `(images [b, ...], labels [b, ...])`.
  """
  if not isinstance(spec, ClientSpec):
    raise TypeError(f"spec must be a ClientSpec, got {type(spec).__name__}")

  def preprocess(dataset: tf.data.Dataset) -> tf.data.Dataset:
    if spec.shuffle_buffer_size > 1:
      dataset = dataset.shuffle(spec.shuffle_buffer_size, seed=seed,
                                reshuffle_each_iteration=False)
    if spec.max_elements is not None:
      dataset = dataset.take(spec.max_elements)
    return dataset.repeat(spec.num_epochs).batch(spec.batch_size)

  return preprocess


def create_eval_preprocess_fn(batch_size: int) -> PreprocessFn:
  """Returns the evaluation preprocessing: batching by `batch_size` (>= 1).

  Raises:
    FlairInputError: if `batch_size` is not a positive integer.
  """
  validate.check_int("eval batch_size", batch_size)

  def preprocess(dataset: tf.data.Dataset) -> tf.data.Dataset:
    return dataset.batch(batch_size)

  return preprocess


def keras_input(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Finishes a pipeline that Keras iterates afresh for every epoch or
  evaluation: `dataset.prefetch(tf.data.AUTOTUNE)` with tf.data's
  autotuning model turned off (`tf.data.Options().autotune.enabled =
  False`). Same elements, shapes and dtypes as `dataset`.

  With the model on (TF 2.14), destroying such an iterator returns only at
  the model thread's next wake-up; its wake-ups come 10, 20, 40, ... ms
  apart (doubling, up to 60 s). Measured on a 2-core CPU: Keras `fit` calls
  that trained for 0.75 s returned after 1.27 s (10 ms x (2^7 - 1)), calls
  of about 4.6 s after 5.11 s, and `evaluate` calls of 0.8 s after 1.27 s;
  with the model off they returned when the pass ended. Without the model,
  `AUTOTUNE` stages run at TensorFlow's fixed default parallelism, and
  `prefetch(AUTOTUNE)` keeps its own buffer tuning.
  """
  options = tf.data.Options()
  options.autotune.enabled = False
  return dataset.prefetch(tf.data.AUTOTUNE).with_options(options)


def eval_dataset(client_data: tff.simulation.datasets.ClientData,
                 batch_size: int) -> tf.data.Dataset:
  """Every client of an evaluation partition pooled into one dataset, as both
  trainers evaluate: the clients in a fixed order (seed 0), batches of
  `batch_size` (`create_eval_preprocess_fn`), finished by `keras_input`.
  Elements: `(images [b, 256, 256, 3] uint8, labels [b, num_outputs]
  int32)`.

  Raises:
    FlairInputError: if `batch_size` is not a positive integer.
  """
  pooled = client_data.create_tf_dataset_from_all_clients(seed=0)
  return keras_input(create_eval_preprocess_fn(batch_size)(pooled))


# --- Checking prepared TFRecords before training -----------------------------

# The first bytes of every JPEG file (ITU-T T.81 Annex B).
_JPEG_MAGIC = b"\xff\xd8\xff"
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


def _record_problem(serialized: bytes, label_spec: LabelSpec) -> Optional[str]:
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


def check_user_file(path: str, label_spec: LabelSpec) -> FileCheck:
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
    for serialized in tf.compat.v1.io.tf_record_iterator(path):
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
        _partition_dir(tfrecords_dir, partition)).values()
  return paths


def check_tfrecords(tfrecords_dir: str, label_spec: LabelSpec,
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
  from benchmark import io_utils  # pylint: disable=g-import-not-at-top
  bad_by_path = {os.path.abspath(c.path): c for c in bad}
  with io_utils.output_errors(target_dir):
    shutil.rmtree(target_dir, ignore_errors=True)
    os.makedirs(target_dir)
    index_path = formats.find_label_index_file(tfrecords_dir)
    shutil.copyfile(index_path,
                    os.path.join(target_dir, os.path.basename(index_path)))
  for path in _user_files(tfrecords_dir):
    partition = os.path.basename(os.path.dirname(path))
    target = os.path.join(target_dir, partition, os.path.basename(path))
    with io_utils.output_errors(target):
      os.makedirs(os.path.dirname(target), exist_ok=True)
    check = bad_by_path.get(os.path.abspath(path))
    if check is None:
      with io_utils.output_errors(target):
        os.symlink(os.path.abspath(path), target)
      continue
    skipped = set(check.bad_records)
    if check.num_records == len(skipped):
      logging.warning("%s has no usable record; its user is left out.", path)
      continue
    with io_utils.atomic_path(target) as tmp:
      with tf.io.TFRecordWriter(tmp) as writer:
        records = tf.compat.v1.io.tf_record_iterator(path)
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
  from benchmark import io_utils  # pylint: disable=g-import-not-at-top
  final = dict(final, skipped_records=skipped_records_summary(bad))
  io_utils.write_json_atomic(
      os.path.join(save_model_dir, constants.FINAL_METRICS_FILE), final)
  logging.warning("Trained without %d bad record(s) (--skip_bad_records); "
                  "see skipped_records in %s.", final["skipped_records"][
                      "count"], constants.FINAL_METRICS_FILE)
  return final


def find_files_failing_in_tensorflow(tfrecords_dir: str,
                                     label_spec: LabelSpec) -> list[str]:
  """Reads every user file through the training parse function (records,
  features, labels and a full JPEG decode by TensorFlow) and returns one
  line `"<file>: <problem>"` per file that fails. Slower than
  `check_tfrecords` (every image is decoded); meant for after a data error
  during training, to name the file."""
  dataset_fn = create_dataset_fn(label_spec)
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
  TensorFlow `InvalidArgumentError`, `DataLossError` or `NotFoundError`, or
  any exception (e.g. the TFF worker's gRPC error) whose text names a JPEG
  decode, record read or parse failure or a label index assertion."""
  if isinstance(error, (tf.errors.InvalidArgumentError,
                        tf.errors.DataLossError, tf.errors.NotFoundError)):
    return True
  text = _error_text(error)
  return any(t in text for t in _DATA_ERROR_TEXTS)


def training_data_error(tfrecords_dir: str, label_spec: LabelSpec,
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
