"""User-level differential privacy for federated training: noise calibration
and the DP aggregators.

Privacy unit: one user (one client). Each round the server clips each
sampled client's model update to an L2 norm, sums the clipped updates, adds
Gaussian noise and divides by the cohort size (McMahan et al. 2018,
"Learning Differentially Private Recurrent Language Models", arXiv
1710.06963). Two mechanisms (`--dp_mechanism`, docs/dp.md):

* `"gaussian"`: fresh noise of stddev `noise_multiplier * clip` each round.
  One round is the sampled Gaussian mechanism at `q = cohort / N` (N the
  population the accounting assumes: the training users unless
  `--dp_population`); `total_rounds` rounds compose.
* `"tree"`: DP-FTRL (Kairouz et al. 2021, "Practical and Private (Deep)
  Learning without Sampling or Shuffling", arXiv 2103.00039): the noise of
  the running sum of updates comes from a binary tree of Gaussian node
  noises of stddev `noise_multiplier * clip` (tensorflow_privacy's
  `TreeResidualSumQuery`, Honaker's efficient estimator), each round gets
  the difference of consecutive running-sum noises, and the tree restarts
  every `rounds_per_tree = floor(N / cohort)` rounds (`RestartQuery`). The
  cohorts go through the users in a fresh random order each such pass
  (`training.cohorts.CyclicSampler`), so each user is in at most one
  cohort per tree: tensorflow_privacy's `compute_rdp_tree_restart`
  (tree_aggregation_accountant.py, the paper's Appendix D) then gives the
  RDP of the run: that of one Gaussian mechanism of noise multiplier
  `noise_multiplier / sqrt(S)`, `S` = the sum over trees of
  `floor(log2(rounds in the tree)) + 1` (the nodes a user's update
  reaches). No amplification by sampling is assumed.

Two accountants of `dp_accounting` (`--accountant`) calibrate the noise and
report the guarantee: `"rdp"` (Renyi DP, Mironov, Talwar, Zhang 2019, arXiv
1908.10530; orders `RDP_ORDERS`) and `"pld"` (privacy loss distributions,
Meiser and Mohammadi 2018; dp_accounting's `PLDAccountant`, discretization
interval `PLD_VALUE_DISCRETIZATION_INTERVAL`, pessimistic estimates: the
accountant of pfl-research's `PLDPrivacyAccountant`, apple/pfl-research
pfl/privacy/privacy_accountant.py). `delta` is `1 / N**1.1` unless
`--dp_delta` (docs/dp.md).

Two calibrations of the Gaussian mechanism with the RDP accountant (docs/
dp.md, "Calibration"):

* `"rounds"` (default): the noise multiplier is the smallest one (to within
  the search tolerance) for which exactly `total_rounds` compositions of the
  sampled Gaussian mechanism at rate `q` meet `(epsilon, delta)`. One round
  of FedAvg touches each sampled user once, so one round is one composition.
  Every mechanism and accountant calibrates this way.
* `"original"`: what apple/ml-flair did, via tensorflow_privacy's
  `compute_noise(n, cohort, epsilon, epochs=total_rounds, delta)`, which
  treats `total_rounds` as *epochs* of DP-SGD and therefore composes
  `ceil(total_rounds * n / cohort)` steps -- `n / cohort` times more rounds
  than are run (about 200x at FLAIR's settings), so about 10x more noise than
  needed for the stated guarantee. Kept for comparison with published
  numbers (RDP and the Gaussian mechanism only).

Caveat of the Gaussian mechanism (shared with the original): the
accountant assumes Poisson sampling at rate `q`, while the trainer samples a
fixed-size cohort uniformly without replacement each round; this is the
customary approximation.

With `simulated_clients_per_round = S`, the noise multiplier is calibrated for
a cohort of `S` (q = S / N, or trees of `floor(N / S)` rounds) and then
scaled by `clients_per_round / S`, so that the *noise on the average
update* equals what a cohort of `S` would get (the original's simulation of
large cohorts; pfl-research's `noise_cohort_size`). The guarantee then
describes a run with `S` clients per round, not the simulated run itself;
likewise with `--dp_population`, a run on a population of that size.
"""

import dataclasses
import functools
import math
from typing import Any, Callable, Optional, Sequence

