"""A small local HTTP file server for the downloader tests.

Serves a directory tree on 127.0.0.1 (a free port) from a daemon thread,
honours single `Range: bytes=START-[END]` requests (206 / 416) and `If-Range`
(a range is served only when the validator sent is the file's current ETag
or Last-Modified; otherwise the whole file, 200), sends each file's strong
ETag (from its content) and Last-Modified (its mtime) unless told not to,
records every request (path, Range and If-Range headers, status), and
injects faults per path: a fixed status reply (404, 500...), a connection
dropped after N body bytes, a Content-Length announced short (and only that
much sent), for a given number of requests or for all of them. The server
stops on `stop()` / leaving the `with` block, and by itself after
`max_lifetime_s` at the latest.
"""

import dataclasses
import email.utils
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import socket
import tarfile
import threading
from typing import Optional
import urllib.parse

from benchmark.core import constants
from benchmark.prepare import download

_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclasses.dataclass
class Fault:
  """A misbehaviour for requests of one path.

  Attributes:
    status: reply with this HTTP status (and a short body) instead of the file.
    drop_after_bytes: announce the full body, send only this many bytes of it,
      then close the connection.
    stall_after_bytes: send this many bytes of the body, then pause for
      `stall_s` seconds (cut short when the server stops) before the rest.
    short_by_bytes: announce a Content-Length this many bytes short of the
      body and send only that many bytes (a complete-looking transfer of a
      truncated file).
    times: how many requests it applies to; None = every request.
  """
  status: Optional[int] = None
  drop_after_bytes: Optional[int] = None
  stall_after_bytes: Optional[int] = None
  stall_s: float = 0.0
  short_by_bytes: Optional[int] = None
  times: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Request:
  path: str  # URL path without the leading '/', e.g. "labels/x.json".
  range: Optional[str]  # The Range header, if any.
  status: int  # Status sent (or announced, for a dropped connection).
  if_range: Optional[str] = None  # The If-Range header, if any.


class FileServer:
  """Serves `root` over HTTP on 127.0.0.1; use as a context manager.

  Args:
    root: the directory served.
    max_lifetime_s: the server stops by itself after this long.
    validators: which validators replies carry: "etag", "last_modified".
    honour_if_range: evaluate If-Range; when False the server serves a
      range whatever If-Range says (as a server that does not know the
      header would).
  """

  def __init__(self, root: str, max_lifetime_s: float = 120.0,
               validators=("etag", "last_modified"),
               honour_if_range: bool = True):
    self.root = os.path.abspath(root)
    self.validators = tuple(validators)
    self.honour_if_range = honour_if_range
    self.requests: list[Request] = []
    self._faults: dict[str, Fault] = {}
    self._lock = threading.Lock()
    self._stopping = threading.Event()
    self._httpd = None
    self._thread = None
    self._timer = None
    self._max_lifetime_s = max_lifetime_s

  @property
  def url(self) -> str:
    host, port = self._httpd.server_address[:2]
    return f"http://{host}:{port}/"

  def set_fault(self, path: str, fault: Optional[Fault]) -> None:
    with self._lock:
      if fault is None:
        self._faults.pop(path, None)
      else:
        self._faults[path] = fault

  def count(self, path: str) -> int:
    """Number of requests received for `path`."""
    with self._lock:
      return sum(1 for r in self.requests if r.path == path)

  def requests_for(self, path: str) -> list[Request]:
    with self._lock:
      return [r for r in self.requests if r.path == path]

  def _take_fault(self, path: str) -> Optional[Fault]:
    with self._lock:
      fault = self._faults.get(path)
      if fault is None:
        return None
      if fault.times is not None:
        fault.times -= 1
        if fault.times <= 0:
          del self._faults[path]
      return fault

  def _record(self, path: str, range_header: Optional[str], status: int,
              if_range: Optional[str] = None):
    with self._lock:
      self.requests.append(Request(path, range_header, status, if_range))

  def validator_headers(self, local: str, data: bytes) -> dict[str, str]:
    """The ETag and Last-Modified headers of a file (those enabled)."""
    headers = {}
    if "etag" in self.validators:
      headers["ETag"] = '"' + hashlib.sha256(data).hexdigest()[:24] + '"'
    if "last_modified" in self.validators:
      headers["Last-Modified"] = email.utils.formatdate(
          os.path.getmtime(local), usegmt=True)
    return headers

  def range_applies(self, if_range: Optional[str],
                    validators: dict[str, str]) -> bool:
    """Whether a Range is served under this If-Range (RFC 9110 13.1.5:
    only when it equals the current strong ETag or Last-Modified)."""
    if if_range is None or not self.honour_if_range:
      return True
    if if_range.startswith(("W/", '"')):
      return (not if_range.startswith("W/")
              and if_range == validators.get("ETag"))
    return if_range == validators.get("Last-Modified")

  def start(self) -> "FileServer":
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      timeout = 10  # Socket timeout: a stuck client cannot hold a thread.

      def log_message(self, format, *args):  # pylint: disable=redefined-builtin
        del format, args  # Quiet.

      def _reply_status(self, path, range_header, status):
        server._record(path, range_header, status)
        body = f"status {status}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

      def do_GET(self):  # pylint: disable=invalid-name
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        path = path.lstrip("/")
        range_header = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        fault = server._take_fault(path)
        if fault is not None and fault.status is not None:
          self._reply_status(path, range_header, fault.status)
          return
        local = os.path.realpath(os.path.join(server.root, path))
        if (os.path.commonpath([local, server.root]) != server.root or
            not os.path.isfile(local)):
          self._reply_status(path, range_header, 404)
          return
        with open(local, "rb") as f:
          data = f.read()
        validators = server.validator_headers(local, data)
        size = len(data)
        start, end, status = 0, size - 1, 200
        match = _RANGE_RE.match(range_header.strip()) if range_header else None
        if match and server.range_applies(if_range, validators):
          start = int(match.group(1))
          end = min(int(match.group(2)), size - 1) if match.group(2) else (
              size - 1)
          if start >= size or start > end:
            server._record(path, range_header, 416, if_range)
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            for name, value in validators.items():
              self.send_header(name, value)
            self.end_headers()
            return
          status = 206
        body = data[start:end + 1]
        if fault is not None and fault.short_by_bytes is not None:
          body = body[:max(0, len(body) - fault.short_by_bytes)]
        server._record(path, range_header, status, if_range)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        for name, value in validators.items():
          self.send_header(name, value)
        if status == 206:
          self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if fault is not None and fault.drop_after_bytes is not None:
          self.wfile.write(body[:fault.drop_after_bytes])
          self.wfile.flush()
          self.close_connection = True
          self.connection.shutdown(socket.SHUT_RDWR)
          return
        if fault is not None and fault.stall_after_bytes is not None:
          self.wfile.write(body[:fault.stall_after_bytes])
          self.wfile.flush()
          server._stopping.wait(fault.stall_s)
          body = body[fault.stall_after_bytes:]
        self.wfile.write(body)

    class Server(http.server.ThreadingHTTPServer):
      daemon_threads = True

      def handle_error(self, request, client_address):
        del request, client_address  # Dropped connections are expected.

    self._httpd = Server(("127.0.0.1", 0), Handler)
    self._thread = threading.Thread(
        target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
        name="test-file-server", daemon=True)
    self._thread.start()
    httpd = self._httpd

    def expire():  # Stop serving by itself, however the test went.
      self._stopping.set()
      httpd.shutdown()

    self._timer = threading.Timer(self._max_lifetime_s, expire)
    self._timer.daemon = True
    self._timer.start()
    return self

  def stop(self) -> None:
    if self._httpd is None:
      return
    self._stopping.set()
    self._timer.cancel()
    self._httpd.shutdown()
    self._httpd.server_close()
    self._thread.join(timeout=10)
    self._httpd = None

  def __enter__(self) -> "FileServer":
    return self.start()

  def __exit__(self, *exc_info) -> None:
    self.stop()


