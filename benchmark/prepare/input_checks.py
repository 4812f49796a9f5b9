"""Checks every metadata record and image of a source, and the output
location, before anything is written.

A record is checked by `formats.check_metadata_records` (malformed fields, an
unknown partition, a user in two partitions, a repeated image id), then here:
its coarse labels must be FLAIR's (`constants.COARSE_LABELS`), its
fine-grained labels those of the source's `label_relationship.txt` when it
has one, and its user id must fit in a file name (`MAX_USER_ID_BYTES`). Its
image must exist and be a 256x256 JPEG that Pillow decodes completely (every
pixel is decoded, so a truncated or corrupt JPEG is found here and not at
training time). All problems are collected, in record order; `BadInputError`
carries them all.

`check_output_dir` and `check_output_file` refuse an output flag that names
something of the wrong kind (a file for a directory, a directory for a file)
with one line naming the flag.
"""

import collections
import dataclasses
import hashlib
import io
import os
import sys
from typing import Any, Iterable, Optional, Sequence, TextIO

from benchmark.core import constants
from benchmark.core import errors
from benchmark.data import formats
from benchmark.prepare import pool as pool_lib

# One bad input item (a record or an image): `formats.Problem`.
Problem = formats.Problem

# The first bytes of every JPEG file (SOI marker followed by a marker's 0xFF),
# ITU-T T.81 Annex B.
_JPEG_MAGIC = b"\xff\xd8\xff"
# Records checked per task of the pool.
_CHECK_CHUNK_SIZE = 256
# How many problems the one-line error message lists (the log lists all).
PROBLEMS_IN_MESSAGE = 5
# The longest file name most file systems allow (NAME_MAX of ext4, XFS,
# btrfs, tmpfs, APFS), in bytes.
NAME_MAX_BYTES = 255
# What `file_io.atomic_path` adds to a file's name for its temporary file:
# "." before it, then "." + 8 random characters (`tempfile.mkstemp`) + ".tmp"
# after it.
_TEMPORARY_NAME_EXTRA_BYTES = len(".") + len(".") + 8 + len(".tmp")
# The longest user id (UTF-8 bytes) whose files can be written: prepare
# writes `<user_id>.tfrecords` under its temporary name first.
MAX_USER_ID_BYTES = (NAME_MAX_BYTES - len(constants.TFRECORD_SUFFIX)
                     - _TEMPORARY_NAME_EXTRA_BYTES)


class BadInputError(errors.FlairInputError):
  """Bad records or images; `problems` lists every one found."""

  def __init__(self, message: str, problems: Sequence[Problem]):
    super().__init__(message)
    self.problems = list(problems)


@dataclasses.dataclass(frozen=True)
class CheckedRecord(formats.MetadataRecord):
  """A record whose image passed the checks.

  Attributes:
    image_sha256: hex sha256 digest of the image file's bytes.
  """
  image_sha256: Optional[str] = None


def bad_input_error(problems: Sequence[Problem], source_name: str,
                    advice: str = "") -> BadInputError:
  """The one-line error listing the first `PROBLEMS_IN_MESSAGE` problems.

  Args:
    problems: every problem found (non-empty); kept in the error.
    source_name: the input as named in messages (`source.name`).
    advice: text appended to the message (e.g. how to skip the records).
  """
  shown = "; ".join(p.describe() for p in problems[:PROBLEMS_IN_MESSAGE])
  more = len(problems) - PROBLEMS_IN_MESSAGE
  return BadInputError(
      f"{len(problems)} problem(s) in {source_name} / its images, nothing "
      f"written: {shown}" + (f"; and {more} more" if more > 0 else "")
      + advice, problems)


def print_problems(problems: Sequence[Problem],
                   file: Optional[TextIO] = None) -> None:
  """Prints `N problem(s) found:` and one indented line per problem to
  `file` (default stderr)."""
  file = file or sys.stderr
  print(f"{len(problems)} problem(s) found:", file=file)
  for problem in problems:
    print(f"  {problem.describe()}", file=file)


