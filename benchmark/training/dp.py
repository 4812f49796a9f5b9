"""User-level differential privacy for federated training: noise calibration
and the DP aggregator.

Privacy unit: one user (one client). Each round samples a cohort of clients;
the server clips each client's model update to an L2 norm, sums the clipped
updates, adds Gaussian noise of stddev `noise_multiplier * clip` and divides by
the cohort size (McMahan et al. 2018, "Learning Differentially Private
Recurrent Language Models", arXiv 1710.06963). The privacy loss of one round
is that of the sampled Gaussian mechanism with sampling rate
`q = cohort / num_train_clients`; `total_rounds` rounds compose, and the RDP
accountant of `dp_accounting` (Mironov, Talwar, Zhang 2019, arXiv 1908.10530)
converts the composed RDP curve into an (epsilon, delta) guarantee.

Two calibrations (docs/dp.md, "Calibration"):

* `"rounds"` (default): the noise multiplier is the smallest one (to within
  `tol`) for which exactly `total_rounds` compositions of the sampled Gaussian
  mechanism at rate `q` meet `(epsilon, delta)`. One round of FedAvg touches
  each sampled user once, so one round is one composition.
* `"original"`: what apple/ml-flair did, via tensorflow_privacy's
  `compute_noise(n, cohort, epsilon, epochs=total_rounds, delta)`, which treats
  `total_rounds` as *epochs* of DP-SGD and therefore composes
  `ceil(total_rounds * n / cohort)` steps -- `n / cohort` times more rounds than
  are run (about 200x at FLAIR's settings), so about 10x more noise than needed
  for the stated guarantee. Kept for comparison with published numbers.

Caveat shared by both (and by the original): the accountant assumes Poisson
sampling at rate `q`, while the trainer samples a fixed-size cohort uniformly
without replacement each round; this is the customary approximation.

With `simulated_clients_per_round = S`, the noise multiplier is calibrated for
a cohort of `S` (q = S / n) and then scaled by `clients_per_round / S`, so
that the *noise on the average update* equals what a cohort of `S` would get
(the original's simulation of large cohorts). The guarantee then describes a
run with `S` clients per round, not the simulated run itself.
"""

import dataclasses
import math
from typing import Optional

from absl import logging
import dp_accounting
import tensorflow_federated as tff

from benchmark.core.errors import FlairInputError

# RDP orders: the list used by tensorflow_privacy's `compute_noise`
# (tensorflow_privacy/privacy/analysis/compute_noise_from_budget_lib.py), which
# the original FLAIR benchmark called. Using the same orders for both
# calibrations means they differ only in the number of composed rounds.
RDP_ORDERS = tuple([1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5] +
                   [float(a) for a in range(5, 64)] + [128.0, 256.0, 512.0])

CALIBRATION_ROUNDS = "rounds"
CALIBRATION_ORIGINAL = "original"
CALIBRATIONS = (CALIBRATION_ROUNDS, CALIBRATION_ORIGINAL)

# Tolerance of the noise-multiplier search, in noise-multiplier units
# (dp_accounting.calibrate_dp_mechanism's default for continuous parameters).
NOISE_SEARCH_TOL = 1e-6
# Lower end of the search bracket; the upper end is found by doubling
# (same start as the original's compute_noise(..., noise_lbd=1e-6)).
_NOISE_SEARCH_LOWER = 1e-6

# Default stddev of the noised clipped count in TFF's adaptive clipping, as a
# fraction of the cohort (tff.aggregators.DifferentiallyPrivateFactory.
# gaussian_adaptive, "defaults to 0.05 * clients_per_round").
_TFF_CLIPPED_COUNT_STDDEV_FRACTION = 0.05


def target_delta(num_train_clients: int) -> float:
  """Returns delta = 1 / n**1.1 for `n` training users (docs/dp.md),
  i.e. below 1/n as a user-level delta must be."""
  if num_train_clients < 1:
    raise ValueError(
        f"num_train_clients must be >= 1, got {num_train_clients}")
  return 1.0 / num_train_clients**1.1


def _make_event(noise_multiplier: float, sampling_rate: float,
                num_compositions: int) -> dp_accounting.DpEvent:
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)),
      num_compositions)


