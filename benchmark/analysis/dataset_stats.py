"""A FLAIR dataset's image records and the statistics the explore report shows.

Reads the labels and owner of every image, as `ImageRecord`s, from either
input `benchmark.explore` accepts: a downloaded dataset directory
(`labels_and_metadata.json`, validated by `formats.check_metadata_records`;
sample images from `small_images/`) or a prepared per-user TFRecords
directory (label features parsed with `tf.data`; `dev/` read as `val`); and
turns the records into the report's numbers (`compute_statistics`: images and
users per partition, label frequencies, labels per image, images and distinct
labels per user) and the choice of sample users. No plotting here: the
figures are `dataset_figures`; the report's assembly and text are
`dataset_report`.
"""

import collections
import dataclasses
import io
import os
from typing import Any, Iterable, Optional, Sequence

from absl import logging
import numpy as np
from PIL import Image
import tqdm

from benchmark.core import constants
from benchmark.core import errors
from benchmark.data import formats


@dataclasses.dataclass(frozen=True)
class ImageRecord:
  """The labels and owner of one image.

  Attributes:
    user_id: the Flickr user id (the TFRecord file name in prepared data).
    image_id: the Flickr photo id; None when read from TFRecords, which do not
      store it.
    partition: one of `constants.PARTITIONS` (`dev` already mapped to `val`).
    labels: coarse label names, as stored.
    fine_grained_labels: fine-grained label names, as stored.
  """
  user_id: str
  image_id: Optional[str]
  partition: str
  labels: tuple[str, ...]
  fine_grained_labels: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SampleImage:
  """One tile of the sample grid.

  Attributes:
    record: the image's labels and owner.
    pixels: `uint8 [height, width, 3]` RGB pixels, or None when the image could
      not be shown.
    note: why `pixels` is None ("image file missing", ...), else "".
  """
  record: ImageRecord
  pixels: Optional[np.ndarray]
  note: str = ""


# ----------------------------------------------------------------------------
# Reading a downloaded dataset directory.
# ----------------------------------------------------------------------------


def parse_metadata_records(raw: Sequence[Any], source: str
                           ) -> list[ImageRecord]:
  """Validates the records of `labels_and_metadata.json`, by the rules
  prepare_tfrecords.py applies (`formats.check_metadata_records`).

  Args:
    raw: the decoded JSON list (`formats.read_metadata_file`).
    source: the file name, for error messages.

  Returns:
    One `ImageRecord` per image, in file order.

  Raises:
    FlairInputError: a bad record: one line naming the file, the first bad
      record and what is wrong (and how many more problems there are).
  """
  records, problems = formats.check_metadata_records(raw)
  if problems:
    more = (f" (and {len(problems) - 1} more problem(s); prepare_tfrecords.py "
            "lists them all)" if len(problems) > 1 else "")
    raise errors.FlairInputError(f"{source} {problems[0].describe()}{more}")
  return [ImageRecord(user_id=r.user_id, image_id=r.image_id,
                      partition=r.partition, labels=r.labels,
                      fine_grained_labels=r.fine_grained_labels)
          for r in records]


def load_metadata_records(dataset_dir: str) -> list[ImageRecord]:
  """Reads `<dataset_dir>/labels_and_metadata.json`.

  Raises:
    FlairInputError: a missing directory or file, malformed JSON, or a bad
      record (see `parse_metadata_records`).
  """
  if not os.path.isdir(dataset_dir):
    raise errors.FlairInputError(
        f"--dataset_dir {dataset_dir}: not a directory (expected a downloaded "
        f"FLAIR dataset holding {constants.METADATA_FILE})")
  path = os.path.join(dataset_dir, constants.METADATA_FILE)
  logging.info("Reading %s", path)
  return parse_metadata_records(formats.read_metadata_file(path), path)


def _read_image_file(path: str) -> tuple[Optional[np.ndarray], str]:
  if not os.path.isfile(path):
    return None, "image file missing"
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB")), ""
  except (OSError, ValueError):
    return None, "unreadable image"


def _decode_jpeg_bytes(data: bytes) -> tuple[Optional[np.ndarray], str]:
  try:
    with Image.open(io.BytesIO(data)) as image:
      return np.asarray(image.convert("RGB")), ""
  except (OSError, ValueError):
    return None, "unreadable image"


def sample_images_from_dataset_dir(
    dataset_dir: str,
    records_by_user: dict[str, list[ImageRecord]]) -> list[list[SampleImage]]:
  """Loads `<dataset_dir>/small_images/<image_id>.jpg` for each given record.

  Missing or unreadable files become tiles without pixels (and a note), so the
  labels can be explored before the 6 GB of images are downloaded.

  Returns:
    One list of `SampleImage` per user, in the order of `records_by_user`.
  """
  images_dir = os.path.join(dataset_dir, constants.SMALL_IMAGES_DIR)
  rows = []
  for records in records_by_user.values():
    row = []
    for record in records:
      pixels, note = _read_image_file(os.path.join(
          images_dir, record.image_id + constants.IMAGE_EXTENSION))
      row.append(SampleImage(record, pixels, note))
    rows.append(row)
  return rows


