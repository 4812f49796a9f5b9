"""HTTP file transfer with resume, retries and progress bars.

`Fetcher.fetch` downloads one URL to `<dest>.part`, continuing an existing
partial file with an HTTP Range request, retrying transient failures with
exponential backoff, and renames it to `<dest>` once its size matches the size
the server announced. `Progress` draws the tqdm bars of a whole download.

A partial file is continued only when it is provably part of the file the
server has now. When a transfer starts, the response's validator (its strong
ETag, else its Last-Modified date when that is a strong validator: at least
a second older than the response's Date, RFC 9110 section 8.8.2.2) is kept
beside the partial file in `<dest>.part.validator` (JSON: `url`, `etag`,
`last_modified`, `length`). A resume sends it in `If-Range` (RFC 9110 section
13.1.5): a server whose file has changed ignores the range and sends the whole
new file, which replaces the partial one. A 206 reply whose own validator,
total length or start differs from what was kept is not trusted either, and
a partial file without a validator (the server sent none, or the process
died before it was written) is fetched again from its start.
"""

import dataclasses
import datetime
import email.utils
import http.client
import json
import os
import re
import threading
from typing import Optional
import urllib.error
import urllib.parse
import urllib.request

from absl import logging
import tqdm

from benchmark.core import errors

PART_SUFFIX = ".part"
# Beside `<dest>.part`: the validator of the transfer it holds.
VALIDATOR_SUFFIX = ".validator"

_CHUNK_BYTES = 1 << 20
_USER_AGENT = "flair-benchmark-downloader/0.1 (python urllib)"
# HTTP statuses worth retrying besides 5xx: request timeout, too many requests.
_RETRYABLE_4XX = (408, 429)
_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")
_UNSATISFIED_RANGE_RE = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$")


class _Transient(Exception):
  """A failure worth retrying (connection lost, 5xx...)."""

  def __init__(self, message: str, made_progress: bool = False):
    super().__init__(message)
    self.made_progress = made_progress


class Progress:
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
class FetchResult:
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


def _http_date(value: Optional[str]) -> Optional[datetime.datetime]:
  """An HTTP date header as an aware datetime; None if absent or malformed."""
  try:
    parsed = email.utils.parsedate_to_datetime(value) if value else None
  except (TypeError, ValueError):
    return None
  if parsed is not None and parsed.tzinfo is None:
    parsed = parsed.replace(tzinfo=datetime.timezone.utc)
  return parsed


def response_validator(url: str, headers, length: Optional[int]
                       ) -> Optional[dict]:
  """What a full (200) response lets a later request resume safely.

  Args:
    url: the URL requested.
    headers: the response's headers (`ETag`, `Last-Modified`, `Date`).
    length: the body length the response announced, or None.

  Returns:
    `{"url", "etag", "last_modified", "length"}`, where `etag` is a strong
    entity tag or None and `last_modified` the Last-Modified value when no
    strong ETag came and it is a strong validator (at least one second
    before the response's Date); None when neither is usable.
  """
  etag = headers.get("ETag")
  if etag is not None and (etag.startswith("W/") or not etag.startswith('"')):
    etag = None  # A weak tag must not be used for a range (RFC 9110 13.1.5).
  last_modified = None
  if etag is None:
    modified = _http_date(headers.get("Last-Modified"))
    date = _http_date(headers.get("Date"))
    if modified and date and (date - modified).total_seconds() >= 1:
      last_modified = headers.get("Last-Modified")
  if etag is None and last_modified is None:
    return None
  return {"url": url, "etag": etag, "last_modified": last_modified,
          "length": length}


def _validator_path(part: str) -> str:
  return part + VALIDATOR_SUFFIX


def _read_validator(part: str, url: str) -> Optional[dict]:
  """The validator kept for `part` when it is one for `url`, else None."""
  try:
    with open(_validator_path(part), encoding="utf-8") as f:
      kept = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(kept, dict) or kept.get("url") != url or not (
      isinstance(kept.get("etag"), str)
      or isinstance(kept.get("last_modified"), str)):
    return None
  return kept


