"""Tests of federated training (benchmark/training/federated.py and the
pieces of its round loop: fedavg, outputs, checkpoints, cohorts; and
benchmark/federated_main.py).

End-to-end runs use tiny settings (32x32 crops, batch 4, at most 8 images per
client, 1 local epoch, 3 rounds of 3 clients) so that ResNet-18 trains in
seconds per round on a CPU; building the TFF computations dominates. Tests of
the loop (resume, kill, errors, backends' outputs) use the tiny network
(`--model_layout tiny`; a 3-round run: 14 s in-process against 46 s with
ResNet-18); the learning, restore and full-disk tests keep ResNet-18.

federated_main runs in this process (`_run_main`: tests/flag_harness.py, the
command after its flags are parsed; each start of the command costs about
10 s of importing TensorFlow and TFF) unless the test checks what only a
process shows: the exit status 1 and single `error:` line that `main`
(commands.exit_on_input_error, one handler for input, output and backend
errors) makes of an error (an OutputWriteError:
test_cli_unwritable_save_dir_is_one_line; a BackendDiedError:
test_a_killed_worker_ends_main_with_a_one_line_error), SIGTERM, or kill -9
(the first run of test_killed_run_resumes_without_gaps_or_repeats).
"""

import asyncio
import collections
import contextlib
import csv
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from benchmark.backends import process_guard
from benchmark.backends import tff_runtime
from benchmark.backends import tff_worker
from benchmark.cli import trainers
from benchmark.core import constants
from benchmark.core import errors
from benchmark.core import locks
from benchmark.core.errors import FlairInputError
from benchmark.data import label_sets
from benchmark.data import pipeline
from benchmark.model import metrics as metrics_lib
from benchmark.model import resnet
from benchmark.training import checkpoints
from benchmark.training import cohorts
from benchmark.training import config as config_lib
from benchmark.training import federated
from benchmark.training import outputs
from benchmark.training import run_dir
import command_harness
import flag_harness
import round_harness

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
TINY = dict(total_rounds=3, clients_per_round=3, rounds_per_eval=3,
            rounds_per_checkpoint=2, image_height=32, image_width=32,
            client_batch_size=4, max_elements_per_client=8,
            client_epochs_per_round=1, eval_batch_size=16,
            client_datasets_random_seed=1, show_progress=False)


def _config(tfrecords_dir, save_dir, **overrides):
  kwargs = dict(TINY, tfrecords_dir=tfrecords_dir,
                save_model_dir=str(save_dir))
  kwargs.update(overrides)
  return config_lib.build(config_lib.FederatedConfig, kwargs)


def _run_federated(config):
  """`federated.run_federated` with the labels of `config.data`."""
  data = config.data
  return federated.run_federated(config, label_sets.load_label_spec(
      data.tfrecords_dir, data.use_fine_grained_labels, data.binary_label))


def _read_csv(path):
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def _tiny_flags(tfrecords_dir, save_dir, **overrides):
  values = dict(TINY, tfrecords_dir=tfrecords_dir,
                save_model_dir=str(save_dir))
  values.pop("show_progress")
  values.update(overrides)
  return [f"--{k}={v}" for k, v in values.items()]


def _main_command(tfrecords_dir, save_dir, resnet18=False, **overrides):
  """`python -m benchmark.federated_main` with the TINY flags; the model is
  the tiny network (`--model_layout tiny`) unless `resnet18`."""
  layout = {} if resnet18 else {"model_layout": resnet.TINY}
  return [sys.executable, "-m", "benchmark.federated_main",
          *_tiny_flags(tfrecords_dir, save_dir, **dict(layout, **overrides))]


def _run_main(tfrecords_dir, save_dir, *extra, **overrides):
  """federated_main in this process with the TINY flags (and `extra`
  flags); returns the final metrics it prints. Its FlairInputError,
  OutputWriteError or BackendDiedError propagates (`main` prints any of them
  as one `error:` line and exits 1, checked as a command by
  test_cli_unwritable_save_dir_is_one_line and
  test_a_killed_worker_ends_main_with_a_one_line_error)."""
  return flag_harness.run_from_flags(
      "benchmark.federated_main",
      *_tiny_flags(tfrecords_dir, save_dir, **overrides), *extra)


def _check_outputs(save_dir, num_outputs, total_rounds, dp_on,
                   architecture=resnet.RESNET18):
  """Asserts every output of a finished run of `--model_layout`
  `architecture`; returns `(final metrics, metrics.csv rows)`."""
  names = metrics_lib.metric_names(num_outputs)
  final = json.load(open(os.path.join(save_dir,
                                      constants.FINAL_METRICS_FILE)))
  for partition in (constants.VAL, constants.TEST):
    assert sorted(final[partition]) == sorted(names)
    assert all(np.isfinite(v) for v in final[partition].values())
  assert os.path.isfile(os.path.join(
      save_dir, f"{architecture}_federated_{num_outputs}labels.h5"))
  assert os.listdir(os.path.join(save_dir, constants.TENSORBOARD_DIR))
  rows = _read_csv(os.path.join(save_dir, constants.METRICS_CSV_FILE))
  assert [int(r["round"]) for r in rows] == list(range(total_rounds + 1))
  columns = set(rows[0])
  for name in names:
    assert "train_" + name in columns
    assert "val_" + name in columns
  for column in ("round_time_s", "client_update_norm_mean"):
    assert column in columns
  # Round 0 is the initial model's evaluation; val metrics on eval rounds.
  assert rows[0]["val_loss"] and not rows[0]["train_loss"]
  assert rows[-1]["val_loss"] and rows[-1]["train_loss"]
  assert all(float(r["train_num_examples"]) > 0 for r in rows[1:])
  if dp_on:
    assert {"dp_clip", "dp_noise_stddev"} <= columns
    assert all(float(r["dp_noise_stddev"]) > 0 for r in rows[1:])
    assert final["privacy"]["noise_multiplier"] > 0
    assert "-DP at the user level for" in final["privacy"]["guarantee"]
  else:
    assert "privacy" not in final
    assert "dp_clip" not in columns
  return final, rows


