"""Tests of benchmark.data (label_sets, formats, pipeline): label index,
decoding, partitions, preprocessing."""

import collections
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from benchmark.analysis import dataset_stats
from benchmark.core import constants
from benchmark.core.errors import FlairInputError
from benchmark.data import formats
from benchmark.data import label_sets
from benchmark.data import pipeline
from benchmark.data import triage

COARSE = ("animal", "food", "outdoor", "structure")
FINE = ("cat", "dog", "pizza", "tree", "wall")


def _jpeg(seed: int) -> bytes:
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, size=constants.IMAGE_SHAPE, dtype=np.uint8)
  return tf.io.encode_jpeg(pixels).numpy()


# user -> list of (coarse indices, fine indices); partition per user.
TINY_USERS = {
    "train": {"u1@N01": [([0, 3], [1, 4]), ([2], [3]), ([1, 2, 3], [2])],
              "u2@N02": [([3], [4]), ([0], [0])]},
    "val": {"u3@N03": [([1], [2])]},
    "test": {"u4@N04": [([2, 3], [3, 4]), ([0], [1])]},
}


def _write_tiny(root, index_name=constants.LABEL_INDEX_FILE,
                val_dir_name=constants.VAL):
  """Writes a tiny per-user TFRecords directory; returns its path."""
  root = str(root)
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, index_name), "w") as f:
    json.dump({"labels": {n: i for i, n in enumerate(COARSE)},
               "fine_grained_labels": {n: i for i, n in enumerate(FINE)}}, f)
  seed = 0
  for partition, users in TINY_USERS.items():
    name = val_dir_name if partition == constants.VAL else partition
    os.makedirs(os.path.join(root, name), exist_ok=True)
    for user, records in users.items():
      path = os.path.join(root, name, user + constants.TFRECORD_SUFFIX)
      with tf.io.TFRecordWriter(path) as writer:
        for labels, fine in records:
          writer.write(formats.encode_example(_jpeg(seed), labels, fine))
          seed += 1
  return root


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  return _write_tiny(tmp_path_factory.mktemp("tiny_tfrecords"))


def _multi_hot(indices, n):
  v = np.zeros(n, np.int32)
  v[list(indices)] = 1
  return v


def _elements(client_data, client_id):
  return [(x.numpy(), y.numpy())
          for x, y in client_data.create_tf_dataset_for_client(client_id)]


# --- label index ----------------------------------------------------------


def test_label_spec_coarse_fine_binary(tiny_dir):
  spec = label_sets.load_label_spec(tiny_dir)
  assert spec.names == COARSE and spec.num_outputs == len(COARSE)
  assert spec.feature_key == constants.LABELS_FEATURE
  fine = label_sets.load_label_spec(tiny_dir, use_fine_grained_labels=True)
  assert fine.names == FINE and fine.num_outputs == len(FINE)
  assert fine.feature_key == constants.FINE_GRAINED_LABELS_FEATURE
  binary = label_sets.load_label_spec(tiny_dir, binary_label="structure")
  assert binary.num_outputs == 1 and binary.binary_index == 3


def test_label_spec_names_follow_index_not_file_order(tmp_path):
  os.makedirs(tmp_path / "d")
  with open(tmp_path / "d" / constants.LABEL_INDEX_FILE, "w") as f:
    json.dump({"labels": {"b": 1, "a": 2, "c": 0},
               "fine_grained_labels": {"x": 0}}, f)
  assert label_sets.load_label_spec(str(tmp_path / "d")).names == ("c", "b",
                                                                   "a")


def test_unknown_binary_label_lists_valid_names(tiny_dir):
  with pytest.raises(FlairInputError) as e:
    label_sets.load_label_spec(tiny_dir, binary_label="sky")
  message = str(e.value)
  assert "'sky'" in message and "\n" not in message
  for name in COARSE:
    assert name in message
  # A fine-grained name is not a coarse label.
  with pytest.raises(FlairInputError):
    label_sets.load_label_spec(tiny_dir, binary_label="dog")
  assert label_sets.load_label_spec(tiny_dir, use_fine_grained_labels=True,
                              binary_label="dog").binary_index == 1


