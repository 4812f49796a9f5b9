"""A run's numbers follow from its command and --seed: two runs of one
command give the same metrics and weights, a run killed with kill -9 and
rerun ends where the uninterrupted run ends, every backend gives the same
round within float32 summation order, and another seed gives other numbers
(README, "Reproducibility").

The commands run on the real sample with the tiny network; each is run in
this process (`tests/flag_harness.py`), except the ones killed with -9.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from benchmark.backends import factory
from benchmark.core import constants
from benchmark.model import resnet
from benchmark.training import dp
from benchmark.training import loop
import flag_harness
import round_harness

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
FEDERATED = dict(image_height=32, image_width=32, clients_per_round=3,
                 client_batch_size=2, max_elements_per_client=4,
                 client_epochs_per_round=2, rounds_per_eval=1,
                 rounds_per_checkpoint=1, eval_batch_size=16,
                 model_layout=resnet.TINY)
CENTRAL = dict(image_height=32, image_width=32, train_batch_size=4,
               eval_batch_size=16, learning_rate=0.01,
               model_layout=resnet.TINY)
# Across backends (and thread counts) the clients' updates are summed in
# another order: float32 summation order, measured at most 1.2e-7 relative
# on one round (README, "Reproducibility").
RTOL = 1e-5
_KILL_TIMEOUT_S = 300


def _flags(tfrecords_dir, save_dir, settings, **overrides):
  values = dict(settings, tfrecords_dir=tfrecords_dir,
                save_model_dir=str(save_dir), **overrides)
  return [f"--{k}={v}" for k, v in values.items()]


def _federated(tfrecords_dir, save_dir, **overrides):
  return flag_harness.run_from_flags(
      "benchmark.federated_main",
      *_flags(tfrecords_dir, save_dir, FEDERATED, **overrides))


def _central(tfrecords_dir, save_dir, **overrides):
  return flag_harness.run_from_flags(
      "benchmark.central_main",
      *_flags(tfrecords_dir, save_dir, CENTRAL, **overrides))


def _rows(save_dir):
  """metrics.csv without its wall-time columns."""
  with open(os.path.join(save_dir, constants.METRICS_CSV_FILE),
            newline="", encoding="utf-8") as f:
    return [{k: v for k, v in row.items() if not k.endswith("_time_s")}
            for row in csv.DictReader(f)]


def _weights(save_dir):
  """The best weights' arrays (the run's only .h5 file)."""
  [name] = [n for n in os.listdir(save_dir) if n.endswith(".h5")]
  model = resnet.build_resnet(num_classes=_num_outputs(save_dir),
                              crop_size=(32, 32), layout=resnet.TINY)
  model.load_weights(os.path.join(save_dir, name))
  return model.get_weights()


def _num_outputs(save_dir):
  with open(os.path.join(save_dir, constants.RUN_IDENTITY_FILE),
            encoding="utf-8") as f:
    return json.load(f)["model"]["num_outputs"]


def _assert_same_run(a, b):
  assert _rows(a) == _rows(b)
  for x, y in zip(_weights(a), _weights(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_one_fedavg_command_run_twice_gives_the_same_numbers(
    prepared_sample_dir, tmp_path):
  first = _federated(prepared_sample_dir, tmp_path / "a", total_rounds=2)
  second = _federated(prepared_sample_dir, tmp_path / "b", total_rounds=2)
  assert first == second
  _assert_same_run(tmp_path / "a", tmp_path / "b")
  # Another seed trains on other batches from other weights.
  _federated(prepared_sample_dir, tmp_path / "c", total_rounds=1, seed=1)
  one, other = _rows(tmp_path / "a")[1], _rows(tmp_path / "c")[1]
  assert one["train_loss"] != other["train_loss"]
  assert one["client_update_norm_mean"] != other["client_update_norm_mean"]


@pytest.mark.slow
def test_one_central_command_run_twice_gives_the_same_numbers(
    prepared_sample_dir, tmp_path):
  """Also when something in the process set TensorFlow's global seed
  before the second run (tf.data's shuffle would draw from it): a run in
  this process equals one in a fresh process."""
  first = _central(prepared_sample_dir, tmp_path / "a", num_epochs=2)
  tf.keras.utils.set_random_seed(1234)
  try:
    second = _central(prepared_sample_dir, tmp_path / "b", num_epochs=2)
  finally:
    tf.random.set_seed(None)
  assert first == second
  _assert_same_run(tmp_path / "a", tmp_path / "b")
  _central(prepared_sample_dir, tmp_path / "c", num_epochs=1, seed=1)
  assert _rows(tmp_path / "a")[0]["loss"] != _rows(tmp_path / "c")[0]["loss"]


def _kill_after(argv, path_exists, log):
  """Runs `argv`, SIGKILLs it once `path_exists()` holds; returns its rc."""
  with open(log, "w") as out:
    process = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=out, stderr=out,
                               env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    deadline = time.monotonic() + _KILL_TIMEOUT_S
    try:
      while process.poll() is None and time.monotonic() < deadline:
        if path_exists():
          process.send_signal(signal.SIGKILL)
          break
        time.sleep(0.05)
    finally:
      if process.poll() is None:
        process.kill()
      process.wait()
  return process.returncode


@pytest.mark.slow
def test_a_fedavg_run_killed_and_rerun_ends_as_the_uninterrupted_one(
    prepared_sample_dir, tmp_path):
  _federated(prepared_sample_dir, tmp_path / "whole", total_rounds=3)
  killed = tmp_path / "killed"
  returncode = _kill_after(
      [sys.executable, "-m", "benchmark.federated_main",
       *_flags(prepared_sample_dir, killed, FEDERATED, total_rounds=3)],
      lambda: os.path.isdir(killed / "checkpoints" / "program_state_1"),
      tmp_path / "killed.log")
  assert returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
  _federated(prepared_sample_dir, killed, total_rounds=3)
  _assert_same_run(tmp_path / "whole", killed)


@pytest.mark.slow
def test_a_central_run_killed_and_rerun_ends_as_the_uninterrupted_one(
    prepared_sample_dir, tmp_path):
  _central(prepared_sample_dir, tmp_path / "whole", num_epochs=3)
  killed = tmp_path / "killed"
  returncode = _kill_after(
      [sys.executable, "-m", "benchmark.central_main",
       *_flags(prepared_sample_dir, killed, CENTRAL, num_epochs=3)],
      lambda: os.path.isfile(killed / "backup" / "checkpoint"),
      tmp_path / "killed.log")
  assert returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
  _central(prepared_sample_dir, killed, num_epochs=3)
  _assert_same_run(tmp_path / "whole", killed)
  # A longer run continues the same one: 3 then 4 epochs is a 4-epoch run.
  _central(prepared_sample_dir, tmp_path / "whole", num_epochs=4)
  _central(prepared_sample_dir, tmp_path / "four", num_epochs=4)
  _assert_same_run(tmp_path / "whole", tmp_path / "four")


@pytest.mark.slow
def test_every_backend_gives_the_same_round(prepared_sample_dir, tmp_path):
  rows = {}
  for backend in constants.BACKENDS:
    _federated(prepared_sample_dir, tmp_path / backend, total_rounds=1,
               backend=backend)
    rows[backend] = _rows(tmp_path / backend)[1]
  reference = rows[constants.BACKEND_INPROCESS]
  for backend, row in rows.items():
    assert row.keys() == reference.keys(), backend
    for column, value in reference.items():
      np.testing.assert_allclose(float(row[column]), float(value), rtol=RTOL,
                                 atol=1e-7, err_msg=f"{backend}: {column}")


def _dp_rounds(tfrecords_dir, noise_multiplier, adaptive, num_rounds=2):
  """`num_rounds` rounds of DP FedAvg on the in-process backend: the
  states' model weights after each round, and each round's metrics."""
  quantile = 0.5 if adaptive else 0.0
  aggregator = dp.build_aggregator(noise_multiplier, 4, 0.1, quantile)
  process, weights, client_ids = round_harness.build(
      tfrecords_dir, aggregator, weighted=False,
      client_learning_rate=1e-12 if noise_multiplier else 0.1)
  states, metrics = [], []
  with factory.open_backend(constants.BACKEND_INPROCESS, process,
                            4) as backend:
    backend.set_state(backend.initialize(weights))
    for round_num in range(1, num_rounds + 1):
      metrics.append(loop.flatten_metrics(backend.run_round(
          round_harness.cohort_of(client_ids, round_num))))
      states.append(backend.get_model_weights().trainable)
  return states, metrics


@pytest.mark.slow
def test_adaptive_dp_without_noise_is_reproducible_and_noise_is_fresh(
    prepared_sample_dir):
  """DP's noise is drawn by tensorflow_privacy 0.9's Gaussian query with an
  unseeded TensorFlow initializer (README, "Reproducibility"): with noise
  multiplier 0 (adaptive clipping, whose clipped count is then noiseless
  too) a run repeats exactly; with noise, each round draws new noise."""
  a, metrics_a = _dp_rounds(prepared_sample_dir, 0.0, adaptive=True)
  b, metrics_b = _dp_rounds(prepared_sample_dir, 0.0, adaptive=True)
  for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b)):
    np.testing.assert_array_equal(x, y)
  assert metrics_a == metrics_b
  # With noise and (practically) no client update, the server update is the
  # noise: different in each round.
  noised, metrics = _dp_rounds(prepared_sample_dir, 1.0, adaptive=False)
  norms = [m["aggregator/server_update_norm"] for m in metrics]
  assert norms[0] > 0 and norms[1] > 0 and norms[0] != norms[1]
  assert not all(np.array_equal(x, y) for x, y in
                 zip(tf.nest.flatten(noised[0]), tf.nest.flatten(noised[1])))


def test_deterministic_ops_reach_this_process_and_its_children():
  """--deterministic_ops turns TensorFlow's op determinism on here and, by
  TF_DETERMINISTIC_OPS, in processes started later (Ray's actors)."""
  code = ("import os, subprocess, sys\n"
          "from tensorflow.python.framework import config\n"
          "from benchmark.training import seeds\n"
          "before = config.is_op_determinism_enabled()\n"
          "seeds.use_deterministic_ops(True)\n"
          "child = subprocess.run([sys.executable, '-c', 'import os; "
          "print(os.environ.get(\"TF_DETERMINISTIC_OPS\"))'],\n"
          "    capture_output=True, text=True).stdout.strip()\n"
          "print(before, config.is_op_determinism_enabled(), child)\n")
  env = {k: v for k, v in os.environ.items() if k != "TF_DETERMINISTIC_OPS"}
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT,
                          env=dict(env, PYTHONPATH=REPO_ROOT,
                                   TF_CPP_MIN_LOG_LEVEL="3"),
                          capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split()[-3:] == ["False", "True", "1"]