# --- Fast unit tests ---------------------------------------------------------


def test_config_rejects_bad_values_naming_the_flag():
  for field, value, flag in [("clients_per_round", 0, "--clients_per_round"),
                             ("epsilon", -1.0, "--epsilon"),
                             ("target_unclipped_quantile", 1.0,
                              "--target_unclipped_quantile"),
                             ("dp_calibration", "x", "--dp_calibration"),
                             ("client_learning_rate", 0.0,
                              "--client_learning_rate")]:
    with pytest.raises(FlairInputError, match=flag):
      config_lib.build(config_lib.FederatedConfig, {
          "tfrecords_dir": "x", "save_model_dir": "unused", field: value})


def test_config_defaults_are_the_reference_flags():
  """federated_main's config with every flag at its default."""
  from benchmark import federated_main  # pylint: disable=g-import-not-at-top
  flag_values = flag_harness.parse("benchmark.federated_main",
                                   "--tfrecords_dir=x",
                                   "--save_model_dir=unused")
  c = federated_main.config_from_flags(flag_values)
  client, cohort, run, dp = c.client, c.cohort, c.run, c.dp
  assert (client.client_learning_rate, client.client_clipnorm,
          c.server.server_learning_rate, client.client_epochs_per_round,
          client.client_batch_size, cohort.clients_per_round,
          flag_values["clients_per_thread"].value, run.total_rounds,
          run.rounds_per_eval, client.max_elements_per_client,
          c.data.eval_batch_size, c.model.image_height, c.model.image_width,
          dp.epsilon, dp.l2_norm_clip,
          dp.target_unclipped_quantile) == (0.1, 10.0, 0.1, 2, 16, 200, 50,
                                            5000, 10, 512, 512, 224, 224,
                                            0.0, 0.1, 0.1)
  assert cohort.client_datasets_random_seed is None
  assert dp.simulated_clients_per_round is None
  assert c.model.model_layout == resnet.RESNET18
  # The same defaults as the config's own (`training.config`).
  assert c == config_lib.build(config_lib.FederatedConfig, {
      "tfrecords_dir": "x", "save_model_dir": "unused"})


def test_round_columns_pick_train_and_aggregator_measurements():
  metrics = {
      "distributor": (),
      "client_work": {"train": {"loss": 0.5, "macro_f1": 0.2,
                                "num_examples": 7, "num_batches": 2}},
      "aggregator": {"mean_value": (), "average_client_norm": 1.5,
                     "std_dev_client_norm": 0.1,
                     "dp_query_metrics": {"clip": 0.3}},
      "finalizer": {"update_non_finite": 0},
  }
  expected = {"train_loss": 0.5, "train_macro_f1": 0.2,
              "train_num_examples": 7.0, "train_num_batches": 2.0,
              "client_update_norm_mean": 1.5,
              "client_update_norm_std": 0.1}
  # Without DP: no DP columns.
  row = outputs.RoundColumns(["loss", "macro_f1"], 0.1)(metrics)
  assert row == expected
  # With DP: the round's clip (--l2_norm_clip in round 1), the noise
  # stddev on the sum, and the adaptive clip measured for the next round,
  # which is also what a checkpoint keeps.
  columns = outputs.RoundColumns(["loss", "macro_f1"], 0.1,
                                 sum_noise_multiplier=2.0)
  row = columns(metrics)
  assert row == dict(expected, dp_clip=pytest.approx(0.1),
                     dp_noise_stddev=pytest.approx(0.2))
  assert columns.resume_state() == {"dp_clip": pytest.approx(0.3)}
  row = columns(metrics)
  assert row[outputs.DP_CLIP_KEY] == pytest.approx(0.3)
  assert row[outputs.DP_NOISE_STDDEV_KEY] == pytest.approx(0.6)


def test_worker_stops_after_an_error_inside_the_run(prepared_sample_dir,
                                                    tmp_path, monkeypatch):
  seen = []

  def failing_round(self, cohort):
    del self, cohort
    seen.extend(tff_runtime.worker_pids(os.getpid()))
    raise RuntimeError("injected failure")

  monkeypatch.setattr(tff_worker.TffWorkerBackend, "run_round", failing_round)
  with pytest.raises(RuntimeError, match="injected failure"):
    _run_federated(_config(prepared_sample_dir, tmp_path,
                           backend=constants.BACKEND_TFF_WORKER,
                           model_layout=resnet.TINY))
  assert seen, "the TFF worker was not running inside run_federated"
  assert tff_runtime.worker_pids(os.getpid()) == []
  assert not set(seen) & set(tff_runtime.worker_pids())


def test_adaptive_clipping_with_too_few_clients_is_an_input_error(
    prepared_sample_dir, tmp_path):
  with pytest.raises(FlairInputError, match="--target_unclipped_quantile 0"):
    _run_federated(_config(prepared_sample_dir, tmp_path, epsilon=10.0))
  assert tff_runtime.worker_pids(os.getpid()) == []


def test_bad_binary_label_is_an_input_error_from_main(prepared_sample_dir,
                                                      tmp_path, monkeypatch):
  """federated_main (in this process) refuses an unknown --binary_label with
  a one-line FlairInputError naming the flag, before it writes or trains
  anything."""
  def no_training(config, label_spec):
    raise AssertionError(
        f"trained despite a bad label: {config}, {label_spec}")

  monkeypatch.setattr(federated, "run_federated", no_training)
  save_dir = tmp_path / "run"
  with pytest.raises(FlairInputError) as info:
    _run_main(prepared_sample_dir, save_dir, binary_label="nope")
  message = str(info.value)
  assert message.startswith("--binary_label 'nope'"), message
  assert "\n" not in message, message
  assert not save_dir.exists()


# --- End-to-end runs on the real sample -------------------------------------


