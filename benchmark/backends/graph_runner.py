"""TensorFlow computations of TFF, run by TensorFlow alone (no TFF import).

A `GraphPiece` is one TFF TensorFlow computation as plain data: its
serialized `GraphDef` and the names of the tensors that take its parameter
and give its result, in the order of TFF's depth-first flattening of their
types. `GraphRunner` imports one piece into a `tf.Graph` on a device and runs it
in its own `tf.compat.v1.Session`, as TFF's own TensorFlow executor does:
the piece's initialisation op first (fresh variables on every call), then
its result tensors. `ClientTrainer` holds the client side of a FedAvg round
(`work` chained into `accumulate`, and `zero`), with the round's broadcast
and running sum kept in the session's variables.

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
    parameter_groups: how many of `parameter_names` each element of a
      structured parameter takes, in order (e.g. `work`'s (client input,
      broadcast)); `(len(parameter_names),)` for a parameter that is not a
      structure.
  """
  name: str
  graph_def: bytes
  parameter_names: tuple[str, ...]
  result_names: tuple[str, ...]
  initialize_op: str
  session_token_name: str
  parameter_groups: tuple[int, ...]

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
    parameter = tf_proto.parameter
    parameter_names = tuple(_binding_tensor_names(parameter))
    if parameter.WhichOneof("binding") == "struct":
      groups = tuple(len(_binding_tensor_names(element))
                     for element in parameter.struct.element)
    else:
      groups = (len(parameter_names),)
    return cls(
        name=name, graph_def=graph_def.SerializeToString(),
        parameter_names=parameter_names,
        result_names=tuple(_binding_tensor_names(tf_proto.result)),
        initialize_op=tf_proto.initialize_op,
        session_token_name=tf_proto.session_token_tensor_name,
        parameter_groups=groups)

  def parameter_specs(self) -> list[tf.TensorSpec]:
    """The dtype and shape of each parameter (`parameter_names` order), as
    the piece's placeholders declare them."""
    graph_def = tf.compat.v1.GraphDef.FromString(self.graph_def)
    nodes = {node.name: node for node in graph_def.node}
    specs = []
    for name in self.parameter_names:
      attr = nodes[name.split(":")[0]].attr
      specs.append(tf.TensorSpec(tf.TensorShape(attr["shape"].shape),
                                 tf.dtypes.as_dtype(attr["dtype"].type)))
    return specs


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


@dataclasses.dataclass
class _Imported:
  """A piece imported into a graph: the placeholders it still takes (those
  not mapped to other tensors, in parameter order), its result tensors, its
  initialisation op (or None) and its session-token placeholder (or None)."""
  feeds: list[tf.Tensor]
  outputs: list[tf.Tensor]
  init_op: Optional[tf.Operation]
  token: Optional[tf.Tensor]


def _import_piece(piece: GraphPiece, scope: str,
                  input_map: dict[int, tf.Tensor]) -> _Imported:
  """Imports `piece` into the default graph under `scope`, its parameters
  whose indices are keys of `input_map` taken from those tensors."""
  graph = tf.compat.v1.get_default_graph()
  tf.graph_util.import_graph_def(
      tf.compat.v1.GraphDef.FromString(piece.graph_def),
      input_map={piece.parameter_names[i]: t for i, t in input_map.items()},
      name=scope)
  get = graph.get_tensor_by_name
  return _Imported(
      feeds=[get(f"{scope}/{n}") for i, n in enumerate(piece.parameter_names)
             if i not in input_map],
      outputs=[get(f"{scope}/{n}") for n in piece.result_names],
      init_op=(graph.get_operation_by_name(f"{scope}/{piece.initialize_op}")
               if piece.initialize_op else None),
      token=(get(f"{scope}/{piece.session_token_name}")
             if piece.session_token_name else None))


