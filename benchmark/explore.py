"""Explores a FLAIR dataset: a printed report and PNG figures.

Shows what a researcher wants to know before training on FLAIR (the questions
answered by the original ml-flair notebooks, computed here from scratch):
images and users per partition, how often each coarse label occurs, the most
frequent fine-grained labels, how many labels an image carries, how many images
a user holds (heavy-tailed), how many distinct labels a user holds, and a grid
of sample images per user with their labels.

Two inputs are accepted:

* a downloaded dataset directory (`labels_and_metadata.json` and
  `small_images/<image_id>.jpg`; `label_relationship.txt` is not needed), or
* a prepared per-user TFRecords directory
  (`<partition>/<user_id>.tfrecords` and the label index JSON), read with
  `tf.data` and `tf.train.Example` parsing; `dev/` is read as `val`.

Usage:

  python -m benchmark.explore --dataset_dir D --output_dir O
  python -m benchmark.explore --tfrecords_dir T --output_dir O

The output directory receives `report.txt` (the printed report),
`report.json` (the same numbers, machine-readable) and the figures named in
`FIGURES`. The library entry point is `explore(...)`; `main` only reads flags.
"""

import collections
import dataclasses
import io
import math
import os
import textwrap
from typing import Any, Callable, Iterable, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np
from PIL import Image
import tqdm

from benchmark import constants
from benchmark import errors
from benchmark import formats
from benchmark import io_utils

# Figure file names (in the output directory), in the order they are made.
PARTITIONS_FIGURE = "partitions.png"
COARSE_LABELS_FIGURE = "coarse_labels.png"
TOP_FINE_LABELS_FIGURE = "top_fine_grained_labels.png"
LABELS_PER_IMAGE_FIGURE = "labels_per_image.png"
IMAGES_PER_USER_FIGURE = "images_per_user.png"
LABELS_PER_USER_FIGURE = "distinct_labels_per_user.png"
SAMPLE_IMAGES_FIGURE = "sample_images.png"
FIGURES = (PARTITIONS_FIGURE, COARSE_LABELS_FIGURE, TOP_FINE_LABELS_FIGURE,
           LABELS_PER_IMAGE_FIGURE, IMAGES_PER_USER_FIGURE,
           LABELS_PER_USER_FIGURE, SAMPLE_IMAGES_FIGURE)
REPORT_TEXT_FILE = "report.txt"
REPORT_JSON_FILE = "report.json"

_DPI = 110
_PARTITION_COLORS = {constants.TRAIN: "#4C72B0", constants.VAL: "#DD8452",
                     constants.TEST: "#55A868"}
_BAR_COLOR = "#4C72B0"
# Integer histograms with at most this many distinct values get one bar per
# value; wider ranges are binned.
_MAX_UNIT_BARS = 40


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
                example[constants.FINE_GRAINED_LABELS_FEATURE].numpy().tolist(),
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
      "partition_images": {p: partition_images[p] for p in constants.PARTITIONS},
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


# ----------------------------------------------------------------------------
# Figures.
# ----------------------------------------------------------------------------


def _plural(n: int, noun: str) -> str:
  return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _new_figure(width: float, height: float):
  # matplotlib.figure.Figure renders with the Agg canvas when saved as PNG and
  # touches no pyplot/global backend state.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _save(figure, path: str) -> None:
  with io_utils.atomic_path(path) as tmp:
    figure.savefig(tmp, format="png", dpi=_DPI)


def _annotate_bars(ax, bars, values: Sequence[int], horizontal: bool,
                   total: Optional[int] = None) -> None:
  for bar, value in zip(bars, values):
    text = f"{value:,}"
    if total:
      text += f" ({100.0 * value / total:.1f}%)"
    if horizontal:
      ax.annotate(text, (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                  xytext=(3, 0), textcoords="offset points", va="center",
                  fontsize=8)
    else:
      ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                  xytext=(0, 2), textcoords="offset points", ha="center",
                  va="bottom", fontsize=9)