from absl import logging
import dp_accounting
import numpy as np
import tensorflow_federated as tff
import tensorflow_privacy as tfp
from tensorflow_privacy.privacy.analysis import tree_aggregation_accountant

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
MECHANISM_GAUSSIAN = "gaussian"
MECHANISM_TREE = "tree"
MECHANISMS = (MECHANISM_GAUSSIAN, MECHANISM_TREE)
ACCOUNTANT_RDP = "rdp"
ACCOUNTANT_PLD = "pld"
ACCOUNTANTS = (ACCOUNTANT_RDP, ACCOUNTANT_PLD)

# Tolerance of the noise-multiplier search, in noise-multiplier units
# (dp_accounting.calibrate_dp_mechanism's default for continuous
# parameters). The search returns the upper end of a bracket this wide
# around the smallest multiplier that meets the target: the result meets
# it, and one `tol` smaller may not.
NOISE_SEARCH_TOL = 1e-6
# The same with the PLD accountant, whose every evaluation composes a
# discretized distribution (about 1-10 s at FLAIR's sizes): 1e-4 absolute,
# 0.01% of a noise multiplier near 1 (pfl-research's search stops at 0.1%).
PLD_SEARCH_TOL = 1e-4
# dp_accounting's default, and pfl-research's PLDPrivacyAccountant's.
PLD_VALUE_DISCRETIZATION_INTERVAL = 1e-4
# Lower end of the RDP search bracket; the upper end is found by doubling
# (same start as the original's compute_noise(..., noise_lbd=1e-6)).
_NOISE_SEARCH_LOWER = 1e-6
# Below this the PLD of a Gaussian is too fine to discretize (memory grows
# as 1/multiplier^2): the PLD search refuses to look lower.
_PLD_SEARCH_FLOOR = 1e-3
# The PLD search's lower bracket end, as a fraction of the upper one.
_PLD_BRACKET_STEP = 0.75

# Default stddev of the noised clipped count in TFF's adaptive clipping, as a
# fraction of the cohort (tff.aggregators.DifferentiallyPrivateFactory.
# gaussian_adaptive, "defaults to 0.05 * clients_per_round").
_TFF_CLIPPED_COUNT_STDDEV_FRACTION = 0.05
# Purpose tag of the tree noise's seed among a run's seeds (the tags 1-3 of
# training.seeds are the cohorts', clients' and epochs').
_TREE_NOISE_SEED_TAG = 4


def target_delta(population: int) -> float:
  """Returns delta = 1 / N**1.1 for a population of `N` users (docs/dp.md),
  i.e. below 1/N as a user-level delta must be."""
  if population < 1:
    raise ValueError(f"population must be >= 1, got {population}")
  return 1.0 / population**1.1


def check_combination(mechanism: str, accountant: str, calibration: str,
                      adaptive: bool) -> None:
  """Refuses DP settings that do not go together (FlairInputError naming
  the flags): `original` calibration is ml-flair's RDP calibration of the
  Gaussian mechanism; the tree mechanism clips at a fixed norm."""
  if calibration == CALIBRATION_ORIGINAL and (
      mechanism != MECHANISM_GAUSSIAN or accountant != ACCOUNTANT_RDP):
    raise FlairInputError(
        "--dp_calibration original reproduces ml-flair's RDP calibration of "
        "the Gaussian mechanism: use it with --dp_mechanism gaussian "
        "--accountant rdp")
  if mechanism == MECHANISM_TREE and adaptive:
    raise FlairInputError(
        "--dp_mechanism tree clips at a fixed norm (--l2_norm_clip): add "
        "--target_unclipped_quantile 0")


def _make_event(noise_multiplier: float, sampling_rate: float,
                num_compositions: int) -> dp_accounting.DpEvent:
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)),
      num_compositions)


def _make_accountant(accountant: str = ACCOUNTANT_RDP
                    ) -> dp_accounting.PrivacyAccountant:
  if accountant == ACCOUNTANT_PLD:
    return dp_accounting.pld.PLDAccountant(
        value_discretization_interval=PLD_VALUE_DISCRETIZATION_INTERVAL)
  return dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS))


def _epsilon(event: dp_accounting.DpEvent, delta: float,
             accountant: str) -> float:
  return _make_accountant(accountant).compose(event).get_epsilon(delta)


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
  return gaussian_epsilon(noise_multiplier, sampling_rate, num_compositions,
                          delta, ACCOUNTANT_RDP)


