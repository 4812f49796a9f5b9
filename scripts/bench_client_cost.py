"""What one small client costs in a client trainer, two trainers
interleaved in one process.

    python scripts/bench_client_cost.py [--tfrecords_dir T] [--crop 64] \
        [--clients 8] [--repeats 5] [--epochs 1] \
        [--compare resident|grappler] [--trace]

Both trainers run the same compiled round (the product's learning process:
ResNet-18 with GroupNorm, client SGD 0.1 with per-weight clipping, batch
16, `--epochs` epochs) from the same broadcast, on the `--clients` training
users with the fewest images (ties by id; one image each on the real
sample). A one-image client takes one step per epoch, so the difference
between `--epochs 2` and `--epochs 1` is what one more step of one image
costs, the step's passes over the whole model included.
`--compare resident` (the default): "fed", a trainer that feeds the
broadcast and the running accumulator into every client's session call and
fetches the accumulator back (how `graph_runner.ClientTrainer` worked
before), against "resident", the product's `ClientTrainer` (the broadcast
and the sum stay in the session's variables for the round); both with the
clients' session configuration (`graph_runner.client_session_config`).
`--compare grappler`: the product's trainer with the sessions' Grappler on
(`graph_runner.session_config` as the backends pass it) and off (as the
client trainers use it on the CPU). Each repeat times every client on one
trainer, then on the other; prints milliseconds per client (median of the
repeats, every repeat beside it) and a checksum of each trainer's
accumulator (the same computation gives the same sum).

With `--trace`, one more client on the product's trainer runs with
TensorFlow's FULL_TRACE step statistics, and the op types that took the
most time are printed (tracing slows the call down; read the shares);
then, untraced, how long the client's graph takes run up to each of its
stages (the iterator made, the training loop ended, the model delta
checked, the whole client), and what one elementwise pass over the whole
model (a `Sub` of two copies of the broadcast's weights) takes: the unit
of the client update's per-step and per-client passes.
Without `--tfrecords_dir` a population of 40 users is generated
(`benchmark.prepare.synthetic`) and prepared in a temporary directory.
"""

import collections
import os
import statistics
import sys
import tempfile
import time
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from benchmark.backends import factory
from benchmark.backends import graph_runner
from benchmark.core import constants
from benchmark.data import label_sets
from benchmark.data import pipeline
from benchmark.training import cohorts
from benchmark.training import config as config_lib
from benchmark.training import fedavg
from benchmark.training import models
# pylint: enable=g-import-not-at-top,wrong-import-position

_TFRECORDS_DIR = flags.DEFINE_string(
    "tfrecords_dir", None, "Prepared TFRecords; default: a generated sample.")
_CROP = flags.DEFINE_integer("crop", 64, "Square crop size in pixels.")
_CLIENTS = flags.DEFINE_integer("clients", 8, "Clients timed per repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Repeats of each trainer.")
_EPOCHS = flags.DEFINE_integer("epochs", 1, "Client epochs per round.")
_COMPARE = flags.DEFINE_enum(
    "compare", "resident", ["resident", "grappler"],
    "resident: feeding the broadcast and the sum per client against keeping "
    "them in the session; grappler: the sessions' Grappler on against off.")
_TRACE = flags.DEFINE_boolean("trace", False,
                              "Also print a step profile of one client.")


def _smallest_users(tfrecords_dir: str, count: int) -> list[str]:
  sizes = {client_id: sum(1 for _ in tf.data.TFRecordDataset(path))
           for client_id, path in pipeline.partition_files(
               tfrecords_dir, constants.TRAIN).items()}
  return sorted(sizes, key=lambda u: (sizes[u], u))[:count]


