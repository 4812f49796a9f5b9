"""Tests of the FedAvg backends (benchmark/backends/: factory.py,
mapreduce.py, graph_runner.py, process_guard.py, ray_actors.py): the same
round on every backend, the DP noise, no socket and no process left behind
(see tests/round_harness.py for how rounds are made deterministic and what
tolerance they are compared with).
"""

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from benchmark.backends import factory
from benchmark.backends import graph_runner
from benchmark.backends import mapreduce
from benchmark.backends import ray_actors
from benchmark.core import constants
from benchmark.core import errors
from benchmark.core.errors import FlairInputError
from benchmark.data import pipeline
from benchmark.training import cohorts
from benchmark.training import config as config_lib
from benchmark.training import dp
from benchmark.training import seeds
import round_harness


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fedavg", "dp_noise0", "every_user"])
def test_one_round_is_the_same_on_every_backend(prepared_sample_dir,
                                                monkeypatch, variant):
  """The tiny network (round_harness.CLIENT_SETTINGS): the backends run
  whatever computation TFF compiled, whatever the network. (ResNet-18's
  full set of weights through TFF's worker: tests/model/test_resnet.py's
  test_one_federated_round_in_tff.) `every_user`: a round of all the
  sample's training users, one to five images each (FLAIR's many small
  clients), where the in-process and Ray client sessions run without
  Grappler (`graph_runner.client_session_config`) and TFF's worker with
  its own."""
  if variant in ("fedavg", "every_user"):
    aggregator = tff.learning.add_debug_measurements(
        tff.aggregators.MeanFactory())
  else:  # Adaptive clipping with no noise: deterministic.
    aggregator = dp.build_aggregator(0.0, round_harness.COHORT_SIZE, 0.1, 0.5)
  process, weights, client_ids = round_harness.build(
      prepared_sample_dir, aggregator, weighted=variant != "dp_noise0")
  cohort = (cohorts.client_inputs(client_ids, 1) if variant == "every_user"
            else round_harness.cohort_of(client_ids))
  results = {}
  for name in (constants.BACKEND_INPROCESS, constants.BACKEND_TFF_WORKER,
               constants.BACKEND_RAY):
    state = None if not results else results["inprocess"]["initial"]
    results[name] = round_harness.run_one_round(
        name, process, weights, cohort, state=state,
        num_workers=2 if name == constants.BACKEND_RAY else None)
  want = results[constants.BACKEND_INPROCESS]
  # The initial state (weights set, optimizer state zero) is the same.
  round_harness.assert_close(results["tff_worker"]["initial"],
                             want["initial"], "initial")
  for name in (constants.BACKEND_TFF_WORKER, constants.BACKEND_RAY):
    for part in ("state", "metrics", "model_weights"):
      round_harness.assert_close(results[name][part], want[part],
                                 f"{name} {part}")
  # The round did something: weights moved by about a server Adam step
  # (lr 0.1 x g / (|g| + 0.01); with DP the clip of 0.1 makes g ~1e-5, so
  # the largest move was 5e-4).
  moved = max(np.abs(a - b).max() for a, b in zip(
      mapreduce.to_flat(want["model_weights"]), mapreduce.to_flat(weights)))
  assert moved > (1e-4 if variant == "dp_noise0" else 1e-3)
  train = want["metrics"]["client_work"]["train"]
  images = sum(sum(1 for _ in tf.data.TFRecordDataset(path)) for path in
               pipeline.partition_files(prepared_sample_dir,
                                        constants.TRAIN).values())
  assert int(train["num_examples"]) == (
      images if variant == "every_user" else 16)  # 5 + 5 + 1 + 5 images.


@pytest.mark.slow
def test_dp_round_adds_noise_of_the_stated_stddev(prepared_sample_dir):
  """Fixed clipping at 0.1, noise multiplier 1, 3 clients whose updates are
  ~0 (client learning rate 1e-12): the averaged update is the noise alone,
  N(0, (z * clip / cohort)^2) per weight, and its L2 norm over D weights is
  that stddev times sqrt(D) to within 1/sqrt(2D) (the tiny network's
  D = 82k: 0.25%, so the 1% tolerance is 4 standard deviations). Run
  in-process: the other backends run the same noise-adding graph (Ray) or
  TFF's own runtime of the same aggregator (`tff_worker`), and equal the
  in-process round when the noise is 0
  (test_one_round_is_the_same_on_every_backend)."""
  z, clip, cohort_size = 1.0, 0.1, 3
  aggregator = dp.build_aggregator(z, cohort_size, clip, 0.0)
  process, weights, client_ids = round_harness.build(
      prepared_sample_dir, aggregator, weighted=False,
      clients_per_round=cohort_size, client_learning_rate=1e-12)
  result = round_harness.run_one_round(
      constants.BACKEND_INPROCESS, process, weights,
      round_harness.cohort_of(client_ids)[:cohort_size])
  num_weights = sum(w.size for w in weights.trainable)
  norm = float(result["metrics"]["aggregator"]["server_update_norm"])
  stddev = dp.sum_noise_multiplier(z, cohort_size, adaptive=False) * clip
  assert norm / np.sqrt(num_weights) == pytest.approx(stddev / cohort_size,
                                                      rel=0.01)


