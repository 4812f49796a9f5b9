"""Tests of benchmark.analysis.dataset_report (the explore report) and, through
it, of the modules it calls (dataset_stats: the records and statistics;
dataset_figures: the PNGs): the report's numbers against counts computed here
from labels_and_metadata.json, every figure written as a real PNG, the
dataset-dir and TFRecords modes agreeing, and bad input failing in one
line."""

import collections
import json
import os

from PIL import Image
import pytest

from benchmark.analysis import dataset_figures
from benchmark.analysis import dataset_report
from benchmark.analysis import dataset_stats
from benchmark.core import constants
from benchmark.core import errors
from benchmark.data import formats

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _expected_counts(dataset_dir):
  """The numbers the report must hold, computed straight from the JSON."""
  with open(os.path.join(dataset_dir, constants.METADATA_FILE)) as f:
    raw = json.load(f)
  partition = lambda r: constants.PARTITION_ALIASES.get(r["partition"],
                                                        r["partition"])
  images_per_user = collections.Counter(r["user_id"] for r in raw)
  users = {p: set() for p in constants.PARTITIONS}
  for r in raw:
    users[partition(r)].add(r["user_id"])
  coarse_of_user = collections.defaultdict(set)
  fine_of_user = collections.defaultdict(set)
  for r in raw:
    coarse_of_user[r["user_id"]].update(r["labels"])
    fine_of_user[r["user_id"]].update(r["fine_grained_labels"])
  hist = lambda values: {str(k): v for k, v in
                         collections.Counter(values).items()}
  return {
      "num_images": len(raw),
      "num_users": len(images_per_user),
      "partition_images": dict(collections.Counter(partition(r) for r in raw)),
      "partition_users": {p: len(u) for p, u in users.items() if u},
      "coarse": collections.Counter(l for r in raw for l in set(r["labels"])),
      "fine": collections.Counter(
          l for r in raw for l in set(r["fine_grained_labels"])),
      "coarse_per_image": hist(len(set(r["labels"])) for r in raw),
      "fine_per_image": hist(len(set(r["fine_grained_labels"])) for r in raw),
      "images_per_user": hist(images_per_user.values()),
      "max_images_per_user": max(images_per_user.values()),
      "coarse_per_user": hist(len(s) for s in coarse_of_user.values()),
      "fine_per_user": hist(len(s) for s in fine_of_user.values()),
      "records": raw,
  }


def _nonzero(counts):
  return {k: v for k, v in counts.items() if v}


def _check_report_counts(report, expected):
  assert report["num_images"] == expected["num_images"]
  assert report["num_users"] == expected["num_users"]
  assert _nonzero(report["partition_images"]) == expected["partition_images"]
  assert _nonzero(report["partition_users"]) == expected["partition_users"]
  assert _nonzero(report["coarse_label_image_counts"]) == expected["coarse"]
  assert report["fine_grained_label_image_counts"] == expected["fine"]
  # The top fine labels are the most frequent ones, in order.
  top = report["top_fine_grained_labels"]
  assert len(top) == min(20, len(expected["fine"]))
  assert list(top.values()) == sorted(expected["fine"].values(),
                                      reverse=True)[:len(top)]
  assert all(expected["fine"][name] == n for name, n in top.items())
  per_image = report["labels_per_image"]
  assert per_image["coarse"]["histogram"] == expected["coarse_per_image"]
  assert per_image["fine_grained"]["histogram"] == expected["fine_per_image"]
  assert report["images_per_user"]["histogram"] == expected["images_per_user"]
  assert report["images_per_user"]["summary"]["max"] == (
      expected["max_images_per_user"])
  assert report["images_per_user"]["summary"]["mean"] == pytest.approx(
      expected["num_images"] / expected["num_users"])
  per_user = report["distinct_labels_per_user"]
  assert per_user["coarse"]["histogram"] == expected["coarse_per_user"]
  assert per_user["fine_grained"]["histogram"] == expected["fine_per_user"]


def _check_outputs(output_dir, report):
  for name in dataset_figures.FIGURES:
    path = os.path.join(output_dir, name)
    assert os.path.isfile(path), name
    with open(path, "rb") as f:
      assert f.read(8) == PNG_SIGNATURE, name
    with Image.open(path) as image:
      image.verify()
    with Image.open(path) as image:
      width, height = image.size
    assert 600 <= width <= 4000 and 300 <= height <= 4000, (name, width,
                                                            height)
    assert os.path.getsize(path) > 10_000, name  # not an empty canvas
  assert report["figures"] == list(dataset_figures.FIGURES)
  with open(os.path.join(output_dir, dataset_report.REPORT_JSON_FILE)) as f:
    assert json.load(f) == json.loads(json.dumps(report))
  with open(os.path.join(output_dir, dataset_report.REPORT_TEXT_FILE)) as f:
    text = f.read()
  assert text == dataset_report.format_report(report)
  assert f"{report['num_images']:,} images from {report['num_users']:,} users" \
      in text
  # No temporary files left behind by the atomic writes.
  assert not [n for n in os.listdir(output_dir) if n.endswith(".tmp")]