# ----------------------------------------------------------------------------
# Reading a prepared TFRecords directory.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _UserFile:
  path: str
  user_id: str
  partition: str


def load_label_names(tfrecords_dir: str) -> tuple[list[str], list[str]]:
  """Reads the label index of a prepared directory
  (`formats.read_label_index`).

  Returns:
    `(coarse_names, fine_names)`: label names in index order.

  Raises:
    FlairInputError: as `formats.read_label_index`.
  """
  _, names = formats.read_label_index(tfrecords_dir)
  return (list(names[constants.LABELS_KEY]),
          list(names[constants.FINE_GRAINED_LABELS_KEY]))


def list_user_files(tfrecords_dir: str) -> list[_UserFile]:
  """Lists `<tfrecords_dir>/<partition>/<user_id>.tfrecords`, sorted.

  Partition folders as `formats.find_partition_dir`; a missing one is
  logged and read as empty.

  Raises:
    FlairInputError: a missing directory, both `val/` and `dev/`, or no
      TFRecord file in any partition folder.
  """
  files = []
  for partition in constants.PARTITIONS:
    folder = formats.find_partition_dir(tfrecords_dir, partition)
    if folder is None:
      logging.warning("%s: no %s/ folder; partition %s is empty",
                      tfrecords_dir, partition, partition)
      continue
    files += [_UserFile(path=path, user_id=user_id, partition=partition)
              for user_id, path in formats.user_files(folder).items()]
  if not files:
    raise errors.FlairInputError(
        f"--tfrecords_dir {tfrecords_dir}: no *{constants.TFRECORD_SUFFIX} "
        f"files in {', '.join(p + '/' for p in constants.PARTITIONS)}")
  return files


def _label_parse_spec(with_image: bool) -> dict[str, Any]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  spec = {
      constants.LABELS_FEATURE: tf.io.RaggedFeature(tf.int64),
      constants.FINE_GRAINED_LABELS_FEATURE: tf.io.RaggedFeature(tf.int64),
  }
  if with_image:
    spec[constants.IMAGE_FEATURE] = tf.io.FixedLenFeature([], tf.string)
  return spec


def _names(indices: Sequence[int], names: Sequence[str], feature: str,
           path: str) -> tuple[str, ...]:
  try:
    if min(indices, default=0) < 0:
      raise IndexError
    return tuple(names[i] for i in indices)
  except IndexError:
    raise errors.FlairInputError(
        f"{path}: feature {feature!r} holds index {max(indices)} or "
        f"{min(indices)}, outside the label index (0..{len(names) - 1})"
    ) from None


def _bad_tfrecord_error(path: str, error: Exception) -> errors.FlairInputError:
  message = str(getattr(error, "message", error)).strip().splitlines()
  return errors.FlairInputError(
      f"{path}: not a readable TFRecord file of tf.train.Example records with "
      f"int64 {constants.LABELS_FEATURE!r}/"
      f"{constants.FINE_GRAINED_LABELS_FEATURE!r} features "
      f"({message[0] if message else type(error).__name__})")


