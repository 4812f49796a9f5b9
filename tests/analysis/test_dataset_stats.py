"""Tests of benchmark.analysis.dataset_stats on small hand-made inputs: the
statistics, the choice of sample users and the label index names. (Reading
whole datasets, and bad input, is tested through the report in
test_dataset_report.py.)"""

import json

import pytest

from benchmark.analysis import dataset_stats
from benchmark.core import constants


def _record(user, partition, labels, fine, image_id="1"):
  return dataset_stats.ImageRecord(user_id=user, image_id=image_id,
                                   partition=partition, labels=tuple(labels),
                                   fine_grained_labels=tuple(fine))


def test_compute_statistics_small_example():
  records = [
      _record("a", "train", ["food", "equipment"], ["plate", "soup", "plate"]),
      _record("a", "train", ["food"], ["soup"]),
      _record("b", "val", ["animal"], ["dog"]),
      _record("c", "test", ["food", "animal"], ["cat", "soup"]),
  ]
  stats = dataset_stats.compute_statistics(
      records, top_k_fine_labels=2, coarse_vocabulary=("food", "religion"))
  assert stats["partition_images"] == {"train": 2, "val": 1, "test": 1}
  assert stats["partition_users"] == {"train": 1, "val": 1, "test": 1}
  assert stats["coarse_label_image_counts"] == {
      "food": 3, "animal": 2, "equipment": 1, "religion": 0}
  assert list(stats["coarse_label_image_counts"]) == [
      "food", "animal", "equipment", "religion"]
  # A label repeated within one image counts once.
  assert stats["fine_grained_label_image_counts"] == {
      "soup": 3, "cat": 1, "dog": 1, "plate": 1}
  assert stats["top_fine_grained_labels"] == {"soup": 3, "cat": 1}
  assert stats["labels_per_image"]["coarse"]["histogram"] == {"1": 2, "2": 2}
  assert stats["labels_per_image"]["fine_grained"]["histogram"] == {
      "1": 2, "2": 2}
  assert stats["images_per_user"]["histogram"] == {"1": 2, "2": 1}
  assert stats["images_per_user"]["summary"]["mean"] == pytest.approx(4 / 3)
  assert stats["distinct_labels_per_user"]["coarse"]["histogram"] == {
      "1": 1, "2": 2}
  assert stats["distinct_labels_per_user"]["fine_grained"]["histogram"] == {
      "1": 1, "2": 2}
  assert stats["images_per_user_by_partition"]["train"]["max"] == 2
  assert stats["users_in_several_partitions"] == []


def test_choose_sample_users_largest_first_ties_by_id():
  records = ([_record("z", "train", ["food"], ["x"])] * 3 +
             [_record("b", "train", ["food"], ["x"])] * 2 +
             [_record("a", "train", ["food"], ["x"])] * 2 +
             [_record("c", "val", ["food"], ["x"])])
  chosen = dataset_stats.choose_sample_users(records, num_users=3, num_images=2)
  assert list(chosen) == ["z", "a", "b"]
  assert [len(v) for v in chosen.values()] == [2, 2, 2]


GOOD_INDEX = json.dumps({"labels": {"animal": 0, "food": 1},
                         "fine_grained_labels": {"dog": 0, "soup": 1}})


def test_label_names_from_either_index_file_name(tmp_path):
  root = tmp_path / "tf"
  (root / "train").mkdir(parents=True)
  (root / constants.LEGACY_LABEL_INDEX_FILE).write_text(GOOD_INDEX)
  assert dataset_stats.load_label_names(str(root)) == (["animal", "food"],
                                                       ["dog", "soup"])
  (root / constants.LABEL_INDEX_FILE).write_text(json.dumps(
      {"labels": {"food": 0}, "fine_grained_labels": {}}))
  assert dataset_stats.load_label_names(str(root)) == (["food"], [])