@pytest.mark.slow
def test_fedavg_on_the_real_sample_resumes_under_another_backend(
    prepared_sample_dir, tmp_path):
  """FedAvg without DP writes every output; two rounds in-process, then the
  same run continued to round 3 by TFF's worker: the checkpointed state has
  the same structure on both, and each backend stops what it started."""
  _run_federated(_config(prepared_sample_dir, tmp_path, total_rounds=2,
                         model_layout=resnet.TINY))
  assert tff_runtime.worker_pids(os.getpid()) == []  # Normal end: no worker.
  final = _run_federated(_config(
      prepared_sample_dir, tmp_path, backend=constants.BACKEND_TFF_WORKER,
      model_layout=resnet.TINY))
  assert tff_runtime.worker_pids(os.getpid()) == []
  assert final["rounds_completed"] == 3
  assert final["best_round"] in (0, 2, 3)
  _, rows = _check_outputs(str(tmp_path), _num_outputs(prepared_sample_dir),
                           3, dp_on=False, architecture=resnet.TINY)
  assert all(r["train_loss"] for r in rows[1:])
  # Checkpoints every 2 rounds and at the end.
  versions = sorted(os.listdir(checkpoints.checkpoint_dir(str(tmp_path))))
  assert versions == ["program_state_2", "program_state_3"]


def _num_outputs(tfrecords_dir, **kwargs):
  return label_sets.load_label_spec(tfrecords_dir, **kwargs).num_outputs


@pytest.mark.slow
@pytest.mark.parametrize("backend,binary_label", [
    (constants.BACKEND_INPROCESS, None),
    (constants.BACKEND_TFF_WORKER, "structure"),
    (constants.BACKEND_RAY, None)])
def test_fedavg_with_adaptive_dp_on_the_real_sample(
    prepared_sample_dir, tmp_path, backend, binary_label):
  """FedAvg with DP and adaptive clipping on each backend; the TFF worker's
  run also trains on a binary label (--binary_label: one output, its
  metrics). Fixed clipping (--target_unclipped_quantile 0) is the README's
  DP command, checked in tests/test_readme.py. The tiny network: the DP
  aggregator does not depend on the model."""
  # 3 of the 13 training users per round; the noise is calibrated for the
  # whole population (simulated cohort 13, q = 1) and scaled by 3/13, which
  # keeps the adaptive clip's count noise feasible (see
  # benchmark.training.dp).
  final = _run_federated(_config(
      prepared_sample_dir, tmp_path, epsilon=10.0,
      simulated_clients_per_round=13, target_unclipped_quantile=0.5,
      backend=backend, binary_label=binary_label, model_layout=resnet.TINY))
  num_outputs = _num_outputs(prepared_sample_dir, binary_label=binary_label)
  assert set(final["val"]) == set(metrics_lib.metric_names(num_outputs))
  _, rows = _check_outputs(str(tmp_path), num_outputs, 3, dp_on=True,
                           architecture=resnet.TINY)
  privacy = final["privacy"]
  assert privacy["num_train_clients"] == 13
  assert privacy["sampling_rate"] == pytest.approx(1.0)
  assert privacy["total_rounds"] == 3
  assert privacy["noise_multiplier"] == pytest.approx(
      privacy["calibrated_noise_multiplier"] * 3 / 13)
  clips = [float(r["dp_clip"]) for r in rows[1:]]
  assert clips[0] == pytest.approx(0.1)  # --l2_norm_clip
  assert len(set(clips)) > 1  # The clip adapts.


@pytest.mark.slow
def test_restore_model_path_initialises_the_federated_model(
    prepared_sample_dir, tmp_path):
  """--restore_model_path: the run starts from the file's weights.

  The file comes from a BatchNorm ResNet-18 with another seed, another number
  of classes and random BatchNorm moving statistics. BatchNorm statistics are
  frozen during training, so the saved best weights must hold the file's
  statistics exactly; trainable layers move by at most the server Adam step
  (<= server_learning_rate = 1e-4 per weight for one round), so the initial
  convolution must stay within 1e-3 of the file's, while a model that ignored
  the file (seed 0, zero means, unit variances) differs by ~0.1.
  """
  num_outputs = _num_outputs(prepared_sample_dir)
  crop = (TINY["image_height"], TINY["image_width"])
  source = resnet.build_resnet(pretrained=True, num_classes=num_outputs + 3,
                               crop_size=crop, seed=7)
  rng = np.random.default_rng(0)
  for layer in source.layers:
    if isinstance(layer, tf.keras.layers.BatchNormalization):
      layer.moving_mean.assign(
          rng.normal(0.0, 0.1, layer.moving_mean.shape).astype(np.float32))
      layer.moving_variance.assign(rng.uniform(
          0.5, 2.0, layer.moving_variance.shape).astype(np.float32))
  source_path = str(tmp_path / "source.h5")
  source.save_weights(source_path)
  save_dir = tmp_path / "run"

  _run_federated(_config(
      prepared_sample_dir, save_dir, total_rounds=1, rounds_per_eval=1,
      server_learning_rate=1e-4, restore_model_path=source_path))

  restored = resnet.build_resnet(pretrained=True, num_classes=num_outputs,
                                 crop_size=crop, seed=0)
  fresh = [w.numpy() for w in restored.weights]
  restored.load_weights(run_dir.best_weights_path(
      str(save_dir), federated.TRAINER_NAME, num_outputs, resnet.RESNET18))
  fresh_by_name = dict(zip([w.name for w in restored.weights], fresh))
  for name in ("initial_norm", "layer4_block2_norm2"):
    for stat in ("moving_mean", "moving_variance"):
      got = restored.get_layer(name).weights
      got = {w.name.split("/")[-1].split(":")[0]: w for w in got}[stat]
      want = getattr(source.get_layer(name), stat).numpy()
      np.testing.assert_array_equal(got.numpy(), want)
      assert np.abs(fresh_by_name[got.name] - want).max() > 0.05
  kernel = restored.get_layer("initial_conv").kernel.numpy()
  want = source.get_layer("initial_conv").kernel.numpy()
  np.testing.assert_allclose(kernel, want, atol=1e-3)
  assert np.abs(fresh_by_name[
      restored.get_layer("initial_conv").kernel.name] - want).max() > 0.05
  # The classifier (another size in the file) is the run's own.
  assert restored.get_layer("classifier").kernel.shape[-1] == num_outputs


