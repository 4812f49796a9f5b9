"""Tests of the prepare pipeline (benchmark/prepare/tfrecords.py, with
input_checks.py and manifest.py) and of prepare_tfrecords.py: the real FLAIR
sample, generated data, resume after a killed run, bad input (library and
command line), --skip_bad_images, integer image ids."""

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from benchmark.core import constants
from benchmark.core import errors
from benchmark.data import formats
from benchmark.prepare import input_checks
from benchmark.prepare import manifest
from benchmark.prepare import tfrecords

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
SAMPLE_NUM_IMAGES = 35
SAMPLE_NUM_USERS = 15


def _records(dataset_dir):
  with open(os.path.join(dataset_dir, constants.METADATA_FILE)) as f:
    return json.load(f)


def _write_records(dataset_dir, records):
  with open(os.path.join(dataset_dir, constants.METADATA_FILE), "w") as f:
    json.dump(records, f)


def _image_path(dataset_dir, image_id):
  return os.path.join(dataset_dir, constants.SMALL_IMAGES_DIR,
                      str(image_id) + constants.IMAGE_EXTENSION)


def _read_examples(path):
  """[(jpeg bytes, label indices, fine label indices)] of one user file."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return [formats.decode_example(serialized) for serialized
          in tf.data.TFRecordDataset(path).as_numpy_iterator()]


def _output_files(tfrecords_dir):
  """{relative path: bytes} of every file under `tfrecords_dir`."""
  files = {}
  for root, _, names in os.walk(tfrecords_dir):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, tfrecords_dir)] = f.read()
  return files


def _user_files(tfrecords_dir):
  return {p for p in _output_files(tfrecords_dir)
          if p.endswith(constants.TFRECORD_SUFFIX)}


def _check_prepared(dataset_dir, tfrecords_dir):
  """Asserts the reference format for every record of `dataset_dir`; returns
  the number of examples read."""
  records = _records(dataset_dir)
  with open(os.path.join(tfrecords_dir, constants.LABEL_INDEX_FILE)) as f:
    label_index = json.load(f)
  for key in (constants.LABELS_KEY, constants.FINE_GRAINED_LABELS_KEY):
    names = sorted({name for r in records for name in r[key]})
    assert label_index[key] == {name: i for i, name in enumerate(names)}
  by_user = collections.defaultdict(list)
  partition_of = {}
  for r in records:
    by_user[r[constants.USER_ID_KEY]].append(r)
    partition = constants.PARTITION_ALIASES.get(
        r[constants.PARTITION_KEY], r[constants.PARTITION_KEY])
    partition_of[r[constants.USER_ID_KEY]] = partition
  expected_files = {os.path.join(partition_of[u], u + constants.TFRECORD_SUFFIX)
                    for u in by_user}
  assert _user_files(tfrecords_dir) == expected_files
  num_examples = 0
  for user, user_records in by_user.items():
    examples = _read_examples(os.path.join(
        tfrecords_dir, partition_of[user], user + constants.TFRECORD_SUFFIX))
    assert len(examples) == len(user_records)
    for (jpeg, labels, fine), r in zip(examples, user_records):
      with open(_image_path(dataset_dir, r[constants.IMAGE_ID_KEY]),
                "rb") as f:
        assert jpeg == f.read()
      assert labels == [label_index[constants.LABELS_KEY][n]
                        for n in r[constants.LABELS_KEY]]
      assert fine == [label_index[constants.FINE_GRAINED_LABELS_KEY][n]
                      for n in r[constants.FINE_GRAINED_LABELS_KEY]]
      num_examples += 1
  return num_examples


def _copy_dataset(source, target, records):
  """Writes `records` and copies their images from `source` to `target`."""
  os.makedirs(os.path.join(target, constants.SMALL_IMAGES_DIR))
  for r in records:
    shutil.copyfile(_image_path(source, r[constants.IMAGE_ID_KEY]),
                    _image_path(target, r[constants.IMAGE_ID_KEY]))
  _write_records(target, records)


def _small_selection(records):
  """About a dozen records: two users per partition (the first train user
  with several images), at most three images per user."""
  by_user = collections.defaultdict(list)
  for r in records:
    by_user[r[constants.USER_ID_KEY]].append(r)
  chosen = []
  for partition in constants.PARTITIONS:
    users = [u for u, rs in by_user.items()
             if rs[0][constants.PARTITION_KEY] == partition]
    users.sort(key=lambda u: len(by_user[u]) < 2)  # Stable: multi-image first.
    for user in users[:2]:
      chosen += by_user[user][:3]
  return chosen


@pytest.fixture
def small_dataset(synthetic_dataset_dir, tmp_path):
  """A writable dataset of ~12 generated records, all partitions present,
  with the generator's label_relationship.txt."""
  target = str(tmp_path / "dataset")
  _copy_dataset(synthetic_dataset_dir, target,
                _small_selection(_records(synthetic_dataset_dir)))
  shutil.copyfile(
      os.path.join(synthetic_dataset_dir, constants.LABEL_RELATIONSHIP_FILE),
      os.path.join(target, constants.LABEL_RELATIONSHIP_FILE))
  return target


