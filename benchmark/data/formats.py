"""The on-disk formats of FLAIR data, written and read in one place.

* The records of `labels_and_metadata.json` and the rules they must meet:
  `read_metadata_file`, `parse_metadata_record`, `check_metadata_records`
  (prepare_tfrecords.py, explore's reader in dataset_stats.py and
  download_dataset.py all check with these).
* `label_relationship.txt`, which coarse label each fine-grained label
  belongs to: `read_label_relationship` (download_dataset.py checks the file
  with it, prepare_tfrecords.py checks the records' labels against it).
* A prepared directory (`require_tfrecords_dir`) and its label index file,
  `constants.LABEL_INDEX_FILES` (`label_index.json`, or the original
  scripts' `label_to_index.json`): `find_label_index_file`,
  `read_label_index`.
* Its partition folders, `<partition>/<user_id>.tfrecords`, `dev/` read as
  `val/` (but not both): `partition_folder_names`, `find_partition_dir`,
  `user_files`.
* One image as a `tf.train.Example` (docs/formats.md, "Per-user
  TFRecords"): `encode_example`, and back, `decode_example`.
* The label index, `{"labels": {name: index}, "fine_grained_labels": {name:
  index}}` with indices in sorted name order: written from the records by
  `build_label_index`, read by `read_label_index`.
* TFRecord framing (TensorFlow's `tfrecord` file format: per record a
  little-endian uint64 length, a 4-byte masked CRC of the length, the data,
  a 4-byte masked CRC of the data): `complete_tfrecords` and
  `tfrecord_lengths`, which count records without TensorFlow and without
  reading their data.

`prepare_tfrecords.py` writes with these, whatever its input (a downloaded
dataset directory, a Hugging Face copy, pfl-research's HDF5), so the same
images and labels give the same bytes.
"""

import dataclasses
import json
import os
import struct
from typing import Any, BinaryIO, Iterable, Optional, Sequence

from benchmark.core import constants
from benchmark.core import errors

# label_relationship.txt: one `<fine-grained label> -> <coarse label>` a line.
_RELATIONSHIP_ARROW = "->"

# Bytes around each record's data in a TFRecord file: length (8) and its CRC
# (4) before, the data's CRC (4) after.
_TFRECORD_HEADER_BYTES = 12
_TFRECORD_FOOTER_BYTES = 4


@dataclasses.dataclass(frozen=True)
class Problem:
  """One bad input item.

  Attributes:
    message: what is wrong, naming the file and what was expected.
    record_index: 0-based index of the record in labels_and_metadata.json,
      None for a problem with no record.
    image_id: the record's image id (as a string), when known.
    user_id: the record's user id, when known.
  """
  message: str
  record_index: Optional[int] = None
  image_id: Optional[str] = None
  user_id: Optional[str] = None

  def describe(self) -> str:
    """One line naming the record and the problem."""
    if self.record_index is None:
      return self.message
    return (f"record {self.record_index} (image_id {self.image_id!r}, "
            f"user_id {self.user_id!r}): {self.message}")

  def to_json(self) -> dict[str, Any]:
    """The fields as a JSON-serializable dict."""
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class MetadataRecord:
  """One valid record of labels_and_metadata.json.

  Attributes:
    index: 0-based index of the record in the file.
    user_id: the user, usable as a file name.
    image_id: the image, as a string usable as a file name (an integer id is
      written in decimal).
    labels: coarse label names.
    fine_grained_labels: fine-grained label names.
    partition: one of `constants.PARTITIONS` (`dev` is read as `val`).
  """
  index: int
  user_id: str
  image_id: str
  labels: tuple[str, ...]
  fine_grained_labels: tuple[str, ...]
  partition: str


def is_safe_file_name(name: str) -> bool:
  """Whether `name` (a str) can name a file in a directory: non-empty, no
  path separator or NUL, not starting with '.'."""
  return (bool(name) and "/" not in name and "\\" not in name
          and "\0" not in name and not name.startswith("."))


