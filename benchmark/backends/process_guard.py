"""Stops the processes a run started, even when the run is killed with -9.

Ray's embedded local cluster (`ray.init()` without an address) starts a
process tree under the driver: the GCS server and the raylet die with the
driver, but the raylet's own children (Ray's dashboard and runtime-env
agents) were seen outliving a SIGKILLed driver by minutes, trying to report
to the dead GCS. `ProcessGuard` closes that gap without touching Ray's
workings: a small watcher process (`python -m benchmark.backends.process_guard PID`,
no TensorFlow) snapshots the processes below PID every `_PERIOD_S` seconds;
when PID is gone, or when told to stop, it SIGKILLs every process of its
snapshots that started after the guard and is still running (matched by pid
*and* start time, so a reused pid is never hit), then exits.

Linux only (/proc).
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from typing import Iterator, Optional

_PERIOD_S = 0.5
# The folder holding the `benchmark` package, the guard's working directory
# (so that `python -m` finds the package without an install).
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _process_table() -> dict[int, tuple[int, str]]:
  """pid -> (parent pid, start time in clock ticks), from /proc."""
  table = {}
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
      continue
    # After the command name: state, ppid, ..., starttime (field 22 of
    # proc(5), index 19 here).
    if fields[0] == b"Z":
      continue
    table[int(entry)] = (int(fields[1]), fields[19].decode())
  return table


def descendants(pid: int, table: Optional[dict] = None
               ) -> dict[int, str]:
  """The processes below `pid`: pid -> start time."""
  table = _process_table() if table is None else table
  children = {}
  for child, (parent, _) in table.items():
    children.setdefault(parent, []).append(child)
  found, stack = {}, [pid]
  while stack:
    for child in children.get(stack.pop(), []):
      if child not in found:
        found[child] = table[child][1]
        stack.append(child)
  return found


def _kill(recorded: dict[int, str]) -> None:
  table = _process_table()
  for pid, start in recorded.items():
    if pid != os.getpid() and pid in table and table[pid][1] == start:
      with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _watch(parent: int) -> None:
  """The guard's loop (runs in the guard process)."""
  stopping = []
  signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's.
  baseline = set(descendants(parent))
  recorded = {}
  while not stopping and os.getppid() == parent:
    for pid, start in descendants(parent).items():
      if pid not in baseline:
        recorded[pid] = start
    time.sleep(_PERIOD_S)
  _kill(recorded)


@contextlib.contextmanager
def guard() -> Iterator[None]:
  """Within the block, processes started below this one are SIGKILLed when
  this process dies, however it dies; on leaving the block, those still
  running are SIGKILLed too (leave it after stopping them cleanly)."""
  process = subprocess.Popen(
      [sys.executable, "-m", __spec__.name, str(os.getpid())],
      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
      cwd=_PROJECT_ROOT)
  try:
    time.sleep(2 * _PERIOD_S)  # Its baseline precedes what the block starts.
    yield
  finally:
    process.send_signal(signal.SIGTERM)
    try:
      process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()


if __name__ == "__main__":
  _watch(int(sys.argv[1]))