# --- Learning ----------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared_learning_dir(tmp_path_factory):
  """A 120-user synthetic dataset (seed 0): 96 training users and 12 val
  users, enough val images for a stable macro averaged precision."""
  from benchmark.prepare import synthetic  # pylint: disable=g-import-not-at-top
  from benchmark.prepare import tfrecords  # pylint: disable=g-import-not-at-top
  dataset_dir = str(tmp_path_factory.mktemp("learning_dataset"))
  tfrecords_dir = str(tmp_path_factory.mktemp("learning_tfrecords"))
  synthetic.generate(dataset_dir, num_users=120, seed=0)
  tfrecords.prepare(dataset_dir, tfrecords_dir, num_workers=1,
                    show_progress=False)
  return tfrecords_dir


@pytest.mark.slow
def test_fedavg_raises_val_macro_averaged_precision(prepared_learning_dir,
                                                    tmp_path):
  """FedAvg learns per-label image features, not just the label priors.

  The reference optimizers (client SGD lr 0.1 with per-weight clipping,
  server Adam lr 0.1, epsilon 0.01) at CPU scale: 5 of the 96 training users
  per round, 10 local epochs of batches of 8 over <= 16 images, 32x32 crops,
  24 rounds, evaluated every 4 rounds on the val users (fixed sampling seed).

  Measured (idle 2-core CPU, 202 s): val macro averaged precision 0.191
  initially, then 0.215, 0.235, 0.242, 0.258, 0.262, 0.270 at rounds 4-24;
  val loss 0.782 -> 0.31-0.44; micro AP 0.142 -> 0.36-0.49. With 10 clients,
  5 epochs and 12 rounds macro AP stayed at 0.17-0.19: per-label ranking
  needs a few hundred sequential client steps, label priors (loss, micro AP)
  only a few.

  Client shuffles are unseeded, so runs differ: another run gave 0.209,
  0.240, 0.285, 0.232, 0.240, 0.244 (one evaluation well above its
  neighbours), so the curve is not monotone and is not asserted to be.

  Asserted with about half the smallest measured margin: the mean macro AP
  of the last three evaluations above the initial one by >= 0.025 (five
  runs: +0.048 to +0.104); the loss falls. A run whose updates were lost or not
  applied to the evaluated model stays at the initial values, and a model
  that learned only the label priors stays at 0.17-0.19.
  """
  rounds, every = 24, 4
  final = _run_federated(_config(
      prepared_learning_dir, tmp_path, total_rounds=rounds,
      clients_per_round=5, rounds_per_eval=every, rounds_per_checkpoint=100,
      client_batch_size=8, max_elements_per_client=16,
      client_epochs_per_round=10, eval_batch_size=64,
      client_learning_rate=0.1, server_learning_rate=0.1,
      client_datasets_random_seed=0))
  rows = _read_csv(os.path.join(str(tmp_path), constants.METRICS_CSV_FILE))
  evaluated = [(int(r["round"]), float(r["val_loss"]),
                float(r["val_macro_averaged_precision"]))
               for r in rows if r["val_loss"]]
  assert [e[0] for e in evaluated] == list(range(0, rounds + 1, every))
  _, initial_loss, initial_macro_ap = evaluated[0]
  macro = [ap for _, _, ap in evaluated[1:]]
  assert np.mean(macro[-3:]) > initial_macro_ap + 0.025, evaluated
  assert all(loss < initial_loss - 0.2 for _, loss, _ in evaluated[1:]), (
      evaluated)
  assert final["best_round"] > 0
  assert all(float(r["client_update_norm_mean"]) > 0 for r in rows[1:])


# --- Resume and TFF worker lifecycle with the command line ------------------


def test_sigterm_stops_main_and_its_worker(prepared_sample_dir, tmp_path):
  # Far more rounds than can run before the SIGTERM, however loaded the
  # machine (with 50 rounds, a loaded run once finished first).
  process = subprocess.Popen(
      _main_command(prepared_sample_dir, tmp_path, total_rounds=10000,
                    backend=constants.BACKEND_TFF_WORKER),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      env=command_harness.subprocess_env(), cwd=REPO_ROOT)
  try:
    assert command_harness.wait_for(
        lambda: tff_runtime.worker_pids(process.pid), process, 240), (
            "the worker never started")
    workers = tff_runtime.worker_pids(process.pid)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  assert process.returncode == 128 + signal.SIGTERM, stderr.decode()[-2000:]
  time.sleep(0.5)
  alive = set(tff_runtime.worker_pids()) & set(workers)
  assert not alive, f"worker(s) {alive} outlived the SIGTERM'd run"


@contextlib.contextmanager
def _ray_run_past_round_one(tfrecords_dir, save_dir):
  """federated_main on a local Ray (10,000 rounds: it never ends by itself)
  as a subprocess, yielded once round 1 is in metrics.csv (its actors
  train); killed on the way out if still running. stderr is a pipe."""
  csv_path = save_dir / constants.METRICS_CSV_FILE
  process = subprocess.Popen(
      _main_command(tfrecords_dir, save_dir, total_rounds=10000,
                    backend=constants.BACKEND_RAY),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      env=command_harness.subprocess_env(), cwd=REPO_ROOT)
  try:
    assert command_harness.wait_for(
        lambda: os.path.isfile(csv_path) and len(_read_csv(csv_path)) >= 2,
        process, 300), "the run never trained a round"
    yield process
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()


