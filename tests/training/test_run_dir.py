"""Tests of the run directory's lock (benchmark/training/run_dir.py,
`lock_save_dir`): one run at a time, and a lock file that is not a run's
output. (Claiming a directory: tests/core/test_file_io.py; two commands
racing into one directory: tests/cli/test_trainers.py.)"""

import os

import pytest

from benchmark.core import constants
from benchmark.core import errors
from benchmark.core import locks
from benchmark.training import run_dir


def _identity():
  return run_dir.run_identity(
      "central", run_dir.labels_identity(["a", "b"], False, None),
      run_dir.model_identity(False, 2, "tiny"), {"seed": 0})


def test_a_locked_run_directory_is_refused_naming_the_holder(tmp_path):
  save_dir = str(tmp_path / "runs" / "run")
  lock = run_dir.lock_save_dir(save_dir)  # Creates the directory.
  try:
    with pytest.raises(locks.DirectoryLockedError) as info:
      run_dir.lock_save_dir(save_dir)
    message = str(info.value)
    assert message.startswith(f"--save_model_dir {save_dir} is in use by "
                              f"process {os.getpid()} (")
    assert "\n" not in message
    assert isinstance(info.value, errors.FlairInputError)  # One line, exit 1.
  finally:
    lock.release()
  # Released: the file is gone and the next run takes the lock.
  assert os.listdir(save_dir) == []
  run_dir.lock_save_dir(save_dir).release()


def test_the_lock_file_is_not_a_run_output_and_survives_overwrite(tmp_path):
  save_dir = str(tmp_path)
  lock = run_dir.lock_save_dir(save_dir)
  try:
    # A locked directory holds no run yet: a run starts afresh there.
    assert run_dir.run_outputs_in(save_dir) == []
    assert not run_dir.claim_save_dir(save_dir, _identity(), {"seed": 0})
    open(os.path.join(save_dir, constants.METRICS_CSV_FILE), "w").close()
    # --overwrite removes the earlier run's outputs, not the lock file.
    assert not run_dir.claim_save_dir(save_dir, _identity(), {"seed": 0},
                                      overwrite=True)
    assert sorted(os.listdir(save_dir)) == sorted(
        [locks.LOCK_FILE, constants.FLAGS_FILE, constants.RUN_IDENTITY_FILE])
    with pytest.raises(locks.DirectoryLockedError):
      run_dir.lock_save_dir(save_dir)  # Still held.
  finally:
    lock.release()


def test_an_unwritable_run_directory_is_one_line_naming_the_lock_file(
    make_unwritable):
  from conftest import UNWRITABLE_REASONS  # pylint: disable=g-import-not-at-top
  save_dir, _ = make_unwritable("read_only")
  with pytest.raises(errors.OutputWriteError) as info:
    run_dir.lock_save_dir(save_dir)
  message = str(info.value)
  assert message.startswith(
      f"cannot write {os.path.join(save_dir, locks.LOCK_FILE)}: "
      f"{UNWRITABLE_REASONS['read_only']}"), message
  assert "--save_model_dir" in message and "\n" not in message
  assert os.listdir(save_dir) == []
