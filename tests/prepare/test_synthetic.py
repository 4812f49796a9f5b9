"""Tests of the FLAIR-like generator (benchmark/prepare/synthetic.py) and of
its command (benchmark/synthetic_dataset.py): layout, statistics against the
real FLAIR statistics, label-dependent and user-dependent content,
determinism."""

import collections
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from benchmark.core import constants
from benchmark.core import errors
from benchmark.prepare import synthetic

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
REAL_STATISTICS = os.path.join(os.path.dirname(REPO_ROOT), "shared",
                               "flair_sample", "statistics.json")


def _read_tree(directory):
  """{relative path: bytes} of every file under `directory`."""
  files = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, directory)] = f.read()
  return files


def _load_records(dataset_dir):
  with open(os.path.join(dataset_dir, constants.METADATA_FILE)) as f:
    return json.load(f)


def _load_image(dataset_dir, image_id):
  return np.asarray(Image.open(os.path.join(
      dataset_dir, constants.SMALL_IMAGES_DIR,
      image_id + constants.IMAGE_EXTENSION)))


@pytest.fixture(scope="module")
def large_metadata():
  """Records of 3,000 users (no images drawn)."""
  return synthetic.make_metadata(3000, seed=0)


def test_constants_match_real_statistics_file():
  if not os.path.exists(REAL_STATISTICS):
    pytest.skip(f"{REAL_STATISTICS} not found (../shared absent)")
  with open(REAL_STATISTICS) as f:
    real = json.load(f)
  assert (synthetic.REAL_COARSE_LABEL_IMAGE_COUNTS
          == real["coarse_label_image_counts"])
  assert synthetic.REAL_NUM_IMAGES == real["num_images"]
  assert list(real["coarse_label_image_counts"]) == list(
      constants.COARSE_LABELS)


def test_coarse_label_frequencies_follow_real_ones(large_metadata):
  n = len(large_metadata)
  counts = collections.Counter(
      label for r in large_metadata for label in r[constants.LABELS_KEY])
  assert set(counts) <= set(constants.COARSE_LABELS)
  real = synthetic.coarse_label_probabilities()
  ours = np.array([counts[name] / n for name in constants.COARSE_LABELS])
  # The ten frequent labels (>= 7% of images) within 15% of their real rate.
  frequent = real > 0.07
  assert frequent.sum() == 10
  np.testing.assert_allclose(ours[frequent], real[frequent], rtol=0.15)
  # The whole distribution over labels is close (total variation).
  assert 0.5 * np.abs(ours / ours.sum() - real / real.sum()).sum() < 0.03
  # Rare labels appear, and less often than frequent ones.
  assert ours[-1] > 0 and ours[-1] < ours[0] / 20


def test_labels_per_image(large_metadata):
  per_image = np.array([len(r[constants.LABELS_KEY]) for r in large_metadata])
  assert per_image.min() >= 1
  assert abs(per_image.mean() - synthetic.REAL_MEAN_LABELS_PER_IMAGE
             ) < 0.2
  fine_per_image = np.array(
      [len(r[constants.FINE_GRAINED_LABELS_KEY]) for r in large_metadata])
  assert fine_per_image.min() >= 1
  assert 3.5 < fine_per_image.mean() < 6


def test_images_per_user_heavy_tailed(large_metadata):
  counts = np.array(list(collections.Counter(
      r[constants.USER_ID_KEY] for r in large_metadata).values()))
  assert len(counts) == 3000
  assert np.percentile(counts, 25) == 1
  assert np.median(counts) == synthetic.REAL_MEDIAN_IMAGES_PER_USER
  assert 3 <= np.percentile(counts, 75) <= 7
  assert counts.mean() > 2 * np.median(counts)  # Long right tail.
  assert counts.max() > 50 * np.median(counts)


def test_max_images_per_user_caps_counts():
  records = synthetic.make_metadata(300, seed=0, max_images_per_user=4)
  counts = collections.Counter(r[constants.USER_ID_KEY] for r in records)
  assert max(counts.values()) == 4
  assert min(counts.values()) == 1


def test_users_split_8_1_1_and_disjoint(large_metadata):
  partition_of = {}
  for r in large_metadata:
    user = r[constants.USER_ID_KEY]
    assert partition_of.setdefault(user, r[constants.PARTITION_KEY]) == r[
        constants.PARTITION_KEY], f"user {user} in two partitions"
  users = collections.Counter(partition_of.values())
  assert users == {constants.TRAIN: 2400, constants.VAL: 300,
                   constants.TEST: 300}


@pytest.mark.parametrize("num_users", [3, 4, 7])
def test_every_partition_has_a_user_for_tiny_datasets(num_users):
  records = synthetic.make_metadata(num_users, seed=5)
  users = {r[constants.USER_ID_KEY]: r[constants.PARTITION_KEY]
           for r in records}
  assert len(users) == num_users
  assert set(users.values()) == set(constants.PARTITIONS)


def test_ids_and_fine_labels(large_metadata):
  image_ids = [r[constants.IMAGE_ID_KEY] for r in large_metadata]
  assert len(set(image_ids)) == len(image_ids)
  assert all(isinstance(i, str) and i.isdigit() for i in image_ids)
  parent = dict(synthetic.label_relationship())
  for r in large_metadata:
    fine_parents = {parent[f] for f in r[constants.FINE_GRAINED_LABELS_KEY]}
    assert fine_parents == set(r[constants.LABELS_KEY])


@pytest.mark.parametrize("kwargs", [
    {"num_users": 2}, {"num_users": 10, "seed": -1},
    {"num_users": 10, "max_images_per_user": 0}])
