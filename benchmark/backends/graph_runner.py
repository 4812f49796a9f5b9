"""TensorFlow computations of TFF, run by TensorFlow alone (no TFF import).

A `GraphPiece` is one TFF TensorFlow computation as plain data: its
serialized `GraphDef` and the names of the tensors that take its parameter
and give its result, in the order of TFF's depth-first flattening of their
types. `GraphRunner` imports one piece (or a chain of two) into a `tf.Graph`
on a device and runs it in its own `tf.compat.v1.Session`, as TFF's own
TensorFlow executor does: the piece's initialisation op first (fresh
variables on every call), then its result tensors. `ClientTrainer` holds the
client side of a FedAvg round (`work` chained into `accumulate`, and `zero`).

This module imports TensorFlow but not TFF, so processes that only train
clients (Ray actors, see `benchmark.backends`) start quickly.
`backends.mapreduce` compiles a learning process into these pieces.
"""

import copy
import dataclasses
import threading
from typing import Any, Optional, Sequence

import numpy as np
import tensorflow as tf

from benchmark.core import errors
from benchmark.core.errors import FlairInputError

# The value fed to a piece's session-token placeholder. TFF's executors feed
# an identifier of their session; the pieces here use it for nothing.
_SESSION_TOKEN = b"flair"


def _binding_tensor_names(binding) -> list[str]:
  """Tensor names of a TFF `TensorFlow.Binding`, depth first."""
  kind = binding.WhichOneof("binding")
  if kind is None:
    return []
  if kind == "tensor":
    return [binding.tensor.tensor_name]
  if kind == "struct":
    names = []
    for element in binding.struct.element:
      names.extend(_binding_tensor_names(element))
    return names
  raise FlairInputError(
      f"a compiled TFF piece passes a {kind} value; only tensors and "
      "structures of tensors can run outside TFF's worker (use --backend "
      "tff_worker)")


@dataclasses.dataclass(frozen=True)
class GraphPiece:
  """One TensorFlow computation of TFF, as TF alone can run it.

  Attributes:
    name: what it is (e.g. "work"), for messages.
    graph_def: the serialized `tf.compat.v1.GraphDef`.
    parameter_names: names of the graph's input tensors, in the order of the
      flattened TFF parameter type (empty for no parameter).
    result_names: names of the output tensors, in the order of the flattened
      TFF result type.
    initialize_op: an op to run before every call (it initialises the
      piece's variables afresh, as TFF does for each invocation), or "".
    session_token_name: a string placeholder to feed, or "".
  """
  name: str
  graph_def: bytes
  parameter_names: tuple[str, ...]
  result_names: tuple[str, ...]
  initialize_op: str
  session_token_name: str

  @classmethod
  def from_computation(cls, name: str, computation) -> "GraphPiece":
    """Extracts the graph of a TFF TensorFlow computation (a
    `tff.Computation` whose building block is TensorFlow).

    Raises:
      FlairInputError: `computation` is not a plain TensorFlow computation
        over tensors.
    """
    proto = computation.to_building_block().proto
    if proto.WhichOneof("computation") != "tensorflow":
      raise FlairInputError(
          f"TFF's compiled {name} is not a TensorFlow computation; it cannot "
          "run outside TFF's worker (use --backend tff_worker)")
    tf_proto = proto.tensorflow
    graph_def = tf.compat.v1.GraphDef()
    tf_proto.graph_def.Unpack(graph_def)
    return cls(
        name=name, graph_def=graph_def.SerializeToString(),
        parameter_names=tuple(_binding_tensor_names(tf_proto.parameter)),
        result_names=tuple(_binding_tensor_names(tf_proto.result)),
        initialize_op=tf_proto.initialize_op,
        session_token_name=tf_proto.session_token_tensor_name)


def session_config(threads: int) -> tf.compat.v1.ConfigProto:
  """A session configuration: `threads` intra-op threads (0 = TF's default,
  all cores), soft placement (CPU-only ops such as file reading next to GPU
  kernels) and GPU memory that grows on demand."""
  config = tf.compat.v1.ConfigProto(
      intra_op_parallelism_threads=threads,
      inter_op_parallelism_threads=threads,
      allow_soft_placement=True)
  config.gpu_options.allow_growth = True
  return config


def client_session_config(config: tf.compat.v1.ConfigProto,
                          device: Optional[str]) -> tf.compat.v1.ConfigProto:
  """`config` for the clients' sessions: with Grappler off when they run on
  the CPU (`device` a CPU, or None on a machine without a visible GPU).

  TFF's compiler has already optimized the pieces with Grappler
  (`mapreduce.grappler_config`); what a session's Grappler still does is
  optimize the client dataset's functions again for every client, as each
  client's iterator instantiates them afresh: on the CPU that was most of
  a small client's input cost and changed no result (docs/performance.md,
  "Per-client cost"). On a GPU the session's Grappler also places layouts
  and fuses kernels for the device, so it stays on there.
  """
  on_cpu = (device is None and not tf.config.list_physical_devices("GPU")
            ) or (device is not None and "CPU" in device.upper())
  if not on_cpu:
    return config
  config = copy.deepcopy(config)
  config.graph_options.rewrite_options.disable_meta_optimizer = True
  return config