def _find_bad_tfrecord(files: Sequence[_UserFile], error: Exception) -> None:
  """Reads each file alone to name the one that failed; raises for it."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  spec = _label_parse_spec(with_image=False)
  for user_file in files:
    try:
      for _ in tf.data.TFRecordDataset(user_file.path).map(
          lambda r: tf.io.parse_single_example(r, spec)):
        pass
    except tf.errors.OpError as e:
      raise _bad_tfrecord_error(user_file.path, e) from None
  raise errors.FlairInputError(
      f"reading the TFRecords failed: {getattr(error, 'message', error)}")


def load_tfrecord_records(tfrecords_dir: str,
                          show_progress: bool = True) -> list[ImageRecord]:
  """Reads the labels of every example of a prepared TFRecords directory.

  The user id is the file name, the partition its folder (`dev/` read as
  `val`). Only the label features are parsed; images are not decoded.
  Files are read four at a time with `tf.data` (records tagged with their
  file, so the order of the returned records is not the file order).

  Args:
    tfrecords_dir: the output of `prepare_tfrecords.py`.
    show_progress: show a tqdm bar over the files.

  Returns:
    One `ImageRecord` per example (with `image_id` None).

  Raises:
    FlairInputError: see `list_user_files` and `load_label_names`; a file that
      is not a TFRecord of `tf.train.Example`s with int64 label lists; a label
      index outside the label index file.
  """
  coarse_names, fine_names = load_label_names(tfrecords_dir)
  files = list_user_files(tfrecords_dir)
  logging.info("Reading labels from %d TFRecord files under %s", len(files),
               tfrecords_dir)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  spec = _label_parse_spec(with_image=False)
  paths = tf.constant([f.path for f in files])
  dataset = tf.data.Dataset.from_tensor_slices(
      (paths, tf.range(len(files), dtype=tf.int64)))
  dataset = dataset.interleave(
      lambda path, i: tf.data.TFRecordDataset(path).map(lambda r: (i, r)),
      cycle_length=4, block_length=64, num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True)
  dataset = dataset.batch(1024).map(
      lambda i, r: (i, tf.io.parse_example(r, spec)),
      num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)

  records = []
  started = set()
  bar = tqdm.tqdm(total=len(files), unit="file", desc="reading TFRecords",
                  disable=not show_progress)
  try:
    for file_indices, features in dataset:
      coarse = features[constants.LABELS_FEATURE].to_list()
      fine = features[constants.FINE_GRAINED_LABELS_FEATURE].to_list()
      for i, c, f in zip(file_indices.numpy().tolist(), coarse, fine):
        user_file = files[i]
        if i not in started:
          started.add(i)
          bar.update(1)
        records.append(ImageRecord(
            user_id=user_file.user_id, image_id=None,
            partition=user_file.partition,
            labels=_names(c, coarse_names, constants.LABELS_FEATURE,
                          user_file.path),
            fine_grained_labels=_names(
                f, fine_names, constants.FINE_GRAINED_LABELS_FEATURE,
                user_file.path)))
    bar.update(len(files) - bar.n)  # files without examples
  except tf.errors.OpError as e:
    _find_bad_tfrecord(files, e)
  finally:
    bar.close()
  if not records:
    raise errors.FlairInputError(
        f"--tfrecords_dir {tfrecords_dir}: the TFRecord files hold no examples")
  return records


def sample_images_from_tfrecords(
    tfrecords_dir: str, user_ids: Sequence[str],
    num_images: int) -> list[list[SampleImage]]:
  """Reads the first `num_images` examples of each given user's file.

  Returns:
    One list of `SampleImage` per user id, in the given order.

  Raises:
    FlairInputError: an unreadable file or a label outside the label index.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  coarse_names, fine_names = load_label_names(tfrecords_dir)
  by_user = {f.user_id: f for f in list_user_files(tfrecords_dir)}
  spec = _label_parse_spec(with_image=True)
  rows = []
  for user_id in user_ids:
    user_file = by_user[user_id]
    row = []
    try:
      for example in tf.data.TFRecordDataset(user_file.path).take(
          num_images).map(lambda r: tf.io.parse_single_example(r, spec)):
        record = ImageRecord(
            user_id=user_id, image_id=None, partition=user_file.partition,
            labels=_names(example[constants.LABELS_FEATURE].numpy().tolist(),
                          coarse_names, constants.LABELS_FEATURE,
                          user_file.path),
            fine_grained_labels=_names(
                example[
                    constants.FINE_GRAINED_LABELS_FEATURE].numpy().tolist(),
                fine_names, constants.FINE_GRAINED_LABELS_FEATURE,
                user_file.path))
        pixels, note = _decode_jpeg_bytes(
            example[constants.IMAGE_FEATURE].numpy())
        row.append(SampleImage(record, pixels, note))
    except tf.errors.OpError as e:
      raise _bad_tfrecord_error(user_file.path, e) from None
    rows.append(row)
  return rows


# ----------------------------------------------------------------------------
# Statistics.
# ----------------------------------------------------------------------------


def summarize(values: Iterable[float]) -> dict[str, float]:
  """Summary statistics of a list of numbers.

  Returns:
    `{"count", "mean", "std", "min", "q25", "median", "q75", "max"}`;
    std is the population standard deviation (numpy's default, ddof=0);
    quantiles use numpy's default linear interpolation. All 0 when empty.
  """
  array = np.asarray(list(values), dtype=np.float64)
  if array.size == 0:
    return {k: 0.0 for k in
            ("count", "mean", "std", "min", "q25", "median", "q75", "max")}
  q25, median, q75 = np.percentile(array, [25, 50, 75])
  return {"count": int(array.size), "mean": float(array.mean()),
          "std": float(array.std()), "min": float(array.min()),
          "q25": float(q25), "median": float(median), "q75": float(q75),
          "max": float(array.max())}


def _histogram(values: Iterable[int]) -> dict[str, int]:
  counts = collections.Counter(values)
  return {str(k): counts[k] for k in sorted(counts)}


def _distribution(values: Sequence[int]) -> dict[str, Any]:
  return {"summary": summarize(values), "histogram": _histogram(values)}


