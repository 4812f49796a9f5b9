"""Tests of the server/client optimizers and FedProx
(benchmark/training/optimizers.py, the `--server_optimizer`,
`--client_optimizer`, `--algorithm` settings of benchmark/training/config.py
and the process of benchmark/training/fedavg.py)."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from benchmark.backends import mapreduce
from benchmark.core import constants
from benchmark.core.errors import FlairInputError
from benchmark.training import config as config_lib
from benchmark.training import models
from benchmark.training import optimizers
import round_harness

_PATHS = {"tfrecords_dir": "x", "save_model_dir": "unused"}


def _step(optimizer, weights, gradients, steps=1):
  state = optimizer.initialize(
      tf.nest.map_structure(tf.TensorSpec.from_tensor, weights))
  history = []
  for _ in range(steps):
    state, weights = optimizer.next(state, weights, gradients)
    history.append(weights)
  return history


@pytest.mark.parametrize("name", optimizers.SERVER_OPTIMIZERS)
def test_each_server_optimizer_steps_against_the_gradient(name):
  optimizer = optimizers.build_server_optimizer(name, 0.1)
  weights = (tf.constant([1.0, -1.0]),)
  gradients = (tf.constant([0.5, -0.25]),)
  (new,), = _step(optimizer, weights, gradients)
  delta = new.numpy() - weights[0].numpy()
  assert np.all(delta * gradients[0].numpy() < 0), (name, delta)


def _hparams(optimizer):
  """`{name: float}` of a TFF optimizer's hyperparameters."""
  state = optimizer.initialize((tf.TensorSpec([2], tf.float32),))
  return {k: float(v) for k, v in optimizer.get_hparams(state).items()}


def test_server_optimizer_defaults_are_the_reference_adam():
  reference = {"learning_rate": 0.1, "beta_1": 0.9, "beta_2": 0.999,
               "epsilon": 0.01}
  adam = tff.learning.optimizers.build_adam(**reference)
  assert _hparams(optimizers.build_server_optimizer("adam", 0.1)) == (
      pytest.approx(_hparams(adam)))
  server = config_lib.ServerConfig()
  assert (server.server_optimizer, server.server_learning_rate,
          server.server_epsilon, server.server_beta_1,
          server.server_beta_2) == ("adam", 0.1, 0.01, 0.9, 0.999)
  config = config_lib.build(config_lib.FederatedConfig, _PATHS)
  assert config.server == server
  built = config.server.build_optimizer()
  assert type(built) is type(adam)  # pylint: disable=unidiomatic-typecheck
  assert _hparams(built) == pytest.approx(_hparams(adam))
  assert _hparams(built) == pytest.approx(reference)
  assert (config.client.algorithm,
          config.client.client_optimizer) == ("fedavg", "sgd")


@pytest.mark.parametrize("field,value,flag", [
    ("server_optimizer", "rmsprop", "--server_optimizer"),
    ("server_momentum", 1.0, "--server_momentum"),
    ("server_beta_2", -0.1, "--server_beta_2"),
    ("server_epsilon", 0.0, "--server_epsilon"),
    ("client_optimizer", "adam", "--client_optimizer"),
    ("client_momentum", 1.5, "--client_momentum"),
    ("algorithm", "scaffold", "--algorithm"),
    ("proximal_strength", -1.0, "--proximal_strength")])
def test_bad_optimizer_settings_name_the_flag(field, value, flag):
  with pytest.raises(FlairInputError, match=flag):
    config_lib.build(config_lib.FederatedConfig, dict(_PATHS, **{field: value}))


def test_client_optimizer_clips_each_weight_separately():
  opt = optimizers.build_client_optimizer("sgd", learning_rate=0.5,
                                          clipnorm=1.0)
  weights = (tf.constant([0.0, 0.0]), tf.constant([1.0]))
  # First gradient has norm 5 (clipped to 1), second norm 0.5 (kept).
  grads = (tf.constant([3.0, 4.0]), tf.constant([0.5]))
  (new,) = _step(opt, weights, grads)
  np.testing.assert_allclose(new[0], [-0.5 * 0.6, -0.5 * 0.8], rtol=1e-6)
  np.testing.assert_allclose(new[1], [1.0 - 0.5 * 0.5], rtol=1e-6)


