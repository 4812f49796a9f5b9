"""The budget is spent exactly and by the rules (`benchmark.active.pools`,
`benchmark.active.selection`, `benchmark.active.records`): never more than
the budget, never an image twice, never an image already labelled, only
training images; `random` draws uniformly (seeded); `entropy`/`kafal`
take the top scores the process returns and leave the server state as it
was."""

import collections

import numpy as np
import pytest

from benchmark.active import client_data
from benchmark.active import config as config_lib
from benchmark.active import pools
from benchmark.active import records
from benchmark.active import selection
from benchmark.core import errors

SIZES = [7, 1, 12, 3, 25, 9]
L = 4


def _images(sizes=SIZES) -> pools.TrainImages:
  rng = np.random.default_rng(0)
  return pools.TrainImages(
      tuple(f"user{i:02d}" for i in range(len(sizes))),
      tuple((rng.random([n, L]) < 0.4).astype(np.uint8) for n in sizes))


class _FakeBackend:
  """Returns a fixed score per (user, image) in each client's slot; counts
  the rounds and checks the inputs it is sent."""

  def __init__(self, images, table, max_images):
    self.index = {c: i for i, c in enumerate(images.client_ids)}
    self.table = table
    self.max_images = max_images
    self.state = {"w": np.arange(3.0)}
    self.cohorts = []

  def get_state(self):
    return {k: v.copy() for k, v in self.state.items()}

  def set_state(self, state):
    self.state = state

  def run_round(self, cohort):
    self.cohorts.append(cohort)
    self.state = {"w": self.state["w"] + 1}  # A round changes the state.
    matrix = np.zeros([len(cohort), self.max_images], np.float32)
    for client_id, _, labelled, _, control in cohort:
      if not control[client_data.CONTROL_SCORE]:
        continue
      user = self.index[client_id]
      slot = control[client_data.CONTROL_SLOT]
      pool = labelled == 0
      matrix[slot, :len(labelled)][pool] = self.table[user][pool]
    return {"client_work": {"scores": matrix}}


@pytest.mark.parametrize("budget", [0, 1, 9, 20, 38, 1000])
def test_split_budget_spends_exactly_the_budget_within_each_pool(budget):
  room = np.array([5, 0, 10, 2, 20, 1])
  given = pools.split_budget(SIZES, room, budget)
  assert given.sum() == min(budget, room.sum())
  assert (given <= room).all() and (given >= 0).all()


def test_split_budget_is_proportional_to_the_users_images():
  given = pools.split_budget([10, 30, 60], [100, 100, 100], 50)
  np.testing.assert_array_equal(given, [5, 15, 30])


def test_seed_masks_keep_at_least_one_image_per_user():
  masks = pools.seed_masks(SIZES, 0, 0.1)
  assert [int(m.sum()) for m in masks] == [1, 1, 2, 1, 3, 1]
  counts = pools.seed_masks(SIZES, 0, 0.1, count=4)
  assert [int(m.sum()) for m in counts] == [4, 1, 4, 3, 4, 4]
  again = pools.seed_masks(SIZES, 0, 0.1)
  assert all((a == b).all() for a, b in zip(masks, again))


def _spend(strategy, images, masks, budget, seed=0, cycle=1, table=None):
  table = table or [np.random.default_rng(u).random(n)
                    for u, n in enumerate(images.sizes)]
  backend = _FakeBackend(images, table, images.max_images)
  before = backend.get_state()
  chosen = selection.select(backend, images, masks, budget, strategy, seed,
                            cycle, cohort_size=2)
  np.testing.assert_array_equal(backend.state["w"], before["w"])
  return chosen, backend, table


@pytest.mark.parametrize("strategy", config_lib.STRATEGIES)
@pytest.mark.parametrize("budget", [1, 10, 45, 500])
def test_a_selection_spends_the_budget_by_the_rules(strategy, budget):
  images = _images()
  masks = pools.seed_masks(images.sizes, 3, 0.2)
  for cycle in (1, 2, 3):
    chosen, _, _ = _spend(strategy, images, masks, budget, cycle=cycle)
    pool_total = sum(int((~m).sum()) for m in masks)
    assert sum(len(v) for v in chosen.values()) == min(budget, pool_total)
    for user, indices in chosen.items():
      assert len(set(indices.tolist())) == len(indices)  # Never twice.
      assert not masks[user][indices].any()  # Never labelled already.
    selection.check_choice(masks, chosen, budget)
    masks = pools.add_chosen(masks, chosen)
  if budget >= 500:
    assert all(m.all() for m in masks)