def gaussian_epsilon(noise_multiplier: float, sampling_rate: float,
                     num_compositions: int, delta: float,
                     accountant: str = ACCOUNTANT_RDP) -> float:
  """`rdp_epsilon` with the accountant `accountant` ("rdp" or "pld")."""
  return _epsilon(_make_event(noise_multiplier, sampling_rate,
                              num_compositions), delta, accountant)


def _calibrate(make_event: Callable[[float], dp_accounting.DpEvent],
               target_epsilon: float, delta: float, accountant: str,
               tol: float) -> float:
  """Smallest parameter (within `tol`) whose event meets the target, with
  `dp_accounting.calibrate_dp_mechanism` (Brent's method on the accountant's
  epsilon; the upper end of the last bracket is returned, so the target is
  met). RDP: bracket found by doubling from 1e-6. PLD: the RDP result
  (RDP's epsilon bounds PLD's from above, so it meets the target) and down
  by factors of `_PLD_BRACKET_STEP`, since a PLD of a very small multiplier
  cannot be discretized (and a smaller one costs more to compose).
  """
  rdp = dp_accounting.calibrate_dp_mechanism(
      _make_accountant, make_event, target_epsilon, delta,
      dp_accounting.LowerEndpointAndGuess(_NOISE_SEARCH_LOWER,
                                          2 * _NOISE_SEARCH_LOWER),
      tol=NOISE_SEARCH_TOL if accountant == ACCOUNTANT_RDP else tol)
  if accountant == ACCOUNTANT_RDP:
    return float(rdp)
  pld = functools.partial(_make_accountant, ACCOUNTANT_PLD)
  upper = float(rdp)
  while _epsilon(make_event(upper), delta, ACCOUNTANT_PLD) > target_epsilon:
    upper *= 2  # Only by discretization error: PLD's bound is the tighter.
  # PLD's multiplier is rarely far below RDP's, and a PLD of a smaller
  # multiplier costs more: step down gently.
  lower = upper * _PLD_BRACKET_STEP
  while _epsilon(make_event(lower), delta, ACCOUNTANT_PLD) <= target_epsilon:
    if lower < _PLD_SEARCH_FLOOR:
      raise FlairInputError(
          f"--accountant pld: no noise multiplier above {_PLD_SEARCH_FLOOR} "
          f"is needed for epsilon {target_epsilon:g}; use --accountant rdp")
    upper, lower = lower, lower * _PLD_BRACKET_STEP
  return float(dp_accounting.calibrate_dp_mechanism(
      pld, make_event, target_epsilon, delta,
      dp_accounting.ExplicitBracketInterval(lower, upper), tol=tol))


def _check_calibration_input(target_epsilon: float, num_compositions: int,
                             accountant: str) -> None:
  if not target_epsilon > 0:
    raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
  if num_compositions < 1:
    raise ValueError(
        f"num_compositions must be >= 1, got {num_compositions}")
  if accountant not in ACCOUNTANTS:
    raise ValueError(f"unknown accountant {accountant!r}")


@functools.lru_cache(maxsize=64)
def calibrate_noise_multiplier(target_epsilon: float, sampling_rate: float,
                               num_compositions: int, delta: float,
                               tol: Optional[float] = None,
                               accountant: str = ACCOUNTANT_RDP) -> float:
  """Smallest noise multiplier (within `tol`) meeting (epsilon, delta) over
  `num_compositions` sampled Gaussian mechanisms at rate `sampling_rate`.

  Uses `dp_accounting.calibrate_dp_mechanism` with the accountant
  `accountant` ("rdp" or "pld"); the returned value is guaranteed to give
  epsilon <= target_epsilon by that accountant, and a value `tol` smaller
  would exceed it. `tol` defaults to `NOISE_SEARCH_TOL` (RDP) or
  `PLD_SEARCH_TOL` (PLD). Results are cached (the trainers calibrate once
  to check the settings, once to train).

  Raises:
    ValueError: on non-positive epsilon, a sampling rate outside (0, 1],
      fewer than one composition or an unknown accountant.
    FlairInputError: (PLD) a budget that needs almost no noise.
  """
  _check_calibration_input(target_epsilon, num_compositions, accountant)
  if not 0 < sampling_rate <= 1:
    raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
  tol = tol or (NOISE_SEARCH_TOL if accountant == ACCOUNTANT_RDP
                else PLD_SEARCH_TOL)
  return _calibrate(
      lambda z: _make_event(z, sampling_rate, num_compositions),
      target_epsilon, delta, accountant, tol)


