"""Atomic writes: complete files only, normal permissions."""

import datetime
import errno
import json
import os
import stat

import pytest

from benchmark.core import errors
from benchmark.core import file_io
from benchmark.training import run_dir


def test_failed_write_leaves_nothing(tmp_path):
  path = str(tmp_path / "out" / "result.json")
  with pytest.raises(RuntimeError):
    with file_io.atomic_path(path) as tmp:
      with open(tmp, "w") as f:
        f.write("partial")
      raise RuntimeError("interrupted")
  assert not os.path.exists(path)
  assert os.listdir(tmp_path / "out") == []


def test_existing_file_untouched_until_success(tmp_path):
  path = str(tmp_path / "result.txt")
  file_io.write_text_atomic(path, "old")
  with file_io.atomic_path(path) as tmp:
    with open(tmp, "w") as f:
      f.write("new")
    with open(path) as f:
      assert f.read() == "old"
    assert os.path.basename(tmp).startswith(".result.txt.")
    assert tmp.endswith(".tmp")
  with open(path) as f:
    assert f.read() == "new"


def test_final_file_has_umask_permissions(tmp_path):
  path = str(tmp_path / "x.json")
  file_io.write_json_atomic(path, {"b": 1, "a": [2]})
  mode = stat.S_IMODE(os.stat(path).st_mode)
  umask = os.umask(0)
  os.umask(umask)
  assert mode == 0o666 & ~umask
  with open(path) as f:
    assert f.read() == '{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n'


def _identity(trainer="central", **settings):
  values = {"learning_rate": 1e-3, "binary_label": None, "seed": 0}
  values.update(settings)
  return run_dir.run_identity(
      trainer, run_dir.labels_identity(("a", "b"), False,
                                        values["binary_label"]),
      run_dir.model_identity(False, 1 if values["binary_label"] else 2),
      values)


def _files(directory):
  """{relative path: bytes} under `directory`."""
  found = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        found[os.path.relpath(path, directory)] = f.read()
  return found


def test_claim_save_dir_records_the_run_and_resumes_the_same(tmp_path,
                                                             caplog):
  save_dir = str(tmp_path / "runs" / "a")
  assert not run_dir.claim_save_dir(save_dir, _identity(),
                                     {"num_epochs": 3, "seed": 0})
  with open(os.path.join(save_dir, "flags.json")) as f:
    assert f.read() == '{\n  "num_epochs": 3,\n  "seed": 0\n}\n'
  with open(os.path.join(save_dir, "run.json")) as f:
    assert json.load(f) == _identity()
  # The same run with more epochs resumes; the changed flag is logged.
  with caplog.at_level("WARNING"):
    assert run_dir.claim_save_dir(save_dir, _identity(),
                                   {"num_epochs": 5, "seed": 0})
  assert "--num_epochs (3 -> 5)" in caplog.text


@pytest.mark.parametrize("other, expected", [
    (_identity(binary_label="b"), "--binary_label is None there, 'b' now"),
    (_identity(learning_rate=0.1), "--learning_rate is 0.001 there, 0.1 now"),
    (_identity("federated"),
     "it holds a central run, this is a federated run"),
])
def test_claim_save_dir_refuses_another_run_with_one_line(tmp_path, other,
                                                          expected):
  save_dir = str(tmp_path / "run")
  run_dir.claim_save_dir(save_dir, _identity(), {"seed": 0})
  with open(os.path.join(save_dir, "metrics.csv"), "w") as f:
    f.write("epoch,loss\n0,1.0\n")
  before = _files(save_dir)
  with pytest.raises(errors.FlairInputError) as info:
    run_dir.claim_save_dir(save_dir, other, {"seed": 1})
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith(f"--save_model_dir {save_dir!r} holds a "
                            "different run: ")
  assert expected in message
  assert "another --save_model_dir" in message and "--overwrite" in message
  assert _files(save_dir) == before  # Nothing overwritten.


def test_overwrite_removes_the_old_runs_files_only(tmp_path, caplog):
  save_dir = tmp_path / "run"
  run_dir.claim_save_dir(str(save_dir), _identity(), {"seed": 0})
  for name in ("metrics.csv", "final_metrics.json",
               "resnet18_central_2labels.h5",
               ".resnet18_central_2labels.h5.abc123.tmp", "notes.txt"):
    (save_dir / name).write_text("old")
  (save_dir / "backup" / "chief").mkdir(parents=True)
  (save_dir / "backup" / "chief" / "ckpt").write_text("old")
  with caplog.at_level("WARNING"):
    assert not run_dir.claim_save_dir(
        str(save_dir), _identity("federated"), {"seed": 0}, overwrite=True)
  assert sorted(os.listdir(save_dir)) == ["flags.json", "notes.txt",
                                          "run.json"]
  assert (save_dir / "notes.txt").read_text() == "old"
  with open(save_dir / "run.json") as f:
    assert json.load(f)["trainer"] == "federated"
  assert "removed 7 output(s)" in caplog.text


