"""What a command's Python logging shows on the console, and its log file.

A command's console holds its progress bars, the suite's own messages
(absl INFO from the suite's modules: the settings that matter, where the
results go), every WARNING and ERROR, and the results. Everything logged,
the libraries' INFO included (TensorFlow's, TFF's, absl's), goes to the
command's log file, in absl's format: `LOG_FILE` in its results folder, or
`<output>.log` beside the data it writes (`log_place_from_flags`);
TensorFlow's C++ messages are routed by `stderr_filter`, to the same file.
absl's `--verbosity`, when given, brings the libraries' messages back to
the console (in absl's format, at the level it names).

`configure` sets this up once a command's flags are parsed
(`commands.entry_point`); `log_to` and `log_into` name the log file.
Until its directory is ready (a trainer's run directory holds its
`run.json`: the run has claimed it) the log is held in memory
(`stderr_filter.HeldLog`), and never written if it never gets ready: a
command refused for a bad flag leaves no file behind.
"""

import datetime
import logging
import os
import shlex
import sys
from typing import Optional

from absl import flags
from absl import logging as absl_logging
import tqdm

from benchmark.cli import stderr_filter
from benchmark.core import constants

LOG_FILE = constants.LOG_FILE
# The folders whose modules' INFO messages are the suite's own: the package
# and the top-level command scripts beside it.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PROJECT_DIR = os.path.dirname(_PACKAGE_DIR)
_OWN_SCRIPTS = frozenset(
    os.path.join(_PROJECT_DIR, name) for name in (
        "download_dataset.py", "prepare_tfrecords.py", "export_pfl_hdf5.py"))


def is_own(record: logging.LogRecord) -> bool:
  """Whether `record` was logged by the suite's own code."""
  path = os.path.abspath(record.pathname or "")
  return path.startswith(_PACKAGE_DIR + os.sep) or path in _OWN_SCRIPTS


class _ConsoleFormatter(logging.Formatter):
  """The suite's INFO messages as they are; warnings and errors with their
  level ("warning: ...", "error: ...")."""

  def format(self, record: logging.LogRecord) -> str:
    message = super().format(record)
    if record.levelno >= logging.ERROR:
      return f"error: {message}"
    if record.levelno >= logging.WARNING:
      return f"warning: {message}"
    return message


class ConsoleHandler(logging.Handler):
  """The quiet console: every WARNING and ERROR, and INFO of the suite's own
  modules (`is_own`), written above any progress bar (`tqdm.write`) to the
  console stream current at the time (`sys.stderr`)."""

  def __init__(self):
    super().__init__(logging.INFO)
    self.setFormatter(_ConsoleFormatter())

  def filter(self, record: logging.LogRecord) -> bool:
    return super().filter(record) and (record.levelno >= logging.WARNING
                                       or is_own(record))

  def emit(self, record: logging.LogRecord) -> None:
    try:
      tqdm.tqdm.write(self.format(record), file=sys.stderr)
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)


class LogFileHandler(logging.Handler):
  """Writes every record, in absl's format, to a log file once it is named
  and ready (`set_file`; `stderr_filter.HeldLog` holds them until then). A
  log file that cannot be written is given up with one warning on the
  console, never a traceback."""

  def __init__(self):
    super().__init__(logging.NOTSET)
    self.setFormatter(absl_logging.PythonFormatter())
    self._log = stderr_filter.HeldLog()

  @property
  def path(self) -> Optional[str]:
    """The log file, once named (None again if it was given up)."""
    return self._log.path

  def set_file(self, path: str, ready_path: str) -> None:
    """Writes to `path` (appending) from the moment `ready_path` exists."""
    self.acquire()
    try:
      self._log.set_file(path, ready_path,
                         _session_header().encode("utf-8"))
      self._warn_if_given_up(path)
    finally:
      self.release()

  def _warn_if_given_up(self, path: str) -> None:
    error, self._log.error = self._log.error, None
    if error is not None:
      print(f"warning: the log file {path} cannot be written "
            f"({error.strerror or error}); logging to it stopped",
            file=sys.stderr)

  def emit(self, record: logging.LogRecord) -> None:
    path = self._log.path
    self._log.write((self.format(record) + "\n").encode("utf-8"))
    self._warn_if_given_up(path)

  def close(self) -> None:
    """Writes what is held if the file got ready (at exit: a command whose
    directory appeared after its last record), then closes."""
    self.acquire()
    try:
      self._log.close()
    finally:
      self.release()
    super().close()