@pytest.mark.slow
def test_sigterm_stops_a_ray_run_with_status_143(prepared_sample_dir,
                                                 tmp_path):
  """`ray.init` installs its own SIGTERM handler, which exited with Ray's
  C++ abort (status 134 and a stack dump): the run keeps the command's
  handler, so SIGTERM stops it as any other (143, no dump) and Ray's
  processes end with it."""
  with _ray_run_past_round_one(prepared_sample_dir, tmp_path) as process:
    started = process_guard.descendants(process.pid)
    assert started, "the local Ray started no process"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
  stderr = stderr.decode()
  assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
  assert "SIGABRT" not in stderr and "Stack trace" not in stderr, stderr[-2000:]
  deadline = time.monotonic() + 30
  while round_harness.alive(started) and time.monotonic() < deadline:
    time.sleep(0.5)
  left = round_harness.alive(started)
  assert not left, f"Ray process(es) {left} outlived the SIGTERM'd run"


@pytest.mark.slow
def test_a_ray_run_with_every_actor_lost_ends_in_one_line(prepared_sample_dir,
                                                          tmp_path):
  """The local Ray's one actor killed (as the out-of-memory killer would)
  with no other to retry its clients on: exit 1, one line saying so (a lost
  node or memory); the lost actors of a cluster with others left are
  retried (tests/backends/test_ray_cluster.py)."""
  with _ray_run_past_round_one(prepared_sample_dir, tmp_path) as process:
    actors = [pid for pid in process_guard.descendants(process.pid)
              if "ClientTrainer" in _cmdline(pid)]
    assert len(actors) == 1, actors
    os.kill(actors[0], signal.SIGKILL)
    _, stderr = process.communicate(timeout=300)
  lines = stderr.decode().strip().splitlines()
  assert process.returncode == 1, "\n".join(lines[-30:])
  assert lines[-1].startswith(
      "error: every Ray actor training FedAvg clients died"), lines[-30:]


def _cmdline(pid):
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      return f.read().decode(errors="replace")
  except OSError:
    return ""


def test_a_killed_worker_ends_main_with_a_one_line_error(prepared_sample_dir,
                                                        tmp_path):
  # The kernel's out-of-memory killer sends SIGKILL to the TFF worker; the
  # run must stop with a clear error, not wait on the dead worker forever.
  process = subprocess.Popen(
      _main_command(prepared_sample_dir, tmp_path, total_rounds=50,
                    backend=constants.BACKEND_TFF_WORKER),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      env=command_harness.subprocess_env(), cwd=REPO_ROOT)
  csv_path = os.path.join(str(tmp_path), constants.METRICS_CSV_FILE)
  try:
    assert command_harness.wait_for(lambda: os.path.exists(csv_path),
                                    process, 300), "no round finished"
    workers = tff_runtime.worker_pids(process.pid)
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)
    _, stderr = process.communicate(timeout=120)
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  stderr = stderr.decode()
  assert process.returncode == 1, stderr[-2000:]
  assert "Traceback" not in stderr, stderr[-2000:]
  # No multi-line gRPC dump before the one-line error.
  assert "debug_error_string" not in stderr, stderr[-2000:]
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("error: the TFF worker process"), last
  assert "SIGKILL" in last and "tff_worker.log" in last, last
  # Nothing partial is left: rerunning resumes from complete files (the
  # resume itself is test_killed_run_resumes_without_gaps_or_repeats).
  leftovers = [os.path.join(d, n) for d, dirs, files in os.walk(tmp_path)
               for n in dirs + files if n.endswith(".tmp") or "_temp" in n]
  assert not leftovers
  with open(csv_path, "rb") as f:
    assert f.read().endswith(b"\n")


@pytest.mark.slow
@pytest.mark.parametrize("backend", constants.BACKENDS)
def test_killed_run_resumes_without_gaps_or_repeats(prepared_sample_dir,
                                                     tmp_path, caplog,
                                                     backend):
  # The tiny network in the rerun as in the command.
  flags = dict(total_rounds=6, rounds_per_checkpoint=2, rounds_per_eval=2,
               backend=backend, model_layout=resnet.TINY)
  checkpoint = os.path.join(checkpoints.checkpoint_dir(str(tmp_path)),
                            checkpoints.CHECKPOINT_PREFIX + "2")

  def check(pid, started):
    if backend == constants.BACKEND_TFF_WORKER:
      assert tff_runtime.worker_pids(pid)
    if backend == constants.BACKEND_RAY:
      assert len(started) >= 4  # GCS, raylet, agents, actors.

  # Everything the killed run started stops (Ray's agents by the guard).
  command_harness.kill_when(
      _main_command(prepared_sample_dir, tmp_path, **flags),
      lambda: os.path.isdir(checkpoint), 600, check)
  killed_rows = _read_csv(os.path.join(str(tmp_path),
                                       constants.METRICS_CSV_FILE))
  killed_at = max(int(r["round"]) for r in killed_rows)
  assert 2 <= killed_at < 6

  # The same command resumes (in this process: what only a subprocess shows,
  # the kill, is above).
  with command_harness.absl_info_logs(caplog):
    final = _run_main(prepared_sample_dir, tmp_path, **flags)
  resumed = re.search(r"Resuming after round (\d+)", caplog.text)
  assert resumed, caplog.text[-3000:]
  resumed = int(resumed.group(1))
  assert resumed in (2, 4) and resumed <= killed_at
  rows = _read_csv(os.path.join(str(tmp_path), constants.METRICS_CSV_FILE))
  assert [int(r["round"]) for r in rows] == list(range(7))
  # Rounds up to the checkpoint are kept as the killed run wrote them.
  assert rows[:resumed + 1] == killed_rows[:resumed + 1]
  assert all(r["train_loss"] for r in rows[1:])
  assert final["rounds_completed"] == 6
  assert json.load(open(os.path.join(
      str(tmp_path), constants.FINAL_METRICS_FILE))) == final


# --- Save directory on a full disk --------------------------------------------


