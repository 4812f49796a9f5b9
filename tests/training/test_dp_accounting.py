"""Tests of `--accountant pld` and of the guarantee a DP run reports
(benchmark/training/dp.py, `--accountant`, `--dp_population`, `--dp_delta`).

The reference noise multipliers are computed here with dp_accounting
directly (its PLD accountant and its `calibrate_dp_mechanism`, an explicit
bracket and a finer tolerance), not taken from the implementation. The
calibration tolerance stated by `dp.PLD_SEARCH_TOL` (1e-4 in noise
multiplier units) bounds the difference: both searches return the upper
end of a bracket around the same smallest multiplier, so they differ by
at most the sum of their tolerances.
"""

import csv
import json
import os

import dp_accounting
import pytest

from benchmark.core import constants
from benchmark.model import resnet
from benchmark.training import dp
import flag_harness

_REFERENCE_TOL = 1e-5


def _pld_epsilon(z, q, rounds, delta):
  accountant = dp_accounting.pld.PLDAccountant(
      value_discretization_interval=1e-4)
  accountant.compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)),
      rounds))
  return accountant.get_epsilon(delta)


def _reference_multiplier(epsilon, delta, q, rounds):
  """The smallest multiplier meeting (epsilon, delta), by dp_accounting."""

  def make_event(z):
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            q, dp_accounting.GaussianDpEvent(z)), rounds)

  return dp_accounting.calibrate_dp_mechanism(
      lambda: dp_accounting.pld.PLDAccountant(
          value_discretization_interval=1e-4),
      make_event, epsilon, delta,
      dp_accounting.ExplicitBracketInterval(0.3, 10.0), tol=_REFERENCE_TOL)


@pytest.mark.parametrize("epsilon,delta,q,rounds", [
    (0.5, 1e-6, 0.1, 5),
    (1.0, 1e-5, 0.3, 10),
    (0.3, 1e-5, 0.05, 50)])
def test_pld_noise_multiplier_matches_dp_accounting(epsilon, delta, q,
                                                     rounds):
  ours = dp.calibrate_noise_multiplier(epsilon, q, rounds, delta,
                                       accountant=dp.ACCOUNTANT_PLD)
  reference = _reference_multiplier(epsilon, delta, q, rounds)
  assert abs(ours - reference) <= dp.PLD_SEARCH_TOL + _REFERENCE_TOL
  assert _pld_epsilon(ours, q, rounds, delta) <= epsilon
  # PLD is the tighter accountant: it needs less noise than RDP.
  assert ours < dp.calibrate_noise_multiplier(epsilon, q, rounds, delta)


def test_calibrate_uses_the_accountant_population_and_delta():
  calibration = dp.calibrate(0.5, 13, 3, 5, accountant=dp.ACCOUNTANT_PLD,
                             population=30, delta=1e-6)
  assert (calibration.sampling_rate, calibration.delta,
          calibration.population) == (pytest.approx(3 / 30), 1e-6, 30)
  assert calibration.accountant == dp.ACCOUNTANT_PLD
  assert calibration.calibrated_noise_multiplier == pytest.approx(
      _reference_multiplier(0.5, 1e-6, 0.1, 5),
      abs=dp.PLD_SEARCH_TOL + _REFERENCE_TOL)
  assert "PLD accountant" in calibration.guarantee
  assert "population of 30 users" in calibration.guarantee
  # The defaults: the training users and delta = 1/n^1.1.
  default = dp.calibrate(0.5, 13, 3, 5)
  assert (default.population, default.delta) == (13, dp.target_delta(13))


def _last_row(save_dir):
  with open(os.path.join(save_dir, constants.METRICS_CSV_FILE),
            newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))[-1]


def test_reported_epsilon_of_a_finished_run_meets_the_target(
    prepared_sample_dir, tmp_path):
  """A PLD run with another population and delta: its recorded noise (the
  metrics.csv column over the clip) recomputed by dp_accounting gives at
  most the target epsilon, for the population and delta it reports."""
  save_dir = str(tmp_path / "run")
  final = flag_harness.run_from_flags(
      "benchmark.federated_main", f"--tfrecords_dir={prepared_sample_dir}",
      f"--save_model_dir={save_dir}", "--model_layout=" + resnet.TINY,
      "--image_height=32", "--image_width=32", "--clients_per_round=3",
      "--client_batch_size=2", "--max_elements_per_client=2",
      "--client_epochs_per_round=1", "--rounds_per_eval=2",
      "--eval_batch_size=16", "--total_rounds=2", "--epsilon=0.5",
      "--target_unclipped_quantile=0", "--l2_norm_clip=0.1",
      "--accountant=pld", "--dp_population=30", "--dp_delta=1e-5")
  with open(os.path.join(save_dir, constants.FINAL_METRICS_FILE),
            encoding="utf-8") as f:
    privacy = json.load(f)["privacy"]
  assert privacy["guarantee"] == final["privacy"]["guarantee"]
  assert (privacy["accountant"], privacy["population"], privacy["delta"],
          privacy["sampling_rate"]) == ("pld", 30, 1e-5,
                                        pytest.approx(3 / 30))
  row = _last_row(save_dir)
  recorded = float(row["dp_noise_stddev"]) / float(row["dp_clip"])
  assert recorded == pytest.approx(privacy["noise_multiplier"], rel=1e-6)
  epsilon = _pld_epsilon(recorded, 3 / 30, 2, 1e-5)
  assert epsilon <= 0.5
  # Calibrated, not just safe: 1% less noise would miss the target.
  assert _pld_epsilon(recorded * 0.99, 3 / 30, 2, 1e-5) > 0.5
  assert privacy["achieved_epsilon"] == pytest.approx(epsilon, abs=1e-3)