class _FedTrainer:
  """The baseline of `--compare resident`: `work` chained into `accumulate`
  in one graph, the broadcast and the accumulator fed into every client's
  call and the new accumulator fetched back (the same pieces and ops as
  `graph_runner.ClientTrainer`, without its resident variables)."""

  # pylint: disable=protected-access
  def __init__(self, pieces, device, config):
    work, accumulate = pieces["work"], pieces["accumulate"]
    self._zero = graph_runner.GraphRunner(pieces["zero"], device, config)
    graph = tf.Graph()
    with graph.as_default(), tf.device(device):
      client = graph_runner._import_piece(work, "work", {})
      fold = graph_runner._import_piece(accumulate, "accumulate", {
          len(accumulate.parameter_names) - len(client.outputs) + i: t
          for i, t in enumerate(client.outputs)})
    tokens = [t for t in (client.token, fold.token) if t is not None]
    self._session = tf.compat.v1.Session(graph=graph, config=config)
    self._tokens = {t: graph_runner._SESSION_TOKEN for t in tokens}
    self._inits = [op for op in (client.init_op, fold.init_op)
                   if op is not None]
    self._feeds, self._outputs = client.feeds + fold.feeds, fold.outputs
    self._broadcast = self._accumulator = None

  def begin(self, broadcast):
    self._broadcast, self._accumulator = list(broadcast), self._zero()

  def train(self, client_input):
    client_id, *rest = client_input
    values = [np.array(client_id.encode()), *map(np.asarray, rest),
              *self._broadcast, *self._accumulator]
    self._session.run(self._inits, self._tokens)
    self._accumulator = self._session.run(
        self._outputs, {**dict(zip(self._feeds, values)), **self._tokens})

  def end(self):
    return self._accumulator

  def close(self):
    self._zero.close()
    self._session.close()
  # pylint: enable=protected-access


def _print_trace(trainer: graph_runner.ClientTrainer, broadcast,
                 client_input) -> None:
  """One traced client on the product's trainer; prints the op types with
  the most time."""
  # pylint: disable=protected-access
  trainer.begin(broadcast)
  trainer._run_inits(trainer._train_inits, trainer._train_tokens)
  metadata = tf.compat.v1.RunMetadata()
  trainer._session.run(
      trainer._train, feed_dict=trainer._client_feeds_of(client_input),
      options=tf.compat.v1.RunOptions(
          trace_level=tf.compat.v1.RunOptions.FULL_TRACE),
      run_metadata=metadata)
  # pylint: enable=protected-access
  by_type, count = collections.Counter(), collections.Counter()
  for device in metadata.step_stats.dev_stats:
    for node in device.node_stats:
      op = node.timeline_label.split("(")[0].split("=")[-1].strip() or "?"
      by_type[op] += node.all_end_rel_micros / 1000
      count[op] += 1
  total = sum(by_type.values())
  print(f"traced client: {total:.1f} ms of op time; by op type:")
  for op, ms in by_type.most_common(15):
    print(f"  {ms:7.1f} ms {100 * ms / total:5.1f}% {count[op]:5d} ops  {op}")


def _print_stages(trainer: graph_runner.ClientTrainer, broadcast,
                  client_input) -> None:
  """Untraced: the median time of running the product's trainer's client
  graph only up to each stage's ops (TensorFlow runs just what those
  need): the dataset's iterator made, the training loop ended (the
  dataset read and the steps), the model delta's finiteness checked, and
  the whole client (with the weighting and the sum)."""
  # pylint: disable=protected-access
  operations = trainer._graph.get_operations()
  stages = {
      "iterator made": [op for op in operations if op.type == "MakeIterator"],
      "loop ended (data and steps)": [
          op for op in operations
          if op.type == "Exit" and op.name.startswith("work/")],
      "delta checked (finite)": [
          op for op in operations
          if op.type == "All" and op.name.startswith("work/")],
      "whole client": [trainer._train],
  }
  feeds = trainer._client_feeds_of(client_input)
  trainer.begin(broadcast)
  print("untraced, run up to each stage (median of 15):")
  for name, targets in stages.items():
    times = []
    for _ in range(15):
      start = time.perf_counter()
      trainer._session.run(targets, feeds)
      times.append(1000 * (time.perf_counter() - start))
    print(f"  {statistics.median(times):7.1f} ms  {name} ({len(targets)} ops)")
  # pylint: enable=protected-access


