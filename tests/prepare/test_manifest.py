"""Tests of prepare_manifest.jsonl (benchmark/prepare/manifest.py): entries,
reading back what an interrupted run appended, and rebuild reasons."""

from benchmark.core import constants
from benchmark.prepare import input_checks
from benchmark.prepare import manifest


def _record(image_id="1", sha="a" * 64, labels=("plant",)):
  return input_checks.CheckedRecord(
      index=0, user_id="u1", image_id=image_id, labels=tuple(labels),
      fine_grained_labels=("plant_0",), partition=constants.TRAIN,
      image_sha256=sha)


def test_entry_depends_on_records_images_and_label_index():
  base = manifest.entry("train/u1.tfrecords", "d1", [_record()])
  assert base["file"] == "train/u1.tfrecords"
  assert base["options"] == manifest.WRITER_OPTIONS
  assert manifest.entry("train/u1.tfrecords", "d1", [_record()]) == base
  for other in ([_record(sha="b" * 64)], [_record(image_id="2")],
                [_record(labels=("food",))]):
    changed = manifest.entry("train/u1.tfrecords", "d1", other)
    assert changed["records_sha256"] != base["records_sha256"]
  assert manifest.digest({"b": 1, "a": [2]}) == manifest.digest(
      {"a": [2], "b": 1})


def test_read_keeps_the_last_line_of_a_file_and_skips_a_cut_line(tmp_path):
  path = str(tmp_path / manifest.MANIFEST_FILE)
  first = manifest.entry("train/u1.tfrecords", "d1", [_record()])
  second = manifest.entry("train/u1.tfrecords", "d2", [_record()])
  other = manifest.entry("val/u2.tfrecords", "d2", [_record()])
  manifest.write(path, [other, first])
  with open(path, encoding="utf-8") as f:
    assert [line for line in f] == [manifest.line(first),
                                    manifest.line(other)]  # Sorted by file.
  with open(path, "a", encoding="utf-8") as f:
    f.write(manifest.line(second))
    f.write(manifest.line(other)[:20])  # Cut by a kill.
  assert manifest.read(path) == {"train/u1.tfrecords": second,
                                 "val/u2.tfrecords": other}
  assert manifest.read(str(tmp_path / "missing.jsonl")) == {}


def test_rebuild_reason_names_what_changed():
  new = manifest.entry("train/u1.tfrecords", "d1", [_record()])
  assert manifest.rebuild_reason(dict(new), new) is None
  assert manifest.rebuild_reason(None, new) == manifest.REBUILD_NO_ENTRY
  assert manifest.rebuild_reason(
      dict(new, label_index_sha256="d0"), new) == manifest.REBUILD_LABEL_INDEX
  assert manifest.rebuild_reason(
      dict(new, options={"format": 0}), new) == manifest.REBUILD_OPTIONS
  assert manifest.rebuild_reason(
      dict(new, records_sha256="x"), new) == manifest.REBUILD_RECORDS