@pytest.mark.parametrize("name", optimizers.CLIENT_OPTIMIZERS)
def test_client_optimizer_equals_clip_by_norm_then_tff_sgd(name):
  """The one-pass clipping gives `tf.clip_by_norm` followed by TFF's SGD
  (with momentum for sgdm) within float32 round-off, over steps whose
  gradients are clipped (norms up to 2000) and kept (norm 0.25)."""
  momentum = 0.9 if name == "sgdm" else 0.0
  ours = optimizers.build_client_optimizer(name, learning_rate=0.1,
                                           clipnorm=1.5, momentum=momentum)
  sgd = tff.learning.optimizers.build_sgdm(learning_rate=0.1,
                                           momentum=momentum or None)
  rng = np.random.default_rng(0)
  weights = tuple(tf.constant(rng.normal(size=shape), tf.float32)
                  for shape in ((3, 3, 8, 16), (16,), (40, 5)))
  specs = tf.nest.map_structure(tf.TensorSpec.from_tensor, weights)
  our_state, ref_state = ours.initialize(specs), sgd.initialize(specs)
  ours_w = ref_w = weights
  for scale in (1000.0, 1.0, 1e-3):
    gradients = tuple(tf.constant(scale * rng.normal(size=w.shape),
                                  tf.float32) for w in weights)
    our_state, ours_w = ours.next(our_state, ours_w, gradients)
    ref_state, ref_w = sgd.next(
        ref_state, ref_w,
        tuple(tf.clip_by_norm(g, 1.5) for g in gradients))
    for got, want in zip(ours_w, ref_w):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert ours.get_hparams(our_state)["learning_rate"] == 0.1
  moved = max(float(np.abs(w - w0).max()) for w, w0 in zip(ours_w, weights))
  assert moved > 0.1


def test_client_sgdm_accumulates_momentum():
  opt = optimizers.build_client_optimizer("sgdm", learning_rate=0.1,
                                          clipnorm=10.0, momentum=0.9)
  weights = (tf.constant([0.0]),)
  first, second = _step(opt, weights, (tf.constant([1.0]),), steps=2)
  # Steps of 0.1, then 0.1 * (1 + 0.9).
  np.testing.assert_allclose(first[0], [-0.1], rtol=1e-6)
  np.testing.assert_allclose(second[0], [-0.1 - 0.19], rtol=1e-6)


def _fedavg_aggregator():
  return tff.learning.add_debug_measurements(tff.aggregators.MeanFactory())


@pytest.mark.slow
def test_fedprox_with_zero_strength_equals_fedavg(prepared_sample_dir,
                                                  monkeypatch):
  """Same state and cohort, server SGD and client SGD with momentum (so
  those run in a round too): FedProx with mu = 0 is FedAvg."""
  settings = dict(server_optimizer="sgd", client_optimizer="sgdm",
                  server_learning_rate=1.0)
  results = {}
  for algorithm in config_lib.ALGORITHMS:
    process, weights, client_ids = round_harness.build(
        prepared_sample_dir, _fedavg_aggregator(), weighted=True,
        algorithm=algorithm, proximal_strength=0.0, **settings)
    results[algorithm] = round_harness.run_one_round(
        constants.BACKEND_INPROCESS, process, weights,
        round_harness.cohort_of(client_ids))
  round_harness.assert_close(results["fedprox"]["model_weights"],
                             results["fedavg"]["model_weights"], "weights")
  moved = max(np.abs(a - b).max() for a, b in zip(
      mapreduce.to_flat(results["fedavg"]["model_weights"]),
      mapreduce.to_flat(weights)))
  assert moved > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sgdm", "adagrad", "yogi"])
def test_one_round_with_each_server_optimizer_changes_the_model(
    prepared_sample_dir, name):
  process, weights, client_ids = round_harness.build(
      prepared_sample_dir, _fedavg_aggregator(), weighted=True,
      server_optimizer=name, algorithm="fedprox", proximal_strength=0.1)
  result = round_harness.run_one_round(
      constants.BACKEND_INPROCESS, process, weights,
      round_harness.cohort_of(client_ids))
  new = mapreduce.to_flat(result["model_weights"])
  assert all(np.all(np.isfinite(w)) for w in new)
  moved = max(np.abs(a - b).max()
              for a, b in zip(new, mapreduce.to_flat(weights)))
  assert moved > 1e-4


def test_bfloat16_precision_reaches_the_federated_model(tmp_path):
  """`--precision bfloat16` builds the clients' and evaluation model with
  bfloat16 layers (float32 weights); a bad value names the flag."""
  config = config_lib.build(config_lib.FederatedConfig, dict(
      _PATHS, precision="bfloat16", image_height=32, image_width=32))
  keras_model = models.build_model(config.model, 3)
  dtypes = {layer.compute_dtype for layer in keras_model.layers}
  assert "bfloat16" in dtypes
  assert all(w.dtype == tf.float32 for w in keras_model.weights)
  with pytest.raises(FlairInputError, match="--precision"):
    config_lib.build(config_lib.FederatedConfig,
                     dict(_PATHS, precision="float16"))
