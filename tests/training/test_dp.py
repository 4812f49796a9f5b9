"""Tests of DP noise calibration and the DP aggregator
(benchmark/training/dp.py).

The reference values are computed here independently, with dp_accounting's
RDP accountant and tensorflow_privacy's `compute_noise` (the function the
original FLAIR benchmark called), not taken from the implementation.
"""

import math

import dp_accounting
import pytest
from tensorflow_privacy.privacy.analysis import compute_noise_from_budget_lib

from benchmark.core.errors import FlairInputError
from benchmark.training import dp

# FLAIR's training users and the reference defaults (docs/formats.md,
# docs/original_benchmark.md).
N = 41_131
COHORT = 200
ROUNDS = 5_000
EPSILON = 2.0
DELTA = 1.0 / N**1.1
# The orders tensorflow_privacy's compute_noise uses, written out here.
ORDERS = ([1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5] +
          list(range(5, 64)) + [128, 256, 512])


def _independent_epsilon(z, q, compositions):
  accountant = dp_accounting.rdp.RdpAccountant(ORDERS)
  accountant.compose(
      dp_accounting.SelfComposedDpEvent(
          dp_accounting.PoissonSampledDpEvent(
              q, dp_accounting.GaussianDpEvent(z)), compositions))
  return accountant.get_epsilon(DELTA)


@pytest.fixture(scope="module")
def flair_calibration():
  return dp.calibrate(EPSILON, N, COHORT, ROUNDS)


def test_orders_match_the_standard_list():
  assert list(dp.RDP_ORDERS) == [float(a) for a in ORDERS]


def test_rounds_calibration_is_tight_for_total_rounds(flair_calibration):
  cal = flair_calibration
  z = cal.noise_multiplier
  assert cal.calibration == "rounds"
  assert cal.delta == pytest.approx(DELTA)
  assert cal.sampling_rate == pytest.approx(COHORT / N)
  assert cal.num_compositions == ROUNDS
  # Meets the budget for exactly ROUNDS rounds at q = cohort / n ...
  assert _independent_epsilon(z, COHORT / N, ROUNDS) <= EPSILON
  # ... and is the smallest such multiplier to within the search tolerance
  # (1e-6 absolute; 1e-3 relative is far coarser, so this is not flaky).
  assert _independent_epsilon(z * (1 - 1e-3), COHORT / N, ROUNDS) > EPSILON
  assert 0.5 < z < 2.0  # Sanity: about 1.03 at these settings.


def test_original_calibration_reproduces_tensorflow_privacy(
    flair_calibration, capsys):
  original = compute_noise_from_budget_lib.compute_noise(
      N, COHORT, EPSILON, ROUNDS, DELTA, 1e-6)
  capsys.readouterr()  # compute_noise prints; keep the test output quiet.
  cal = dp.calibrate(EPSILON, N, COHORT, ROUNDS, calibration="original")
  assert cal.calibration == "original"
  assert cal.num_compositions == math.ceil(ROUNDS * N / COHORT)
  assert cal.noise_multiplier == pytest.approx(original, rel=1e-4)
  # The original accounts for n / cohort (~206) times more rounds: it needs
  # several times more noise than the guarantee for ROUNDS rounds requires.
  rounds_z = flair_calibration.noise_multiplier
  assert cal.noise_multiplier > 5 * rounds_z
  # Both values are reported whichever is used.
  assert cal.noise_multipliers_by_calibration["rounds"] == pytest.approx(
      rounds_z)
  assert flair_calibration.noise_multipliers_by_calibration[
      "original"] == pytest.approx(original, rel=1e-4)


def test_simulated_cohort_scales_noise():
  sim = 1000
  cal = dp.calibrate(EPSILON, N, COHORT, ROUNDS,
                     simulated_clients_per_round=sim)
  direct = dp.calibrate(EPSILON, N, sim, ROUNDS)
  assert cal.sampling_rate == pytest.approx(sim / N)
  assert cal.calibrated_noise_multiplier == pytest.approx(
      direct.noise_multiplier)
  assert cal.noise_multiplier == pytest.approx(
      direct.noise_multiplier * COHORT / sim)
  d = cal.to_dict()
  for key in ("epsilon", "delta", "noise_multiplier", "calibration",
              "total_rounds", "sampling_rate", "num_train_clients"):
    assert key in d
  assert "1000 clients per round" in d["guarantee"]


def test_guarantee_text(flair_calibration):
  text = flair_calibration.guarantee
  assert "-DP at the user level for 5000 rounds" in text
  assert f"{flair_calibration.noise_multiplier:.6g}" in text


@pytest.mark.parametrize("kwargs,flag", [
    (dict(calibration="bogus"), "--dp_calibration"),
    (dict(simulated_clients_per_round=100), "--simulated_clients_per_round"),
    (dict(simulated_clients_per_round=N + 1), "--simulated_clients_per_round"),
])
def test_bad_flags_are_input_errors(kwargs, flag):
  with pytest.raises(FlairInputError, match=flag):
    dp.calibrate(EPSILON, N, COHORT, ROUNDS, **kwargs)


def test_fixed_and_adaptive_aggregators_build():
  fixed = dp.build_aggregator(1.0, 200, 0.1, 0.0)
  adaptive = dp.build_aggregator(1.0, 200, 0.1, 0.1)
  # Both are unweighted factories (the DP mean weighs clients equally).
  import tensorflow_federated as tff
  assert isinstance(fixed, tff.aggregators.UnweightedAggregationFactory)
  assert isinstance(adaptive, tff.aggregators.UnweightedAggregationFactory)


def test_adaptive_clipping_with_too_much_noise_explains_flags():
  # 3 clients per round: TFF's clipped-count stddev is 0.15, so a noise
  # multiplier >= 0.3 cannot be reached.
  with pytest.raises(FlairInputError) as info:
    dp.build_aggregator(0.5, 3, 0.1, 0.1)
  message = str(info.value)
  assert "\n" not in message
  for flag in ("--clients_per_round", "--simulated_clients_per_round",
               "--epsilon", "--target_unclipped_quantile 0"):
    assert flag in message
  # Fixed clipping accepts the same noise.
  dp.build_aggregator(0.5, 3, 0.1, 0.0)


@pytest.mark.parametrize("clients", [3, 20, 200])
def test_adaptive_clipping_limit_is_tffs(clients):
  """The limit checked before TFF is called is TFF's own: just below it TFF
  builds the aggregator, at it TFF itself refuses (ValueError) and we give
  the one-line error."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  limit = 2 * 0.05 * clients
  dp.build_aggregator(limit * (1 - 1e-6), clients, 0.1, 0.1)
  with pytest.raises(ValueError):
    tff.aggregators.DifferentiallyPrivateFactory.gaussian_adaptive(
        noise_multiplier=limit, clients_per_round=float(clients),
        initial_l2_norm_clip=0.1, target_unclipped_quantile=0.1)
  with pytest.raises(FlairInputError, match="--target_unclipped_quantile 0"):
    dp.build_aggregator(limit, clients, 0.1, 0.1)


@pytest.mark.parametrize("clip,quantile,flag", [
    (0.0, 0.1, "--l2_norm_clip"),
    (0.1, 1.0, "--target_unclipped_quantile"),
    (0.1, -0.1, "--target_unclipped_quantile"),
])
def test_bad_aggregator_flags(clip, quantile, flag):
  with pytest.raises(FlairInputError, match=flag):
    dp.build_aggregator(1.0, 10, clip, quantile)
