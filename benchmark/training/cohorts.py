"""Which clients train in each round: a uniform sample of the training
users without replacement, a function of the round number and a seed
(TFF's `tff.simulation.build_uniform_sampling_fn`), so a resumed run
samples the same cohorts."""

from typing import Any, Mapping, Optional, Sequence

import numpy as np
import tensorflow_federated as tff

from benchmark.training import loop

SAMPLING_SEED_KEY = "sampling_seed"


class ClientSampler(loop.Resumable):
  """The `training_selection_fn` of `loop.run_rounds`: round number ->
  `clients_per_round` distinct client ids.

  Args:
    client_ids: the training users.
    clients_per_round: the cohort size, at most `len(client_ids)`.
    seed: the sampling seed (>= 0); None draws one at random, which the
      run's checkpoints keep (`loop.Resumable`, key `sampling_seed`).
  """

  def __init__(self, client_ids: Sequence[str], clients_per_round: int,
               seed: Optional[int] = None):
    self._client_ids = list(client_ids)
    self._clients_per_round = clients_per_round
    if seed is None:
      seed = int(np.random.SeedSequence().generate_state(1)[0] >> 1)
    self._set_seed(seed)

  def _set_seed(self, seed: int) -> None:
    self.seed = int(seed)
    self._sample = tff.simulation.build_uniform_sampling_fn(
        self._client_ids, replace=False, random_seed=self.seed)

  def resume_state(self) -> dict[str, Any]:
    return {SAMPLING_SEED_KEY: self.seed}

  def restore(self, values: Mapping[str, Any]) -> None:
    self._set_seed(values[SAMPLING_SEED_KEY])

  def __call__(self, round_num: int) -> list[str]:
    return list(self._sample(round_num, self._clients_per_round))
