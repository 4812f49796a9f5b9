"""The one-line error helpers of benchmark.errors."""

import logging

from benchmark import errors


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
  errors.shorten_library_logs()
  errors.shorten_library_logs()  # Idempotent.
  with caplog.at_level(logging.INFO, logger="absl"):
    logging.getLogger("absl").info("Received retryable gRPC error: %s",
                                   _FakeRpcError())
  [record] = caplog.records
  assert record.getMessage() == ("Received retryable gRPC error: "
                                 "StatusCode.UNAVAILABLE: failed to connect "
                                 "to all addresses")
  assert "debug_error_string" not in caplog.text