def _make_accountant() -> dp_accounting.rdp.RdpAccountant:
  return dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS))


def rdp_epsilon(noise_multiplier: float, sampling_rate: float,
                num_compositions: int, delta: float) -> float:
  """Epsilon of `num_compositions` sampled Gaussian mechanisms.

  Args:
    noise_multiplier: noise stddev / L2 clip (> 0).
    sampling_rate: Poisson sampling probability of a user per composition,
      in (0, 1].
    num_compositions: rounds (or steps) composed.
    delta: target delta.

  Returns:
    The RDP accountant's epsilon at `delta` over `RDP_ORDERS` (may be inf).
  """
  accountant = _make_accountant()
  accountant.compose(
      _make_event(noise_multiplier, sampling_rate, num_compositions))
  return accountant.get_epsilon(delta)


def calibrate_noise_multiplier(target_epsilon: float, sampling_rate: float,
                               num_compositions: int, delta: float,
                               tol: float = NOISE_SEARCH_TOL) -> float:
  """Smallest noise multiplier (within `tol`) meeting (epsilon, delta).

  Uses `dp_accounting.calibrate_dp_mechanism` (Brent's method on the RDP
  accountant's epsilon, bracket found by doubling from 1e-6); the returned
  value is guaranteed to give epsilon <= target_epsilon, and a value `tol`
  smaller would exceed it.

  Raises:
    ValueError: on non-positive epsilon, a sampling rate outside (0, 1] or
      fewer than one composition.
  """
  if not target_epsilon > 0:
    raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
  if not 0 < sampling_rate <= 1:
    raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
  if num_compositions < 1:
    raise ValueError(
        f"num_compositions must be >= 1, got {num_compositions}")
  return float(
      dp_accounting.calibrate_dp_mechanism(
          _make_accountant,
          lambda z: _make_event(z, sampling_rate, num_compositions),
          target_epsilon, delta,
          dp_accounting.LowerEndpointAndGuess(_NOISE_SEARCH_LOWER,
                                              2 * _NOISE_SEARCH_LOWER),
          tol=tol))


@dataclasses.dataclass(frozen=True)
class DpCalibration:
  """The outcome of noise calibration for one run.

  Attributes:
    epsilon: target epsilon.
    delta: target delta (1 / num_train_clients**1.1).
    calibration: "rounds" or "original" (see module docstring).
    noise_multiplier: the multiplier given to the aggregator (after the
      simulated-cohort scaling, if any).
    calibrated_noise_multiplier: the multiplier found for `cohort_size` before
      scaling.
    noise_multipliers_by_calibration: calibrated (unscaled) multiplier under
      each calibration, for the log.
    num_compositions: compositions accounted under the chosen calibration
      (total_rounds, or ceil(total_rounds * n / cohort) for "original").
    total_rounds: rounds the guarantee covers.
    sampling_rate: cohort_size / num_train_clients.
    num_train_clients: n.
    clients_per_round: clients actually trained per round.
    cohort_size: the cohort the accounting assumes (clients_per_round, or
      simulated_clients_per_round).
    simulated_clients_per_round: S, or None.
    achieved_epsilon: the accountant's epsilon at `calibrated_noise_multiplier`
      under the chosen calibration (<= epsilon).
  """
  epsilon: float
  delta: float
  calibration: str
  noise_multiplier: float
  calibrated_noise_multiplier: float
  noise_multipliers_by_calibration: dict
  num_compositions: int
  total_rounds: int
  sampling_rate: float
  num_train_clients: int
  clients_per_round: int
  cohort_size: int
  simulated_clients_per_round: Optional[int]
  achieved_epsilon: float

  @property
  def guarantee(self) -> str:
    """One sentence stating the guarantee (for logs and reports)."""
    text = (f"({self.epsilon:g}, {self.delta:.3g})-DP at the user level for "
            f"{self.total_rounds} rounds (noise multiplier "
            f"{self.noise_multiplier:.6g}, sampling rate "
            f"{self.sampling_rate:.4g} = {self.cohort_size}/"
            f"{self.num_train_clients}, RDP accountant, {self.calibration} "
            "calibration)")
    if self.simulated_clients_per_round:
      text += (f"; simulated cohort: the guarantee is for "
               f"{self.simulated_clients_per_round} clients per round, the "
               f"run trains {self.clients_per_round} with the noise scaled by "
               f"{self.clients_per_round}/{self.simulated_clients_per_round}")
    if self.calibration == CALIBRATION_ORIGINAL:
      text += (f"; the original calibration accounts for "
               f"{self.num_compositions} compositions, more than the "
               f"{self.total_rounds} rounds run, so the real epsilon is "
               "smaller")
    return text

  def to_dict(self) -> dict:
    """The `"privacy"` entry of final_metrics.json."""
    d = dataclasses.asdict(self)
    d["guarantee"] = self.guarantee
    return d


