"""The interface of a FedAvg round backend (`RoundBackend`), and the base
of the backends that run TFF's round compiled to TensorFlow graphs."""

import abc
from typing import Any, Optional, Sequence

import numpy as np
import tensorflow_federated as tff

from benchmark.backends import graph_runner
from benchmark.backends import mapreduce


class RoundBackend(abc.ABC):
  """Runs rounds of one learning process; holds the server state between
  rounds (in TF memory, the TFF worker, or this process)."""

  @abc.abstractmethod
  def initialize(self, model_weights: Optional[
      tff.learning.models.ModelWeights] = None) -> Any:
    """The process's initial state (Python containers with numpy leaves, as
    `process.initialize()` gives), with `model_weights` as the global model
    when given; it does not become the current state (see `set_state`)."""

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
  def run_round(self, cohort: Sequence[Sequence[Any]]) -> Any:
    """Runs one round on the clients `cohort` (each client's input to the
    process: its id first, then its seed; `training.cohorts.ClientInput`),
    updates the
    current state and returns the round's metrics (the process's metrics
    structure, numpy leaves).

    Raises:
      errors.ClientDataError: a client's data could not be read.
      BackendDiedError: a process running clients died.
    """


class CompiledBackend(RoundBackend):
  """A round compiled to TF graphs: the server's pieces run here; the
  clients' (`_train_clients`) wherever the subclass puts them."""

  def __init__(self, compiled: mapreduce.CompiledRound):
    self._compiled = compiled
    self._server = mapreduce.ServerRunner(
        compiled, "/device:CPU:0",
        graph_runner.session_config(0))
    self._state = None

  def initialize(self, model_weights=None):
    state = self._server.initialize()
    if model_weights is not None:
      state = self._server.set_model_weights(state, model_weights)
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
                     cohort: list[Sequence[Any]]
                    ) -> list[list[np.ndarray]]:
    """Trains `cohort` from `broadcast`; returns partial accumulators (at
    least one) whose merge is the round's accumulator."""

  def close(self) -> None:
    self._server.close()