def tree_sizes(total_rounds: int, rounds_per_tree: int) -> tuple[int, ...]:
  """The rounds of each tree of a run: `total_rounds` cut into trees of
  `rounds_per_tree` (the last one shorter when they do not divide)."""
  full, rest = divmod(total_rounds, rounds_per_tree)
  return (rounds_per_tree,) * full + ((rest,) if rest else ())


def tree_sensitivity_squared(sizes: Sequence[int]) -> float:
  """`S`, the squared L2 sensitivity (in clips) of the tree nodes of trees
  of `sizes` rounds to one user who is in at most one cohort per tree:
  tensorflow_privacy's `compute_rdp_tree_restart` is `alpha * S / (2 z**2)`
  at order `alpha` and noise multiplier `z`, so its value at order 2 and
  `z = 1` is `S` (= sum of `floor(log2(size)) + 1`)."""
  return float(tree_aggregation_accountant.compute_rdp_tree_restart(
      1.0, list(sizes), 2.0))


def _tree_event(noise_multiplier: float, sensitivity_squared: float
               ) -> dp_accounting.DpEvent:
  """The Gaussian mechanism equivalent to the trees (module doc)."""
  return dp_accounting.GaussianDpEvent(
      noise_multiplier / math.sqrt(sensitivity_squared))


def tree_epsilon(noise_multiplier: float, sizes: Sequence[int], delta: float,
                 accountant: str = ACCOUNTANT_RDP) -> float:
  """Epsilon of DP-FTRL over trees of `sizes` rounds, each user in at most
  one cohort per tree: RDP from tensorflow_privacy's
  `compute_rdp_tree_restart` converted by dp_accounting
  (`rdp.compute_epsilon`, orders `RDP_ORDERS`), or the PLD of the
  equivalent Gaussian mechanism (`tree_sensitivity_squared`)."""
  if accountant == ACCOUNTANT_PLD:
    return _epsilon(_tree_event(noise_multiplier,
                                tree_sensitivity_squared(sizes)),
                    delta, ACCOUNTANT_PLD)
  rdp = tree_aggregation_accountant.compute_rdp_tree_restart(
      noise_multiplier, list(sizes), list(RDP_ORDERS))
  return float(dp_accounting.rdp.rdp_privacy_accountant.compute_epsilon(
      list(RDP_ORDERS), rdp, delta)[0])


@functools.lru_cache(maxsize=64)
def calibrate_tree_noise_multiplier(target_epsilon: float,
                                    sizes: tuple[int, ...], delta: float,
                                    accountant: str = ACCOUNTANT_RDP,
                                    tol: Optional[float] = None) -> float:
  """Smallest noise multiplier per tree node (within `tol`, defaults as
  `calibrate_noise_multiplier`'s) for which `tree_epsilon` meets (epsilon,
  delta); dp_accounting's search on the equivalent Gaussian mechanism, whose
  RDP is `compute_rdp_tree_restart`'s exactly. Cached.

  Raises:
    ValueError: a non-positive epsilon, no tree or an unknown accountant.
  """
  _check_calibration_input(target_epsilon, len(sizes), accountant)
  tol = tol or (NOISE_SEARCH_TOL if accountant == ACCOUNTANT_RDP
                else PLD_SEARCH_TOL)
  sensitivity = tree_sensitivity_squared(sizes)
  return _calibrate(lambda z: _tree_event(z, sensitivity), target_epsilon,
                    delta, accountant, tol)


