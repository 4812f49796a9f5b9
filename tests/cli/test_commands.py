"""What every command shares (benchmark/cli/commands.py): one-line errors
and logs."""

import logging
import os
import subprocess
import sys

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
