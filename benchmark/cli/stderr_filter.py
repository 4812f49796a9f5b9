"""The commands' file descriptor 2: TensorFlow's C++ INFO and known-harmless
C++ messages go to the log file, everything else to the console.

TensorFlow, XLA and gRPC write their C++ log messages to file descriptor 2
directly, not through Python's `logging`: from the moment TensorFlow is
imported until after Python has shut down, and from the child processes
that inherit the descriptor. A command therefore points fd 2 at a pipe read
by a small filter process (this file run as a script, standard library
only), and points Python's `sys.stderr` at the console itself, so that
Python's own output (progress bars, warnings, the one-line errors) goes
straight to the console (`start`, called by the `benchmark` package when a
command imports it, before TensorFlow is imported).

The filter sends each line (`Router.route`):
* a C++ INFO message (`I`, in TensorFlow's or absl's prefix), and the
  continuation lines of the INFO messages in `_CONTINUATIONS`: log only;
* a C++ WARNING, ERROR or FATAL message whose source file and text are in
  `HARMLESS` (exact texts, each with the reason it is harmless): log only;
* anything else (other warnings and errors, lines without a C++ prefix):
  console, and log.
The log file is `log_to`'s; lines for it are held (at most `_HELD_LINES`)
until it is named and its directory is ready (a run's directory is made by
the run, after its flags are checked). `verbose` (absl's --verbosity given)
sends every line to the console too, held ones first.

Levels alone hide nothing but INFO: every WARNING and ERROR not matched
exactly reaches the console.
"""

import atexit
import collections
import dataclasses
import os
import re
import select
import signal
import subprocess
import sys
from typing import Optional, Sequence

# The prefix of TensorFlow's C++ messages ("2026-01-31 14:25:01.123456: E
# tensorflow/.../cuda_dnn.cc:9342] text") and of absl's and glog's
# ("E0131 14:25:01.123456  1234 file.cc:12] text").
_TF_PREFIX = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: ([IWEF]) (\S+?):\d+\] (.*)")
_ABSL_PREFIX = re.compile(
    r"([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ (\S+?):\d+\] (.*)")


@dataclasses.dataclass(frozen=True)
class Harmless:
  """A C++ message that is not a problem of the run.

  Attributes:
    source: the basename of the C++ file that logs it.
    text: the message after the prefix, matched whole (a regular
      expression; variable parts only where the message has them).
    reason: why it is harmless.
  """
  source: str
  text: str
  reason: str


_TWICE = ("TensorFlow 2.14 registers the CUDA plugins twice at import (its "
          "own and XLA's stream executor); the second registration is "
          "refused and the first one is used, with or without a GPU "
          "(tensorflow/tensorflow issue 62075)")

HARMLESS = (
    Harmless("cuda_dnn.cc", r"Unable to register cuDNN factory: Attempting "
             r"to register factory for plugin cuDNN when one has already "
             r"been registered", _TWICE),
    Harmless("cuda_fft.cc", r"Unable to register cuFFT factory: Attempting "
             r"to register factory for plugin cuFFT when one has already "
             r"been registered", _TWICE),
    Harmless("cuda_blas.cc", r"Unable to register cuBLAS factory: Attempting "
             r"to register factory for plugin cuBLAS when one has already "
             r"been registered", _TWICE),
    Harmless("py_utils.cc", r"TF-TRT Warning: Could not find TensorRT",
             "TensorRT is an optional inference library that the suite "
             "never uses"),
    Harmless("grappler_item_builder.cc",
             r"Failed to detect the fetch node\(s\), skipping this input",
             "TFF's MapReduceForm compiler runs Grappler on every piece of "
             "the round; the pieces without outputs (the empty secure-sum "
             "pieces) have nothing to fetch, Grappler declines them and TFF "
             "keeps them as they are (its INFO line: 'falling back to using "
             "non-optimized graph')"),
)
_HARMLESS_BY_SOURCE = collections.defaultdict(list)
for _entry in HARMLESS:
  _HARMLESS_BY_SOURCE[_entry.source].append(re.compile(_entry.text))

# Lines without a prefix that continue the INFO message before them.
_CONTINUATIONS = (
    # cpu_feature_guard.cc's message is two lines long.
    re.compile(r"To enable the following instructions: .*, in other "
               r"operations, rebuild TensorFlow with the appropriate "
               r"compiler flags\."),
)

CONSOLE = "console"
LOG = "log"

# What the command writes to fd 2 to steer the filter (never a C++ message:
# it starts with a NUL byte).
_CONTROL = b"\0flair-stderr-filter "
_HELD_LINES = 20000
# Seconds a line without its newline waits for the rest (a progress bar of a
# child process redrawn with "\r" is shown after at most this long).
_PARTIAL_WAIT_S = 0.1