def _keep_validator(part: str, validator: Optional[dict]) -> None:
  """Writes (or, for None, removes) the validator kept beside `part`
  (OSError when it cannot be written)."""
  if validator is None:
    try:
      os.remove(_validator_path(part))
    except FileNotFoundError:
      pass
    return
  with open(_validator_path(part), "w", encoding="utf-8") as f:
    json.dump(validator, f)


def _discard(part: str) -> None:
  """Removes a partial file and its validator (either may be missing)."""
  for path in (part, _validator_path(part)):
    try:
      os.remove(path)
    except FileNotFoundError:
      pass


def _same_file(kept: dict, headers, total: Optional[int]) -> bool:
  """Whether a range reply (its headers, the total length it gives) is of
  the file whose validator was `kept`: each validator the reply carries,
  and its total length, must equal the kept one."""
  if kept.get("etag") and headers.get("ETag") not in (None, kept["etag"]):
    return False
  if kept.get("last_modified") and headers.get("Last-Modified") not in (
      None, kept["last_modified"]):
    return False
  return kept.get("length") is None or total is None or (
      total == kept["length"])


class Fetcher:
  """Downloads single files to `<dest>.part`, then renames them to `<dest>`."""

  def __init__(self, base_url: str, max_retries: int, retry_backoff_s: float,
               timeout_s: float, stop: threading.Event, progress: Progress):
    self._base_url = base_url
    self._max_retries = max_retries
    self._retry_backoff_s = retry_backoff_s
    self._timeout_s = timeout_s
    self._stop = stop
    self._progress = progress

  def url(self, url_path: str) -> str:
    return urllib.parse.urljoin(self._base_url, url_path)

  def fetch(self, url_path: str, dest: str) -> FetchResult:
    """Downloads `url_path` to `dest`, resuming `dest + PART_SUFFIX`.

    Retries transient failures up to `max_retries` times in a row, waiting
    `retry_backoff_s * 2**k` seconds (capped at 60 s) before retry k; a
    failed attempt that still received bytes resets the count.

    Raises:
      errors.DownloadError: HTTP 404 or another non-retryable status, or retries
        exhausted (message names the URL).
      OSError: writing the local file failed (the caller names the file).
      errors.DownloadStopped: the stop event was set.
    """
    url = self.url(url_path)
    part = dest + PART_SUFFIX
    failures = 0
    received = 0
    resumed = False
    while True:
      if self._stop.is_set():
        raise errors.DownloadStopped()
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
          raise errors.DownloadError(
              f"{e}; gave up after {failures + 1} attempt(s) "
              f"(--max_retries={self._max_retries}); rerun to resume") from None
        delay = min(60.0, self._retry_backoff_s * 2**failures)
        failures += 1
        logging.warning("%s; retry %d of %d in %.2f s", e, failures,
                        self._max_retries, delay)
        if self._stop.wait(delay):
          raise errors.DownloadStopped() from None
    try:  # First: a complete file never keeps a validator.
      os.remove(_validator_path(part))
    except FileNotFoundError:
      pass
    os.replace(part, dest)
    return FetchResult(received, resumed)

  def _attempt(self, url: str, part: str, name: str):
    """One HTTP request. Returns (bytes received, used a Range, complete);
    not complete means "start the file again" (its partial file is gone)."""
    offset = _size_or_zero(part)
    kept = _read_validator(part, url) if offset > 0 else None
    if offset > 0 and kept is None:
      logging.info("%s: nothing proves that %s is part of the file served "
                   "now (no validator kept); fetching it from the start",
                   url, part)
      _discard(part)
      offset = 0
    headers = {"User-Agent": _USER_AGENT}
    if offset > 0:
      headers["Range"] = f"bytes={offset}-"
      headers["If-Range"] = kept["etag"] or kept["last_modified"]
    request = urllib.request.Request(url, headers=headers)
    try:
      response = urllib.request.urlopen(request, timeout=self._timeout_s)
    except urllib.error.HTTPError as e:
      e.close()
      return self._http_error(e, url, part, offset, kept)
    except (OSError, http.client.HTTPException) as e:
      # URLError (DNS, refused connection), timeouts, resets.
      reason = getattr(e, "reason", e)
      raise _Transient(f"cannot fetch {url}: {reason}") from None

    with response:
      body = self._body(response, url, part, offset, kept)
      if body is None:
        return 0, False, False
      total, used_range = body
      if not used_range:
        offset = 0
      bar, slot = self._progress.start_file(name, total, offset)
      try:
        with open(part, "ab" if used_range else "wb") as f:
          if not used_range:  # The partial file is empty now: then keep
            # the validator of the transfer it will hold.
            _keep_validator(part, response_validator(url, response.headers,
                                                     total))
          received = self._copy(response, f, bar, name, url, offset)
      finally:
        self._progress.end_file(bar, slot)
    size = offset + received
    if total is not None and size != total:
      if size > total:
        _discard(part)
        raise _Transient(f"{url} sent {size} bytes, more than the {total} "
                         "announced; starting again")
      raise _Transient(
          f"connection to {url} closed after {size} of {total} bytes",
          made_progress=received > 0)
    return received, used_range, True

  def _http_error(self, e: urllib.error.HTTPError, url: str, part: str,
                  offset: int, kept: Optional[dict]):
    """`_attempt`'s result for an HTTP error reply, or the error to raise."""
    if e.code == 416 and offset > 0:
      # Range not satisfiable: the partial file may already be complete.
      match = _UNSATISFIED_RANGE_RE.match(e.headers.get("Content-Range", ""))
      if match and int(match.group(1)) == offset and _same_file(
          kept, e.headers, offset):
        return 0, True, True
      _discard(part)
      return 0, False, False
    if e.code == 404:
      raise errors.DownloadError(
          f"not found (HTTP 404): {url}; check --data_url") from None
    if e.code >= 500 or e.code in _RETRYABLE_4XX:
      raise _Transient(f"HTTP {e.code} {e.reason} from {url}") from None
    raise errors.DownloadError(f"HTTP {e.code} {e.reason} from {url}") from None

  def _body(self, response, url: str, part: str, offset: int,
            kept: Optional[dict]) -> Optional[tuple[Optional[int], bool]]:
    """What a successful reply holds: `(total length or None, continues the
    partial file)`; None when it is a range that cannot be trusted to
    continue it (the partial file is then discarded)."""
    if response.status == 206 and offset > 0:
      parsed = _parse_content_range(response.headers.get("Content-Range"))
      if (parsed is None or parsed[0] != offset
          or not _same_file(kept, response.headers, parsed[1])):
        logging.warning("%s: the range sent is not the rest of the file "
                        "partly downloaded; starting it again", url)
        _discard(part)
        return None
      logging.debug("resuming %s at byte %d", url, offset)
      return parsed[1], True
    if offset > 0:
      logging.info("%s changed on the server since it was partly downloaded "
                   "(If-Range); fetching the whole new file", url)
    length = response.headers.get("Content-Length")
    return (int(length) if length and length.isdigit() else None), False

  def _copy(self, response, f, bar, name: str, url: str, offset: int) -> int:
    """Streams the body into `f` as it arrives (each piece flushed, so the
    `.part` file holds everything received even if the process is killed).
    Network errors become _Transient; write errors (OSError) propagate."""
    received = 0
    while True:
      if self._stop.is_set():
        raise errors.DownloadStopped()
      try:
        chunk = response.read1(_CHUNK_BYTES)
      except (OSError, http.client.HTTPException) as e:
        raise _Transient(
            f"connection to {url} lost after {offset + received} bytes: "
            f"{e!r}", made_progress=received > 0) from None
      if not chunk:
        return received
      if self._stop.is_set():
        raise errors.DownloadStopped()
      f.write(chunk)
      f.flush()
      received += len(chunk)
      self._progress.update(name, bar, len(chunk))