def _check_sample_users(report, expected, num_users, num_images):
  """The grid shows the largest users, with each image's true labels."""
  sizes = collections.Counter(r["user_id"] for r in expected["records"])
  largest = sorted(sizes, key=lambda u: (-sizes[u], u))[:num_users]
  assert [u["user_id"] for u in report["sample_users"]] == largest
  by_id = {str(r["image_id"]): r for r in expected["records"]}
  for user in report["sample_users"]:
    assert user["num_images"] == sizes[user["user_id"]]
    assert len(user["images"]) == min(num_images, sizes[user["user_id"]])
    for image in user["images"]:
      if image["image_id"] is None:  # TFRecords store no image id
        continue
      record = by_id[image["image_id"]]
      assert record["user_id"] == user["user_id"]
      assert image["labels"] == record["labels"]
      assert image["fine_grained_labels"] == record["fine_grained_labels"]
      assert image["note"] == ""  # the image file was found and decoded


def test_explore_real_sample(flair_sample_dir, tmp_path):
  out = str(tmp_path / "explore")
  report = dataset_report.make_report(out, dataset_dir=flair_sample_dir,
                                      num_sample_users=3, num_sample_images=4)
  expected = _expected_counts(flair_sample_dir)
  _check_report_counts(report, expected)
  _check_outputs(out, report)
  _check_sample_users(report, expected, 3, 4)
  # The real 17 coarse labels are all listed, unseen ones with 0 images.
  assert set(report["coarse_label_image_counts"]) == set(
      constants.COARSE_LABELS)
  assert report["source"] == {"kind": "dataset_dir",
                              "path": os.path.abspath(flair_sample_dir)}


def test_explore_synthetic_dataset(synthetic_dataset_dir, tmp_path):
  out = str(tmp_path / "explore")
  report = dataset_report.make_report(out, dataset_dir=synthetic_dataset_dir)
  expected = _expected_counts(synthetic_dataset_dir)
  _check_report_counts(report, expected)
  _check_outputs(out, report)
  _check_sample_users(report, expected, 4, 5)


def _without_order_sensitive_fields(report):
  """Drops what legitimately differs between the two input modes."""
  report = json.loads(json.dumps(report))
  for key in ("source", "output_dir", "sample_users"):
    report.pop(key)
  return report


def _assert_same_numbers(a, b):
  assert a.keys() == b.keys()
  for key in a:
    if isinstance(a[key], dict):
      _assert_same_numbers(a[key], b[key])
    elif isinstance(a[key], float):
      assert a[key] == pytest.approx(b[key]), key
    else:
      assert a[key] == b[key], key


def test_explore_prepared_sample_agrees_with_dataset_dir(
    flair_sample_dir, prepared_sample_dir, tmp_path):
  from_tfrecords = dataset_report.make_report(
      str(tmp_path / "tf"), tfrecords_dir=prepared_sample_dir,
      show_progress=False)
  expected = _expected_counts(flair_sample_dir)
  _check_report_counts(from_tfrecords, expected)
  _check_outputs(str(tmp_path / "tf"), from_tfrecords)
  _check_sample_users(from_tfrecords, expected, 4, 5)
  from_json = dataset_report.make_report(str(tmp_path / "json"),
                                         dataset_dir=flair_sample_dir)
  _assert_same_numbers(_without_order_sensitive_fields(from_tfrecords),
                       _without_order_sensitive_fields(from_json))
  # Same sample users, and per user the same multiset of label sets.
  def label_sets(report):
    return {u["user_id"]: sorted(tuple(i["labels"]) + ("|",) +
                                 tuple(i["fine_grained_labels"])
                                 for i in u["images"])
            for u in report["sample_users"]}
  assert label_sets(from_tfrecords) == label_sets(from_json)
  assert all(i["note"] == "" for u in from_tfrecords["sample_users"]
             for i in u["images"])


@pytest.mark.slow  # test_explore_prepared_sample_... covers the same path
def test_explore_prepared_synthetic(synthetic_dataset_dir,
                                    prepared_synthetic_dir, tmp_path):
  report = dataset_report.make_report(str(tmp_path / "tf"),
                                      tfrecords_dir=prepared_synthetic_dir,
                                      show_progress=False)
  _check_report_counts(report, _expected_counts(synthetic_dataset_dir))


