"""The explore report: its input read, its numbers assembled, its files written.

`make_report` is what `python -m benchmark.explore` runs, in named steps:
check the arguments (`check_arguments`), read the image records of one input
(`read_input`: a downloaded dataset directory or a prepared TFRecords
directory, through `dataset_stats`), compute the statistics
(`dataset_stats.compute_statistics`), load the sample users' images
(`load_sample_rows`), assemble the report dict (`assemble_report`), draw the
figures (`dataset_figures.draw_figures`) and write `report.txt`
(`format_report`) and `report.json` (`write_report`). This module owns the
report's file names and the layout of its dict; the figure names are
`dataset_figures`'.
"""

import collections
import dataclasses
import os
from typing import Any, Optional, Sequence

from absl import logging

from benchmark.analysis import dataset_figures
from benchmark.analysis import dataset_stats
from benchmark.core import constants
from benchmark.core import errors
from benchmark.core import file_io

# Report file names (in the output directory, beside the figures).
REPORT_TEXT_FILE = "report.txt"
REPORT_JSON_FILE = "report.json"

_DATASET_DIR = "dataset_dir"
_TFRECORDS_DIR = "tfrecords_dir"


@dataclasses.dataclass(frozen=True)
class DatasetInput:
  """The image records of one input and where they came from.

  Attributes:
    records: every image's labels and owner (at least one).
    coarse_vocabulary: coarse label names the report lists even when no image
      carries them (see `coarse_vocabulary`).
    source: `{"kind": "dataset_dir" | "tfrecords_dir", "path": <absolute
      path>}`, as the report stores it.
  """
  records: list[dataset_stats.ImageRecord]
  coarse_vocabulary: tuple[str, ...]
  source: dict[str, str]