def test_missing_dir_and_missing_index(tmp_path):
  with pytest.raises(FlairInputError, match="not a directory"):
    label_sets.load_label_spec(str(tmp_path / "nope"))
  with pytest.raises(FlairInputError, match="label_index.json"):
    label_sets.load_label_spec(str(tmp_path))


def test_malformed_index(tmp_path):
  with open(tmp_path / constants.LABEL_INDEX_FILE, "w") as f:
    json.dump({"labels": {"a": 0, "b": 0}, "fine_grained_labels": {}}, f)
  with pytest.raises(FlairInputError, match="indices"):
    label_sets.load_label_spec(str(tmp_path))
  with open(tmp_path / constants.LABEL_INDEX_FILE, "w") as f:
    f.write("{not json")
  with pytest.raises(FlairInputError, match="cannot read"):
    label_sets.load_label_spec(str(tmp_path))


def test_example_encode_decode_round_trip():
  serialized = formats.encode_example(b"\xff\xd8jpeg", [3, 0], [])
  assert formats.decode_example(serialized) == (b"\xff\xd8jpeg", [3, 0], [])
  with pytest.raises(ValueError, match="not a tf.train.Example"):
    formats.decode_example(b"\xff\xff\xff")
  missing = tf.train.Example(features=tf.train.Features(feature={
      constants.IMAGE_FEATURE: tf.train.Feature(
          bytes_list=tf.train.BytesList(value=[b"x"]))}))
  with pytest.raises(ValueError, match="no 'labels' feature"):
    formats.decode_example(missing.SerializeToString())


# --- decoding and partitions ----------------------------------------------


def test_decode_tiny_multi_hot(tiny_dir):
  spec = label_sets.load_label_spec(tiny_dir)
  clients = pipeline.load_client_data(tiny_dir, spec)
  assert set(clients) == set(constants.PARTITIONS)
  seed = 0
  for partition, users in TINY_USERS.items():
    cd = clients[partition]
    assert sorted(cd.client_ids) == sorted(users)
    image_spec, label_spec = cd.element_type_structure
    assert image_spec.shape == constants.IMAGE_SHAPE
    assert image_spec.dtype == tf.uint8
    assert label_spec.shape == (len(COARSE),) and label_spec.dtype == tf.int32
    for user, records in users.items():
      got = _elements(cd, user)
      assert len(got) == len(records)
      for (image, label), (coarse, _) in zip(got, records):
        np.testing.assert_array_equal(label, _multi_hot(coarse, len(COARSE)))
        expected = tf.io.decode_jpeg(_jpeg(seed)).numpy()
        np.testing.assert_array_equal(image, expected)
        seed += 1


def test_decode_tiny_fine_and_binary(tiny_dir):
  fine = pipeline.load_partition(
      tiny_dir, "train",
      label_sets.load_label_spec(tiny_dir, use_fine_grained_labels=True))
  got = [y for _, y in _elements(fine, "u1@N01")]
  expected = [_multi_hot(f, len(FINE))
              for _, f in TINY_USERS["train"]["u1@N01"]]
  np.testing.assert_array_equal(np.stack(got), np.stack(expected))

  binary = pipeline.load_partition(
      tiny_dir, "train",
      label_sets.load_label_spec(tiny_dir, binary_label="food"))
  assert binary.element_type_structure[1].shape == (1,)
  got = [y for _, y in _elements(binary, "u1@N01")]
  want = [[int(1 in c)] for c, _ in TINY_USERS["train"]["u1@N01"]]
  np.testing.assert_array_equal(np.stack(got), np.array(want, np.int32))


def test_aliases_load(tmp_path):
  root = _write_tiny(tmp_path / "legacy",
                     index_name=constants.LEGACY_LABEL_INDEX_FILE,
                     val_dir_name="dev")
  spec = label_sets.load_label_spec(root)
  assert spec.names == COARSE
  for name in ("val", "dev"):
    cd = pipeline.load_partition(root, name, spec)
    assert cd.client_ids == ["u3@N03"]
    (_, label), = _elements(cd, "u3@N03")
    np.testing.assert_array_equal(label, _multi_hot([1], len(COARSE)))
  assert pipeline.load_client_data(root, spec)["val"].client_ids == ["u3@N03"]


