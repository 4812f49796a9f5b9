"""Downloads FLAIR and unpacks it into a dataset directory, resumably, safely.

Files fetched, relative to `--data_url` (docs/formats.md, "Download
layout"):

  labels/labels_and_metadata.json     -> <dataset_dir>/labels_and_metadata.json
  labels/label_relationship.txt       -> <dataset_dir>/label_relationship.txt
  images/small/small_images-NN.tar.gz -> <dataset_dir>/small_images/<id>.jpg
  images/raw/images-NN.tar.gz         -> <dataset_dir>/raw_images/<id>.jpg
                                         (only with --download_raw)

for NN in 00..42. What it does for the user:

- Progress bars: bytes overall, bytes per file in flight, archives unpacked.
- Resume: a download is written to `<name>.part` and renamed to its final name
  only once its size matches the size the server announced, so a partial file
  never sits under the final name. An interrupted transfer continues from the
  end of its `.part` file with an HTTP Range request (or restarts when the
  server ignores the range). Files already complete are not requested again.
  Each unpacked archive leaves a marker in `<dataset_dir>/.download_state/`
  listing the files it installed, so a rerun after success sends no request at
  all and only verifies; a marker whose files have gone missing makes the rerun
  fetch that archive again.
- Retries: connection errors, truncated transfers, HTTP 5xx, 408 and 429 are
  retried with exponential backoff; HTTP 404 and a full disk end the run with
  a one-line error (the partial file is kept for the next run).
- Parallel downloads and parallel unpacking, each on a bounded thread pool;
  an archive is unpacked as soon as it has arrived.
- Safe unpacking: each archive is extracted into a private staging directory
  with the standard library's `tarfile.data_filter` (refuses absolute paths,
  members that would land outside the destination, links pointing outside it
  and device files); on top of it, members with absolute names, any link and
  anything not under the archive's image directory (`small_images/` or
  `raw_images/`) are refused. A refused member stops the run with an error
  naming the archive and the member, and nothing of that archive is installed.
- Interruption: Ctrl-C or SIGTERM stops the run cleanly (exit 130 / 143);
  `.part` files keep every byte received and resume on the next run. A
  transfer blocked on a silent connection notices the stop when its next
  bytes arrive or after --timeout_s.
- Verification: every image named in labels_and_metadata.json must exist as
  `small_images/<image_id>.jpg` (and `raw_images/<image_id>.jpg` with
  --download_raw); missing ones are listed in `<dataset_dir>/missing_images.txt`
  and the run exits non-zero.

The HTTP transfers (resume, retries, progress bars) live in
`benchmark/fetch.py` and the safe unpacking in `benchmark/archive.py`; this
file holds the FLAIR layout, the pipeline that runs them, the verification
and the command line.

Usage:
  python download_dataset.py --dataset_dir ~/data/flair
  python download_dataset.py --dataset_dir D --data_url http://mirror/flair/
"""

import concurrent.futures
import dataclasses
import errno
import json
import os
import posixpath
import threading
import time
from typing import Callable, Iterable, Optional
import urllib.parse

from absl import app
from absl import flags
from absl import logging

from benchmark.cli import commands
from benchmark.core import constants
from benchmark.core import errors
from benchmark.core import file_io
from benchmark.data import formats
from benchmark.prepare import archive as archive_lib
from benchmark.prepare import fetch

# docs/formats.md, "Download layout".
DEFAULT_DATA_URL = (
    "https://docs-assets.developer.apple.com/ml-research/datasets/flair/")
NUM_ARCHIVES = 43
LABEL_FILES = (
    ("labels/" + constants.METADATA_FILE, constants.METADATA_FILE),
    ("labels/" + constants.LABEL_RELATIONSHIP_FILE,
     constants.LABEL_RELATIONSHIP_FILE),
)
SMALL_ARCHIVE_URL_PATH = "images/small/small_images-{index:02d}.tar.gz"
RAW_ARCHIVE_URL_PATH = "images/raw/images-{index:02d}.tar.gz"

# Bookkeeping inside the dataset directory.
MARKER_SUFFIX = ".done"
MISSING_IMAGES_REPORT = "missing_images.txt"

MAX_WORKERS = 32


class MissingImagesError(errors.DownloadError):
  """Images named in labels_and_metadata.json are absent after unpacking.

  Attributes:
    missing: relative paths (e.g. `small_images/123.jpg`) of the absent images.
  """

  def __init__(self, message: str, missing: Iterable[str]):
    super().__init__(message)
    self.missing = tuple(missing)


