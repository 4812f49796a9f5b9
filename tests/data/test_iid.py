"""Tests of FLAIR-IID (benchmark/data/iid.py and federated_main --iid)."""

import json
import os

import numpy as np
import pytest

from benchmark.core import constants
from benchmark.core import errors
from benchmark.core import locks
from benchmark.data import iid
from benchmark.data import label_sets
from benchmark.data import pipeline
import flag_harness


def _labels_by_user(client_data):
  """{user: int array [images, labels]} of every client, in client order."""
  return {c: np.stack([label for _, label in
                       client_data.create_tf_dataset_for_client(c)
                       .as_numpy_iterator()])
          for c in client_data.client_ids}


def test_deal_is_a_seeded_partition_of_the_items():
  sizes = [3, 0, 5, 1, 7]
  dealt = iid.deal(sizes, seed=4)
  assert [len(d) for d in dealt] == sizes
  assert sorted(np.concatenate(dealt).tolist()) == list(range(16))
  again = iid.deal(sizes, seed=4)
  assert all(np.array_equal(a, b) for a, b in zip(dealt, again))
  other = iid.deal(sizes, seed=5)
  assert not all(np.array_equal(a, b) for a, b in zip(dealt, other))
  with pytest.raises(iid.FlairInputError, match="--iid_seed"):
    iid.deal(sizes, seed=-1)


def test_label_skew_is_zero_for_equal_mixes_and_one_for_disjoint_labels():
  same = np.array([[1, 0], [0, 1]])
  assert iid.label_skew([same, same]) == 0.0
  assert iid.label_skew([np.array([[1, 0]] * 3),
                         np.array([[0, 1]] * 3)]) == pytest.approx(0.5)
  assert iid.label_skew([np.array([[1, 0, 0]]), np.array([[0, 1, 0]]),
                         np.array([[0, 0, 1]]), np.array([[0, 0, 1]])]
                        ) == pytest.approx(0.625)


def test_iid_keeps_users_counts_and_images_and_is_more_uniform(
    prepared_sample_dir):
  spec = label_sets.load_label_spec(prepared_sample_dir)
  real = _labels_by_user(pipeline.load_partition(prepared_sample_dir,
                                             constants.TRAIN, spec))
  real_skew = iid.label_skew(list(real.values()))
  every_image = sorted(map(tuple, np.concatenate(list(real.values()))))
  skews = []
  for seed in range(4):
    dealt = _labels_by_user(
        iid.load_iid_partition(prepared_sample_dir, spec, seed))
    # Same users, same number of images each, the same images in all.
    assert {u: len(v) for u, v in dealt.items()} == {
        u: len(v) for u, v in real.items()}
    assert sorted(map(tuple, np.concatenate(list(dealt.values())))
                  ) == every_image
    skews.append(iid.label_skew(list(dealt.values())))
    if seed == 0:
      again = _labels_by_user(
          iid.load_iid_partition(prepared_sample_dir, spec, seed))
      assert all(np.array_equal(dealt[u], again[u]) for u in dealt)
      assert any(not np.array_equal(dealt[u], real[u]) for u in dealt)
  # The real sample: 0.43; dealt at random 0.32-0.36 (users of 1-5 images
  # keep some skew from sampling alone).
  assert max(skews) < real_skew - 0.05, (skews, real_skew)


def _main(tfrecords_dir, save_dir, *extra):
  """federated_main in this process (tests/flag_harness.py), one tiny round
  of the tiny network (--model_layout=tiny: a test of the run, not of the
  network); returns its final metrics."""
  return flag_harness.run_from_flags(
      "benchmark.federated_main",
      f"--tfrecords_dir={tfrecords_dir}", f"--save_model_dir={save_dir}",
      "--total_rounds=1", "--clients_per_round=2", "--rounds_per_eval=1",
      "--image_height=24", "--image_width=24", "--client_batch_size=4",
      "--max_elements_per_client=4", "--client_epochs_per_round=1",
      "--eval_batch_size=16", "--client_datasets_random_seed=1",
      "--model_layout=tiny", *extra)


def _files(directory):
  """{path: (size, modification time)} of every file under `directory` but
  the run directory's lock file (not a run output: each run rewrites it)."""
  return {os.path.join(d, n): (os.stat(os.path.join(d, n)).st_size,
                               os.stat(os.path.join(d, n)).st_mtime_ns)
          for d, _, names in os.walk(directory) for n in names
          if n != locks.LOCK_FILE}


def test_federated_main_trains_on_iid_and_never_mixes_it_with_non_iid(
    prepared_sample_dir, tmp_path):
  """federated_main --iid trains and records both flags in the run's
  identity; the non-IID command on its directory is refused with one line
  naming --iid, nothing changed. (In this process; as a command, `main`
  prints the refusal as one `error:` line and exits 1, as it does for the
  output and backend errors that tests/training/test_federated.py checks as
  commands.)"""
  save_dir = str(tmp_path / "run")
  returned = _main(prepared_sample_dir, save_dir, "--iid", "--iid_seed=3")
  with open(os.path.join(save_dir, constants.FINAL_METRICS_FILE)) as f:
    final = json.load(f)
  assert returned == final
  assert final["rounds_completed"] == 1
  assert np.isfinite(final["test"]["loss"])
  with open(os.path.join(save_dir, constants.RUN_IDENTITY_FILE)) as f:
    settings = json.load(f)["settings"]
  assert settings["iid"] is True and settings["iid_seed"] == 3
  # The non-IID run cannot resume this one (nor can another --iid_seed:
  # both flags are in the identity, checked above).
  before = _files(save_dir)
  with pytest.raises(errors.FlairInputError) as info:
    _main(prepared_sample_dir, save_dir)
  message = str(info.value)
  assert "holds a different run" in message and "--iid" in message, message
  assert "\n" not in message, message
  assert _files(save_dir) == before
