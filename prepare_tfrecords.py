"""Command: converts a FLAIR dataset into per-user TFRecords.

  python prepare_tfrecords.py --dataset_dir D --tfrecords_dir T \
      [--num_workers N] [--skip_bad_images] [--report_path P]
  python prepare_tfrecords.py --hf_dataset H --tfrecords_dir T ...
  python prepare_tfrecords.py --pfl_hdf5 F --tfrecords_dir T ...

Reads `D/labels_and_metadata.json` and `D/small_images/<image_id>.jpg` (or
the same records and images from a local Hugging Face `apple/flair` copy, or
from pfl-research's HDF5) and writes `T/<partition>/<user_id>.tfrecords` and
`T/label_index.json` (docs/formats.md, "Per-user TFRecords"), then prints
users and images per partition.

Every record and image is checked first (fields, coarse labels against
FLAIR's 17, fine-grained labels against `D/label_relationship.txt` when it
is there, user ids short enough for a file name, images decoded): by
default any problem stops the run before anything is written, listing every
problem (exit status 1); with `--skip_bad_images` bad records are skipped
and listed in a JSON report (default `T/skipped_images.json`). A rerun keeps
the user files built from the same inputs (`T/prepare_manifest.jsonl`), so
an interrupted run resumes.
A full disk, a read-only output or a permission error is one line naming the
file. The pipeline: `benchmark.prepare.tfrecords`.
"""

from absl import flags

from benchmark.cli import commands
from benchmark.prepare import input_checks
from benchmark.prepare import tfrecords


def _define_flags() -> None:
  """Defines this command's flags (called by `run`, not at import: importing
  this module adds no global flags)."""
  flags.DEFINE_string("dataset_dir", None,
                      "FLAIR dataset directory (labels_and_metadata.json, "
                      "small_images/). Or give --hf_dataset or --pfl_hdf5.")
  flags.DEFINE_string("hf_dataset", None,
                      "Instead of --dataset_dir: a local copy of Hugging Face "
                      "apple/flair (a parquet file, a directory of *.parquet "
                      "shards, or a directory written by save_to_disk).")
  flags.DEFINE_string("pfl_hdf5", None,
                      "Instead of --dataset_dir: pfl-research's FLAIR HDF5 "
                      "file (dataset/flair/download_preprocess.py, or "
                      "export_pfl_hdf5.py).")
  flags.DEFINE_string("tfrecords_dir", None,
                      "Output directory for <partition>/<user_id>.tfrecords "
                      "and label_index.json.")
  flags.DEFINE_integer("num_workers", None,
                       "Worker processes; default all cores.", lower_bound=1)
  flags.DEFINE_bool("skip_bad_images", False,
                    "Skip records with a bad image or record and list them "
                    "in a report instead of stopping.")
  flags.DEFINE_string("report_path", None,
                      "Report of skipped records (with --skip_bad_images); "
                      "default <tfrecords_dir>/"
                      + tfrecords.SKIPPED_IMAGES_REPORT_FILE)
  flags.mark_flag_as_required("tfrecords_dir")


@commands.exit_on_input_error
def main(argv: list[str]) -> None:
  """Prepares with the flags' settings; prints the summary, or every
  problem found before the one-line error."""
  del argv  # exit_on_input_error refused positional arguments.
  flag_values = flags.FLAGS
  try:
    summary = tfrecords.prepare(flag_values.dataset_dir,
                                flag_values.tfrecords_dir,
                                num_workers=flag_values.num_workers,
                                skip_bad_images=flag_values.skip_bad_images,
                                report_path=flag_values.report_path,
                                hf_dataset=flag_values.hf_dataset,
                                pfl_hdf5=flag_values.pfl_hdf5)
  except input_checks.BadInputError as e:
    input_checks.print_problems(e.problems)
    raise
  print(summary.describe())


# Console-script entry point (`flair-prepare`).
run = commands.entry_point(_define_flags, main)


if __name__ == "__main__":
  run()
