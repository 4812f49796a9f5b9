"""Where `prepare_tfrecords.py` reads FLAIR from: three copies of one dataset.

* `DownloadedSource` (`--dataset_dir`): the download layout,
  `labels_and_metadata.json` and `small_images/<image_id>.jpg`.
* `HuggingFaceSource` (`--hf_dataset`): a local copy of the `apple/flair`
  dataset read with Hugging Face `datasets`: its parquet shards (a file, or
  a directory searched for `*.parquet`, e.g. the hub's `data/` folder) or a
  directory written by `save_to_disk`. Columns as on the dataset card:
  `user_id`, `image_id`, `labels`, `partition`, `fine_grained_labels` and
  `image` (the JPEG file: an `Image` feature, read undecoded, or bytes).
  Parquet shards are converted once into `datasets`' Arrow cache
  (`HF_DATASETS_CACHE`); nothing is fetched from a hub.
* `Hdf5Source` (`--pfl_hdf5`): pfl-research's FLAIR HDF5
  (`pfl_hdf5`).

Each gives the metadata records (the objects of `labels_and_metadata.json`,
checked by prepare), each image's JPEG bytes by a key, and the fine-grained
labels' coarse labels where it holds them (`label_relationship`: the
downloaded layout's `label_relationship.txt`, when present). Sources are
pickled to prepare's worker processes; each opens its files lazily.
"""

import glob
import os
from typing import Any, Optional

# What `label_relationship()` gives: (the file read, {fine-grained label:
# its coarse labels}), or None.
Relationship = Optional[tuple[str, dict[str, frozenset[str]]]]

from benchmark.core import constants
from benchmark.core.errors import FlairInputError
from benchmark.data import formats
from benchmark.prepare import pfl_hdf5

_HF_METADATA_COLUMNS = constants.REQUIRED_RECORD_KEYS
HF_IMAGE_COLUMN = "image"


class DownloadedSource:
  """The download layout. Image keys are file paths."""

  flag = "--dataset_dir"

  def __init__(self, dataset_dir: str):
    self.path = dataset_dir
    self.metadata_path = os.path.join(dataset_dir, constants.METADATA_FILE)
    self.name = self.metadata_path

  def load_records(self) -> list[Any]:
    """The parsed `labels_and_metadata.json` list (records not checked).

    Raises:
      FlairInputError: no directory, no metadata file, malformed JSON, not
        a list or an empty one.
    """
    if not os.path.isdir(self.path):
      raise FlairInputError(
          f"--dataset_dir {self.path!r} is not a directory (expected a FLAIR "
          f"dataset directory with {constants.METADATA_FILE})")
    return formats.read_metadata_file(self.metadata_path)

  def label_relationship(self) -> Relationship:
    """`label_relationship.txt` of the directory, read and checked
    (`formats.read_label_relationship`), or None when the directory has
    none.

    Raises:
      FlairInputError: the file is there but truncated or malformed (names
        the file and the line).
    """
    path = os.path.join(self.path, constants.LABEL_RELATIONSHIP_FILE)
    if not os.path.lexists(path):
      return None
    return path, formats.read_label_relationship(path)

  def image_key(self, record_index: int, image_id: str) -> str:
    del record_index
    return os.path.join(self.path, constants.SMALL_IMAGES_DIR,
                        image_id + constants.IMAGE_EXTENSION)

  def describe_image(self, key: str) -> str:
    return f"file {key}"

  def close(self) -> None:
    pass

  def read_image(self, key: str) -> bytes:
    """The file's bytes (OSError when it cannot be read)."""
    with open(key, "rb") as f:
      return f.read()