def test_partition_errors(tmp_path, tiny_dir):
  spec = label_sets.load_label_spec(tiny_dir)
  with pytest.raises(FlairInputError, match="not a directory"):
    pipeline.load_partition(str(tmp_path / "nope"), "train", spec)
  with pytest.raises(FlairInputError, match="unknown partition"):
    pipeline.load_partition(tiny_dir, "training", spec)
  root = str(tmp_path / "partial")
  os.makedirs(os.path.join(root, "train"))
  with pytest.raises(FlairInputError, match="partition 'val' not found"):
    pipeline.load_partition(root, "val", spec)
  # Only non-record files (e.g. an interrupted write's temp file).
  open(os.path.join(root, "train", ".u.tfrecords.x.tmp"), "w").close()
  with pytest.raises(FlairInputError, match="no \\*.tfrecords"):
    pipeline.load_partition(root, "train", spec)


def test_val_and_dev_together_are_ambiguous(tmp_path):
  """One rule for data and explore (formats.find_partition_dir): a folder
  `dev/` is read as `val/`, but both present is a one-line input error."""
  root = _write_tiny(tmp_path / "both", val_dir_name="dev")
  os.makedirs(os.path.join(root, "val"))
  spec = label_sets.load_label_spec(root)
  for load in (lambda: pipeline.load_partition(root, "val", spec),
               lambda: pipeline.load_partition(root, "dev", spec),
               lambda: pipeline.load_client_data(root, spec),
               lambda: dataset_stats.list_user_files(root)):
    with pytest.raises(FlairInputError, match="both val/ and dev/") as e:
      load()
    assert "\n" not in str(e.value)
  # The train partition alone is not ambiguous.
  assert pipeline.partition_files(root, "train")


@pytest.mark.parametrize("index, message", [
    (len(COARSE), f"label index >= {len(COARSE)} in a TFRecord"),
    (-1, "negative label index in a TFRecord")])
def test_label_index_out_of_range_fails(tmp_path, tiny_dir, index, message):
  root = str(tmp_path / "bad")
  os.makedirs(os.path.join(root, "train"))
  path = os.path.join(root, "train", "u" + constants.TFRECORD_SUFFIX)
  with tf.io.TFRecordWriter(path) as writer:
    writer.write(formats.encode_example(_jpeg(0), [index], [0]))
  cd = pipeline.load_partition(root, "train",
                               label_sets.load_label_spec(tiny_dir))
  with pytest.raises(tf.errors.InvalidArgumentError, match=message):
    _elements(cd, "u")


def test_serializable_dataset_fn_in_graph(tiny_dir):
  """The client dataset can be built from a tf.string id inside a graph (as
  TFF does)."""
  cd = pipeline.load_partition(tiny_dir, "test",
                               label_sets.load_label_spec(tiny_dir))

  @tf.function
  def count(client_id):
    return cd.serializable_dataset_fn(client_id).reduce(
        tf.constant(0, tf.int64), lambda n, _: n + 1)

  assert int(count(tf.constant("u4@N04"))) == 2


@pytest.mark.parametrize("max_records, expected", [(2, 2), (3, 3), (9, 3)])
def test_dataset_fn_reads_the_first_max_records(tiny_dir, max_records,
                                                 expected):
  spec = label_sets.load_label_spec(tiny_dir)
  path = pipeline.partition_files(tiny_dir, "train")["u1@N01"]
  full = [(x.numpy(), y.numpy())
          for x, y in pipeline.create_dataset_fn(spec)(path)]
  assert len(full) == 3
  dataset_fn = pipeline.create_dataset_fn(spec, max_records=max_records)
  some = [(x.numpy(), y.numpy())
          for x, y in dataset_fn(tf.constant(path))]
  assert len(some) == expected
  for (x, y), (full_x, full_y) in zip(some, full):
    np.testing.assert_array_equal(x, full_x)
    np.testing.assert_array_equal(y, full_y)


@pytest.mark.parametrize("max_records", [0, -1, 1.5])
def test_dataset_fn_rejects_a_bad_max_records(tiny_dir, max_records):
  with pytest.raises(FlairInputError, match="max_records"):
    pipeline.create_dataset_fn(label_sets.load_label_spec(tiny_dir),
                           max_records=max_records)