def _sorted_counts(counter: collections.Counter) -> dict[str, int]:
  """Most frequent first; ties by name. (Python dicts keep this order.)"""
  return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


def images_per_user_by_partition(
    records: Sequence[ImageRecord]) -> dict[str, list[int]]:
  """`{partition: [images of each user in it]}`, users sorted by id."""
  counts = collections.Counter((r.partition, r.user_id) for r in records)
  return {p: [counts[k] for k in sorted(counts) if k[0] == p]
          for p in constants.PARTITIONS}


def compute_statistics(records: Sequence[ImageRecord],
                       top_k_fine_labels: int = 20,
                       coarse_vocabulary: Sequence[str] = ()) -> dict[str, Any]:
  """Computes the report's numbers from the image records.

  A label counts once per image that carries it (a duplicated name in one
  record counts once). Users are told apart by (user id); a user listed in
  several partitions counts in each (FLAIR's users are disjoint across
  partitions; `users_in_several_partitions` lists any that are not).

  Args:
    records: every image of the dataset.
    top_k_fine_labels: how many fine-grained labels `top_fine_grained_labels`
      keeps.
    coarse_vocabulary: coarse label names to report even with zero images
      (the label index; or `constants.COARSE_LABELS` when every observed
      coarse label is one of them).

  Returns:
    A JSON-serialisable dict: `num_images`, `num_users`, `partition_images`,
    `partition_users`, `coarse_label_image_counts` (all coarse labels, most
    frequent first), `fine_grained_label_image_counts` (observed ones),
    `top_fine_grained_labels`, `labels_per_image` / `images_per_user` /
    `distinct_labels_per_user` (each `{"summary", "histogram"}`, histograms
    keyed by the integer as a string), `images_per_user_by_partition`, and
    `users_in_several_partitions`.
  """
  partition_images = collections.Counter()
  user_images = collections.Counter()
  user_partitions = collections.defaultdict(set)
  user_coarse = collections.defaultdict(set)
  user_fine = collections.defaultdict(set)
  coarse_counts = collections.Counter({name: 0 for name in coarse_vocabulary})
  fine_counts = collections.Counter()
  coarse_per_image, fine_per_image = [], []
  for record in records:
    coarse, fine = set(record.labels), set(record.fine_grained_labels)
    partition_images[record.partition] += 1
    user_images[record.user_id] += 1
    user_partitions[record.user_id].add(record.partition)
    user_coarse[record.user_id].update(coarse)
    user_fine[record.user_id].update(fine)
    coarse_counts.update(coarse)
    fine_counts.update(fine)
    coarse_per_image.append(len(coarse))
    fine_per_image.append(len(fine))

  partition_users = collections.Counter(
      p for parts in user_partitions.values() for p in parts)
  users = sorted(user_images)
  by_partition = {p: summarize(counts) for p, counts in
                  images_per_user_by_partition(records).items()}
  fine_sorted = _sorted_counts(fine_counts)
  return {
      "num_images": len(records),
      "num_users": len(users),
      "num_coarse_labels_seen": sum(1 for c in coarse_counts.values() if c),
      "num_fine_grained_labels_seen": len(fine_counts),
      "partition_images": {p: partition_images[p]
                           for p in constants.PARTITIONS},
      "partition_users": {p: partition_users[p] for p in constants.PARTITIONS},
      "coarse_label_image_counts": _sorted_counts(coarse_counts),
      "fine_grained_label_image_counts": fine_sorted,
      "top_fine_grained_labels": dict(
          list(fine_sorted.items())[:top_k_fine_labels]),
      "labels_per_image": {
          "coarse": _distribution(coarse_per_image),
          "fine_grained": _distribution(fine_per_image),
      },
      "images_per_user": _distribution([user_images[u] for u in users]),
      "images_per_user_by_partition": by_partition,
      "distinct_labels_per_user": {
          "coarse": _distribution([len(user_coarse[u]) for u in users]),
          "fine_grained": _distribution([len(user_fine[u]) for u in users]),
      },
      "users_in_several_partitions": sorted(
          u for u in users if len(user_partitions[u]) > 1),
  }


def choose_sample_users(records: Sequence[ImageRecord], num_users: int,
                        num_images: int) -> dict[str, list[ImageRecord]]:
  """Picks the `num_users` users with the most images (ties by user id) and
  the first `num_images` records of each (in the given order).

  Returns:
    `{user_id: [ImageRecord, ...]}`, largest user first.
  """
  by_user = collections.defaultdict(list)
  for record in records:
    by_user[record.user_id].append(record)
  chosen = sorted(by_user, key=lambda u: (-len(by_user[u]), u))[:num_users]
  return {u: by_user[u][:num_images] for u in chosen}