@pytest.mark.slow
def test_full_disk_is_one_line_and_leaves_nothing_partial(
    prepared_sample_dir, small_filesystem, capfd):
  """federated_main (in this process) on a full disk: the initial model's
  weights (ResNet-18's 45 MB; the tiny network's would fit) do not fit: a
  one-line OutputWriteError naming the file, no traceback printed (a crash
  would end this test process), no partial file (resuming after space is
  freed is the normal resume). The exit status 1 and `error:` line that
  `main` makes of it are checked by
  test_cli_unwritable_save_dir_is_one_line."""
  root = small_filesystem(64 * 1024, fill_to_kib=30 * 1024)
  save_dir = os.path.join(root, "run")
  with pytest.raises(errors.OutputWriteError) as info:
    _run_main(prepared_sample_dir, save_dir, total_rounds=1)
  message = str(info.value)
  weights = os.path.join(save_dir, "resnet18_federated_")
  assert message.startswith(f"cannot write {weights}"), message
  assert "No space left on device" in message and "\n" not in message, (
      message)
  stderr = capfd.readouterr().err
  assert "Traceback" not in stderr, stderr[-3000:]
  assert not [n for n in os.listdir(save_dir) if n.endswith((".h5", ".tmp"))]


def test_unwritable_save_dir_is_an_output_error_before_training(
    prepared_sample_dir, make_unwritable, monkeypatch, caplog):
  """An existing --save_model_dir on a read-only file system, federated_main
  in this process: a one-line OutputWriteError naming the first file, the
  reason and the flag, before training; nothing written. The ignored
  --clients_per_thread, when given, is warned about. (Permissions:
  test_cli_unwritable_save_dir_is_one_line, as a command.)"""
  from conftest import UNWRITABLE_REASONS  # pylint: disable=g-import-not-at-top
  def no_training(config, label_spec):
    raise AssertionError(
        f"trained into an unwritable directory: {config}, {label_spec}")

  monkeypatch.setattr(federated, "run_federated", no_training)
  save_dir, prefix = make_unwritable("read_only")
  assert prefix == []
  caplog.set_level(logging.WARNING)
  with pytest.raises(errors.OutputWriteError) as info:
    _run_main(prepared_sample_dir, save_dir, total_rounds=1,
              clients_per_thread=7)
  assert "--clients_per_thread 7 has no effect" in caplog.text
  message = str(info.value)
  # The first file a run writes: its directory's lock.
  lock_file = os.path.join(save_dir, locks.LOCK_FILE)
  assert message.startswith(
      f"cannot write {lock_file}: {UNWRITABLE_REASONS['read_only']}"), message
  assert "--save_model_dir" in message and "\n" not in message, message
  assert os.listdir(save_dir) == []


def test_cli_unwritable_save_dir_is_one_line(prepared_sample_dir,
                                             make_unwritable):
  """The command line with an existing --save_model_dir it has no permission
  to write to (as root, run without the capabilities that bypass file
  permissions, which only a process of its own can drop): exit 1 before
  training, one line naming the first file (the lock) and the reason, no traceback,
  nothing written. This is the file's check that federated_main's `main`
  turns an OutputWriteError into one line and exit status 1 (read-only file
  system: test_unwritable_save_dir_is_an_output_error_before_training, in
  this process). The same run checks that the ignored --clients_per_thread,
  when given, is warned about on stderr."""
  from conftest import UNWRITABLE_REASONS  # pylint: disable=g-import-not-at-top
  save_dir, prefix = make_unwritable("permission")
  result = subprocess.run(
      prefix + _main_command(prepared_sample_dir, save_dir, total_rounds=1,
                             clients_per_thread=7),
      capture_output=True, text=True, env=command_harness.subprocess_env(),
      timeout=900, cwd=REPO_ROOT)
  assert "--clients_per_thread 7 has no effect" in result.stderr
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  error_lines = [line for line in result.stderr.splitlines()
                 if line.startswith("error:")]
  assert len(error_lines) == 1, result.stderr[-3000:]
  lock_file = os.path.join(save_dir, locks.LOCK_FILE)
  assert error_lines[0].startswith(
      f"error: cannot write {lock_file}: {UNWRITABLE_REASONS['permission']}"), (
          error_lines[0])
  assert "--save_model_dir" in error_lines[0]
  assert os.listdir(save_dir) == []


def test_checkpoint_on_a_full_disk_leaves_no_partial_state(small_filesystem):
  """A checkpoint (`checkpoints.CheckpointManager`) cut by a full disk:
  one-line OutputWriteError naming it, TFF's temporary directory removed,
  and after space is freed the same save succeeds and loads (so a rerun
  resumes)."""
  root = small_filesystem(4096, fill_to_kib=256)
  manager = checkpoints.CheckpointManager(root)
  state = collections.OrderedDict(
      weights=np.ones([256, 1024], np.float32), round=1)  # 1 MiB.
  directory = checkpoints.checkpoint_dir(root)
  path = os.path.join(directory, checkpoints.CHECKPOINT_PREFIX + "1")
  with pytest.raises(errors.OutputWriteError,
                     match=f"^cannot write {path}: No space left on device"):
    asyncio.run(manager.save(state, 1))
  assert os.listdir(directory) == []
  os.remove(os.path.join(root, "filler"))
  asyncio.run(manager.save(state, 1))
  loaded, version = asyncio.run(manager.load_latest(state))
  assert version == 1 and np.array_equal(loaded["weights"], state["weights"])


def _event_files(directory):
  """The events files under `directory`, oldest first: by their names'
  creation time (s) and then the writing process's file counter, compared as
  numbers ("events.out.tfevents.<time>.<host>.<pid>.<counter>.v2"; as
  strings, counter 10 sorts before 9)."""
  def created(path):
    fields = os.path.basename(path).split(".")
    return int(fields[3]), int(fields[-2])
  return sorted((os.path.join(d, n) for d, _, names in os.walk(directory)
                 for n in names if n.startswith("events.out.tfevents.")),
                key=created)


