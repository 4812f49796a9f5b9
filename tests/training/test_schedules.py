"""Tests of the server's AdamW and learning-rate schedules
(benchmark/training/optimizers.py: `TorchAdamW`, `LearningRateSchedule`;
`--server_optimizer adamw`, `--server_lr_schedule` and its flags in
benchmark/training/config.py).

The reference formulas are written out here from their sources, not taken
from the implementation: PyTorch's `torch.optim.AdamW` update (its
documentation) and pfl-research's polynomial decay with warm-up
(apple/pfl-research benchmarks/utils/callback/pytorch.py, after Hugging
Face's `get_polynomial_decay_schedule_with_warmup`), and cosine annealing.
"""

import csv
import math
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from benchmark.core import constants
from benchmark.core.errors import FlairInputError
from benchmark.model import resnet
from benchmark.training import checkpoints
from benchmark.training import config as config_lib
from benchmark.training import optimizers
import flag_harness

_PATHS = {"tfrecords_dir": "x", "save_model_dir": "unused"}


def _torch_adamw(weights, gradients, lr, beta_1, beta_2, eps, decay):
  """PyTorch's AdamW, step by step; yields the weights after each step."""
  w = np.array(weights, np.float64)
  m = np.zeros_like(w)
  v = np.zeros_like(w)
  for t, g in enumerate(gradients, start=1):
    g = np.asarray(g, np.float64)
    w = w - lr * decay * w
    m = beta_1 * m + (1 - beta_1) * g
    v = beta_2 * v + (1 - beta_2) * g**2
    m_hat = m / (1 - beta_1**t)
    v_hat = v / (1 - beta_2**t)
    w = w - lr * m_hat / (np.sqrt(v_hat) + eps)
    yield w


def test_adamw_is_torch_adamw():
  """pfl-research's central optimizer: AdamW, eps 0.01, betas (0.9, 0.99),
  here with weight decay 0.05 so that the decay term shows."""
  weights0 = [1.0, -2.0, 0.5, 3.0]
  rng = np.random.default_rng(0)
  gradients = [rng.normal(size=4) * s for s in (1.0, 0.01, 0.3, 2.0, 0.001)]
  expected = list(_torch_adamw(weights0, gradients, 0.1, 0.9, 0.99, 0.01,
                               0.05))
  optimizer = optimizers.build_server_optimizer(
      "adamw", 0.1, beta_1=0.9, beta_2=0.99, epsilon=0.01, weight_decay=0.05)
  weights = (tf.constant(weights0, tf.float32),)
  state = optimizer.initialize((tf.TensorSpec([4], tf.float32),))
  for g, want in zip(gradients, expected):
    state, weights = optimizer.next(state, weights,
                                    (tf.constant(g, tf.float32),))
    np.testing.assert_allclose(weights[0].numpy(), want, rtol=1e-5,
                               atol=1e-6)
  # TFF's own AdamW puts epsilon elsewhere: it would differ (module doc).
  tff_adamw = optimizers.tff.learning.optimizers.build_adamw(
      0.1, beta_1=0.9, beta_2=0.99, epsilon=0.01, weight_decay=0.05)
  tff_state = tff_adamw.initialize((tf.TensorSpec([4], tf.float32),))
  _, (first,) = tff_adamw.next(tff_state, (tf.constant(weights0),),
                               (tf.constant(gradients[0], tf.float32),))
  assert not np.allclose(first.numpy(), expected[0], rtol=1e-4)


def _pfl_polynomial(step, base, warmup, total, end, power):
  """pfl-research's lr_lambda times the initial rate, at scheduler step
  `step` (the update after `step` others)."""
  if step < warmup:
    return base * step / max(1, warmup)
  if step > total:
    return end
  remaining = 1 - (step - warmup) / (total - warmup)
  return (base - end) * remaining**power + end


def _cosine(step, base, warmup, total, end):
  if step < warmup:
    return base * step / max(1, warmup)
  progress = min((step - warmup) / (total - warmup), 1.0)
  return end + (base - end) * (1 + math.cos(math.pi * progress)) / 2


def _server(**settings):
  return config_lib.build(config_lib.FederatedConfig,
                          dict(_PATHS, server_optimizer="sgd",
                               **settings)).server


def _effective_rates(optimizer, rounds, state=None):
  """The learning rate each of `rounds` SGD steps applied (weight change
  over the gradient, gradient 1), and the state after them."""
  weights = (tf.constant([0.0], tf.float32),)
  if state is None:
    state = optimizer.initialize((tf.TensorSpec([1], tf.float32),))
  rates = []
  for _ in range(rounds):
    before = float(weights[0][0])
    state, weights = optimizer.next(state, weights, (tf.ones([1]),))
    rates.append(before - float(weights[0][0]))
  return rates, state