@pytest.mark.slow
def test_non_ascii_client_ids_train_on_tff_workers_as_in_process(
    prepared_sample_dir, tmp_path):
  """User ids that prepare accepts but are not ASCII (an accent in NFC and
  in NFD, CJK) name clients on TFF's worker as in process: TFF 0.87's
  serialization refuses non-ASCII Python strings, so the backend sends the
  ids as UTF-8 bytes."""
  data = tmp_path / "tfrecords"
  shutil.copytree(prepared_sample_dir, data)
  train = data / constants.TRAIN
  old_ids = sorted(p.stem for p in train.glob("*.tfrecords"))
  new_ids = ["caf\u00e9", "cafe\u0301", "\u5199\u771f"]
  for old, new in zip(old_ids, new_ids):
    os.rename(train / f"{old}.tfrecords", train / f"{new}.tfrecords")
  process, weights, client_ids = round_harness.build(
      str(data), tff.learning.add_debug_measurements(
          tff.aggregators.MeanFactory()), weighted=True, clients_per_round=3)
  assert set(new_ids) <= set(client_ids)
  cohort = [(client_id, seeds.client_seed(0, 1, client_ids.index(client_id)))
            for client_id in new_ids]
  results = {name: round_harness.run_one_round(name, process, weights, cohort)
             for name in (constants.BACKEND_INPROCESS,
                          constants.BACKEND_TFF_WORKER)}
  want = results[constants.BACKEND_INPROCESS]
  assert int(want["metrics"]["client_work"]["train"]["num_examples"]) > 0
  for part in ("metrics", "model_weights"):
    round_harness.assert_close(results[constants.BACKEND_TFF_WORKER][part],
                               want[part], f"tff_worker {part}")


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


def test_graph_runner_runs_a_tff_computation():
  @tff.tensorflow.computation(np.float32, np.float32)
  def add(x, y):
    return x + y

  runner = graph_runner.GraphRunner(
      graph_runner.GraphPiece.from_computation("add", add), None,
      graph_runner.session_config(1))
  assert runner(np.float32(2), np.float32(3)) == [5.0]
  with pytest.raises(ValueError, match="takes 2 values"):
    runner(np.float32(1))
  runner.close()


def _toy_client_pieces() -> dict[str, graph_runner.GraphPiece]:
  """`work`: a client (id, seed) and a broadcast `[3]` give the update
  broadcast * float(id) + seed[0] (an id that is not a number fails, as
  unreadable data does); `zero` and `accumulate` sum the updates."""
  client_type = (tff.TensorType(np.str_), tff.TensorType(np.int64, [2]))

  @tff.tensorflow.computation(client_type, tff.TensorType(np.float32, [3]))
  def work(client, broadcast):
    return (broadcast * tf.strings.to_number(client[0])
            + tf.cast(client[1][0], tf.float32))

  @tff.tensorflow.computation
  def zero():
    return tf.zeros([3], tf.float32)

  @tff.tensorflow.computation(tff.TensorType(np.float32, [3]),
                              tff.TensorType(np.float32, [3]))
  def accumulate(total, update):
    return total + update

  return {name: graph_runner.GraphPiece.from_computation(name, computation)
          for name, computation in (("work", work), ("zero", zero),
                                    ("accumulate", accumulate))}


def test_client_trainer_keeps_the_broadcast_and_the_sum_for_a_round():
  """The broadcast set at `begin` serves every client of the round, each
  update is added to the sum kept in the session, a failing client leaves
  the sum as it was, and the next round starts from zero."""
  pieces = _toy_client_pieces()
  assert pieces["work"].parameter_groups == (2, 1)
  assert pieces["accumulate"].parameter_groups == (1, 1)
  trainer = graph_runner.ClientTrainer(pieces, None,
                                       graph_runner.session_config(1))
  trainer.begin([np.array([1, 2, 3], np.float32)])
  trainer.train(("2", np.array([5, 0])))
  with pytest.raises(errors.ClientDataError, match="bad"):
    trainer.train(("bad", np.array([100, 0])))
  trainer.train(("1", np.array([0, 0])))
  np.testing.assert_array_equal(trainer.end(), [[8, 11, 14]])
  assert trainer.clients_trained == 2
  np.testing.assert_array_equal(trainer.end(), [[8, 11, 14]])  # Unchanged.
  trainer.begin([np.array([1, 1, 1], np.float32)])
  assert trainer.clients_trained == 0
  np.testing.assert_array_equal(trainer.end(), [[0, 0, 0]])
  trainer.train(("3", np.array([1, 0])))
  np.testing.assert_array_equal(trainer.end(), [[4, 4, 4]])
  trainer.close()