def _print_model_pass(broadcast) -> None:
  """Prints the median time of `a - b` over every weight of `broadcast`
  (one elementwise pass over the model, as TensorFlow runs it here)."""
  weights = [tf.constant(a) for a in broadcast if a.dtype == np.float32]
  others = [w + 1 for w in weights]
  model_pass = tf.function(lambda: [a - b for a, b in zip(weights, others)])
  model_pass()
  times = []
  for _ in range(21):
    start = time.perf_counter()
    model_pass()
    times.append(1000 * (time.perf_counter() - start))
  floats = sum(int(np.prod(w.shape)) for w in weights)
  print(f"one elementwise pass over the model ({floats / 1e6:.1f}M floats, "
        f"{4 * floats / 1e6:.0f} MB): {statistics.median(times):.1f} ms")


def _trainers(pieces) -> dict:
  """The two trainers `--compare` names, baseline first."""
  config = graph_runner.session_config(0)
  product = graph_runner.ClientTrainer(pieces, "/device:CPU:0", config)
  if _COMPARE.value == "resident":
    return {"fed": _FedTrainer(pieces, "/device:CPU:0",
                               graph_runner.client_session_config(
                                   config, "/device:CPU:0")),
            "resident": product}
  with mock.patch.object(
      graph_runner, "client_session_config", lambda c, d: c):
    on = graph_runner.ClientTrainer(pieces, "/device:CPU:0", config)
  return {"grappler on": on, "grappler off": product}


def _benchmark(tfrecords_dir: str) -> None:
  config = config_lib.build(config_lib.FederatedConfig, dict(
      tfrecords_dir=tfrecords_dir, save_model_dir=tempfile.gettempdir(),
      client_epochs_per_round=_EPOCHS.value, client_batch_size=16,
      clients_per_round=_CLIENTS.value, image_height=_CROP.value,
      image_width=_CROP.value, show_progress=False))
  label_spec = label_sets.load_label_spec(tfrecords_dir)
  train = pipeline.load_partition(tfrecords_dir, constants.TRAIN, label_spec)
  cohort = cohorts.client_inputs(
      _smallest_users(tfrecords_dir, _CLIENTS.value), 1)
  weights = models.model_weights(
      models.build_model(config.model, label_spec.num_outputs))
  process = fedavg.build_learning_process(config, label_spec, train,
                                          tff.aggregators.MeanFactory())
  with factory.open_backend("inprocess", process, len(cohort)) as backend:
    backend.set_state(backend.initialize(weights))
    # pylint: disable-next=protected-access
    compiled, state = backend._compiled, backend._state
    broadcast = backend._server.prepare(state)  # pylint: disable=protected-access
  trainers = _trainers(compiled.client_pieces)
  names = list(trainers)
  times = {name: [] for name in trainers}
  for trainer in trainers.values():  # Warm-up: the sessions' first run.
    trainer.begin(broadcast)
    trainer.train(cohort[0])
  for _ in range(_REPEATS.value):
    for name, trainer in trainers.items():
      trainer.begin(broadcast)
      start = time.perf_counter()
      for client_input in cohort:
        trainer.train(client_input)
      times[name].append(1000 * (time.perf_counter() - start) / len(cohort))
  for name, trainer in trainers.items():
    checksum = sum(float(np.sum(a, dtype=np.float64)) for a in trainer.end())
    print(f"{name:12s} {statistics.median(times[name]):7.1f} ms per client "
          f"(repeats: {' '.join(f'{t:.0f}' for t in times[name])}); "
          f"accumulator checksum {checksum:.10g}")
  ratio = statistics.median(times[names[1]]) / statistics.median(
      times[names[0]])
  print(f"ratio {names[1]} / {names[0]}: {ratio:.3f}")
  if _TRACE.value:
    _print_trace(trainers[names[1]], broadcast, cohort[0])
    _print_stages(trainers[names[1]], broadcast, cohort[0])
    _print_model_pass(broadcast)
  for trainer in trainers.values():
    trainer.close()


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if _TFRECORDS_DIR.value:
    _benchmark(_TFRECORDS_DIR.value)
    return
  from benchmark.prepare import synthetic  # pylint: disable=g-import-not-at-top
  from benchmark.prepare import tfrecords  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as root:
    synthetic.generate(os.path.join(root, "dataset"), num_users=40, seed=0)
    tfrecords.prepare(os.path.join(root, "dataset"),
                      os.path.join(root, "tfrecords"), show_progress=False)
    _benchmark(os.path.join(root, "tfrecords"))


if __name__ == "__main__":
  app.run(main)