class GraphRunner:
  """Runs one `GraphPiece`, or a chain of two, in its own graph and session.

  A chain `GraphRunner([first, second], feed_from_first=k)` imports both
  pieces into one graph and feeds the first's results into the last
  `len(first.result_names)` parameters of the second, so a call takes the
  first's parameters followed by the second's first `k` parameters; TF then
  runs `work` and `accumulate` without copying the client's update out.

  Each runner owns its variables (a session per runner), so runners may run
  in parallel threads; one runner must not be called from two threads at
  once. Calls release the GIL while TensorFlow computes.
  """

  def __init__(self, pieces: Sequence[GraphPiece], device: Optional[str],
               config: tf.compat.v1.ConfigProto):
    if len(pieces) not in (1, 2):
      raise ValueError("a GraphRunner runs one piece or a chain of two")
    self.name = "+".join(p.name for p in pieces)
    self._graph = tf.Graph()
    feeds, init_ops, tokens = [], [], []
    with self._graph.as_default(), tf.device(device):
      outputs = None
      for index, piece in enumerate(pieces):
        graph_def = tf.compat.v1.GraphDef.FromString(piece.graph_def)
        scope = f"p{index}"
        input_map = {}
        own_parameters = list(piece.parameter_names)
        if outputs is not None:  # The second of a chain.
          fed = own_parameters[len(own_parameters) - len(outputs):]
          own_parameters = own_parameters[:len(own_parameters) - len(outputs)]
          input_map = dict(zip(fed, outputs))
        tf.graph_util.import_graph_def(graph_def, input_map=input_map,
                                       name=scope)
        get = self._graph.get_tensor_by_name
        feeds.extend(get(f"{scope}/{n}") for n in own_parameters)
        outputs = [get(f"{scope}/{n}") for n in piece.result_names]
        if piece.initialize_op:
          init_ops.append(self._graph.get_operation_by_name(
              f"{scope}/{piece.initialize_op}"))
        if piece.session_token_name:
          tokens.append(get(f"{scope}/{piece.session_token_name}"))
    self.num_parameters = len(feeds)
    self._session = tf.compat.v1.Session(graph=self._graph, config=config)
    token_feeds = {t: _SESSION_TOKEN for t in tokens}
    self._init = (self._session.make_callable(init_ops, feed_list=tokens)
                  if init_ops else None)
    self._call = self._session.make_callable(outputs, feed_list=feeds + tokens)
    self.feeds, self.outputs = feeds + tokens, outputs  # For profiling.
    self._token_values = list(token_feeds.values())
    self._lock = threading.Lock()
    self._graph.finalize()

  def __call__(self, *flat_inputs: np.ndarray) -> list[np.ndarray]:
    """Runs the piece(s) on `flat_inputs` (numpy arrays in parameter order);
    returns the results as numpy arrays, in result order.

    Raises:
      ValueError: wrong number of inputs.
      tf.errors.OpError: TensorFlow failed (e.g. unreadable client data).
    """
    if len(flat_inputs) != self.num_parameters:
      raise ValueError(f"{self.name} takes {self.num_parameters} values, got "
                       f"{len(flat_inputs)}")
    with self._lock:
      if self._init is not None:
        self._init(*self._token_values)
      return list(self._call(*flat_inputs, *self._token_values))

  def close(self) -> None:
    self._session.close()


class ClientTrainer:
  """Trains clients on one device and accumulates their updates at once.

  Holds `zero` and the chain `work`+`accumulate` of a `CompiledRound`'s
  client pieces. Per round: `begin(broadcast)`, `train(client_input)` for
  each of its clients (each update is folded into the running accumulator
  as soon as it is computed, so memory does not grow with the cohort), then
  `end()` returns the partial accumulator.
  """

  def __init__(self, pieces: dict[str, GraphPiece], device: Optional[str],
               config: tf.compat.v1.ConfigProto):
    config = client_session_config(config, device)
    self._zero = GraphRunner([pieces["zero"]], device, config)
    work, accumulate = pieces["work"], pieces["accumulate"]
    self._train = GraphRunner([work, accumulate], device, config)
    self._broadcast = None
    self._accumulator = None
    self.clients_trained = 0

  def begin(self, broadcast: Sequence[np.ndarray]) -> None:
    self._broadcast = list(broadcast)
    self._accumulator = self._zero()
    self.clients_trained = 0

  def train(self, client_input: Sequence[Any]) -> None:
    """Trains one client (`work`) from the round's broadcast and folds its
    update into the accumulator.

    Args:
      client_input: the client's input to `work`, flattened: its id (str)
        first, then the rest (e.g. its seed, int64 `[2]`).

    Raises:
      errors.ClientDataError: TensorFlow failed on this client (unreadable or
        corrupt data); the accumulator is left as it was.
    """
    client_id, *rest = client_input
    # Parameters: work's (client input, broadcast), then accumulate's
    # accumulator (its update comes from work inside the graph).
    try:
      self._accumulator = self._train(
          np.array(client_id.encode()), *(np.asarray(v) for v in rest),
          *self._broadcast, *self._accumulator)
    except tf.errors.OpError as e:
      raise errors.ClientDataError(
          client_id, (e.message or str(e)).strip().splitlines()[0]) from None
    self.clients_trained += 1

  def end(self) -> list[np.ndarray]:
    accumulator, self._accumulator, self._broadcast = (
        self._accumulator, None, None)
    return accumulator

  def close(self) -> None:
    self._zero.close()
    self._train.close()
