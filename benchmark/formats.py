"""The on-disk formats of prepared FLAIR data, written and read in one place.

* One image as a `tf.train.Example` (FLAIR_REFERENCE.md, "Per-user
  TFRecords"): `encode_example`.
* The label index, `{"labels": {name: index}, "fine_grained_labels": {name:
  index}}` with indices in sorted name order: `build_label_index`.
* TFRecord framing (TensorFlow's `tfrecord` file format: per record a
  little-endian uint64 length, a 4-byte masked CRC of the length, the data,
  a 4-byte masked CRC of the data): `tfrecord_lengths`, which counts records
  without TensorFlow and without reading their data.

`prepare_tfrecords.py` writes with these, whatever its input (a downloaded
dataset directory, a Hugging Face copy, pfl-research's HDF5), so the same
images and labels give the same bytes.
"""

import os
import struct
from typing import BinaryIO, Iterable, Sequence

from benchmark import constants
from benchmark import errors

# Bytes around each record's data in a TFRecord file: length (8) and its CRC
# (4) before, the data's CRC (4) after.
_TFRECORD_HEADER_BYTES = 12
_TFRECORD_FOOTER_BYTES = 4


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
