"""A TFF local runtime whose executor process never outlives the run.

TFF 0.87 executes computations in a separate C++ process,
`tensorflow_federated/data/worker_binary`, which its default context starts
lazily, lets inherit our stdout/stderr, and stops only from a `__del__`; it was
seen still running after Python exited, holding the caller's output pipe open
(docs/tff_runtime.md). Here we start that worker ourselves and always stop it:

* `local_runtime()` starts the worker with its output sent to a log file (or
  discarded), asks the kernel to kill it if our process dies
  (`PR_SET_PDEATHSIG`, so even `kill -9` of the parent takes it along),
  installs a TFF sync execution context that talks to it, and stops it on
  exit of the `with` block, whether by success, exception, Ctrl-C or (with
  `errors.install_sigterm_handler()`) SIGTERM.
* `LocalRuntime.session(num_clients)` (from the object `local_runtime()`
  yields) runs computations whose results may *stay in the worker*: the sync
  context sends every argument to the worker and every result back, which for
  a FedAvg state (ResNet-18 plus server Adam: about 3 x 11M float32) costs
  seconds per round in gRPC and (de)serialization. `WorkerSession` keeps such
  values in the worker as `tff.framework` remote values and fetches only what
  is asked for.
* A watchdog turns a worker that dies during the run (for instance killed by
  the kernel for lack of memory) into `errors.TffWorkerDiedError`, instead of
  TFF's context retrying a dead connection forever.
* `stop_worker_children()` is a safety net that stops any `worker_binary`
  child of this process, for instance one TFF's default context started.
* `release_default_context()` replaces TFF's default context (created at
  import, holding a worker manager that is only cleaned up from `__del__`)
  with one that refuses to run anything outside `local_runtime()`. Called at
  the end of every command (errors.exit_on_input_error), it lets TFF's
  manager be collected while the interpreter is intact, instead of printing
  "Exception ignored in ... ServiceManager.__del__" at exit.

Linux only (it uses prctl and /proc).
"""

import asyncio
import contextlib
import ctypes
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Iterator, Optional

from absl import logging
import grpc
import portpicker
import tensorflow_federated as tff

# Two pieces TFF 0.87 keeps in internal modules (TFF is pinned to 0.87 in
# requirements.txt): the class of the worker-side values `RemoteExecutor`
# returns, and the conversion of computed structures back to the Python
# containers of their type, which TFF's own execution context applies to
# every result.
from tensorflow_federated.python.core.impl.executors import remote_executor
from tensorflow_federated.python.core.impl.types import type_conversions

from benchmark.core.errors import TffWorkerDiedError

WORKER_BINARY_NAME = "worker_binary"
_PR_SET_PDEATHSIG = 1
_READY_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 10.0
_WATCHDOG_PERIOD_S = 0.5
# How often the watchdog interrupts the main thread again until
# `local_runtime()` has taken the interruption (see `_Watchdog`).
_WATCHDOG_RESEND_S = 2.0
# The signal the watchdog interrupts the main thread with (see `_Watchdog`).
_WATCHDOG_SIGNAL = signal.SIGUSR2
# After a call to the worker fails: how long to wait for the worker to have
# exited before taking the failure for something other than its death (a
# worker killed mid-call is gone within milliseconds; this covers a loaded
# machine).
_FAILED_CALL_GRACE_S = 2.0
_GRPC_OPTIONS = [
    ("grpc.max_message_length", 2_000_000_000),
    ("grpc.max_receive_message_length", 2_000_000_000),
    ("grpc.max_send_message_length", 2_000_000_000),
]


def worker_binary_path() -> str:
  """Returns the path of TFF's `worker_binary` inside the installed package."""
  package_dir = os.path.dirname(os.path.abspath(tff.__file__))
  return os.path.join(package_dir, "data", WORKER_BINARY_NAME)


