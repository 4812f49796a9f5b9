"""Tests of DP-FTRL, `--dp_mechanism tree` (benchmark/training/dp.py: the
tree query, its noise and its accounting; benchmark/training/cohorts.py:
`CyclicSampler`), and a run with it end to end.

The variance test measures the noise that tensorflow_privacy's tree query
actually adds each round (all records zero, so the result is the noise)
and compares it with the per-round variance docs/dp.md states
(`dp.tree_noise_variance`), including after a restart of the tree.
"""

import csv
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_privacy.privacy.analysis import tree_aggregation_accountant

from benchmark.core import constants
from benchmark.core.errors import FlairInputError
from benchmark.model import resnet
from benchmark.training import cohorts
from benchmark.training import config as config_lib
from benchmark.training import dp
import flag_harness

_PATHS = {"tfrecords_dir": "x", "save_model_dir": "unused"}
_SIZE = 60_000  # Coordinates: the variance's relative stderr is 0.6%.


def _round_noises(z, clip, clients, period, rounds, seed):
  """The noise of each round's sum (the query's mean times `clients`)."""
  spec = tf.TensorSpec([_SIZE], tf.float32)
  query = dp.tree_query(z, clients, clip, spec, period, noise_seed=seed)
  global_state = query.initial_global_state()
  noises = []
  for _ in range(rounds):
    params = query.derive_sample_params(global_state)
    sample = query.accumulate_preprocessed_record(
        query.initial_sample_state(spec),
        query.preprocess_record(params, tf.zeros([_SIZE])))
    result, global_state, _ = query.get_noised_result(sample, global_state)
    noises.append(result.numpy() * clients)
  return noises


def test_tree_noise_has_the_documented_variance_per_round_and_restarts():
  """Trees of 9 rounds: round 8 (the 8th leaf, three trailing zero bits)
  has variance 1.84 (z clip)^2, round 4 1.38, odd rounds 1; round 12 is the
  3rd leaf of the second tree (variance 1), not the 12th leaf of one tree
  (1.38)."""
  z, clip = 1.5, 0.2
  noises = _round_noises(z, clip, clients=4, period=9, rounds=12, seed=3)
  measured = [np.var(n) / (z * clip)**2 for n in noises]
  documented = [dp.tree_noise_variance((r - 1) % 9 + 1)
                for r in range(1, 13)]
  np.testing.assert_allclose(measured, documented, rtol=0.04)
  assert documented[7] == pytest.approx(1.838, abs=1e-3)
  assert documented[3] == pytest.approx(1.381, abs=1e-3)
  assert documented[11] == 1.0 and dp.tree_noise_variance(12) > 1.3
  assert all(abs(np.mean(n)) < 0.05 * z * clip for n in noises)
  # Seeded: the same seed gives the same noise.
  again = _round_noises(z, clip, clients=4, period=9, rounds=2, seed=3)
  np.testing.assert_array_equal(again[1], noises[1])


def test_tree_accounting_is_tensorflow_privacys():
  """The equivalent Gaussian mechanism has the RDP of
  `compute_rdp_tree_restart` at every order, and the calibrated
  multiplier meets the target."""
  sizes = dp.tree_sizes(10, 4)
  assert sizes == (4, 4, 2)
  orders = [1.5, 2.0, 8.0, 32.0]
  rdp = tree_aggregation_accountant.compute_rdp_tree_restart(
      3.0, list(sizes), orders)
  # 3 + 3 + 2 nodes reach a user: the Gaussian of z / sqrt(8).
  np.testing.assert_allclose(rdp, [a * 8 / (2 * 3.0**2) for a in orders])
  assert dp.tree_sensitivity_squared(sizes) == pytest.approx(8.0)
  delta = 1e-5
  for accountant in dp.ACCOUNTANTS:
    z = dp.calibrate_tree_noise_multiplier(4.0, sizes, delta, accountant)
    assert dp.tree_epsilon(z, sizes, delta, accountant) <= 4.0
    assert dp.tree_epsilon(z * 0.99, sizes, delta, accountant) > 4.0


def test_cyclic_sampler_takes_each_user_once_per_pass():
  ids = [f"u{i:02d}" for i in range(13)]
  sampler = cohorts.CyclicSampler(ids, 3, seed=0, sampling_seed=5)
  for first_round in (1, 5, 9):  # Passes of 13 // 3 = 4 rounds.
    seen = [c for r in range(first_round, first_round + 4)
            for c, _ in sampler(r)]
    assert len(seen) == len(set(seen)) == 12
  assert [c for c, _ in sampler(1)] != [c for c, _ in sampler(5)]
  again = cohorts.CyclicSampler(ids, 3, seed=0, sampling_seed=5)
  assert [c for c, _ in again(6)] == [c for c, _ in sampler(6)]


def test_tree_with_adaptive_clipping_or_original_calibration_is_refused():
  with pytest.raises(FlairInputError, match="--target_unclipped_quantile 0"):
    config_lib.build(config_lib.FederatedConfig,
                     dict(_PATHS, epsilon=2.0, dp_mechanism="tree"))
  with pytest.raises(FlairInputError, match="--dp_calibration original"):
    config_lib.build(config_lib.FederatedConfig, dict(
        _PATHS, epsilon=2.0, dp_mechanism="tree",
        target_unclipped_quantile=0.0, dp_calibration="original"))


def test_dp_ftrl_runs_end_to_end(prepared_sample_dir, tmp_path):
  """13 users, cohorts of 3: trees of 4 rounds, so 5 rounds make two trees;
  the run reports that guarantee, and its per-node noise in metrics.csv."""
  save_dir = str(tmp_path / "run")
  final = flag_harness.run_from_flags(
      "benchmark.federated_main", f"--tfrecords_dir={prepared_sample_dir}",
      f"--save_model_dir={save_dir}", "--model_layout=" + resnet.TINY,
      "--image_height=32", "--image_width=32", "--clients_per_round=3",
      "--client_batch_size=2", "--max_elements_per_client=2",
      "--client_epochs_per_round=1", "--rounds_per_eval=5",
      "--eval_batch_size=16", "--total_rounds=5", "--epsilon=4",
      "--dp_mechanism=tree", "--target_unclipped_quantile=0",
      "--l2_norm_clip=0.1", "--server_optimizer=sgdm",
      "--server_learning_rate=1.0")
  with open(os.path.join(save_dir, constants.FINAL_METRICS_FILE),
            encoding="utf-8") as f:
    privacy = json.load(f)["privacy"]
  assert privacy["guarantee"] == final["privacy"]["guarantee"]
  assert (privacy["mechanism"], privacy["rounds_per_tree"],
          privacy["num_compositions"]) == ("tree", 4, 2)
  z = privacy["noise_multiplier"]
  assert dp.tree_epsilon(z, (4, 1), privacy["delta"]) <= 4.0
  with open(os.path.join(save_dir, constants.METRICS_CSV_FILE),
            newline="", encoding="utf-8") as f:
    rows = [r for r in csv.DictReader(f) if r["dp_noise_stddev"]]
  assert len(rows) == 5
  assert float(rows[0]["dp_noise_stddev"]) == pytest.approx(z * 0.1)
