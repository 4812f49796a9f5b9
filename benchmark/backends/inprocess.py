"""Rounds in this process (`--backend inprocess`): TFF's compiled round run
by TensorFlow, one client trainer per GPU (or the CPU's cores)."""

import contextlib
import os
import queue
import threading
from typing import Optional

from absl import logging
import tensorflow as tf

from benchmark.backends import base
from benchmark.backends import graph_runner
from benchmark.backends import mapreduce


def _gpus() -> list[str]:
  """Logical GPU device names of this process; sets memory growth on each
  GPU first (several sessions and Keras share a GPU)."""
  for gpu in tf.config.list_physical_devices("GPU"):
    with contextlib.suppress(RuntimeError):  # Already initialised.
      tf.config.experimental.set_memory_growth(gpu, True)
  return [d.name for d in tf.config.list_logical_devices("GPU")]


def cpu_count() -> int:
  return len(os.sched_getaffinity(0))


class InProcessBackend(base.CompiledBackend):
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
      threads = max(1, cpu_count() // count)
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
      for client_input in cohort:
        self._trainers[0].train(client_input)
    else:
      self._train_in_threads(cohort)
    return [t.end() for t in self._trainers if t.clients_trained] or [
        self._trainers[0].end()]

  def _train_in_threads(self, cohort: list) -> None:
    pending = queue.SimpleQueue()
    for client_input in cohort:
      pending.put(client_input)
    failures = []
    stop = threading.Event()

    def work(trainer: graph_runner.ClientTrainer) -> None:
      while not stop.is_set():
        try:
          client_input = pending.get_nowait()
        except queue.Empty:
          return
        try:
          trainer.train(client_input)
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
