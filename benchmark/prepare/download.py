"""Downloads FLAIR into a dataset directory: fetch, unpack, verify (resumable).

Files fetched, relative to the base URL (docs/formats.md, "Download layout"):

  labels/labels_and_metadata.json     -> <dataset_dir>/labels_and_metadata.json
  labels/label_relationship.txt       -> <dataset_dir>/label_relationship.txt
  images/small/small_images-NN.tar.gz -> <dataset_dir>/small_images/<id>.jpg
  images/raw/images-NN.tar.gz         -> <dataset_dir>/raw_images/<id>.jpg
                                         (only with `download_raw`)

for NN in 00..42. The contract of `download`:

- Resume: a download is written to `<name>.part` and renamed to its final name
  only once its size matches the size the server announced, so a partial file
  never sits under the final name. An interrupted transfer continues from the
  end of its `.part` file with an HTTP Range request (or restarts when the
  server ignores the range). Files already complete are not requested again.
  Each unpacked archive leaves a marker in `<dataset_dir>/.download_state/`
  listing the files it installed, so a rerun after success sends no request at
  all and only verifies; a marker whose files have gone missing makes the rerun
  fetch that archive again.
  A partial file is continued only when it is provably part of the file on
  the server now (`fetch`: `If-Range` with the validator kept beside it in
  `<name>.part.validator`); otherwise it is fetched again from its start.
- One download at a time: the run holds an exclusive lock on the dataset
  directory (`locks.DirectoryLock`, file `<dataset_dir>/.lock`); a second
  download into it is refused at once with one line naming the running
  process. The operating system releases the lock however the run ends.
- Label files: `label_relationship.txt` must parse completely
  (`formats.read_label_relationship`); one cut short or malformed (a server
  may announce, and send, too few bytes) is deleted and the run ends with a
  one-line error, so that a rerun fetches it again.
- Retries: connection errors, truncated transfers, HTTP 5xx, 408 and 429 are
  retried with exponential backoff; HTTP 404 and a full disk end the run with
  a one-line error naming `--dataset_dir` (the partial file is kept for the
  next run).
- Parallel downloads and parallel unpacking, each on a bounded thread pool;
  an archive is unpacked as soon as it has arrived.
- Safe unpacking (`archive.unpack_archive`): a refused member stops the run
  with an error naming the archive and the member, and nothing of that
  archive is installed.
- Interruption: a stop (Ctrl-C, SIGTERM, or the first error) cancels queued
  work; `.part` files keep every byte received and resume on the next run. A
  transfer blocked on a silent connection notices the stop when its next
  bytes arrive or after `timeout_s`.
- Verification: every image named in labels_and_metadata.json must exist as
  `small_images/<image_id>.jpg` (and `raw_images/<image_id>.jpg` with
  `download_raw`); missing ones are listed in
  `<dataset_dir>/missing_images.txt` and `MissingImagesError` is raised.

The HTTP transfers (resume, retries, progress bars) live in `fetch` and the
safe unpacking in `archive`; this module holds the FLAIR layout, the pipeline
that runs them and the verification.
"""

import concurrent.futures
import contextlib
import dataclasses
import errno
import json
import os
import posixpath
import threading
from typing import Callable, Iterable, Iterator, Optional
import urllib.parse

from absl import logging

