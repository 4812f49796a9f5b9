"""Rounds on Ray actors (`--backend ray`): an embedded local Ray or a
cluster, each actor training the clients it is handed."""

import contextlib
import os
import signal
import threading
from typing import Optional

from absl import logging

from benchmark.backends import base
from benchmark.backends import graph_runner
from benchmark.backends import inprocess
from benchmark.backends import mapreduce
from benchmark.backends import process_guard
from benchmark.core import errors
from benchmark.core.errors import BackendDiedError
from benchmark.core.errors import FlairInputError


# Environment variables the actors get from the driver.
_INHERITED_VARIABLES = ("TF_DETERMINISTIC_OPS",)


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
    the client graph and of TensorFlow's runtime, which would be as many
    copies as there are cores otherwise (docs/performance.md, memory).
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


class RayBackend(base.CompiledBackend):
  """Clients trained in Ray actors (`graph_runner.ClientTrainer` as an
  actor class); see the module docstring."""

  def __init__(self, compiled: mapreduce.CompiledRound, ray_module,
               num_workers: Optional[int]):
    super().__init__(compiled)
    ray = self._ray = ray_module
    self._num_workers = num_workers
    self._actor_class = ray.remote(graph_runner.ClientTrainer)
    self._pieces = ray.put(compiled.client_pieces)
    self._actors = []
    count, options, _ = self._add_actors(None)
    logging.info("Ray FedAvg clients: %d actors (%s each)", count, options)

  def _add_actors(self, limit: Optional[int]) -> tuple[int, dict, int]:
    """Starts the actors `ray_actor_plan` wants beyond those alive, at most
    `limit` (None: all); returns how many started, their options and
    threads."""
    ray = self._ray
    count, options, threads = ray_actor_plan(
        ray.cluster_resources(), ray.nodes(), self._num_workers)
    count = max(0, count - len(self._actors))
    if limit is not None:
      count = min(count, limit)
    self._actors += [
        self._actor_class.options(**options).remote(
            self._pieces, None, graph_runner.session_config(threads))
        for _ in range(count)]
    return count, options, threads

  def _replace_lost_actors(self) -> None:
    """Before a round: when the plan wants more actors than are alive (an
    actor was lost) and the cluster has the resources for them free now (a
    node came back, or another joined), starts replacements."""
    _, options, _ = ray_actor_plan(self._ray.cluster_resources(),
                                   self._ray.nodes(), self._num_workers)
    free = self._ray.available_resources()
    needs = {"CPU": options.get("num_cpus", 1),
             "GPU": options.get("num_gpus", 0)}
    room = min(int(free.get(name, 0) // amount)
               for name, amount in needs.items() if amount)
    started, _, _ = self._add_actors(room)
    if started:
      logging.warning("Started %d Ray actor(s) in place of lost ones (%d "
                      "now).", started, len(self._actors))

  def _get(self, refs):
    """`ray.get(refs)`, a client's data error raised as itself.

    Raises:
      errors.ClientDataError: a client's data could not be read.
      ray.exceptions.RayActorError: the actor (or its node) died; the
        caller retries its clients elsewhere (`_train_clients`).
    """
    ray = self._ray
    try:
      return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
      if isinstance(e.cause, errors.ClientDataError):
        raise errors.ClientDataError(e.cause.client_id, e.cause.detail) from None
      raise

  def _lose(self, actor, error) -> None:
    """Drops a dead actor; when none is left, stops the run.

    Raises:
      BackendDiedError: no actor is left (one line: Ray's reason).
    """
    self._actors.remove(actor)
    reason = str(error).strip().splitlines()[0]
    if not self._actors:
      raise BackendDiedError(
          "every Ray actor training FedAvg clients died (a node lost, or out "
          "of memory: try a smaller --clients_per_round, "
          f"--max_elements_per_client or crop); the last: {reason}")
    logging.warning(
        "A Ray actor training FedAvg clients died (%s); its clients of this "
        "round are trained again on the %d actor(s) left.", reason,
        len(self._actors))

  def _train_clients(self, broadcast, cohort):
    """Trains `cohort` on the actors, each client once in the partial sums
    returned. An actor that dies (its node lost, say) is dropped and every
    client it trained in this round is trained again on the others, from
    the same broadcast and client inputs (seeds included), so the round
    equals one without the loss up to float32 summation order."""
    self._replace_lost_actors()
    broadcast_ref = self._ray.put(broadcast)
    partials, remaining = [], list(cohort)
    while remaining:
      done, remaining = self._attempt(broadcast_ref, remaining)
      partials += done
    return partials or self._attempt(broadcast_ref, [])[0]

  def _attempt(self, broadcast_ref, cohort):
    """One pass of `cohort` over the live actors: `(partial sums of the
    actors that finished, clients of those that died at the end)`."""
    ray = self._ray
    actors = list(self._actors)
    begun = {actor: actor.begin.remote(broadcast_ref) for actor in actors}
    trained = {actor: [] for actor in actors}  # Clients in its sum.
    pending, in_flight = list(reversed(cohort)), {}
    for actor, ref in begun.items():
      try:
        self._get(ref)
      except ray.exceptions.RayActorError as e:
        self._lose(actor, e)
        trained.pop(actor)
    for actor in trained:
      if pending:
        client = pending.pop()
        in_flight[actor.train.remote(client)] = (actor, client)
    while in_flight:
      [ref], _ = ray.wait(list(in_flight), num_returns=1)
      actor, client = in_flight.pop(ref)
      try:
        self._get(ref)
        trained[actor].append(client)
      except ray.exceptions.RayActorError as e:
        self._lose(actor, e)
        pending += [client] + trained.pop(actor)
        idle = [a for a in trained if a not in
                {held for held, _ in in_flight.values()}]
        for other in idle:
          if pending:
            client = pending.pop()
            in_flight[other.train.remote(client)] = (other, client)
        continue
      if pending:
        client = pending.pop()
        in_flight[actor.train.remote(client)] = (actor, client)
    return self._end(trained)

  def _end(self, trained):
    """The partial sums of the actors in `trained`, and the clients of
    those that died before giving theirs."""
    ray = self._ray
    ends = {actor: actor.end.remote() for actor in trained}
    partials, lost = [], []
    for actor, ref in ends.items():
      try:
        partials.append(self._get(ref))
      except ray.exceptions.RayActorError as e:
        self._lose(actor, e)
        lost += trained[actor]
    return partials, lost

  def close(self):
    for actor in self._actors:
      with contextlib.suppress(Exception):
        self._ray.kill(actor)
    super().close()


@contextlib.contextmanager
def _keeping_sigterm_handler():
  """Restores this process's SIGTERM handler after the block: `ray.init`
  replaces it with one that exits at once (status 15, or 1 when it started
  a local Ray), which skips the command's clean stop
  (`cli.commands.install_sigterm_handler`: every `finally` runs, exit 143)
  and ends in Ray's C++ abort (status 134) at interpreter teardown."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  handler = signal.getsignal(signal.SIGTERM)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, handler)


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
  # The actors, on any node, with the driver's choice of deterministic
  # kernels (`training.seeds.use_deterministic_ops`).
  runtime_env = {"env_vars": {
      name: os.environ[name] for name in _INHERITED_VARIABLES
      if name in os.environ}}
  with contextlib.ExitStack() as stack:
    try:
      if ray_address:
        with _keeping_sigterm_handler():
          ray.init(address=ray_address, include_dashboard=False,
                   log_to_driver=False, logging_level="warning",
                   runtime_env=runtime_env)
      else:
        stack.enter_context(process_guard.guard())
        # "local": a new Ray of our own even where RAY_ADDRESS is set or a
        # `ray start` cluster runs on this machine (--ray_address is the one
        # way to use those).
        with _keeping_sigterm_handler():
          ray.init(address="local", num_cpus=inprocess.cpu_count(),
                   include_dashboard=False,
                   log_to_driver=False, logging_level="warning",
                   _node_ip_address="127.0.0.1", runtime_env=runtime_env)
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
