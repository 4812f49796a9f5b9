"""A command run the way a user runs it, for the tests that need a real
process (a SIGKILL, a SIGTERM): its environment and working directory,
waiting for a state of its run directory, killing it there and checking
that nothing it started outlives it; and absl's INFO logs of a command run
in the test process (`flag_harness`), to read what a rerun says it resumed.
"""

import contextlib
import logging
import os
import signal
import subprocess
import time
from typing import Callable, Optional

from absl import logging as absl_logging

from benchmark.backends import process_guard
import round_harness

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env() -> dict[str, str]:
  """This environment with the repository on PYTHONPATH and TensorFlow's
  C++ logs below warnings."""
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  return env


def wait_for(predicate: Callable[[], bool], process: subprocess.Popen,
             timeout_s: float, poll_s: float = 0.2) -> bool:
  """Polls `predicate` every `poll_s` until it holds (True), `process` has
  ended (whatever `predicate` says then) or `timeout_s` has passed
  (False)."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if predicate():
      return True
    if process.poll() is not None:
      return predicate()
    time.sleep(poll_s)
  return False


def kill_when(command: list[str], predicate: Callable[[], bool],
              timeout_s: float,
              check: Optional[Callable[[int, dict[int, str]], None]] = None
             ) -> dict[int, str]:
  """Runs `command` (in the repository, `subprocess_env`), SIGKILLs it as
  soon as `predicate()` holds (polled every 10 ms: the states the tests
  wait for last a second or more) and waits until every process it had
  started has stopped too (30 s at most). `check(pid, started)`, when
  given, runs just before the kill (e.g. that a worker was started).

  Returns:
    The processes it had started (`process_guard.descendants`) when killed.

  Raises:
    AssertionError: `predicate` never held (the command ended or
      `timeout_s` passed first), or a process it started still runs.
  """
  process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=subprocess_env(),
                             cwd=REPO_ROOT)
  try:
    reached = wait_for(predicate, process, timeout_s, poll_s=0.01)
    started = process_guard.descendants(process.pid)
    if reached and check is not None:
      check(process.pid, started)
    process.kill()  # SIGKILL: no clean-up code runs at all.
    process.wait()
    assert reached and process.returncode == -signal.SIGKILL, (
        f"state reached: {reached}; exit status {process.returncode} (the "
        f"command ended first, or the state took over {timeout_s} s)")
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  deadline = time.monotonic() + 30
  while round_harness.alive(started) and time.monotonic() < deadline:
    time.sleep(0.5)
  left = round_harness.alive(started)
  assert not left, f"process(es) {left} outlived the killed run"
  return started


@contextlib.contextmanager
def absl_info_logs(caplog):
  """Records absl's INFO logs in `caplog` inside the block, as the command
  logs them to stderr (its --verbosity is 0, INFO; in a test process absl's
  verbosity stays at WARNING unless set)."""
  caplog.set_level(logging.INFO)
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.INFO)
  try:
    yield
  finally:
    absl_logging.set_verbosity(verbosity)