def test_missing_images_become_placeholders(flair_sample_dir, tmp_path):
  # Labels without the 6 GB of images: the grid still draws, with notes.
  dataset = tmp_path / "labels_only"
  dataset.mkdir()
  with open(os.path.join(flair_sample_dir, constants.METADATA_FILE)) as f:
    (dataset / constants.METADATA_FILE).write_text(f.read())
  report = dataset_report.make_report(str(tmp_path / "out"),
                                      dataset_dir=str(dataset),
                                      num_sample_users=1, num_sample_images=2)
  notes = [i["note"] for u in report["sample_users"] for i in u["images"]]
  assert notes == ["image file missing"] * 2
  assert os.path.isfile(
      tmp_path / "out" / dataset_figures.SAMPLE_IMAGES_FIGURE)


def _image(labels):
  return dataset_stats.ImageRecord(user_id="u", image_id="1", partition="train",
                                   labels=tuple(labels),
                                   fine_grained_labels=())


def test_coarse_vocabulary_adds_flair_labels_only_to_flair_data():
  flair = [_image(["food"]), _image(["animal", "food"])]
  vocabulary = dataset_report.coarse_vocabulary(flair, ["food"])
  assert vocabulary[0] == "food"  # the label index first, in its order
  assert sorted(vocabulary) == sorted(constants.COARSE_LABELS)
  other = [_image(["food"]), _image(["not_a_flair_label"])]
  assert dataset_report.coarse_vocabulary(other, ["b", "a"]) == ("b", "a")
  assert dataset_report.coarse_vocabulary(other) == ()


def _write_metadata(directory, content):
  directory.mkdir(exist_ok=True)
  (directory / constants.METADATA_FILE).write_text(content)
  return str(directory)


GOOD_RECORD = {"user_id": "u1", "image_id": 7, "labels": ["food"],
               "fine_grained_labels": ["soup"], "partition": "dev"}


@pytest.mark.parametrize("content, message", [
    ("[{", "not valid JSON"),
    ("{}", "expected a JSON list"),
    ("[]", "holds no image records"),
    (json.dumps([{"user_id": "u1"}]),
     "record 0 (image_id None, user_id 'u1'): missing field(s) ['image_id'"),
    (json.dumps([GOOD_RECORD, dict(GOOD_RECORD, partition="holdout")]),
     "record 1 (image_id '7', user_id 'u1'): unknown partition 'holdout'"),
    (json.dumps([dict(GOOD_RECORD, labels="food")]),
     "record 0 (image_id '7', user_id 'u1'): labels must be a list"),
    # The rules prepare_tfrecords.py applies (formats.check_metadata_records),
    # which explore once accepted.
    (json.dumps([dict(GOOD_RECORD, user_id="../u1")]),
     "record 0 (image_id '7', user_id '../u1'): user_id must be a string "
     "usable as a file name"),
    (json.dumps([dict(GOOD_RECORD, image_id=-1)]),
     "image_id must be a non-negative integer"),
    (json.dumps([dict(GOOD_RECORD, labels=[""])]),
     "labels must be a list of non-empty strings"),
    (json.dumps([GOOD_RECORD, GOOD_RECORD]),
     "record 1 (image_id '7', user_id 'u1'): image_id repeats record 0"),
    (json.dumps([GOOD_RECORD, dict(GOOD_RECORD, image_id=8,
                                   partition="train")]),
     "record 1 (image_id '8', user_id 'u1'): user is in partition 'train'"),
])
def test_bad_metadata_is_one_line_input_error(tmp_path, content, message):
  dataset_dir = _write_metadata(tmp_path / "d", content)
  with pytest.raises(errors.FlairInputError) as e:
    dataset_report.make_report(str(tmp_path / "out"), dataset_dir=dataset_dir)
  assert message in str(e.value)
  assert constants.METADATA_FILE in str(e.value)
  assert "\n" not in str(e.value)


def test_integer_image_id_and_dev_partition_are_accepted(tmp_path):
  dataset_dir = _write_metadata(tmp_path / "d", json.dumps([GOOD_RECORD]))
  report = dataset_report.make_report(str(tmp_path / "out"),
                                      dataset_dir=dataset_dir)
  assert report["partition_images"] == {"train": 0, "val": 1, "test": 0}
  assert report["sample_users"][0]["images"][0]["image_id"] == "7"


