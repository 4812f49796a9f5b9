"""A FedAvg round as plain TensorFlow graphs: TFF's MapReduceForm, run by TF.

TFF 0.87 executes computations only in its `worker_binary`, a separate
process built without CUDA. Yet TFF's own compiler can turn a learning
process's round into a `tff.backends.mapreduce.MapReduceForm`: seven
TensorFlow computations that together are one round (TFF's
`get_map_reduce_form_for_computation`, "Towards Federated Learning at Scale",
Bonawitz et al. 2019, arXiv 1902.01046):

    broadcast = prepare(server_state)
    for each client:  update_c = work(client_id, broadcast)
    accumulator = accumulate(... accumulate(zero(), update_1) ..., update_n)
    partials of disjoint client groups combine with merge(a, b)
    aggregate = report(accumulator)
    new_state, round_metrics = update(server_state, aggregate)

This module compiles a process once (`compile_process`) into `CompiledRound`:
`graph_runner.GraphPiece`s (the serialized `GraphDef` of each piece
and the tensor names of its parameter and result), so the algorithm stays
exactly what TFF built (FedAvg, the DP aggregator, the metrics), run by
TensorFlow alone (`graph_runner.GraphRunner`, on a GPU when given one).
`ServerRunner` runs the server's pieces. The pieces are plain bytes and
strings, so they can be shipped to processes (Ray actors) that import
TensorFlow but never TFF.

Values cross between pieces as flat lists of numpy arrays, in the order of
TFF's depth-first flattening of their type (`tff.structure.flatten`);
`to_flat` / `from_flat` convert to and from the Python containers of a TFF
type (those `tff.learning` uses: `ModelWeights`, `OrderedDict`, ...).

Secure aggregation (`tff.aggregators.SecureSumFactory`) is not supported: the
pieces that would carry it must be empty.
"""

import dataclasses
import time
from typing import Any, Optional, Sequence

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from benchmark.backends.graph_runner import GraphPiece
from benchmark.backends.graph_runner import GraphRunner
from benchmark.core.errors import FlairInputError

# Names of the MapReduceForm pieces this runtime executes.
ROUND_PIECES = ("prepare", "work", "zero", "accumulate", "merge", "report",
                "update")
_SECURE_PIECES = ("secure_sum_bitwidth", "secure_sum_max_input",
                  "secure_modular_sum_modulus")


def _unplaced(type_spec: tff.Type) -> tff.Type:
  if isinstance(type_spec, tff.FederatedType):
    return type_spec.member
  return type_spec


@dataclasses.dataclass(frozen=True)
class CompiledRound:
  """A learning process compiled to TensorFlow graphs (see module doc).

  Attributes:
    pieces: "initialize" (no parameter -> server state), the seven round
      pieces of `ROUND_PIECES`, "get_model_weights" (state -> model weights)
      and "set_model_weights" (state, weights -> state).
    state_type: the unplaced TFF type of the server state.
    metrics_type: the unplaced TFF type of a round's metrics.
    model_weights_type: the TFF type of `tff.learning.models.ModelWeights`.
    client_input_type: the TFF type of one client's input to `work` (here the
      client id, `tf.string`).
  """
  pieces: dict[str, GraphPiece]
  state_type: tff.Type
  metrics_type: tff.Type
  model_weights_type: tff.Type
  client_input_type: tff.Type

  @property
  def client_pieces(self) -> dict[str, GraphPiece]:
    """What a client-side runner needs: `work`, `zero`, `accumulate`."""
    return {k: self.pieces[k] for k in ("work", "zero", "accumulate")}


def grappler_config() -> tf.compat.v1.ConfigProto:
  """Grappler's options for TFF's compiler of the round: TFF's own
  (aggressive constant folding, arithmetic, loop and function optimization,
  memory heuristics), with the memory heuristics narrowed to swapping.

  TFF's memory heuristics include recomputation, which rewrites the
  clients' training loop into nodes that Grappler's function optimizer
  then refuses: it logged "function_optimizer failed: ... has inputs from
  different frames" as an error at every compile and its pass was lost.
  Without recomputation the function optimizer runs; a round's results
  differ only by TensorFlow's run-to-run round-off (docs/performance.md,
  "Compiling the round": measured with scripts/check_grappler_config.py).
  Swapping moves tensors to host memory only when a GPU would run out.
  """
  config = tf.compat.v1.ConfigProto()
  rewrite = config.graph_options.rewrite_options
  rewrite.memory_optimization = rewrite.SWAPPING_HEURISTICS
  return config