def _die_with_parent() -> None:
  """Runs in the child before exec: SIGKILL it when the parent thread dies."""
  libc = ctypes.CDLL(None, use_errno=True)
  libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _stop_process(process: subprocess.Popen) -> None:
  if process.poll() is not None:
    return
  process.send_signal(signal.SIGINT)
  try:
    process.wait(timeout=_STOP_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    process.kill()
    process.wait()


def worker_pids(parent_pid: Optional[int] = None) -> list[int]:
  """Pids of running `worker_binary` processes (children of `parent_pid` when
  given). Reads /proc; returns [] where /proc is unavailable."""
  pids = []
  for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        argv0 = f.read().split(b"\0", 1)[0].decode(errors="replace")
      with open(f"/proc/{entry}/stat", "rb") as f:
        stat = f.read().decode(errors="replace")
    except OSError:
      continue
    if os.path.basename(argv0) != WORKER_BINARY_NAME:
      continue
    if "tensorflow_federated" not in argv0:
      continue
    state = stat.rsplit(")", 1)[1].split()
    if state[0] == "Z":  # A zombie is already dead.
      continue
    if parent_pid is None or int(state[1]) == parent_pid:
      pids.append(int(entry))
  return pids


def stop_worker_children() -> list[int]:
  """Stops every `worker_binary` that is a child of this process.

  Returns:
    The pids that were stopped.
  """
  pids = worker_pids(os.getpid())
  for pid in pids:
    with contextlib.suppress(ProcessLookupError):
      os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
      os.waitpid(pid, 0)
  return pids


class _RequireLocalRuntime(tff.framework.SyncContext):
  """A default context that runs nothing: computations belong inside
  `local_runtime()`, whose worker is stopped on exit."""

  def invoke(self, comp, arg):
    del comp, arg
    raise RuntimeError(
        "a TFF computation ran outside benchmark.tff_runtime.local_runtime(); "
        "wrap it in `with tff_runtime.local_runtime():`")


def release_default_context() -> None:
  """Replaces TFF's default execution context with one that refuses to run.

  TFF's default context (installed at `import tensorflow_federated`) owns a
  `worker_binary` manager that is stopped only from `__del__`; dropping it
  here, while the interpreter is intact, stops any worker it started and
  avoids its failing `__del__` at interpreter exit.
  """
  tff.framework.get_context_stack().set_default_context(_RequireLocalRuntime())


def _exit_description(returncode: int) -> str:
  if returncode < 0:
    try:
      return f"signal {signal.Signals(-returncode).name}"
    except ValueError:
      return f"signal {-returncode}"
  return f"exit status {returncode}"


def _exited(process: subprocess.Popen, grace_s: float) -> bool:
  """Whether `process` has exited, waiting up to `grace_s` seconds for that.
  (`Popen.poll()` answers "running" while the watchdog thread is reaping
  the process, so a blocking wait is what tells after a failed call.)"""
  try:
    process.wait(timeout=grace_s)
  except subprocess.TimeoutExpired:
    return False
  return True


class _WorkerDied(BaseException):
  """Raised in the main thread by the watchdog's signal handler, wherever
  that thread is; `local_runtime()` turns it into `TffWorkerDiedError`. A
  BaseException, as KeyboardInterrupt is, so that code which catches and
  re-raises every Exception as its own (TensorFlow's tracing wraps one
  raised while it traces a function in a StagingError, for instance) lets
  it through unchanged."""


class _Watchdog:
  """Interrupts the main thread when the worker process exits on its own.

  A blocked TFF call on a dead worker never returns (TFF's context retries
  the lost connection forever, while the main thread waits on a lock). The
  watchdog sends `_WATCHDOG_SIGNAL` to the main thread, whose handler (set
  here for the life of the watchdog) raises `_WorkerDied` there. Not
  SIGINT: a command started in the background by a non-interactive
  shell (`cmd &` in a script, nohup) inherits SIGINT ignored, and then the
  interruption would be lost and the run would hang. Created off the main
  thread (where no handler can be set), it sends SIGINT, which wakes the
  main thread as Ctrl-C would (KeyboardInterrupt); `local_runtime()` turns
  that into `TffWorkerDiedError` too.

  The main thread may be running a finalizer or a garbage-collection
  callback when the signal arrives; Python then swallows the exception
  (printing "Exception ignored in ..."). So the watchdog interrupts again
  every `_WATCHDOG_RESEND_S` until `local_runtime()` acknowledges it
  (`taken()`), and while it runs, `sys.unraisablehook` drops a swallowed
  `_WorkerDied` silently.
  """

  def __init__(self, process: subprocess.Popen, log_path: Optional[str]):
    self._process = process
    self._log_path = log_path
    self._stopped = threading.Event()
    self._taken = threading.Event()
    self.fired = False
    self._previous_handler = None
    self._previous_unraisablehook = None
    self._signal = signal.SIGINT
    if threading.current_thread() is threading.main_thread():
      self._signal = _WATCHDOG_SIGNAL
      self._previous_handler = signal.signal(_WATCHDOG_SIGNAL,
                                             self._on_signal)
      self._previous_unraisablehook = sys.unraisablehook
      sys.unraisablehook = self._on_unraisable
    self._thread = threading.Thread(target=self._watch, daemon=True,
                                    name="tff-worker-watchdog")
    self._thread.start()

  def _on_signal(self, signum, frame) -> None:
    del signum, frame
    # Not a stray signal from elsewhere, nor one sent before the last was
    # taken.
    if self.fired and not self._taken.is_set():
      raise _WorkerDied()

  def _on_unraisable(self, unraisable) -> None:
    if not isinstance(unraisable.exc_value, _WorkerDied):
      self._previous_unraisablehook(unraisable)

  def _watch(self) -> None:
    while not self._stopped.wait(_WATCHDOG_PERIOD_S):
      if self._process.poll() is not None:
        self.fired = True
        while not (self._stopped.is_set() or self._taken.is_set()):
          signal.pthread_kill(threading.main_thread().ident, self._signal)
          self._taken.wait(_WATCHDOG_RESEND_S)
        return

  def taken(self) -> None:
    """Called where the interruption arrived: no more are sent."""
    self._taken.set()

  def stop(self) -> None:
    self._stopped.set()
    self._thread.join()
    if self._previous_handler is not None:
      signal.signal(_WATCHDOG_SIGNAL, self._previous_handler)
      self._previous_handler = None
    if self._previous_unraisablehook is not None:
      sys.unraisablehook = self._previous_unraisablehook
      self._previous_unraisablehook = None

  def error(self) -> TffWorkerDiedError:
    returncode = self._process.poll()
    hint = ""
    if returncode == -signal.SIGKILL:
      hint = (" (SIGKILL usually means the system ran out of memory: try a "
              "smaller --clients_per_round, --max_elements_per_client or crop)")
    log = f"; its log: {self._log_path}" if self._log_path else ""
    return TffWorkerDiedError(
        f"the TFF worker process (pid {self._process.pid}) died during the run "
        f"with {_exit_description(returncode)}{hint}{log}")


class _WorkerStub(tff.framework.RemoteExecutorGrpcStub):
  """TFF's gRPC stub to the worker, except that disposing of values on a
  worker that has exited does nothing. TFF disposes of a remote value when
  Python drops it (a finalizer); values dropped while a dead worker's error
  unwinds the stack would each print the failed call's traceback ("Exception
  ignored in ... finalize") below the run's one-line error."""

  def __init__(self, channel, process: subprocess.Popen):
    super().__init__(channel)
    self._process = process

  def dispose(self, request):
    try:
      return super().dispose(request)
    except Exception:  # pylint: disable=broad-except
      if not _exited(self._process, _FAILED_CALL_GRACE_S):
        raise
      return None  # Nothing left to free.


class WorkerSession:
  """Runs TFF computations on the local worker, keeping results there.

  Values are `tff.framework` remote values (`RemoteValue`s) that live in the
  worker until fetched or dropped (dropping one frees it in the worker).
  Every computation must run with the same number of clients, fixed here.
  Obtain one from `LocalRuntime.session()`; all methods block.
  """

  def __init__(self, stub, num_clients: int, check_alive):
    self._check_alive = check_alive
    # Dispose of every dropped value at once: a FedAvg state is hundreds of MB.
    self._executor = tff.framework.RemoteExecutor(stub, dispose_batch_size=1)
    self._executor.set_cardinalities({tff.CLIENTS: num_clients})
    self._functions = {}

  def _run(self, coroutine) -> Any:
    try:
      return asyncio.run(coroutine)
    except Exception:
      self._check_alive()
      raise

  def put(self, value, type_spec):
    """Sends a Python value of TFF type `type_spec` to the worker.

    Args:
      value: a value as TFF's context accepts it (numpy arrays, Python
        containers; TF tensors and variables are converted to numpy).
      type_spec: its `tff.Type`.

    Returns:
      The worker-side value.
    """
    value = tff.tensorflow.transform_args(value)
    return self._run(self._executor.create_value(value, type_spec))

  def _function(self, comp: tff.Computation):
    # Keyed by identity; the entry keeps `comp` alive so its id stays unique.
    key = id(comp)
    if key not in self._functions:
      compiled = tff.backends.native.desugar_and_transform_to_native(comp)
      self._functions[key] = (comp, self._run(self._executor.create_value(
          compiled, compiled.type_signature)))
    return self._functions[key][1]

  def call(self, comp: tff.Computation, *args):
    """Calls `comp` on the worker; its result stays there.

    Args:
      comp: a TFF computation; compiled and sent once per session.
      *args: its arguments, each a worker-side value (from `put`, `call` or
        `select`) or a Python value (sent with the parameter's type).

    Returns:
      The worker-side result, of type `comp.type_signature.result`.
    """
    function = self._function(comp)
    parameter = comp.type_signature.parameter
    if not args:
      arg = None
    elif len(args) == 1:
      arg = self._ingest(args[0], parameter)
    else:
      elements = tff.structure.to_elements(parameter)
      if len(elements) != len(args):
        raise TypeError(f"{len(args)} arguments given, {parameter} expected")
      arg = self._run(self._executor.create_struct(tff.structure.Struct(
          [(name, self._ingest(value, type_spec))
           for (name, type_spec), value in zip(elements, args)])))
    return self._run(self._executor.create_call(function, arg))

  def _ingest(self, value, type_spec):
    if isinstance(value, remote_executor.RemoteValue):
      return value
    return self.put(value, type_spec)

  def select(self, value, index: int):
    """The worker-side element `index` of a worker-side struct."""
    return self._run(self._executor.create_selection(value, index))

  def fetch(self, value, type_spec) -> Any:
    """Computes a worker-side value and returns it as Python values (numpy
    arrays in the Python containers of `type_spec`, its TFF type)."""
    result = self._run(value.compute())
    return tff.tensorflow.transform_result(
        type_conversions.type_to_py_container(result, type_spec))

  def close(self) -> None:
    """Frees everything this session holds in the worker."""
    self._functions.clear()
    self._executor.close()


class LocalRuntime:
  """What `local_runtime()` yields: the running worker."""

  def __init__(self, stub, process: subprocess.Popen, watchdog: _Watchdog):
    self._stub = stub
    self._process = process
    self._watchdog = watchdog
    self._sessions = []

  @property
  def worker_pid(self) -> int:
    return self._process.pid

  def check_alive(self, grace_s: float = 0.0) -> None:
    """Raises `TffWorkerDiedError` if the worker process has exited, waiting
    up to `grace_s` seconds for that (`_exited`)."""
    if _exited(self._process, grace_s):
      raise self._watchdog.error()

  def session(self, num_clients: int) -> WorkerSession:
    """A `WorkerSession` for computations over `num_clients` clients."""
    session = WorkerSession(
        self._stub, num_clients,
        functools.partial(self.check_alive, _FAILED_CALL_GRACE_S))
    self._sessions.append(session)
    return session

  def close(self) -> None:
    """Closes every session (their values are then released with no call to
    the worker, which is about to stop)."""
    for session in self._sessions:
      session.close()  # TFF ignores the RPC error of a dead worker here.
    self._sessions.clear()


def _start_worker(log_file, max_concurrent_computation_calls: int
                 ) -> tuple[subprocess.Popen, int]:
  """Starts TFF's worker on a free port, its output to `log_file`, killed by
  the kernel if this process dies; returns `(process, port)`."""
  port = portpicker.pick_unused_port()
  process = subprocess.Popen(
      [worker_binary_path(), f"--port={port}",
       f"--max_concurrent_computation_calls={max_concurrent_computation_calls}"],
      stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
      preexec_fn=_die_with_parent)
  return process, port


def _wait_until_ready(stub, process: subprocess.Popen) -> None:
  """Waits for the worker to serve (RuntimeError if it exits at start-up
  or is not ready within `_READY_TIMEOUT_S`)."""
  deadline = time.monotonic() + _READY_TIMEOUT_S
  while not stub.is_ready:
    if process.poll() is not None:
      raise RuntimeError(
          f"TFF worker exited at start-up with status {process.returncode}")
    if time.monotonic() > deadline:
      raise RuntimeError("TFF worker was not ready within "
                         f"{_READY_TIMEOUT_S:.0f} s")
    time.sleep(0.05)


def _execution_context(stub, default_num_clients: int):
  """A TFF sync execution context whose executors call the worker."""

  def stack_fn(cardinalities):
    if cardinalities.get(tff.CLIENTS) is None:
      cardinalities[tff.CLIENTS] = default_num_clients
    executor = tff.framework.RemoteExecutor(stub)
    executor.set_cardinalities(cardinalities)
    return executor

  return tff.framework.SyncExecutionContext(
      executor_fn=tff.framework.ResourceManagingExecutorFactory(stack_fn),
      compiler_fn=tff.backends.native.desugar_and_transform_to_native,
      transform_args=tff.tensorflow.transform_args,
      transform_result=tff.tensorflow.transform_result)


@contextlib.contextmanager
def _runtime_in_context(stub, process: subprocess.Popen, watchdog: _Watchdog,
                        default_num_clients: int) -> Iterator[LocalRuntime]:
  """Yields a `LocalRuntime` with the worker's context installed; a dead
  worker's interruption or error becomes `TffWorkerDiedError`."""
  runtime = LocalRuntime(stub, process, watchdog)
  context = _execution_context(stub, default_num_clients)
  with tff.framework.get_context_stack().install(context):
    try:
      yield runtime
    except (KeyboardInterrupt, TffWorkerDiedError, _WorkerDied) as e:
      if watchdog.fired or process.poll() is not None:
        watchdog.taken()
        raise watchdog.error() from (
            None if isinstance(e, _WorkerDied) else e)
      raise
    finally:
      runtime.close()


@contextlib.contextmanager
def local_runtime(log_path: Optional[str] = None,
                  default_num_clients: int = 0,
                  max_concurrent_computation_calls: Optional[int] = None
                 ) -> Iterator[LocalRuntime]:
  """Runs TFF computations in a worker process that is stopped on exit.

  Args:
    log_path: where the worker's stdout and stderr go (appended); `None`
      discards them.
    default_num_clients: cardinality used when TFF cannot infer the number of
      clients from a computation's arguments.
    max_concurrent_computation_calls: how many calls of one computation (for
      instance clients training) the worker runs at once; None for the
      number of CPU cores this process may use (TFF's default, unlimited,
      oversubscribes the cores: docs/performance.md).

  Yields:
    A `LocalRuntime`; inside the block `tff` computations run on the started
    worker through TFF's context, and `LocalRuntime.session()` gives
    computations whose results can stay in the worker.

  Raises:
    RuntimeError: if the worker binary is missing, exits at start-up, or is
      not ready within 60 seconds.
    TffWorkerDiedError: if the worker dies while the block runs.
  """
  if not os.path.isfile(worker_binary_path()):
    raise RuntimeError(f"TFF worker binary not found at "
                       f"{worker_binary_path()}")
  if max_concurrent_computation_calls is None:
    max_concurrent_computation_calls = len(os.sched_getaffinity(0))
  log_file = open(log_path, "ab") if log_path else subprocess.DEVNULL
  process, port = _start_worker(log_file, max_concurrent_computation_calls)
  channel = watchdog = None
  try:
    channel = grpc.insecure_channel(f"localhost:{port}", _GRPC_OPTIONS)
    stub = _WorkerStub(channel, process)
    _wait_until_ready(stub, process)
    logging.info("TFF worker started (pid %d, port %d)", process.pid, port)
    watchdog = _Watchdog(process, log_path)
    with _runtime_in_context(stub, process, watchdog,
                             default_num_clients) as runtime:
      yield runtime
  except _WorkerDied:
    watchdog.taken()
    raise watchdog.error() from None
  finally:
    if watchdog is not None:
      watchdog.stop()
    if channel is not None:
      channel.close()
    _stop_process(process)
    if log_file is not subprocess.DEVNULL:
      log_file.close()
    logging.info("TFF worker stopped (pid %d)", process.pid)
