"""The directory lock (benchmark/core/locks.py): one holder at a time, a
refusal naming the holder, nothing stale after release or kill -9."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from benchmark.core import errors
from benchmark.core import locks

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def test_second_holder_is_refused_naming_flag_directory_and_pid(tmp_path):
  with locks.DirectoryLock(str(tmp_path), "--some_dir") as first:
    assert first.held
    with open(first.path) as f:
      holder = json.load(f)
    assert holder["pid"] == os.getpid()
    assert holder["command"] and holder["started"]
    second = locks.DirectoryLock(str(tmp_path), "--some_dir")
    with pytest.raises(locks.DirectoryLockedError) as info:
      second.acquire()
    assert not second.held
  error = info.value
  assert isinstance(error, errors.FlairInputError)  # One line on the CLI.
  assert error.pid == os.getpid()
  message = str(error)
  assert "\n" not in message
  assert message.startswith(f"--some_dir {tmp_path} is in use by process "
                            f"{os.getpid()} (")


def test_release_removes_the_file_and_frees_the_lock(tmp_path):
  lock = locks.DirectoryLock(str(tmp_path), "--d").acquire()
  lock.release()
  assert not lock.held
  assert os.listdir(tmp_path) == []
  lock.release()  # Twice: nothing happens.
  with locks.DirectoryLock(str(tmp_path), "--d"):
    pass
  assert os.listdir(tmp_path) == []


def test_lock_is_released_when_the_block_raises(tmp_path):
  with pytest.raises(KeyError):
    with locks.DirectoryLock(str(tmp_path), "--d"):
      raise KeyError("boom")
  with locks.DirectoryLock(str(tmp_path), "--d") as again:
    assert again.held


def test_other_lock_file_names_are_independent(tmp_path):
  with locks.DirectoryLock(str(tmp_path), "--d"):
    with locks.DirectoryLock(str(tmp_path), "--d", file_name=".other.lock"):
      pass


def test_a_file_removed_by_the_last_holder_is_not_locked_again(
    tmp_path, monkeypatch):
  """A contender that opened the lock file just before its holder released
  (and removed) it must not hold a lock on that removed file: it locks the
  file now at the path."""
  path = os.path.join(tmp_path, locks.LOCK_FILE)
  first = locks.DirectoryLock(str(tmp_path), "--d").acquire()
  stale_fd = os.open(path, os.O_RDWR)  # Opened before the release...
  first.release()  # ...which removes the file.
  real_open = os.open
  calls = []

  def open_stale_first(*args, **kwargs):
    calls.append(args[0])
    return stale_fd if len(calls) == 1 else real_open(*args, **kwargs)

  monkeypatch.setattr(locks.os, "open", open_stale_first)
  second = locks.DirectoryLock(str(tmp_path), "--d").acquire()
  monkeypatch.undo()
  assert len(calls) == 2  # Retried on the file now at the path.
  with open(path) as f:
    assert json.load(f)["pid"] == os.getpid()
  with pytest.raises(locks.DirectoryLockedError):
    locks.DirectoryLock(str(tmp_path), "--d").acquire()
  second.release()


def test_holder_that_names_nobody_is_still_refused(tmp_path):
  path = os.path.join(tmp_path, locks.LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)  # Locked, but no details written.
    with pytest.raises(locks.DirectoryLockedError,
                       match="in use by another process") as info:
      locks.DirectoryLock(str(tmp_path), "--d").acquire()
    assert info.value.pid is None
  finally:
    os.close(fd)


_HOLDER = textwrap.dedent("""\
    import sys, time
    from benchmark.core import locks
    locks.DirectoryLock(sys.argv[1], "--d").acquire()
    print("held", flush=True)
    time.sleep(60)
    """)


def test_kill_9_leaves_no_stale_lock(tmp_path):
  process = subprocess.Popen(
      [sys.executable, "-c", _HOLDER, str(tmp_path)], cwd=REPO_ROOT,
      stdout=subprocess.PIPE, text=True)
  try:
    assert process.stdout.readline().strip() == "held"
    with pytest.raises(locks.DirectoryLockedError) as info:
      locks.DirectoryLock(str(tmp_path), "--d").acquire()
    assert info.value.pid == process.pid
    assert f"process {process.pid} (" in str(info.value)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  # The file is still there (nobody removed it), but not locked.
  assert os.path.exists(os.path.join(tmp_path, locks.LOCK_FILE))
  with locks.DirectoryLock(str(tmp_path), "--d") as lock:
    with open(lock.path) as f:
      assert json.load(f)["pid"] == os.getpid()
