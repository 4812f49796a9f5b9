"""Tests of the checks before writing (benchmark/prepare/input_checks.py), in
this process: each image problem, the order of problems, the one-line error
and the printed list, labels against FLAIR's and label_relationship.txt,
user ids too long for a file name, and output locations of the wrong
kind."""

import io
import json
import os

from PIL import Image
import pytest

from benchmark.core import constants
from benchmark.core import errors
from benchmark.prepare import input_checks
from benchmark.prepare import sources


def _jpeg(size=constants.IMAGE_SIZE, image_format="JPEG"):
  buffer = io.BytesIO()
  Image.new("RGB", (size, size), (10, 20, 30)).save(buffer,
                                                    format=image_format)
  return buffer.getvalue()


def _dataset(tmp_path, images):
  """A dataset directory with one train record per (image id, bytes or
  None for a missing file)."""
  os.makedirs(tmp_path / constants.SMALL_IMAGES_DIR)
  records = []
  for image_id, content in images:
    records.append({"user_id": "u1", "image_id": image_id,
                    "labels": ["plant"], "fine_grained_labels": ["plant_0"],
                    "partition": "train"})
    if content is not None:
      (tmp_path / constants.SMALL_IMAGES_DIR / f"{image_id}.jpg").write_bytes(
          content)
  (tmp_path / constants.METADATA_FILE).write_text(json.dumps(records))
  return str(tmp_path)