@dataclasses.dataclass(frozen=True)
class DpCalibration:
  """The outcome of noise calibration for one run.

  Attributes:
    epsilon: target epsilon.
    delta: target delta (`--dp_delta`, or 1 / population**1.1).
    calibration: "rounds" or "original" (see module docstring).
    noise_multiplier: the multiplier given to the aggregator (after the
      simulated-cohort scaling, if any; per tree node with the tree).
    calibrated_noise_multiplier: the multiplier found for `cohort_size` before
      scaling.
    noise_multipliers_by_calibration: calibrated (unscaled) multiplier under
      each calibration computed (both with the RDP accountant and the
      Gaussian mechanism; the one used otherwise), for the log.
    num_compositions: compositions accounted under the chosen calibration
      (total_rounds, or ceil(total_rounds * N / cohort) for "original"; the
      number of trees with the tree).
    total_rounds: rounds the guarantee covers.
    sampling_rate: cohort_size / population (None with the tree, which
      assumes no sampling).
    num_train_clients: n, the training users of the run.
    clients_per_round: clients actually trained per round.
    cohort_size: the cohort the accounting assumes (clients_per_round, or
      simulated_clients_per_round).
    simulated_clients_per_round: S, or None.
    achieved_epsilon: the accountant's epsilon at `calibrated_noise_multiplier`
      under the chosen calibration (<= epsilon).
    mechanism: "gaussian" or "tree".
    accountant: "rdp" or "pld".
    population: N, the users the accounting assumes (`--dp_population`, or
      num_train_clients).
    rounds_per_tree: with the tree, the rounds between restarts,
      floor(population / cohort_size); None otherwise.
  """
  epsilon: float
  delta: float
  calibration: str
  noise_multiplier: float
  calibrated_noise_multiplier: float
  noise_multipliers_by_calibration: dict
  num_compositions: int
  total_rounds: int
  sampling_rate: Optional[float]
  num_train_clients: int
  clients_per_round: int
  cohort_size: int
  simulated_clients_per_round: Optional[int]
  achieved_epsilon: float
  mechanism: str = MECHANISM_GAUSSIAN
  accountant: str = ACCOUNTANT_RDP
  population: Optional[int] = None
  rounds_per_tree: Optional[int] = None

  @property
  def guarantee(self) -> str:
    """One sentence stating the guarantee (for logs and reports)."""
    accountant = self.accountant.upper()
    text = (f"({self.epsilon:g}, {self.delta:.3g})-DP at the user level for "
            f"{self.total_rounds} rounds (")
    if self.mechanism == MECHANISM_TREE:
      text += (f"DP-FTRL tree aggregation, noise multiplier "
               f"{self.noise_multiplier:.6g} per tree node, each user in at "
               f"most one cohort of {self.cohort_size} per tree of "
               f"{self.rounds_per_tree} rounds among {self.population} users, "
               f"{self.num_compositions} tree(s), {accountant} accountant)")
    else:
      text += (f"noise multiplier {self.noise_multiplier:.6g}, sampling rate "
               f"{self.sampling_rate:.4g} = {self.cohort_size}/"
               f"{self.population}, {accountant} accountant, "
               f"{self.calibration} calibration)")
    if self.population != self.num_train_clients:
      text += (f"; accounted for a population of {self.population} users, "
               f"the run trains on {self.num_train_clients}")
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


def _accounted_cohort(epsilon: float, population: int,
                      clients_per_round: int, total_rounds: int,
                      simulated_clients_per_round: Optional[int]) -> int:
  """Checks the flags `calibrate` takes; returns the cohort accounted for
  (`simulated_clients_per_round` or `clients_per_round`)."""
  if not epsilon > 0:
    raise FlairInputError(f"--epsilon must be > 0 for DP, got {epsilon}")
  if total_rounds < 1:
    raise FlairInputError(f"--total_rounds must be >= 1, got {total_rounds}")
  if clients_per_round < 1:
    raise FlairInputError(
        f"--clients_per_round must be >= 1, got {clients_per_round}")
  if clients_per_round > population:
    raise FlairInputError(
        f"--dp_population must be at least --clients_per_round "
        f"({clients_per_round}), got {population}")
  if not simulated_clients_per_round:
    return clients_per_round
  if simulated_clients_per_round < clients_per_round:
    raise FlairInputError(
        "--simulated_clients_per_round must be >= --clients_per_round "
        f"({clients_per_round}), got {simulated_clients_per_round}")
  if simulated_clients_per_round > population:
    raise FlairInputError(
        "--simulated_clients_per_round must be at most the number of "
        f"training users or --dp_population ({population}), got "
        f"{simulated_clients_per_round}")
  return simulated_clients_per_round


