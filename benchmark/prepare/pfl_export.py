"""Exports a FLAIR dataset directory to pfl-research's federated HDF5 file.

`export` reads `D/labels_and_metadata.json` and `D/small_images/`, checks
every record and image as prepare does (`input_checks`: all problems listed;
nothing written if any), and writes the file in the layout of pfl-research's
`benchmarks/dataset/flair/download_preprocess.py` (`pfl_hdf5`): per
partition and user, the decoded images (uint8 [n, 256, 256, 3]), image ids
and label rows/columns, and the label mappings (sorted names, equal to
`label_index.json` of the same data). Each user's group also holds the JPEG
files' bytes (`encoded_jpegs`), so that preparing TFRecords from the file
(`sources.Hdf5Source`) gives the same bytes as from `D`. The file is written
under a temporary name and renamed when complete.
"""

import collections
import io
from typing import Sequence

import numpy as np

from benchmark.core import constants
from benchmark.core import file_io
from benchmark.data import formats
from benchmark.prepare import input_checks
from benchmark.prepare import pfl_hdf5
from benchmark.prepare import pool as pool_lib
from benchmark.prepare import sources

_FLAG = "--output_file"


def _write_user(h5, source, label_index: dict[str, dict[str, int]],
                partition: str, user_id: str,
                user_records: Sequence[input_checks.CheckedRecord]) -> None:
  """Writes one user's group (`pfl_hdf5.write_user`) from its records."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  jpegs = [source.read_image(source.image_key(r.index, r.image_id))
           for r in user_records]
  pixels = np.stack([np.asarray(Image.open(io.BytesIO(j)).convert("RGB"))
                     for j in jpegs])
  pfl_hdf5.write_user(
      h5, partition, user_id, [r.image_id for r in user_records],
      jpegs, pixels,
      [[label_index[constants.LABELS_KEY][n] for n in r.labels]
       for r in user_records],
      [[label_index[constants.FINE_GRAINED_LABELS_KEY][n]
        for n in r.fine_grained_labels] for r in user_records])


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
    FlairInputError: `output_file` an existing directory (or below a
      file), a missing or malformed dataset directory.
    input_checks.BadInputError: bad records or images (all listed).
    OutputWriteError: the output cannot be written (names the file).
  """
  import h5py  # pylint: disable=g-import-not-at-top
  input_checks.check_output_file(output_file, _FLAG)
  source = sources.DownloadedSource(dataset_dir)
  records, problems = input_checks.check_input(source, show_progress)
  if problems:
    raise input_checks.bad_input_error(problems, source.name)
  label_index = formats.build_label_index(
      (r.labels, r.fine_grained_labels) for r in records)
  by_user = collections.defaultdict(list)
  for record in records:
    by_user[(record.partition, record.user_id)].append(record)
  images = {p: 0 for p in constants.PARTITIONS}
  users = pool_lib.progress(by_user.items(), show_progress,
                            desc="writing users", unit="user")
  with file_io.atomic_path(output_file, flag=_FLAG) as tmp:
    with file_io.output_errors(output_file, flag=_FLAG,
                               exact=True), h5py.File(tmp, "w") as h5:
      for (partition, user_id), user_records in users:
        _write_user(h5, source, label_index, partition, user_id,
                    user_records)
        images[partition] += len(user_records)
      pfl_hdf5.write_metadata(h5, label_index)
  return images