from benchmark.core import constants
from benchmark.core import errors
from benchmark.core import file_io
from benchmark.core import locks
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
# The flag that names the dataset directory, in messages.
_FLAG = "--dataset_dir"


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
        f"disk full while writing {path}: free some space (or choose another "
        f"{_FLAG}) and rerun (finished files and partial downloads are kept "
        "and resume)")
  detail = e.strerror or str(e)
  if e.filename and e.filename != path:
    detail += f": {e.filename}"
  if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
    return errors.DownloadError(
        f"file error on {path}: {detail}; make {_FLAG} writable (or "
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


def _verify_or_report(dataset_dir: str, download_raw: bool) -> int:
  """`verify_images` over the image directories downloaded; writes (or
  removes) `MISSING_IMAGES_REPORT`.

  Returns:
    The number of images found.

  Raises:
    MissingImagesError: some images are missing (listed in the report).
    errors.DownloadError: as `verify_images`.
  """
  image_dirs = [constants.SMALL_IMAGES_DIR]
  if download_raw:
    image_dirs.append(constants.RAW_IMAGES_DIR)
  found, missing = verify_images(dataset_dir, image_dirs)
  report = os.path.join(dataset_dir, MISSING_IMAGES_REPORT)
  if missing:
    file_io.write_text_atomic(report, "".join(m + "\n" for m in missing),
                              flag=_FLAG)
    examples = ", ".join(missing[:3])
    raise MissingImagesError(
        f"{len(missing)} image(s) named in {constants.METADATA_FILE} are "
        f"missing from {dataset_dir} (e.g. {examples}); full list in {report}",
        missing)
  if os.path.exists(report):
    os.remove(report)
  return found


# --- The whole download -------------------------------------------------------


def _validate_base_url(data_url: str) -> str:
  parsed = urllib.parse.urlparse(data_url or "")
  if parsed.scheme not in ("http", "https") or not parsed.netloc:
    raise errors.FlairInputError(
        f"--data_url must be an http:// or https:// URL, got {data_url!r}")
  return data_url if data_url.endswith("/") else data_url + "/"


def _check_settings(num_workers: int, num_unpack_workers: int,
                    max_retries: int, retry_backoff_s: float,
                    timeout_s: float) -> None:
  """Raises `errors.FlairInputError` naming the first flag out of range."""
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


def _make_dataset_dir(dataset_dir: str) -> str:
  """Creates `dataset_dir` and its bookkeeping directory; returns its
  absolute path (`errors.DownloadError` when it cannot be created)."""
  dataset_dir = os.path.abspath(os.path.expanduser(dataset_dir))
  try:
    os.makedirs(os.path.join(dataset_dir, constants.DOWNLOAD_STATE_DIR),
                exist_ok=True)
  except OSError as e:
    raise _local_error(e, dataset_dir) from None
  return dataset_dir


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


def _split_done(dataset_dir: str, all_archives: list[Archive]
                ) -> tuple[list[Archive], list[str]]:
  """Splits the archives into those to fetch and the URL paths of those
  already unpacked with all their files in place. A marker whose files have
  gone missing is removed (with a warning) and its archive fetched again."""
  todo, done = [], []
  present_cache: dict[str, set[str]] = {}
  for archive in all_archives:
    members = _read_marker(_marker_path(dataset_dir, archive))
    if members is not None:
      if archive.image_dir not in present_cache:
        present_cache[archive.image_dir] = set(
            archive_lib.walk_files(dataset_dir, archive.image_dir))
      lost = [m for m in members if m not in present_cache[archive.image_dir]]
      if not lost:
        done.append(archive.url_path)
        continue
      logging.warning("%d file(s) unpacked from %s are missing (e.g. %s); "
                      "fetching it again", len(lost), archive.file_name,
                      lost[0])
      os.remove(_marker_path(dataset_dir, archive))
    todo.append(archive)
  return todo, done


class _Transfers:
  """The fetch and unpack steps of one download and what they did
  (thread-safe: both run on thread pools)."""

  def __init__(self, dataset_dir: str, fetcher: fetch.Fetcher,
               progress: fetch.Progress, keep_archives: bool,
               stop: threading.Event, skipped: list[str]):
    self._dataset_dir = dataset_dir
    self._fetcher = fetcher
    self._progress = progress
    self._keep_archives = keep_archives
    self._stop = stop
    self._lock = threading.Lock()
    self.fetched: list[str] = []
    self.resumed: list[str] = []
    self.skipped = skipped
    self.unpacked: list[str] = []
    self.bytes_downloaded = 0

  def fetch_file(self, url_path: str, dest: str) -> None:
    """Fetches `url_path` to `dest` unless `dest` exists already.

    Raises:
      errors.DownloadError: as `fetch.Fetcher.fetch`, or a local write
        error (`_local_error`, naming the `.part` file).
    """
    if os.path.exists(dest):
      with self._lock:
        self.skipped.append(url_path)
      self._progress.file_done()
      return
    try:
      result = self._fetcher.fetch(url_path, dest)
    except OSError as e:
      raise _local_error(e, dest + fetch.PART_SUFFIX) from None
    self._progress.file_done()
    with self._lock:
      self.fetched.append(url_path)
      self.bytes_downloaded += result.num_bytes
      if result.resumed:
        self.resumed.append(url_path)

  def unpack(self, archive: Archive) -> None:
    """Unpacks a fetched archive, writes its marker and (unless kept)
    removes the archive.

    Raises:
      archive_lib.UnsafeArchiveError, errors.DownloadError: as
        `archive_lib.unpack_archive`, or a local file error (`_local_error`,
        naming the archive).
    """
    archive_path = os.path.join(self._dataset_dir, archive.file_name)
    try:
      members = archive_lib.unpack_archive(archive_path, self._dataset_dir,
                                           archive.image_dir, self._stop)
      file_io.write_json_atomic(
          _marker_path(self._dataset_dir, archive),
          {"url": self._fetcher.url(archive.url_path), "members": members},
          flag=_FLAG)
      if not self._keep_archives:
        os.remove(archive_path)
    except OSError as e:
      raise _local_error(e, archive_path) from None
    self._progress.archive_unpacked()
    logging.debug("unpacked %s: %d files", archive.file_name, len(members))
    with self._lock:
      self.unpacked.append(archive.url_path)


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
    download_raw: also fetch the raw full-size images (43 more archives).
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
    locks.DirectoryLockedError: another process is downloading into
      `dataset_dir` (names it); nothing was fetched or changed.
    errors.DownloadError: HTTP 404 or another non-retryable status, retries
      exhausted, disk full or another local write error, an unreadable
      archive, or a truncated or malformed label_relationship.txt (message
      names the URL or file).
    errors.OutputWriteError: a completion marker or the missing-images
      report cannot be written (names the file and --dataset_dir).
    archive_lib.UnsafeArchiveError: an archive member was refused (names
      archive and member).
    MissingImagesError: images named in labels_and_metadata.json are missing
      after unpacking; they are listed in `<dataset_dir>/missing_images.txt`.
  """
  if not dataset_dir:
    raise errors.FlairInputError(f"{_FLAG} must name a directory")
  base_url = _validate_base_url(data_url)
  if num_unpack_workers is None:
    num_unpack_workers = min(4, os.cpu_count() or 1)
  _check_settings(num_workers, num_unpack_workers, max_retries,
                  retry_backoff_s, timeout_s)
  dataset_dir = _make_dataset_dir(dataset_dir)

  with _locked(dataset_dir):
    stop = threading.Event()
    todo, skipped = _split_done(dataset_dir, archives(download_raw))
    num_files = len(todo) + len(LABEL_FILES)
    progress = fetch.Progress(show_progress, num_workers, num_files,
                              len(todo))
    fetcher = fetch.Fetcher(base_url, max_retries, retry_backoff_s,
                            timeout_s, stop, progress)
    transfers = _Transfers(dataset_dir, fetcher, progress, keep_archives,
                           stop, skipped)
    try:
      _fetch_label_files(transfers, dataset_dir)
      _run_pipeline(todo, dataset_dir, transfers.fetch_file,
                    transfers.unpack, num_workers, num_unpack_workers, stop)
    finally:
      progress.close()
    found = _verify_or_report(dataset_dir, download_raw)
  return DownloadSummary(
      dataset_dir=dataset_dir, fetched=tuple(transfers.fetched),
      resumed=tuple(transfers.resumed), skipped=tuple(transfers.skipped),
      unpacked=tuple(transfers.unpacked),
      bytes_downloaded=transfers.bytes_downloaded, num_images_verified=found)


@contextlib.contextmanager
def _locked(dataset_dir: str) -> Iterator[None]:
  """Holds the dataset directory's lock (`locks.DirectoryLock`) for the
  block.

  Raises:
    locks.DirectoryLockedError: another process holds it (one line naming
      --dataset_dir and that process).
    errors.DownloadError: the lock file cannot be written (`_local_error`).
  """
  lock = locks.DirectoryLock(dataset_dir, _FLAG)
  try:
    lock.acquire()
  except OSError as e:
    raise _local_error(e, lock.path) from None
  try:
    yield
  finally:
    lock.release()


def _fetch_label_files(transfers: _Transfers, dataset_dir: str) -> None:
  """Fetches the label files (first: they are small, and a wrong --data_url
  fails here at once), then checks that label_relationship.txt is complete.

  Raises:
    errors.DownloadError: as `_Transfers.fetch_file`, or
      label_relationship.txt is truncated or malformed
      (`formats.read_label_relationship`); it is deleted, so that a rerun
      fetches it again.
  """
  for url_path, file_name in LABEL_FILES:
    transfers.fetch_file(url_path, os.path.join(dataset_dir, file_name))
  path = os.path.join(dataset_dir, constants.LABEL_RELATIONSHIP_FILE)
  try:
    formats.read_label_relationship(path)
  except errors.FlairInputError as e:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
    raise errors.DownloadError(
        f"{e}; it was deleted: rerun to fetch it again") from None

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