def route(line: str) -> str:
  """Where one line (without its end of line) goes: `LOG` for C++ INFO
  messages and `HARMLESS` ones, `CONSOLE` for anything else (see the
  module docstring; continuation lines are the `Router`'s)."""
  match = _TF_PREFIX.fullmatch(line) or _ABSL_PREFIX.fullmatch(line)
  if match is None:
    return CONSOLE
  level, source, text = match.groups()
  if level == "I":
    return LOG
  for pattern in _HARMLESS_BY_SOURCE.get(os.path.basename(source), ()):
    if pattern.fullmatch(text):
      return LOG
  return CONSOLE


class Router:
  """Routes the lines of a stream, continuation lines with the message
  they continue (`_CONTINUATIONS`)."""

  def __init__(self):
    self._last = CONSOLE

  def route(self, line: str) -> str:
    if any(p.fullmatch(line) for p in _CONTINUATIONS):
      return self._last
    self._last = route(line)
    return self._last


class HeldLog:
  """A log file that is appended to from the moment a path exists, lines
  held until then (at most `_HELD_LINES`); used by the filter process and
  by `console.LogFileHandler`. A file that cannot be written is given up
  (`error` says why); its lines are then dropped."""

  def __init__(self):
    self.path = None
    self.error = None
    self._ready_path = None
    self._header = b""
    self._file = None
    self._held = collections.deque(maxlen=_HELD_LINES)

  def set_file(self, path: str, ready_path: str, header: bytes = b"") -> None:
    """Appends to `path` (after `header`, when it opens) once
    `ready_path` exists; held lines go first."""
    self.close()
    self.path, self._ready_path, self._header = path, ready_path, header
    self.error = None
    self.open_if_ready()

  def open_if_ready(self) -> None:
    if self._file is not None or self.path is None:
      return
    if not os.path.exists(self._ready_path):
      return
    try:
      self._file = open(self.path, "ab")  # pylint: disable=consider-using-with
      self._file.write(self._header + b"".join(self._held))
      self._file.flush()
    except OSError as e:
      self._give_up(e)
    self._held.clear()

  def _give_up(self, error: OSError) -> None:
    self.error, self.path, self._file = error, None, None

  def write(self, data: bytes) -> None:
    self.open_if_ready()
    if self._file is None:
      if self.path is not None or self._ready_path is None:
        self._held.append(data)
      return
    try:
      self._file.write(data)
      self._file.flush()
    except OSError as e:
      self._give_up(e)

  def close(self) -> None:
    """Writes what is held if the path got ready, then closes."""
    self.open_if_ready()
    if self._file is not None:
      try:
        self._file.close()
      except OSError:
        pass
      self._file = None


# --- The filter process -----------------------------------------------------


class _Filter:
  """The state of the filter process: the console (its fd 2), the log, the
  lines not shown (for `verbose`)."""

  def __init__(self):
    self._router = Router()
    self._verbose = False
    self._log = HeldLog()
    self._unshown = collections.deque(maxlen=_HELD_LINES)
    self._console_ok = True

  def _console(self, data: bytes) -> None:
    if not self._console_ok:
      return
    try:
      while data:
        data = data[os.write(2, data):]
    except OSError:  # The console is gone; keep draining the pipe.
      self._console_ok = False

  def _control(self, line: bytes) -> None:
    words = line[len(_CONTROL):].rstrip(b"\n").decode("utf-8", "replace")
    command, _, argument = words.partition(" ")
    if command == "log":
      ready_path, _, log_path = argument.partition("\t")
      self._log.set_file(log_path, ready_path)
    elif command == "verbose":
      self._verbose = True
      self._console(b"".join(self._unshown))
      self._unshown.clear()

  def line(self, data: bytes) -> None:
    """One piece of the stream: a line with its end ("\\n" or "\\r"), or a
    line cut short when the rest did not come in time."""
    if data.startswith(_CONTROL):
      self._control(data)
      return
    text = data.rstrip(b"\r\n").decode("utf-8", "replace")
    where = self._router.route(text) if text else CONSOLE
    if where == CONSOLE or self._verbose:
      self._console(data)
    else:
      self._unshown.append(data)
    if data.endswith(b"\n"):  # Not a progress bar's redraw.
      self._log.write(data)

  def finish(self) -> None:
    self._log.close()


_PIECE = re.compile(rb"[^\r\n]*(?:\r\n|\n|\r)")