def _run_cli(*args, timeout=600, prefix=()):
  return subprocess.run(
      [*prefix, sys.executable, "prepare_tfrecords.py", *args], cwd=REPO_ROOT,
      capture_output=True, text=True, timeout=timeout, check=False)


# --- The real sample and generated data ---------------------------------------


def test_real_sample(flair_sample_dir, prepared_sample_dir):
  assert _check_prepared(flair_sample_dir,
                         prepared_sample_dir) == SAMPLE_NUM_IMAGES
  assert len(_user_files(prepared_sample_dir)) == SAMPLE_NUM_USERS


def test_generated_dataset(synthetic_dataset_dir, prepared_synthetic_dir):
  num = _check_prepared(synthetic_dataset_dir, prepared_synthetic_dir)
  assert num == len(_records(synthetic_dataset_dir))
  with open(os.path.join(prepared_synthetic_dir,
                         constants.LABEL_INDEX_FILE)) as f:
    assert set(json.load(f)[constants.LABELS_KEY]) <= set(
        constants.COARSE_LABELS)


def test_summary_counts_users_and_images(small_dataset, tmp_path):
  out = str(tmp_path / "out")
  summary = tfrecords.prepare(small_dataset, out, num_workers=1,
                              show_progress=False)
  records = _records(small_dataset)
  for partition in constants.PARTITIONS:
    in_partition = [r for r in records
                    if r[constants.PARTITION_KEY] == partition]
    assert summary.images[partition] == len(in_partition)
    assert summary.users[partition] == len(
        {r[constants.USER_ID_KEY] for r in in_partition})
  assert summary.users_written == sum(summary.users.values())
  assert summary.users_already_complete == 0
  assert summary.report_path is None
  assert "images" in summary.describe()


def test_integer_image_ids_dev_partition_and_scattered_user_records(
    small_dataset, tmp_path):
  reference = str(tmp_path / "reference")
  tfrecords.prepare(small_dataset, reference, num_workers=1,
                    show_progress=False)
  records = _records(small_dataset)
  # Same data, with integer image ids and "dev" for "val".
  for r in records:
    r[constants.IMAGE_ID_KEY] = int(r[constants.IMAGE_ID_KEY])
    if r[constants.PARTITION_KEY] == constants.VAL:
      r[constants.PARTITION_KEY] = "dev"
  _write_records(small_dataset, records)
  out = str(tmp_path / "int_ids")
  tfrecords.prepare(small_dataset, out, num_workers=1,
                    show_progress=False)
  assert _output_files(out) == _output_files(reference)
  # A user's records need not be adjacent: all end up in the user's file.
  first_user = records[0][constants.USER_ID_KEY]
  mine = [r for r in records if r[constants.USER_ID_KEY] == first_user]
  others = [r for r in records if r[constants.USER_ID_KEY] != first_user]
  assert len(mine) >= 2 and others
  _write_records(small_dataset, mine[:1] + others + mine[1:])
  scattered = str(tmp_path / "scattered")
  tfrecords.prepare(small_dataset, scattered, num_workers=1,
                    show_progress=False)
  assert _output_files(scattered) == _output_files(reference)