def plot_partitions(stats: dict[str, Any], path: str) -> None:
  """Bar charts of images and users per partition."""
  figure = _new_figure(9, 4)
  axes = figure.subplots(1, 2)
  partitions = list(constants.PARTITIONS)
  colors = [_PARTITION_COLORS[p] for p in partitions]
  for ax, key, what in ((axes[0], "partition_images", "images"),
                        (axes[1], "partition_users", "users")):
    values = [stats[key][p] for p in partitions]
    bars = ax.bar(partitions, values, color=colors)
    _annotate_bars(ax, bars, values, horizontal=False)
    ax.set_title(f"{what.capitalize()} per partition "
                 f"(total {sum(values):,})")
    ax.set_xlabel("partition")
    ax.set_ylabel(f"number of {what}")
    ax.set_ylim(0, max(values + [1]) * 1.15)
    _count_axis(ax.yaxis)
  figure.suptitle("FLAIR split by user", fontsize=13)
  _save(figure, path)


def _horizontal_label_bars(counts: dict[str, int], total_images: int,
                           title: str, ylabel: str, path: str) -> None:
  names = list(counts)
  values = [counts[n] for n in names]
  figure = _new_figure(9, max(3.0, 0.32 * len(names) + 1.4))
  ax = figure.subplots()
  if not names:
    ax.text(0.5, 0.5, "no labels", ha="center", va="center",
            transform=ax.transAxes)
  bars = ax.barh(names, values, color=_BAR_COLOR)
  _annotate_bars(ax, bars, values, horizontal=True, total=total_images)
  ax.invert_yaxis()  # most frequent on top
  ax.set_xlim(0, max(values + [1]) * 1.3)  # room for the annotations
  _count_axis(ax.xaxis)
  ax.set_title(title)
  ax.set_xlabel(f"number of images with the label (of {total_images:,} "
                "images; % in brackets)")
  ax.set_ylabel(ylabel)
  ax.tick_params(axis="y", labelsize=9)
  _save(figure, path)


def plot_coarse_labels(stats: dict[str, Any], path: str) -> None:
  """Horizontal bars: images per coarse label, most frequent on top."""
  counts = stats["coarse_label_image_counts"]
  _horizontal_label_bars(
      counts, stats["num_images"],
      f"Coarse labels: images per label ({len(counts)} labels)",
      "coarse label", path)


def plot_top_fine_labels(stats: dict[str, Any], path: str) -> None:
  """Horizontal bars: images per fine-grained label for the top labels."""
  counts = stats["top_fine_grained_labels"]
  _horizontal_label_bars(
      counts, stats["num_images"],
      f"Top {len(counts)} fine-grained labels (of "
      f"{stats['num_fine_grained_labels_seen']:,} seen)",
      "fine-grained label", path)


def _count_axis(axis) -> None:
  """Integer ticks with thousands separators on a linear count axis."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  axis.set_major_locator(
      ticker.MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
  axis.set_major_formatter(ticker.StrMethodFormatter("{x:,.0f}"))


def _log_log_axes(ax) -> None:
  """Log x and y with plain-number ticks at 1, 2, 5, 10, 20, 50, ... (so that
  short ranges get labels too)."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  ax.set_xscale("log")
  ax.set_yscale("log")
  for axis in (ax.xaxis, ax.yaxis):
    axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _integer_histogram(ax, histogram: dict[str, int]) -> str:
  """Draws `{value: count}` (value an integer as a string).

  One bar per integer when the values span fewer than `_MAX_UNIT_BARS`;
  otherwise (a heavy tail) geometric bins on log-log axes, or, when some value
  is 0, linear bins with a log count axis.

  Returns:
    A note for the x axis label: "" or " (log scale)".
  """
  values = [int(k) for k in histogram]
  counts = [histogram[k] for k in histogram]
  if not values:
    return ""
  low, high = min(values), max(values)
  if high - low < _MAX_UNIT_BARS:
    ax.bar(values, counts, width=0.8, color=_BAR_COLOR)
    ax.set_xlim(low - 0.7, high + 0.7)
    ax.xaxis.get_major_locator().set_params(integer=True)
    _count_axis(ax.yaxis)
    return ""
  if low >= 1:
    edges = _log_bin_edges(high)
    ax.hist(values, bins=edges, weights=counts, color=_BAR_COLOR,
            edgecolor="white", linewidth=0.5)
    _log_log_axes(ax)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_ylim(0.7, None)
    return " (log scale)"
  ax.hist(values, bins=np.linspace(low, high + 1, _MAX_UNIT_BARS + 1),
          weights=counts, color=_BAR_COLOR, edgecolor="white", linewidth=0.5)
  ax.set_yscale("log")
  return ""


