"""The TFF worker process never outlives the code that started it."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_federated as tff

from benchmark.backends import tff_runtime
from benchmark.core.errors import TffWorkerDiedError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


@tff.federated_computation(tff.FederatedType(np.int32, tff.CLIENTS))
def _federated_sum(values):
  return tff.federated_sum(values)


def _alive(pid: int) -> bool:
  return pid in tff_runtime.worker_pids()


def _own_workers() -> set[int]:
  return set(tff_runtime.worker_pids(os.getpid()))


def test_worker_runs_inside_and_stops_after():
  # Only the worker this block starts counts: the conftest session check
  # reports any other worker left by another test.
  before = _own_workers()
  with tff_runtime.local_runtime():
    assert _federated_sum([1, 2, 3]) == 6
    started = _own_workers() - before
    assert len(started) == 1
  assert not any(_alive(pid) for pid in started)


def test_worker_stops_on_exception():
  before = _own_workers()
  with pytest.raises(ZeroDivisionError):
    with tff_runtime.local_runtime():
      started = _own_workers() - before
      assert len(started) == 1
      _ = 1 / 0
  assert not any(_alive(pid) for pid in started)


def test_released_default_context_refuses_to_run():
  tff_runtime.release_default_context()
  try:
    before = _own_workers()
    with pytest.raises(RuntimeError, match="local_runtime"):
      _federated_sum([1])
    assert _own_workers() <= before
  finally:  # Give later tests in this process TFF's ordinary default back.
    tff.backends.native.set_sync_local_cpp_execution_context()


def test_worker_dies_with_a_killed_parent(tmp_path):
  script = tmp_path / "hold_worker.py"
  script.write_text(
      "import os, time\n"
      "from benchmark.backends import tff_runtime\n"
      "with tff_runtime.local_runtime():\n"
      "  print(tff_runtime.worker_pids(os.getpid())[0], flush=True)\n"
      "  time.sleep(120)\n")
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  parent = subprocess.Popen([sys.executable, str(script)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
  try:
    worker = int(parent.stdout.readline())
    assert _alive(worker)
    parent.send_signal(signal.SIGKILL)  # No Python cleanup can run.
    parent.wait(timeout=30)
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
      time.sleep(0.1)
    assert not _alive(worker)
  finally:
    if parent.poll() is None:
      parent.kill()


def _kill_worker(runtime: tff_runtime.LocalRuntime) -> None:
  os.kill(runtime.worker_pid, signal.SIGKILL)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_a_worker_killed_while_idle_becomes_a_clear_error(sigint):
  """Also with SIGINT ignored, as in a command started with `&` by a script
  (the shell sets it so): the worker's death still interrupts the main
  thread, and SIGINT's handling is left as it was."""
  handler = (signal.SIG_IGN if sigint == "ignored"
             else signal.getsignal(signal.SIGINT))
  previous = signal.signal(signal.SIGINT, handler)
  try:
    with pytest.raises(TffWorkerDiedError, match="SIGKILL.*out of memory"):
      with tff_runtime.local_runtime() as runtime:
        _kill_worker(runtime)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # The watchdog interrupts this.
          time.sleep(0.05)
    assert not _alive(runtime.worker_pid)
    assert signal.getsignal(signal.SIGINT) is handler
  finally:
    signal.signal(signal.SIGINT, previous)


@pytest.mark.timeout(120)
def test_a_worker_killed_inside_code_that_wraps_exceptions_is_still_named():
  """The watchdog interrupts the main thread wherever it is; there, code
  that catches every Exception and raises its own (as TensorFlow does while
  it traces a function: a StagingError) must not hide the worker's death."""

  def library_call():
    try:
      deadline = time.monotonic() + 60
      while time.monotonic() < deadline:  # The watchdog interrupts this.
        time.sleep(0.05)
    except Exception as e:  # pylint: disable=broad-except
      raise RuntimeError("a library's own error") from e

  with pytest.raises(TffWorkerDiedError, match="SIGKILL.*out of memory"):
    with tff_runtime.local_runtime() as runtime:
      _kill_worker(runtime)
      library_call()
  assert not _alive(runtime.worker_pid)