@dataclasses.dataclass(frozen=True)
class DownloadSummary:
  """What one `download` call did.

  Attributes:
    dataset_dir: the dataset directory.
    fetched: URL paths (relative to the base URL) transferred in this run.
    resumed: the subset of `fetched` continued from a partial `.part` file
      with an HTTP Range request.
    skipped: URL paths already complete before this run and not requested.
    unpacked: archive URL paths unpacked in this run.
    bytes_downloaded: bytes received in this run, over all files.
    num_images_verified: images named in labels_and_metadata.json found on
      disk (counted once per image directory checked).
  """
  dataset_dir: str
  fetched: tuple[str, ...]
  resumed: tuple[str, ...]
  skipped: tuple[str, ...]
  unpacked: tuple[str, ...]
  bytes_downloaded: int
  num_images_verified: int


@dataclasses.dataclass(frozen=True)
class Archive:
  """One image archive of the FLAIR layout.

  Attributes:
    url_path: path relative to the base URL, e.g.
      `images/small/small_images-00.tar.gz`.
    file_name: its name inside the dataset directory while downloaded/kept.
    image_dir: the one top-level directory its members may use
      (`small_images` or `raw_images`).
  """
  url_path: str
  file_name: str
  image_dir: str


def archives(download_raw: bool = False) -> list[Archive]:
  """The image archives of the FLAIR layout, small ones first.

  Args:
    download_raw: also list the 43 raw-image archives.

  Returns:
    `NUM_ARCHIVES` small-image archives (plus as many raw ones), each with its
    URL path relative to the base URL, its local file name and the directory
    its members unpack to.
  """
  result = []
  templates = [(SMALL_ARCHIVE_URL_PATH, constants.SMALL_IMAGES_DIR)]
  if download_raw:
    templates.append((RAW_ARCHIVE_URL_PATH, constants.RAW_IMAGES_DIR))
  for template, image_dir in templates:
    for index in range(NUM_ARCHIVES):
      url_path = template.format(index=index)
      result.append(Archive(url_path, posixpath.basename(url_path), image_dir))
  return result


def _local_error(e: OSError, path: str) -> errors.DownloadError:
  """A one-line `errors.DownloadError` for a failed local file operation on
  `path` (a download or an archive being unpacked)."""
  if e.errno == errno.ENOSPC:
    return errors.DownloadError(
        f"disk full while writing {path}: free some space and rerun (finished "
        "files and partial downloads are kept and resume)")
  detail = e.strerror or str(e)
  if e.filename and e.filename != path:
    detail += f": {e.filename}"
  if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
    return errors.DownloadError(
        f"file error on {path}: {detail}; make --dataset_dir writable (or "
        "choose another) and rerun")
  return errors.DownloadError(f"file error on {path}: {detail}")


# --- Verification -------------------------------------------------------------


def _load_image_ids(metadata_path: str) -> list[str]:
  """The image ids of a labels_and_metadata.json whose records all meet
  `formats.check_metadata_records`; errors.DownloadError otherwise."""
  try:
    raw = formats.read_metadata_file(metadata_path)
  except errors.FlairInputError as e:
    raise errors.DownloadError(
        f"{e}; delete it and rerun to fetch it again") from None
  records, problems = formats.check_metadata_records(raw)
  if problems:
    raise errors.DownloadError(
        f"{metadata_path} {problems[0].describe()} ({len(problems)} bad "
        "record(s); delete it and rerun to fetch it again)")
  return [r.image_id for r in records]


def verify_images(dataset_dir: str,
                  image_dirs: Iterable[str] = (constants.SMALL_IMAGES_DIR,)
                  ) -> tuple[int, list[str]]:
  """Checks that every image of labels_and_metadata.json is on disk.

  Args:
    dataset_dir: directory holding labels_and_metadata.json.
    image_dirs: directories to check, each must hold `<image_id>.jpg` for
      every record.

  Returns:
    (number of images found, sorted relative paths of the missing ones).

  Raises:
    errors.DownloadError: labels_and_metadata.json is missing or malformed.
  """
  ids = _load_image_ids(os.path.join(dataset_dir, constants.METADATA_FILE))
  found, missing = 0, []
  for image_dir in image_dirs:
    present = set(archive_lib.walk_files(dataset_dir, image_dir))
    for image_id in ids:
      rel = f"{image_dir}/{image_id}{constants.IMAGE_EXTENSION}"
      if rel in present:
        found += 1
      else:
        missing.append(rel)
  return found, sorted(set(missing))