def check_arguments(output_dir: str, dataset_dir: Optional[str],
                    tfrecords_dir: Optional[str], num_sample_users: int,
                    num_sample_images: int, top_k_fine_labels: int) -> None:
  """Refuses arguments of `make_report` that cannot make a report.

  Raises:
    FlairInputError: both or neither of `dataset_dir` and `tfrecords_dir`;
      a count that is not a positive `int` ("--<name> must be a positive
      integer, got <value!r>"); an `output_dir` that exists and is not a
      directory. Checked in that order, before anything is read.
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


def coarse_vocabulary(records: Sequence[dataset_stats.ImageRecord],
                      index_names: Sequence[str] = ()) -> tuple[str, ...]:
  """The coarse label names the report lists, seen or not.

  FLAIR's coarse labels (`constants.COARSE_LABELS`) are listed even without
  images, unless the data uses other names: then only `index_names` (and,
  in the statistics, the observed labels).

  Args:
    records: every image of the dataset.
    index_names: the coarse names of the label index, in index order; empty
      for a dataset directory, which has no index.

  Returns:
    `index_names`, followed by FLAIR's coarse labels not among them when
    every observed coarse label is one of FLAIR's.
  """
  vocabulary = tuple(index_names)
  if {l for r in records for l in r.labels} <= set(constants.COARSE_LABELS):
    vocabulary += tuple(l for l in constants.COARSE_LABELS
                        if l not in vocabulary)
  return vocabulary


def read_input(dataset_dir: Optional[str], tfrecords_dir: Optional[str],
               show_progress: bool = True) -> DatasetInput:
  """Reads the image records of the one input given.

  Args:
    dataset_dir: a downloaded dataset directory, or None.
    tfrecords_dir: a prepared per-user TFRecords directory, or None (exactly
      one of the two is given; see `check_arguments`).
    show_progress: tqdm progress bar while reading TFRecords.

  Raises:
    FlairInputError: bad input data (see
      `dataset_stats.load_metadata_records`,
      `dataset_stats.load_tfrecord_records`).
  """
  if dataset_dir is not None:
    records = dataset_stats.load_metadata_records(dataset_dir)
    index_names = ()
    source = {"kind": _DATASET_DIR, "path": os.path.abspath(dataset_dir)}
  else:
    records = dataset_stats.load_tfrecord_records(tfrecords_dir,
                                                  show_progress=show_progress)
    index_names = dataset_stats.load_label_names(tfrecords_dir)[0]
    source = {"kind": _TFRECORDS_DIR, "path": os.path.abspath(tfrecords_dir)}
  return DatasetInput(records=records,
                      coarse_vocabulary=coarse_vocabulary(records, index_names),
                      source=source)


def load_sample_rows(records: Sequence[dataset_stats.ImageRecord],
                     num_users: int, num_images: int,
                     dataset_dir: Optional[str] = None,
                     tfrecords_dir: Optional[str] = None
                     ) -> list[list[dataset_stats.SampleImage]]:
  """Loads the sample grid: the largest users' first images.

  Args:
    records: every image of the dataset (`read_input`).
    num_users: users in the grid, the ones with the most images
      (`dataset_stats.choose_sample_users`), >= 1.
    num_images: images per user, >= 1.
    dataset_dir: the downloaded dataset directory the records came from, or
      None.
    tfrecords_dir: the TFRecords directory they came from, or None (exactly
      one of the two is given).

  Returns:
    One list of tiles per user, largest user first; a tile without pixels
    carries a note (an image file missing or unreadable).

  Raises:
    FlairInputError: an unreadable TFRecord file or a label outside the label
      index (`dataset_stats.sample_images_from_tfrecords`).
  """
  chosen = dataset_stats.choose_sample_users(records, num_users, num_images)
  logging.info("Loading sample images of %d users", len(chosen))
  if dataset_dir is not None:
    return dataset_stats.sample_images_from_dataset_dir(dataset_dir, chosen)
  return dataset_stats.sample_images_from_tfrecords(tfrecords_dir,
                                                    list(chosen), num_images)


def assemble_report(stats: dict[str, Any], dataset_input: DatasetInput,
                    sample_rows: Sequence[Sequence[dataset_stats.SampleImage]],
                    output_dir: str) -> dict[str, Any]:
  """The report dict: the statistics and what the text adds to them.

  Args:
    stats: `dataset_stats.compute_statistics`'s dict for
      `dataset_input.records`.
    dataset_input: the records and their source (`read_input`).
    sample_rows: the sample grid (`load_sample_rows`); empty rows are left
      out.
    output_dir: the folder the report and figures go to.

  Returns:
    A new JSON-serialisable dict: `stats`' keys plus `source`
    (`dataset_input.source`), `sample_users` (`[{"user_id", "partition",
    "num_images", "images": [{"image_id", "labels", "fine_grained_labels",
    "note"}]}]`, `num_images` counting all of the user's images),
    `output_dir` (absolute) and `figures` (`dataset_figures.FIGURES`, as a
    list).
  """
  user_sizes = collections.Counter(r.user_id for r in dataset_input.records)
  report = dict(stats)
  report["source"] = dataset_input.source
  report["sample_users"] = [{
      "user_id": row[0].record.user_id,
      "partition": row[0].record.partition,
      "num_images": user_sizes[row[0].record.user_id],
      "images": [{"image_id": t.record.image_id,
                  "labels": list(t.record.labels),
                  "fine_grained_labels": list(t.record.fine_grained_labels),
                  "note": t.note} for t in row],
  } for row in sample_rows if row]
  report["output_dir"] = os.path.abspath(output_dir)
  report["figures"] = list(dataset_figures.FIGURES)
  return report


def _summary_line(s: dict[str, float]) -> str:
  return (f"mean {s['mean']:.2f}, std {s['std']:.2f}, min {s['min']:g}, "
          f"q25 {s['q25']:g}, median {s['median']:g}, q75 {s['q75']:g}, "
          f"max {s['max']:g}")


def format_report(report: dict[str, Any]) -> str:
  """The human-readable report: what `benchmark.explore` prints and
  `report.txt` holds.

  Args:
    report: `assemble_report`'s dict (or its JSON round trip).

  Returns:
    Lines ending in a newline: the totals, a table of images and users per
    partition, the label counts (with the % of images), the summaries of
    labels per image, images per user and distinct labels per user, the
    sample users and their images, and the figure names.
  """
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

  lines += ["", "Sample users (largest first) in " +
            dataset_figures.SAMPLE_IMAGES_FIGURE]
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


def write_report(report: dict[str, Any], output_dir: str) -> None:
  """Writes `report.txt` (`format_report`) and `report.json` (the dict as
  indented, key-sorted JSON) into `output_dir`, each atomically, replacing
  existing files.

  Raises:
    errors.OutputWriteError: a storage failure (`file_io.write_text_atomic`).
  """
  file_io.write_text_atomic(os.path.join(output_dir, REPORT_TEXT_FILE),
                            format_report(report))
  file_io.write_json_atomic(os.path.join(output_dir, REPORT_JSON_FILE),
                            report)


def make_report(output_dir: str,
                dataset_dir: Optional[str] = None,
                tfrecords_dir: Optional[str] = None,
                num_sample_users: int = 4,
                num_sample_images: int = 5,
                top_k_fine_labels: int = 20,
                show_progress: bool = True) -> dict[str, Any]:
  """Computes the exploration report and writes it with the figures.

  Exactly one of `dataset_dir` and `tfrecords_dir` is given.

  Args:
    output_dir: where `REPORT_TEXT_FILE`, `REPORT_JSON_FILE` and
      `dataset_figures.FIGURES` go (created; files are written atomically,
      existing ones replaced).
    dataset_dir: a downloaded dataset directory (`labels_and_metadata.json`,
      `small_images/`; images may be missing).
    tfrecords_dir: a prepared per-user TFRecords directory.
    num_sample_users: users (the largest) in the sample image grid, >= 1.
    num_sample_images: images per sample user, >= 1.
    top_k_fine_labels: fine-grained labels in the top-labels figure, >= 1.
    show_progress: tqdm progress bar while reading TFRecords.

  Returns:
    The report (`assemble_report`): `dataset_stats.compute_statistics(...)`'s
    dict plus `source`, `sample_users`, `output_dir` and `figures`.

  Raises:
    FlairInputError: both or neither input directory, a bad count argument,
      an output path that is a file (`check_arguments`), or bad input data
      (see `dataset_stats.load_metadata_records`,
      `dataset_stats.load_tfrecord_records`).
    errors.OutputWriteError: a storage failure writing a figure or a report
      file.
  """
  check_arguments(output_dir, dataset_dir, tfrecords_dir, num_sample_users,
                  num_sample_images, top_k_fine_labels)
  dataset_input = read_input(dataset_dir, tfrecords_dir, show_progress)
  logging.info("Computing statistics of %d images", len(dataset_input.records))
  stats = dataset_stats.compute_statistics(dataset_input.records,
                                           top_k_fine_labels,
                                           dataset_input.coarse_vocabulary)
  rows = load_sample_rows(dataset_input.records, num_sample_users,
                          num_sample_images, dataset_dir=dataset_dir,
                          tfrecords_dir=tfrecords_dir)
  os.makedirs(output_dir, exist_ok=True)
  report = assemble_report(stats, dataset_input, rows, output_dir)
  dataset_figures.draw_figures(
      stats, dataset_stats.images_per_user_by_partition(dataset_input.records),
      rows, output_dir)
  write_report(report, output_dir)
  return report