def test_outputs_without_a_run_identity_are_refused(tmp_path):
  """A directory holding a run of an earlier version (or the working
  directory of the old default), whose settings are unknown."""
  save_dir = tmp_path / "old"
  save_dir.mkdir()
  (save_dir / "metrics.csv").write_text("epoch,loss\n")
  (save_dir / "flags.json").write_text("{}")
  with pytest.raises(errors.FlairInputError,
                     match="outputs of an earlier run whose settings were not "
                     "recorded .*flags.json, metrics.csv.*--overwrite"):
    run_dir.claim_save_dir(str(save_dir), _identity(), {})
  # Files that are no run's output do not count.
  other = tmp_path / "other"
  other.mkdir()
  (other / "README.md").write_text("mine")
  run_dir.claim_save_dir(str(other), _identity(), {})


def test_claim_save_dir_names_the_flag_when_it_cannot_create(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(errors.FlairInputError,
                     match="^--save_model_dir .* cannot be created"):
    run_dir.claim_save_dir(str(blocker / "sub"), _identity(), {})


def test_fresh_run_dir_is_new_under_runs(tmp_path):
  now = datetime.datetime(2026, 1, 31, 14, 25, 1)
  first = run_dir.fresh_run_dir("central", str(tmp_path), now)
  assert first == str(tmp_path / "central-20260131-142501")
  os.makedirs(first)
  assert run_dir.fresh_run_dir("central", str(tmp_path), now) == first + "-2"


def test_storage_errors_are_recognised_in_tensorflow_messages():
  error = RuntimeError("/out/train/.u.tfrecords.x.tmp; No space left on "
                       "device")
  assert file_io.storage_errno(error) == errno.ENOSPC
  assert file_io.storage_errno(OSError(errno.EROFS, "ro")) == errno.EROFS
  assert file_io.storage_errno(ValueError("bad value")) is None


@pytest.mark.parametrize("write", ["bytes", "json", "weights"])
def test_full_disk_is_one_line_naming_the_file_and_leaves_nothing(
    small_filesystem, write):
  root = small_filesystem(256, fill_to_kib=16)
  path = os.path.join(root, "out", "result")
  data = b"x" * (64 * 1024)
  with pytest.raises(errors.OutputWriteError) as info:
    if write == "bytes":
      file_io.write_bytes_atomic(path, data)
    elif write == "json":
      file_io.write_json_atomic(path, {"x": "y" * 64 * 1024})
    else:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      model = tf.keras.Sequential([tf.keras.layers.Dense(
          200, input_shape=(100,))])
      file_io.save_keras_weights_h5(model, path)
  message = str(info.value)
  assert message.startswith(f"cannot write {path}: No space left on device")
  assert "\n" not in message and "rerun the same command" in message
  assert os.listdir(os.path.join(root, "out")) == []
  os.remove(os.path.join(root, "filler"))  # Space freed: the same call works.
  file_io.write_bytes_atomic(path, data)
  with open(path, "rb") as f:
    assert f.read() == data


def test_read_only_output_names_the_file(small_filesystem):
  import subprocess  # pylint: disable=g-import-not-at-top
  root = small_filesystem(64)
  subprocess.run(["mount", "-o", "remount,ro", root], check=True)
  path = os.path.join(root, "x.json")
  with pytest.raises(errors.OutputWriteError,
                     match=f"^cannot write {path}: Read-only file system"):
    file_io.write_json_atomic(path, {})


def test_drop_partial_last_record_keeps_the_complete_records(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "events.out.tfevents.1")
  with tf.io.TFRecordWriter(path) as writer:
    for record in (b"bb" * 100, b"a", b"ccc"):
      writer.write(record)
  with open(path, "rb") as f:
    complete = f.read()
  file_io.drop_partial_last_record(path)  # Nothing to drop.
  with open(path, "rb") as f:
    assert f.read() == complete
  for cut in (5, 14, 214):  # Inside the header, the data, the footer.
    with open(path, "wb") as f:
      f.write(complete + complete[:cut])
    file_io.drop_partial_last_record(path)
    with open(path, "rb") as f:
      assert f.read() == complete
  assert list(tf.compat.v1.io.tf_record_iterator(path)) == [
      b"bb" * 100, b"a", b"ccc"]