def test_decode_real_sample(request):
  """The real FLAIR sample, prepared: shapes, dtypes and multi-hot vectors
  match labels_and_metadata.json through the label index."""
  pytest.importorskip("prepare_tfrecords")
  sample_dir = request.getfixturevalue("flair_sample_dir")
  tfrecords_dir = request.getfixturevalue("prepared_sample_dir")
  with open(os.path.join(sample_dir, constants.METADATA_FILE)) as f:
    records = json.load(f)
  spec = label_sets.load_label_spec(tfrecords_dir)
  # The index holds (at least) every coarse label the sample uses, and only
  # FLAIR's coarse labels.
  seen = {n for r in records for n in r[constants.LABELS_KEY]}
  assert seen <= set(spec.names) <= set(constants.COARSE_LABELS)
  assert spec.num_outputs == len(spec.names)
  fine_spec = label_sets.load_label_spec(tfrecords_dir,
                                         use_fine_grained_labels=True)
  binary_spec = label_sets.load_label_spec(tfrecords_dir,
                                           binary_label="structure")

  # Expected label multisets per user (order within a user file is not
  # part of the contract).
  expected = collections.defaultdict(list)
  for r in records:
    expected[(r[constants.PARTITION_KEY], r[constants.USER_ID_KEY])].append(r)

  num_images = 0
  for partition in constants.PARTITIONS:
    cd = pipeline.load_partition(tfrecords_dir, partition, spec)
    fine_cd = pipeline.load_partition(tfrecords_dir, partition, fine_spec)
    binary_cd = pipeline.load_partition(tfrecords_dir, partition, binary_spec)
    users = {u for p, u in expected if p == partition}
    assert set(cd.client_ids) == users
    for user in users:
      want = expected[(partition, user)]
      got = _elements(cd, user)
      assert len(got) == len(want)
      for image, label in got:
        assert image.shape == constants.IMAGE_SHAPE
        assert image.dtype == np.uint8 and label.dtype == np.int32
        assert image.std() > 0  # A real picture, not a blank.
      def rows(names, label_key):
        return sorted(
            tuple(int(n in r[label_key]) for n in names) for r in want)
      assert sorted(tuple(y) for _, y in got) == rows(spec.names,
                                                       constants.LABELS_KEY)
      fine_got = sorted(tuple(y) for _, y in _elements(fine_cd, user))
      assert fine_got == rows(fine_spec.names,
                              constants.FINE_GRAINED_LABELS_KEY)
      binary_got = sorted(int(y[0]) for _, y in _elements(binary_cd, user))
      assert binary_got == sorted(
          int("structure" in r[constants.LABELS_KEY]) for r in want)
      num_images += len(got)
  assert num_images == len(records)


# --- preprocessing --------------------------------------------------------


def _range_dataset(n):
  return tf.data.Dataset.range(n)


_SEED = tf.constant([3, 5], tf.int64)


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_epochs=0, batch_size=1), "num_epochs"),
    (dict(num_epochs=1, batch_size=0), "batch_size"),
    (dict(num_epochs=1, batch_size=2, max_elements=0), "max_elements"),
    (dict(num_epochs=1, batch_size=2, shuffle_buffer_size=0),
     "shuffle_buffer_size"),
    (dict(num_epochs=1.5, batch_size=2), "num_epochs"),
    (dict(num_epochs=True, batch_size=2), "num_epochs"),
])
def test_client_spec_validation(kwargs, field):
  with pytest.raises(FlairInputError, match=f"ClientSpec.{field}"):
    pipeline.ClientSpec(**kwargs)


def test_train_preprocess_take_repeat_batch():
  spec = pipeline.ClientSpec(num_epochs=3, batch_size=4, max_elements=5,
                         shuffle_buffer_size=100)
  out = pipeline.create_train_preprocess_fn(spec)(_range_dataset(20),
                                                  _SEED)
  batches = [b.numpy() for b in out]
  assert [len(b) for b in batches] == [4, 4, 4, 3]  # 15 = 3 epochs x 5.
  flat = np.concatenate(batches)
  epochs = flat.reshape(3, 5)
  # The same subset, in the same order, every epoch; drawn by the shuffle
  # from all 20 elements.
  np.testing.assert_array_equal(epochs[0], epochs[1])
  np.testing.assert_array_equal(epochs[0], epochs[2])
  assert len(set(epochs[0])) == 5
  assert not np.array_equal(epochs[0], np.arange(5))