def read_metadata_file(path: str) -> list[Any]:
  """The decoded JSON list of a labels_and_metadata.json (records not
  checked: see `check_metadata_records`).

  Args:
    path: the file.

  Returns:
    The non-empty list, one item per record.

  Raises:
    FlairInputError: the file is missing or unreadable, is not valid JSON,
      is not a list or is an empty one (one line naming the file).
  """
  try:
    with open(path, "rb") as f:
      raw = json.load(f)
  except FileNotFoundError:
    raise errors.FlairInputError(
        f"{path}: file not found (a FLAIR dataset directory holds "
        f"{constants.METADATA_FILE}; download it with download_dataset.py)"
    ) from None
  except OSError as e:
    raise errors.FlairInputError(
        f"{path}: cannot be read ({e.strerror or e})") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.FlairInputError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(raw, list):
    raise errors.FlairInputError(
        f"{path}: expected a JSON list of image records, got "
        f"{type(raw).__name__}")
  if not raw:
    raise errors.FlairInputError(f"{path}: holds no image records")
  return raw


def parse_metadata_record(index: int, raw: Any
                          ) -> tuple[Optional[MetadataRecord], list[Problem]]:
  """Checks the fields of one record of labels_and_metadata.json.

  A record is a JSON object with `constants.REQUIRED_RECORD_KEYS`:
  `user_id` a string usable as a file name, `image_id` such a string or a
  non-negative integer, `labels` and `fine_grained_labels` lists of
  non-empty strings, `partition` one of `constants.PARTITIONS` or an alias
  (`dev`).

  Args:
    index: the record's 0-based index in the file.
    raw: the decoded record.

  Returns:
    `(record, [])` for a valid record, `(None, problems)` otherwise (every
    problem of the record found). Raises nothing.
  """
  if not isinstance(raw, dict):
    return None, [Problem(f"is a {type(raw).__name__}, expected a JSON object "
                          f"with {list(constants.REQUIRED_RECORD_KEYS)}",
                          index)]
  image_id = raw.get(constants.IMAGE_ID_KEY)
  user_id = raw.get(constants.USER_ID_KEY)
  shown_image_id = None if image_id is None else str(image_id)
  shown_user_id = None if user_id is None else str(user_id)

  def problem(message):
    return Problem(message, index, shown_image_id, shown_user_id)

  problems = []
  missing = [k for k in constants.REQUIRED_RECORD_KEYS if k not in raw]
  if missing:
    problems.append(problem(f"missing field(s) {missing}"))
  if constants.IMAGE_ID_KEY in raw:
    if isinstance(image_id, int) and not isinstance(image_id, bool) and (
        image_id >= 0):
      image_id = str(image_id)
    elif not (isinstance(image_id, str) and is_safe_file_name(image_id)):
      problems.append(problem(
          f"{constants.IMAGE_ID_KEY} must be a non-negative integer or a "
          f"string usable as a file name, got {image_id!r}"))
  if constants.USER_ID_KEY in raw and not (
      isinstance(user_id, str) and is_safe_file_name(user_id)):
    problems.append(problem(
        f"{constants.USER_ID_KEY} must be a string usable as a file name (no "
        f"'/', not starting with '.'), got {user_id!r}"))
  for key in (constants.LABELS_KEY, constants.FINE_GRAINED_LABELS_KEY):
    if key in raw:
      value = raw[key]
      if not (isinstance(value, list)
              and all(isinstance(v, str) and v for v in value)):
        problems.append(problem(
            f"{key} must be a list of non-empty strings, got {value!r}"))
  partition = raw.get(constants.PARTITION_KEY)
  if constants.PARTITION_KEY in raw:
    partition = (constants.PARTITION_ALIASES.get(partition, partition)
                 if isinstance(partition, str) else partition)
    if partition not in constants.PARTITIONS:
      problems.append(problem(
          f"unknown {constants.PARTITION_KEY} {raw[constants.PARTITION_KEY]!r}"
          f" (expected one of {list(constants.PARTITIONS)} or "
          f"{list(constants.PARTITION_ALIASES)})"))
  if problems:
    return None, problems
  return MetadataRecord(index, user_id, image_id,
                        tuple(raw[constants.LABELS_KEY]),
                        tuple(raw[constants.FINE_GRAINED_LABELS_KEY]),
                        partition), []