def compile_process(process: tff.learning.templates.LearningProcess
                   ) -> CompiledRound:
  """Compiles a learning process into TensorFlow graphs.

  Args:
    process: a `tff.learning` process whose `next` takes `(state@SERVER,
      client inputs@CLIENTS)` and whose clients' inputs are tensors (for
      this project the process composed with the client-id dataset
      computation, `training.fedavg.build_learning_process`).

  Returns:
    The `CompiledRound` (TFF's compiler and Grappler, with
    `grappler_config`, take tens of seconds of CPU for ResNet-18 FedAvg).

  Raises:
    FlairInputError: the process cannot be expressed in MapReduceForm, or
      uses secure aggregation.
  """
  start = time.monotonic()
  try:
    form = tff.backends.mapreduce.get_map_reduce_form_for_computation(
        process.next, grappler_config())
    initialize = tff.backends.mapreduce.get_state_initialization_computation(
        process.initialize, grappler_config())
  except (TypeError, ValueError) as e:
    raise FlairInputError(
        "this learning process cannot be compiled to TFF's MapReduceForm "
        f"({type(e).__name__}: {str(e).splitlines()[0]}); use --backend "
        "tff_worker") from e
  for name in _SECURE_PIECES:
    if tff.structure.flatten(getattr(form, name).type_signature.result):
      raise FlairInputError(
          "the aggregator uses secure aggregation, which only --backend "
          "tff_worker runs")
  pieces = {name: GraphPiece.from_computation(name, getattr(form, name))
            for name in ROUND_PIECES}
  pieces["initialize"] = GraphPiece.from_computation("initialize", initialize)
  pieces["get_model_weights"] = GraphPiece.from_computation(
      "get_model_weights", process.get_model_weights)
  pieces["set_model_weights"] = GraphPiece.from_computation(
      "set_model_weights", process.set_model_weights)
  state_type = _unplaced(process.next.type_signature.result[0])
  logging.info("Compiled the FedAvg round to TensorFlow graphs in %.1f s",
               time.monotonic() - start)
  return CompiledRound(
      pieces=pieces, state_type=state_type,
      metrics_type=_unplaced(process.next.type_signature.result[1]),
      model_weights_type=process.get_model_weights.type_signature.result,
      client_input_type=form.work.type_signature.parameter[0])


def to_flat(value: Any) -> list[np.ndarray]:
  """Flattens a structure of arrays in TFF's depth-first order.

  Args:
    value: a value of a TFF type as its Python containers hold it (attrs
      classes, named tuples, `OrderedDict`s, lists) with numpy / TF leaves.

  Returns:
    The leaves as numpy arrays.
  """
  structure = tff.structure.from_container(value, recursive=True)
  return [np.asarray(leaf) for leaf in tff.structure.flatten(structure)]


def from_flat(flat: Sequence[np.ndarray], type_spec: tff.Type) -> Any:
  """Packs leaves into the Python containers of `type_spec`.

  Args:
    flat: numpy arrays in the order `to_flat` produces.
    type_spec: an unplaced TFF type of tensors and structures.

  Returns:
    The value, with numpy leaves, in the containers TFF's own contexts would
    return.

  Raises:
    ValueError: `flat` has another number of leaves than `type_spec`.
  """
  leaves = iter(flat)

  def pack(t: tff.Type):
    if isinstance(t, tff.StructType):
      return tff.structure.Struct(
          [(name, pack(element)) for name, element in
           tff.structure.iter_elements(t)])
    return next(leaves)

  structure = pack(type_spec)
  if next(leaves, None) is not None:
    raise ValueError(f"more values than the {type_spec} type holds")
  return tff.types.type_to_py_container(structure, type_spec)


class ServerRunner:
  """The server side of a `CompiledRound`: initialise, prepare, merge,
  report, update and the model-weights accessors, on one device."""

  def __init__(self, compiled: CompiledRound, device: Optional[str],
               config: tf.compat.v1.ConfigProto):
    self._compiled = compiled
    self._runners = {
        name: GraphRunner(compiled.pieces[name], device, config)
        for name in ("initialize", "prepare", "merge", "report", "update",
                     "get_model_weights", "set_model_weights")}

  def initialize(self) -> list[np.ndarray]:
    """The initial server state, flat."""
    return self._runners["initialize"]()

  def prepare(self, state: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The clients' broadcast (the model weights), flat."""
    return self._runners["prepare"](*state)

  def merge(self, partials: Sequence[Sequence[np.ndarray]]
           ) -> list[np.ndarray]:
    """Merges partial accumulators (at least one) into one."""
    merged = list(partials[0])
    for partial in partials[1:]:
      merged = self._runners["merge"](*merged, *partial)
    return merged

  def finish(self, state: Sequence[np.ndarray],
             accumulator: Sequence[np.ndarray]
            ) -> tuple[list[np.ndarray], Any]:
    """`report` then `update`: returns the new flat state and the round's
    metrics (Python containers of `CompiledRound.metrics_type`)."""
    aggregate = self._runners["report"](*accumulator)
    result = self._runners["update"](*state, *aggregate)
    num_state = len(state)
    return (result[:num_state],
            from_flat(result[num_state:], self._compiled.metrics_type))

  def get_model_weights(self, state: Sequence[np.ndarray]
                       ) -> tff.learning.models.ModelWeights:
    return from_flat(self._runners["get_model_weights"](*state),
                     self._compiled.model_weights_type)

  def set_model_weights(self, state: Sequence[np.ndarray],
                        weights: tff.learning.models.ModelWeights
                       ) -> list[np.ndarray]:
    return self._runners["set_model_weights"](*state, *to_flat(weights))

  def close(self) -> None:
    for runner in self._runners.values():
      runner.close()
