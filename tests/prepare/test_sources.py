"""Tests of prepare's other inputs (benchmark/prepare/sources.py): a Hugging
Face `apple/flair` copy and pfl-research's HDF5 (pfl_hdf5.py, pfl_export.py,
export_pfl_hdf5.py). Each must give the same bytes as the downloaded layout.
Nothing is fetched from a hub."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmark.core import constants
from benchmark.core import errors
from benchmark.prepare import pfl_export
from benchmark.prepare import pfl_hdf5
from benchmark.prepare import tfrecords

# Read when `datasets` is first imported (in the fixture below): nothing is
# fetched from a hub.
os.environ["HF_DATASETS_OFFLINE"] = "1"

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
# The dataset card's columns, in its order.
CARD_COLUMNS = ("user_id", "image_id", "labels", "partition",
                "fine_grained_labels", "image")


def _output_files(tfrecords_dir):
  """{relative path: bytes} of the user files and the label index."""
  found = {}
  for root, _, names in os.walk(tfrecords_dir):
    for name in names:
      if name.endswith(constants.TFRECORD_SUFFIX) or (
          name == constants.LABEL_INDEX_FILE):
        path = os.path.join(root, name)
        with open(path, "rb") as f:
          found[os.path.relpath(path, tfrecords_dir)] = f.read()
  return found


def _assert_same_output(tfrecords_dir, expected_dir):
  got, expected = _output_files(tfrecords_dir), _output_files(expected_dir)
  assert sorted(got) == sorted(expected)
  assert len(expected) > 10
  differ = [name for name in expected if got[name] != expected[name]]
  assert not differ, differ


@pytest.fixture
def hf_datasets(tmp_path, monkeypatch):
  datasets = pytest.importorskip("datasets")
  # The Arrow cache of parquet input goes to the test's directory.
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE",
                      str(tmp_path / "hf_cache"))
  return datasets


def _card_dataset(datasets, sample_dir, partition):
  """The sample's records of one partition as the card's schema: metadata
  columns and `image` (an Image feature holding the JPEG file's bytes)."""
  with open(os.path.join(sample_dir, constants.METADATA_FILE)) as f:
    records = [r for r in json.load(f) if r["partition"] == partition]
  columns = {c: [r[c] for r in records] for c in CARD_COLUMNS[:-1]}
  columns["image"] = []
  for r in records:
    with open(os.path.join(sample_dir, constants.SMALL_IMAGES_DIR,
                           r["image_id"] + ".jpg"), "rb") as f:
      columns["image"].append({"bytes": f.read(), "path": None})
  features = datasets.Features({
      "user_id": datasets.Value("string"),
      "image_id": datasets.Value("string"),
      "labels": datasets.Sequence(datasets.Value("string")),
      "partition": datasets.Value("string"),
      "fine_grained_labels": datasets.Sequence(datasets.Value("string")),
      "image": datasets.Image(),
  })
  return datasets.Dataset.from_dict(columns, features=features)


def test_hugging_face_parquet_and_save_to_disk_give_the_same_tfrecords(
    flair_sample_dir, prepared_sample_dir, hf_datasets, tmp_path):
  splits = {p: _card_dataset(hf_datasets, flair_sample_dir, p)
            for p in constants.PARTITIONS}
  assert list(splits["train"].features) == list(CARD_COLUMNS)
  # The hub's layout: data/<split>-0000i-of-0000n.parquet.
  data_dir = tmp_path / "apple_flair" / "data"
  os.makedirs(data_dir)
  for partition, dataset in splits.items():
    dataset.to_parquet(str(data_dir / f"{partition}-00000-of-00001.parquet"))
  out = str(tmp_path / "from_parquet")
  summary = tfrecords.prepare(
      None, out, num_workers=1, show_progress=False,
      hf_dataset=str(tmp_path / "apple_flair"))
  assert sum(summary.images.values()) == 35
  _assert_same_output(out, prepared_sample_dir)

  saved = str(tmp_path / "saved")
  hf_datasets.DatasetDict(splits).save_to_disk(saved)
  out = str(tmp_path / "from_save_to_disk")
  tfrecords.prepare(None, out, num_workers=1, show_progress=False,
                    hf_dataset=saved)
  _assert_same_output(out, prepared_sample_dir)


def test_hugging_face_copy_without_a_card_column_is_one_line_error(
    flair_sample_dir, hf_datasets, tmp_path):
  dataset = _card_dataset(hf_datasets, flair_sample_dir, "val")
  path = str(tmp_path / "val.parquet")
  dataset.remove_columns(["fine_grained_labels"]).to_parquet(path)
  with pytest.raises(errors.FlairInputError,
                     match=r"--hf_dataset .*fine_grained_labels"):
    tfrecords.prepare(None, str(tmp_path / "out"), num_workers=1,
                      show_progress=False, hf_dataset=path)
  with pytest.raises(errors.FlairInputError, match="exactly one input"):
    tfrecords.prepare(flair_sample_dir, str(tmp_path / "out"),
                      num_workers=1, hf_dataset=path)


def _env():
  return dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2")


def test_export_to_pfl_hdf5_and_prepare_from_it_round_trip(
    flair_sample_dir, prepared_sample_dir, tmp_path):
  h5py = pytest.importorskip("h5py")
  hdf5 = str(tmp_path / "flair.hdf5")
  out = str(tmp_path / "from_hdf5")
  for argv in (["export_pfl_hdf5.py", f"--dataset_dir={flair_sample_dir}",
                f"--output_file={hdf5}"],
               ["prepare_tfrecords.py", f"--pfl_hdf5={hdf5}",
                f"--tfrecords_dir={out}", "--num_workers=1"]):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, argv[0])] + argv[1:],
        capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
  _assert_same_output(out, prepared_sample_dir)

  # pfl-research's layout: its label mappings equal our label index, and
  # rows/columns give each image's labels.
  with open(os.path.join(prepared_sample_dir,
                         constants.LABEL_INDEX_FILE)) as f:
    label_index = json.load(f)
  with open(os.path.join(flair_sample_dir, constants.METADATA_FILE)) as f:
    records = json.load(f)
  with h5py.File(hdf5, "r") as h5:
    assert json.loads(h5["/metadata/label_mapping"][()]) == label_index[
        "labels"]
    assert json.loads(h5["/metadata/fine_grained_label_mapping"][()]
                      ) == label_index["fine_grained_labels"]
    record = records[0]
    group = h5[f"/{record['partition']}/{record['user_id']}"]
    assert group["images"].dtype == np.uint8
    assert group["images"].shape[1:] == (256, 256, 3)
    assert group["labels_row"].dtype == np.uint16
    assert group["labels_col"].dtype == np.uint8
    assert group["image_ids"][0].decode() == record["image_id"]
    first = group["labels_col"][()][group["labels_row"][()] == 0]
    assert [label_index["labels"][n] for n in record["labels"]] == list(first)
    assert sum(len(h5[p]) for p in h5 if p != "metadata") == 15


