"""An exclusive lock on a directory for the whole of one process's work in it
(a download into --dataset_dir, a run in --save_model_dir).

`DirectoryLock` holds an `fcntl.flock` lock on a file in the directory
(`LOCK_FILE` unless told otherwise). The operating system releases a flock
lock when the last descriptor of the file closes, so a process that dies in
any way, kill -9 included, never leaves a stale lock behind: the next process
takes it at once. While held, the file names its holder (a JSON object:
`pid`, `host`, `command`, `started`), so that a second process is refused
with one line naming the flag, the directory and the running process.

The lock file is removed when the lock is released (after kill -9 it stays,
unlocked, and is reused). A process that finds it locked is refused at once
(`DirectoryLockedError`), never made to wait. Processes forked while the
lock is held share it (their copy of the descriptor keeps it held until they
exit too); processes started by exec do not inherit it.

flock locks are advisory: they keep out only processes that take the same
lock. On network file systems they hold only where the file system supports
them (Linux NFS clients emulate them with byte-range locks).
"""

import datetime
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from typing import Any, Optional

from benchmark.core import errors

# The lock file's name inside the locked directory.
LOCK_FILE = ".lock"
# How long a refused process waits for the holder to write its details (the
# holder writes them right after taking the lock).
_HOLDER_WAIT_S = 1.0
_HOLDER_POLL_S = 0.02
# The longest command line the lock file records.
_MAX_COMMAND_CHARS = 300


class DirectoryLockedError(errors.FlairInputError):
  """Another process holds the lock on the directory.

  Attributes:
    directory: the locked directory.
    holder: what the lock file says about its holder (`pid`, `host`,
      `command`, `started`), or None when it says nothing readable.
  """

  def __init__(self, message: str, directory: str,
               holder: Optional[dict[str, Any]]):
    super().__init__(message)
    self.directory = directory
    self.holder = holder

  @property
  def pid(self) -> Optional[int]:
    """The holder's process id, or None when unknown."""
    pid = (self.holder or {}).get("pid")
    return pid if isinstance(pid, int) else None


def _this_process() -> dict[str, Any]:
  """What the lock file records about the process taking the lock."""
  command = " ".join(shlex.quote(a) for a in sys.argv) or sys.executable
  if len(command) > _MAX_COMMAND_CHARS:
    command = command[:_MAX_COMMAND_CHARS - 3] + "..."
  return {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "command": command,
      "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
  }


def _read_holder(fd: int) -> Optional[dict[str, Any]]:
  """The holder details in the open lock file `fd`; waits up to
  `_HOLDER_WAIT_S` for a holder that has just taken the lock to write them.
  None when nothing readable appears."""
  deadline = time.monotonic() + _HOLDER_WAIT_S
  while True:
    try:
      holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
      if isinstance(holder, dict):
        return holder
    except (OSError, ValueError):
      pass
    if time.monotonic() >= deadline:
      return None
    time.sleep(_HOLDER_POLL_S)


def _describe_holder(holder: Optional[dict[str, Any]]) -> str:
  """One line naming a lock's holder: "process 123 (python run.py ...),
  started <time>" (with its host when it is not this one)."""
  if not holder or not isinstance(holder.get("pid"), int):
    return "another process (its lock file does not name it)"
  text = f"process {holder['pid']}"
  host = holder.get("host")
  if isinstance(host, str) and host and host != socket.gethostname():
    text += f" on host {host}"
  command = holder.get("command")
  if isinstance(command, str) and command:
    text += f" ({' '.join(command.split())})"  # One line, whatever argv held.
  if isinstance(holder.get("started"), str):
    text += f", started {holder['started']}"
  return text


def _same_file(fd: int, path: str) -> bool:
  """Whether `path` still names the file open as `fd`."""
  try:
    on_disk = os.stat(path)
  except FileNotFoundError:
    return False
  held = os.fstat(fd)
  return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


class DirectoryLock:
  """An exclusive, non-blocking lock on a directory (see the module doc).

  Use as a context manager (`with DirectoryLock(d, "--flag"): ...`) or
  call `acquire` and `release`. Not reentrant: a second `DirectoryLock` on
  the same directory is refused even in the same process.

  Args:
    directory: the directory to lock; it must exist.
    flag: the flag that named the directory, for messages (e.g.
      "--dataset_dir").
    file_name: the lock file's name inside `directory`.
  """

  def __init__(self, directory: str, flag: str, file_name: str = LOCK_FILE):
    self.directory = directory
    self.flag = flag
    self.path = os.path.join(directory, file_name)
    self._fd: Optional[int] = None

  @property
  def held(self) -> bool:
    """Whether this object holds the lock now."""
    return self._fd is not None

  def acquire(self) -> "DirectoryLock":
    """Takes the lock and records this process in the lock file.

    Returns:
      self.

    Raises:
      DirectoryLockedError: another process (or another `DirectoryLock`
        object) holds it; the one-line message names the flag, the
        directory and the holder (pid, command, start time).
      OSError: the lock file cannot be created or written (the caller names
        the location; e.g. a read-only or full file system).
      RuntimeError: this object holds the lock already.
    """
    if self._fd is not None:
      raise RuntimeError(f"{self.path} is already locked by this object")
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:  # EWOULDBLOCK: another holder.
        holder = _read_holder(fd)
        os.close(fd)
        raise DirectoryLockedError(
            f"{self.flag} {self.directory} is in use by "
            f"{_describe_holder(holder)}: wait for it to finish (or stop "
            "it) and rerun", self.directory, holder) from None
      except BaseException:
        os.close(fd)
        raise
      # A holder that released the lock meanwhile removed the file we
      # opened: lock the file now at `path` instead.
      if _same_file(fd, self.path):
        break
      os.close(fd)
    try:
      data = json.dumps(_this_process()).encode("utf-8")
      os.ftruncate(fd, 0)
      os.pwrite(fd, data, 0)
    except BaseException:
      self._fd = fd
      self.release()
      raise
    self._fd = fd
    return self

  def release(self) -> None:
    """Removes the lock file and releases the lock (does nothing when not
    held). Never raises for a lock file already gone."""
    fd, self._fd = self._fd, None
    if fd is None:
      return
    try:
      if _same_file(fd, self.path):
        os.remove(self.path)
    except OSError:
      pass  # Left in place, unlocked: the next holder reuses it.
    finally:
      os.close(fd)

  def __enter__(self) -> "DirectoryLock":
    return self.acquire()

  def __exit__(self, *exc_info) -> None:
    self.release()

