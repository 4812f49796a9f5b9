"""`python -m benchmark.active_main` end to end on the real sample with the
tiny network, in this process (`tests/flag_harness.py`): its outputs, the
budget spent by the rules on real data, and a run stopped between cycles
or within one that resumes to the uninterrupted run's choices and metrics.
"""

import csv
import json
import os
import shutil

import numpy as np
import pytest

from benchmark.active import records
from benchmark.core import constants
from benchmark.core.errors import FlairInputError
from benchmark.data import pipeline
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
  with open(os.path.join(save_dir, constants.METRICS_CSV_FILE)) as f:
    metric_rows = list(csv.DictReader(f))
  assert [int(r["round"]) for r in metric_rows] == list(range(7))
  assert [int(r["cycle"]) for r in metric_rows] == [1, 1, 1, 2, 2, 3, 3]
  assert all(r["kcfu_balanced_loss"] for r in metric_rows[1:])
  assert os.path.isfile(os.path.join(save_dir, "tiny_active_12labels.h5"))


def _num_records(path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return sum(1 for _ in tf.data.TFRecordDataset(path))


def _assert_same_run(expected_dir, got_dir):
  expected, got = _record(expected_dir), _record(got_dir)
  assert got["seed_sets"] == expected["seed_sets"]
  assert [c.get("chosen") for c in got["cycles"]] == [
      c.get("chosen") for c in expected["cycles"]]
  for e, g in zip(_cycles_csv(expected_dir), _cycles_csv(got_dir)):
    for column, value in e.items():
      np.testing.assert_allclose(float(g[column] or 0), float(value or 0),
                                 rtol=1e-5, err_msg=column)


def _cut(whole_dir, cut, keep_cycles, keep_choice, remove_checkpoints):
  """A copy of `whole_dir` as a kill -9 leaves it: the first `keep_cycles`
  cycle records (the last one's choice kept or not), and the checkpoint
  folders `remove_checkpoints` (relative to checkpoints/) never written."""
  shutil.copytree(whole_dir, cut)
  for name in remove_checkpoints:
    shutil.rmtree(cut / "checkpoints" / name)
  record = _record(cut)
  record["cycles"] = record["cycles"][:keep_cycles]
  if not keep_choice:
    del record["cycles"][-1]["chosen"]
  records.save(str(cut), record)
  os.remove(cut / constants.FINAL_METRICS_FILE)


@pytest.mark.slow
def test_a_run_stopped_within_and_between_cycles_resumes_to_the_same_run(
    prepared_sample_dir, whole_run, tmp_path):
  """Killed after round 1 of cycle 2 (its round-2 checkpoint, and all
  after, never written); then, in a copy, killed after cycle 1's
  evaluation, before its selection was recorded (what `--num_cycles 1`
  also leaves: more cycles continue the run). Each rerun ends as the
  uninterrupted run."""
  whole_dir, _ = whole_run
  within = tmp_path / "within"
  _cut(whole_dir, within, 1, True,
       ["cycle_3", os.path.join("cycle_2", "checkpoints", "program_state_2")])
  between = tmp_path / "between"
  _cut(whole_dir, between, 1, False, ["cycle_2", "cycle_3"])
  _run(prepared_sample_dir, within)
  _assert_same_run(whole_dir, within)
  _run(prepared_sample_dir, between)
  _assert_same_run(whole_dir, between)


def test_bad_flags_are_refused_naming_the_flag(prepared_sample_dir,
                                               tmp_path):
  with pytest.raises(FlairInputError, match="--total_rounds"):
    _run(prepared_sample_dir, tmp_path / "a", total_rounds=3)
  with pytest.raises(FlairInputError, match="--initial_labeled_fraction"):
    _run(prepared_sample_dir, tmp_path / "b", initial_labeled_fraction=1.5)
  assert not os.path.exists(tmp_path / "a")