def test_prepare_from_a_pfl_made_hdf5_encodes_its_pixels(
    flair_sample_dir, prepared_sample_dir, tmp_path):
  h5py = pytest.importorskip("h5py")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  hdf5 = str(tmp_path / "pfl.hdf5")
  pfl_export.export(flair_sample_dir, hdf5, show_progress=False)
  with h5py.File(hdf5, "r+") as h5:  # As pfl-research writes it.
    for partition in constants.PARTITIONS:
      for user in h5[partition]:
        del h5[partition][user][pfl_hdf5.ENCODED_JPEGS]
  out = str(tmp_path / "out")
  tfrecords.prepare(None, out, num_workers=1, show_progress=False,
                    pfl_hdf5=hdf5)
  got, expected = _output_files(out), _output_files(prepared_sample_dir)
  assert sorted(got) == sorted(expected)
  assert got[constants.LABEL_INDEX_FILE] == expected[
      constants.LABEL_INDEX_FILE]
  name = sorted(n for n in got if n.startswith("train"))[0]
  ours = [tf.train.Example.FromString(r) for r in tf.data.TFRecordDataset(
      os.path.join(out, name)).as_numpy_iterator()]
  reference = [tf.train.Example.FromString(r) for r in
               tf.data.TFRecordDataset(os.path.join(
                   prepared_sample_dir, name)).as_numpy_iterator()]
  assert len(ours) == len(reference)
  for a, b in zip(ours, reference):
    for key in (constants.LABELS_FEATURE,
                constants.FINE_GRAINED_LABELS_FEATURE):
      assert a.features.feature[key] == b.features.feature[key]
    pixels = [tf.io.decode_jpeg(e.features.feature[
        constants.IMAGE_FEATURE].bytes_list.value[0]).numpy().astype(int)
              for e in (a, b)]
    # Re-encoded at quality 95: close to, not equal to, the original.
    assert np.abs(pixels[0] - pixels[1]).mean() < 3.0


def test_pfl_hdf5_with_a_label_outside_its_mapping_is_one_line_error(
    flair_sample_dir, tmp_path):
  h5py = pytest.importorskip("h5py")
  hdf5 = str(tmp_path / "bad.hdf5")
  pfl_export.export(flair_sample_dir, hdf5, show_progress=False)
  with h5py.File(hdf5, "r+") as h5:
    user = sorted(h5["train"])[0]
    h5[f"/train/{user}/labels_col"][0] = 200
  with pytest.raises(errors.FlairInputError,
                     match=rf"--pfl_hdf5 .*/train/{user}/labels_row"):
    tfrecords.prepare(None, str(tmp_path / "out"), num_workers=1,
                      show_progress=False, pfl_hdf5=hdf5)
  with pytest.raises(errors.FlairInputError, match="--pfl_hdf5 .*not a file"):
    tfrecords.prepare(None, str(tmp_path / "out"), num_workers=1,
                      pfl_hdf5=str(tmp_path / "missing.hdf5"))


def test_export_output_file_naming_a_directory_is_refused(
    synthetic_dataset_dir, tmp_path):
  pytest.importorskip("h5py")
  out_dir = tmp_path / "exports"
  os.makedirs(out_dir / "inside")
  with pytest.raises(errors.FlairInputError,
                     match=f"^--output_file '{out_dir}' is an existing "
                     "directory; name the file to write$"):
    pfl_export.export(synthetic_dataset_dir, str(out_dir),
                      show_progress=False)
  assert os.listdir(tmp_path) == ["exports"]  # No temporary file left.
  assert os.listdir(out_dir) == ["inside"]


def test_cli_export_output_file_naming_a_directory_is_one_line(
    synthetic_dataset_dir, tmp_path):
  pytest.importorskip("h5py")
  result = subprocess.run(
      [sys.executable, os.path.join(REPO_ROOT, "export_pfl_hdf5.py"),
       f"--dataset_dir={synthetic_dataset_dir}",
       f"--output_file={tmp_path}"],
      capture_output=True, text=True, env=_env(), timeout=300, check=False)
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  error_lines = [line for line in result.stderr.splitlines()
                 if line.startswith("error:")]
  assert error_lines == [f"error: --output_file '{tmp_path}' is an existing "
                         "directory; name the file to write"], result.stderr
