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
`benchmark.analysis.dataset_figures.FIGURES`. This module only defines the
flags and prints the report; the work is
`benchmark.analysis.dataset_report.make_report`.
"""

from typing import Sequence

from absl import flags

from benchmark.analysis import dataset_report
from benchmark.cli import commands


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
  """Writes the report and figures the flags ask for and prints the report.

  Positional arguments are refused by `commands.exit_on_input_error`; errors
  end the command as it describes (one line, exit status 1).
  """
  del argv  # Only the program name: exit_on_input_error refuses the rest.
  f = flags.FLAGS
  report = dataset_report.make_report(
      f.output_dir, dataset_dir=f.dataset_dir, tfrecords_dir=f.tfrecords_dir,
      num_sample_users=f.num_sample_users,
      num_sample_images=f.num_sample_images,
      top_k_fine_labels=f.top_k_fine_labels)
  print(dataset_report.format_report(report), end="")


# Console-script entry point (`flair-explore`): defines the flags, runs `main`.
run = commands.entry_point(_define_flags, main)


if __name__ == "__main__":
  run()