def test_keras_input_has_no_autotune_model_and_keeps_the_elements():
  dataset = _range_dataset(50).map(
      lambda x: x * 2, num_parallel_calls=tf.data.AUTOTUNE).batch(7)
  plain = pipeline.keras_input(dataset)
  assert dataset.options().autotune.enabled is not False
  assert plain.options().autotune.enabled is False
  np.testing.assert_array_equal(
      np.concatenate(list(plain.as_numpy_iterator())), np.arange(50) * 2)


def _batches(dataset):
  return [(x.numpy(), y.numpy()) for x, y in dataset]


def test_eval_dataset_pools_every_client_without_autotune_model(tiny_dir):
  """Both trainers' evaluation input: every image of every client once,
  batched, in the same order on every build, without tf.data's autotuning
  model (`keras_input`)."""
  spec = label_sets.load_label_spec(tiny_dir)
  train = pipeline.load_partition(tiny_dir, "train", spec)
  evaluation = pipeline.eval_dataset(train, batch_size=2)
  assert evaluation.options().autotune.enabled is False
  batches = _batches(evaluation)
  assert [len(x) for x, _ in batches] == [2, 2, 1]
  got = sorted(tuple(y) for _, labels in batches for y in labels)
  want = sorted(tuple(_multi_hot(coarse, len(COARSE)))
                for records in TINY_USERS["train"].values()
                for coarse, _ in records)
  assert got == want
  again = _batches(pipeline.eval_dataset(train, batch_size=2))
  for (x, y), (x2, y2) in zip(batches, again):
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
  with pytest.raises(FlairInputError, match="batch_size"):
    pipeline.eval_dataset(train, batch_size=0)


def test_train_preprocess_order_follows_the_seed_and_no_shuffle():
  spec = pipeline.ClientSpec(num_epochs=1, batch_size=50,
                             shuffle_buffer_size=64)
  def run(seed):
    fn = pipeline.create_train_preprocess_fn(spec)
    dataset = fn(_range_dataset(50), tf.constant(seed, tf.int64))
    return np.concatenate([b.numpy() for b in dataset])
  np.testing.assert_array_equal(run([7, 1]), run([7, 1]))
  assert sorted(run([7, 1])) == list(range(50))
  assert not np.array_equal(run([7, 1]), run([7, 2]))  # 1 / 50! to fail.
  plain = pipeline.create_train_preprocess_fn(
      pipeline.ClientSpec(num_epochs=2, batch_size=3, shuffle_buffer_size=1))
  np.testing.assert_array_equal(
      np.concatenate([b.numpy() for b in plain(_range_dataset(4), _SEED)]),
      [0, 1, 2, 3, 0, 1, 2, 3])


def test_preprocess_on_client_data_shapes(tiny_dir):
  cd = pipeline.load_partition(tiny_dir, "train",
                               label_sets.load_label_spec(tiny_dir))
  spec = pipeline.ClientSpec(num_epochs=2, batch_size=2, max_elements=2)
  preprocess = pipeline.create_train_preprocess_fn(spec, crop_size=(8, 8))
  train = preprocess(cd.create_tf_dataset_for_client("u1@N01"), _SEED)
  shapes = [(x.shape, y.shape) for x, y in train]
  assert shapes == [((2,) + constants.IMAGE_SHAPE, (2, len(COARSE)))] * 2
  evaluation = cd.preprocess(pipeline.create_eval_preprocess_fn(2))
  sizes = [x.shape[0] for x, _ in
           evaluation.create_tf_dataset_for_client("u1@N01")]
  assert sizes == [2, 1]
  with pytest.raises(FlairInputError, match="batch_size"):
    pipeline.create_eval_preprocess_fn(0)


