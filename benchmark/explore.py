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
The image records and statistics are `benchmark.dataset_stats`'s, the figures
`benchmark.dataset_figures`'s; this module picks the input, writes the report
and names the files.
"""

import collections
import os
from typing import Any, Callable, Optional, Sequence

from absl import app
from absl import flags
from absl import logging

from benchmark.analysis import dataset_figures
from benchmark.analysis import dataset_stats
from benchmark.cli import commands
from benchmark.core import constants
from benchmark.core import errors
from benchmark.core import file_io

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
    The report: `dataset_stats.compute_statistics(...)`'s dict plus `source`
    (`{"kind": "dataset_dir" | "tfrecords_dir", "path"}`), `sample_users`
    (`[{"user_id", "partition", "num_images", "images": [{"image_id",
    "labels", "fine_grained_labels", "note"}]}]`), `output_dir` and
    `figures` (file names).

  Raises:
    FlairInputError: both or neither input directory, a bad count argument,
      an output path that is a file, or bad input data (see
      `dataset_stats.load_metadata_records`,
      `dataset_stats.load_tfrecord_records`).
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
    records = dataset_stats.load_metadata_records(dataset_dir)
    coarse_vocabulary = ()
    source = {"kind": "dataset_dir", "path": os.path.abspath(dataset_dir)}
  else:
    records = dataset_stats.load_tfrecord_records(tfrecords_dir,
                                                  show_progress=show_progress)
    coarse_vocabulary = dataset_stats.load_label_names(tfrecords_dir)[0]
    source = {"kind": "tfrecords_dir", "path": os.path.abspath(tfrecords_dir)}
  # FLAIR's 17 coarse labels are shown even without images, unless the data
  # uses other names (then only its own label index and observed labels).
  if {l for r in records for l in r.labels} <= set(constants.COARSE_LABELS):
    coarse_vocabulary = tuple(coarse_vocabulary) + tuple(
        l for l in constants.COARSE_LABELS if l not in coarse_vocabulary)
  logging.info("Computing statistics of %d images", len(records))
  stats = dataset_stats.compute_statistics(records, top_k_fine_labels,
                                           coarse_vocabulary)

  chosen = dataset_stats.choose_sample_users(records, num_sample_users,
                                             num_sample_images)
  user_sizes = collections.Counter(r.user_id for r in records)
  logging.info("Loading sample images of %d users", len(chosen))
  if dataset_dir is not None:
    rows = dataset_stats.sample_images_from_dataset_dir(dataset_dir, chosen)
  else:
    rows = dataset_stats.sample_images_from_tfrecords(
        tfrecords_dir, list(chosen), num_sample_images)

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

  by_partition = dataset_stats.images_per_user_by_partition(records)

  plots: list[tuple[str, Callable[[str], None]]] = [
      (PARTITIONS_FIGURE,
       lambda p: dataset_figures.plot_partitions(stats, p)),
      (COARSE_LABELS_FIGURE,
       lambda p: dataset_figures.plot_coarse_labels(stats, p)),
      (TOP_FINE_LABELS_FIGURE,
       lambda p: dataset_figures.plot_top_fine_labels(stats, p)),
      (LABELS_PER_IMAGE_FIGURE,
       lambda p: dataset_figures.plot_labels_per_image(stats, p)),
      (IMAGES_PER_USER_FIGURE,
       lambda p: dataset_figures.plot_images_per_user(stats, by_partition, p)),
      (LABELS_PER_USER_FIGURE,
       lambda p: dataset_figures.plot_labels_per_user(stats, p)),
      (SAMPLE_IMAGES_FIGURE,
       lambda p: dataset_figures.plot_sample_images(rows, p)),
  ]
  for name, plot in plots:
    logging.info("Drawing %s", name)
    plot(os.path.join(output_dir, name))
  file_io.write_text_atomic(os.path.join(output_dir, REPORT_TEXT_FILE),
                             format_report(report))
  file_io.write_json_atomic(os.path.join(output_dir, REPORT_JSON_FILE),
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


@commands.exit_on_input_error
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