class HuggingFaceSource:
  """A local `apple/flair` copy read with `datasets`. Image keys are row
  numbers (the record's index)."""

  flag = "--hf_dataset"

  def __init__(self, path: str):
    self.path = path
    self.name = f"Hugging Face dataset {path}"
    self._dataset = None  # The image column, once loaded.

  def _load(self):
    """The whole dataset, all splits in one (`datasets.Dataset`)."""
    try:
      import datasets  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise FlairInputError(
          f"--hf_dataset needs the `datasets` package ({e}); run make "
          "install") from None
    path = self.path
    if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n
                                   in ("dataset_dict.json", "state.json")):
      loaded = datasets.load_from_disk(path)
      if isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.concatenate_datasets(list(loaded.values()))
      return loaded
    if os.path.isfile(path) and path.endswith(".parquet"):
      files = [path]
    elif os.path.isdir(path):
      files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"),
                               recursive=True))
    else:
      files = []
    if not files:
      raise FlairInputError(
          f"--hf_dataset {path!r} is neither a directory written by "
          "datasets' save_to_disk nor a parquet file or a directory holding "
          "*.parquet files (expected a local copy of apple/flair)")
    return datasets.load_dataset("parquet", data_files=files, split="train")

  def load_records(self) -> list[Any]:
    """The dataset's rows without their images (records not checked).

    Raises:
      FlairInputError: not a dataset, a column of the card's schema missing,
        or no rows.
    """
    import datasets  # pylint: disable=g-import-not-at-top
    dataset = self._load()
    missing = [c for c in _HF_METADATA_COLUMNS + (HF_IMAGE_COLUMN,)
               if c not in dataset.column_names]
    if missing:
      raise FlairInputError(
          f"--hf_dataset {self.path}: no column(s) {missing} (expected the "
          f"apple/flair card's columns {list(_HF_METADATA_COLUMNS)} and "
          f"{HF_IMAGE_COLUMN!r}; it has {dataset.column_names})")
    if not len(dataset):
      raise FlairInputError(f"--hf_dataset {self.path} holds no rows")
    images = dataset.select_columns([HF_IMAGE_COLUMN])
    if isinstance(images.features[HF_IMAGE_COLUMN], datasets.Image):
      images = images.cast_column(HF_IMAGE_COLUMN, datasets.Image(decode=False))
    self._dataset = images
    return dataset.select_columns(list(_HF_METADATA_COLUMNS)).to_list()

  def label_relationship(self) -> Relationship:
    """None: the dataset card's columns hold no label relationship."""
    return None

  def image_key(self, record_index: int, image_id: str) -> int:
    del image_id
    return record_index

  def describe_image(self, key: int) -> str:
    return f"of row {key} of {self.name}"

  def close(self) -> None:
    self._dataset = None

  def read_image(self, key: int) -> bytes:
    """The JPEG bytes of row `key` (OSError when a referenced file cannot be
    read)."""
    value = self._dataset[int(key)][HF_IMAGE_COLUMN]
    if isinstance(value, dict):
      if value.get("bytes") is not None:
        return value["bytes"]
      if value.get("path"):
        with open(value["path"], "rb") as f:
          return f.read()
      raise OSError("the image holds neither bytes nor a path")
    if isinstance(value, (bytes, bytearray)):
      return bytes(value)
    raise OSError(f"the image column holds a {type(value).__name__}, "
                  "expected JPEG bytes")


class Hdf5Source:
  """pfl-research's FLAIR HDF5. Image keys are `(partition, user, j)`."""

  flag = "--pfl_hdf5"

  def __init__(self, path: str):
    self.path = path
    self.name = f"HDF5 file {path}"
    self._h5 = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_h5"] = None  # Each process opens the file itself.
    state.pop("_keys", None)  # Only load_records' caller needs them.
    return state

  def _file(self):
    if self._h5 is None:
      import h5py  # pylint: disable=g-import-not-at-top
      if not os.path.isfile(self.path):
        raise FlairInputError(f"--pfl_hdf5 {self.path!r} is not a file")
      try:
        self._h5 = h5py.File(self.path, "r")
      except OSError as e:
        raise FlairInputError(
            f"--pfl_hdf5 {self.path} cannot be opened as HDF5: {e}") from None
    return self._h5

  def load_records(self) -> list[Any]:
    """The file's images as records (`pfl_hdf5.read_records`)."""
    records, self._keys = [], []
    for record, key in pfl_hdf5.read_records(self._file(), self.path):
      records.append(record)
      self._keys.append(key)
    if not records:
      raise FlairInputError(f"--pfl_hdf5 {self.path} holds no images")
    return records

  def label_relationship(self) -> Relationship:
    """None: pfl-research's HDF5 holds no label relationship."""
    return None

  def image_key(self, record_index: int, image_id: str) -> tuple:
    del image_id
    return self._keys[record_index]

  def describe_image(self, key: tuple) -> str:
    partition, user_id, j = key
    return f"/{partition}/{user_id}[{j}] of {self.name}"

  def close(self) -> None:
    if self._h5 is not None:
      self._h5.close()
      self._h5 = None

  def read_image(self, key: tuple) -> bytes:
    """The image's JPEG bytes (`pfl_hdf5.read_image`)."""
    return pfl_hdf5.read_image(self._file(), key)


def open_source(dataset_dir: Optional[str] = None,
                hf_dataset: Optional[str] = None,
                pfl_hdf5_path: Optional[str] = None):
  """The source named by exactly one of the three arguments.

  Raises:
    FlairInputError: none or more than one given.
  """
  given = [(flag, value) for flag, value in (
      ("--dataset_dir", dataset_dir), ("--hf_dataset", hf_dataset),
      ("--pfl_hdf5", pfl_hdf5_path)) if value]
  if len(given) != 1:
    raise FlairInputError(
        "give exactly one input: --dataset_dir (the downloaded layout), "
        "--hf_dataset (a local apple/flair copy) or --pfl_hdf5 "
        f"(pfl-research's HDF5); got {[flag for flag, _ in given] or 'none'}")
  if dataset_dir:
    return DownloadedSource(dataset_dir)
  if hf_dataset:
    return HuggingFaceSource(hf_dataset)
  return Hdf5Source(pfl_hdf5_path)
