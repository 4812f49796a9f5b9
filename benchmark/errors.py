"""One error type for bad user input, and the command-line wrapper that turns it
into a one-line message and a non-zero exit code instead of a traceback."""

import functools
import logging
import os
import signal
import sys
from typing import Callable, NoReturn


class FlairInputError(ValueError):
  """Bad input from the user: a flag, a file or a record.

  The message must name the flag, file or record and say what was expected;
  command-line entry points print it on one line and exit with status 1.
  """


class DownloadError(FlairInputError):
  """A download, unpack or verification step of download_dataset.py failed.

  The message is one line naming the URL, file or archive member and what to
  do; command-line use prints it as `error: <message>` and exits with status 1.
  """


class DownloadStopped(Exception):
  """A download or unpack worker saw its stop event set (another task failed
  or the user interrupted) and stopped quietly; the pipeline reports the first
  real error instead."""


class BackendDiedError(RuntimeError):
  """A process that runs FedAvg clients (the TFF worker, a Ray actor) died
  during a run, for instance killed by the kernel for lack of memory.
  Command-line entry points print it on one line and exit with status 1;
  rerunning a federated command resumes from its last checkpoint."""


class TffWorkerDiedError(BackendDiedError):
  """The TFF worker process died during a run (see `BackendDiedError`)."""


class OutputWriteError(RuntimeError):
  """An output file or directory could not be written: the disk is full, the
  file system is read-only, permission is denied or the device failed.

  The message names the path, the system's reason and what to do; nothing
  partial is left under the final name, so rerunning the same command after
  the cause is fixed resumes. Command-line entry points print it on one line
  and exit with status 1.
  """


class Terminated(SystemExit):
  """Raised in the main thread by SIGTERM (`install_sigterm_handler`); its
  `code` is the exit status, 128 + SIGTERM = 143."""


def _exit_on_sigterm(signum, frame) -> NoReturn:
  del frame
  raise Terminated(128 + signum)


def install_sigterm_handler() -> None:
  """Makes SIGTERM raise `Terminated(143)` (a `SystemExit`) so `finally`
  blocks and context managers (for instance the TFF worker shutdown) run
  before the process exits; `exit_on_input_error` then ends the process at
  once with status 143.

  Only effective when called from the main thread (a Python restriction).
  """
  signal.signal(signal.SIGTERM, _exit_on_sigterm)


# TFF's gRPC stub logs every retryable gRPC error at INFO with the whole
# exception text (a multi-line `debug_error_string` dump); when the TFF worker
# dies, that dump came before our one-line error.
_RETRYABLE_GRPC_LOG = "Received retryable gRPC error"


class _OneLineGrpcErrors(logging.Filter):
  """Shortens TFF's retryable-gRPC-error log records to one line (status
  code and the first line of the details)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if (isinstance(record.msg, str)
        and record.msg.startswith(_RETRYABLE_GRPC_LOG) and record.args):
      error = record.args[0] if isinstance(record.args, tuple) else None
      summary = str(error)
      try:
        summary = f"{error.code()}: {error.details()}"
      except Exception:  # pylint: disable=broad-except
        pass
      lines = summary.strip().splitlines()
      record.args = (lines[0] if lines else type(error).__name__,)
    return True


_GRPC_FILTER = _OneLineGrpcErrors()


def shorten_library_logs() -> None:
  """Makes library log records that dump whole gRPC errors one line long
  (absl's logger; idempotent)."""
  absl_logger = logging.getLogger("absl")
  if _GRPC_FILTER not in absl_logger.filters:
    absl_logger.addFilter(_GRPC_FILTER)


def exit_on_input_error(main: Callable) -> Callable:
  """Wraps an absl `main(argv)`: a `FlairInputError`, `OutputWriteError` or
  `BackendDiedError` becomes one line on stderr ("error: <message>") and exit
  status 1; Ctrl-C
  becomes exit status 130.

  Also installs `install_sigterm_handler()` and `shorten_library_logs()`,
  and on the way out releases
  TFF's default context when TFF was loaded (`tff_runtime`).
  """

  @functools.wraps(main)
  def wrapped(argv):
    install_sigterm_handler()
    shorten_library_logs()
    try:
      try:
        return main(argv)
      except (FlairInputError, OutputWriteError, BackendDiedError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
      except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
      finally:
        if "tensorflow_federated" in sys.modules:
          from benchmark import tff_runtime  # pylint: disable=g-import-not-at-top
          tff_runtime.release_default_context()
    except Terminated as e:
      # Every `finally` and context manager has run: what the run started
      # (TFF worker, Ray) is stopped and its files are complete. The
      # interpreter's own teardown is skipped: after a SIGTERM in the middle
      # of a TFF call, TFF's and gRPC's threads are still blocked, and
      # teardown then hung for minutes or crashed (SIGSEGV) in a loaded run.
      logging.shutdown()
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(e.code)

  return wrapped
