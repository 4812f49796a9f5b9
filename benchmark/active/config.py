"""The settings of a federated active-learning run: the federated trainer's
parts (`training.config`: data, output, model, client, server, cohort, run)
plus `ActiveLearningConfig`, each field declaring its flag once.

`ActiveConfig.run.total_rounds` is not a setting of its own here: a run
trains `num_cycles * rounds_per_cycle` rounds, and `build` writes that
product into it (so flags.json's `total_rounds` and the report's "rounds
done" agree); `active_main` refuses a `--total_rounds` given on the
command line.
"""

import dataclasses
import math
from typing import Any, Mapping, Optional

from benchmark.core.errors import FlairInputError
from benchmark.training import config as config_lib

setting = config_lib.setting

STRATEGY_RANDOM = "random"
STRATEGY_ENTROPY = "entropy"
STRATEGY_KAFAL = "kafal"
STRATEGIES = (STRATEGY_RANDOM, STRATEGY_ENTROPY, STRATEGY_KAFAL)

CYCLE_START_AFRESH = "afresh"
CYCLE_START_CONTINUE = "continue"
CYCLE_STARTS = (CYCLE_START_AFRESH, CYCLE_START_CONTINUE)

# The budget per cycle when --budget_per_cycle is not given: this fraction
# of the training images, rounded up (KAFAL's CIFAR-10 setting: 2,500 of
# 50,000 images per cycle).
DEFAULT_BUDGET_FRACTION = 0.05


@dataclasses.dataclass(frozen=True)
class ActiveLearningConfig:
  """Which images are labelled when: the seed sets, the cycles, the budget
  and the strategy that spends it (docs/active_learning.md)."""
  strategy: str = setting(
      STRATEGY_KAFAL, "How clients choose the images to label at the end of "
      "each cycle: random (uniform over the pool), entropy (the global "
      "model's most uncertain images), or kafal (KSAS sampling and KCFU "
      "training, Cao et al. ICCV 2023, in multi-label form).",
      choices=STRATEGIES)
  num_cycles: int = setting(
      6, "Active-learning cycles: each trains --rounds_per_cycle FedAvg "
      "rounds on the labelled images, evaluates, then spends the cycle's "
      "budget. More cycles continue a run.",
      identity=config_lib.IDENTITY_NEVER, minimum=1)
  rounds_per_cycle: int = setting(
      50, "FedAvg rounds of each cycle.", minimum=1)
  initial_labeled_fraction: float = setting(
      0.1, "Each training user's seed set: this fraction of its images, "
      "rounded up (at least one image per user), drawn uniformly from "
      "--seed. In (0, 1].")
  initial_labeled_count: Optional[int] = setting(
      None, "Each training user's seed set: this many of its images (all "
      "of them when it has fewer); replaces --initial_labeled_fraction.",
      minimum=1)
  budget_per_cycle: Optional[int] = setting(
      None, "Images labelled at the end of each cycle, all clients "
      "together, split across users in proportion to their image counts "
      "(as KAFAL's code). Default: 5% of the training images, rounded up.",
      minimum=1)
  cycle_start: str = setting(
      CYCLE_START_AFRESH, "How each cycle after the first starts: afresh "
      "(the initial weights again, as KAFAL's code), or continue (the "
      "previous cycle's final global model; the server optimizer starts "
      "afresh).", choices=CYCLE_STARTS)
  kcfu_weight: float = setting(
      1.0, "With --strategy kafal: the weight of KCFU's compensatory term "
      "(0 keeps only the balanced loss).")

  def __post_init__(self):
    config_lib._check_declared(self)  # pylint: disable=protected-access
    fraction = self.initial_labeled_fraction
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
      raise FlairInputError("--initial_labeled_fraction must be in (0, 1], "
                            f"got {fraction!r}")
    weight = self.kcfu_weight
    if not (isinstance(weight, (int, float)) and weight >= 0
            and math.isfinite(weight)):
      raise FlairInputError(f"--kcfu_weight must be >= 0, got {weight!r}")

  @property
  def total_rounds(self) -> int:
    """`num_cycles * rounds_per_cycle`."""
    return self.num_cycles * self.rounds_per_cycle


@dataclasses.dataclass(frozen=True)
class ActiveConfig:
  """A federated active-learning run (`active.cycles.run_active`)."""
  data: config_lib.DataConfig
  output: config_lib.OutputConfig
  model: config_lib.ModelConfig = config_lib.ModelConfig()
  client: config_lib.ClientConfig = config_lib.ClientConfig()
  server: config_lib.ServerConfig = config_lib.ServerConfig()
  cohort: config_lib.CohortConfig = config_lib.CohortConfig()
  run: config_lib.RunConfig = config_lib.RunConfig()
  active: ActiveLearningConfig = ActiveLearningConfig()

  def __post_init__(self):
    if self.client.algorithm != config_lib.ALGORITHM_FEDAVG:
      raise FlairInputError(
          f"--algorithm {self.client.algorithm} is not available with "
          "active learning: its clients train FedAvg (or KCFU with "
          "--strategy kafal)")
    if self.cohort.iid:
      raise FlairInputError(
          "--iid is not available with active learning: each user's pool is "
          "its own images")


def build(values: Mapping[str, Any]) -> ActiveConfig:
  """An `ActiveConfig` from `{setting name: value}`
  (`training.config.build`), with `total_rounds` set to
  `num_cycles * rounds_per_cycle`.

  Raises:
    FlairInputError: a value its part refuses (naming the flag).
    TypeError: a name that is no setting of `ActiveConfig`.
  """
  values = dict(values)
  values.pop("total_rounds", None)
  active = config_lib.build(ActiveConfig, values).active
  values["total_rounds"] = active.total_rounds
  return config_lib.build(ActiveConfig, values)
