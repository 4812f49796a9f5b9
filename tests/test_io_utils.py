"""Atomic writes: complete files only, normal permissions."""

import os
import stat

import pytest

from benchmark import io_utils


def test_failed_write_leaves_nothing(tmp_path):
  path = str(tmp_path / "out" / "result.json")
  with pytest.raises(RuntimeError):
    with io_utils.atomic_path(path) as tmp:
      with open(tmp, "w") as f:
        f.write("partial")
      raise RuntimeError("interrupted")
  assert not os.path.exists(path)
  assert os.listdir(tmp_path / "out") == []


def test_existing_file_untouched_until_success(tmp_path):
  path = str(tmp_path / "result.txt")
  io_utils.write_text_atomic(path, "old")
  with io_utils.atomic_path(path) as tmp:
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
  io_utils.write_json_atomic(path, {"b": 1, "a": [2]})
  mode = stat.S_IMODE(os.stat(path).st_mode)
  umask = os.umask(0)
  os.umask(umask)
  assert mode == 0o666 & ~umask
  with open(path) as f:
    assert f.read() == '{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n'


def test_prepare_save_dir_writes_flags_and_warns_on_change(tmp_path, caplog):
  save_dir = str(tmp_path / "runs" / "a")
  io_utils.prepare_save_dir(save_dir, {"num_epochs": 3, "seed": 0})
  with open(os.path.join(save_dir, "flags.json")) as f:
    assert f.read() == '{\n  "num_epochs": 3,\n  "seed": 0\n}\n'
  with caplog.at_level("WARNING"):
    io_utils.prepare_save_dir(save_dir, {"num_epochs": 5, "seed": 0})
  assert "--num_epochs (3 -> 5)" in caplog.text
  assert "seed" not in caplog.text.split("other values of", 1)[1]


def test_prepare_save_dir_names_the_flag_when_it_cannot_create(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(io_utils.errors.FlairInputError,
                     match="^--save_model_dir .* cannot be created"):
    io_utils.prepare_save_dir(str(blocker / "sub"), {})
