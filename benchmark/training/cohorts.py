"""Which clients train in each round, and the seed each trains with.

The cohort is a uniform sample of the training users without replacement, a
function of the round number and the sampling seed (TFF's
`tff.simulation.build_uniform_sampling_fn`); each client's seed (its
shuffle and augmentation, `training.seeds.client_seed`) a function of the
run's `--seed`, the round and the client. So a rerun, a resumed run and
every backend train the same clients on the same batches. With DP-FTRL
(`--dp_mechanism tree`) the cohorts instead go through the users in passes,
each user at most once per pass (`CyclicSampler`).
"""

from typing import Any, Mapping, Optional, Sequence

import numpy as np
import tensorflow_federated as tff

from benchmark.training import loop
from benchmark.training import seeds

SAMPLING_SEED_KEY = "sampling_seed"

# One client's input to a round: its id and its seed (int64 [2]), as the
# client dataset computation takes them (`fedavg.client_dataset_computation`).
ClientInput = tuple[str, np.ndarray]


def client_inputs(client_ids: Sequence[str], round_num: int,
                  seed: int = 0) -> list[ClientInput]:
  """A given cohort as round `round_num`'s client inputs: each id with the
  seed `seeds.client_seed(seed, round_num, i)`, `i` its position in
  `client_ids` (for benchmarks and tests that choose their cohort; a run's
  sampler indexes clients in the whole population instead)."""
  return [(client_id, seeds.client_seed(seed, round_num, index))
          for index, client_id in enumerate(client_ids)]


class ClientSampler(loop.Resumable):
  """The `training_selection_fn` of `loop.run_rounds`: round number ->
  `clients_per_round` `ClientInput`s of distinct clients.

  Args:
    client_ids: the training users.
    clients_per_round: the cohort size, at most `len(client_ids)`.
    seed: the run's `--seed`, from which each client's seed is derived.
    sampling_seed: the sampling seed (`--client_datasets_random_seed`);
      None derives it from `seed` (`seeds.cohort_seed`). Kept in the
      checkpoints (`loop.Resumable`, key `sampling_seed`), so a run resumes
      the sequence it started.
  """

  def __init__(self, client_ids: Sequence[str], clients_per_round: int,
               seed: int = 0, sampling_seed: Optional[int] = None):
    self._client_ids = sorted(client_ids)
    self._index = {c: i for i, c in enumerate(self._client_ids)}
    self._clients_per_round = clients_per_round
    self._seed = int(seed)
    if sampling_seed is None:
      sampling_seed = seeds.cohort_seed(seed)
    self._set_sampling_seed(sampling_seed)

  def _set_sampling_seed(self, sampling_seed: int) -> None:
    self.sampling_seed = int(sampling_seed)
    self._sample = tff.simulation.build_uniform_sampling_fn(
        self._client_ids, replace=False, random_seed=self.sampling_seed)

  def resume_state(self) -> dict[str, Any]:
    return {SAMPLING_SEED_KEY: self.sampling_seed}

  def restore(self, values: Mapping[str, Any]) -> None:
    self._set_sampling_seed(values[SAMPLING_SEED_KEY])

  def __call__(self, round_num: int) -> list[ClientInput]:
    return [(client_id, seeds.client_seed(self._seed, round_num,
                                           self._index[client_id]))
            for client_id in self._sample(round_num,
                                          self._clients_per_round)]


class CyclicSampler(ClientSampler):
  """A `ClientSampler` whose cohorts go through the users in passes: pass
  `k` (rounds `k * P + 1 .. (k + 1) * P`, `P = len(client_ids) //
  clients_per_round`) draws a permutation of the users from the sampling
  seed and `k` (NumPy's `default_rng([sampling_seed, k])`) and gives round
  `k * P + i + 1` its `i`-th block of `clients_per_round` users; the users
  past the last full block sit that pass out. Each user is in at most one
  cohort per pass, as DP-FTRL's accounting requires between two restarts of
  its tree (`training.dp`, "tree"). A function of the seed and the round:
  resumes as `ClientSampler` does. Arguments as `ClientSampler`'s.
  """

  def _set_sampling_seed(self, sampling_seed: int) -> None:
    self.sampling_seed = int(sampling_seed)
    rounds_per_pass = len(self._client_ids) // self._clients_per_round

    def sample(round_num: int, size: int) -> list[str]:
      cycle, block = divmod(round_num - 1, rounds_per_pass)
      order = np.random.default_rng([self.sampling_seed, cycle]).permutation(
          len(self._client_ids))
      return [self._client_ids[i]
              for i in order[block * size:(block + 1) * size]]

    self._sample = sample
