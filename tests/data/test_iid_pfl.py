"""Tests of pfl-research's FLAIR-IID, `--iid --iid_definition pfl`
(benchmark/data/iid.py `load_pfl_iid_partition`, its clients in
benchmark/training/fedavg.py, and federated_main with it).

The defining property (pfl-research's `flair_iid`, apple/pfl-research
benchmarks/dataset/flair): made-up users of a constant number of images,
`--iid_user_size`, drawn uniformly at random from all training images,
ignoring user ids, anew each time a user is sampled.
"""

import csv
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from benchmark.backends import tff_runtime
from benchmark.core import constants
from benchmark.core.errors import FlairInputError
from benchmark.data import iid
from benchmark.data import label_sets
from benchmark.data import pipeline
from benchmark.model import resnet
from benchmark.training import fedavg
import flag_harness


def _images(dataset):
  return [image.tobytes() for image, _ in dataset.as_numpy_iterator()]


@pytest.fixture(scope="module")
def label_spec(prepared_sample_dir):
  return label_sets.load_label_spec(prepared_sample_dir)


@pytest.mark.parametrize("user_size", [1, 7, 50])
def test_every_pfl_user_has_exactly_user_size_images(
    prepared_sample_dir, label_spec, user_size):
  clients = iid.load_pfl_iid_partition(prepared_sample_dir, label_spec,
                                       user_size)
  real = pipeline.load_client_data(prepared_sample_dir, label_spec)[
      constants.TRAIN]
  assert len(clients.client_ids) == len(real.client_ids)
  assert not set(clients.client_ids) & set(real.client_ids)
  all_images = set(_images(real.create_tf_dataset_from_all_clients()))
  assert clients.num_images == len(all_images)
  for seed in range(4):
    drawn = _images(clients.seeded_dataset_fn(tf.constant([seed, 9],
                                                          tf.int64)))
    assert len(drawn) == user_size
    assert set(drawn) <= all_images


def test_pfl_draws_are_uniform_with_replacement_and_seeded(
    prepared_sample_dir, label_spec):
  """Many draws reach every training image about equally often (35 images
  in the sample's train partition: a chi-square test of uniformity), a
  draw can repeat an image, and the same seed draws the same images."""
  clients = iid.load_pfl_iid_partition(prepared_sample_dir, label_spec, 50)
  counts = {}
  repeated = False
  for seed in range(20):
    drawn = _images(clients.seeded_dataset_fn(tf.constant([seed, 1],
                                                          tf.int64)))
    repeated |= len(set(drawn)) < len(drawn)
    for image in drawn:
      counts[image] = counts.get(image, 0) + 1
  assert len(counts) == clients.num_images and repeated
  observed = np.array(list(counts.values()))
  expected = observed.sum() / clients.num_images
  chi_square = float(((observed - expected)**2 / expected).sum())
  assert chi_square < 70  # 34 degrees of freedom: p < 0.0005 above 70.
  seed = tf.constant([3, 4], tf.int64)
  assert _images(clients.seeded_dataset_fn(seed)) == _images(
      clients.seeded_dataset_fn(seed))


def test_bad_user_size_names_the_flag(prepared_sample_dir, label_spec):
  with pytest.raises(FlairInputError, match="--iid_user_size"):
    iid.load_pfl_iid_partition(prepared_sample_dir, label_spec, 0)


def test_client_dataset_draws_user_size_images_per_client(
    prepared_sample_dir, label_spec):
  """The round's client dataset computation (what a backend runs) gives a
  made-up user `--iid_user_size` examples per epoch."""
  clients = iid.load_pfl_iid_partition(prepared_sample_dir, label_spec, 6)
  computation = fedavg.client_dataset_computation(
      clients, pipeline.ClientSpec(num_epochs=2, batch_size=4,
                                   max_elements=100))
  with tff_runtime.local_runtime():
    batches = computation(clients.client_ids[0], np.array([1, 2], np.int64))
  assert sum(len(labels) for _, labels in batches) == 12


def test_federated_main_trains_on_pfl_iid(prepared_sample_dir, tmp_path):
  """Every sampled made-up user trains on exactly --iid_user_size images
  per epoch: each round's example count is cohort x size x epochs."""
  save_dir = str(tmp_path / "run")
  final = flag_harness.run_from_flags(
      "benchmark.federated_main", f"--tfrecords_dir={prepared_sample_dir}",
      f"--save_model_dir={save_dir}", "--model_layout=" + resnet.TINY,
      "--image_height=32", "--image_width=32", "--clients_per_round=3",
      "--client_batch_size=4", "--max_elements_per_client=64",
      "--client_epochs_per_round=2", "--rounds_per_eval=2",
      "--eval_batch_size=16", "--total_rounds=2", "--iid",
      "--iid_definition=pfl", "--iid_user_size=5")
  assert np.isfinite(final["test"]["loss"])
  with open(os.path.join(save_dir, constants.METRICS_CSV_FILE),
            newline="", encoding="utf-8") as f:
    rows = [r for r in csv.DictReader(f) if r["train_num_examples"]]
  assert [float(r["train_num_examples"]) for r in rows] == [30.0, 30.0]
  with open(os.path.join(save_dir, constants.RUN_IDENTITY_FILE),
            encoding="utf-8") as f:
    settings = json.load(f)["settings"]
  assert (settings["iid_definition"], settings["iid_user_size"]) == ("pfl", 5)
