"""pfl-research's federated FLAIR HDF5 layout: read and written here only.

pfl-research's `benchmarks/dataset/flair/download_preprocess.py` (its
`preprocess_federated_dataset`) writes one HDF5 file grouped by partition,
then user:

    /<partition>/<user_id>/images                   uint8 [n, 256, 256, 3]
    /<partition>/<user_id>/image_ids                bytes [n]
    /<partition>/<user_id>/labels_row               uint16 [k]  image number
    /<partition>/<user_id>/labels_col               uint8  [k]  label index
    /<partition>/<user_id>/fine_grained_labels_row  uint16 [m]
    /<partition>/<user_id>/fine_grained_labels_col  uint16 [m]
    /metadata/label_mapping                 JSON {label: index}
    /metadata/fine_grained_label_mapping    JSON {label: index}

(pfl reads `/train` and `/val`; its HDF5 from Hugging Face has partitions
`train`, `val`, `test`). Image `j` of a user carries the labels
`col[row == j]`, in the order written. The label mappings use sorted names,
like this suite's label index.

pfl's file holds decoded pixels, not the JPEG files. `write_user` adds one
dataset pfl does not read, `/<partition>/<user_id>/encoded_jpegs` (variable
length uint8: each image's JPEG file bytes, unchanged), so that preparing
TFRecords from a file this suite exported gives the same bytes as from the
downloaded images. A file without it (made by pfl-research) is read from its
pixels, encoded as JPEG here (`encode_pixels`): same labels and users, but
not the original bytes.
"""

import io
import json
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from benchmark.core import constants
from benchmark.core.errors import FlairInputError

METADATA_GROUP = "metadata"
LABEL_MAPPING = "label_mapping"
FINE_GRAINED_LABEL_MAPPING = "fine_grained_label_mapping"
IMAGES = "images"
IMAGE_IDS = "image_ids"
ENCODED_JPEGS = "encoded_jpegs"
# (row dataset, column dataset, dtype of the columns) per label set.
_LABEL_DATASETS = {
    constants.LABELS_KEY: ("labels_row", "labels_col", np.uint8),
    constants.FINE_GRAINED_LABELS_KEY: ("fine_grained_labels_row",
                                        "fine_grained_labels_col", np.uint16),
}
_ROW_DTYPE = np.uint16
# Quality of the JPEG encoding of pixels from a file without encoded_jpegs.
PIXELS_JPEG_QUALITY = 95


def write_metadata(h5, label_index: dict[str, dict[str, int]]) -> None:
  """Writes `/metadata/label_mapping` and `fine_grained_label_mapping`.

  Args:
    h5: an `h5py.File` open for writing.
    label_index: `{"labels": {name: index}, "fine_grained_labels": {...}}`.
  """
  h5[f"/{METADATA_GROUP}/{LABEL_MAPPING}"] = json.dumps(
      label_index[constants.LABELS_KEY])
  h5[f"/{METADATA_GROUP}/{FINE_GRAINED_LABEL_MAPPING}"] = json.dumps(
      label_index[constants.FINE_GRAINED_LABELS_KEY])


def write_user(h5, partition: str, user_id: str, image_ids: Sequence[str],
               jpegs: Sequence[bytes], pixels: np.ndarray,
               labels: Sequence[Sequence[int]],
               fine_grained_labels: Sequence[Sequence[int]]) -> None:
  """Writes one user's group in pfl-research's layout, plus `encoded_jpegs`.

  Args:
    h5: an `h5py.File` open for writing.
    partition: `train`, `val` or `test`.
    user_id: the user's id (the group name).
    image_ids: the user's image ids, in order.
    jpegs: each image's JPEG file bytes.
    pixels: uint8 `[n, 256, 256, 3]`, the decoded images.
    labels, fine_grained_labels: per image, label indices in order.

  Raises:
    FlairInputError: more images than pfl's uint16 row index can number, or
      a label index beyond its column dtype.
  """
  import h5py  # pylint: disable=g-import-not-at-top
  n = len(image_ids)
  if n > np.iinfo(_ROW_DTYPE).max + 1:
    raise FlairInputError(
        f"user {user_id!r} has {n} images; pfl-research's HDF5 layout numbers "
        f"a user's images with uint16 (at most {np.iinfo(_ROW_DTYPE).max + 1})")
  group = h5.create_group(f"/{partition}/{user_id}")
  for key, per_image in ((constants.LABELS_KEY, labels),
                         (constants.FINE_GRAINED_LABELS_KEY,
                          fine_grained_labels)):
    row_name, col_name, col_dtype = _LABEL_DATASETS[key]
    rows = [j for j, indices in enumerate(per_image) for _ in indices]
    cols = [i for indices in per_image for i in indices]
    if cols and max(cols) > np.iinfo(col_dtype).max:
      raise FlairInputError(
          f"label index {max(cols)} of {key} does not fit pfl-research's "
          f"{np.dtype(col_dtype).name} column")
    group[row_name] = np.asarray(rows, dtype=_ROW_DTYPE)
    group[col_name] = np.asarray(cols, dtype=col_dtype)
  group[IMAGE_IDS] = np.asarray(list(image_ids), dtype="S")
  group.create_dataset(IMAGES, data=pixels)
  encoded = group.create_dataset(ENCODED_JPEGS, (n,),
                                 dtype=h5py.vlen_dtype(np.uint8))
  for j, jpeg in enumerate(jpegs):
    encoded[j] = np.frombuffer(jpeg, dtype=np.uint8)


