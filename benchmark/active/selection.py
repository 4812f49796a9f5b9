"""The end of a cycle: each client's share of the budget, the clients'
inputs to the active-learning process, and the selection pass that scores
the pools through a backend and spends the budget.

A selection pass (`select`) runs the process (`active.process`) on the
training users that get a share of the budget, `cohort_size` at a time,
with scoring on (and, for `kafal`, local training first: KSAS compares the
client's local model with the global one); it reads each client's row of
the summed score matrix, chooses the top-scored pool images (or, for
`random`, none of this: a seeded uniform draw), then puts the server state
back as it was, so the pass changes no model.
"""

from typing import Mapping, Sequence

import numpy as np

from benchmark.active import client_data
from benchmark.active import config as config_lib
from benchmark.active import pools
from benchmark.backends import base


def label_counts(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """A client's `counts` input: float32 `[L + 1]`, how many labelled images
  carry each label, then the number of labelled images.

  Args:
    labels: uint8 `[n_images, L]`, the user's multi-hot labels.
    mask: bool `[n_images]`, its labelled images.
  """
  labelled = labels[mask].astype(np.float32)
  return np.concatenate([labelled.sum(axis=0),
                         [float(mask.sum())]]).astype(np.float32)


def client_input(images: pools.TrainImages, masks: Sequence[np.ndarray],
                 user: int, seed: np.ndarray, *, train: bool, score: bool,
                 compensate: bool, slot: int = -1) -> tuple:
  """One client's input to the process, in `client_data.INPUT_NAMES`
  order: `(client_id str, seed int64 [2], labelled int32 [n_images],
  counts float32 [L + 1], control int32 [4])`."""
  control = np.zeros([client_data.CONTROL_SIZE], np.int32)
  control[client_data.CONTROL_TRAIN] = int(train)
  control[client_data.CONTROL_SCORE] = int(score)
  control[client_data.CONTROL_COMPENSATE] = int(compensate)
  control[client_data.CONTROL_SLOT] = slot
  mask = masks[user]
  return (images.client_ids[user], np.asarray(seed, np.int64),
          mask.astype(np.int32), label_counts(images.labels[user], mask),
          control)


def shares(images: pools.TrainImages, masks: Sequence[np.ndarray],
           budget: int) -> np.ndarray:
  """Each user's share of a cycle's budget: in proportion to its number of
  images (KAFAL's split), at most its pool (`pools.split_budget`).

  Returns:
    int64 `[num_users]` summing to `min(budget, pool images)`.
  """
  room = [int((~m).sum()) for m in masks]
  return pools.split_budget(images.sizes, room, budget)


def _score_rows(backend: base.RoundBackend, images: pools.TrainImages,
                masks: Sequence[np.ndarray], users: Sequence[int],
                strategy: str, seed: int, cycle: int,
                cohort_size: int) -> dict[int, np.ndarray]:
  """Scores the pools of `users` through `backend`, `cohort_size` clients
  per round (the last round filled up with clients that neither train nor
  score); returns user -> float `[max_images]` (its pool's scores)."""
  kafal = strategy == config_lib.STRATEGY_KAFAL
  rows = {}
  for start in range(0, len(users), cohort_size):
    group = users[start:start + cohort_size]
    cohort = [client_input(images, masks, user,
                           pools.selection_seed(seed, cycle, user),
                           train=kafal, score=True, compensate=kafal,
                           slot=slot)
              for slot, user in enumerate(group)]
    # Backends built for `cohort_size` clients a round (tff_worker) get the
    # rest filled with inert clients: no training, no scoring.
    cohort += [client_input(images, masks, group[0], np.zeros(2, np.int64),
                            train=False, score=False, compensate=False)
               for _ in range(cohort_size - len(group))]
    matrix = np.asarray(backend.run_round(cohort)["client_work"]["scores"])
    for slot, user in enumerate(group):
      rows[user] = matrix[slot]
  return rows


def select(backend: base.RoundBackend, images: pools.TrainImages,
           masks: Sequence[np.ndarray], budget: int, strategy: str,
           seed: int, cycle: int, cohort_size: int
          ) -> dict[int, np.ndarray]:
  """Spends a cycle's budget: which pool images each user labels.

  Args:
    backend: holds the process and the state at the end of the cycle
      (given back unchanged).
    images: the training users' labels.
    masks: per user, bool `[n_images]`: its labelled images.
    budget: images to label, all users together.
    strategy: one of `config.STRATEGIES`.
    seed: the run's `--seed`.
    cycle: the cycle that just ended (1-based).
    cohort_size: clients per selection round.

  Returns:
    user index -> int64 sorted image indices, for each user with a
    non-zero share; in total `min(budget, pool images)` images, none
    labelled before, none twice.
  """
  share = shares(images, masks, budget)
  users = [int(u) for u in np.flatnonzero(share)]
  pool = {u: np.flatnonzero(~masks[u]) for u in users}
  if strategy == config_lib.STRATEGY_RANDOM:
    return {u: pools.choose_random(pool[u], int(share[u]), seed, cycle, u)
            for u in users}
  state = backend.get_state()
  try:
    rows = _score_rows(backend, images, masks, users, strategy, seed, cycle,
                       cohort_size)
  finally:
    backend.set_state(state)
  return {u: pools.choose_top(rows[u][:len(masks[u])], pool[u],
                              int(share[u]))
          for u in users}


def check_choice(masks: Sequence[np.ndarray],
                 chosen: Mapping[int, Sequence[int]], budget: int) -> None:
  """Checks a choice against the rules: exactly `min(budget, pool images)`
  images, each in its user's pool, none twice.

  Raises:
    ValueError: a rule broken (naming it).
  """
  pool_total = sum(int((~m).sum()) for m in masks)
  spent = sum(len(v) for v in chosen.values())
  if spent != min(budget, pool_total):
    raise ValueError(f"{spent} images chosen, budget {budget}, pool "
                     f"{pool_total}")
  pools.add_chosen(masks, chosen)