def _gaussian_noise(epsilon: float, delta: float, population: int,
                    cohort: int, total_rounds: int, calibration: str,
                    accountant: str) -> dict[str, Any]:
  """The Gaussian mechanism's calibration: `DpCalibration` fields."""
  q = cohort / population
  compositions = {
      CALIBRATION_ROUNDS: total_rounds,
      CALIBRATION_ORIGINAL: math.ceil(total_rounds * population / cohort),
  }
  # With RDP both calibrations are computed (the log compares them); the
  # original composes ~n/cohort times more steps, too many for the PLD.
  names = CALIBRATIONS if accountant == ACCOUNTANT_RDP else (calibration,)
  by_calibration = {
      name: calibrate_noise_multiplier(epsilon, q, compositions[name], delta,
                                       accountant=accountant)
      for name in names}
  for name, value in by_calibration.items():
    logging.info(
        "DP noise multiplier, %s calibration (%d compositions at q=%.4g, %s "
        "accountant): %.6g%s", name, compositions[name], q, accountant,
        value, " [used]" if name == calibration else "")
  z = by_calibration[calibration]
  return dict(
      calibrated_noise_multiplier=z,
      noise_multipliers_by_calibration=by_calibration,
      num_compositions=compositions[calibration], sampling_rate=q,
      achieved_epsilon=gaussian_epsilon(z, q, compositions[calibration],
                                        delta, accountant))


def _tree_noise(epsilon: float, delta: float, population: int, cohort: int,
                total_rounds: int, accountant: str) -> dict[str, Any]:
  """The tree mechanism's calibration: `DpCalibration` fields."""
  rounds_per_tree = population // cohort
  sizes = tree_sizes(total_rounds, rounds_per_tree)
  z = calibrate_tree_noise_multiplier(epsilon, sizes, delta, accountant)
  logging.info(
      "DP-FTRL noise multiplier per tree node (%d tree(s) of at most %d "
      "rounds, %s accountant): %.6g", len(sizes), rounds_per_tree,
      accountant, z)
  return dict(
      calibrated_noise_multiplier=z,
      noise_multipliers_by_calibration={CALIBRATION_ROUNDS: z},
      num_compositions=len(sizes), sampling_rate=None,
      rounds_per_tree=rounds_per_tree,
      achieved_epsilon=tree_epsilon(z, sizes, delta, accountant))


def calibrate(epsilon: float, num_train_clients: int, clients_per_round: int,
              total_rounds: int,
              simulated_clients_per_round: Optional[int] = None,
              calibration: str = CALIBRATION_ROUNDS, *,
              mechanism: str = MECHANISM_GAUSSIAN,
              accountant: str = ACCOUNTANT_RDP,
              population: Optional[int] = None,
              delta: Optional[float] = None) -> DpCalibration:
  """Computes the noise multiplier of a DP FedAvg run.

  Args:
    epsilon: target epsilon (> 0).
    num_train_clients: n, the number of training users.
    clients_per_round: clients trained per round (already capped at n).
    total_rounds: rounds the guarantee must cover.
    simulated_clients_per_round: S, or None/0 (see module docstring).
    calibration: "rounds" or "original".
    mechanism: "gaussian" or "tree".
    accountant: "rdp" or "pld".
    population: N, the users the accounting assumes (None: n).
    delta: the target delta (None: 1 / N**1.1).

  Returns:
    A `DpCalibration`.

  Raises:
    FlairInputError: a flag value that cannot be calibrated (names the flag).
  """
  if calibration not in CALIBRATIONS:
    raise FlairInputError(
        f"--dp_calibration must be one of {CALIBRATIONS}, got {calibration!r}")
  check_combination(mechanism, accountant, calibration, adaptive=False)
  population = population or num_train_clients
  cohort = _accounted_cohort(epsilon, population, clients_per_round,
                             total_rounds, simulated_clients_per_round)
  delta = delta or target_delta(population)
  if mechanism == MECHANISM_TREE:
    fields = _tree_noise(epsilon, delta, population, cohort, total_rounds,
                         accountant)
  else:
    fields = _gaussian_noise(epsilon, delta, population, cohort,
                             total_rounds, calibration, accountant)
  return DpCalibration(
      epsilon=float(epsilon), delta=delta, calibration=calibration,
      noise_multiplier=(fields["calibrated_noise_multiplier"] *
                        clients_per_round / cohort),
      total_rounds=total_rounds, num_train_clients=num_train_clients,
      clients_per_round=clients_per_round, cohort_size=cohort,
      simulated_clients_per_round=simulated_clients_per_round or None,
      mechanism=mechanism, accountant=accountant, population=population,
      **fields)


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