def _ends_after_a_complete_record(path):
  """Whether the TFRecord file `path` ends where a record ends (records are
  an 8-byte little-endian length, 4 CRC bytes, the data, 4 CRC bytes)."""
  with open(path, "rb") as f:
    content = f.read()
  end = 0
  while end < len(content):
    end += 16 + int.from_bytes(content[end:end + 8], "little")
  return end == len(content) > 0


def _scalar_steps(directory):
  """{tag: [steps]} of the scalars in every events file under `directory`
  (reading fails on a record cut short)."""
  steps = collections.defaultdict(list)
  for path in _event_files(directory):
    for record in tf.compat.v1.io.tf_record_iterator(path):
      event = tf.compat.v1.Event.FromString(record)
      for value in event.summary.value:
        steps[value.tag].append(event.step)
  return dict(steps)


def test_tensorboard_on_a_full_disk_is_one_line_and_keeps_the_events(
    small_filesystem):
  """TensorBoard summaries of the rounds (`outputs.TensorBoardManager`, over
  TFF's TensorBoardReleaseManager, as `run_federated` writes them) on a full
  disk: a one-line OutputWriteError naming the events file; the events file
  keeps complete records only; after space is freed, a rerun's summaries
  are written."""
  root = small_filesystem(512, fill_to_kib=8)
  directory = os.path.join(root, constants.TENSORBOARD_DIR)
  manager = outputs.TensorBoardManager(directory)
  # metrics.csv's column names; TensorBoard's tags are "train/metric_<i>".
  row = {f"train_metric_{i}": float(i) for i in range(40)}
  with pytest.raises(errors.OutputWriteError) as info:
    for round_num in range(1, 200):
      asyncio.run(manager.release(row, round_num))
  message = str(info.value)
  events, = _event_files(directory)
  assert message.startswith(f"cannot write {events}: No space left on "
                            "device"), message
  assert "\n" not in message and "rerun the same command" in message
  assert _ends_after_a_complete_record(events)
  written = _scalar_steps(directory)
  os.remove(os.path.join(root, "filler"))
  rerun = outputs.TensorBoardManager(directory)
  asyncio.run(rerun.release(row, 1))
  del rerun
  # The new events file is flushed when the writer is deleted.
  after = _scalar_steps(directory)
  assert after["train/metric_0"] == written.get("train/metric_0", []) + [1]


def test_resume_skips_an_unfinished_or_damaged_checkpoint(tmp_path, caplog):
  """A save cut by kill -9 leaves TFF's `<name>_temp<N>` directory (the
  checkpoint is renamed only when complete): it is removed. A latest
  checkpoint damaged after it was written (a data file cut short) is logged,
  removed, and the previous one is resumed; that round can be saved again.
  A checkpoint of another structure is a one-line input error
  (`checkpoints.CheckpointManager.load_latest`)."""
  directory = checkpoints.checkpoint_dir(str(tmp_path))
  manager = checkpoints.CheckpointManager(str(tmp_path))
  def state(round_num):
    return collections.OrderedDict(
        weights=np.full([64, 64], round_num, np.float32), round=round_num)
  for round_num in (2, 4):
    asyncio.run(manager.save(state(round_num), round_num))
  latest = os.path.join(directory, checkpoints.CHECKPOINT_PREFIX + "4")
  data_files = [os.path.join(d, n) for d, _, names in os.walk(latest)
                for n in names if ".data-" in n]
  assert data_files
  for path in data_files:  # Cut short, as by a failing copy or disk.
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  # What kill -9 leaves in the middle of saving round 6.
  unfinished = os.path.join(directory, checkpoints.CHECKPOINT_PREFIX +
                            "6_temp1234")
  os.makedirs(os.path.join(unfinished, "variables"))
  with open(os.path.join(unfinished, "saved_model.pb"), "wb") as f:
    f.write(b"\x08\x01partial")

  caplog.set_level("WARNING")
  loaded, version = asyncio.run(manager.load_latest(state(0)))
  assert version == 2 and loaded["round"] == 2
  assert np.array_equal(loaded["weights"], state(2)["weights"])
  assert sorted(os.listdir(directory)) == [
      checkpoints.CHECKPOINT_PREFIX + "2"]
  messages = [r.getMessage() for r in caplog.records]
  assert any(m.startswith(f"Checkpoint {latest} cannot be read") and
             "resuming from the previous checkpoint" in m for m in messages)
  assert any(m.startswith(f"Removing {unfinished}") for m in messages)
  # The resumed run saves round 4 again and resumes from it next time.
  asyncio.run(manager.save(state(4), 4))
  loaded, version = asyncio.run(manager.load_latest(state(0)))
  assert version == 4 and loaded["round"] == 4
  assert sorted(os.listdir(directory)) == [
      checkpoints.CHECKPOINT_PREFIX + str(r) for r in (2, 4)]

  other = collections.OrderedDict(weights=np.zeros([3], np.int64), round=0,
                                  extra=0)
  with pytest.raises(FlairInputError) as info:
    asyncio.run(manager.load_latest(other))
  assert "\n" not in str(info.value)
  assert str(info.value).startswith(
      f"no checkpoint in {directory} can be read with this configuration")


def _seed_sampling_user_in_round_2_only(tfrecords_dir, user, cohort_size):
  """A `--client_datasets_random_seed` whose round-1 cohort leaves `user`
  out and whose round-2 cohort has it (`run_federated`'s sampling,
  `cohorts.ClientSampler`)."""
  ids = list(pipeline.load_partition(tfrecords_dir, constants.TRAIN,
                                     label_sets.load_label_spec(tfrecords_dir))
             .client_ids)
  for seed in range(1000):
    sample = cohorts.ClientSampler(ids, cohort_size, sampling_seed=seed)
    round_1, round_2 = ([client for client, _ in sample(r)] for r in (1, 2))
    if user not in round_1 and user in round_2:
      return seed
  raise AssertionError(f"no seed samples {user} in round 2 only")


