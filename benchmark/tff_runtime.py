"""A TFF local runtime whose executor process never outlives the run.

TFF 0.87 executes computations in a separate C++ process,
`tensorflow_federated/data/worker_binary`, which its default context starts
lazily, lets inherit our stdout/stderr, and stops only from a `__del__`; it was
seen still running after Python exited, holding the caller's output pipe open
(ENVIRONMENT.md). Here we start that worker ourselves and always stop it:

* `local_runtime()` starts the worker with its output sent to a log file (or
  discarded), asks the kernel to kill it if our process dies
  (`PR_SET_PDEATHSIG`, so even `kill -9` of the parent takes it along),
  installs a TFF sync execution context that talks to it, and stops it on
  exit of the `with` block, whether by success, exception, Ctrl-C or (with
  `errors.install_sigterm_handler()`) SIGTERM.
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

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from typing import Iterator, Optional

from absl import logging
import grpc
import portpicker
import tensorflow_federated as tff

WORKER_BINARY_NAME = "worker_binary"
_PR_SET_PDEATHSIG = 1
_READY_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 10.0
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


@contextlib.contextmanager
def local_runtime(log_path: Optional[str] = None,
                  default_num_clients: int = 0) -> Iterator[None]:
  """Runs TFF computations in a worker process that is stopped on exit.

  Args:
    log_path: where the worker's stdout and stderr go (appended); `None`
      discards them.
    default_num_clients: cardinality used when TFF cannot infer the number of
      clients from a computation's arguments.

  Yields:
    Nothing; inside the block `tff` computations run on the started worker.

  Raises:
    RuntimeError: if the worker binary is missing, exits at start-up, or is
      not ready within 60 seconds.
  """
  binary = worker_binary_path()
  if not os.path.isfile(binary):
    raise RuntimeError(f"TFF worker binary not found at {binary}")
  port = portpicker.pick_unused_port()
  log_file = open(log_path, "ab") if log_path else subprocess.DEVNULL
  process = subprocess.Popen(
      [binary, f"--port={port}", "--max_concurrent_computation_calls=-1"],
      stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
      preexec_fn=_die_with_parent)
  channel = None
  try:
    channel = grpc.insecure_channel(f"localhost:{port}", _GRPC_OPTIONS)
    stub = tff.framework.RemoteExecutorGrpcStub(channel)
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while not stub.is_ready:
      if process.poll() is not None:
        raise RuntimeError(
            f"TFF worker exited at start-up with status {process.returncode}")
      if time.monotonic() > deadline:
        raise RuntimeError("TFF worker was not ready within "
                           f"{_READY_TIMEOUT_S:.0f} s")
      time.sleep(0.05)
    logging.info("TFF worker started (pid %d, port %d)", process.pid, port)

    def stack_fn(cardinalities):
      if cardinalities.get(tff.CLIENTS) is None:
        cardinalities[tff.CLIENTS] = default_num_clients
      executor = tff.framework.RemoteExecutor(stub)
      executor.set_cardinalities(cardinalities)
      return executor

    context = tff.framework.SyncExecutionContext(
        executor_fn=tff.framework.ResourceManagingExecutorFactory(stack_fn),
        compiler_fn=tff.backends.native.desugar_and_transform_to_native,
        transform_args=tff.tensorflow.transform_args,
        transform_result=tff.tensorflow.transform_result)
    with tff.framework.get_context_stack().install(context):
      yield
  finally:
    if channel is not None:
      channel.close()
    _stop_process(process)
    if log_file is not subprocess.DEVNULL:
      log_file.close()
    logging.info("TFF worker stopped (pid %d)", process.pid)
