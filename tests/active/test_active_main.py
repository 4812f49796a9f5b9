"""`python -m benchmark.active_main` end to end on the real sample with the
tiny network, in this process (`tests/flag_harness.py`): its outputs, the
budget spent by the rules on real data, the same choices and metrics on
every backend, and the command SIGKILLed between cycles or within one
(`tests/command_harness.py`), whose rerun resumes to the uninterrupted
run's choices and metrics.
"""

import csv
import json
import os
import re
import sys

import numpy as np
import pytest

from benchmark.active import records
from benchmark.core import constants
from benchmark.core.errors import FlairInputError
from benchmark.data import pipeline
from benchmark.training import checkpoints
import command_harness
import flag_harness

MODULE = "benchmark.active_main"
BUDGET = 5
CYCLES = 3
ROUNDS = 2


def _flags(tfrecords_dir, save_dir, **overrides):
  values = dict(
      tfrecords_dir=tfrecords_dir, save_model_dir=str(save_dir),
      model_layout="tiny", image_height=32, image_width=32,
      strategy="kafal", num_cycles=CYCLES, rounds_per_cycle=ROUNDS,
      budget_per_cycle=BUDGET, initial_labeled_fraction=0.3,
      clients_per_round=4, client_batch_size=4, max_elements_per_client=8,
      client_epochs_per_round=1, eval_batch_size=16, rounds_per_eval=2,
      rounds_per_checkpoint=1)
  values.update(overrides)
  return [f"--{k}={v}" for k, v in values.items()]


def _run(tfrecords_dir, save_dir, **overrides):
  return flag_harness.run_from_flags(MODULE, *_flags(tfrecords_dir, save_dir,
                                                     **overrides))


@pytest.fixture(scope="module")
def whole_run(prepared_sample_dir, tmp_path_factory):
  """An uninterrupted kafal run of three cycles: (its directory, final)."""
  save_dir = tmp_path_factory.mktemp("active") / "whole"
  return save_dir, _run(prepared_sample_dir, save_dir)


def _record(save_dir):
  with open(os.path.join(save_dir, records.CHOSEN_FILE)) as f:
    return json.load(f)


def _cycles_csv(save_dir):
  with open(os.path.join(save_dir, records.CYCLES_CSV_FILE)) as f:
    return list(csv.DictReader(f))


def _metrics_rows(save_dir):
  with open(os.path.join(save_dir, constants.METRICS_CSV_FILE)) as f:
    return list(csv.DictReader(f))


def test_a_run_writes_its_cycles_and_spends_each_budget_by_the_rules(
    prepared_sample_dir, whole_run):
  save_dir, final = whole_run
  sizes = {}
  for client_id, path in pipeline.partition_files(
      prepared_sample_dir, constants.TRAIN).items():
    sizes[client_id] = _num_records(path)
  record = _record(save_dir)
  labelled = {u: set(v) for u, v in record["seed_sets"].items()}
  assert set(labelled) == set(sizes)  # Every training user, no other.
  start = sum(len(v) for v in labelled.values())
  for cycle in record["cycles"][:-1]:
    chosen = cycle["chosen"]
    assert sum(len(v) for v in chosen.values()) == BUDGET
    for user, indices in chosen.items():
      assert user in sizes  # A training user: never a val/test image.
      assert len(set(indices)) == len(indices)
      assert all(0 <= i < sizes[user] for i in indices)
      assert not labelled[user] & set(indices)  # Never labelled already.
      labelled[user] |= set(indices)
  assert "chosen" not in record["cycles"][-1]
  rows = _cycles_csv(save_dir)
  assert [int(r["cycle"]) for r in rows] == [1, 2, 3]
  assert [int(r["labelled_images"]) for r in rows] == [
      start, start + BUDGET, start + 2 * BUDGET]
  assert [int(r["rounds_completed"]) for r in rows] == [2, 4, 6]
  total = sum(sizes.values())
  assert all(int(r["labelled_images"]) + int(r["pool_images"]) == total
             for r in rows)
  for partition in ("val", "test"):
    for metric in ("macro_averaged_precision", "micro_averaged_precision"):
      assert 0 <= float(rows[-1][f"{partition}_{metric}"]) <= 1
      assert final[partition][metric] == pytest.approx(
          float(rows[-1][f"{partition}_{metric}"]))
  metric_rows = _metrics_rows(save_dir)
  assert [int(r["round"]) for r in metric_rows] == list(range(7))
  assert [int(r["cycle"]) for r in metric_rows] == [1, 1, 1, 2, 2, 3, 3]
  assert all(r["kcfu_balanced_loss"] for r in metric_rows[1:])
  assert os.path.isfile(os.path.join(save_dir, "tiny_active_12labels.h5"))


