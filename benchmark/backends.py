"""Where FedAvg rounds run: in this process, in TFF's worker, or on Ray.

The round loop (`benchmark.federated`) is the same for every backend; a
backend only executes a round of the learning process TFF built:

* `inprocess` (default): the round compiled once to TensorFlow graphs
  (`benchmark.mapreduce`, TFF's MapReduceForm) and run by TensorFlow in this
  process. No listening socket, no other process. Clients run on every
  visible GPU (one copy of the client graph per GPU, each GPU taking the next
  client of the round when it finishes one), else on the CPU cores. Each
  client's update is folded into its device's running sum as soon as it is
  computed, so memory does not grow with the cohort.
* `tff_worker`: TFF 0.87's own runtime, its C++ `worker_binary` in a child
  process (`benchmark.tff_runtime`), the reference. It is built without
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

import abc
import contextlib
import os
import queue
import threading
from typing import Any, Iterator, Optional, Sequence

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from benchmark import constants
from benchmark import graph_runner
from benchmark import mapreduce
from benchmark import process_guard
from benchmark import tff_runtime
from benchmark.errors import BackendDiedError
from benchmark.errors import FlairInputError

BACKEND_INPROCESS = constants.BACKEND_INPROCESS
BACKEND_TFF_WORKER = constants.BACKEND_TFF_WORKER
BACKEND_RAY = constants.BACKEND_RAY
BACKENDS = constants.BACKENDS

ClientDataError = graph_runner.ClientDataError


class RoundBackend(abc.ABC):
  """Runs rounds of one learning process; holds the server state between
  rounds (in TF memory, the TFF worker, or this process)."""

  @abc.abstractmethod
  def initialize(self, model_weights: tff.learning.models.ModelWeights
                ) -> Any:
    """The process's initial state with `model_weights` as the global model
    (Python containers with numpy leaves, as `process.initialize()` gives);
    it does not become the current state (see `set_state`)."""

  @abc.abstractmethod
  def set_state(self, state: Any) -> None:
    """Makes `state` (Python containers, numpy leaves) the current state."""

  @abc.abstractmethod
  def get_state(self) -> Any:
    """The current state as Python containers with numpy leaves."""

  @abc.abstractmethod
  def get_model_weights(self) -> tff.learning.models.ModelWeights:
    """The current global model's weights."""

  @abc.abstractmethod
  def run_round(self, cohort: Sequence[str]) -> Any:
    """Runs one round on the clients `cohort` (client ids), updates the
    current state and returns the round's metrics (the process's metrics
    structure, numpy leaves).

    Raises:
      ClientDataError: a client's data could not be read.
      BackendDiedError: a process running clients died.
    """


class TffWorkerBackend(RoundBackend):
  """Rounds in TFF's worker process; the state stays in the worker."""

  def __init__(self, runtime: tff_runtime.LocalRuntime,
               process: tff.learning.templates.LearningProcess,
               num_clients: int):
    self._process = process
    self._session = runtime.session(num_clients)
    self._state_type = process.next.type_signature.result[0]
    self._state = None
    process_ = process

    @tff.federated_computation(self._state_type)
    def model_weights_at_server(server_state):
      return tff.federated_map(process_.get_model_weights, server_state)

    self._model_weights_at_server = model_weights_at_server

  def initialize(self, model_weights):
    return self._process.set_model_weights(self._process.initialize(),
                                           model_weights)

  def set_state(self, state):
    self._state = self._session.put(state, self._state_type)

  def get_state(self):
    return self._session.fetch(self._state, self._state_type)

  def get_model_weights(self):
    comp = self._model_weights_at_server
    return self._session.fetch(self._session.call(comp, self._state),
                               comp.type_signature.result)

  def run_round(self, cohort):
    output = self._session.call(self._process.next, self._state, list(cohort))
    metrics = self._session.fetch(self._session.select(output, 1),
                                  self._process.next.type_signature.result[1])
    self._state = self._session.select(output, 0)
    return metrics


class _CompiledBackend(RoundBackend):
  """A round compiled to TF graphs: the server's pieces run here; the
  clients' (`_train_clients`) wherever the subclass puts them."""

  def __init__(self, compiled: mapreduce.CompiledRound):
    self._compiled = compiled
    self._server = mapreduce.ServerRunner(
        compiled, "/device:CPU:0",
        graph_runner.session_config(0))
    self._state = None

  def initialize(self, model_weights):
    state = self._server.set_model_weights(self._server.initialize(),
                                           model_weights)
    return mapreduce.from_flat(state, self._compiled.state_type)

  def set_state(self, state):
    self._state = mapreduce.to_flat(state)

  def get_state(self):
    return mapreduce.from_flat(self._state, self._compiled.state_type)

  def get_model_weights(self):
    return self._server.get_model_weights(self._state)

  def run_round(self, cohort):
    broadcast = self._server.prepare(self._state)
    partials = self._train_clients(broadcast, list(cohort))
    self._state, metrics = self._server.finish(
        self._state, self._server.merge(partials))
    return metrics

  @abc.abstractmethod
  def _train_clients(self, broadcast: list[np.ndarray],
                     cohort: list[str]) -> list[list[np.ndarray]]:
    """Trains `cohort` from `broadcast`; returns partial accumulators (at
    least one) whose merge is the round's accumulator."""

  def close(self) -> None:
    self._server.close()