# --- Resume -------------------------------------------------------------------


def test_resume_skips_complete_users_and_removes_temporary_files(
    small_dataset, tmp_path):
  reference = str(tmp_path / "reference")
  tfrecords.prepare(small_dataset, reference, num_workers=1,
                    show_progress=False)
  out = str(tmp_path / "out")
  shutil.copytree(reference, out)
  os.remove(os.path.join(out, constants.LABEL_INDEX_FILE))
  user_files = sorted(_user_files(out))
  # Like an interrupted run: some users missing, one half-written temporary.
  for name in user_files[1:]:
    os.remove(os.path.join(out, name))
  partition, name = os.path.split(user_files[1])
  with open(os.path.join(out, partition, "." + name + ".abc123.tmp"),
            "wb") as f:
    f.write(b"truncated")
  # A complete file is not rewritten: mark it to see that it is kept.
  kept = os.path.join(out, user_files[0])
  stat_before = os.stat(kept)
  summary = tfrecords.prepare(small_dataset, out, num_workers=1,
                              show_progress=False)
  assert summary.users_already_complete == 1
  assert summary.users_written == len(user_files) - 1
  assert os.stat(kept).st_mtime_ns == stat_before.st_mtime_ns
  assert _output_files(out) == _output_files(reference)


@pytest.mark.slow
def test_killed_run_then_rerun_gives_same_files(synthetic_dataset_dir,
                                                prepared_synthetic_dir,
                                                tmp_path):
  """SIGKILL while writing, then rerun: same bytes as an uninterrupted run."""
  out = str(tmp_path / "out")
  total = len(_user_files(prepared_synthetic_dir))
  train_dir = os.path.join(out, constants.TRAIN)
  process = subprocess.Popen(
      [sys.executable, "prepare_tfrecords.py", "--dataset_dir",
       synthetic_dataset_dir, "--tfrecords_dir", out, "--num_workers", "1"],
      cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
      if os.path.isdir(train_dir) and any(
          n.endswith(constants.TFRECORD_SUFFIX) for n in os.listdir(train_dir)):
        break
      time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
  finally:
    process.kill()
    process.wait()
  partial = _output_files(out)
  reference = _output_files(prepared_synthetic_dir)
  written = {p for p in partial if p.endswith(constants.TFRECORD_SUFFIX)}
  assert 0 < len(written) < total, "the kill did not land mid-way"
  # Whatever sits under a final name is complete (identical to the reference).
  for path in written:
    assert partial[path] == reference[path], path
  assert constants.LABEL_INDEX_FILE not in partial

  summary = tfrecords.prepare(synthetic_dataset_dir, out,
                              num_workers=1, show_progress=False)
  # A file renamed just before the kill, whose manifest line was not yet
  # written, is written again (safe); every other one is kept.
  not_journaled = summary.users_rebuilt.get(
      manifest.REBUILD_NO_ENTRY, 0)
  assert not_journaled <= 1
  assert summary.users_already_complete == len(written) - not_journaled
  assert set(summary.users_rebuilt) <= {manifest.REBUILD_NO_ENTRY}
  assert _output_files(out) == reference  # Also: no temporary file left.


def test_skip_then_restore_equals_a_fresh_prepare(flair_sample_dir,
                                                  tmp_path):
  """The issue's sequence on the real sample: prepare with --skip_bad_images
  while the only image of some label is missing, put it back, prepare
  again: every kept file was written under the old label index, so all are
  rebuilt, and the output equals a fresh prepare byte for byte."""
  records = _records(flair_sample_dir)
  label_counts = collections.Counter(
      name for r in records for name in r[constants.LABELS_KEY])
  rare = min(sorted(label_counts), key=label_counts.get)
  assert label_counts[rare] == 1, "the sample has no label used once"
  record = next(r for r in records if rare in r[constants.LABELS_KEY])
  dataset = str(tmp_path / "dataset")
  _copy_dataset(flair_sample_dir, dataset, records)
  image = _image_path(dataset, record[constants.IMAGE_ID_KEY])
  hidden = str(tmp_path / "hidden.jpg")
  os.rename(image, hidden)

  out = str(tmp_path / "out")
  first = tfrecords.prepare(dataset, out, num_workers=1,
                            skip_bad_images=True, show_progress=False)
  with open(first.label_index_path) as f:
    assert rare not in json.load(f)[constants.LABELS_KEY]
  os.rename(hidden, image)
  second = tfrecords.prepare(dataset, out, num_workers=1,
                             skip_bad_images=True, show_progress=False)
  fresh = str(tmp_path / "fresh")
  tfrecords.prepare(dataset, fresh, num_workers=1,
                    skip_bad_images=True, show_progress=False)
  assert _output_files(out) == _output_files(fresh)
  assert second.users_already_complete == 0
  assert second.users_rebuilt == {
      manifest.REBUILD_LABEL_INDEX: first.users_written}
  assert "label index changed" in second.describe()
  assert _check_prepared(dataset, out) == SAMPLE_NUM_IMAGES
  # Without --skip_bad_images, the report of the earlier run is removed.
  third = tfrecords.prepare(dataset, out, num_workers=1,
                            show_progress=False)
  assert third.users_already_complete == SAMPLE_NUM_USERS
  assert not os.path.exists(os.path.join(
      out, tfrecords.SKIPPED_IMAGES_REPORT_FILE))


def test_changed_inputs_rebuild_or_remove_only_what_changed(small_dataset,
                                                            tmp_path):
  out = str(tmp_path / "out")
  tfrecords.prepare(small_dataset, out, num_workers=1,
                    show_progress=False)
  records = _records(small_dataset)
  # Another image with the same labels: only its user's file is rebuilt.
  changed, other = records[0], records[-1]
  shutil.copyfile(_image_path(small_dataset, other[constants.IMAGE_ID_KEY]),
                  _image_path(small_dataset, changed[constants.IMAGE_ID_KEY]))
  # A user gone from the metadata: its file is removed.
  gone = records[-1][constants.USER_ID_KEY]
  kept_records = [r for r in records if r[constants.USER_ID_KEY] != gone]
  labels_before = {n for r in records for n in r[constants.LABELS_KEY]}
  labels_after = {n for r in kept_records for n in r[constants.LABELS_KEY]}
  fine_before = {n for r in records
                 for n in r[constants.FINE_GRAINED_LABELS_KEY]}
  fine_after = {n for r in kept_records
                for n in r[constants.FINE_GRAINED_LABELS_KEY]}
  _write_records(small_dataset, kept_records)
  summary = tfrecords.prepare(small_dataset, out, num_workers=1,
                              show_progress=False)
  assert summary.files_removed == 1
  if labels_before == labels_after and fine_before == fine_after:
    assert summary.users_rebuilt == {manifest.REBUILD_RECORDS: 1}
  else:  # The label index changed too: every file is rebuilt.
    assert summary.users_rebuilt == {
        manifest.REBUILD_LABEL_INDEX: summary.users_written}
  fresh = str(tmp_path / "fresh")
  tfrecords.prepare(small_dataset, fresh, num_workers=1,
                    show_progress=False)
  assert _output_files(out) == _output_files(fresh)
  assert _check_prepared(small_dataset, out) == len(kept_records)


def test_files_without_a_manifest_entry_are_rebuilt(small_dataset, tmp_path):
  """An output of an earlier version (no manifest) is not trusted."""
  reference = str(tmp_path / "reference")
  tfrecords.prepare(small_dataset, reference, num_workers=1,
                    show_progress=False)
  out = str(tmp_path / "out")
  shutil.copytree(reference, out)
  os.remove(os.path.join(out, manifest.MANIFEST_FILE))
  one = sorted(_user_files(out))[0]
  with open(os.path.join(out, one), "wb") as f:
    f.write(b"written under another label index")
  summary = tfrecords.prepare(small_dataset, out, num_workers=1,
                              show_progress=False)
  assert summary.users_rebuilt == {
      manifest.REBUILD_NO_ENTRY: len(_user_files(reference))}
  assert _output_files(out) == _output_files(reference)


# --- Full disk ----------------------------------------------------------------


def test_full_disk_is_one_error_naming_the_file_and_rerun_completes(
    flair_sample_dir, prepared_sample_dir, small_filesystem):
  root = small_filesystem(1024, fill_to_kib=200)
  out = os.path.join(root, "out")
  with pytest.raises(errors.OutputWriteError) as info:
    tfrecords.prepare(flair_sample_dir, out, num_workers=1,
                      show_progress=False)
  message = str(info.value)
  assert message.startswith(f"cannot write {out}/")
  assert "No space left on device" in message and "\n" not in message
  assert "--tfrecords_dir" in message
  partial = _output_files(out)
  reference = _output_files(prepared_sample_dir)
  assert not [p for p in partial if p.endswith(".tmp")]
  assert constants.LABEL_INDEX_FILE not in partial
  for path in _user_files(out):  # Complete files only.
    assert partial[path] == reference[path]
  os.remove(os.path.join(root, "filler"))
  tfrecords.prepare(flair_sample_dir, out, num_workers=1,
                    show_progress=False)
  assert _output_files(out) == reference


@pytest.mark.slow
def test_cli_full_disk_with_workers_is_one_line(flair_sample_dir, tmp_path,
                                                small_filesystem):
  root = small_filesystem(1024, fill_to_kib=200)
  result = _run_cli("--dataset_dir", flair_sample_dir, "--tfrecords_dir",
                    os.path.join(root, "out"), "--num_workers", "2")
  assert result.returncode == 1, result.stderr
  assert "Traceback" not in result.stderr, result.stderr
  lines = [line for line in result.stderr.splitlines()
           if line.startswith("error:")]
  assert len(lines) == 1 and "No space left on device" in lines[0], (
      result.stderr)
  assert not [n for d, _, names in os.walk(root) for n in names
              if n.endswith(".tmp")]


def test_cli_truncated_real_image_then_fixed_equals_a_clean_prepare(
    flair_sample_dir, prepared_sample_dir, tmp_path):
  """A copy of the real sample with one JPEG cut to half its size (a copy
  cut short): exit 1 before writing, one line naming the image, no
  traceback; with the image restored, the same command's output equals a
  clean prepare's, byte for byte."""
  records = _records(flair_sample_dir)
  dataset = str(tmp_path / "dataset")
  _copy_dataset(flair_sample_dir, dataset, records)
  image = _image_path(dataset, records[7][constants.IMAGE_ID_KEY])
  with open(image, "rb") as f:
    content = f.read()
  with open(image, "wb") as f:
    f.write(content[:len(content) // 2])
  out = str(tmp_path / "out")
  result = _run_cli("--dataset_dir", dataset, "--tfrecords_dir", out,
                    "--num_workers", "1")
  assert result.returncode == 1, result.stderr
  assert "Traceback" not in result.stderr, result.stderr
  lines = [line for line in result.stderr.splitlines()
           if line.startswith("error:")]
  assert len(lines) == 1, result.stderr
  assert "1 problem(s)" in lines[0] and "nothing written" in lines[0]
  assert f"image file {image} cannot be decoded" in lines[0], lines[0]
  assert not os.path.exists(out)

  with open(image, "wb") as f:
    f.write(content)
  result = _run_cli("--dataset_dir", dataset, "--tfrecords_dir", out,
                    "--num_workers", "1")
  assert result.returncode == 0, result.stderr
  assert _output_files(out) == _output_files(prepared_sample_dir)


# --- Bad input ----------------------------------------------------------------


def _break_missing_image(dataset_dir, records):
  os.remove(_image_path(dataset_dir, records[2][constants.IMAGE_ID_KEY]))
  return 2, "not found"


def _break_not_jpeg(dataset_dir, records):
  with open(_image_path(dataset_dir, records[3][constants.IMAGE_ID_KEY]),
            "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
  return 3, "not a JPEG"


def _break_unreadable_jpeg(dataset_dir, records):
  with open(_image_path(dataset_dir, records[4][constants.IMAGE_ID_KEY]),
            "wb") as f:
    f.write(b"\xff\xd8\xff" + b"garbage" * 10)
  return 4, "cannot be opened"


def _break_missing_field(dataset_dir, records):
  del records[5][constants.LABELS_KEY]
  _write_records(dataset_dir, records)
  return 5, "missing field"


def _break_unknown_partition(dataset_dir, records):
  records[6][constants.PARTITION_KEY] = "validation"
  _write_records(dataset_dir, records)
  return 6, "unknown partition"


def _break_unknown_coarse_label(dataset_dir, records):
  records[7][constants.LABELS_KEY].append("not_a_real_label")
  _write_records(dataset_dir, records)
  return 7, "['not_a_real_label'] not among FLAIR's 17 coarse labels"


def _break_unknown_fine_label(dataset_dir, records):
  records[8][constants.FINE_GRAINED_LABELS_KEY].append("unicorn")
  _write_records(dataset_dir, records)
  return 8, ("['unicorn'] not in " + os.path.join(
      dataset_dir, constants.LABEL_RELATIONSHIP_FILE))


BREAKERS = [_break_missing_image, _break_not_jpeg, _break_unreadable_jpeg,
            _break_missing_field, _break_unknown_partition,
            _break_unknown_coarse_label, _break_unknown_fine_label]


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda b: b.__name__)
def test_bad_record_or_image_stops_before_writing(small_dataset, tmp_path,
                                                  breaker):
  records = _records(small_dataset)
  index, expected = breaker(small_dataset, records)
  out = str(tmp_path / "out")
  with pytest.raises(input_checks.BadInputError) as info:
    tfrecords.prepare(small_dataset, out, num_workers=1,
                      show_progress=False)
  assert len(info.value.problems) == 1
  problem = info.value.problems[0]
  assert problem.record_index == index
  assert problem.image_id == records[index][constants.IMAGE_ID_KEY]
  assert expected in problem.message
  message = str(info.value)
  assert f"record {index}" in message
  assert records[index][constants.IMAGE_ID_KEY] in message
  assert records[index][constants.USER_ID_KEY] in message
  assert not os.path.exists(out) or not _user_files(out)


def test_malformed_json_names_the_file(small_dataset, tmp_path):
  path = os.path.join(small_dataset, constants.METADATA_FILE)
  with open(path) as f:
    text = f.read()
  with open(path, "w") as f:
    f.write(text[:len(text) // 2])
  with pytest.raises(errors.FlairInputError, match="not valid JSON") as info:
    tfrecords.prepare(small_dataset, str(tmp_path / "out"),
                      num_workers=1, show_progress=False)
  assert path in str(info.value)


def test_all_problems_are_reported_and_skip_writes_report(small_dataset,
                                                          tmp_path):
  records = _records(small_dataset)
  broken = {}
  for breaker in BREAKERS:
    index, expected = breaker(small_dataset, records)
    broken[index] = expected
  with pytest.raises(input_checks.BadInputError) as info:
    tfrecords.prepare(small_dataset, str(tmp_path / "fail"),
                      num_workers=1, show_progress=False)
  assert {p.record_index: p.message for p in info.value.problems}.keys() == (
      broken.keys())
  for problem in info.value.problems:
    assert broken[problem.record_index] in problem.message

  out = str(tmp_path / "skip")
  summary = tfrecords.prepare(small_dataset, out, num_workers=1,
                              skip_bad_images=True,
                              show_progress=False)
  assert summary.report_path == os.path.join(
      out, tfrecords.SKIPPED_IMAGES_REPORT_FILE)
  with open(summary.report_path) as f:
    report = json.load(f)
  assert sorted(p["record_index"] for p in report["skipped"]) == sorted(broken)
  assert report["num_skipped_records"] == len(broken)
  assert sum(summary.images.values()) == len(records) - len(broken)
  # Exactly the good records are written, byte-identical.
  good = [r for i, r in enumerate(records) if i not in broken]
  _write_records(small_dataset, good)
  assert _check_prepared(small_dataset, out) == len(good)


def test_pool_checks_images_in_parallel(small_dataset, tmp_path):
  # Two workers; the outputs exist already, so no worker needs TensorFlow.
  out = str(tmp_path / "out")
  tfrecords.prepare(small_dataset, out, num_workers=1,
                    show_progress=False)
  records = _records(small_dataset)
  index, _ = _break_not_jpeg(small_dataset, records)
  with pytest.raises(input_checks.BadInputError) as info:
    tfrecords.prepare(small_dataset, out, num_workers=2,
                      show_progress=False)
  assert [p.record_index for p in info.value.problems] == [index]


@pytest.mark.parametrize("num_workers", [0, -2])
def test_bad_num_workers(small_dataset, tmp_path, num_workers):
  with pytest.raises(errors.FlairInputError, match="num_workers"):
    tfrecords.prepare(small_dataset, str(tmp_path / "out"),
                      num_workers=num_workers, show_progress=False)


def test_missing_dataset_dir(tmp_path):
  with pytest.raises(errors.FlairInputError, match="dataset_dir"):
    tfrecords.prepare(str(tmp_path / "nope"), str(tmp_path / "out"),
                      num_workers=1, show_progress=False)


def test_user_id_too_long_for_a_file_name_stops_before_writing(
    small_dataset, tmp_path):
  records = _records(small_dataset)
  first_user = records[0][constants.USER_ID_KEY]
  for r in records:
    if r[constants.USER_ID_KEY] == first_user:
      r[constants.USER_ID_KEY] = "u" * 245
  _write_records(small_dataset, records)
  out = str(tmp_path / "out")
  with pytest.raises(input_checks.BadInputError) as info:
    tfrecords.prepare(small_dataset, out, num_workers=1, show_progress=False)
  assert "user_id is 245 bytes long (UTF-8), more than the 231 that fit in " \
      "a file name" in str(info.value)
  assert not os.path.exists(out)  # Nothing written, not even the directory.
  summary = tfrecords.prepare(small_dataset, out, num_workers=1,
                              skip_bad_images=True, show_progress=False)
  assert len(summary.skipped) == sum(
      r[constants.USER_ID_KEY] == "u" * 245 for r in records)


def test_the_longest_user_id_allowed_is_written(small_dataset, tmp_path):
  """`MAX_USER_ID_BYTES` (in UTF-8 bytes) is not too many: the file and its
  temporary name can be created."""
  records = _records(small_dataset)
  longest = "é" * (input_checks.MAX_USER_ID_BYTES // 2) + "a" * (
      input_checks.MAX_USER_ID_BYTES % 2)
  first_user = records[0][constants.USER_ID_KEY]
  for r in records:
    if r[constants.USER_ID_KEY] == first_user:
      r[constants.USER_ID_KEY] = longest
  _write_records(small_dataset, records)
  out = str(tmp_path / "out")
  tfrecords.prepare(small_dataset, out, num_workers=1, show_progress=False)
  assert _check_prepared(small_dataset, out) == len(records)
  partition = records[0][constants.PARTITION_KEY]
  assert os.path.isfile(os.path.join(out, partition,
                                     longest + constants.TFRECORD_SUFFIX))


def test_truncated_label_relationship_stops_before_writing(small_dataset,
                                                           tmp_path):
  path = os.path.join(small_dataset, constants.LABEL_RELATIONSHIP_FILE)
  with open(path, "rb") as f:
    text = f.read()
  with open(path, "wb") as f:
    f.write(text[:-5])  # Ends inside a coarse label's name.
  out = str(tmp_path / "out")
  with pytest.raises(errors.FlairInputError,
                     match=f"^{path} is truncated or malformed: line "):
    tfrecords.prepare(small_dataset, out, num_workers=1, show_progress=False)
  assert not os.path.exists(out)


def test_tfrecords_dir_naming_a_file_is_refused(small_dataset, tmp_path):
  existing = tmp_path / "a_file"
  existing.write_text("keep")
  for out in (existing, existing / "below"):
    with pytest.raises(errors.FlairInputError,
                       match=f"^--tfrecords_dir '{out}' must be a directory"):
      tfrecords.prepare(small_dataset, str(out), num_workers=1,
                        skip_bad_images=True, show_progress=False)
  assert existing.read_text() == "keep"
  with pytest.raises(errors.FlairInputError,
                     match="^--report_path .* is an existing directory"):
    tfrecords.prepare(small_dataset, str(tmp_path / "out"), num_workers=1,
                      skip_bad_images=True, report_path=str(tmp_path),
                      show_progress=False)
  assert not (tmp_path / "out").exists()


# --- Command line -------------------------------------------------------------


def test_cli_bad_input_exits_1_and_lists_every_problem(small_dataset,
                                                       tmp_path):
  records = _records(small_dataset)
  broken = [breaker(small_dataset, records) for breaker in BREAKERS]
  result = _run_cli("--dataset_dir", small_dataset, "--tfrecords_dir",
                    str(tmp_path / "out"))
  assert result.returncode == 1, result.stderr
  assert "Traceback" not in result.stderr
  for index, expected in broken:
    lines = [line for line in result.stderr.splitlines()
             if f"record {index} " in line and expected in line]
    assert lines, (index, expected, result.stderr)
  assert "--skip_bad_images" in result.stderr


def test_cli_malformed_json_exits_1(small_dataset, tmp_path):
  path = os.path.join(small_dataset, constants.METADATA_FILE)
  with open(path, "w") as f:
    f.write("[{\"user_id\": ")
  result = _run_cli("--dataset_dir", small_dataset, "--tfrecords_dir",
                    str(tmp_path / "out"))
  assert result.returncode == 1
  assert path in result.stderr and "not valid JSON" in result.stderr
  assert "Traceback" not in result.stderr


def test_cli_tfrecords_dir_naming_a_file_is_one_line(small_dataset,
                                                     tmp_path):
  existing = tmp_path / "a_file"
  existing.write_text("keep")
  result = _run_cli("--dataset_dir", small_dataset, "--tfrecords_dir",
                    str(existing), "--num_workers", "1")
  assert result.returncode == 1, result.stderr
  assert "Traceback" not in result.stderr, result.stderr
  error_lines = [line for line in result.stderr.splitlines()
                 if line.startswith("error:")]
  assert error_lines == [
      f"error: --tfrecords_dir '{existing}' must be a directory (created if "
      "missing), but it is an existing file"], result.stderr
  assert existing.read_text() == "keep"


@pytest.mark.parametrize("kind", ["read_only", "permission"])
def test_cli_unwritable_tfrecords_dir_is_one_line(flair_sample_dir,
                                                  make_unwritable, kind):
  """An existing --tfrecords_dir that cannot be written to (read-only file
  system, or no permission): exit 1, one line naming the path and the
  reason, no traceback, nothing written."""
  from conftest import UNWRITABLE_REASONS  # pylint: disable=g-import-not-at-top
  out, prefix = make_unwritable(kind)
  result = _run_cli("--dataset_dir", flair_sample_dir, "--tfrecords_dir", out,
                    "--num_workers", "1", prefix=prefix)
  assert result.returncode == 1, result.stderr
  assert "Traceback" not in result.stderr, result.stderr
  error_lines = [line for line in result.stderr.splitlines()
                 if line.startswith("error:")]
  assert len(error_lines) == 1, result.stderr
  assert error_lines[0].startswith(f"error: cannot write {out}"), error_lines
  assert UNWRITABLE_REASONS[kind] in error_lines[0]
  assert "--tfrecords_dir" in error_lines[0]
  assert os.listdir(out) == []


@pytest.mark.slow
def test_cli_parallel_skip_bad_images(small_dataset, tmp_path):
  """Two writer processes, --skip_bad_images, a custom report path."""
  records = _records(small_dataset)
  index, _ = _break_missing_image(small_dataset, records)
  out = str(tmp_path / "out")
  report = str(tmp_path / "report.json")
  result = _run_cli("--dataset_dir", small_dataset, "--tfrecords_dir", out,
                    "--num_workers", "2", "--skip_bad_images",
                    "--report_path", report)
  assert result.returncode == 0, result.stderr
  with open(report) as f:
    skipped = json.load(f)["skipped"]
  assert [p["record_index"] for p in skipped] == [index]
  assert report in result.stderr + result.stdout
  for partition in constants.PARTITIONS:
    assert partition in result.stdout
  del records[index]
  _write_records(small_dataset, records)
  assert _check_prepared(small_dataset, out) == len(records)
