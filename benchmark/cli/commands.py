"""What every command shares: its `main` wrapped so that errors are one line
and SIGTERM or Ctrl-C end it cleanly, positional arguments refused (except
by commands that take paths), a quiet console with a log file
(`cli.console`), and its console-script entry point."""

import functools
import gc
import logging
import os
import signal
import sys
import threading
from typing import Callable, NoReturn, Optional, Sequence

from absl import app
from absl import flags

from benchmark.cli import console
from benchmark.core import errors


class Terminated(SystemExit):
  """Raised in the main thread by SIGTERM (`install_sigterm_handler`); its
  `code` is the exit status, 128 + SIGTERM = 143."""


# Seconds a SIGTERM'd command has to stop cleanly before it exits anyway.
SIGTERM_GRACE_S = 60
# Seconds before a SIGTERM that arrived inside a finalizer is delivered again.
_REDELIVERY_DELAY_S = 0.05


def _exit_now(code: int) -> NoReturn:
  """Ends the process at once with `code`, logs and streams flushed."""
  logging.shutdown()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


def _in_finalizer(frame) -> bool:
  """Whether `frame` (or a caller of it) is a garbage-collector callback or
  a `__del__`: Python prints and drops any exception raised there ("Exception
  ignored in ..."), so a `Terminated` raised there would never stop the
  command (jax, which TFF imports, runs a gc callback at every collection)."""
  callbacks = {getattr(c, "__code__", None) for c in gc.callbacks}
  while frame is not None:
    if frame.f_code in callbacks or frame.f_code.co_name == "__del__":
      return True
    frame = frame.f_back
  return False


def _deliver_again(signum: int) -> None:
  """Sends `signum` to this process again shortly, from a timer thread."""
  timer = threading.Timer(_REDELIVERY_DELAY_S, os.kill,
                          args=(os.getpid(), signum))
  timer.daemon = True
  timer.start()


def _exit_on_sigterm(signum, frame) -> None:
  """Raises `Terminated` in the main thread. Inside a finalizer, where it
  would be dropped, the signal is delivered again instead, to land outside
  it. If the exception has not ended the process within `SIGTERM_GRACE_S`,
  a timer thread ends it with the same status (a run's helper processes
  are stopped even then, by `backends.process_guard`)."""
  if _in_finalizer(frame):
    _deliver_again(signum)
    return
  timer = threading.Timer(SIGTERM_GRACE_S, _exit_now, args=(128 + signum,))
  timer.daemon = True
  timer.start()
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


def exit_on_input_error(main: Optional[Callable] = None, *,
                        positional_args: bool = False) -> Callable:
  """Wraps an absl `main(argv)` for the command line.

  Positional arguments are refused (`reject_positional_args`) unless
  `positional_args` (then `main` reads them from `argv[1:]`); a
  `FlairInputError`, `OutputWriteError` or `BackendDiedError` becomes one
  line on stderr ("error: <message>") and exit status 1; Ctrl-C becomes exit
  status 130 and SIGTERM 143 (`install_sigterm_handler`), after every
  `finally` has run. Also shortens library log records
  (`shorten_library_logs`) and, on the way out, releases TFF's default
  context when TFF was loaded (`backends.tff_runtime`).

  Use as `@exit_on_input_error` or
  `@exit_on_input_error(positional_args=True)`.
  """
  if main is None:
    return functools.partial(exit_on_input_error,
                             positional_args=positional_args)

  @functools.wraps(main)
  def wrapped(argv):
    install_sigterm_handler()
    shorten_library_logs()
    try:
      try:
        if not positional_args:
          reject_positional_args(argv)
        return main(argv)
      except (errors.FlairInputError, errors.OutputWriteError,
              errors.BackendDiedError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
      except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
      finally:
        if "tensorflow_federated" in sys.modules:
          from benchmark.backends import tff_runtime  # pylint: disable=g-import-not-at-top
          tff_runtime.release_default_context()
    except Terminated as e:
      # Every `finally` and context manager has run: what the run started
      # (TFF worker, Ray) is stopped and its files are complete. The
      # interpreter's own teardown is skipped: after a SIGTERM in the middle
      # of a TFF call, TFF's and gRPC's threads are still blocked, and
      # teardown then hung for minutes or crashed (SIGSEGV) in a loaded run.
      _exit_now(e.code)

  return wrapped


def reject_positional_args(argv: Sequence[str]) -> None:
  """Raises `errors.FlairInputError` when `argv` (absl's, program name
  first) holds anything but the program name: every setting is a --flag."""
  if len(argv) > 1:
    raise errors.FlairInputError(
        f"unexpected positional arguments: {' '.join(argv[1:])} (all "
        "settings are --flags)")


def entry_point(define_flags: Callable[[], None],
                main: Callable[[list[str]], None],
                log_dir_flags: tuple[str, ...] = console.OUTPUT_DIR_FLAGS
               ) -> Callable[[], None]:
  """A command's console-script entry point (`run`): defines the command's
  flags when called, not at import, then runs `main` under absl, with the
  console and log file set up once the flags are parsed
  (`console.configure`: the log goes to the folder named by the first of
  `log_dir_flags` the command defines; `()`: the command names it with
  `console.log_into`)."""

  def configured_main(argv: list[str]) -> None:
    console.configure(flags.FLAGS, log_dir_flags)
    return main(argv)

  def run() -> None:
    define_flags()
    app.run(configured_main)

  return run
