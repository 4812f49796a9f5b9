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

Usage:
  python download_dataset.py --dataset_dir ~/data/flair
  python download_dataset.py --dataset_dir D --data_url http://mirror/flair/
"""

import concurrent.futures
import dataclasses
import errno
import functools
import gzip
import http.client
import json
import os
import posixpath
import re
import shutil
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from typing import Callable, Iterable, Optional

from absl import app
from absl import flags
from absl import logging
import tqdm

from benchmark import constants
from benchmark import errors
from benchmark import formats
from benchmark import io_utils

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
STATE_DIR = ".download_state"
MARKER_SUFFIX = ".done"
PART_SUFFIX = ".part"
MISSING_IMAGES_REPORT = "missing_images.txt"

MAX_WORKERS = 32
_CHUNK_BYTES = 1 << 20
_USER_AGENT = "flair-benchmark-downloader/0.1 (python urllib)"
# HTTP statuses worth retrying besides 5xx: request timeout, too many requests.
_RETRYABLE_4XX = (408, 429)
_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")
_UNSATISFIED_RANGE_RE = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$")


class DownloadError(errors.FlairInputError):
  """A download, unpack or verification step failed.

  The message is one line naming the URL, file or archive member and what to
  do; command-line use prints it as `error: <message>` and exits with status 1.
  """


class UnsafeArchiveError(DownloadError):
  """An archive member would write outside its place (absolute path, `..`,
  link or device file); nothing of that archive was installed."""


class MissingImagesError(DownloadError):
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


# --- HTTP transfer with resume and retries ------------------------------------


class _Cancelled(Exception):
  """Another task failed or the user interrupted: stop quietly."""


class _Transient(Exception):
  """A failure worth retrying (connection lost, 5xx...)."""

  def __init__(self, message: str, made_progress: bool = False):
    super().__init__(message)
    self.made_progress = made_progress


class _Progress:
  """Thread-safe tqdm bars: overall bytes (with files done / to do), one bar
  per file in flight, and archives unpacked. All bars are no-ops when
  `enabled` is False.

  The overall byte total grows as transfers start and announce their sizes
  (sizes are not known before a file is requested); a retried transfer only
  adds the bytes it must fetch again.
  """

  def __init__(self, enabled: bool, num_slots: int, num_files: int,
               num_archives: int):
    self._enabled = enabled
    self._lock = threading.Lock()
    self._free_slots = list(range(num_slots, 0, -1))
    self._num_files = num_files
    self._files_done = 0
    self._outstanding: dict[str, int] = {}  # Name -> bytes counted, not seen.
    self._overall = tqdm.tqdm(
        total=0, unit="B", unit_scale=True, unit_divisor=1024,
        desc="download", position=0, disable=not enabled, dynamic_ncols=True)
    self._overall.set_postfix_str(f"files 0/{num_files}")
    self._unpacked = tqdm.tqdm(
        total=num_archives, unit="archive", desc="unpack", position=1,
        disable=not enabled or num_archives == 0, dynamic_ncols=True)

  def start_file(self, name: str, total: Optional[int], initial: int):
    """Opens the bar of one transfer attempt; returns (bar, slot)."""
    with self._lock:
      if total is not None:
        needed = total - initial
        extra = needed - self._outstanding.get(name, 0)
        if extra > 0:
          self._overall.total += extra
          self._overall.refresh()
        self._outstanding[name] = max(needed, self._outstanding.get(name, 0))
      slot = self._free_slots.pop() if self._free_slots else None
    bar = tqdm.tqdm(
        total=total, initial=initial, unit="B", unit_scale=True,
        unit_divisor=1024, desc=name, leave=False, dynamic_ncols=True,
        position=None if slot is None else slot + 1,
        disable=not self._enabled)
    return bar, slot

  def update(self, name: str, bar, num_bytes: int):
    bar.update(num_bytes)
    with self._lock:
      self._overall.update(num_bytes)
      if name in self._outstanding:
        self._outstanding[name] -= num_bytes

  def end_file(self, bar, slot):
    bar.close()
    with self._lock:
      if slot is not None:
        self._free_slots.append(slot)

  def file_done(self):
    with self._lock:
      self._files_done += 1
      self._overall.set_postfix_str(
          f"files {self._files_done}/{self._num_files}")

  def archive_unpacked(self):
    with self._lock:
      self._unpacked.update(1)

  def close(self):
    self._unpacked.close()
    self._overall.close()


@dataclasses.dataclass(frozen=True)
class _FetchResult:
  num_bytes: int  # Bytes received in this run.
  resumed: bool  # Some transfer continued a partial file via HTTP Range.


def _parse_content_range(value: Optional[str]):
  """`bytes START-END/TOTAL` -> (START, TOTAL or None); None if malformed."""
  match = _CONTENT_RANGE_RE.match(value or "")
  if not match:
    return None
  total = None if match.group(3) == "*" else int(match.group(3))
  return int(match.group(1)), total


def _size_or_zero(path: str) -> int:
  try:
    return os.path.getsize(path)
  except FileNotFoundError:
    return 0


class _Fetcher:
  """Downloads single files to `<dest>.part`, then renames them to `<dest>`."""

  def __init__(self, base_url: str, max_retries: int, retry_backoff_s: float,
               timeout_s: float, stop: threading.Event, progress: _Progress):
    self._base_url = base_url
    self._max_retries = max_retries
    self._retry_backoff_s = retry_backoff_s
    self._timeout_s = timeout_s
    self._stop = stop
    self._progress = progress

  def url(self, url_path: str) -> str:
    return urllib.parse.urljoin(self._base_url, url_path)

  def fetch(self, url_path: str, dest: str) -> _FetchResult:
    """Downloads `url_path` to `dest`, resuming `dest + PART_SUFFIX`.

    Retries transient failures up to `max_retries` times in a row, waiting
    `retry_backoff_s * 2**k` seconds (capped at 60 s) before retry k; a
    failed attempt that still received bytes resets the count.

    Raises:
      DownloadError: HTTP 404 or another non-retryable status, or retries
        exhausted (message names the URL).
      OSError: writing the local file failed (the caller names the file).
      _Cancelled: the stop event was set.
    """
    url = self.url(url_path)
    part = dest + PART_SUFFIX
    failures = 0
    received = 0
    resumed = False
    while True:
      if self._stop.is_set():
        raise _Cancelled()
      try:
        num_bytes, used_range, done = self._attempt(url, part, url_path)
        received += num_bytes
        resumed = resumed or used_range
        if done:
          break
        continue  # The server refused the range: start again from zero.
      except _Transient as e:
        if e.made_progress:
          failures = 0
        if failures >= self._max_retries:
          raise DownloadError(
              f"{e}; gave up after {failures + 1} attempt(s) "
              f"(--max_retries={self._max_retries}); rerun to resume") from None
        delay = min(60.0, self._retry_backoff_s * 2**failures)
        failures += 1
        logging.warning("%s; retry %d of %d in %.2f s", e, failures,
                        self._max_retries, delay)
        if self._stop.wait(delay):
          raise _Cancelled() from None
    os.replace(part, dest)
    return _FetchResult(received, resumed)

  def _attempt(self, url: str, part: str, name: str):
    """One HTTP request. Returns (bytes received, used a Range, complete)."""
    offset = _size_or_zero(part)
    headers = {"User-Agent": _USER_AGENT}
    if offset > 0:
      headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
      response = urllib.request.urlopen(request, timeout=self._timeout_s)
    except urllib.error.HTTPError as e:
      e.close()
      if e.code == 416 and offset > 0:
        # Range not satisfiable: the partial file may already be complete.
        match = _UNSATISFIED_RANGE_RE.match(e.headers.get("Content-Range", ""))
        if match and int(match.group(1)) == offset:
          return 0, True, True
        os.remove(part)
        return 0, False, False
      if e.code == 404:
        raise DownloadError(
            f"not found (HTTP 404): {url}; check --data_url") from None
      if e.code >= 500 or e.code in _RETRYABLE_4XX:
        raise _Transient(f"HTTP {e.code} {e.reason} from {url}") from None
      raise DownloadError(f"HTTP {e.code} {e.reason} from {url}") from None
    except (OSError, http.client.HTTPException) as e:
      # URLError (DNS, refused connection), timeouts, resets.
      reason = getattr(e, "reason", e)
      raise _Transient(f"cannot fetch {url}: {reason}") from None

    with response:
      total = None
      mode = "wb"
      used_range = False
      if response.status == 206 and offset > 0:
        parsed = _parse_content_range(response.headers.get("Content-Range"))
        if parsed is None or parsed[0] != offset:
          os.remove(part)  # A range we did not ask for: start again.
          return 0, False, False
        total, mode, used_range = parsed[1], "ab", True
        logging.debug("resuming %s at byte %d", url, offset)
      else:
        offset = 0
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
      bar, slot = self._progress.start_file(name, total, offset)
      try:
        with open(part, mode) as f:
          received = self._copy(response, f, bar, name, url, offset)
      finally:
        self._progress.end_file(bar, slot)
    size = offset + received
    if total is not None and size != total:
      if size > total:
        os.remove(part)
        raise _Transient(f"{url} sent {size} bytes, more than the {total} "
                         "announced; starting again")
      raise _Transient(
          f"connection to {url} closed after {size} of {total} bytes",
          made_progress=received > 0)
    return received, used_range, True

  def _copy(self, response, f, bar, name: str, url: str, offset: int) -> int:
    """Streams the body into `f` as it arrives (each piece flushed, so the
    `.part` file holds everything received even if the process is killed).
    Network errors become _Transient; write errors (OSError) propagate."""
    received = 0
    while True:
      if self._stop.is_set():
        raise _Cancelled()
      try:
        chunk = response.read1(_CHUNK_BYTES)
      except (OSError, http.client.HTTPException) as e:
        raise _Transient(
            f"connection to {url} lost after {offset + received} bytes: "
            f"{e!r}", made_progress=received > 0) from None
      if not chunk:
        return received
      if self._stop.is_set():
        raise _Cancelled()
      f.write(chunk)
      f.flush()
      received += len(chunk)
      self._progress.update(name, bar, len(chunk))


def _local_error(e: OSError, path: str) -> DownloadError:
  """A one-line DownloadError for a failed local file operation on `path`
  (a download or an archive being unpacked)."""
  if e.errno == errno.ENOSPC:
    return DownloadError(
        f"disk full while writing {path}: free some space and rerun (finished "
        "files and partial downloads are kept and resume)")
  detail = e.strerror or str(e)
  if e.filename and e.filename != path:
    detail += f": {e.filename}"
  if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
    return DownloadError(
        f"file error on {path}: {detail}; make --dataset_dir writable (or "
        "choose another) and rerun")
  return DownloadError(f"file error on {path}: {detail}")


# --- Safe unpacking -----------------------------------------------------------


class _RefusedMemberError(tarfile.FilterError):
  """A member this downloader refuses beyond what `data_filter` refuses."""

  def __init__(self, tarinfo: tarfile.TarInfo, reason: str):
    self.tarinfo = tarinfo
    super().__init__(f"{tarinfo.name!r} {reason}")


def _member_filter(member: tarfile.TarInfo, dest_path: str, *, image_dir: str,
                   stop: threading.Event) -> Optional[tarfile.TarInfo]:
  """Extraction filter: stdlib `data_filter`, then FLAIR-specific checks.

  Refuses (raising a `tarfile.FilterError`): absolute member names (which
  `data_filter` would silently make relative), anything `data_filter` refuses
  (paths outside `dest_path`, links pointing outside it, device files), any
  symbolic or hard link, and anything outside `image_dir/`.
  """
  if stop.is_set():
    raise _Cancelled()
  if member.name.startswith(("/", os.sep)) or os.path.isabs(member.name):
    raise _RefusedMemberError(member, "has an absolute path")
  filtered = tarfile.data_filter(member, dest_path)
  if filtered.issym() or filtered.islnk():
    raise _RefusedMemberError(
        member, f"is a link to {member.linkname!r}; FLAIR archives hold only "
        "regular files and directories")
  if not (filtered.isreg() or filtered.isdir()):
    raise _RefusedMemberError(member, "is not a regular file or directory")
  name = posixpath.normpath(filtered.name)
  if name == ".":
    return None  # The archive's root directory entry: nothing to create.
  if name.split("/")[0] != image_dir:
    raise _RefusedMemberError(member, f"is outside {image_dir}/")
  return filtered


def _walk_files(root: str, subdir: str) -> list[str]:
  """Relative paths (`subdir/...`, '/'-separated) of the files under
  `root/subdir`, recursively; empty if it does not exist."""
  found = []
  top = os.path.join(root, subdir)
  for dirpath, _, filenames in os.walk(top):
    rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
    found.extend(f"{rel_dir}/{name}" for name in filenames)
  return found


def unpack_archive(archive_path: str, dataset_dir: str, image_dir: str,
                   stop: Optional[threading.Event] = None) -> list[str]:
  """Safely unpacks one FLAIR image archive into `dataset_dir`.

  The archive is extracted into a staging directory under
  `<dataset_dir>/.download_state/` with the member checks of
  `_member_filter`; only when every member passed are the files moved (renamed)
  into `<dataset_dir>/<image_dir>/`. So a refused member leaves nothing of the
  archive installed, and an interrupted unpack never leaves a partial image
  under its final name.

  Args:
    archive_path: a `.tar.gz` file.
    dataset_dir: the dataset directory.
    image_dir: the one top-level directory members may use
      (`constants.SMALL_IMAGES_DIR` or `constants.RAW_IMAGES_DIR`).
    stop: optional event; when set, unpacking stops between members.

  Returns:
    The relative paths ('/'-separated, e.g. `small_images/123.jpg`) of the
    files installed, sorted.

  Raises:
    UnsafeArchiveError: a member was refused (names the archive and member).
    DownloadError: the archive is not a readable .tar.gz (it is deleted so
      that a rerun fetches it again).
    OSError: a local file operation failed.
  """
  stop = stop or threading.Event()
  archive_name = os.path.basename(archive_path)
  staging = os.path.join(dataset_dir, STATE_DIR, "unpack-" + archive_name)
  shutil.rmtree(staging, ignore_errors=True)
  os.makedirs(staging)
  try:
    member_filter = functools.partial(
        _member_filter, image_dir=image_dir, stop=stop)
    try:
      with tarfile.open(archive_path, "r:gz") as tar:
        tar.errorlevel = 2  # Every extraction problem is an error.
        tar.extractall(staging, filter=member_filter)
    except tarfile.FilterError as e:
      raise UnsafeArchiveError(
          f"refusing to unpack {archive_path}: member {e.tarinfo.name!r} "
          f"refused ({e}); nothing from this archive was installed") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
      os.remove(archive_path)
      raise DownloadError(
          f"{archive_path} is not a readable .tar.gz archive ({e}); it was "
          "deleted, rerun to fetch it again") from None
    installed = _walk_files(staging, image_dir)
    for rel in installed:
      target = os.path.join(dataset_dir, *rel.split("/"))
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.replace(os.path.join(staging, *rel.split("/")), target)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return sorted(installed)


# --- Verification -------------------------------------------------------------


def _load_image_ids(metadata_path: str) -> list[str]:
  """The image ids of a labels_and_metadata.json whose records all meet
  `formats.check_metadata_records`; DownloadError otherwise."""
  try:
    raw = formats.read_metadata_file(metadata_path)
  except errors.FlairInputError as e:
    raise DownloadError(f"{e}; delete it and rerun to fetch it again"
                        ) from None
  records, problems = formats.check_metadata_records(raw)
  if problems:
    raise DownloadError(
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
    DownloadError: labels_and_metadata.json is missing or malformed.
  """
  ids = _load_image_ids(os.path.join(dataset_dir, constants.METADATA_FILE))
  found, missing = 0, []
  for image_dir in image_dirs:
    present = set(_walk_files(dataset_dir, image_dir))
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
  return os.path.join(dataset_dir, STATE_DIR, archive.file_name + MARKER_SUFFIX)


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
    DownloadError: HTTP 404 or another non-retryable status, retries
      exhausted, disk full or another local write error, or an unreadable
      archive (message names the URL or file).
    UnsafeArchiveError: an archive member was refused (names archive and
      member).
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
    os.makedirs(os.path.join(dataset_dir, STATE_DIR), exist_ok=True)
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
            _walk_files(dataset_dir, archive.image_dir))
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
  progress = _Progress(show_progress, num_workers, num_files, len(todo))
  fetcher = _Fetcher(base_url, max_retries, retry_backoff_s, timeout_s, stop,
                     progress)

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
      raise _local_error(e, dest + PART_SUFFIX) from None
    progress.file_done()
    with lock:
      fetched.append(url_path)
      bytes_downloaded += result.num_bytes
      if result.resumed:
        resumed.append(url_path)

  def unpack(archive: Archive) -> None:
    archive_path = os.path.join(dataset_dir, archive.file_name)
    try:
      members = unpack_archive(archive_path, dataset_dir, archive.image_dir,
                               stop)
      io_utils.write_json_atomic(
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
    io_utils.write_text_atomic(report, "".join(m + "\n" for m in missing))
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
            if first_error is None and not isinstance(error, _Cancelled):
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
    raise DownloadError("download stopped before it finished; rerun to "
                        "resume")


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


@errors.exit_on_input_error
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