# --- A FLAIR server tree ------------------------------------------------------

SMALL = [download.SMALL_ARCHIVE_URL_PATH.format(index=i)
         for i in range(download.NUM_ARCHIVES)]
RAW = [download.RAW_ARCHIVE_URL_PATH.format(index=i)
       for i in range(download.NUM_ARCHIVES)]
METADATA_URL, RELATIONSHIP_URL = [p for p, _ in download.LABEL_FILES]


def _write_archive(path, image_dir, files):
  """A .tar.gz with a directory entry `image_dir/` and `image_dir/<name>`
  members holding the bytes of `files` ({name: bytes})."""
  with tarfile.open(path, "w:gz") as tar:
    entry = tarfile.TarInfo(image_dir)
    entry.type, entry.mode = tarfile.DIRTYPE, 0o755
    tar.addfile(entry)
    for name, data in files.items():
      info = tarfile.TarInfo(f"{image_dir}/{name}")
      info.size, info.mode = len(data), 0o644
      tar.addfile(info, io.BytesIO(data))


def build_tree(source_dir, root):
  """Writes a FLAIR server tree under `root` from a dataset directory.

  Returns:
    {"images": {image_id: jpeg bytes}, "archive_of": {image_id: archive
    index}}.
  """
  with open(os.path.join(source_dir, constants.METADATA_FILE), "rb") as f:
    metadata = f.read()
  records = json.loads(metadata)
  ids = [str(r[constants.IMAGE_ID_KEY]) for r in records]
  images = {}
  for image_id in ids:
    with open(os.path.join(source_dir, constants.SMALL_IMAGES_DIR,
                           image_id + constants.IMAGE_EXTENSION), "rb") as f:
      images[image_id] = f.read()
  os.makedirs(os.path.join(root, "labels"))
  with open(os.path.join(root, METADATA_URL), "wb") as f:
    f.write(metadata)
  relationship = os.path.join(source_dir, constants.LABEL_RELATIONSHIP_FILE)
  if os.path.exists(relationship):
    shutil.copyfile(relationship, os.path.join(root, RELATIONSHIP_URL))
  else:  # The sample lacks it; a made-up mapping (not FLAIR's real one).
    pairs = sorted({(fine, r[constants.LABELS_KEY][0]) for r in records
                    for fine in r[constants.FINE_GRAINED_LABELS_KEY]})
    with open(os.path.join(root, RELATIONSHIP_URL), "w") as f:
      f.writelines(f"{fine} -> {coarse}\n" for fine, coarse in pairs)
  archive_of = {image_id: i % download.NUM_ARCHIVES
                for i, image_id in enumerate(ids)}
  for index in range(download.NUM_ARCHIVES):
    files = {i + constants.IMAGE_EXTENSION: images[i] for i in ids
             if archive_of[i] == index}
    for url_path, image_dir in ((SMALL[index], constants.SMALL_IMAGES_DIR),
                                (RAW[index], constants.RAW_IMAGES_DIR)):
      os.makedirs(os.path.dirname(os.path.join(root, url_path)), exist_ok=True)
      _write_archive(os.path.join(root, url_path), image_dir, files)
  return {"images": images, "archive_of": archive_of}