def calibrate(epsilon: float, num_train_clients: int, clients_per_round: int,
              total_rounds: int,
              simulated_clients_per_round: Optional[int] = None,
              calibration: str = CALIBRATION_ROUNDS) -> DpCalibration:
  """Computes the noise multiplier of a DP FedAvg run.

  Args:
    epsilon: target epsilon (> 0).
    num_train_clients: n, the number of training users.
    clients_per_round: clients trained per round (already capped at n).
    total_rounds: rounds the guarantee must cover.
    simulated_clients_per_round: S, or None/0 (see module docstring).
    calibration: "rounds" or "original".

  Returns:
    A `DpCalibration`; both calibrations are computed, the chosen one used.

  Raises:
    FlairInputError: a flag value that cannot be calibrated (names the flag).
  """
  if calibration not in CALIBRATIONS:
    raise FlairInputError(
        f"--dp_calibration must be one of {CALIBRATIONS}, got {calibration!r}")
  if not epsilon > 0:
    raise FlairInputError(f"--epsilon must be > 0 for DP, got {epsilon}")
  if total_rounds < 1:
    raise FlairInputError(f"--total_rounds must be >= 1, got {total_rounds}")
  if clients_per_round < 1:
    raise FlairInputError(
        f"--clients_per_round must be >= 1, got {clients_per_round}")
  cohort = clients_per_round
  if simulated_clients_per_round:
    if simulated_clients_per_round < clients_per_round:
      raise FlairInputError(
          "--simulated_clients_per_round must be >= --clients_per_round "
          f"({clients_per_round}), got {simulated_clients_per_round}")
    if simulated_clients_per_round > num_train_clients:
      raise FlairInputError(
          "--simulated_clients_per_round must be at most the number of "
          f"training users ({num_train_clients}), got "
          f"{simulated_clients_per_round}")
    cohort = simulated_clients_per_round
  q = cohort / num_train_clients
  delta = target_delta(num_train_clients)
  compositions = {
      CALIBRATION_ROUNDS: total_rounds,
      CALIBRATION_ORIGINAL: math.ceil(total_rounds * num_train_clients /
                                      cohort),
  }
  by_calibration = {
      name: calibrate_noise_multiplier(epsilon, q, steps, delta)
      for name, steps in compositions.items()
  }
  z = by_calibration[calibration]
  scale = clients_per_round / cohort
  result = DpCalibration(
      epsilon=float(epsilon), delta=delta, calibration=calibration,
      noise_multiplier=z * scale, calibrated_noise_multiplier=z,
      noise_multipliers_by_calibration=by_calibration,
      num_compositions=compositions[calibration], total_rounds=total_rounds,
      sampling_rate=q, num_train_clients=num_train_clients,
      clients_per_round=clients_per_round, cohort_size=cohort,
      simulated_clients_per_round=simulated_clients_per_round or None,
      achieved_epsilon=rdp_epsilon(z, q, compositions[calibration], delta))
  for name, value in by_calibration.items():
    logging.info(
        "DP noise multiplier, %s calibration (%d compositions at q=%.4g): "
        "%.6g%s", name, compositions[name], q, value,
        " [used]" if name == calibration else "")
  return result