def tree_noise_variance(round_in_tree: int) -> float:
  """The variance of the noise the tree mechanism adds to one round's sum,
  per coordinate, in units of `(noise_multiplier * clip)**2`.

  Round `t` (1-based within its tree) gets `N(t) - N(t - 1)`, where `N(t)`
  is the efficient tree's noise of the sum of the first `t` leaves:
  the sum over the dyadic decomposition of `[1, t]` of node estimates
  `w_d * R`, `R` a node's raw value (its own noise plus half its
  children's raw values, variance `2 - 2**-d` at depth `d`) and
  `w_d = 1 / (2 - 2**-d)` (Honaker 2015; tensorflow_privacy's
  `EfficientTreeAggregator`). With `k` the number of trailing zero bits of
  `t`, the two decompositions differ only below the level-`k` node that
  ends at `t`, and

      var(t) = w_k**2 * (4 - 4**-k) / 3
               + sum_{j < k} (w_k * 2**(j - k) - w_j)**2 / w_j,

  1 for odd `t` and for `t = 2`, 1.38 for `t = 4`, 1.84 for `t = 8`, about
  `k / 2 + 0.3` for larger `k` (docs/dp.md; tests/training/test_dp_tree.py
  checks it against the noise tensorflow_privacy's query draws).
  """
  if round_in_tree < 1:
    raise ValueError(f"round_in_tree must be >= 1, got {round_in_tree}")
  k = (round_in_tree & -round_in_tree).bit_length() - 1

  def w(depth):
    return 1.0 / (2.0 - 2.0**-depth)

  return (w(k)**2 * (4.0 - 4.0**-k) / 3.0 +
          sum((w(k) * 2.0**(j - k) - w(j))**2 / w(j) for j in range(k)))


def round_noise_multiplier(calibration: DpCalibration, clients_per_round: int,
                           adaptive: bool) -> Callable[[int], float]:
  """Round number (1-based) -> the stddev of the noise added to that
  round's sum of clipped updates, in units of the clip:
  `sum_noise_multiplier` in every round (Gaussian), or
  `noise_multiplier * sqrt(tree_noise_variance(t))` with `t` the round's
  place in its tree (tree)."""
  if calibration.mechanism == MECHANISM_TREE:
    per_tree = calibration.rounds_per_tree
    return lambda round_num: calibration.noise_multiplier * math.sqrt(
        tree_noise_variance((round_num - 1) % per_tree + 1))
  multiplier = sum_noise_multiplier(calibration.noise_multiplier,
                                    clients_per_round, adaptive)
  return lambda round_num: multiplier


def tree_noise_seed(seed: int) -> int:
  """The seed of the tree mechanism's noise for a run of `--seed` `seed`
  (tensorflow_privacy's `GaussianNoiseGenerator` draws stateless normals
  from it): an int in [0, 2**31), derived as `training.seeds` derives its
  seeds (NumPy's `SeedSequence` of the seed and a purpose tag)."""
  state = np.random.SeedSequence([int(seed), _TREE_NOISE_SEED_TAG])
  return int(state.generate_state(1, dtype=np.uint32)[0] & 0x7FFFFFFF)


def tree_query(noise_multiplier: float, clients_per_round: int,
               l2_norm_clip: float, record_specs: Any, rounds_per_tree: int,
               noise_seed: Optional[int]) -> tfp.DPQuery:
  """DP-FTRL's mean query: tensorflow_privacy's `TreeResidualSumQuery`
  (L2 clip, Gaussian node noise of stddev `noise_multiplier *
  l2_norm_clip`, the efficient estimator), restarted every
  `rounds_per_tree` rounds (`RestartQuery` with a
  `PeriodicRoundRestartIndicator`, as TFF's `tree_adaptive` restarts its
  tree), divided by `clients_per_round` (`NormalizedQuery`). TFF's
  `DifferentiallyPrivateFactory.tree_aggregation` is the same query
  without restarts. `noise_seed` None draws an unseeded noise."""
  sum_query = tfp.TreeResidualSumQuery.build_l2_gaussian_query(
      l2_norm_clip, noise_multiplier, record_specs, noise_seed=noise_seed,
      use_efficient=True)
  restarted = tfp.RestartQuery(
      sum_query,
      tfp.restart_query.PeriodicRoundRestartIndicator(period=rounds_per_tree))
  return tfp.NormalizedQuery(restarted, denominator=float(clients_per_round))


