"""What every command shares (benchmark/cli/commands.py): one-line errors
and logs."""

import gc
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from benchmark.cli import commands


class _FakeRpcError(Exception):
  """What TFF's gRPC stub logs when the worker is gone (a grpc.RpcError)."""

  def code(self):
    return "StatusCode.UNAVAILABLE"

  def details(self):
    return "failed to connect to all addresses\nmore"

  def __str__(self):
    return ("<_InactiveRpcError of RPC that terminated with:\n"
            "\tdebug_error_string = \"UNKNOWN:Error received from peer ...\">")


def test_retryable_grpc_errors_are_logged_on_one_line(caplog):
  commands.shorten_library_logs()
  commands.shorten_library_logs()  # Idempotent.
  with caplog.at_level(logging.INFO, logger="absl"):
    logging.getLogger("absl").info("Received retryable gRPC error: %s",
                                   _FakeRpcError())
  [record] = caplog.records
  assert record.getMessage() == ("Received retryable gRPC error: "
                                 "StatusCode.UNAVAILABLE: failed to connect "
                                 "to all addresses")
  assert "debug_error_string" not in caplog.text


def test_importing_the_suite_leaves_no_tff_traceback_at_exit():
  # TFF 0.87's default context prints "Exception ignored in ...
  # ServiceManager.__del__" with a traceback at interpreter exit unless the
  # package releases it first (benchmark/__init__.py).
  repo_root = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
  result = subprocess.run(
      [sys.executable, "-c", "import benchmark.data.pipeline"], cwd=repo_root,
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  assert "Exception ignored" not in result.stderr, result.stderr[-2000:]


def test_a_sigterm_inside_a_gc_callback_is_delivered_again(monkeypatch):
  """Python drops exceptions raised in garbage-collector callbacks (jax,
  imported by TFF, runs one at every collection): a SIGTERM whose handler
  runs there is delivered again rather than raising `Terminated` into the
  void, which left a SIGTERM'd run training on. Outside one it raises, and
  arms the exit that ends a command whose `Terminated` got lost anyway."""
  resent, exits = [], []
  monkeypatch.setattr(commands, "_deliver_again", resent.append)
  monkeypatch.setattr(commands, "_exit_now", exits.append)
  monkeypatch.setattr(commands, "SIGTERM_GRACE_S", 0.01)

  def callback(phase, info):
    del phase, info
    commands._exit_on_sigterm(signal.SIGTERM, sys._getframe())  # pylint: disable=protected-access

  gc.callbacks.append(callback)
  try:
    gc.collect()
  finally:
    gc.callbacks.remove(callback)
  assert resent == [signal.SIGTERM, signal.SIGTERM]  # Start, stop.
  with pytest.raises(commands.Terminated) as info:
    commands._exit_on_sigterm(signal.SIGTERM, sys._getframe())  # pylint: disable=protected-access
  assert info.value.code == 128 + signal.SIGTERM
  deadline = time.monotonic() + 10
  while not exits and time.monotonic() < deadline:
    time.sleep(0.01)
  assert exits == [128 + signal.SIGTERM]