def _two_histograms(stats_pair: dict[str, Any], title: str, noun: str,
                    ylabel: str, path: str) -> None:
  figure = _new_figure(11, 4.2)
  axes = figure.subplots(1, 2)
  for ax, key, kind in ((axes[0], "coarse", "coarse"),
                        (axes[1], "fine_grained", "fine-grained")):
    dist = stats_pair[key]
    x_note = _integer_histogram(ax, dist["histogram"])
    s = dist["summary"]
    ax.set_title(f"{kind} labels (mean {s['mean']:.2f}, median "
                 f"{s['median']:g}, max {s['max']:,.0f})")
    ax.set_xlabel(f"number of distinct {kind} labels {noun}{x_note}")
    ax.set_ylabel(ylabel + (" (log scale)" if x_note else ""))
  figure.suptitle(title, fontsize=13)
  _save(figure, path)


def plot_labels_per_image(stats: dict[str, Any], path: str) -> None:
  """Histograms of the number of coarse and fine labels per image."""
  _two_histograms(stats["labels_per_image"], "Labels per image",
                  "on the image", "number of images", path)


def plot_labels_per_user(stats: dict[str, Any], path: str) -> None:
  """Histograms of the number of distinct coarse and fine labels per user."""
  _two_histograms(stats["distinct_labels_per_user"],
                  "Distinct labels per user (over all of a user's images)",
                  "of the user", "number of users", path)


def _log_bin_edges(max_value: int, num_bins: int = 25) -> np.ndarray:
  """Integer bin edges 1 = e0 < e1 < ... with max_value < e_last, roughly
  evenly spaced in log scale; bin i holds values in [e_i, e_{i+1})."""
  edges = np.unique(np.floor(np.logspace(
      0, math.log10(max_value + 1), num_bins + 1)).astype(np.int64))
  if edges[-1] <= max_value:
    edges = np.append(edges, max_value + 1)
  return edges


def plot_images_per_user(stats: dict[str, Any],
                         user_counts_by_partition: dict[str, list[int]],
                         path: str) -> None:
  """Histogram of images per user on log-log axes (the counts are
  heavy-tailed), all users as bars and each partition as an outline."""
  everyone = [n for counts in user_counts_by_partition.values() for n in counts]
  edges = _log_bin_edges(max(everyone))
  figure = _new_figure(9, 5)
  ax = figure.subplots()
  s = stats["images_per_user"]["summary"]
  ax.hist(everyone, bins=edges, color="#BBBBBB", edgecolor="white",
          label=f"all users ({len(everyone):,})")
  line_styles = dict(zip(constants.PARTITIONS, ("-", "--", ":")))
  for partition, counts in user_counts_by_partition.items():
    if counts:
      ax.hist(counts, bins=edges, histtype="step", linewidth=1.8,
              color=_PARTITION_COLORS[partition],
              linestyle=line_styles.get(partition, "-"),
              label=f"{partition} ({_plural(len(counts), 'user')})")
  _log_log_axes(ax)
  ax.set_xlim(edges[0], edges[-1])
  ax.set_ylim(0.7, None)
  ax.set_title(f"Images per user (log-log; mean {s['mean']:.1f}, median "
               f"{s['median']:g}, max {s['max']:,.0f})")
  ax.set_xlabel("number of images of the user (log scale; a bar covers "
                "[left edge, right edge) images)")
  ax.set_ylabel("number of users (log scale)")
  ax.legend(loc="upper right")
  _save(figure, path)