class TreeAggregationFactory(tff.aggregators.UnweightedAggregationFactory):
  """The DP-FTRL aggregator: `tree_query` for the aggregated value's tensor
  specs (known when the process is built, `create`) in TFF's
  `DifferentiallyPrivateFactory`. Arguments as `tree_query`'s."""

  def __init__(self, noise_multiplier: float, clients_per_round: int,
               l2_norm_clip: float, rounds_per_tree: int,
               noise_seed: Optional[int]):
    self._arguments = (noise_multiplier, clients_per_round, l2_norm_clip)
    self._rounds_per_tree = rounds_per_tree
    self._noise_seed = noise_seed

  def create(self, value_type):
    specs = tff.types.type_to_tf_tensor_specs(value_type)
    query = tree_query(*self._arguments, specs, self._rounds_per_tree,
                       self._noise_seed)
    return tff.aggregators.DifferentiallyPrivateFactory(query).create(
        value_type)


def _check_clip(l2_norm_clip: float, target_unclipped_quantile: float) -> None:
  if not l2_norm_clip > 0:
    raise FlairInputError(f"--l2_norm_clip must be > 0, got {l2_norm_clip}")
  if not 0 <= target_unclipped_quantile < 1:
    raise FlairInputError("--target_unclipped_quantile must be in [0, 1), "
                          f"got {target_unclipped_quantile}")


def build_aggregator(
    noise_multiplier: float, clients_per_round: int, l2_norm_clip: float,
    target_unclipped_quantile: float, *,
    mechanism: str = MECHANISM_GAUSSIAN,
    rounds_per_tree: Optional[int] = None,
    noise_seed: Optional[int] = None
) -> tff.aggregators.UnweightedAggregationFactory:
  """The DP mean aggregator, with debug measurements of client update norms.

  Args:
    noise_multiplier: from `calibrate(...).noise_multiplier`.
    clients_per_round: clients per round (the mean's denominator).
    l2_norm_clip: the fixed clip, or the initial clip of adaptive clipping.
    target_unclipped_quantile: 0 for fixed clipping; else the quantile of
      client update norms the adaptive clip tracks (Andrew et al. 2021,
      arXiv 1905.03871), in (0, 1). The tree clips at a fixed norm.
    mechanism: "gaussian" or "tree".
    rounds_per_tree: with the tree, the rounds between its restarts
      (`DpCalibration.rounds_per_tree`).
    noise_seed: with the tree, the seed of its noise (`tree_noise_seed`);
      None: unseeded. (TFF's Gaussian aggregators cannot be seeded.)

  Returns:
    `DifferentiallyPrivateFactory.gaussian_fixed` or `.gaussian_adaptive`
    (TFF's default adaptive learning rate 0.2 and clipped-count stddev
    0.05 * clients_per_round), or `TreeAggregationFactory`, wrapped by
    `tff.learning.add_debug_measurements` so each round reports client
    update norms.

  Raises:
    FlairInputError: a non-positive clip, a quantile outside [0, 1), the
      tree with adaptive clipping, or adaptive-clipping parameters TFF
      rejects: its noised clipped count (stddev 0.05 * clients_per_round)
      must carry part of the privacy budget, which needs noise_multiplier <
      0.1 * clients_per_round.
  """
  _check_clip(l2_norm_clip, target_unclipped_quantile)
  if mechanism == MECHANISM_TREE:
    check_combination(mechanism, ACCOUNTANT_RDP, CALIBRATION_ROUNDS,
                      target_unclipped_quantile > 0)
    factory = TreeAggregationFactory(noise_multiplier, clients_per_round,
                                     l2_norm_clip, rounds_per_tree,
                                     noise_seed)
  elif target_unclipped_quantile == 0:
    factory = tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
        noise_multiplier=noise_multiplier,
        clients_per_round=float(clients_per_round), clip=l2_norm_clip)
  else:
    _check_adaptive_noise(noise_multiplier, clients_per_round,
                          target_unclipped_quantile)
    factory = tff.aggregators.DifferentiallyPrivateFactory.gaussian_adaptive(
        noise_multiplier=noise_multiplier,
        clients_per_round=float(clients_per_round),
        initial_l2_norm_clip=l2_norm_clip,
        target_unclipped_quantile=target_unclipped_quantile)
  return tff.learning.add_debug_measurements(factory)


def _check_adaptive_noise(noise_multiplier: float, clients_per_round: int,
                          target_unclipped_quantile: float) -> None:
  """TFF's condition (adaptive_clip_noise_params): the noised clipped count
  must carry part of the budget, so the noise multiplier must stay below
  twice its stddev. Checked here so that the user gets the flags to change
  instead of TFF's ValueError."""
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