def _num_records(path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return sum(1 for _ in tf.data.TFRecordDataset(path))


def _assert_same_run(expected_dir, got_dir, num_cycles=CYCLES, rtol=1e-5):
  """`got_dir` recorded `num_cycles` cycles, the first of `expected_dir`'s
  (more cycles continue a run): the same seed sets and choices, and
  cycles.csv's values within `rtol`."""
  expected, got = _record(expected_dir), _record(got_dir)
  assert got["seed_sets"] == expected["seed_sets"]
  # A choice ends every cycle but a run's last.
  assert [c.get("chosen") for c in got["cycles"]] == [
      c["chosen"] for c in expected["cycles"][:num_cycles - 1]] + [None]
  got_rows = _cycles_csv(got_dir)
  assert len(got_rows) == num_cycles
  for e, g in zip(_cycles_csv(expected_dir), got_rows):
    for column, value in e.items():
      if column != "chosen_images":  # Its choices are compared above.
        np.testing.assert_allclose(float(g[column]), float(value), rtol=rtol,
                                   err_msg=column)


def _command(tfrecords_dir, save_dir):
  """`python -m benchmark.active_main` with the flags of `_flags`."""
  return [sys.executable, "-m", MODULE, *_flags(tfrecords_dir, save_dir)]


def _checkpointed_rounds(save_dir, cycle):
  """The rounds of `cycle` whose checkpoint is complete (TFF renames a
  checkpoint's `_temp` folder when it is), as `active.cycles` names them."""
  folder = checkpoints.checkpoint_dir(os.path.join(
      checkpoints.checkpoint_dir(str(save_dir)), f"cycle_{cycle}"))
  prefix = checkpoints.CHECKPOINT_PREFIX
  names = os.listdir(folder) if os.path.isdir(folder) else []
  return sorted(int(n[len(prefix):]) for n in names
                if n.startswith(prefix) and n[len(prefix):].isdigit())


def _recorded(save_dir):
  """[(cycle, whether its choice is recorded)] of chosen_images.json ([]
  before it is written; it is replaced atomically, never read half)."""
  try:
    cycles = _record(save_dir)["cycles"]
  except FileNotFoundError:
    return []
  return [(c["cycle"], records.CHOSEN_KEY in c) for c in cycles]


# Where the command is SIGKILLed: what chosen_images.json records then, and
# the checkpointed rounds of cycle 2. A run spends about a second in each
# state (cycle 1's selection; cycle 2's start and first round; its second
# round), which `command_harness.kill_when`, polling every 10 ms, does not
# miss: the state after the kill is asserted, so a miss fails, not passes.
KILL_POINTS = {
    # Between cycles, selecting: cycle 1 evaluated and recorded, its choice
    # not yet; the rerun redoes the selection from cycle 1's last state.
    "before_choice": ([(1, False)], []),
    # Between cycles, selected: cycle 1's choice recorded (the kill lands
    # right after it), cycle 2 has no checkpoint; the rerun starts cycle 2.
    "after_choice": ([(1, True)], []),
    # Within cycle 2: round 1's checkpoint written, round 2's not.
    "within_cycle": ([(1, True)], [1]),
}


@pytest.mark.slow
@pytest.mark.parametrize("kill_point", KILL_POINTS)
def test_a_killed_run_resumes_to_the_same_run(prepared_sample_dir,
                                               whole_run, tmp_path, caplog,
                                               kill_point):
  """The command SIGKILLed between cycles (before or after cycle 1's choice
  is recorded) or within cycle 2: nothing it started runs on; the same
  command resumes from that state (its log says so; cycle 1 is neither
  retrained nor reselected once recorded, the rows of metrics.csv before
  the resume point are kept as the killed run wrote them, none is missing
  or repeated) and ends as the uninterrupted run."""
  whole_dir, _ = whole_run
  recorded, rounds = KILL_POINTS[kill_point]
  command_harness.kill_when(
      _command(prepared_sample_dir, tmp_path),
      lambda: (_recorded(tmp_path) == recorded
               and _checkpointed_rounds(tmp_path, 2) == rounds), 600)
  assert _recorded(tmp_path) == recorded
  assert _checkpointed_rounds(tmp_path, 2) == rounds
  killed_rows = _metrics_rows(tmp_path)
  with command_harness.absl_info_logs(caplog):
    _run(prepared_sample_dir, tmp_path)
  log = caplog.text
  assert "Resuming after 1 recorded cycle(s)." in log, log[-3000:]
  assert f"rounds 1-{ROUNDS}" not in log  # Cycle 1 is not trained again.
  assert (f"Cycle 1: {BUDGET} images chosen" in log) == (not recorded[0][1])
  # Cycle 2 resumes after its checkpointed round, or starts afresh.
  assert re.findall(r"Resuming after round (\d+)\.", log) == [
      str(r) for r in rounds[-1:]]
  kept = ROUNDS + len(rounds)  # The last round of metrics.csv kept.
  rows = _metrics_rows(tmp_path)
  assert [int(r["round"]) for r in rows] == list(range(CYCLES * ROUNDS + 1))
  assert rows[:kept + 1] == killed_rows[:kept + 1]
  _assert_same_run(whole_dir, tmp_path)


@pytest.fixture(scope="module")
def entropy_run(prepared_sample_dir, tmp_path_factory):
  """An in-process entropy run of two cycles: its directory."""
  save_dir = tmp_path_factory.mktemp("active") / "entropy"
  _run(prepared_sample_dir, save_dir, num_cycles=2, strategy="entropy")
  return save_dir


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["kafal", "entropy"])
@pytest.mark.parametrize("backend", [constants.BACKEND_RAY,
                                     constants.BACKEND_TFF_WORKER])
