"""Tests of the FedAvg backends (benchmark/backends.py, mapreduce.py,
graph_runner.py): the same round on every backend, the DP noise, no socket
and no process left behind.

The equivalence tests make client training deterministic so that backends
can be compared exactly: the model's random crop and flip are replaced by
their inference behaviour (centre crop, no flip) while the process is
built, and each client's images fit in one batch (so the data's shuffle
order does not matter). What remains is float32 summation order: TFF's
worker, the in-process runner and two Ray actors add client updates in
different orders, which changes results in the last bits (measured: at most
1.2e-7 on weights of order 0.1); 1e-5 absolute leaves two orders of
magnitude of margin and is far below one server Adam step (1e-2 here).
"""

import os
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from benchmark import backends
from benchmark import constants
from benchmark import data
from benchmark import dp
from benchmark import federated
from benchmark import graph_runner
from benchmark import mapreduce
from benchmark import model as model_lib
from benchmark import process_guard
from benchmark import tff_runtime
from benchmark.errors import FlairInputError

ATOL = 1e-5
COHORT_SIZE = 4
# One batch per client: no user of the sample has more than 8 images.
CLIENT_SETTINGS = dict(image_height=32, image_width=32, client_batch_size=8,
                       max_elements_per_client=8, client_epochs_per_round=1,
                       clients_per_round=COHORT_SIZE, show_progress=False)


def _listening_inodes() -> set[str]:
  """Socket inodes in LISTEN state (TCP, IPv4 and IPv6) on this machine."""
  inodes = set()
  for path in ("/proc/net/tcp", "/proc/net/tcp6"):
    with open(path, encoding="ascii") as f:
      for line in f.readlines()[1:]:
        fields = line.split()
        if fields[3] == "0A":  # TCP_LISTEN
          inodes.add(fields[9])
  return inodes


def _own_socket_inodes() -> set[str]:
  inodes = set()
  for fd in os.listdir("/proc/self/fd"):
    try:
      target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
      continue
    if target.startswith("socket:["):
      inodes.add(target[len("socket:["):-1])
  return inodes


def _alive(processes: dict[int, str]) -> set[int]:
  """The processes of `processes` (pid -> start time, as
  `process_guard.descendants` gives) still running."""
  running = process_guard.descendants(1)
  return {pid for pid, start in processes.items()
          if running.get(pid) == start}


def _deterministic_augmentation(monkeypatch):
  """Centre crop and no flip also when training (see module docstring)."""
  for cls in (model_lib.CropImages, model_lib.RandomHorizontalFlip):
    original = cls.call

    def call(self, images, training=None, _original=original):
      del training
      return _original(self, images, training=False)

    monkeypatch.setattr(cls, "call", call)


def _build(tfrecords_dir, aggregator, weighted, **overrides):
  config = federated.FederatedConfig(
      tfrecords_dir=tfrecords_dir, save_model_dir="unused",
      **dict(CLIENT_SETTINGS, **overrides))
  label_spec = data.load_label_spec(tfrecords_dir)
  train = data.load_partition(tfrecords_dir, constants.TRAIN, label_spec)
  _, composed = federated.build_learning_process(
      config, label_spec, train, aggregator, weighted=weighted)
  keras_model = model_lib.resnet18(
      num_classes=label_spec.num_outputs, crop_size=(32, 32), seed=3)
  weights = tff.learning.models.ModelWeights(
      trainable=[w.numpy() for w in keras_model.trainable_weights],
      non_trainable=[w.numpy() for w in keras_model.non_trainable_weights])
  return composed, weights, sorted(train.client_ids)


def _cohort(client_ids):
  # Users with 5 images and users with 1 (the sample's sizes), so the
  # weighted mean differs from the unweighted one.
  return [client_ids[i] for i in (4, 5, 0, 7)]


def _run_one_round(name, composed, weights, cohort, state=None, **kwargs):
  with backends.open_backend(name, composed, len(cohort), **kwargs) as backend:
    initial = backend.initialize(weights)
    backend.set_state(initial if state is None else state)
    metrics = backend.run_round(cohort)
    new_state = backend.get_state()
    model_weights = backend.get_model_weights()
    processes = process_guard.descendants(os.getpid())
    if name == backends.BACKEND_INPROCESS:
      # No listening socket while the in-process backend runs.
      assert not _listening_inodes() & _own_socket_inodes()
  # Whatever the backend started (TFF worker, Ray's processes) is stopped.
  deadline = time.monotonic() + 30
  while _alive(processes) and time.monotonic() < deadline:
    time.sleep(0.5)
  assert not _alive(processes), f"{name} left processes {_alive(processes)}"
  return dict(initial=initial, metrics=metrics, state=new_state,
              model_weights=model_weights)


def _assert_close(got, want, what):
  got_flat, want_flat = mapreduce.to_flat(got), mapreduce.to_flat(want)
  assert len(got_flat) == len(want_flat), what
  for i, (g, w) in enumerate(zip(got_flat, want_flat)):
    if w.dtype.kind in "biuf":
      np.testing.assert_allclose(g, w, atol=ATOL, rtol=ATOL,
                                 err_msg=f"{what}, leaf {i}")
    else:  # Strings (a DP query's state holds some).
      np.testing.assert_array_equal(g, w, err_msg=f"{what}, leaf {i}")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fedavg", "dp_noise0"])