class _SlowFinalizer:
  """An object whose finalizer runs for up to 10 s; `interrupted` records
  that something was raised in it (which Python then swallows)."""
  interrupted = False

  def __del__(self):
    deadline = time.monotonic() + 10
    try:
      while time.monotonic() < deadline:
        time.sleep(0.05)
    except BaseException:
      _SlowFinalizer.interrupted = True
      raise


@pytest.mark.timeout(120)
def test_a_worker_death_first_seen_inside_a_finalizer_still_ends_the_run(
    capfd):
  """The watchdog's interruption lands in a finalizer, where Python
  swallows it: it is sent again until taken, and the swallowed one prints
  nothing."""
  _SlowFinalizer.interrupted = False
  with pytest.raises(TffWorkerDiedError, match="SIGKILL"):
    with tff_runtime.local_runtime() as runtime:
      _kill_worker(runtime)
      finalized = _SlowFinalizer()
      del finalized  # The first interruption lands in its finalizer.
      deadline = time.monotonic() + 20
      while time.monotonic() < deadline:  # The next one interrupts this.
        time.sleep(0.05)
  assert _SlowFinalizer.interrupted
  assert "Exception ignored" not in capfd.readouterr().err


@pytest.mark.timeout(120)
def test_a_value_dropped_after_the_worker_died_prints_no_traceback(
    monkeypatch):
  """TFF disposes of a worker-side value when Python drops it (a finalizer,
  whose errors Python prints as "Exception ignored in ..." with a
  traceback); after the worker died, as when its error unwinds the run,
  that must stay silent. The watchdog is slowed down so that it does not
  interrupt this test first."""
  import gc  # pylint: disable=g-import-not-at-top
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
  monkeypatch.setattr(tff_runtime, "_WATCHDOG_PERIOD_S", 60.0)
  with tff_runtime.local_runtime() as runtime:
    session = runtime.session(num_clients=2)
    value = session.put(np.int32(1), tff.TensorType(np.int32))
    _kill_worker(runtime)
    del value
    gc.collect()
  assert [u.exc_value for u in unraisable] == []


@pytest.mark.timeout(120)
def test_a_tff_call_on_a_dead_worker_fails_instead_of_hanging():
  # TFF's own context retries a lost connection forever; the watchdog must
  # turn the blocked call into an error.
  with pytest.raises(TffWorkerDiedError, match=r"pid \d+\) died"):
    with tff_runtime.local_runtime() as runtime:
      assert _federated_sum([1, 2]) == 3
      _kill_worker(runtime)
      runtime_pid = runtime.worker_pid
      while _alive(runtime_pid):
        time.sleep(0.01)
      _federated_sum([1, 2])


@pytest.mark.timeout(120)
def test_a_session_call_on_a_dead_worker_is_a_clear_error():
  with pytest.raises(TffWorkerDiedError, match="SIGKILL"):
    with tff_runtime.local_runtime() as runtime:
      session = runtime.session(num_clients=2)
      total = session.call(_federated_sum, [np.int32(1), np.int32(2)])
      _kill_worker(runtime)
      while _alive(runtime.worker_pid):
        time.sleep(0.01)
      session.fetch(total, _federated_sum.type_signature.result)


def test_session_keeps_values_in_the_worker_until_fetched():
  with tff_runtime.local_runtime() as runtime:
    session = runtime.session(num_clients=3)
    total = session.call(_federated_sum, [np.int32(1), np.int32(2),
                                          np.int32(4)])
    assert not isinstance(total, (int, np.integer))  # A worker-side value.
    # Feed the worker-side result into another call without fetching it.
    doubled = session.call(_double_at_server, total)
    assert session.fetch(doubled, _double_at_server.type_signature.result) == 14
    pair = session.call(_pair_at_server, total, doubled)
    assert session.fetch(session.select(pair, 1),
                         _pair_at_server.type_signature.result[1]) == 14


@tff.tensorflow.computation(np.int32)
def _double(x):
  return x * 2


@tff.federated_computation(tff.FederatedType(np.int32, tff.SERVER))
def _double_at_server(x):
  return tff.federated_map(_double, x)


@tff.federated_computation(tff.FederatedType(np.int32, tff.SERVER),
                           tff.FederatedType(np.int32, tff.SERVER))
def _pair_at_server(a, b):
  return a, b