def test_preprocessed_dataset_traces_into_tff_computation(tiny_dir):
  """Decoding plus training preprocessing serialise into a TFF computation
  (as `compose_dataset_computation_with_learning_process` needs)."""
  import tensorflow_federated as tff
  cd = pipeline.load_partition(tiny_dir, "train",
                               label_sets.load_label_spec(tiny_dir))
  preprocess = pipeline.create_train_preprocess_fn(
      pipeline.ClientSpec(num_epochs=2, batch_size=2, max_elements=3),
      crop_size=(16, 16))

  @tff.tensorflow.computation(tf.string, tf.TensorSpec([2], tf.int64))
  def build_dataset(client_id, seed):
    return preprocess(cd.serializable_dataset_fn(client_id), seed)

  element = build_dataset.type_signature.result.element
  images, labels = element
  assert images.dtype == np.uint8
  assert tuple(images.shape)[1:] == constants.IMAGE_SHAPE
  assert tuple(labels.shape)[1:] == (len(COARSE),)


# --- Checking user files before training --------------------------------------


def _records_of(path):
  return list(tf.data.TFRecordDataset(path).as_numpy_iterator())


def test_check_tfrecords_reports_every_bad_file_one_line_each(
    damaged_sample):
  copy, cut, bad_label, _ = damaged_sample
  label_spec = label_sets.load_label_spec(copy)
  with pytest.raises(triage.BadTFRecordsError) as info:
    triage.check_tfrecords(copy, label_spec)
  lines = str(info.value).splitlines()
  assert "2 of the 15 user files" in lines[0]
  assert "--skip_bad_records" in lines[0]
  assert len(lines) == 3
  by_file = dict(line.strip().split(": ", 1) for line in lines[1:])
  assert sorted(by_file) == sorted([cut, bad_label])
  assert by_file[cut].startswith("cannot be read after 1 record(s) "
                                 "(truncated or corrupt file")
  assert by_file[bad_label].startswith("record ")
  assert "index 99 outside the label index" in by_file[bad_label]


def test_skip_bad_records_trains_on_a_mirror_without_them(damaged_sample,
                                                         tmp_path):
  copy, cut, bad_label, _ = damaged_sample
  label_spec = label_sets.load_label_spec(copy)
  bad = triage.check_tfrecords(copy, label_spec, skip_bad_records=True)
  assert sorted(c.path for c in bad) == sorted([cut, bad_label])
  mirror = triage.mirror_without_bad_records(copy, bad,
                                           str(tmp_path / "mirror"))
  assert triage.check_tfrecords(mirror,
                                label_sets.load_label_spec(mirror)) == []
  name = os.path.basename
  mirrored = lambda p: os.path.join(mirror, constants.TRAIN, name(p))
  assert len(_records_of(mirrored(cut))) == 1
  assert _records_of(mirrored(bad_label)) == _records_of(bad_label)[:-1]
  summary = triage.skipped_records_summary(bad)
  assert summary == {"count": 2, "files": {cut: 1, bad_label: 1}}
  # Good files are links to the originals.
  good = [n for n in os.listdir(os.path.join(copy, constants.VAL))]
  assert os.path.realpath(os.path.join(mirror, constants.VAL, good[0])) == (
      os.path.realpath(os.path.join(copy, constants.VAL, good[0])))
  # A user without a good record is left out.
  all_bad = triage.FileCheck(os.path.join(copy, constants.TEST, os.listdir(
      os.path.join(copy, constants.TEST))[0]), 1, (0,), False, "bad")
  mirror = triage.mirror_without_bad_records(copy, bad + [all_bad],
                                           str(tmp_path / "mirror2"))
  assert os.listdir(os.path.join(mirror, constants.TEST)) == []


def test_files_failing_in_tensorflow_are_named(damaged_sample):
  copy, cut, bad_label, bad_jpeg = damaged_sample
  lines = triage.find_files_failing_in_tensorflow(
      copy, label_sets.load_label_spec(copy))
  assert sorted(line.split(": ", 1)[0] for line in lines) == sorted(
      os.path.realpath(p) for p in (cut, bad_label, bad_jpeg))


def test_data_errors_are_recognised_through_grpc():
  class FakeRpcError(Exception):
    def details(self):
      return ("Failed to run computation: jpeg::Uncompress failed. Invalid "
              "JPEG data or crop window.\n [[{{node DecodeJpeg}}]]")
  assert triage.is_data_error(FakeRpcError("<_InactiveRpcError ...>"))
  assert triage.is_data_error(tf.errors.DataLossError(None, None, "cut"))
  assert not triage.is_data_error(RuntimeError("worker died"))
