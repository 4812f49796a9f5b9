"""Safe unpacking of one FLAIR image archive (.tar.gz).

Members pass the standard library's `tarfile.data_filter` plus FLAIR's own
checks (no absolute names, no links, nothing outside the archive's image
directory); an archive is extracted into a staging directory and its files are
moved into place only once every member passed.
"""

import functools
import gzip
import os
import posixpath
import shutil
import tarfile
import threading
from typing import Optional
import zlib

from benchmark.core import constants
from benchmark.core import errors


class UnsafeArchiveError(errors.DownloadError):
  """An archive member would write outside its place (absolute path, `..`,
  link or device file); nothing of that archive was installed."""


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
    raise errors.DownloadStopped()
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


def walk_files(root: str, subdir: str) -> list[str]:
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
    errors.DownloadError: the archive is not a readable .tar.gz (it is
      deleted so that a rerun fetches it again).
    OSError: a local file operation failed.
  """
  stop = stop or threading.Event()
  archive_name = os.path.basename(archive_path)
  staging = os.path.join(dataset_dir, constants.DOWNLOAD_STATE_DIR,
                         "unpack-" + archive_name)
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
      raise errors.DownloadError(
          f"{archive_path} is not a readable .tar.gz archive ({e}); it was "
          "deleted, rerun to fetch it again") from None
    installed = walk_files(staging, image_dir)
    for rel in installed:
      target = os.path.join(dataset_dir, *rel.split("/"))
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.replace(os.path.join(staging, *rel.split("/")), target)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return sorted(installed)
