"""Exports a FLAIR dataset directory to pfl-research's federated HDF5 file.

  python export_pfl_hdf5.py --dataset_dir D --output_file F.hdf5

Reads `D/labels_and_metadata.json` and `D/small_images/`, checks every record
and image as `prepare_tfrecords.py` does (all problems listed; nothing
written if any), and writes `F.hdf5` in the layout of pfl-research's
`benchmarks/dataset/flair/download_preprocess.py` (`benchmark.pfl_hdf5`):
per partition and user, the decoded images (uint8 [n, 256, 256, 3]), image
ids and label rows/columns, and the label mappings (sorted names, equal to
`label_index.json` of the same data). Each user's group also holds the JPEG
files' bytes (`encoded_jpegs`), so that

  python prepare_tfrecords.py --pfl_hdf5 F.hdf5 --tfrecords_dir T

writes the same TFRecords, byte for byte, as from `D`: pfl-research and this
suite then train on the same images. The file is written under a temporary
name and renamed when complete.
"""

import collections
import io
import sys
from typing import Optional

from absl import app
from absl import flags
import numpy as np

from benchmark.cli import commands
from benchmark.core import constants
from benchmark.core import errors
from benchmark.core import file_io
from benchmark.data import formats
from benchmark.prepare import pfl_hdf5
from benchmark.prepare import sources
import prepare_tfrecords


def export(dataset_dir: str, output_file: str,
           show_progress: bool = True) -> dict[str, int]:
  """Writes `output_file` from `dataset_dir` (see the module doc).

  Args:
    dataset_dir: a FLAIR dataset directory (the download layout).
    output_file: the HDF5 file to write (replaced if it exists).
    show_progress: show tqdm progress bars.

  Returns:
    Images written per partition.

  Raises:
    FlairInputError: a missing or malformed dataset directory.
    prepare_tfrecords.BadInputError: bad records or images (all listed).
    OutputWriteError: the output cannot be written (names the file).
  """
  import h5py  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  source = sources.DownloadedSource(dataset_dir)
  records, problems = prepare_tfrecords.check_input(source, show_progress)
  if problems:
    shown = "; ".join(p.describe() for p in problems[:5])
    raise prepare_tfrecords.BadInputError(
        f"{len(problems)} problem(s) in {source.name} / its images, nothing "
        f"written: {shown}" + (f"; and {len(problems) - 5} more"
                               if len(problems) > 5 else ""), problems)
  label_index = formats.build_label_index(
      (r.labels, r.fine_grained_labels) for r in records)
  by_user = collections.defaultdict(list)
  for record in records:
    by_user[(record.partition, record.user_id)].append(record)
  images = {p: 0 for p in constants.PARTITIONS}
  users = by_user.items()
  if show_progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    users = tqdm.tqdm(users, desc="writing users", unit="user")
  with file_io.atomic_path(output_file, flag="--output_file") as tmp:
    with file_io.output_errors(output_file, flag="--output_file",
                                exact=True), h5py.File(tmp, "w") as h5:
      for (partition, user_id), user_records in users:
        jpegs = [source.read_image(source.image_key(r.index, r.image_id))
                 for r in user_records]
        pixels = np.stack([
            np.asarray(Image.open(io.BytesIO(j)).convert("RGB"))
            for j in jpegs])
        pfl_hdf5.write_user(
            h5, partition, user_id, [r.image_id for r in user_records],
            jpegs, pixels,
            [[label_index[constants.LABELS_KEY][n] for n in r.labels]
             for r in user_records],
            [[label_index[constants.FINE_GRAINED_LABELS_KEY][n]
              for n in r.fine_grained_labels] for r in user_records])
        images[partition] += len(user_records)
      pfl_hdf5.write_metadata(h5, label_index)
  return images


def _define_flags() -> None:
  flags.DEFINE_string("dataset_dir", None,
                      "FLAIR dataset directory (labels_and_metadata.json, "
                      "small_images/).")
  flags.DEFINE_string("output_file", None,
                      "The HDF5 file to write (pfl-research's FLAIR layout).")
  flags.mark_flags_as_required(["dataset_dir", "output_file"])


@commands.exit_on_input_error
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise errors.FlairInputError(
        f"unexpected positional arguments: {' '.join(argv[1:])}")
  try:
    images = export(flags.FLAGS.dataset_dir, flags.FLAGS.output_file)
  except prepare_tfrecords.BadInputError as e:
    print(f"{len(e.problems)} problem(s) found:", file=sys.stderr)
    for problem in e.problems:
      print(f"  {problem.describe()}", file=sys.stderr)
    raise
  print(f"wrote {flags.FLAGS.output_file}: " + ", ".join(
      f"{p} {n} images" for p, n in images.items()))


def run(argv: Optional[list[str]] = None) -> None:
  """Console-script entry point (`flair-export-pfl-hdf5`)."""
  _define_flags()
  app.run(main, argv)


if __name__ == "__main__":
  run()