def check_metadata_records(raw_records: Sequence[Any]
                           ) -> tuple[list[MetadataRecord], list[Problem]]:
  """Checks every record of labels_and_metadata.json, alone and together.

  Each record as `parse_metadata_record`; across records, a user belongs to
  one partition and an image id occurs once (the later record is the bad
  one). Images are not looked at.

  Args:
    raw_records: the decoded list (`read_metadata_file`).

  Returns:
    `(records, problems)`: the valid records in file order, and every
    problem found, in record order. Raises nothing.
  """
  problems = []
  user_partition: dict[str, tuple[str, int]] = {}
  image_record: dict[str, int] = {}
  records = []
  for index, raw in enumerate(raw_records):
    record, record_problems = parse_metadata_record(index, raw)
    if record_problems:
      problems += record_problems
      continue
    first = user_partition.setdefault(record.user_id,
                                      (record.partition, record.index))
    if first[0] != record.partition:
      problems.append(Problem(
          f"user is in partition {record.partition!r} here but in "
          f"{first[0]!r} in record {first[1]} (a user belongs to one "
          f"partition)", record.index, record.image_id, record.user_id))
      continue
    if record.image_id in image_record:
      problems.append(Problem(
          f"image_id repeats record {image_record[record.image_id]}",
          record.index, record.image_id, record.user_id))
      continue
    image_record[record.image_id] = record.index
    records.append(record)
  return records, problems


def _relationship_line_problem(line: str) -> Optional[str]:
  """What keeps one non-blank line of label_relationship.txt from being a
  `fine -> coarse` pair with a FLAIR coarse label, or None."""
  fine, arrow, coarse = (part.strip() for part in line.partition(
      _RELATIONSHIP_ARROW))
  if not arrow or not fine or not coarse or _RELATIONSHIP_ARROW in coarse:
    return (f"expected '<fine-grained label> {_RELATIONSHIP_ARROW} <coarse "
            f"label>', got {line!r}")
  if coarse not in constants.COARSE_LABELS:
    return (f"{coarse!r} is not one of FLAIR's {len(constants.COARSE_LABELS)}"
            f" coarse labels (in {line!r})")
  return None


def read_label_relationship(path: str) -> dict[str, frozenset[str]]:
  """Reads FLAIR's label_relationship.txt: the coarse label(s) of each
  fine-grained label.

  The file is UTF-8 text, one `<fine-grained label> -> <coarse label>` pair
  a line (blank lines and whitespace around names ignored); each coarse
  label is one of `constants.COARSE_LABELS`, and a fine-grained label may
  have several lines. A file cut short in its last line fails these rules
  (a cut name is not a coarse label), and is refused.

  Args:
    path: the file.

  Returns:
    `{fine-grained label: frozenset of its coarse labels}`, non-empty.

  Raises:
    FlairInputError: the file is missing or unreadable, not UTF-8, holds no
      pair, or a line breaks the rules (one line naming the file, the line
      number and what is wrong; "truncated or malformed").
  """
  try:
    with open(path, "rb") as f:
      text = f.read().decode("utf-8")
  except FileNotFoundError:
    raise errors.FlairInputError(f"{path}: file not found") from None
  except OSError as e:
    raise errors.FlairInputError(
        f"{path}: cannot be read ({e.strerror or e})") from None
  except UnicodeDecodeError as e:
    raise errors.FlairInputError(f"{path}: not UTF-8 text ({e})") from None
  relationship: dict[str, set[str]] = {}
  for number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    problem = _relationship_line_problem(line)
    if problem is not None:
      raise errors.FlairInputError(
          f"{path} is truncated or malformed: line {number}: {problem}")
    fine, _, coarse = (p.strip() for p in line.partition(_RELATIONSHIP_ARROW))
    relationship.setdefault(fine, set()).add(coarse)
  if not relationship:
    raise errors.FlairInputError(
        f"{path} holds no '<fine-grained label> {_RELATIONSHIP_ARROW} <coarse "
        "label>' line (an empty or truncated copy?)")
  return {fine: frozenset(coarse) for fine, coarse in relationship.items()}