@pytest.mark.parametrize("kind,reference", [
    ("polynomial", lambda t: _pfl_polynomial(t, 0.1, 3, 10, 0.02, 2.0)),
    ("cosine", lambda t: _cosine(t, 0.1, 3, 10, 0.02))])
def test_schedule_rate_per_round_is_the_formula_also_after_a_resume(
    kind, reference):
  """Rounds 1..12 of a 10-round schedule (rounds past the end keep the end
  rate); the state after round 5 goes through numpy, as a checkpoint does,
  into a newly built optimizer that continues the schedule."""
  server = _server(server_learning_rate=0.1, server_lr_schedule=kind,
                   server_lr_warmup_rounds=3, server_lr_decay_power=2.0,
                   server_lr_end=0.02)
  expected = [reference(t) for t in range(12)]
  rates, state = _effective_rates(server.build_optimizer(10), 5)
  saved = tf.nest.map_structure(np.array, state)
  resumed, _ = _effective_rates(server.build_optimizer(10), 7,
                                state=tf.nest.map_structure(tf.constant,
                                                            saved))
  np.testing.assert_allclose(rates + resumed, expected, rtol=1e-5, atol=1e-7)
  assert rates[0] == 0.0  # Warm-up starts from 0, as pfl's does.


def test_constant_schedule_is_the_plain_optimizer():
  server = _server(server_learning_rate=0.3)
  assert not server.scheduled
  rates, _ = _effective_rates(server.build_optimizer(), 3)
  np.testing.assert_allclose(rates, [0.3] * 3, rtol=1e-6)


@pytest.mark.parametrize("field,value,flag", [
    ("server_lr_schedule", "step", "--server_lr_schedule"),
    ("server_lr_warmup_rounds", -1, "--server_lr_warmup_rounds"),
    ("server_lr_decay_power", 0.0, "--server_lr_decay_power"),
    ("server_lr_end", 0.5, "--server_lr_end"),
    ("server_weight_decay", -0.1, "--server_weight_decay")])
def test_bad_schedule_settings_name_the_flag(field, value, flag):
  with pytest.raises(FlairInputError, match=flag):
    config_lib.build(config_lib.FederatedConfig,
                     dict(_PATHS, **{field: value}))


def _rows(save_dir):
  with open(os.path.join(save_dir, constants.METRICS_CSV_FILE),
            newline="", encoding="utf-8") as f:
    return {int(r["round"]): r for r in csv.DictReader(f)}


def _val_losses(save_dir):
  return {r: float(row["val_loss"]) for r, row in _rows(save_dir).items()}


def test_adamw_with_warmup_runs_and_a_resumed_run_continues_the_schedule(
    prepared_sample_dir, tmp_path):
  """AdamW with pfl's schedule over 3 rounds (warm-up 2): round 1's rate is
  0, so its model is the initial one; round 3 runs at the full rate. The
  run is then resumed from round 2's checkpoint and redoes round 3: the
  same model (a schedule restarted by the resume would give round 3 rate
  0, the model of round 2)."""
  save_dir = str(tmp_path / "run")
  command = [
      "benchmark.federated_main", f"--tfrecords_dir={prepared_sample_dir}",
      f"--save_model_dir={save_dir}", "--model_layout=" + resnet.TINY,
      "--image_height=32", "--image_width=32", "--clients_per_round=3",
      "--client_batch_size=2", "--max_elements_per_client=4",
      "--client_epochs_per_round=1", "--rounds_per_eval=1",
      "--rounds_per_checkpoint=1", "--eval_batch_size=16",
      "--total_rounds=3", "--server_optimizer=adamw",
      "--server_weight_decay=0.01", "--server_lr_schedule=polynomial",
      "--server_lr_warmup_rounds=2"]
  flag_harness.run_from_flags(*command)
  first = _val_losses(save_dir)
  first_round_3_time = _rows(save_dir)[3]["round_time_s"]
  assert first[1] == first[0]
  assert first[2] != first[1] and first[3] != first[2]
  shutil.rmtree(os.path.join(checkpoints.checkpoint_dir(save_dir),
                             f"{checkpoints.CHECKPOINT_PREFIX}3"))
  flag_harness.run_from_flags(*command)
  resumed = _val_losses(save_dir)
  # Round 3 was trained again (its wall time is another measurement).
  assert _rows(save_dir)[3]["round_time_s"] != first_round_3_time
  assert resumed[3] == pytest.approx(first[3], rel=1e-6)
  assert resumed[3] != resumed[2]