def _check_image(key: Any) -> tuple[Optional[str], Optional[str]]:
  """Reads (from `pool_lib.source()`) and fully decodes one image.

  Returns:
    `(problem, sha256)`: problem is None if image `key` is a 256x256 JPEG that
    Pillow decodes completely (a truncated or corrupt file fails here, not at
    training time), else what is wrong; sha256 is the hex digest of the
    file's bytes (None when it cannot be read).
  """
  source = pool_lib.source()
  path = source.describe_image(key)
  try:
    content = source.read_image(key)
  except FileNotFoundError:
    return f"image {path} not found", None
  except OSError as e:
    return f"image {path} cannot be read: {e}", None
  digest = hashlib.sha256(content).hexdigest()
  head = content[:len(_JPEG_MAGIC)]
  if head != _JPEG_MAGIC:
    return (f"image {path} is not a JPEG (its first bytes are "
            f"{head!r}, expected {_JPEG_MAGIC!r})"), digest
  return _decode_problem(path, content), digest


def _decode_problem(path: str, content: bytes) -> Optional[str]:
  """What keeps `content` (starting like a JPEG) from being a 256x256 JPEG
  that Pillow decodes completely, or None."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  # Pillow raises several types (UnidentifiedImageError, OSError,
  # SyntaxError, ...) for a corrupt file.
  try:
    image = Image.open(io.BytesIO(content))
  except Exception as e:  # pylint: disable=broad-except
    return f"image {path} cannot be opened as an image: {e}"
  with image:
    image_format, size = image.format, image.size
    try:
      image.load()  # Decodes every pixel: truncated or corrupt data fails.
    except Exception as e:  # pylint: disable=broad-except
      return (f"image {path} cannot be decoded (truncated or corrupt "
              f"image data): {e}")
  if image_format != "JPEG":
    return f"image {path} is a {image_format} image, expected JPEG"
  expected = (constants.IMAGE_SIZE, constants.IMAGE_SIZE)
  if size != expected:
    return (f"image {path} is {size[0]}x{size[1]} pixels, expected "
            f"{expected[0]}x{expected[1]} (FLAIR's small images)")
  return None


def _check_images(keys: Sequence[Any]
                  ) -> list[tuple[Optional[str], Optional[str]]]:
  """Pool task: `_check_image` for each image key."""
  return [_check_image(key) for key in keys]


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
  for start in range(0, len(items), size):
    yield items[start:start + size]


def _image_results(keys: Sequence[Any], pool, show_progress: bool
                   ) -> list[tuple[Optional[str], Optional[str]]]:
  """`_check_image` of every key, in key order, on `pool` (None: here)."""
  chunks = list(_chunks(keys, _CHECK_CHUNK_SIZE))
  if pool is None:
    results = map(_check_images, chunks)
  else:
    results = pool.imap(_check_images, chunks)
  image_results = []
  bar = pool_lib.progress(None, show_progress, total=len(keys),
                          desc="checking images", unit="image")
  for chunk_result in results:
    image_results += chunk_result
    if bar is not None:
      bar.update(len(chunk_result))
  if bar is not None:
    bar.close()
  return image_results


def _label_problems(record: formats.MetadataRecord,
                    relationship: Optional[tuple[str, dict]]) -> list[str]:
  """What is wrong with a record's labels: coarse labels not among FLAIR's,
  fine-grained ones not in `relationship` (`(path, {fine: coarse labels})`,
  when the source has one)."""
  problems = []
  unknown = sorted(set(record.labels) - set(constants.COARSE_LABELS))
  if unknown:
    problems.append(
        f"{constants.LABELS_KEY} {unknown} not among FLAIR's "
        f"{len(constants.COARSE_LABELS)} coarse labels "
        f"({', '.join(constants.COARSE_LABELS)})")
  if relationship is not None:
    path, fine_to_coarse = relationship
    unknown = sorted(set(record.fine_grained_labels) - set(fine_to_coarse))
    if unknown:
      problems.append(f"{constants.FINE_GRAINED_LABELS_KEY} {unknown} not in "
                      f"{path}")
  return problems


def _user_id_problem(user_id: str) -> Optional[str]:
  """Why `user_id` cannot name the user's files, or None."""
  size = len(user_id.encode("utf-8", "surrogatepass"))
  if size <= MAX_USER_ID_BYTES:
    return None
  return (f"{constants.USER_ID_KEY} is {size} bytes long (UTF-8), more than "
          f"the {MAX_USER_ID_BYTES} that fit in a file name (prepare writes "
          f"<user_id>{constants.TFRECORD_SUFFIX}, first under a temporary "
          f"name {_TEMPORARY_NAME_EXTRA_BYTES} bytes longer; a file name holds "
          f"at most {NAME_MAX_BYTES} bytes)")