def test_ray_and_the_tff_worker_make_the_same_choices(
    prepared_sample_dir, request, tmp_path, backend, strategy):
  """Two cycles (one choice: cycle 1's scores and selection run on the
  backend too; kafal's clients train, score and compensate, entropy's only
  score with the global model) with --backend ray (a local Ray) or
  tff_worker end as the first two cycles of the in-process run of the same
  strategy: the same seed sets and chosen images per user, each cycle's
  counts and val/test metrics within rtol 1e-4 (the backends add client
  updates in another order, which changes weights in the last bits:
  tests/round_harness.py). (`random` trains as entropy does and chooses
  without the backend.)"""
  expected_dir = (request.getfixturevalue("whole_run")[0]
                  if strategy == "kafal"
                  else request.getfixturevalue("entropy_run"))
  _run(prepared_sample_dir, tmp_path, num_cycles=2, backend=backend,
       strategy=strategy)
  _assert_same_run(expected_dir, tmp_path, num_cycles=2, rtol=1e-4)


def test_bad_flags_are_refused_naming_the_flag(prepared_sample_dir,
                                               tmp_path):
  with pytest.raises(FlairInputError, match="--total_rounds"):
    _run(prepared_sample_dir, tmp_path / "a", total_rounds=3)
  with pytest.raises(FlairInputError, match="--initial_labeled_fraction"):
    _run(prepared_sample_dir, tmp_path / "b", initial_labeled_fraction=1.5)
  assert not os.path.exists(tmp_path / "a")
