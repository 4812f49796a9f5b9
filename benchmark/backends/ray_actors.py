"""Rounds on Ray actors (`--backend ray`): an embedded local Ray or a
cluster, each actor training the clients it is handed."""

import contextlib
import os
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
      if isinstance(e.cause, errors.ClientDataError):
        raise errors.ClientDataError(e.cause.client_id, e.cause.detail) from None
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
  # The actors, on any node, with the driver's choice of deterministic
  # kernels (`training.seeds.use_deterministic_ops`).
  runtime_env = {"env_vars": {
      name: os.environ[name] for name in _INHERITED_VARIABLES
      if name in os.environ}}
  with contextlib.ExitStack() as stack:
    try:
      if ray_address:
        ray.init(address=ray_address, include_dashboard=False,
                 log_to_driver=False, logging_level="warning",
                 runtime_env=runtime_env)
      else:
        stack.enter_context(process_guard.guard())
        # "local": a new Ray of our own even where RAY_ADDRESS is set or a
        # `ray start` cluster runs on this machine (--ray_address is the one
        # way to use those).
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
