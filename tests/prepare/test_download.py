"""Tests of the download pipeline (benchmark/prepare/download.py, with
fetch.py and archive.py) and of download_dataset.py against a real HTTP
server on 127.0.0.1.

The server (tests/download_server.py) serves a FLAIR-layout tree built here
from the real sample in ../shared/flair_sample (or, where that is absent, from
the synthetic generator): the two label files and all 43 small-image and 43
raw-image archive names, the images spread over them round-robin.
"""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from benchmark.core import constants
from benchmark.core import errors
from benchmark.prepare import archive
from benchmark.prepare import download
from benchmark.prepare import fetch
from download_server import build_tree
from download_server import Fault
from download_server import FileServer
from download_server import METADATA_URL
from download_server import RAW
from download_server import RELATIONSHIP_URL
from download_server import SMALL

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
@pytest.fixture(scope="module")
def source_dir(request):
  """The real FLAIR sample, or the synthetic dataset where it is absent."""
  try:
    return request.getfixturevalue("flair_sample_dir")
  except pytest.skip.Exception:
    return request.getfixturevalue("synthetic_dataset_dir")


@pytest.fixture(scope="module")
def tree(source_dir, tmp_path_factory):
  root = str(tmp_path_factory.mktemp("server_root"))
  info = build_tree(source_dir, root)
  info["root"] = root
  return info


@pytest.fixture
def server(tree):
  with FileServer(tree["root"], max_lifetime_s=60) as s:
    yield s


def _download(server, dataset_dir, **kwargs):
  options = dict(show_progress=False, max_retries=2, retry_backoff_s=0.01,
                 timeout_s=10, num_workers=4, num_unpack_workers=2)
  options.update(kwargs)
  return download.download(str(dataset_dir), data_url=server.url,
                           **options)


def _files_under(root):
  """Relative paths of all files and links under `root`, bookkeeping
  directory excluded."""
  found = set()
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d != constants.DOWNLOAD_STATE_DIR]
    for name in filenames + [d for d in dirnames
                             if os.path.islink(os.path.join(dirpath, d))]:
      found.add(os.path.relpath(os.path.join(dirpath, name), root))
  return found


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def _assert_images_identical(dataset_dir, tree,
                             image_dir=constants.SMALL_IMAGES_DIR):
  for image_id, data in tree["images"].items():
    path = os.path.join(dataset_dir, image_dir,
                        image_id + constants.IMAGE_EXTENSION)
    assert _read(path) == data, path


# --- Full download ------------------------------------------------------------


def test_full_download_gives_documented_layout(server, tree, tmp_path):
  dataset_dir = tmp_path / "flair"
  summary = _download(server, dataset_dir)

  expected = {constants.METADATA_FILE, constants.LABEL_RELATIONSHIP_FILE}
  expected |= {os.path.join(constants.SMALL_IMAGES_DIR,
                            i + constants.IMAGE_EXTENSION)
               for i in tree["images"]}
  # Exactly the layout: no archives left behind, no .part files, no raw.
  assert _files_under(dataset_dir) == expected
  _assert_images_identical(dataset_dir, tree)
  for url_path, name in download.LABEL_FILES:
    assert _read(dataset_dir / name) == _read(os.path.join(tree["root"],
                                                           url_path))
  assert summary.num_images_verified == len(tree["images"])
  assert sorted(summary.unpacked) == sorted(SMALL)
  assert summary.resumed == ()
  # Every file requested exactly once; raw archives never without the flag.
  for path in SMALL + [METADATA_URL, RELATIONSHIP_URL]:
    assert server.count(path) == 1, path
  assert all(server.count(p) == 0 for p in RAW)
  assert all(r.range is None for r in server.requests)


def test_raw_images_and_kept_archives(server, tree, tmp_path):
  dataset_dir = tmp_path / "flair"
  summary = _download(server, dataset_dir, download_raw=True,
                      keep_archives=True)
  _assert_images_identical(dataset_dir, tree)
  _assert_images_identical(dataset_dir, tree, constants.RAW_IMAGES_DIR)
  assert summary.num_images_verified == 2 * len(tree["images"])
  for url_path in SMALL + RAW:
    kept = dataset_dir / os.path.basename(url_path)
    assert _read(kept) == _read(os.path.join(tree["root"], url_path))