def plot_sample_images(rows: Sequence[Sequence[SampleImage]],
                       path: str) -> None:
  """A grid: one row per sample user, its images with their labels.

  The tile title lists the coarse labels; the text under the tile the
  fine-grained ones; the row's first tile names the user.
  """
  num_rows = max(1, len(rows))
  num_cols = max([len(r) for r in rows] + [1])
  figure = _new_figure(2.9 * num_cols + 0.6, 3.6 * num_rows + 0.5)
  axes = np.asarray(figure.subplots(num_rows, num_cols, squeeze=False))
  for r in range(num_rows):
    row = rows[r] if r < len(rows) else []
    for c in range(num_cols):
      ax = axes[r, c]
      ax.set_xticks([])
      ax.set_yticks([])
      if c >= len(row):
        ax.set_axis_off()
        continue
      tile = row[c]
      if tile.pixels is not None:
        ax.imshow(tile.pixels)
      else:
        ax.set_facecolor("#DDDDDD")
        ax.text(0.5, 0.5, tile.note, ha="center", va="center",
                transform=ax.transAxes, fontsize=9)
      coarse = ", ".join(tile.record.labels) or "(no coarse labels)"
      ax.set_title("\n".join(textwrap.wrap(coarse, 30)[:2]), fontsize=9,
                   fontweight="bold")
      fine = ", ".join(tile.record.fine_grained_labels) or "(none)"
      fine_lines = textwrap.wrap("fine: " + fine, 38)
      if len(fine_lines) > 3:
        fine_lines = fine_lines[:3]
        fine_lines[-1] += " ..."
      ax.set_xlabel("\n".join(fine_lines), fontsize=7.5)
      if c == 0:
        ax.set_ylabel(f"user {tile.record.user_id}\n({tile.record.partition})",
                      fontsize=9)
  if not rows:
    axes[0, 0].set_axis_off()
    axes[0, 0].text(0.5, 0.5, "no users", ha="center", va="center")
  figure.suptitle("Sample images of the largest users (bold: coarse labels; "
                  "below: fine-grained labels)", fontsize=12)
  _save(figure, path)


# ----------------------------------------------------------------------------
# The report.
# ----------------------------------------------------------------------------


def _summary_line(s: dict[str, float]) -> str:
  return (f"mean {s['mean']:.2f}, std {s['std']:.2f}, min {s['min']:g}, "
          f"q25 {s['q25']:g}, median {s['median']:g}, q75 {s['q75']:g}, "
          f"max {s['max']:g}")


def format_report(report: dict[str, Any]) -> str:
  """The human-readable report (what `main` prints and report.txt holds)."""
  lines = [f"FLAIR data exploration of {report['source']['kind']} "
           f"{report['source']['path']}", ""]
  lines.append(
      f"{report['num_images']:,} images from {report['num_users']:,} users; "
      f"{report['num_coarse_labels_seen']} coarse and "
      f"{report['num_fine_grained_labels_seen']:,} fine-grained labels seen")
  lines += ["", f"{'partition':<10}{'images':>12}{'users':>10}"
                f"{'images/user (mean, median, max)':>36}"]
  for p in constants.PARTITIONS:
    s = report["images_per_user_by_partition"][p]
    lines.append(
        f"{p:<10}{report['partition_images'][p]:>12,}"
        f"{report['partition_users'][p]:>10,}"
        f"{s['mean']:>16.2f}{s['median']:>10g}{s['max']:>10g}")
  if report["users_in_several_partitions"]:
    lines.append(f"warning: {len(report['users_in_several_partitions'])} users "
                 "appear in several partitions")

  total = max(report["num_images"], 1)
  for title, counts in (
      ("Coarse labels (images with the label)",
       report["coarse_label_image_counts"]),
      (f"Top {len(report['top_fine_grained_labels'])} fine-grained labels "
       "(images with the label)", report["top_fine_grained_labels"])):
    lines += ["", title]
    width = max([len(n) for n in counts] + [5])
    for name, count in counts.items():
      lines.append(f"  {name:<{width}}  {count:>9,}  "
                   f"{100.0 * count / total:5.1f}%")

  lines += ["", "Labels per image"]
  for key, kind in (("coarse", "coarse"), ("fine_grained", "fine-grained")):
    lines.append(f"  {kind:<13} "
                 f"{_summary_line(report['labels_per_image'][key]['summary'])}")
  lines += ["", "Images per user (heavy-tailed)",
            f"  {_summary_line(report['images_per_user']['summary'])}"]
  lines += ["", "Distinct labels per user"]
  for key, kind in (("coarse", "coarse"), ("fine_grained", "fine-grained")):
    lines.append(
        f"  {kind:<13} "
        f"{_summary_line(report['distinct_labels_per_user'][key]['summary'])}")

  lines += ["", "Sample users (largest first) in " + SAMPLE_IMAGES_FIGURE]
  for user in report["sample_users"]:
    lines.append(f"  {user['user_id']} ({user['partition']}, "
                 f"{user['num_images']:,} images)")
    for image in user["images"]:
      name = image["image_id"] or "(image id not stored)"
      note = f" [{image['note']}]" if image["note"] else ""
      lines.append(f"    {name}: {', '.join(image['labels'])}{note}")

  lines += ["", f"Figures in {report['output_dir']}:"]
  lines += [f"  {name}" for name in report["figures"]]
  return "\n".join(lines) + "\n"