@pytest.mark.slow
def test_bad_records_skipped_then_train_time_error_then_fixed_run_resumes(
    damaged_sample, prepared_sample_dir, tmp_path, caplog, capfd):
  """federated_main (in this process) on a damaged copy of the real sample.
  Without --skip_bad_records it refuses to start, one line per bad file,
  nothing written. With it, the truncated file's cut record and the record
  with a label outside the label index are skipped (counted in the log); a
  JPEG that passes the pre-check but fails to decode in round 2 ends the run
  with an error naming the user file (no traceback or gRPC dump printed),
  after round 1's checkpoint. Once the file is fixed, the same command
  resumes after round 1 and ends like an uninterrupted run: every output,
  each round once, rounds 0-1 kept as written, and the skipped records
  counted in final_metrics.json and in the final metrics it prints. (As a
  command, each error is one `error:` line and exit status 1: see
  `_run_main`.)"""
  import shutil  # pylint: disable=g-import-not-at-top
  copy, cut, bad_label, bad_jpeg = damaged_sample
  user = os.path.basename(bad_jpeg)[:-len(constants.TFRECORD_SUFFIX)]
  seed = _seed_sampling_user_in_round_2_only(copy, user, 3)
  save_dir = str(tmp_path / "run")
  flags = dict(total_rounds=2, rounds_per_checkpoint=1, rounds_per_eval=2,
               client_datasets_random_seed=seed, model_layout=resnet.TINY)

  def printed():
    """What the runs printed since the last call (stdout, stderr and the
    log)."""
    out, err = capfd.readouterr()
    text = caplog.text
    caplog.clear()
    return out, err + text

  printed()
  with pytest.raises(FlairInputError) as info:
    _run_main(copy, save_dir, **flags)
  lines = str(info.value).splitlines()
  assert "2 of the 15 user files" in lines[0], lines
  assert "--skip_bad_records" in lines[0], lines
  assert sorted(line.strip().split(": ", 1)[0] for line in lines[1:]) == (
      sorted([cut, bad_label])), lines
  assert not os.path.exists(save_dir)
  _, err = printed()
  assert "Traceback" not in err, err[-3000:]

  with command_harness.absl_info_logs(caplog), pytest.raises(
      FlairInputError) as info:
    _run_main(copy, save_dir, "--skip_bad_records", **flags)
  _, err = printed()
  assert "skipping 2 bad record(s) in 2 user file(s)" in err, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  assert "debug_error_string" not in err, err[-3000:]
  lines = str(info.value).splitlines()
  assert lines[0].startswith(
      "data error during training in 1 user file(s)"), lines
  assert "rerun the same command to resume" in lines[0], lines
  assert len(lines) == 2, lines
  assert lines[1].strip().startswith(os.path.realpath(bad_jpeg) + ": "), lines
  assert os.listdir(checkpoints.checkpoint_dir(save_dir)) == [
      checkpoints.CHECKPOINT_PREFIX + "1"]
  first_rows = _read_csv(os.path.join(save_dir, constants.METRICS_CSV_FILE))
  assert [int(r["round"]) for r in first_rows] == [0, 1]
  assert not os.path.exists(os.path.join(save_dir,
                                         constants.FINAL_METRICS_FILE))
  leftovers = [os.path.join(d, n) for d, dirs, files in os.walk(save_dir)
               for n in dirs + files if n.endswith(".tmp") or "_temp" in n]
  assert not leftovers

  shutil.copyfile(os.path.join(prepared_sample_dir, constants.TRAIN,
                               os.path.basename(bad_jpeg)), bad_jpeg)
  with command_harness.absl_info_logs(caplog):
    returned = _run_main(copy, save_dir, "--skip_bad_records", **flags)
  out, err = printed()
  assert "Resuming after round 1" in err, err[-3000:]
  assert "skipping 2 bad record(s) in 2 user file(s)" in err, err[-3000:]
  assert "Trained without 2 bad record(s)" in err, err[-3000:]
  with open(os.path.join(copy, constants.LABEL_INDEX_FILE),
            encoding="utf-8") as f:
    num_outputs = len(json.load(f)[constants.LABELS_KEY])
  final, rows = _check_outputs(save_dir, num_outputs, 2, dp_on=False,
                               architecture=resnet.TINY)
  assert rows[:2] == first_rows
  assert final["rounds_completed"] == 2
  assert final["skipped_records"] == {"count": 2,
                                      "files": {cut: 1, bad_label: 1}}
  assert out == trainers.format_final_metrics(final, save_dir) + "\n"
  assert returned == final


def test_overwrite_knows_every_output_of_both_trainers(tmp_path):
  """--overwrite removes, and the run-identity rule looks for, the names in
  constants.RUN_OUTPUT_NAMES and the best-weights files
  (`run_dir.run_outputs_in`): they must cover what the trainers write."""
  from benchmark.training import central  # pylint: disable=g-import-not-at-top
  save_dir = str(tmp_path)
  config = config_lib.build(config_lib.CentralConfig, {
      "tfrecords_dir": "x", "save_model_dir": save_dir})
  paths = central._Paths(config, 17)  # pylint: disable=protected-access
  written = [paths.csv, paths.final, paths.checkpoints, paths.tensorboard,
             checkpoints.checkpoint_dir(save_dir),
             os.path.join(save_dir, constants.FEDERATED_WORKER_LOG_FILE)]
  for path in written:
    assert os.path.dirname(path) == save_dir, path
    assert os.path.basename(path) in constants.RUN_OUTPUT_NAMES, path
  weights = [run_dir.best_weights_path(save_dir, trainer, n, architecture)
             for trainer in (central.TRAINER_NAME, federated.TRAINER_NAME)
             for n in (1, 17) for architecture in resnet.LAYOUTS]
  assert paths.weights in weights
  for path in weights:
    with open(path, "w", encoding="utf-8") as f:
      f.write("weights")
  assert run_dir.run_outputs_in(save_dir) == sorted(
      os.path.basename(path) for path in weights)