def encode_example(jpeg: bytes, labels: Sequence[int],
                   fine_grained_labels: Sequence[int]) -> bytes:
  """Serializes one image as a `tf.train.Example`.

  Args:
    jpeg: the JPEG file's bytes, stored unchanged.
    labels: coarse label indices (into the label index's "labels").
    fine_grained_labels: fine-grained label indices.

  Returns:
    The deterministic serialization (the same arguments give the same bytes)
    with features `image/encoded_jpeg` (bytes), `labels` and
    `fine_grained_labels` (int64 lists, in the order given).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  example = tf.train.Example(features=tf.train.Features(feature={
      constants.IMAGE_FEATURE: tf.train.Feature(
          bytes_list=tf.train.BytesList(value=[jpeg])),
      constants.LABELS_FEATURE: tf.train.Feature(
          int64_list=tf.train.Int64List(value=list(labels))),
      constants.FINE_GRAINED_LABELS_FEATURE: tf.train.Feature(
          int64_list=tf.train.Int64List(value=list(fine_grained_labels))),
  }))
  return example.SerializeToString(deterministic=True)


def decode_example(serialized: bytes) -> tuple[bytes, list[int], list[int]]:
  """Reads back one image's `tf.train.Example` (`encode_example`'s inverse).

  Args:
    serialized: the serialized example (one TFRecord record's data).

  Returns:
    `(jpeg, labels, fine_grained_labels)` as given to `encode_example`.

  Raises:
    ValueError: `serialized` is not a `tf.train.Example`, or lacks one of
      the three features or has other than one image value (names which).
  """
  from google.protobuf import message  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    feature = tf.train.Example.FromString(serialized).features.feature
  except message.DecodeError:
    raise ValueError("not a tf.train.Example") from None
  for key in (constants.IMAGE_FEATURE, constants.LABELS_FEATURE,
              constants.FINE_GRAINED_LABELS_FEATURE):
    if key not in feature:
      raise ValueError(f"no {key!r} feature")
  images = feature[constants.IMAGE_FEATURE].bytes_list.value
  if len(images) != 1:
    raise ValueError(f"{len(images)} values in feature "
                     f"{constants.IMAGE_FEATURE!r}, expected one")
  return (images[0],
          list(feature[constants.LABELS_FEATURE].int64_list.value),
          list(feature[constants.FINE_GRAINED_LABELS_FEATURE].int64_list.value))


def build_label_index(
    label_lists: Iterable[tuple[Sequence[str], Sequence[str]]]
) -> dict[str, dict[str, int]]:
  """The label index of a set of records.

  Args:
    label_lists: per record, `(coarse label names, fine-grained label
      names)`.

  Returns:
    `{"labels": {name: index}, "fine_grained_labels": {name: index}}` over
    the names that occur, indices 0.. in sorted name order (the rule of the
    original scripts and of pfl-research's HDF5 `label_mapping`).
  """
  coarse, fine = set(), set()
  for labels, fine_grained_labels in label_lists:
    coarse.update(labels)
    fine.update(fine_grained_labels)
  return {
      constants.LABELS_KEY: {n: i for i, n in enumerate(sorted(coarse))},
      constants.FINE_GRAINED_LABELS_KEY: {
          n: i for i, n in enumerate(sorted(fine))},
  }


def require_tfrecords_dir(tfrecords_dir: str) -> None:
  """Checks that `tfrecords_dir` (a str) is a directory.

  Raises:
    FlairInputError: it is not (one line naming the --tfrecords_dir flag).
  """
  if not os.path.isdir(tfrecords_dir):
    raise errors.FlairInputError(
        f"--tfrecords_dir {tfrecords_dir!r} is not a directory (expected the "
        "output of prepare_tfrecords.py)")


def find_label_index_file(tfrecords_dir: str) -> str:
  """The path of the label index file of a prepared directory.

  `constants.LABEL_INDEX_FILE` is preferred; the original scripts'
  `constants.LEGACY_LABEL_INDEX_FILE` is accepted.

  Args:
    tfrecords_dir: the output of prepare_tfrecords.py.

  Raises:
    FlairInputError: the directory or both files are missing.
  """
  require_tfrecords_dir(tfrecords_dir)
  for name in constants.LABEL_INDEX_FILES:
    path = os.path.join(tfrecords_dir, name)
    if os.path.isfile(path):
      return path
  raise errors.FlairInputError(
      f"--tfrecords_dir {tfrecords_dir!r}: no label index "
      f"({' or '.join(constants.LABEL_INDEX_FILES)}); prepare the directory "
      "with prepare_tfrecords.py")


def read_label_index(tfrecords_dir: str
                     ) -> tuple[str, dict[str, tuple[str, ...]]]:
  """Reads and checks the label index of a prepared directory.

  The file (`find_label_index_file`) holds `{"labels": {name: index},
  "fine_grained_labels": {name: index}}`, each set's indices the integers
  0..n-1, each used once.

  Args:
    tfrecords_dir: the output of prepare_tfrecords.py.

  Returns:
    `(path, names)`: the file read, and per key (`constants.LABELS_KEY`,
    `constants.FINE_GRAINED_LABELS_KEY`) the label names in index order.

  Raises:
    FlairInputError: a missing directory or file, an unreadable file,
      malformed JSON, or a set that is not such a mapping (one line naming
      the file).
  """
  path = find_label_index_file(tfrecords_dir)
  try:
    with open(path, "rb") as f:
      raw = json.load(f)
  except OSError as e:
    raise errors.FlairInputError(
        f"cannot read label index {path}: {e.strerror or e}") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.FlairInputError(
        f"cannot read label index {path}: not valid JSON ({e})") from None
  names = {}
  for key in (constants.LABELS_KEY, constants.FINE_GRAINED_LABELS_KEY):
    mapping = raw.get(key) if isinstance(raw, dict) else None
    if not isinstance(mapping, dict):
      raise errors.FlairInputError(
          f"{path}: expected {{\"{constants.LABELS_KEY}\": {{name: index}}, "
          f"\"{constants.FINE_GRAINED_LABELS_KEY}\": {{name: index}}}}; "
          f"{key!r} is missing or not an object")
    ordered = [None] * len(mapping)
    for name, index in mapping.items():
      if (isinstance(index, bool) or not isinstance(index, int)
          or not 0 <= index < len(mapping) or ordered[index] is not None):
        raise errors.FlairInputError(
            f"{path}: {key!r} indices must be 0..{len(mapping) - 1}, each "
            f"used once (label {name!r} has {index!r})")
      ordered[index] = name
    names[key] = tuple(ordered)
  return path, names


def partition_folder_names(partition: str) -> list[str]:
  """The folder names that may hold a partition.

  Args:
    partition: one of `constants.PARTITIONS` or an alias (`dev`).

  Returns:
    The canonical name first, then its aliases (`["val", "dev"]`).

  Raises:
    FlairInputError: an unknown partition name.
  """
  canonical = constants.PARTITION_ALIASES.get(partition, partition)
  if canonical not in constants.PARTITIONS:
    raise errors.FlairInputError(
        f"unknown partition {partition!r}: expected one of "
        f"{', '.join(constants.PARTITIONS)} (or "
        f"{', '.join(constants.PARTITION_ALIASES)})")
  return [canonical] + sorted(
      alias for alias, target in constants.PARTITION_ALIASES.items()
      if target == canonical)


def find_partition_dir(tfrecords_dir: str, partition: str) -> Optional[str]:
  """The folder of one partition in a prepared directory.

  Args:
    tfrecords_dir: the output of prepare_tfrecords.py.
    partition: as `partition_folder_names`.

  Returns:
    The path of the one existing folder of `partition_folder_names`, or None
    when there is none.

  Raises:
    FlairInputError: `tfrecords_dir` is not a directory, the partition name
      is unknown, or two folders name the partition (`val/` and `dev/`:
      ambiguous input).
  """
  require_tfrecords_dir(tfrecords_dir)
  present = [os.path.join(tfrecords_dir, name)
             for name in partition_folder_names(partition)
             if os.path.isdir(os.path.join(tfrecords_dir, name))]
  if len(present) > 1:
    raise errors.FlairInputError(
        f"--tfrecords_dir {tfrecords_dir!r}: holds both "
        f"{' and '.join(os.path.basename(p) + '/' for p in present)}, which "
        "name the same partition; keep one")
  return present[0] if present else None


def user_files(partition_dir: str) -> dict[str, str]:
  """The user files of a partition folder, `<user_id>.tfrecords`.

  Hidden files (an interrupted write's temporary files) are left out.

  Args:
    partition_dir: the folder (`find_partition_dir`).

  Returns:
    `{user id: path}`, sorted by file name (empty when there is none).

  Raises:
    OSError: the folder cannot be listed.
  """
  suffix = constants.TFRECORD_SUFFIX
  return {
      name[:-len(suffix)]: os.path.join(partition_dir, name)
      for name in sorted(os.listdir(partition_dir))
      if name.endswith(suffix) and not name.startswith(".")
      and len(name) > len(suffix)
  }


def complete_tfrecords(f: BinaryIO) -> tuple[list[int], int]:
  """Follows the record framing of an open TFRecord file from its start.

  Reads only each record's 8-byte length and seeks over the rest; checksums
  are not verified.

  Args:
    f: the file, open for binary reading (its position is changed).

  Returns:
    `(lengths, end)`: the data length of every complete record, in file
    order, and the byte offset where the last complete record ends (the
    file's size when it does not end inside a record).

  Raises:
    OSError: the file cannot be read.
  """
  size = os.fstat(f.fileno()).st_size
  lengths, end = [], 0
  while end + _TFRECORD_HEADER_BYTES <= size:
    f.seek(end)
    (length,) = struct.unpack("<Q", f.read(8))
    following = end + _TFRECORD_HEADER_BYTES + length + _TFRECORD_FOOTER_BYTES
    if following > size:
      break
    lengths.append(length)
    end = following
  return lengths, end


def tfrecord_lengths(path: str) -> list[int]:
  """The data length of every record of a TFRecord file, in file order.

  Fast on large files (`complete_tfrecords`: no data read); the trainers'
  `data.check_tfrecords` reads and checks every record.

  Raises:
    FlairInputError: the file cannot be read or ends inside a record
      (names the file).
  """
  try:
    with open(path, "rb") as f:
      lengths, end = complete_tfrecords(f)
      size = os.fstat(f.fileno()).st_size
  except OSError as e:
    raise errors.FlairInputError(
        f"cannot read TFRecord file {path}: {e.strerror or e}") from None
  if end < size:
    raise errors.FlairInputError(
        f"TFRecord file {path} ends inside record {len(lengths)} (a "
        "truncated copy? rerun prepare_tfrecords.py)")
  return lengths