def test_scored_strategies_take_the_top_scores_of_each_users_share():
  images = _images()
  masks = pools.seed_masks(images.sizes, 3, 0.2)
  chosen, backend, table = _spend(config_lib.STRATEGY_ENTROPY, images, masks,
                                  10)
  share = selection.shares(images, masks, 10)
  for user, indices in chosen.items():
    pool = np.flatnonzero(~masks[user])
    best = pool[np.argsort(-table[user][pool], kind="stable")][:share[user]]
    assert sorted(indices.tolist()) == sorted(best.tolist())
  # Only users with a share are scored, at most cohort_size per round, with
  # scoring on and training off (entropy needs only the global model).
  scored = [c[0] for cohort in backend.cohorts for c in cohort
            if c[4][client_data.CONTROL_SCORE]]
  assert sorted(scored) == sorted(images.client_ids[u] for u in chosen)
  assert all(len(c) == 2 for c in backend.cohorts)  # Filled up.
  for cohort in backend.cohorts:
    for slot, client in enumerate(cohort):
      if client[4][client_data.CONTROL_SCORE]:
        np.testing.assert_array_equal(client[4], [0, 1, 0, slot])
      else:  # Filling: neither trains nor scores.
        np.testing.assert_array_equal(client[4], [0, 0, 0, -1])


def test_kafal_trains_locally_before_scoring():
  images = _images()
  masks = pools.seed_masks(images.sizes, 3, 0.2)
  _, backend, _ = _spend(config_lib.STRATEGY_KAFAL, images, masks, 10)
  for cohort in backend.cohorts:
    for slot, client in enumerate(cohort):
      if not client[4][client_data.CONTROL_SCORE]:
        continue  # Filling.
      np.testing.assert_array_equal(client[4], [1, 1, 1, slot])
      user = backend.index[client[0]]
      np.testing.assert_array_equal(
          client[3], np.concatenate([images.labels[user][masks[user]].sum(0),
                                     [masks[user].sum()]]))


def test_random_choice_is_uniform_and_seeded():
  pool = np.arange(3, 13)  # Ten pool images; choose three.
  counts = collections.Counter()
  draws = 3000
  for client in range(draws):
    counts.update(pools.choose_random(pool, 3, seed=5, cycle=1,
                                      client_index=client).tolist())
  expected = draws * 3 / len(pool)
  observed = np.array([counts[i] for i in pool])
  chi2 = ((observed - expected) ** 2 / expected).sum()
  assert chi2 < 27.9  # Chi-square, 9 degrees of freedom, p = 0.001.
  np.testing.assert_array_equal(
      pools.choose_random(pool, 3, 5, 1, 0), pools.choose_random(pool, 3, 5,
                                                                 1, 0))
  assert any((pools.choose_random(pool, 3, s, 1, 0)
              != pools.choose_random(pool, 3, 5, 1, 0)).any()
             for s in range(6, 9))


def test_add_chosen_refuses_a_repeat_a_labelled_image_or_an_outsider():
  masks = [np.array([True, False, False])]
  with pytest.raises(ValueError, match="twice"):
    pools.add_chosen(masks, {0: [1, 1]})
  with pytest.raises(ValueError, match="already labelled"):
    pools.add_chosen(masks, {0: [0]})
  with pytest.raises(ValueError, match="out of range"):
    pools.add_chosen(masks, {0: [3]})
  with pytest.raises(ValueError):
    selection.check_choice(masks, {0: [1]}, budget=2)  # Under-spent.


def test_the_record_gives_the_labelled_sets_back(tmp_path):
  images = _images()
  masks = pools.seed_masks(images.sizes, 1, 0.3)
  record = records.new_record(images, masks)
  record["cycles"].append({"cycle": 1, "rounds_completed": 2,
                           **records.cycle_counts(masks),
                           "val": {"loss": 1.0}, "test": {"loss": 2.0}})
  chosen, _, _ = _spend(config_lib.STRATEGY_RANDOM, images, masks, 12)
  records.add_choice(record, images, chosen)
  records.save(str(tmp_path), record)
  back = records.masks_of(records.load(str(tmp_path)), images)
  expected = pools.add_chosen(masks, chosen)
  assert all((a == b).all() for a, b in zip(back, expected))
  rows = (tmp_path / records.CYCLES_CSV_FILE).read_text().splitlines()
  assert rows[0].split(",") == records.csv_columns()
  assert rows[1].split(",")[:6] == ["1", "2", str(int(sum(
      m.sum() for m in masks))), str(int(sum((~m).sum() for m in masks))),
                                     "6", "12"]


def test_a_bad_record_is_refused_and_overwrite_removes_it(tmp_path):
  (tmp_path / records.CHOSEN_FILE).write_text("[1, 2]")
  with pytest.raises(errors.FlairInputError, match="not an active-learning"):
    records.load(str(tmp_path))
  (tmp_path / records.CYCLES_CSV_FILE).write_text("cycle\n")
  records.remove(str(tmp_path))
  assert records.load(str(tmp_path)) is None
  assert not (tmp_path / records.CYCLES_CSV_FILE).exists()
