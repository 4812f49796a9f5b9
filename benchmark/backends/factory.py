"""Where FedAvg rounds run: in this process, in TFF's worker, or on Ray.

The round loop (`training.loop`) is the same for every backend; a
backend only executes a round of the learning process TFF built:

* `inprocess` (default): the round compiled once to TensorFlow graphs
  (`backends.mapreduce`, TFF's MapReduceForm) and run by TensorFlow in this
  process. No listening socket, no other process. Clients run on every
  visible GPU (one copy of the client graph per GPU, each GPU taking the next
  client of the round when it finishes one), else on the CPU cores. Each
  client's update is folded into its device's running sum as soon as it is
  computed, so memory does not grow with the cohort.
* `tff_worker`: TFF 0.87's own runtime, its C++ `worker_binary` in a child
  process (`backends.tff_runtime`), the reference. It is built without
  CUDA (CPU only) and holds a round's client updates until the round's
  aggregation, so its memory grows with the cohort.
* `ray`: the same compiled graphs in Ray actors (one per GPU, else one per
  node, or `num_workers` actors), on an embedded local Ray or on a cluster
  (`ray_address`). Each actor receives the round's broadcast once through
  Ray's object store, trains the clients it is handed (the next client goes
  to the first actor that is free) and returns its partial sum; this process
  merges the partial sums and updates the server state. Without GPUs and
  without `num_workers`, one actor per node uses all of the node's cores.

All three run exactly the computations TFF built (`tff.learning` FedAvg and
`tff.aggregators` DP); from the same state and cohort they give the same new
state up to float32 summation order (tests/test_backends.py).
"""

import contextlib
from typing import Iterator, Optional

import tensorflow_federated as tff

from benchmark.backends import base
from benchmark.backends import inprocess
from benchmark.backends import mapreduce
from benchmark.backends import ray_actors
from benchmark.backends import tff_runtime
from benchmark.backends import tff_worker
from benchmark.core import constants
from benchmark.core.errors import FlairInputError


@contextlib.contextmanager
def open_backend(name: str,
                 process: tff.learning.templates.LearningProcess,
                 num_clients: int, *, worker_log_path: Optional[str] = None,
                 num_workers: Optional[int] = None,
                 ray_address: Optional[str] = None
                ) -> Iterator[base.RoundBackend]:
  """Starts a backend for `process`; stops whatever it started on exit
  (success, exception, Ctrl-C, SIGTERM with `errors.install_sigterm_handler`).

  Args:
    name: one of `BACKENDS`.
    process: the learning process over client ids
      (`federated.build_learning_process`'s second result).
    num_clients: clients per round.
    worker_log_path: `tff_worker`: where the worker's output goes.
    num_workers: clients trained at once: `inprocess` on the CPU (default
      1, using all cores) or on GPUs (default one per GPU); `ray`: actors
      (default one per GPU of the cluster, else one per node, using the
      node's cores; `num_workers` CPU actors share the cluster's cores).
    ray_address: `ray`: the address of a running cluster (`ray start
      --head` prints it); None starts an embedded local Ray.

  Yields:
    A `RoundBackend`.

  Raises:
    FlairInputError: unknown backend, Ray unavailable or unreachable, or a
      process TFF cannot compile for the chosen backend.
  """
  if name not in constants.BACKENDS:
    raise FlairInputError(f"--backend must be one of {constants.BACKENDS}, got {name!r}")
  if num_workers is not None and num_workers < 1:
    raise FlairInputError(f"--num_workers must be >= 1, got {num_workers}")
  if name == constants.BACKEND_TFF_WORKER:
    with tff_runtime.local_runtime(log_path=worker_log_path) as runtime:
      yield tff_worker.TffWorkerBackend(runtime, process, num_clients)
    return
  compiled = mapreduce.compile_process(process)
  if name == constants.BACKEND_INPROCESS:
    backend = inprocess.InProcessBackend(compiled, num_workers)
    try:
      yield backend
    finally:
      backend.close()
    return
  with ray_actors._ray_session(ray_address) as ray:
    backend = ray_actors.RayBackend(compiled, ray, num_workers)
    try:
      yield backend
    finally:
      backend.close()