def _record_problems(records: Sequence[formats.MetadataRecord],
                     relationship: Optional[tuple[str, dict]]
                     ) -> list[Problem]:
  """The problems of each record's labels and user id, in record order."""
  problems = []
  for record in records:
    messages = _label_problems(record, relationship)
    user_problem = _user_id_problem(record.user_id)
    if user_problem is not None:
      messages.append(user_problem)
    problems += [Problem(m, record.index, record.image_id, record.user_id)
                 for m in messages]
  return problems


def check_records(source, raw_records: list[Any], pool, show_progress: bool
                  ) -> tuple[list[CheckedRecord], list[Problem]]:
  """Checks every record of `raw_records` and its image.

  Args:
    source: the `sources` source the records came from; it must be this
      process's source (`pool_lib.start`), and the pool's.
    raw_records: `source.load_records()`.
    pool: the pool that checks the images (`pool_lib.start`), or None to
      check them in this process.
    show_progress: show a tqdm progress bar.

  Returns:
    `(records, problems)`: the good records in input order, and every
    problem found, in record order (a record may have several).

  Raises:
    FlairInputError: the source's label_relationship.txt is truncated or
      malformed (`source.label_relationship`).
  """
  relationship = source.label_relationship()
  parsed, record_problems = formats.check_metadata_records(raw_records)
  record_problems += _record_problems(parsed, relationship)
  problems_by_record: dict[int, list[Problem]] = collections.defaultdict(list)
  for p in record_problems:
    problems_by_record[p.record_index].append(p)
  candidates = [r for r in parsed if r.index not in problems_by_record]

  keys = [source.image_key(r.index, r.image_id) for r in candidates]
  image_results = _image_results(keys, pool, show_progress)
  good = []
  for record, (message, digest) in zip(candidates, image_results):
    if message is None:
      good.append(CheckedRecord(**dataclasses.asdict(record),
                                image_sha256=digest))
    else:
      problems_by_record[record.index].append(
          Problem(message, record.index, record.image_id, record.user_id))
  all_problems = [p for index in sorted(problems_by_record)
                  for p in problems_by_record[index]]
  return good, all_problems


def check_input(source, show_progress: bool = False
                ) -> tuple[list[CheckedRecord], list[Problem]]:
  """Every record and image of a source checked, in this process, as
  prepare checks them (for other writers of the same data, e.g. the pfl
  HDF5 export).

  Args:
    source: a `sources` source.
    show_progress: show a tqdm progress bar.

  Returns:
    `(records, problems)`: the good records in input order (fields
    `index`, `user_id`, `image_id`, `labels`, `fine_grained_labels`,
    `partition`, `image_sha256`), and every problem found.

  Raises:
    FlairInputError: as `source.load_records`.
  """
  raw_records = source.load_records()
  pool_lib.start(1, source)
  try:
    return check_records(source, raw_records, None, show_progress)
  finally:
    pool_lib.stop(None)


def _blocking_file(path: str) -> Optional[str]:
  """The existing file (not a directory) at `path` or above it that keeps
  `path` from being created, or None."""
  path = os.path.abspath(path)
  while not os.path.lexists(path):
    parent = os.path.dirname(path)
    if parent == path:
      return None
    path = parent
  return None if os.path.isdir(path) else path


def check_output_dir(path: Optional[str], flag: str) -> None:
  """Checks that `path` names a directory or a place to create one.

  Raises:
    FlairInputError: `path` is empty, or it or a directory above it is an
      existing file (one line naming `flag`); nothing is created.
  """
  if not path:
    raise errors.FlairInputError(f"{flag} must name a directory")
  blocking = _blocking_file(path)
  if blocking is not None:
    where = ("it" if blocking == os.path.abspath(path) else blocking)
    raise errors.FlairInputError(
        f"{flag} {path!r} must be a directory (created if missing), but "
        f"{where} is an existing file")


def check_output_file(path: Optional[str], flag: str) -> None:
  """Checks that `path` names a file that can be created or replaced.

  Raises:
    FlairInputError: `path` is empty, an existing directory, or a directory
      above it is an existing file (one line naming `flag`).
  """
  if not path:
    raise errors.FlairInputError(f"{flag} must name a file")
  if os.path.isdir(path):
    raise errors.FlairInputError(
        f"{flag} {path!r} is an existing directory; name the file to write")
  blocking = _blocking_file(os.path.dirname(os.path.abspath(path)))
  if blocking is not None:
    raise errors.FlairInputError(
        f"{flag} {path!r}: {blocking} is an existing file, not a directory")