def test_rerun_after_success_makes_no_request(server, tree, tmp_path):
  dataset_dir = tmp_path / "flair"
  _download(server, dataset_dir)
  num_requests = len(server.requests)
  summary = _download(server, dataset_dir)
  assert len(server.requests) == num_requests  # Not one request, images or not.
  assert summary.fetched == () and summary.unpacked == ()
  assert len(summary.skipped) == len(SMALL) + 2
  assert summary.num_images_verified == len(tree["images"])


def test_rerun_refetches_only_the_archive_of_a_lost_image(server, tree,
                                                          tmp_path):
  dataset_dir = tmp_path / "flair"
  _download(server, dataset_dir)
  image_id = sorted(tree["images"])[0]
  lost_archive = SMALL[tree["archive_of"][image_id]]
  os.remove(dataset_dir / constants.SMALL_IMAGES_DIR /
            (image_id + constants.IMAGE_EXTENSION))
  summary = _download(server, dataset_dir)
  assert summary.fetched == (lost_archive,)
  assert server.count(lost_archive) == 2
  assert all(server.count(p) == 1 for p in SMALL if p != lost_archive)
  _assert_images_identical(dataset_dir, tree)


# --- Interrupted transfers ----------------------------------------------------


def _archive_with_images(tree):
  """The URL path and size of the last served archive that holds images (so
  that with one worker, the archives before it complete first)."""
  index = max(tree["archive_of"].values())
  path = SMALL[index]
  return path, os.path.getsize(os.path.join(tree["root"], path))


def test_dropped_connection_then_rerun_resumes(server, tree, tmp_path):
  dataset_dir = tmp_path / "flair"
  target, size = _archive_with_images(tree)
  cut = size // 2
  server.set_fault(target, Fault(drop_after_bytes=cut, times=1))
  with pytest.raises(errors.DownloadError,
                     match=rf"{target}.*closed after {cut} of {size} bytes"):
    _download(server, dataset_dir, max_retries=0, num_workers=1)
  part = dataset_dir / (os.path.basename(target) +
                        fetch.PART_SUFFIX)
  assert os.path.getsize(part) == cut
  assert not (dataset_dir / os.path.basename(target)).exists()
  # Archives finished in the first run: unpacked (marker) or fully on disk.
  finished = [p for p in SMALL if p != target and (
      (dataset_dir / constants.DOWNLOAD_STATE_DIR /
       (os.path.basename(p) + download.MARKER_SUFFIX)).exists() or
      (dataset_dir / os.path.basename(p)).exists())]
  assert finished, "the first run should have completed some archives"

  summary = _download(server, dataset_dir)

  for path in finished:
    assert server.count(path) == 1, f"{path} was fetched again"
  for path in SMALL:
    assert server.count(path) in (1, 2), path  # At most one resume each.
  first, second = server.requests_for(target)
  assert first.range is None
  assert second.range == f"bytes={cut}-" and second.status == 206
  # Continued only under the first reply's validator (If-Range).
  local = os.path.join(tree["root"], target)
  assert second.if_range == server.validator_headers(
      local, _read(local))["ETag"]
  assert target in summary.resumed and target in summary.fetched
  assert not os.path.exists(str(part) + fetch.VALIDATOR_SUFFIX)
  assert not part.exists()
  _assert_images_identical(dataset_dir, tree)
  assert server.count(METADATA_URL) == 1