# --- The whole download -------------------------------------------------------


def _validate_base_url(data_url: str) -> str:
  parsed = urllib.parse.urlparse(data_url or "")
  if parsed.scheme not in ("http", "https") or not parsed.netloc:
    raise errors.FlairInputError(
        f"--data_url must be an http:// or https:// URL, got {data_url!r}")
  return data_url if data_url.endswith("/") else data_url + "/"


def _marker_path(dataset_dir: str, archive: Archive) -> str:
  return os.path.join(dataset_dir, constants.DOWNLOAD_STATE_DIR,
                      archive.file_name + MARKER_SUFFIX)


def _read_marker(path: str) -> Optional[list[str]]:
  """Members recorded by a marker; None when absent or unreadable."""
  try:
    with open(path, encoding="utf-8") as f:
      members = json.load(f)["members"]
  except (OSError, ValueError, KeyError, TypeError):
    return None
  return members if isinstance(members, list) else None


def download(dataset_dir: str,
             data_url: str = DEFAULT_DATA_URL,
             download_raw: bool = False,
             keep_archives: bool = False,
             num_workers: int = 4,
             num_unpack_workers: Optional[int] = None,
             max_retries: int = 5,
             retry_backoff_s: float = 1.0,
             timeout_s: float = 60.0,
             show_progress: bool = True) -> DownloadSummary:
  """Downloads FLAIR into `dataset_dir`, unpacks it and verifies the images.

  Safe to rerun: complete files are not requested again, partial ones resume,
  and after a successful run a rerun only verifies (see the module docstring).

  Args:
    dataset_dir: destination directory (created if missing).
    data_url: base URL of the FLAIR layout (http or https).
    download_raw: also fetch the raw full-size images (~1.2 TB unpacked).
    keep_archives: keep each `.tar.gz` in `dataset_dir` after unpacking it.
    num_workers: parallel downloads, 1..32.
    num_unpack_workers: parallel unpacks, 1..32; default min(4, CPU count).
    max_retries: retries of a file after consecutive transient failures
      (connection errors, truncated transfers, HTTP 5xx/408/429), >= 0.
    retry_backoff_s: wait before the first retry in seconds, doubled for
      each further retry (capped at 60 s), >= 0.
    timeout_s: socket timeout of one request in seconds, > 0.
    show_progress: show tqdm progress bars.

  Returns:
    A DownloadSummary.

  Raises:
    errors.FlairInputError: an argument is out of range (names the flag).
    errors.DownloadError: HTTP 404 or another non-retryable status, retries
      exhausted, disk full or another local write error, or an unreadable
      archive (message names the URL or file).
    archive_lib.UnsafeArchiveError: an archive member was refused (names
      archive and member).
    MissingImagesError: images named in labels_and_metadata.json are missing
      after unpacking; they are listed in `<dataset_dir>/missing_images.txt`.
  """
  if not dataset_dir:
    raise errors.FlairInputError("--dataset_dir must name a directory")
  base_url = _validate_base_url(data_url)
  if num_unpack_workers is None:
    num_unpack_workers = min(4, os.cpu_count() or 1)
  for flag, value in (("num_workers", num_workers),
                      ("num_unpack_workers", num_unpack_workers)):
    if not 1 <= value <= MAX_WORKERS:
      raise errors.FlairInputError(
          f"--{flag} must be between 1 and {MAX_WORKERS}, got {value}")
  if max_retries < 0:
    raise errors.FlairInputError(f"--max_retries must be >= 0, got "
                                 f"{max_retries}")
  if retry_backoff_s < 0:
    raise errors.FlairInputError(f"--retry_backoff_s must be >= 0, got "
                                 f"{retry_backoff_s}")
  if timeout_s <= 0:
    raise errors.FlairInputError(f"--timeout_s must be > 0, got {timeout_s}")

  dataset_dir = os.path.abspath(os.path.expanduser(dataset_dir))
  try:
    os.makedirs(os.path.join(dataset_dir, constants.DOWNLOAD_STATE_DIR),
                exist_ok=True)
  except OSError as e:
    raise _local_error(e, dataset_dir) from None

  stop = threading.Event()
  all_archives = archives(download_raw)
  fetched, resumed, skipped, unpacked = [], [], [], []
  bytes_downloaded = 0
  lock = threading.Lock()

  # Which archives are already unpacked with all their files in place.
  todo = []
  present_cache: dict[str, set[str]] = {}
  for archive in all_archives:
    members = _read_marker(_marker_path(dataset_dir, archive))
    if members is not None:
      if archive.image_dir not in present_cache:
        present_cache[archive.image_dir] = set(
            archive_lib.walk_files(dataset_dir, archive.image_dir))
      lost = [m for m in members if m not in present_cache[archive.image_dir]]
      if not lost:
        skipped.append(archive.url_path)
        continue
      logging.warning("%d file(s) unpacked from %s are missing (e.g. %s); "
                      "fetching it again", len(lost), archive.file_name,
                      lost[0])
      os.remove(_marker_path(dataset_dir, archive))
    todo.append(archive)

  num_files = len(todo) + len(LABEL_FILES)
  progress = fetch.Progress(show_progress, num_workers, num_files, len(todo))
  fetcher = fetch.Fetcher(base_url, max_retries, retry_backoff_s, timeout_s,
                          stop, progress)

  def fetch_file(url_path: str, dest: str) -> None:
    nonlocal bytes_downloaded
    if os.path.exists(dest):
      with lock:
        skipped.append(url_path)
      progress.file_done()
      return
    try:
      result = fetcher.fetch(url_path, dest)
    except OSError as e:
      raise _local_error(e, dest + fetch.PART_SUFFIX) from None
    progress.file_done()
    with lock:
      fetched.append(url_path)
      bytes_downloaded += result.num_bytes
      if result.resumed:
        resumed.append(url_path)

  def unpack(archive: Archive) -> None:
    archive_path = os.path.join(dataset_dir, archive.file_name)
    try:
      members = archive_lib.unpack_archive(archive_path, dataset_dir,
                                           archive.image_dir, stop)
      file_io.write_json_atomic(
          _marker_path(dataset_dir, archive),
          {"url": fetcher.url(archive.url_path), "members": members})
      if not keep_archives:
        os.remove(archive_path)
    except OSError as e:
      raise _local_error(e, archive_path) from None
    progress.archive_unpacked()
    logging.debug("unpacked %s: %d files", archive.file_name, len(members))
    with lock:
      unpacked.append(archive.url_path)

  try:
    # Labels first: small, and a wrong --data_url fails here at once.
    for url_path, file_name in LABEL_FILES:
      fetch_file(url_path, os.path.join(dataset_dir, file_name))
    _run_pipeline(todo, dataset_dir, fetch_file, unpack, num_workers,
                  num_unpack_workers, stop)
  finally:
    progress.close()

  image_dirs = [constants.SMALL_IMAGES_DIR]
  if download_raw:
    image_dirs.append(constants.RAW_IMAGES_DIR)
  found, missing = verify_images(dataset_dir, image_dirs)
  report = os.path.join(dataset_dir, MISSING_IMAGES_REPORT)
  if missing:
    file_io.write_text_atomic(report, "".join(m + "\n" for m in missing))
    examples = ", ".join(missing[:3])
    raise MissingImagesError(
        f"{len(missing)} image(s) named in {constants.METADATA_FILE} are "
        f"missing from {dataset_dir} (e.g. {examples}); full list in {report}",
        missing)
  if os.path.exists(report):
    os.remove(report)
  return DownloadSummary(
      dataset_dir=dataset_dir, fetched=tuple(fetched), resumed=tuple(resumed),
      skipped=tuple(skipped), unpacked=tuple(unpacked),
      bytes_downloaded=bytes_downloaded, num_images_verified=found)