def explore(output_dir: str,
            dataset_dir: Optional[str] = None,
            tfrecords_dir: Optional[str] = None,
            num_sample_users: int = 4,
            num_sample_images: int = 5,
            top_k_fine_labels: int = 20,
            show_progress: bool = True) -> dict[str, Any]:
  """Computes the exploration report and writes it with the figures.

  Exactly one of `dataset_dir` and `tfrecords_dir` is given.

  Args:
    output_dir: where `report.txt`, `report.json` and the `FIGURES` go
      (created; files are written atomically, existing ones replaced).
    dataset_dir: a downloaded dataset directory (`labels_and_metadata.json`,
      `small_images/`).
    tfrecords_dir: a prepared per-user TFRecords directory.
    num_sample_users: users (the largest) in the sample image grid, >= 1.
    num_sample_images: images per sample user, >= 1.
    top_k_fine_labels: fine-grained labels in the top-labels figure, >= 1.
    show_progress: tqdm progress bar while reading TFRecords.

  Returns:
    The report: `compute_statistics(...)`'s dict plus `source`
    (`{"kind": "dataset_dir" | "tfrecords_dir", "path"}`), `sample_users`
    (`[{"user_id", "partition", "num_images", "images": [{"image_id",
    "labels", "fine_grained_labels", "note"}]}]`), `output_dir` and
    `figures` (file names).

  Raises:
    FlairInputError: both or neither input directory, a bad count argument,
      an output path that is a file, or bad input data (see
      `load_metadata_records`, `load_tfrecord_records`).
  """
  if (dataset_dir is None) == (tfrecords_dir is None):
    raise errors.FlairInputError(
        "give exactly one of --dataset_dir (a downloaded dataset) and "
        "--tfrecords_dir (prepared TFRecords)")
  for name, value in (("num_sample_users", num_sample_users),
                      ("num_sample_images", num_sample_images),
                      ("top_k_fine_labels", top_k_fine_labels)):
    if not isinstance(value, int) or value < 1:
      raise errors.FlairInputError(f"--{name} must be a positive integer, "
                                   f"got {value!r}")
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise errors.FlairInputError(
        f"--output_dir {output_dir}: exists and is not a directory")

  if dataset_dir is not None:
    records = load_metadata_records(dataset_dir)
    coarse_vocabulary = ()
    source = {"kind": "dataset_dir", "path": os.path.abspath(dataset_dir)}
  else:
    records = load_tfrecord_records(tfrecords_dir, show_progress=show_progress)
    coarse_vocabulary = load_label_names(tfrecords_dir)[0]
    source = {"kind": "tfrecords_dir", "path": os.path.abspath(tfrecords_dir)}
  # FLAIR's 17 coarse labels are shown even without images, unless the data
  # uses other names (then only its own label index and observed labels).
  if {l for r in records for l in r.labels} <= set(constants.COARSE_LABELS):
    coarse_vocabulary = tuple(coarse_vocabulary) + tuple(
        l for l in constants.COARSE_LABELS if l not in coarse_vocabulary)
  logging.info("Computing statistics of %d images", len(records))
  stats = compute_statistics(records, top_k_fine_labels, coarse_vocabulary)

  chosen = choose_sample_users(records, num_sample_users, num_sample_images)
  user_sizes = collections.Counter(r.user_id for r in records)
  logging.info("Loading sample images of %d users", len(chosen))
  if dataset_dir is not None:
    rows = sample_images_from_dataset_dir(dataset_dir, chosen)
  else:
    rows = sample_images_from_tfrecords(tfrecords_dir, list(chosen),
                                        num_sample_images)

  os.makedirs(output_dir, exist_ok=True)
  report = dict(stats)
  report["source"] = source
  report["sample_users"] = [{
      "user_id": row[0].record.user_id,
      "partition": row[0].record.partition,
      "num_images": user_sizes[row[0].record.user_id],
      "images": [{"image_id": t.record.image_id,
                  "labels": list(t.record.labels),
                  "fine_grained_labels": list(t.record.fine_grained_labels),
                  "note": t.note} for t in row],
  } for row in rows if row]
  report["output_dir"] = os.path.abspath(output_dir)
  report["figures"] = list(FIGURES)

  by_partition = images_per_user_by_partition(records)

  plots: list[tuple[str, Callable[[str], None]]] = [
      (PARTITIONS_FIGURE, lambda p: plot_partitions(stats, p)),
      (COARSE_LABELS_FIGURE, lambda p: plot_coarse_labels(stats, p)),
      (TOP_FINE_LABELS_FIGURE, lambda p: plot_top_fine_labels(stats, p)),
      (LABELS_PER_IMAGE_FIGURE, lambda p: plot_labels_per_image(stats, p)),
      (IMAGES_PER_USER_FIGURE,
       lambda p: plot_images_per_user(stats, by_partition, p)),
      (LABELS_PER_USER_FIGURE, lambda p: plot_labels_per_user(stats, p)),
      (SAMPLE_IMAGES_FIGURE, lambda p: plot_sample_images(rows, p)),
  ]
  for name, plot in plots:
    logging.info("Drawing %s", name)
    plot(os.path.join(output_dir, name))
  io_utils.write_text_atomic(os.path.join(output_dir, REPORT_TEXT_FILE),
                             format_report(report))
  io_utils.write_json_atomic(os.path.join(output_dir, REPORT_JSON_FILE),
                             report)
  return report


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def _define_flags() -> None:
  """Defines the flags (at start-up of the command only, so that importing
  this module defines no flags that could clash with other modules')."""
  flags.DEFINE_string("dataset_dir", None,
                      "A downloaded FLAIR dataset directory "
                      "(labels_and_metadata.json, small_images/).")
  flags.DEFINE_string("tfrecords_dir", None,
                      "A prepared per-user TFRecords directory "
                      "(<partition>/<user_id>.tfrecords, label index JSON); "
                      "instead of --dataset_dir.")
  flags.DEFINE_string("output_dir", None,
                      "Where report.txt, report.json and the PNG figures go.")
  flags.DEFINE_integer("num_sample_users", 4,
                       "Users (the largest) shown in the sample image grid.")
  flags.DEFINE_integer("num_sample_images", 5,
                       "Images per user in the sample image grid.")
  flags.DEFINE_integer("top_k_fine_labels", 20,
                       "Number of most frequent fine-grained labels plotted.")
  flags.mark_flag_as_required("output_dir")


@errors.exit_on_input_error
def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise errors.FlairInputError(
        f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  report = explore(f.output_dir, dataset_dir=f.dataset_dir,
                   tfrecords_dir=f.tfrecords_dir,
                   num_sample_users=f.num_sample_users,
                   num_sample_images=f.num_sample_images,
                   top_k_fine_labels=f.top_k_fine_labels)
  print(format_report(report), end="")


def run() -> None:
  """Console-script entry point (`flair-explore`)."""
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