def test_dropped_connection_is_retried_with_range_in_the_same_run(
    server, tree, tmp_path):
  target, size = _archive_with_images(tree)
  server.set_fault(target, Fault(drop_after_bytes=size // 3, times=1))
  summary = _download(server, tmp_path / "flair", max_retries=1)
  assert [r.range for r in server.requests_for(target)] == [
      None, f"bytes={size // 3}-"]
  assert summary.resumed == (target,)
  _assert_images_identical(tmp_path / "flair", tree)


def _keep_partial(server, root, dataset_dir, url_path, num_bytes):
  """Writes the first `num_bytes` of a served file as its partial download
  with the validator the downloader keeps beside it (docs/formats.md,
  "Download layout"), as a killed run leaves them; returns the partial
  file's path."""
  local = os.path.join(root, url_path)
  data = _read(local)
  os.makedirs(dataset_dir, exist_ok=True)
  part = dataset_dir / (os.path.basename(url_path) + fetch.PART_SUFFIX)
  part.write_bytes(data[:num_bytes])
  validators = server.validator_headers(local, data)
  with open(str(part) + fetch.VALIDATOR_SUFFIX, "w") as f:
    json.dump({"url": server.url + url_path, "etag": validators["ETag"],
               "last_modified": None, "length": len(data)}, f)
  return part


def test_complete_part_file_is_finished_without_a_body(server, tree, tmp_path):
  dataset_dir = tmp_path / "flair"
  target, size = _archive_with_images(tree)
  _keep_partial(server, tree["root"], dataset_dir, target, size)
  _download(server, dataset_dir)
  (request,) = server.requests_for(target)
  assert request.range == f"bytes={size}-" and request.status == 416
  _assert_images_identical(dataset_dir, tree)


def test_server_errors_are_retried_then_succeed(server, tree, tmp_path):
  server.set_fault(SMALL[1], Fault(status=503, times=2))
  _download(server, tmp_path / "flair", max_retries=2)
  assert server.count(SMALL[1]) == 3
  _assert_images_identical(tmp_path / "flair", tree)


# --- Resuming only the same file (If-Range) -----------------------------------


def _served_copy(tree, tmp_path):
  """A copy of the server tree (to change files in) whose metadata file was
  last modified an hour ago; returns (root, metadata path, its bytes)."""
  root = tmp_path / "root"
  shutil.copytree(tree["root"], root)
  metadata = root / METADATA_URL
  hour_ago = time.time() - 3600
  os.utime(metadata, (hour_ago, hour_ago))
  return root, metadata, _read(metadata)


def _interrupt_metadata(server, dataset_dir, cut):
  """A run whose metadata transfer is cut after `cut` bytes (no retry);
  returns the partial file."""
  server.set_fault(METADATA_URL, Fault(drop_after_bytes=cut, times=1))
  with pytest.raises(errors.DownloadError, match=f"closed after {cut} of"):
    _download(server, dataset_dir, max_retries=0)
  part = dataset_dir / (constants.METADATA_FILE + fetch.PART_SUFFIX)
  assert os.path.getsize(part) == cut
  return part


def _change_at_start_and_end(path, old):
  """Rewrites a served JSON file, still valid, with other bytes at its start
  and end and a newer (but past) modification time; returns its bytes."""
  new = b" " * 7 + old.rstrip() + b"\n\n"
  path.write_bytes(new)
  half_an_hour_ago = time.time() - 1800
  os.utime(path, (half_an_hour_ago, half_an_hour_ago))
  return new


@pytest.mark.parametrize("validators", [("etag", "last_modified"),
                                        ("last_modified",)])
def test_file_changed_on_the_server_is_fetched_whole_not_spliced(
    tree, tmp_path, validators):
  root, metadata, old = _served_copy(tree, tmp_path)
  cut = len(old) // 2
  dataset_dir = tmp_path / "flair"
  with FileServer(str(root), max_lifetime_s=60,
                  validators=validators) as server:
    part = _interrupt_metadata(server, dataset_dir, cut)
    assert os.path.exists(str(part) + fetch.VALIDATOR_SUFFIX)
    new = _change_at_start_and_end(metadata, old)
    summary = _download(server, dataset_dir)
    requests = server.requests_for(METADATA_URL)
  assert [r.range for r in requests] == [None, f"bytes={cut}-"]
  assert requests[1].if_range is not None
  assert requests[1].status == 200  # The server sent the whole new file...
  assert _read(dataset_dir / constants.METADATA_FILE) == new  # ...kept whole.
  assert METADATA_URL not in summary.resumed
  assert not part.exists()
  assert not os.path.exists(str(part) + fetch.VALIDATOR_SUFFIX)


def test_a_range_of_another_version_is_not_spliced(tree, tmp_path):
  """A server that ignores If-Range sends a range of its new file: the
  reply's ETag is not the one kept, so the partial file is dropped and the
  file fetched whole."""
  root, metadata, old = _served_copy(tree, tmp_path)
  cut = len(old) // 2
  dataset_dir = tmp_path / "flair"
  with FileServer(str(root), max_lifetime_s=60,
                  honour_if_range=False) as server:
    _interrupt_metadata(server, dataset_dir, cut)
    new = _change_at_start_and_end(metadata, old)
    _download(server, dataset_dir)
    requests = server.requests_for(METADATA_URL)
  assert [(r.range, r.status) for r in requests] == [
      (None, 200), (f"bytes={cut}-", 206), (None, 200)]
  assert _read(dataset_dir / constants.METADATA_FILE) == new


def test_partial_file_without_a_validator_is_fetched_from_the_start(
    tree, tmp_path):
  root, _, old = _served_copy(tree, tmp_path)
  cut = len(old) // 2
  dataset_dir = tmp_path / "flair"
  with FileServer(str(root), max_lifetime_s=60, validators=()) as server:
    part = _interrupt_metadata(server, dataset_dir, cut)
    assert not os.path.exists(str(part) + fetch.VALIDATOR_SUFFIX)
    summary = _download(server, dataset_dir)
    requests = server.requests_for(METADATA_URL)
  assert [r.range for r in requests] == [None, None]
  assert _read(dataset_dir / constants.METADATA_FILE) == old
  assert METADATA_URL not in summary.resumed


# --- Label files --------------------------------------------------------------


def test_label_relationship_cut_short_is_refused_then_fetched_again(
    server, tree, tmp_path):
  """The server announces (and sends) 5 bytes too few: the file looks
  complete but ends inside a line."""
  server.set_fault(RELATIONSHIP_URL, Fault(short_by_bytes=5, times=1))
  dataset_dir = tmp_path / "flair"
  path = dataset_dir / constants.LABEL_RELATIONSHIP_FILE
  with pytest.raises(errors.DownloadError) as info:
    _download(server, dataset_dir)
  message = str(info.value)
  assert message.startswith(f"{path} is truncated or malformed: line ")
  assert message.endswith("it was deleted: rerun to fetch it again")
  assert "\n" not in message
  assert not path.exists()
  assert all(server.count(p) == 0 for p in SMALL)  # Before any archive.

  _download(server, dataset_dir)
  assert _read(path) == _read(os.path.join(tree["root"], RELATIONSHIP_URL))


def test_truncated_label_relationship_left_by_an_earlier_run_is_refused(
    server, tree, tmp_path):
  dataset_dir = tmp_path / "flair"
  os.makedirs(dataset_dir)
  path = dataset_dir / constants.LABEL_RELATIONSHIP_FILE
  served = _read(os.path.join(tree["root"], RELATIONSHIP_URL))
  path.write_bytes(served[:-5])
  with pytest.raises(errors.DownloadError, match="truncated or malformed"):
    _download(server, dataset_dir)
  assert server.count(RELATIONSHIP_URL) == 0 and not path.exists()
  _download(server, dataset_dir)
  assert _read(path) == served


# --- Errors -------------------------------------------------------------------


def test_not_found_fails_at_once_naming_the_url(server, tmp_path):
  server.set_fault(SMALL[3], Fault(status=404))
  with pytest.raises(errors.DownloadError) as info:
    _download(server, tmp_path / "flair", max_retries=3)
  assert f"HTTP 404): {server.url}{SMALL[3]}" in str(info.value)
  assert server.count(SMALL[3]) == 1  # Not retried.


def test_repeated_server_errors_give_up_after_max_retries(server, tmp_path):
  server.set_fault(RELATIONSHIP_URL, Fault(status=500))
  with pytest.raises(errors.DownloadError,
                     match=r"HTTP 500 .*label_relationship.txt.*after 3 "):
    _download(server, tmp_path / "flair", max_retries=2)
  assert server.count(RELATIONSHIP_URL) == 3
  assert all(server.count(p) == 0 for p in SMALL)  # Labels come first.


@pytest.mark.parametrize("status,expected", [(404, "HTTP 404"),
                                             (500, "HTTP 500")])
def test_cli_exits_nonzero_with_one_line_error(server, tmp_path, status,
                                               expected):
  server.set_fault(SMALL[4], Fault(status=status))
  result = subprocess.run(
      [sys.executable, os.path.join(REPO_ROOT, "download_dataset.py"),
       f"--dataset_dir={tmp_path / 'flair'}", f"--data_url={server.url}",
       "--noprogress", "--max_retries=1", "--retry_backoff_s=0.01",
       "--num_workers=2"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  error_lines = [line for line in result.stderr.splitlines()
                 if line.startswith("error:")]
  assert len(error_lines) == 1, result.stderr
  assert expected in error_lines[0] and server.url + SMALL[4] in error_lines[0]


def test_cli_success_prints_summary(server, tree, tmp_path):
  result = subprocess.run(
      [sys.executable, os.path.join(REPO_ROOT, "download_dataset.py"),
       f"--dataset_dir={tmp_path / 'flair'}", f"--data_url={server.url}",
       "--noprogress"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 0, result.stderr
  assert f"{len(tree['images'])} images verified" in result.stdout


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_is_a_one_line_error(server, tmp_path):
  dataset_dir = tmp_path / "flair"
  os.makedirs(dataset_dir)
  part = dataset_dir / (constants.METADATA_FILE + fetch.PART_SUFFIX)
  os.symlink("/dev/full", part)  # Every write there fails with ENOSPC.
  with pytest.raises(errors.DownloadError,
                     match=rf"disk full while writing {part}") as info:
    _download(server, dataset_dir)
  assert "\n" not in str(info.value)
  assert "--dataset_dir" in str(info.value)
  assert not (dataset_dir / constants.METADATA_FILE).exists()


def test_disk_full_writing_an_archive_marker_names_dataset_dir(
    tree, tmp_path, small_filesystem):
  """Archives with no image: the first file unpacking writes is a completion
  marker in .download_state/, here on a full file system."""
  root = tmp_path / "root"
  os.makedirs(root / "labels")
  for url_path in (METADATA_URL, RELATIONSHIP_URL):
    shutil.copyfile(os.path.join(tree["root"], url_path), root / url_path)
  for url_path in SMALL:
    os.makedirs(os.path.dirname(root / url_path), exist_ok=True)
    with tarfile.open(root / url_path, "w:gz") as tar:
      entry = tarfile.TarInfo(constants.SMALL_IMAGES_DIR)
      entry.type = tarfile.DIRTYPE
      tar.addfile(entry)
  full = small_filesystem(64, fill_to_kib=0)
  dataset_dir = tmp_path / "flair"
  os.makedirs(dataset_dir)
  os.symlink(full, dataset_dir / constants.DOWNLOAD_STATE_DIR)
  with FileServer(str(root), max_lifetime_s=60) as server:
    with pytest.raises(errors.OutputWriteError) as info:
      _download(server, dataset_dir, num_workers=1, num_unpack_workers=1)
  message = str(info.value)
  assert message.startswith(
      f"cannot write {dataset_dir / constants.DOWNLOAD_STATE_DIR}/")
  assert download.MARKER_SUFFIX + ": No space left on device" in message
  assert "or use another --dataset_dir" in message
  assert "--save_model_dir" not in message and "\n" not in message


def test_read_only_dataset_dir_is_a_one_line_error(server, tmp_path,
                                                   small_filesystem):
  import subprocess as sp  # pylint: disable=g-import-not-at-top
  root = small_filesystem(256)
  sp.run(["mount", "-o", "remount,ro", root], check=True)
  with pytest.raises(errors.DownloadError,
                     match=rf"^file error on {root}.*Read-only file "
                     "system.*; make --dataset_dir writable") as info:
    _download(server, root)
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["read_only", "permission"])
def test_cli_unwritable_dataset_dir_is_one_line(server, make_unwritable,
                                                kind):
  """An existing --dataset_dir that cannot be written to: exit 1, one line
  naming the path and the reason, no traceback, nothing written."""
  from conftest import UNWRITABLE_REASONS  # pylint: disable=g-import-not-at-top
  dataset_dir, prefix = make_unwritable(kind)
  result = subprocess.run(
      prefix + [sys.executable, os.path.join(REPO_ROOT, "download_dataset.py"),
       f"--dataset_dir={dataset_dir}", f"--data_url={server.url}",
       "--noprogress", "--max_retries=1", "--retry_backoff_s=0.01"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 1, result.stderr
  assert "Traceback" not in result.stderr, result.stderr
  error_lines = [line for line in result.stderr.splitlines()
                 if line.startswith("error:")]
  assert len(error_lines) == 1, result.stderr
  assert error_lines[0].startswith(f"error: file error on {dataset_dir}"), (
      error_lines[0])
  assert UNWRITABLE_REASONS[kind] in error_lines[0]
  assert "make --dataset_dir writable" in error_lines[0]
  assert os.listdir(dataset_dir) == []


def test_bad_data_url_names_the_flag(tmp_path):
  with pytest.raises(errors.FlairInputError, match="--data_url"):
    download.download(str(tmp_path), data_url="ftp://example.org/")


def test_missing_images_are_reported(source_dir, tmp_path):
  root = tmp_path / "root"
  build_tree(source_dir, str(root))
  with open(root / METADATA_URL) as f:
    records = json.load(f)
  extra = dict(records[0], image_id="999000999")
  with open(root / METADATA_URL, "w") as f:
    json.dump(records + [extra], f)
  dataset_dir = tmp_path / "flair"
  with FileServer(str(root), max_lifetime_s=60) as server:
    with pytest.raises(download.MissingImagesError,
                       match=r"1 image\(s\) .*small_images/999000999.jpg"
                       ) as info:
      _download(server, dataset_dir)
  assert info.value.missing == ("small_images/999000999.jpg",)
  report = dataset_dir / download.MISSING_IMAGES_REPORT
  assert report.read_text().splitlines() == ["small_images/999000999.jpg"]


@pytest.mark.parametrize("content, message", [
    ("[{", "not valid JSON"),
    ('[{"user_id": "u1", "image_id": "../x", "labels": [], '
     '"fine_grained_labels": [], "partition": "train"}]',
     "record 0 (image_id '../x', user_id 'u1'): image_id must be"),
])
def test_verify_images_checks_records_as_prepare_does(tmp_path, content,
                                                      message):
  (tmp_path / constants.METADATA_FILE).write_text(content)
  with pytest.raises(errors.DownloadError) as info:
    download.verify_images(str(tmp_path))
  assert message in str(info.value)
  assert constants.METADATA_FILE in str(info.value)
  assert "\n" not in str(info.value)


# --- Malicious archives -------------------------------------------------------


def _malicious_member(kind, outside):
  """(TarInfo, data) for one hostile member; `outside` is a path outside the
  dataset directory that must stay untouched."""
  if kind == "dotdot":
    info = tarfile.TarInfo("../evil")
  elif kind == "dotdot_deep":
    info = tarfile.TarInfo("small_images/../../../../evil")
  elif kind == "absolute":
    info = tarfile.TarInfo(os.path.join(outside, "evil_abs"))
  elif kind == "symlink":
    info = tarfile.TarInfo("small_images/escape")
    info.type, info.linkname = tarfile.SYMTYPE, "../" * 12 + outside.lstrip("/")
  elif kind == "hardlink":
    info = tarfile.TarInfo("small_images/hard")
    info.type, info.linkname = tarfile.LNKTYPE, "../" * 12 + "etc/passwd"
  elif kind == "device":
    info = tarfile.TarInfo("small_images/dev")
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
  else:
    raise ValueError(kind)
  data = b"evil" if info.isreg() else b""
  info.size = len(data)
  return info, data


@pytest.mark.parametrize(
    "kind", ["dotdot", "dotdot_deep", "absolute", "symlink", "hardlink",
             "device"])
def test_malicious_archive_writes_nothing_outside(kind, tree, tmp_path):
  root = tmp_path / "root"
  shutil.copytree(tree["root"], root)
  outside = tmp_path / "outside"
  os.makedirs(outside)
  (outside / "keep.txt").write_text("untouched")
  image_id = sorted(tree["images"])[0]
  index = tree["archive_of"][image_id]
  evil, data = _malicious_member(kind, str(outside))
  with tarfile.open(root / SMALL[index], "w:gz") as tar:
    benign = tarfile.TarInfo(f"small_images/{image_id}.jpg")
    benign.size = len(tree["images"][image_id])
    tar.addfile(benign, io.BytesIO(tree["images"][image_id]))
    tar.addfile(evil, io.BytesIO(data))
    if kind == "symlink":  # Then try to write through the link.
      through = tarfile.TarInfo("small_images/escape/evil_through")
      through.size = 4
      tar.addfile(through, io.BytesIO(b"evil"))
  before = sorted(p for p in _walk_all(tmp_path)
                  if not p.startswith("flair"))
  dataset_dir = tmp_path / "flair"

  with FileServer(str(root), max_lifetime_s=60) as server:
    with pytest.raises(archive.UnsafeArchiveError) as info:
      _download(server, dataset_dir)

  message = str(info.value)
  archive_name = os.path.basename(SMALL[index])
  assert archive_name in message and repr(evil.name) in message, message
  assert "\n" not in message
  # Nothing written outside the dataset directory.
  after = sorted(p for p in _walk_all(tmp_path) if not p.startswith("flair"))
  assert after == before
  assert not any("evil" in p for p in _walk_all(tmp_path))
  assert not os.path.exists("/evil") and not os.path.exists("/evil_abs")
  # Nothing of the refused archive installed, and no link anywhere.
  assert not (dataset_dir / "small_images" / f"{image_id}.jpg").exists()
  assert not (dataset_dir / constants.DOWNLOAD_STATE_DIR /
              (archive_name + download.MARKER_SUFFIX)).exists()
  assert not any(os.path.islink(os.path.join(tmp_path, p))
                 for p in _walk_all(tmp_path))


def _walk_all(root):
  """Relative paths of every entry (files, dirs, links) under `root`."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames + filenames:
      found.append(os.path.relpath(os.path.join(dirpath, name), root))
  return found


# --- Interruption -------------------------------------------------------------


def _cli_download_until_stalled(server, tree, dataset_dir, stall_s):
  """Starts download_dataset.py (one worker) and returns once the last
  archive holding images has half arrived and stalls (for `stall_s`).

  Returns:
    (the process, its argv, the archive's URL path, half its size, its
    partial file).
  """
  target, size = _archive_with_images(tree)
  half = size // 2
  server.set_fault(target, Fault(stall_after_bytes=half, stall_s=stall_s,
                                 times=1))
  part = dataset_dir / (os.path.basename(target) + fetch.PART_SUFFIX)
  command = [sys.executable, os.path.join(REPO_ROOT, "download_dataset.py"),
             f"--dataset_dir={dataset_dir}", f"--data_url={server.url}",
             "--noprogress", "--num_workers=1"]
  process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 30
    while not (part.exists() and part.stat().st_size == half):
      assert process.poll() is None, process.communicate()
      assert time.monotonic() < deadline, "the transfer never reached the stall"
      time.sleep(0.02)
  except BaseException:
    process.kill()
    process.communicate()
    raise
  return process, command, target, half, part


def test_cli_terminated_mid_download_leaves_no_partial_file_under_final_name(
    server, tree, tmp_path):
  dataset_dir = tmp_path / "flair"
  process, _, target, half, part = _cli_download_until_stalled(
      server, tree, dataset_dir, stall_s=3.0)
  try:
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  assert process.returncode == 128 + signal.SIGTERM, stderr
  assert "Traceback" not in stderr
  assert part.stat().st_size == half  # Kept for the next run to resume...
  # ...and never under the final name.
  assert not (dataset_dir / os.path.basename(target)).exists()
  assert not os.path.exists(
      dataset_dir / constants.DOWNLOAD_STATE_DIR /
      ("unpack-" + os.path.basename(target)))

  summary = _download(server, dataset_dir)
  assert server.requests_for(target)[-1].range == f"bytes={half}-"
  assert target in summary.resumed
  _assert_images_identical(dataset_dir, tree)


# --- One download at a time ---------------------------------------------------


def test_second_download_into_the_same_dir_is_refused_naming_the_first(
    server, tree, tmp_path):
  """Two download_dataset.py processes into one --dataset_dir: the second is
  refused at once, one line naming the first; killing the first (kill -9)
  leaves no stale lock, and a rerun resumes."""
  dataset_dir = tmp_path / "flair"
  first, command, target, half, part = _cli_download_until_stalled(
      server, tree, dataset_dir, stall_s=30.0)
  try:
    num_requests = len(server.requests)
    second = subprocess.run(command, cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60, check=False)
    assert first.poll() is None  # Still running, untouched.
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
  finally:
    if first.poll() is None:
      first.kill()
      first.communicate()
  assert second.returncode == 1, second.stderr
  assert "Traceback" not in second.stderr
  error_lines = [line for line in second.stderr.splitlines()
                 if line.startswith("error:")]
  assert len(error_lines) == 1, second.stderr
  assert error_lines[0].startswith(
      f"error: --dataset_dir {dataset_dir} is in use by process {first.pid} ("
  ), error_lines[0]
  assert len(server.requests) == num_requests  # The second fetched nothing.
  assert part.stat().st_size == half

  summary = _download(server, dataset_dir)
  assert target in summary.resumed
  _assert_images_identical(dataset_dir, tree)