def _serve(fd: int) -> None:
  """Filters what comes on `fd` until every writer has closed it."""
  state = _Filter()
  pending = b""
  while True:
    if pending:
      readable, _, _ = select.select([fd], [], [], _PARTIAL_WAIT_S)
      if not readable:
        state.line(pending)
        pending = b""
        continue
    data = os.read(fd, 65536)
    if not data:
      break
    pending += data
    end = 0
    for piece in _PIECE.finditer(pending):
      state.line(piece.group())
      end = piece.end()
    pending = pending[end:]
  if pending:
    state.line(pending)
  state.finish()


# --- In the command's process -----------------------------------------------


@dataclasses.dataclass
class _Started:
  process: subprocess.Popen
  console_fd: int


_started: Optional[_Started] = None
_COMMAND_SCRIPTS = ("download_dataset.py", "prepare_tfrecords.py",
                    "export_pfl_hdf5.py")
# Interpreter options that take the next argument as their value.
_OPTIONS_WITH_VALUE = ("-W", "-X", "--check-hash-based-pycs")


def is_command(orig_argv: Sequence[str]) -> bool:
  """Whether an interpreter started with `orig_argv` (`sys.orig_argv`) runs
  one of the suite's commands: `python -m benchmark.<command>`, a
  top-level command script (`prepare_tfrecords.py`, ..., by path or with
  `-m`) or a console script (`flair-...`). Not for `python -c`, the tests, notebooks, or the
  suite's helper processes (`benchmark.backends.*`)."""
  args = list(orig_argv[1:])
  while args:
    arg = args.pop(0)
    if arg == "-m" or (arg.startswith("-m") and not arg.startswith("--")):
      module = arg[2:] or (args[0] if args else "")
      parts = module.split(".")
      return ((len(parts) == 2 and parts[0] == "benchmark")
              or f"{module}.py" in _COMMAND_SCRIPTS)
    if arg in _OPTIONS_WITH_VALUE:
      args = args[1:]
    elif arg == "-c" or arg == "-":
      return False
    elif not arg.startswith("-"):
      name = os.path.basename(arg)
      return name in _COMMAND_SCRIPTS or name.startswith("flair-")
  return False


def start() -> bool:
  """Points fd 2 at a new filter process and `sys.stderr` at the console
  (this process's fd 2 before); idempotent. Child processes started later
  inherit the filtered fd 2. Returns whether the filter runs (False, and
  nothing changed, when it cannot be started)."""
  global _started
  if _started is not None:
    return True
  console_fd = read_end = write_end = None
  try:
    console_fd = os.dup(2)
    read_end, write_end = os.pipe()
    process = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, "-I", "-S", os.path.abspath(__file__)],
        stdin=read_end, stdout=subprocess.DEVNULL, stderr=console_fd,
        close_fds=True)
  except OSError:
    for fd in (console_fd, read_end, write_end):
      if fd is not None:
        os.close(fd)
    return False
  os.close(read_end)
  sys.stderr.flush()
  os.dup2(write_end, 2)
  os.close(write_end)
  os.set_inheritable(console_fd, False)
  sys.stderr = open(console_fd, "w", buffering=1, closefd=False,  # pylint: disable=consider-using-with
                    encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                    errors="backslashreplace")
  _started = _Started(process, console_fd)
  atexit.register(_stop)
  return True


def console_fd() -> int:
  """The console's file descriptor: the filter's output (and this
  process's fd 2 before `start`), or fd 2 when the filter does not run. A
  child process given it as its stderr writes to the console unfiltered."""
  return _started.console_fd if _started is not None else 2


def _send(command: str) -> None:
  if _started is not None:
    os.write(2, _CONTROL + command.encode("utf-8") + b"\n")


def log_to(log_path: str, ready_path: str) -> None:
  """Makes the filter write to `log_path` (appending) from the moment
  `ready_path` exists, held lines first."""
  _send(f"log {ready_path}\t{log_path}")


def verbose() -> None:
  """Makes the filter show every line on the console, held ones first."""
  _send("verbose")


def _stop() -> None:
  """At exit: fd 2 back to the console, and the filter given up to 5 s to
  write what it has (it ends when the last process holding the pipe
  does)."""
  if _started is None:
    return
  for stream in (sys.stdout, sys.stderr, sys.__stderr__):
    try:
      stream.flush()
    except (AttributeError, OSError, ValueError):
      pass
  os.dup2(_started.console_fd, 2)
  try:
    _started.process.wait(timeout=5)
  except subprocess.TimeoutExpired:
    pass


if __name__ == "__main__":
  # Ctrl-C and a SIGTERM to the process group are the command's to handle;
  # the filter ends when the pipe closes, after the command's last words.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  _serve(0)