def test_one_round_is_the_same_on_every_backend(prepared_sample_dir,
                                                monkeypatch, variant):
  _deterministic_augmentation(monkeypatch)
  if variant == "fedavg":
    aggregator = tff.learning.add_debug_measurements(
        tff.aggregators.MeanFactory())
  else:  # Adaptive clipping with no noise: deterministic.
    aggregator = dp.build_aggregator(0.0, COHORT_SIZE, 0.1, 0.5)
  composed, weights, client_ids = _build(prepared_sample_dir, aggregator,
                                         weighted=variant == "fedavg")
  cohort = _cohort(client_ids)
  results = {}
  for name in (backends.BACKEND_INPROCESS, backends.BACKEND_TFF_WORKER,
               backends.BACKEND_RAY):
    state = None if not results else results["inprocess"]["initial"]
    results[name] = _run_one_round(
        name, composed, weights, cohort, state=state,
        num_workers=2 if name == backends.BACKEND_RAY else None)
  want = results[backends.BACKEND_INPROCESS]
  # The initial state (weights set, optimizer state zero) is the same.
  _assert_close(results["tff_worker"]["initial"], want["initial"], "initial")
  for name in (backends.BACKEND_TFF_WORKER, backends.BACKEND_RAY):
    _assert_close(results[name]["state"], want["state"], f"{name} state")
    _assert_close(results[name]["metrics"], want["metrics"],
                  f"{name} metrics")
    _assert_close(results[name]["model_weights"], want["model_weights"],
                  f"{name} model weights")
  # The round did something: weights moved by about a server Adam step
  # (lr 0.1 x g / (|g| + 0.01); with DP the clip of 0.1 makes g ~1e-5, so
  # the largest move was 5e-4).
  moved = max(np.abs(a - b).max() for a, b in zip(
      mapreduce.to_flat(want["model_weights"]), mapreduce.to_flat(weights)))
  assert moved > (1e-3 if variant == "fedavg" else 1e-4)
  train = want["metrics"]["client_work"]["train"]
  assert int(train["num_examples"]) == 16  # 5 + 5 + 1 + 5 images.


@pytest.mark.slow
@pytest.mark.parametrize("name", [backends.BACKEND_INPROCESS,
                                  backends.BACKEND_TFF_WORKER])
def test_dp_round_adds_noise_of_the_stated_stddev(prepared_sample_dir, name):
  """Fixed clipping at 0.1, noise multiplier 1, 3 clients whose updates are
  ~0 (client learning rate 1e-12): the averaged update is the noise alone,
  N(0, (z * clip / cohort)^2) per weight, and its L2 norm over D weights is
  that stddev times sqrt(D) to within 1/sqrt(2D) (D = 11M: 0.02%)."""
  z, clip, cohort_size = 1.0, 0.1, 3
  aggregator = dp.build_aggregator(z, cohort_size, clip, 0.0)
  composed, weights, client_ids = _build(
      prepared_sample_dir, aggregator, weighted=False,
      clients_per_round=cohort_size, client_learning_rate=1e-12)
  result = _run_one_round(name, composed, weights, client_ids[:cohort_size])
  num_weights = sum(w.size for w in weights.trainable)
  norm = float(result["metrics"]["aggregator"]["server_update_norm"])
  stddev = dp.sum_noise_multiplier(z, cohort_size, adaptive=False) * clip
  assert norm / np.sqrt(num_weights) == pytest.approx(stddev / cohort_size,
                                                      rel=0.01)


def test_flat_values_round_trip_through_tff_types():
  weights = tff.learning.models.ModelWeights(
      trainable=[np.arange(3, dtype=np.float32), np.ones((2, 2), np.float32)],
      non_trainable=[np.zeros(1, np.float32)])
  type_spec = tff.types.type_conversions.infer_type(weights)
  flat = mapreduce.to_flat(weights)
  assert [f.shape for f in flat] == [(3,), (2, 2), (1,)]
  back = mapreduce.from_flat(flat, type_spec)
  assert isinstance(back, tff.learning.models.ModelWeights)
  np.testing.assert_array_equal(back.trainable[0], [0, 1, 2])
  with pytest.raises(ValueError):
    mapreduce.from_flat(flat + [np.zeros(1)], type_spec)


def test_graph_runner_runs_a_tff_computation_and_chains_two():
  @tff.tensorflow.computation(np.float32, np.float32)
  def add(x, y):
    return x + y

  @tff.tensorflow.computation(np.float32, np.float32)
  def scale(x, y):
    return x * y

  config = graph_runner.session_config(1)
  single = graph_runner.GraphRunner(
      [graph_runner.GraphPiece.from_computation("add", add)], None, config)
  assert single(np.float32(2), np.float32(3)) == [5.0]
  # Chain: scale(x, add(a, b)); the chain takes add's (a, b) then x.
  chain = graph_runner.GraphRunner(
      [graph_runner.GraphPiece.from_computation("add", add),
       graph_runner.GraphPiece.from_computation("scale", scale)],
      None, config)
  assert chain.num_parameters == 3
  assert chain(np.float32(2), np.float32(3), np.float32(4)) == [20.0]
  with pytest.raises(ValueError, match="takes 3 values"):
    chain(np.float32(1))
  single.close()
  chain.close()


def test_open_backend_rejects_bad_choices():
  with pytest.raises(FlairInputError, match="--backend"):
    with backends.open_backend("gpu", None, 1):
      pass
  with pytest.raises(FlairInputError, match="--num_workers"):
    with backends.open_backend("inprocess", None, 1, num_workers=0):
      pass
  with pytest.raises(FlairInputError, match="--ray_address"):
    federated.FederatedConfig(tfrecords_dir="x", ray_address="1.2.3.4:6379")
  with pytest.raises(FlairInputError, match="--backend"):
    federated.FederatedConfig(tfrecords_dir="x", backend="gpu")