def _mapping(h5, name: str, path: str) -> dict[int, str]:
  """{index: label} of a metadata label mapping."""
  key = f"/{METADATA_GROUP}/{name}"
  if key not in h5:
    raise FlairInputError(
        f"--pfl_hdf5 {path} has no {key} (expected pfl-research's FLAIR HDF5 "
        "layout, from its dataset/flair/download_preprocess.py)")
  value = h5[key][()]
  try:
    mapping = json.loads(value.decode("utf-8") if isinstance(value, bytes)
                         else value)
  except (ValueError, AttributeError) as e:
    raise FlairInputError(
        f"--pfl_hdf5 {path}: {key} is not a JSON object: {e}") from None
  if not isinstance(mapping, dict):
    raise FlairInputError(f"--pfl_hdf5 {path}: {key} is not a JSON object")
  return {index: label for label, index in mapping.items()}


def read_records(h5, path: str) -> Iterator[tuple[dict[str, Any], tuple]]:
  """The file's images as metadata records, with the key of each image.

  Args:
    h5: an `h5py.File` open for reading.
    path: the file's path (for messages).

  Yields:
    `(record, key)`: `record` as in `labels_and_metadata.json` (`user_id`,
    `image_id`, `labels`, `fine_grained_labels`, `partition`; checked by
    the caller), `key` = `(partition group, user id, image number)` for
    `read_image`. Partitions in name order, users in name order, images in
    file order.

  Raises:
    FlairInputError: the file is not in this layout (names what is
      missing).
  """
  names = {key: _mapping(h5, mapping_name, path) for key, mapping_name in (
      (constants.LABELS_KEY, LABEL_MAPPING),
      (constants.FINE_GRAINED_LABELS_KEY, FINE_GRAINED_LABEL_MAPPING))}
  for partition in sorted(h5):
    if partition == METADATA_GROUP:
      continue
    for user_id in sorted(h5[partition]):
      group = h5[partition][user_id]
      missing = [d for d in (IMAGE_IDS, IMAGES) + tuple(
          n for pair in _LABEL_DATASETS.values() for n in pair[:2])
                 if d not in group]
      if missing:
        raise FlairInputError(
            f"--pfl_hdf5 {path}: group /{partition}/{user_id} has no "
            f"{', '.join(missing)} (expected pfl-research's FLAIR layout)")
      image_ids = [i.decode("utf-8") if isinstance(i, bytes) else str(i)
                   for i in group[IMAGE_IDS][()]]
      per_image = {}
      for key, (row_name, col_name, _) in _LABEL_DATASETS.items():
        lists = [[] for _ in image_ids]
        rows, cols = group[row_name][()], group[col_name][()]
        if len(rows) != len(cols) or any(
            int(r) >= len(image_ids) or int(c) not in names[key]
            for r, c in zip(rows, cols)):
          raise FlairInputError(
              f"--pfl_hdf5 {path}: /{partition}/{user_id}/{row_name} and "
              f"{col_name} must be of equal length, with rows < the "
              f"{len(image_ids)} images and columns in the label mapping")
        for row, col in zip(rows, cols):
          lists[int(row)].append(names[key][int(col)])
        per_image[key] = lists
      for j, image_id in enumerate(image_ids):
        yield ({constants.USER_ID_KEY: user_id,
                constants.IMAGE_ID_KEY: image_id,
                constants.LABELS_KEY: per_image[constants.LABELS_KEY][j],
                constants.FINE_GRAINED_LABELS_KEY:
                    per_image[constants.FINE_GRAINED_LABELS_KEY][j],
                constants.PARTITION_KEY: partition},
               (partition, user_id, j))


def read_image(h5, key: tuple) -> bytes:
  """The JPEG bytes of one image: `encoded_jpegs` when the file has them,
  else its pixels encoded by `encode_pixels`.

  Args:
    h5: an `h5py.File` open for reading.
    key: `(partition group, user id, image number)` from `read_records`.
  """
  partition, user_id, j = key
  group = h5[partition][user_id]
  if ENCODED_JPEGS in group:
    return group[ENCODED_JPEGS][j].tobytes()
  return encode_pixels(group[IMAGES][j])


def encode_pixels(pixels: np.ndarray,
                  quality: Optional[int] = PIXELS_JPEG_QUALITY) -> bytes:
  """uint8 `[height, width, 3]` pixels as JPEG bytes (Pillow, `quality`)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = io.BytesIO()
  Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(
      out, format="JPEG", quality=quality)
  return out.getvalue()