def test_bad_arguments_and_missing_paths(tmp_path):
  out = str(tmp_path / "out")
  with pytest.raises(errors.FlairInputError, match="exactly one of"):
    dataset_report.make_report(out)
  with pytest.raises(errors.FlairInputError, match="exactly one of"):
    dataset_report.make_report(out, dataset_dir="a", tfrecords_dir="b")
  with pytest.raises(errors.FlairInputError, match="--dataset_dir .*not a dir"):
    dataset_report.make_report(out, dataset_dir=str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(errors.FlairInputError,
                     match=f"{constants.METADATA_FILE}: file not found"):
    dataset_report.make_report(out, dataset_dir=str(tmp_path / "empty"))
  with pytest.raises(errors.FlairInputError, match="--num_sample_users"):
    dataset_report.make_report(out, dataset_dir=str(tmp_path / "empty"),
                               num_sample_users=0)
  (tmp_path / "file").write_text("x")
  dataset_dir = _write_metadata(tmp_path / "d", json.dumps([GOOD_RECORD]))
  with pytest.raises(errors.FlairInputError, match="--output_dir .*not a dir"):
    dataset_report.make_report(str(tmp_path / "file"), dataset_dir=dataset_dir)
  with pytest.raises(errors.FlairInputError, match="--tfrecords_dir .*not a d"):
    dataset_report.make_report(out, tfrecords_dir=str(tmp_path / "nope"))


def _tfrecords_dir(tmp_path, label_index=None):
  root = tmp_path / "tf"
  (root / "train").mkdir(parents=True)
  if label_index is not None:
    (root / constants.LABEL_INDEX_FILE).write_text(label_index)
  return root


GOOD_INDEX = json.dumps({"labels": {"animal": 0, "food": 1},
                         "fine_grained_labels": {"dog": 0, "soup": 1}})


def test_bad_tfrecords_dirs(tmp_path):
  root = _tfrecords_dir(tmp_path)
  with pytest.raises(errors.FlairInputError, match="no label index"):
    dataset_report.make_report(str(tmp_path / "out"), tfrecords_dir=str(root))
  (root / constants.LABEL_INDEX_FILE).write_text("{not json")
  with pytest.raises(errors.FlairInputError, match="not valid JSON"):
    dataset_report.make_report(str(tmp_path / "out"), tfrecords_dir=str(root))
  (root / constants.LABEL_INDEX_FILE).write_text(
      json.dumps({"labels": {"a": 0, "b": 2}, "fine_grained_labels": {}}))
  with pytest.raises(errors.FlairInputError, match="indices must be 0..1"):
    dataset_report.make_report(str(tmp_path / "out"), tfrecords_dir=str(root))
  (root / constants.LABEL_INDEX_FILE).write_text(GOOD_INDEX)
  with pytest.raises(errors.FlairInputError, match="no \\*.tfrecords files"):
    dataset_report.make_report(str(tmp_path / "out"), tfrecords_dir=str(root))
  (root / "val").mkdir()
  (root / "dev").mkdir()
  with pytest.raises(errors.FlairInputError, match="both val/ and dev/"):
    dataset_report.make_report(str(tmp_path / "out"), tfrecords_dir=str(root))


def _write_examples(path, examples):
  import tensorflow as tf
  with tf.io.TFRecordWriter(str(path)) as writer:
    for labels, fine in examples:
      writer.write(formats.encode_example(b"not a jpeg", labels, fine))


def test_tfrecords_legacy_index_dev_folder_and_bad_records(tmp_path):
  root = tmp_path / "tf"
  (root / "dev").mkdir(parents=True)
  (root / constants.LEGACY_LABEL_INDEX_FILE).write_text(GOOD_INDEX)
  _write_examples(root / "dev" / "u1.tfrecords", [([0, 1], [0]), ([1], [1])])
  records = dataset_stats.load_tfrecord_records(str(root), show_progress=False)
  assert sorted(records, key=lambda r: r.labels) == [
      dataset_stats.ImageRecord("u1", None, "val", ("animal", "food"),
                                ("dog",)),
      dataset_stats.ImageRecord("u1", None, "val", ("food",), ("soup",))]
  # Bytes that do not decode as an image become a placeholder tile.
  (row,) = dataset_stats.sample_images_from_tfrecords(str(root), ["u1"], 5)
  assert [(t.pixels, t.note) for t in row] == [(None, "unreadable image")] * 2

  _write_examples(root / "dev" / "u2.tfrecords", [([5], [0])])
  with pytest.raises(errors.FlairInputError,
                     match=r"u2.tfrecords: feature 'labels' holds index 5"):
    dataset_report.make_report(str(tmp_path / "out"), tfrecords_dir=str(root),
                               show_progress=False)
  (root / "dev" / "u2.tfrecords").write_bytes(b"garbage, not a TFRecord file")
  with pytest.raises(errors.FlairInputError) as e:
    dataset_report.make_report(str(tmp_path / "out"), tfrecords_dir=str(root),
                               show_progress=False)
  assert "u2.tfrecords: not a readable TFRecord file" in str(e.value)
  assert "\n" not in str(e.value)
