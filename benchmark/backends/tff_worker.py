"""Rounds in TFF 0.87's own worker process (`--backend tff_worker`): the
reference runtime, CPU only, memory growing with the cohort."""

import tensorflow_federated as tff

from benchmark.backends import base
from benchmark.backends import tff_runtime


class TffWorkerBackend(base.RoundBackend):
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

  def initialize(self, model_weights=None):
    state = self._process.initialize()
    if model_weights is None:
      return state
    return self._process.set_model_weights(state, model_weights)

  def set_state(self, state):
    self._state = self._session.put(state, self._state_type)

  def get_state(self):
    return self._session.fetch(self._state, self._state_type)

  def get_model_weights(self):
    comp = self._model_weights_at_server
    return self._session.fetch(self._session.call(comp, self._state),
                               comp.type_signature.result)

  def run_round(self, cohort):
    # Client ids as UTF-8 bytes: TFF's serialization of Python strings
    # refuses non-ASCII ones.
    inputs = [(client_id.encode(), *rest) for client_id, *rest in cohort]
    output = self._session.call(self._process.next, self._state, inputs)
    metrics = self._session.fetch(self._session.select(output, 1),
                                  self._process.next.type_signature.result[1])
    self._state = self._session.select(output, 0)
    return metrics