def test_invalid_arguments_name_the_argument(kwargs):
  name = [k for k in kwargs if k != "num_users"] or ["num_users"]
  with pytest.raises(errors.FlairInputError, match=name[-1]):
    synthetic.make_metadata(**kwargs)


def test_layout_of_generated_directory(synthetic_dataset_dir):
  records = _load_records(synthetic_dataset_dir)
  assert records == synthetic.make_metadata(60, seed=0)
  image_dir = os.path.join(synthetic_dataset_dir, constants.SMALL_IMAGES_DIR)
  assert sorted(os.listdir(image_dir)) == sorted(
      r[constants.IMAGE_ID_KEY] + constants.IMAGE_EXTENSION for r in records)
  for r in records[:10]:
    with Image.open(os.path.join(image_dir, r[constants.IMAGE_ID_KEY]
                                 + constants.IMAGE_EXTENSION)) as image:
      assert image.format == "JPEG"
      assert image.mode == "RGB"
      assert image.size == (constants.IMAGE_SIZE, constants.IMAGE_SIZE)
  with open(os.path.join(synthetic_dataset_dir,
                         constants.LABEL_RELATIONSHIP_FILE)) as f:
    pairs = [tuple(line.rstrip("\n").split(" -> ")) for line in f]
  assert all(len(p) == 2 for p in pairs)
  parent = dict(pairs)
  assert set(parent.values()) == set(constants.COARSE_LABELS)
  for r in records:
    for fine in r[constants.FINE_GRAINED_LABELS_KEY]:
      assert parent[fine] in r[constants.LABELS_KEY]


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
  first = synthetic.generate(str(tmp_path / "a"), 6, seed=1)
  synthetic.generate(str(tmp_path / "b"), 6, seed=1)
  synthetic.generate(str(tmp_path / "c"), 6, seed=2)
  a, b, c = (_read_tree(str(tmp_path / n)) for n in "abc")
  assert a == b
  assert first["num_images"] == len(
      [p for p in a if p.startswith(constants.SMALL_IMAGES_DIR)])
  assert a[constants.METADATA_FILE] != c[constants.METADATA_FILE]
  images_a = {v for k, v in a.items() if k.endswith(".jpg")}
  images_c = {v for k, v in c.items() if k.endswith(".jpg")}
  assert not images_a & images_c


def test_full_disk_names_the_dataset_dir_flag(small_filesystem):
  full = small_filesystem(64, fill_to_kib=0)
  with pytest.raises(errors.OutputWriteError) as info:
    synthetic.generate(os.path.join(full, "synthetic"), 6, seed=1)
  message = str(info.value)
  assert "No space left on device" in message
  assert "or use another --dataset_dir" in message
  assert "--save_model_dir" not in message


def test_command_line_writes_same_files_as_library(tmp_path):
  out = tmp_path / "cli"
  result = subprocess.run(
      [sys.executable, "-m", "benchmark.synthetic_dataset",
       "--dataset_dir", str(out), "--num_users", "4", "--seed", "3"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  synthetic.generate(str(tmp_path / "lib"), 4, seed=3)
  assert _read_tree(str(out)) == _read_tree(str(tmp_path / "lib"))


def test_command_line_bad_argument_exits_1(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "benchmark.synthetic_dataset",
       "--dataset_dir", str(tmp_path), "--num_users", "1"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 1
  assert "num_users" in result.stderr
  assert "Traceback" not in result.stderr


def _crop_features(pixels, rng, size=32):
  """Translation-invariant features of one random crop: per-channel mean
  and the magnitude of the 2-D Fourier transform."""
  y, x = rng.integers(0, pixels.shape[0] - size, 2)
  crop = pixels[y:y + size, x:x + size].astype(np.float64)
  spectrum = np.abs(np.fft.rfft2(crop - crop.mean(axis=(0, 1)), axes=(0, 1)))
  return np.concatenate([crop.mean(axis=(0, 1)) / 255,
                         np.log1p(spectrum).ravel()])


def test_labels_learnable_from_small_crops(synthetic_dataset_dir):
  sklearn_linear = pytest.importorskip("sklearn.linear_model")
  sklearn_metrics = pytest.importorskip("sklearn.metrics")
  records = _load_records(synthetic_dataset_dir)
  rng = np.random.default_rng(0)
  features = np.stack([
      _crop_features(_load_image(synthetic_dataset_dir,
                                 r[constants.IMAGE_ID_KEY]), rng)
      for r in records])
  train = np.array([r[constants.PARTITION_KEY] == constants.TRAIN
                    for r in records])
  aucs = {}
  for label in ("structure", "equipment", "material", "outdoor", "plant"):
    y = np.array([label in r[constants.LABELS_KEY] for r in records])
    model = sklearn_linear.LogisticRegression(C=0.1, max_iter=2000)
    model.fit(features[train], y[train])
    aucs[label] = sklearn_metrics.roc_auc_score(
        y[~train], model.decision_function(features[~train]))
  # Held-out users, 32x32 crops: clearly better than chance (0.5).
  assert np.mean(list(aucs.values())) > 0.75, aucs
  assert min(aucs.values()) > 0.6, aucs


def test_images_shift_by_user(synthetic_dataset_dir):
  records = _load_records(synthetic_dataset_dir)
  mean_colour = np.stack([
      _load_image(synthetic_dataset_dir, r[constants.IMAGE_ID_KEY]).reshape(
          -1, 3).mean(axis=0) for r in records])
  users = np.array([r[constants.USER_ID_KEY] for r in records])
  within = sum(((mean_colour[users == u] - mean_colour[users == u].mean(
      axis=0)) ** 2).sum() for u in set(users))
  total = ((mean_colour - mean_colour.mean(axis=0)) ** 2).sum()
  # Images of one user are much more alike than images in general.
  assert within / total < 0.5
