"""Tests of the checks before writing (benchmark/prepare/input_checks.py), in
this process: each image problem, the order of problems, the one-line error
and the printed list."""

import io
import json
import os

from PIL import Image

from benchmark.core import constants
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