def _run_pipeline(todo: list[Archive], dataset_dir: str,
                  fetch_file: Callable[[str, str], None],
                  unpack: Callable[[Archive], None], num_workers: int,
                  num_unpack_workers: int, stop: threading.Event) -> None:
  """Downloads on one bounded pool, unpacks each arrived archive on another.

  On the first failure (or Ctrl-C) the stop event is set, queued tasks are
  cancelled, running ones stop at their next chunk or member, and the first
  error is raised. Files already complete stay in place for the next run.
  """
  first_error: Optional[BaseException] = None
  with concurrent.futures.ThreadPoolExecutor(
      num_workers, thread_name_prefix="fetch") as fetch_pool, \
      concurrent.futures.ThreadPoolExecutor(
          num_unpack_workers, thread_name_prefix="unpack") as unpack_pool:
    pending = {}
    for archive in todo:
      dest = os.path.join(dataset_dir, archive.file_name)
      future = fetch_pool.submit(fetch_file, archive.url_path, dest)
      pending[future] = ("fetch", archive)
    try:
      while pending:
        done, _ = concurrent.futures.wait(
            pending, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
          kind, archive = pending.pop(future)
          if future.cancelled():
            continue
          error = future.exception()
          if error is not None:
            if (first_error is None
                and not isinstance(error, errors.DownloadStopped)):
              first_error = error
            stop.set()
            for other in pending:
              other.cancel()
          elif kind == "fetch" and not stop.is_set():
            pending[unpack_pool.submit(unpack, archive)] = ("unpack", archive)
    except BaseException:  # Ctrl-C or SIGTERM: stop the workers, then leave.
      stop.set()
      for other in pending:
        other.cancel()
      raise
  if first_error is not None:
    raise first_error
  if stop.is_set():
    raise errors.DownloadError("download stopped before it finished; rerun "
                               "to resume")


# --- Command line -------------------------------------------------------------

def _define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines this command's flags (called by `run`, not at import, so that
  this module can be imported beside the other commands)."""
  flags.DEFINE_string(
      "dataset_dir", None,
      "Directory to download FLAIR into (created if missing); ends up holding "
      "labels_and_metadata.json, label_relationship.txt and small_images/.",
      flag_values=flag_values)
  flags.DEFINE_bool(
      "download_raw", False,
      "Also download the raw full-size images into raw_images/ (43 more "
      "archives, about 1.2 TB unpacked).",
      flag_values=flag_values)
  flags.DEFINE_bool(
      "keep_archive_after_decompress", False,
      "Keep each .tar.gz archive in dataset_dir after unpacking it (by default "
      "it is deleted once unpacked).",
      flag_values=flag_values)
  flags.DEFINE_string(
      "data_url", DEFAULT_DATA_URL,
      "Base URL of the FLAIR files (labels/, images/); point it at a mirror or "
      "a local server.",
      flag_values=flag_values)
  flags.DEFINE_integer(
      "num_workers", 4, "Number of files downloaded in parallel.",
      lower_bound=1, upper_bound=MAX_WORKERS,
      flag_values=flag_values)
  flags.DEFINE_integer(
      "num_unpack_workers", None,
      "Number of archives unpacked in parallel; default min(4, CPU count).",
      lower_bound=1, upper_bound=MAX_WORKERS,
      flag_values=flag_values)
  flags.DEFINE_integer(
      "max_retries", 5,
      "Retries of a file after consecutive connection errors, truncated "
      "transfers or HTTP 5xx/408/429 replies.", lower_bound=0,
      flag_values=flag_values)
  flags.DEFINE_float(
      "retry_backoff_s", 1.0,
      "Seconds to wait before the first retry; doubled for each further retry "
      "(at most 60 s).", lower_bound=0.0,
      flag_values=flag_values)
  flags.DEFINE_float(
      "timeout_s", 60.0, "Socket timeout of one HTTP request, in seconds.",
      lower_bound=0.001,
      flag_values=flag_values)
  flags.DEFINE_bool("progress", True, "Show progress bars.",
                    flag_values=flag_values)
  flags.mark_flag_as_required("dataset_dir", flag_values=flag_values)


@commands.exit_on_input_error
def main(argv):
  if len(argv) > 1:
    raise errors.FlairInputError(
        f"unexpected positional arguments: {' '.join(argv[1:])}")
  start = time.monotonic()
  values = flags.FLAGS
  summary = download(
      values.dataset_dir, data_url=values.data_url,
      download_raw=values.download_raw,
      keep_archives=values.keep_archive_after_decompress,
      num_workers=values.num_workers,
      num_unpack_workers=values.num_unpack_workers,
      max_retries=values.max_retries, retry_backoff_s=values.retry_backoff_s,
      timeout_s=values.timeout_s, show_progress=values.progress)
  print(f"FLAIR ready in {summary.dataset_dir}: "
        f"{summary.num_images_verified} images verified; "
        f"{len(summary.fetched)} file(s) fetched "
        f"({summary.bytes_downloaded / 2**20:.1f} MiB, "
        f"{len(summary.resumed)} resumed), {len(summary.unpacked)} archive(s) "
        f"unpacked, {len(summary.skipped)} already complete, "
        f"{time.monotonic() - start:.1f} s.")


def run():
  """Console-script entry point (`flair-download`)."""
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
