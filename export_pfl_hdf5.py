"""Command: exports a FLAIR dataset directory to pfl-research's HDF5 file.

  python export_pfl_hdf5.py --dataset_dir D --output_file F.hdf5

Reads `D/labels_and_metadata.json` and `D/small_images/`, checks every record
and image as `prepare_tfrecords.py` does (all problems listed; nothing
written if any), and writes `F.hdf5` in the layout of pfl-research's
`benchmarks/dataset/flair/download_preprocess.py`, plus each image's JPEG
bytes, so that

  python prepare_tfrecords.py --pfl_hdf5 F.hdf5 --tfrecords_dir T

writes the same TFRecords, byte for byte, as from `D`: pfl-research and this
suite then train on the same images. The export:
`benchmark.prepare.pfl_export`.
"""

from typing import Optional

from absl import app
from absl import flags

from benchmark.cli import commands
from benchmark.prepare import input_checks
from benchmark.prepare import pfl_export


def _define_flags() -> None:
  """Defines this command's flags (called by `run`, not at import)."""
  flags.DEFINE_string("dataset_dir", None,
                      "FLAIR dataset directory (labels_and_metadata.json, "
                      "small_images/).")
  flags.DEFINE_string("output_file", None,
                      "The HDF5 file to write (pfl-research's FLAIR layout).")
  flags.mark_flags_as_required(["dataset_dir", "output_file"])


@commands.exit_on_input_error
def main(argv: list[str]) -> None:
  """Exports with the flags' settings; prints images per partition, or
  every problem found before the one-line error."""
  del argv  # exit_on_input_error refused positional arguments.
  try:
    images = pfl_export.export(flags.FLAGS.dataset_dir,
                               flags.FLAGS.output_file)
  except input_checks.BadInputError as e:
    input_checks.print_problems(e.problems)
    raise
  print(f"wrote {flags.FLAGS.output_file}: " + ", ".join(
      f"{p} {n} images" for p, n in images.items()))


def run(argv: Optional[list[str]] = None) -> None:
  """Console-script entry point (`flair-export-pfl-hdf5`); `argv` as for
  `absl.app.run` (default `sys.argv`)."""
  _define_flags()
  app.run(main, argv)


if __name__ == "__main__":
  run()