def _gpus() -> list[str]:
  """Logical GPU device names of this process; sets memory growth on each
  GPU first (several sessions and Keras share a GPU)."""
  for gpu in tf.config.list_physical_devices("GPU"):
    with contextlib.suppress(RuntimeError):  # Already initialised.
      tf.config.experimental.set_memory_growth(gpu, True)
  return [d.name for d in tf.config.list_logical_devices("GPU")]


def _cpu_count() -> int:
  return len(os.sched_getaffinity(0))


class InProcessBackend(_CompiledBackend):
  """Clients trained by TensorFlow in this process, one `ClientTrainer` per
  GPU (or `num_workers` on the CPU), each in its own thread."""

  def __init__(self, compiled: mapreduce.CompiledRound,
               num_workers: Optional[int] = None):
    super().__init__(compiled)
    gpus = _gpus()
    if gpus:
      devices = gpus if num_workers is None else [
          gpus[i % len(gpus)] for i in range(num_workers)]
      threads = 0
    else:
      count = num_workers or 1
      devices = ["/device:CPU:0"] * count
      threads = max(1, _cpu_count() // count)
    self.devices = devices
    self._trainers = [
        graph_runner.ClientTrainer(compiled.client_pieces, device,
                                   graph_runner.session_config(threads))
        for device in devices]
    logging.info("In-process FedAvg clients on %s", ", ".join(devices))

  def _train_clients(self, broadcast, cohort):
    for trainer in self._trainers:
      trainer.begin(broadcast)
    if len(self._trainers) == 1:
      for client_id in cohort:
        self._trainers[0].train(client_id)
    else:
      self._train_in_threads(cohort)
    return [t.end() for t in self._trainers if t.clients_trained] or [
        self._trainers[0].end()]

  def _train_in_threads(self, cohort: list[str]) -> None:
    pending = queue.SimpleQueue()
    for client_id in cohort:
      pending.put(client_id)
    failures = []
    stop = threading.Event()

    def work(trainer: graph_runner.ClientTrainer) -> None:
      while not stop.is_set():
        try:
          client_id = pending.get_nowait()
        except queue.Empty:
          return
        try:
          trainer.train(client_id)
        except BaseException as e:  # Re-raised in the calling thread.
          failures.append(e)
          stop.set()
          return

    threads = [threading.Thread(target=work, args=(t,), daemon=True,
                                name=f"fedavg-client-{i}")
               for i, t in enumerate(self._trainers)]
    for thread in threads:
      thread.start()
    try:
      for thread in threads:
        while thread.is_alive():
          thread.join(timeout=0.5)  # Stays responsive to Ctrl-C.
    finally:
      stop.set()
    if failures:
      raise failures[0]

  def close(self):
    for trainer in self._trainers:
      trainer.close()
    super().close()


def ray_actor_plan(resources: dict, nodes: list[dict],
                   num_workers: Optional[int]
                   ) -> tuple[int, dict, int]:
  """How many Ray actors train clients, and each one's resources.

  Args:
    resources: `ray.cluster_resources()` ({"CPU": n, "GPU": n, ...}).
    nodes: `ray.nodes()` (dicts with "Alive" and "Resources").
    num_workers: `--num_workers`, or None for the default.

  Returns:
    `(count, options, threads)`: the number of actors, their
    `.options(...)` (Ray resources and scheduling), and TensorFlow's
    intra-op threads in each (0: TensorFlow's default). With GPUs: one
    actor per GPU (or `num_workers`), each taking a GPU and a CPU. Without:
    `num_workers` actors sharing the cluster's CPUs; by default one actor
    per alive node, using as many cores as the smallest node has, spread
    over the nodes. One per node because each actor holds its own copy of
    the client graph and of TensorFlow's runtime (1.3 GB RSS at 32x32
    crops), as many as there are cores otherwise
    (scripts/bench_fedavg_memory.py; README, "FedAvg backends").
  """
  num_gpus = int(resources.get("GPU", 0))
  if num_gpus:
    return num_workers or num_gpus, dict(num_gpus=1, num_cpus=1), 0
  if num_workers:
    cpus = max(1, int(resources.get("CPU", 1)))
    per_actor = max(1, cpus // num_workers)
    return num_workers, dict(num_cpus=per_actor), per_actor
  node_cpus = [int(node["Resources"]["CPU"]) for node in nodes
               if node.get("Alive")
               and node.get("Resources", {}).get("CPU", 0) >= 1]
  threads = min(node_cpus) if node_cpus else 1
  return (max(1, len(node_cpus)),
          dict(num_cpus=threads, scheduling_strategy="SPREAD"), threads)


class RayBackend(_CompiledBackend):
  """Clients trained in Ray actors (`graph_runner.ClientTrainer` as an
  actor class); see the module docstring."""

  def __init__(self, compiled: mapreduce.CompiledRound, ray_module,
               num_workers: Optional[int]):
    super().__init__(compiled)
    ray = self._ray = ray_module
    count, options, threads = ray_actor_plan(
        ray.cluster_resources(), ray.nodes(), num_workers)
    actor_class = ray.remote(graph_runner.ClientTrainer)
    pieces = ray.put(compiled.client_pieces)
    self._actors = [
        actor_class.options(**options).remote(
            pieces, None, graph_runner.session_config(threads))
        for _ in range(count)]
    logging.info("Ray FedAvg clients: %d actors (%s each)", count, options)

  def _get(self, refs):
    ray = self._ray
    try:
      return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
      if isinstance(e.cause, ClientDataError):
        raise ClientDataError(e.cause.client_id, e.cause.detail) from None
      raise
    except ray.exceptions.RayActorError as e:
      raise BackendDiedError(
          "a Ray actor training FedAvg clients died (out of memory? see the "
          "Ray logs; try a smaller --clients_per_round, "
          "--max_elements_per_client or crop): "
          f"{str(e).strip().splitlines()[0]}") from None

  def _train_clients(self, broadcast, cohort):
    ray = self._ray
    broadcast_ref = ray.put(broadcast)
    self._get([a.begin.remote(broadcast_ref) for a in self._actors])
    pending = list(reversed(cohort))
    in_flight = {}  # ObjectRef -> actor
    for actor in self._actors:
      if pending:
        in_flight[actor.train.remote(pending.pop())] = actor
    while in_flight:
      done, _ = ray.wait(list(in_flight), num_returns=1)
      actor = in_flight.pop(done[0])
      self._get(done[0])
      if pending:
        in_flight[actor.train.remote(pending.pop())] = actor
    del broadcast_ref
    return self._get([a.end.remote() for a in self._actors])

  def close(self):
    for actor in self._actors:
      with contextlib.suppress(Exception):
        self._ray.kill(actor)
    super().close()


@contextlib.contextmanager
def _ray_session(ray_address: Optional[str]):
  """Connects to the Ray cluster at `ray_address`, or starts an embedded
  local one (bound to 127.0.0.1, no dashboard) under a
  `process_guard.guard()`; disconnects, and stops what it started, however
  the block or the process ends."""
  try:
    import ray  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise FlairInputError(
        "--backend ray needs the `ray` package (pinned in requirements.txt; "
        "run make install)") from e
  if ray.is_initialized():
    ray.shutdown()
  with contextlib.ExitStack() as stack:
    try:
      if ray_address:
        ray.init(address=ray_address, include_dashboard=False,
                 log_to_driver=False, logging_level="warning")
      else:
        stack.enter_context(process_guard.guard())
        # "local": a new Ray of our own even where RAY_ADDRESS is set or a
        # `ray start` cluster runs on this machine (--ray_address is the one
        # way to use those).
        ray.init(address="local", num_cpus=_cpu_count(),
                 include_dashboard=False,
                 log_to_driver=False, logging_level="warning",
                 _node_ip_address="127.0.0.1")
    except (ConnectionError, ValueError, RuntimeError) as e:
      ray.shutdown()
      where = (f"--ray_address {ray_address!r}" if ray_address
               else "a local Ray")
      raise FlairInputError(
          f"{where} could not be started or reached: "
          f"{str(e).strip().splitlines()[0]}") from e
    try:
      yield ray
    finally:
      ray.shutdown()


@contextlib.contextmanager
def open_backend(name: str,
                 process: tff.learning.templates.LearningProcess,
                 num_clients: int, *, worker_log_path: Optional[str] = None,
                 num_workers: Optional[int] = None,
                 ray_address: Optional[str] = None
                ) -> Iterator[RoundBackend]:
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
  if name not in BACKENDS:
    raise FlairInputError(f"--backend must be one of {BACKENDS}, got {name!r}")
  if num_workers is not None and num_workers < 1:
    raise FlairInputError(f"--num_workers must be >= 1, got {num_workers}")
  if name == BACKEND_TFF_WORKER:
    with tff_runtime.local_runtime(log_path=worker_log_path) as runtime:
      yield TffWorkerBackend(runtime, process, num_clients)
    return
  compiled = mapreduce.compile_process(process)
  if name == BACKEND_INPROCESS:
    backend = InProcessBackend(compiled, num_workers)
    try:
      yield backend
    finally:
      backend.close()
    return
  with _ray_session(ray_address) as ray:
    backend = RayBackend(compiled, ray, num_workers)
    try:
      yield backend
    finally:
      backend.close()