def sum_noise_multiplier(noise_multiplier: float, clients_per_round: int,
                         adaptive: bool) -> float:
  """Noise stddev added to the sum of clipped updates, in units of the clip.

  Fixed clipping adds `noise_multiplier * clip`. Adaptive clipping spends part
  of the budget on the noised clipped count (stddev `s = 0.05 *
  clients_per_round`), so TFF raises the update noise to
  `(noise_multiplier**-2 - (2 s)**-2)**-0.5` (TFF 0.87,
  aggregators/differential_privacy.py `adaptive_clip_noise_params`; Andrew et
  al. 2021, arXiv 1905.03871, Sec. 3.2). Returns inf where adaptive clipping
  is infeasible (noise_multiplier >= 2 s).
  """
  if not adaptive or noise_multiplier == 0:
    return noise_multiplier
  count_stddev = _TFF_CLIPPED_COUNT_STDDEV_FRACTION * clients_per_round
  if noise_multiplier >= 2 * count_stddev:
    return math.inf
  return (noise_multiplier**-2 - (2 * count_stddev)**-2)**-0.5


def build_aggregator(
    noise_multiplier: float, clients_per_round: int, l2_norm_clip: float,
    target_unclipped_quantile: float
) -> tff.aggregators.UnweightedAggregationFactory:
  """The DP mean aggregator, with debug measurements of client update norms.

  Args:
    noise_multiplier: from `calibrate(...).noise_multiplier`.
    clients_per_round: clients per round (the mean's denominator).
    l2_norm_clip: the fixed clip, or the initial clip of adaptive clipping.
    target_unclipped_quantile: 0 for fixed clipping; else the quantile of
      client update norms the adaptive clip tracks (Andrew et al. 2021,
      arXiv 1905.03871), in (0, 1).

  Returns:
    `DifferentiallyPrivateFactory.gaussian_fixed` or `.gaussian_adaptive`
    (TFF's default adaptive learning rate 0.2 and clipped-count stddev
    0.05 * clients_per_round), wrapped by `tff.learning.add_debug_measurements`
    so each round reports client update norms.

  Raises:
    FlairInputError: a non-positive clip, a quantile outside [0, 1), or
      adaptive-clipping parameters TFF rejects: its noised clipped count
      (stddev 0.05 * clients_per_round) must carry part of the privacy budget,
      which needs noise_multiplier < 0.1 * clients_per_round.
  """
  if not l2_norm_clip > 0:
    raise FlairInputError(f"--l2_norm_clip must be > 0, got {l2_norm_clip}")
  if not 0 <= target_unclipped_quantile < 1:
    raise FlairInputError("--target_unclipped_quantile must be in [0, 1), "
                          f"got {target_unclipped_quantile}")
  if target_unclipped_quantile == 0:
    factory = tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
        noise_multiplier=noise_multiplier,
        clients_per_round=float(clients_per_round), clip=l2_norm_clip)
  else:
    # TFF's condition (adaptive_clip_noise_params): the noised clipped count
    # must carry part of the budget, so the noise multiplier must stay below
    # twice its stddev. Checked here so that the user gets the flags to
    # change instead of TFF's ValueError.
    stddev = _TFF_CLIPPED_COUNT_STDDEV_FRACTION * clients_per_round
    if noise_multiplier > 0 and noise_multiplier >= 2 * stddev:
      raise FlairInputError(
          f"adaptive clipping (--target_unclipped_quantile "
          f"{target_unclipped_quantile}) cannot reach noise multiplier "
          f"{noise_multiplier:.4g} with {clients_per_round} clients per round: "
          f"its noised clipped count (stddev {stddev:.3g} = 0.05 x clients per "
          f"round) needs noise multiplier < {2 * stddev:.3g}; use more clients "
          "per round (--clients_per_round or --simulated_clients_per_round), "
          "a larger --epsilon, or fixed clipping with "
          "--target_unclipped_quantile 0")
    factory = tff.aggregators.DifferentiallyPrivateFactory.gaussian_adaptive(
        noise_multiplier=noise_multiplier,
        clients_per_round=float(clients_per_round),
        initial_l2_norm_clip=l2_norm_clip,
        target_unclipped_quantile=target_unclipped_quantile)
  return tff.learning.add_debug_measurements(factory)