def test_client_sessions_run_without_grappler_on_the_cpu_only():
  """The rounds' pieces were optimized when TFF compiled them; on the CPU
  the clients' sessions skip Grappler (it re-optimized every client's
  dataset functions), on a GPU they keep it (layouts, fused kernels)."""
  config = graph_runner.session_config(2)
  off = graph_runner.client_session_config(config, "/device:CPU:0")
  assert off.graph_options.rewrite_options.disable_meta_optimizer
  assert off.intra_op_parallelism_threads == 2  # The rest kept.
  assert not config.graph_options.rewrite_options.disable_meta_optimizer
  kept = graph_runner.client_session_config(config, "/device:GPU:0")
  assert not kept.graph_options.rewrite_options.disable_meta_optimizer
  # No device named: TensorFlow's choice, the CPU on this GPU-less machine.
  assert not tf.config.list_physical_devices("GPU")
  assert graph_runner.client_session_config(
      config, None).graph_options.rewrite_options.disable_meta_optimizer


def test_open_backend_rejects_bad_choices():
  with pytest.raises(FlairInputError, match="--backend"):
    with factory.open_backend("gpu", None, 1):
      pass
  with pytest.raises(FlairInputError, match="--num_workers"):
    with factory.open_backend("inprocess", None, 1, num_workers=0):
      pass
  paths = {"tfrecords_dir": "x", "save_model_dir": "unused"}
  with pytest.raises(FlairInputError, match="--ray_address"):
    config_lib.build(config_lib.FederatedConfig,
                     dict(paths, ray_address="1.2.3.4:6379"))
  with pytest.raises(FlairInputError, match="--backend"):
    config_lib.build(config_lib.FederatedConfig, dict(paths, backend="gpu"))


def test_ray_actors_are_one_per_gpu_else_one_per_node_using_its_cores():
  nodes = [{"Alive": True, "Resources": {"CPU": 8.0}},
           {"Alive": True, "Resources": {"CPU": 4.0}},
           {"Alive": False, "Resources": {"CPU": 16.0}},  # Gone.
           {"Alive": True, "Resources": {"memory": 1e9}}]  # No CPU.
  # No GPU: one actor per alive node with CPUs, as many threads as the
  # smallest has, spread over the nodes.
  assert ray_actors.ray_actor_plan({"CPU": 12.0}, nodes, None) == (
      2, {"num_cpus": 4, "scheduling_strategy": "SPREAD"}, 4)
  # --num_workers N: N actors share the cluster's cores.
  assert ray_actors.ray_actor_plan({"CPU": 12.0}, nodes, 3) == (
      3, {"num_cpus": 4}, 4)
  assert ray_actors.ray_actor_plan({"CPU": 2.0}, nodes, 5) == (
      5, {"num_cpus": 1}, 1)
  # GPUs: one actor per GPU (or N), each with a GPU and TF's own threads.
  assert ray_actors.ray_actor_plan({"CPU": 12.0, "GPU": 3.0}, nodes, None) == (
      3, {"num_gpus": 1, "num_cpus": 1}, 0)
  assert ray_actors.ray_actor_plan({"CPU": 12.0, "GPU": 3.0}, nodes, 6)[0] == 6


class _FakeCluster:
  """What `RayBackend` asks of Ray to replace lost actors: two one-CPU
  nodes, the actors started so far, and the CPUs they leave free."""

  def __init__(self, nodes_alive, free_cpus):
    self.nodes_alive, self.free_cpus, self.started = nodes_alive, free_cpus, []

  def cluster_resources(self):
    return {"CPU": float(self.nodes_alive)}

  def nodes(self):
    return [{"Alive": True, "Resources": {"CPU": 1.0}}] * self.nodes_alive

  def available_resources(self):
    return {"CPU": float(self.free_cpus)}

  def options(self, **options):
    assert options["num_cpus"] == 1
    return self

  def remote(self, *args):
    del args
    self.started.append(f"actor{len(self.started)}")
    return self.started[-1]


def test_lost_ray_actors_are_replaced_when_the_cluster_has_room():
  """One actor per node; one node's actor was lost. While the node is
  gone, or back but its CPU taken, nothing starts; once it is back with a
  free CPU, one actor starts in place of the lost one."""
  fake = _FakeCluster(nodes_alive=1, free_cpus=0)
  backend = object.__new__(ray_actors.RayBackend)
  backend._ray, backend._num_workers = fake, None  # pylint: disable=protected-access
  backend._actor_class, backend._pieces = fake, None  # pylint: disable=protected-access
  backend._actors = ["survivor"]  # pylint: disable=protected-access
  backend._replace_lost_actors()  # pylint: disable=protected-access
  fake.nodes_alive = 2  # Back, but its CPU is in use.
  backend._replace_lost_actors()  # pylint: disable=protected-access
  assert backend._actors == ["survivor"] and not fake.started  # pylint: disable=protected-access
  fake.free_cpus = 1
  backend._replace_lost_actors()  # pylint: disable=protected-access
  assert backend._actors == ["survivor", "actor0"]  # pylint: disable=protected-access
  backend._replace_lost_actors()  # pylint: disable=protected-access
  assert len(backend._actors) == 2  # pylint: disable=protected-access