def _session_header() -> str:
  now = datetime.datetime.now(datetime.timezone.utc)
  argv = getattr(sys, "orig_argv", sys.argv)
  return (f"==== {now:%Y-%m-%d %H:%M:%S} UTC, pid {os.getpid()}: "
          f"{shlex.join(argv)}\n")


_log_file = LogFileHandler()
_configured = False

# The flags naming a command's output, in the order they are looked for:
# the first one a command defines places its log. Results folders hold it
# (`LOG_FILE` inside; a trainer's run directory is ready once it holds
# run.json); data a command writes keeps its bytes (the same inputs give
# the same files), so its log lies beside it, `<output>.log`.
OUTPUT_DIR_FLAGS = ("save_model_dir", "output_dir", "output_file",
                    "tfrecords_dir", "dataset_dir")
_LOG_BESIDE = frozenset({"output_file", "tfrecords_dir", "dataset_dir"})
_READY_FILE = {"save_model_dir": constants.RUN_IDENTITY_FILE}


def log_place_from_flags(flag_values: flags.FlagValues,
                         names: tuple[str, ...] = OUTPUT_DIR_FLAGS
                        ) -> tuple[Optional[str], Optional[str]]:
  """`(log file, path whose existence makes it ready)` from the first flag
  of `names` that `flag_values` defines; `(None, None)` when that flag is
  unset or none is defined."""
  for name in names:
    if name in flag_values:
      value = flag_values[name].value
      if not value:
        return None, None
      output = os.path.abspath(value)
      if name in _LOG_BESIDE:
        return output.rstrip(os.sep) + ".log", output
      ready = _READY_FILE.get(name)
      return (os.path.join(output, LOG_FILE),
              os.path.join(output, ready) if ready else output)
  return None, None


def log_to(path: str, ready_path: str) -> Optional[str]:
  """Sends the log (Python's records and the C++ lines of
  `stderr_filter`) to the file `path`, appended, from the moment
  `ready_path` exists; what was held so far goes first. Returns `path`;
  does nothing and returns None before `configure` (a command's `main`
  called in a test process). Naming the same file again changes nothing."""
  if not _configured:
    return None
  path = os.path.abspath(path)
  if path != _log_file.path:
    _log_file.set_file(path, ready_path)
    stderr_filter.log_to(path, ready_path)
  return path


def log_into(directory: str, ready_file: Optional[str] = None
            ) -> Optional[str]:
  """`log_to` `<directory>/LOG_FILE`, ready once the directory (or
  `<directory>/<ready_file>`) exists."""
  directory = os.path.abspath(directory)
  ready = os.path.join(directory, ready_file) if ready_file else directory
  return log_to(os.path.join(directory, LOG_FILE), ready)


def log_file_path() -> Optional[str]:
  """The log file named by `log_into`, or None."""
  return _log_file.path


def verbosity_given(flag_values: flags.FlagValues) -> bool:
  """Whether absl's --verbosity (-v) was given on the command line."""
  return "verbosity" in flag_values and flag_values["verbosity"].present > 0


def _quiet_library_handlers() -> None:
  """TensorFlow's logger prints to stderr itself when it was set up before
  any root handler (so every TensorFlow warning came twice); its records
  reach the root's handlers all the same."""
  tf_logger = logging.getLogger("tensorflow")
  for handler in list(tf_logger.handlers):
    if isinstance(handler, logging.StreamHandler) and not isinstance(
        handler, logging.FileHandler):
      tf_logger.removeHandler(handler)


def configure(flag_values: flags.FlagValues,
              log_dir_flags: tuple[str, ...] = OUTPUT_DIR_FLAGS) -> None:
  """Sets up the console and the log file of a command whose flags are
  parsed (absl's handler already on the root logger, `app.run`).

  Without --verbosity, absl's console handler gives way to `ConsoleHandler`;
  with it, absl's handler stays and C++ INFO and harmless messages are
  shown too (`stderr_filter.verbose`). Either way every record also goes to
  `LogFileHandler`, placed by the first of `log_dir_flags` that the
  command defines (`log_place_from_flags`; empty: the command calls
  `log_into` itself).
  """
  global _configured
  _configured = True
  root = logging.getLogger()
  _quiet_library_handlers()
  if verbosity_given(flag_values):
    stderr_filter.verbose()
    absl_logging.get_absl_handler().python_handler.stream = sys.stderr
  else:
    root.removeHandler(absl_logging.get_absl_handler())
    if not any(isinstance(h, ConsoleHandler) for h in root.handlers):
      root.addHandler(ConsoleHandler())
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
  if _log_file not in root.handlers:
    root.addHandler(_log_file)
  path, ready_path = log_place_from_flags(flag_values, log_dir_flags)
  if path:
    log_to(path, ready_path)