def test_check_input_finds_every_image_problem_in_record_order(tmp_path):
  good = _jpeg()
  dataset = _dataset(tmp_path, [
      ("1", good), ("2", None), ("3", b"GIF89a" + b"\0" * 40),
      ("4", good[:len(good) // 2]), ("5", _jpeg(size=64)), ("6", good)])
  records, problems = input_checks.check_input(
      sources.DownloadedSource(dataset))
  assert [r.image_id for r in records] == ["1", "6"]
  assert records[0].image_sha256 == records[1].image_sha256
  assert len(records[0].image_sha256) == 64
  assert [p.record_index for p in problems] == [1, 2, 3, 4]
  expected = ["not found", "is not a JPEG", "cannot be decoded",
              "is 64x64 pixels, expected 256x256"]
  for problem, text in zip(problems, expected):
    assert text in problem.message, problem.message


def test_bad_input_error_lists_five_problems_and_counts_the_rest():
  problems = [input_checks.Problem(f"bad {i}", i, str(i), "u")
              for i in range(7)]
  error = input_checks.bad_input_error(problems, "META", " (advice)")
  message = str(error)
  assert message.startswith("7 problem(s) in META / its images, nothing "
                            "written: record 0 ")
  assert "bad 4" in message and "bad 5" not in message
  assert message.endswith("; and 2 more (advice)")
  assert error.problems == problems
  assert str(input_checks.bad_input_error(problems[:1], "M")).endswith(
      "bad 0")


def test_print_problems_lists_each_on_its_own_line():
  out = io.StringIO()
  input_checks.print_problems(
      [input_checks.Problem("gone", 3, "9", "u"),
       input_checks.Problem("no record")], file=out)
  assert out.getvalue().splitlines() == [
      "2 problem(s) found:", "  record 3 (image_id '9', user_id 'u'): gone",
      "  no record"]


def test_the_real_sample_passes(flair_sample_dir):
  records, problems = input_checks.check_input(
      sources.DownloadedSource(flair_sample_dir))
  assert problems == [] and len(records) == 35


# --- Labels -------------------------------------------------------------------


def _labelled_dataset(tmp_path, labels, relationship=None):
  """One train record per (coarse labels, fine-grained labels), each with a
  good image; `relationship` the text of label_relationship.txt, if any."""
  dataset = _dataset(tmp_path, [(str(i), _jpeg()) for i in range(len(labels))])
  records = json.loads((tmp_path / constants.METADATA_FILE).read_text())
  for record, (coarse, fine) in zip(records, labels):
    record["labels"], record["fine_grained_labels"] = coarse, fine
  (tmp_path / constants.METADATA_FILE).write_text(json.dumps(records))
  if relationship is not None:
    (tmp_path / constants.LABEL_RELATIONSHIP_FILE).write_text(relationship)
  return dataset


def test_coarse_labels_must_be_flairs_17(tmp_path):
  dataset = _labelled_dataset(tmp_path, [
      (["plant"], ["tree"]), (["plant", "not_a_real_label"], ["tree"]),
      (["Animal"], ["dog"])])
  records, problems = input_checks.check_input(
      sources.DownloadedSource(dataset))
  assert [r.image_id for r in records] == ["0"]
  assert [p.record_index for p in problems] == [1, 2]
  assert problems[0].message.startswith(
      "labels ['not_a_real_label'] not among FLAIR's 17 coarse labels "
      "(structure, equipment, ")
  assert "labels ['Animal'] not among" in problems[1].message


def test_fine_grained_labels_are_checked_against_label_relationship(
    tmp_path):
  labels = [(["plant"], ["tree"]), (["animal"], ["dog", "unicorn"]),
            (["animal", "plant"], ["dog", "tree"])]
  relationship = "tree -> plant\n\ndog -> animal\r\n  dog  ->  structure\n"
  dataset = _labelled_dataset(tmp_path, labels, relationship)
  records, problems = input_checks.check_input(
      sources.DownloadedSource(dataset))
  assert [r.image_id for r in records] == ["0", "2"]
  (problem,) = problems
  path = os.path.join(dataset, constants.LABEL_RELATIONSHIP_FILE)
  assert problem.record_index == 1
  assert problem.message == f"fine_grained_labels ['unicorn'] not in {path}"


def test_without_label_relationship_fine_grained_labels_are_not_checked(
    tmp_path):
  dataset = _labelled_dataset(tmp_path, [(["animal"], ["unicorn"])])
  _, problems = input_checks.check_input(sources.DownloadedSource(dataset))
  assert problems == []


@pytest.mark.parametrize("text, detail", [
    ("tree -> plant\ndog -> an", "line 2: 'an' is not one of FLAIR's 17 "
     "coarse labels"),
    ("tree -> plant\ndog -", "line 2: expected '<fine-grained label> -> "
     "<coarse label>', got 'dog -'"),
    ("tree -> plant\ndog ->", "line 2: expected"),
    ("tree, plant\n", "line 1: expected"),
    ("\n\n", None),
])
def test_truncated_or_malformed_label_relationship_is_refused(tmp_path, text,
                                                              detail):
  dataset = _labelled_dataset(tmp_path, [(["plant"], ["tree"])], text)
  path = os.path.join(dataset, constants.LABEL_RELATIONSHIP_FILE)
  with pytest.raises(errors.FlairInputError) as info:
    input_checks.check_input(sources.DownloadedSource(dataset))
  message = str(info.value)
  assert message.startswith(path) and "\n" not in message
  if detail is None:
    assert "holds no '<fine-grained label> -> <coarse label>' line" in message
  else:
    assert message.startswith(f"{path} is truncated or malformed: {detail}")


# --- User ids -----------------------------------------------------------------


def test_user_ids_too_long_for_a_file_name_are_refused_with_the_limit(
    tmp_path):
  dataset = _dataset(tmp_path, [(str(i), _jpeg()) for i in range(3)])
  records = json.loads((tmp_path / constants.METADATA_FILE).read_text())
  longest = "é" * (input_checks.MAX_USER_ID_BYTES // 2) + "a" * (
      input_checks.MAX_USER_ID_BYTES % 2)  # The limit is in UTF-8 bytes.
  records[0]["user_id"] = longest
  records[1]["user_id"] = longest + "a"
  records[2]["user_id"] = "u" * 245
  (tmp_path / constants.METADATA_FILE).write_text(json.dumps(records))
  good, problems = input_checks.check_input(sources.DownloadedSource(dataset))
  assert [r.user_id for r in good] == [longest]
  assert [p.record_index for p in problems] == [1, 2]
  limit = input_checks.MAX_USER_ID_BYTES
  assert limit == 231
  assert problems[0].message.startswith(
      f"user_id is {limit + 1} bytes long (UTF-8), more than the {limit} "
      "that fit in a file name")
  assert "user_id is 245 bytes long" in problems[1].message


# --- Output locations ---------------------------------------------------------


def test_output_dir_must_not_be_a_file(tmp_path):
  existing = tmp_path / "a_file"
  existing.write_text("keep")
  input_checks.check_output_dir(str(tmp_path / "new" / "dir"), "--out")
  input_checks.check_output_dir(str(tmp_path), "--out")
  with pytest.raises(errors.FlairInputError,
                     match=r"^--out '.*a_file' must be a directory \(created "
                     r"if missing\), but it is an existing file$"):
    input_checks.check_output_dir(str(existing), "--out")
  with pytest.raises(errors.FlairInputError,
                     match=f"but {existing} is an existing file$"):
    input_checks.check_output_dir(str(existing / "below"), "--out")
  with pytest.raises(errors.FlairInputError, match="--out must name a"):
    input_checks.check_output_dir("", "--out")
  assert existing.read_text() == "keep"


def test_output_file_must_not_be_a_directory(tmp_path):
  existing = tmp_path / "a_file"
  existing.write_text("keep")
  input_checks.check_output_file(str(existing), "--out")  # Replaced later.
  input_checks.check_output_file(str(tmp_path / "new" / "f.h5"), "--out")
  with pytest.raises(errors.FlairInputError,
                     match=r"^--out '.*' is an existing directory; name the "
                     "file to write$"):
    input_checks.check_output_file(str(tmp_path), "--out")
  with pytest.raises(errors.FlairInputError,
                     match=f": {existing} is an existing file, not a "
                     "directory$"):
    input_checks.check_output_file(str(existing / "f.h5"), "--out")