class GraphRunner:
  """Runs one `GraphPiece` in its own graph and session.

  Each runner owns its variables (a session per runner), so runners may run
  in parallel threads; one runner must not be called from two threads at
  once. Calls release the GIL while TensorFlow computes.
  """

  def __init__(self, piece: GraphPiece, device: Optional[str],
               config: tf.compat.v1.ConfigProto):
    self.name = piece.name
    self._graph = tf.Graph()
    with self._graph.as_default(), tf.device(device):
      imported = _import_piece(piece, "p0", {})
    self.num_parameters = len(imported.feeds)
    self._session = tf.compat.v1.Session(graph=self._graph, config=config)
    tokens = [imported.token] if imported.token is not None else []
    self._token_values = [_SESSION_TOKEN] * len(tokens)
    self._init = (self._session.make_callable(imported.init_op,
                                              feed_list=tokens)
                  if imported.init_op is not None else None)
    self._call = self._session.make_callable(
        imported.outputs, feed_list=imported.feeds + tokens)
    self._lock = threading.Lock()
    self._graph.finalize()

  def __call__(self, *flat_inputs: np.ndarray) -> list[np.ndarray]:
    """Runs the piece on `flat_inputs` (numpy arrays in parameter order);
    returns the results as numpy arrays, in result order.

    Raises:
      ValueError: wrong number of inputs.
      tf.errors.OpError: TensorFlow failed.
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


def _resident(spec: tf.TensorSpec, name: str) -> tuple[tf.Tensor, tf.Tensor]:
  """A resource variable of `spec` in the default graph (uninitialised until
  assigned): returns its handle and a read of it."""
  handle = tf.raw_ops.VarHandleOp(dtype=spec.dtype, shape=spec.shape,
                                  shared_name=name, name=name)
  return handle, tf.raw_ops.ReadVariableOp(resource=handle, dtype=spec.dtype)


class ClientTrainer:
  """Trains clients on one device and accumulates their updates at once.

  Holds the client pieces of a `CompiledRound` (`work`, `zero`,
  `accumulate`) in one graph and session. Per round: `begin(broadcast)`,
  `train(client_input)` for each of its clients, then `end()` returns the
  partial accumulator. The broadcast and the running accumulator stay in
  the session's variables for the whole round: `begin` sets the broadcast
  (one copy in) and the zero accumulator, each `train` feeds only the
  client's input and folds its update (`work` chained into `accumulate`
  inside the graph) into the accumulator's variables, and `end` reads the
  sum (one copy out). So memory does not grow with the cohort, and a
  client costs no copy of the model in or out of TensorFlow (a device
  copy on a GPU). Each piece's initialisation op runs before its every
  call, as TFF runs it.

  One trainer must not be used from two threads at once; trainers may run
  in parallel threads (each owns its session).
  """

  def __init__(self, pieces: dict[str, GraphPiece], device: Optional[str],
               config: tf.compat.v1.ConfigProto):
    work, zero, accumulate = (pieces["work"], pieces["zero"],
                              pieces["accumulate"])
    num_inputs = work.parameter_groups[0]
    num_accumulator = accumulate.parameter_groups[0]
    self._graph = tf.Graph()
    with self._graph.as_default(), tf.device(device):
      broadcast = [_resident(spec, f"broadcast_{i}") for i, spec in
                   enumerate(work.parameter_specs()[num_inputs:])]
      accumulator = [_resident(spec, f"accumulator_{i}") for i, spec in
                     enumerate(accumulate.parameter_specs()[:num_accumulator])]
      self._build_begin(zero, broadcast, accumulator)
      self._build_train(work, accumulate, broadcast, accumulator)
      self._sum = [read for _, read in accumulator]
    self._session = tf.compat.v1.Session(
        graph=self._graph, config=client_session_config(config, device))
    self._graph.finalize()
    self.clients_trained = 0

  def _build_begin(self, zero: GraphPiece, broadcast, accumulator) -> None:
    """Ops of `begin`: the broadcast's variables assigned from placeholders
    (`self._broadcast_feeds`), the accumulator's from `zero`."""
    zero_piece = _import_piece(zero, "zero", {})
    self._broadcast_feeds = [
        tf.compat.v1.placeholder(read.dtype, read.shape)
        for _, read in broadcast]
    self._begin_inits = ([zero_piece.init_op]
                         if zero_piece.init_op is not None else [])
    self._begin_tokens = {t: _SESSION_TOKEN for t in (zero_piece.token,)
                          if t is not None}
    self._begin = tf.group(
        *(tf.raw_ops.AssignVariableOp(resource=handle, value=value)
          for (handle, _), value in zip(broadcast, self._broadcast_feeds)),
        *(tf.raw_ops.AssignVariableOp(resource=handle, value=value)
          for (handle, _), value in zip(accumulator, zero_piece.outputs)))

  def _build_train(self, work: GraphPiece, accumulate: GraphPiece, broadcast,
                   accumulator) -> None:
    """Ops of `train`: `work` on the fed client input and the broadcast's
    variables, `accumulate` of the accumulator's variables and the update,
    assigned back only once all of the new sum is computed."""
    num_inputs = work.parameter_groups[0]
    client = _import_piece(work, "work", {
        num_inputs + i: read for i, (_, read) in enumerate(broadcast)})
    num_accumulator = len(accumulator)
    fold = _import_piece(accumulate, "accumulate", {
        **{i: read for i, (_, read) in enumerate(accumulator)},
        **{num_accumulator + i: t for i, t in enumerate(client.outputs)}})
    with tf.control_dependencies(fold.outputs):
      self._train = tf.group(*(
          tf.raw_ops.AssignVariableOp(resource=handle, value=value)
          for (handle, _), value in zip(accumulator, fold.outputs)))
    self._client_feeds = client.feeds
    self._train_inits = [op for op in (client.init_op, fold.init_op)
                         if op is not None]
    self._train_tokens = {t: _SESSION_TOKEN
                          for t in (client.token, fold.token) if t is not None}

  def _run_inits(self, inits: list, tokens: dict) -> None:
    if inits:
      self._session.run(inits, tokens)

  def _client_feeds_of(self, client_input: Sequence[Any]) -> dict:
    """The feeds of `train`'s run: the client's input (flattened: id
    first) and the session tokens."""
    client_id, *rest = client_input
    feeds = dict(zip(self._client_feeds,
                     [np.array(client_id.encode()), *map(np.asarray, rest)]))
    feeds.update(self._train_tokens)
    return feeds

  def begin(self, broadcast: Sequence[np.ndarray]) -> None:
    """Starts a round: sets the broadcast (flat, in `work`'s order) and a
    zero accumulator."""
    self._run_inits(self._begin_inits, self._begin_tokens)
    feeds = dict(zip(self._broadcast_feeds, broadcast))
    feeds.update(self._begin_tokens)
    self._session.run(self._begin, feeds)
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
    try:
      self._run_inits(self._train_inits, self._train_tokens)
      self._session.run(self._train, self._client_feeds_of(client_input))
    except tf.errors.OpError as e:
      detail = (e.message or str(e)).strip().splitlines()[0]
      raise errors.ClientDataError(client_input[0], detail) from None
    self.clients_trained += 1

  def end(self) -> list[np.ndarray]:
    """The round's partial accumulator, flat (numpy arrays)."""
    return list(self._session.run(self._sum))

  def close(self) -> None:
    self._session.close()
