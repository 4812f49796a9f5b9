"""Converts a FLAIR dataset into per-user TFRecords.

  python prepare_tfrecords.py --dataset_dir D --tfrecords_dir T \
      [--num_workers N] [--skip_bad_images] [--report_path P]
  python prepare_tfrecords.py --hf_dataset H --tfrecords_dir T ...
  python prepare_tfrecords.py --pfl_hdf5 F --tfrecords_dir T ...

Reads `D/labels_and_metadata.json` and `D/small_images/<image_id>.jpg` (or
the same records and images from a local Hugging Face `apple/flair` copy, or
from pfl-research's HDF5: `benchmark.sources`) and writes, in the format of
docs/formats.md ("Per-user TFRecords"):

* `T/<partition>/<user_id>.tfrecords`: one `tf.train.Example` per image of the
  user (in metadata order) with `image/encoded_jpeg` (the JPEG file's bytes,
  unchanged), `labels` and `fine_grained_labels` (int64 label indices);
* `T/label_index.json`: `{"labels": {name: index}, "fine_grained_labels":
  {name: index}}`, indices in sorted label order over the labels found in the
  metadata (of the records that are written).

Steps:
1. Every record and image is checked before anything is written: malformed
   JSON, a record that is not an object or misses a field, a field of the
   wrong type, an unknown partition (`dev` is read as `val`), a user in two
   partitions, a repeated image id, a missing image, a file that is not a
   256x256 JPEG that Pillow decodes completely (every image is decoded, in
   the worker processes, so a truncated or corrupt JPEG is found here and not
   at training time). All problems are collected; by default the run stops
   with the full list (exit status 1). With `--skip_bad_images` the records
   with problems are skipped and listed, with the reason, in a JSON report
   (default `T/skipped_images.json`; a run without the flag removes a report
   left there). Nothing is dropped silently.
2. Users are written in parallel by a process pool (`--num_workers`, default
   all cores), one whole file per task, each to a temporary name and then
   renamed (`file_io.atomic_path`): a final `<user_id>.tfrecords` is always
   complete.
3. `T/prepare_manifest.jsonl` records what each user file was built from
   (one JSON line per file: the label index digest, the writer options and a
   digest of the user's records with the sha256 of each image). A rerun keeps
   a user file only when all three are unchanged; any other file is written
   again (the summary counts them by reason), and user files of users no
   longer in the output are removed. So an interrupted run resumes, and a
   rerun after the inputs changed (an image restored after
   `--skip_bad_images`, edited metadata) ends equal to a fresh run. While
   files are (re)written the directory holds no label index, and each file
   finished is appended to the manifest at once; stale temporary files of an
   interrupted run are removed.
4. `label_index.json` is written last, then a summary of users and images
   per partition.

A full disk, a read-only output or a permission error ends the run with one
line naming the file (`errors.OutputWriteError`); nothing partial is left
under a final name and the rerun completes it.

TensorFlow is imported only by the processes that write (about 12 s each).
"""

import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
from typing import Any, Iterable, Optional, Sequence

from absl import app
from absl import flags
from absl import logging

from benchmark.cli import commands
from benchmark.core import constants
from benchmark.core import errors
from benchmark.core import file_io
from benchmark.data import formats
from benchmark.prepare import sources

# Report of the skipped records, written in the tfrecords directory by default.
SKIPPED_IMAGES_REPORT_FILE = "skipped_images.json"
# What each user file was built from (one JSON object per line); see
# `prepare`.
MANIFEST_FILE = "prepare_manifest.jsonl"
# The options a user file's bytes depend on; a change rebuilds every file.
# Bump "format" when the writer changes what it writes.
WRITER_OPTIONS = {"format": 1, "images": constants.SMALL_IMAGES_DIR}
# Why a user file found on disk is written again (summary and log).
REBUILD_NO_ENTRY = "not in the manifest (written by an earlier version or an interrupted run)"
REBUILD_LABEL_INDEX = "label index changed"
REBUILD_OPTIONS = "writer options changed"
REBUILD_RECORDS = "the user's records or images changed"
# The first bytes of every JPEG file (SOI marker followed by a marker's 0xFF),
# ITU-T T.81 Annex B.
_JPEG_MAGIC = b"\xff\xd8\xff"
# Records checked per task of the pool.
_CHECK_CHUNK_SIZE = 256
# How many problems the one-line error message lists (the log lists all).
_PROBLEMS_IN_MESSAGE = 5
# Temporary files of file_io.atomic_path for a "<name>.tfrecords" target.
_TEMP_FILE_PATTERN = re.compile(
    r"^\..+" + re.escape(constants.TFRECORD_SUFFIX) + r"\..+\.tmp$")


# One bad input item (a record or an image): `formats.Problem`.
Problem = formats.Problem


class BadInputError(errors.FlairInputError):
  """Bad records or images; `problems` lists every one found."""

  def __init__(self, message: str, problems: Sequence[Problem]):
    super().__init__(message)
    self.problems = list(problems)


@dataclasses.dataclass(frozen=True)
class PrepareSummary:
  """What `prepare` wrote.

  Attributes:
    tfrecords_dir: the output directory.
    users: users per partition (all files of the partition, including those
      found complete from an earlier run).
    images: images per partition, likewise.
    users_written: user files written by this run (new and rebuilt).
    users_already_complete: user files found complete, built from the same
      records, images, label index and options, and kept (resume).
    users_rebuilt: of `users_written`, files that existed but were built
      from other inputs, by reason (the `REBUILD_*` texts).
    files_removed: user files of an earlier run removed because their user
      is no longer in the output (skipped now, moved partition, or gone from
      the metadata).
    skipped: the records skipped with `skip_bad_images` (empty otherwise).
    report_path: the skip report written, or None.
    label_index_path: path of label_index.json.
  """
  tfrecords_dir: str
  users: dict[str, int]
  images: dict[str, int]
  users_written: int
  users_already_complete: int
  skipped: tuple[Problem, ...]
  report_path: Optional[str]
  label_index_path: str
  users_rebuilt: dict[str, int] = dataclasses.field(default_factory=dict)
  files_removed: int = 0

  def describe(self) -> str:
    """A multi-line human-readable summary."""
    lines = [f"prepared {self.tfrecords_dir}:"]
    for partition in constants.PARTITIONS:
      lines.append(f"  {partition:5s}: {self.users[partition]:7d} users, "
                   f"{self.images[partition]:8d} images")
    lines.append(f"  total: {sum(self.users.values()):7d} users, "
                 f"{sum(self.images.values()):8d} images "
                 f"({self.users_written} user files written now, "
                 f"{self.users_already_complete} already complete)")
    if self.users_rebuilt:
      lines.append(
          f"  rebuilt {sum(self.users_rebuilt.values())} user files found "
          "from an earlier run: " + "; ".join(
              f"{n} {reason}" for reason, n in sorted(
                  self.users_rebuilt.items())))
    if self.files_removed:
      lines.append(f"  removed {self.files_removed} user files of an earlier "
                   "run whose user is not in this output")
    if self.report_path is not None:
      lines.append(f"  skipped {len(self.skipped)} bad records; list in "
                   f"{self.report_path}")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class _Record(formats.MetadataRecord):
  image_sha256: Optional[str] = None  # Set once the image is checked.


# --- Checking ------------------------------------------------------------------


def _check_image(key: Any) -> tuple[Optional[str], Optional[str]]:
  """Reads (from the source set by `_worker_init`) and fully decodes one
  image.

  Returns:
    `(problem, sha256)`: problem is None if image `key` is a 256x256 JPEG that
    Pillow decodes completely (a truncated or corrupt file fails here, not at
    training time), else what is wrong; sha256 is the hex digest of the
    file's bytes (None when it cannot be read).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  path = _source.describe_image(key)
  try:
    content = _source.read_image(key)
  except FileNotFoundError:
    return f"image {path} not found", None
  except OSError as e:
    return f"image {path} cannot be read: {e}", None
  digest = hashlib.sha256(content).hexdigest()
  head = content[:len(_JPEG_MAGIC)]
  if head != _JPEG_MAGIC:
    return (f"image {path} is not a JPEG (its first bytes are "
            f"{head!r}, expected {_JPEG_MAGIC!r})"), digest
  # Pillow raises several types (UnidentifiedImageError, OSError,
  # SyntaxError, ...) for a corrupt file.
  try:
    image = Image.open(io.BytesIO(content))
  except Exception as e:  # pylint: disable=broad-except
    return f"image {path} cannot be opened as an image: {e}", digest
  with image:
    image_format, size = image.format, image.size
    try:
      image.load()  # Decodes every pixel: truncated or corrupt data fails.
    except Exception as e:  # pylint: disable=broad-except
      return (f"image {path} cannot be decoded (truncated or corrupt "
              f"image data): {e}"), digest
  if image_format != "JPEG":
    return (f"image {path} is a {image_format} image, expected JPEG",
            digest)
  expected = (constants.IMAGE_SIZE, constants.IMAGE_SIZE)
  if size != expected:
    return (f"image {path} is {size[0]}x{size[1]} pixels, expected "
            f"{expected[0]}x{expected[1]} (FLAIR's small images)"), digest
  return None, digest


def _check_images(keys: Sequence[Any]
                  ) -> list[tuple[Optional[str], Optional[str]]]:
  """Pool task: `_check_image` for each image key."""
  return [_check_image(key) for key in keys]


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
  for start in range(0, len(items), size):
    yield items[start:start + size]


def _progress(iterable, show: bool, **kwargs):
  """A tqdm bar over `iterable` if `show`, else `iterable` itself."""
  if not show:
    return iterable
  import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(iterable, **kwargs)


def _check_records(source, raw_records: list[Any], pool,
                   show_progress: bool) -> tuple[list[_Record], list[Problem]]:
  """All records checked: (good records, problems in record order)."""
  candidates, record_problems = formats.check_metadata_records(raw_records)
  problems_by_record: dict[int, list[Problem]] = collections.defaultdict(list)
  for p in record_problems:
    problems_by_record[p.record_index].append(p)

  paths = [source.image_key(r.index, r.image_id) for r in candidates]
  chunks = list(_chunks(paths, _CHECK_CHUNK_SIZE))
  if pool is None:
    results = map(_check_images, chunks)
  else:
    results = pool.imap(_check_images, chunks)
  image_problems = []
  bar = _progress(None, show_progress, total=len(paths),
                  desc="checking images", unit="image")
  for chunk_result in results:
    image_problems += chunk_result
    if bar is not None:
      bar.update(len(chunk_result))
  if bar is not None:
    bar.close()
  good = []
  for record, (message, digest) in zip(candidates, image_problems):
    if message is None:
      good.append(_Record(**dataclasses.asdict(record), image_sha256=digest))
    else:
      problems_by_record[record.index].append(
          Problem(message, record.index, record.image_id, record.user_id))
  all_problems = [p for index in sorted(problems_by_record)
                  for p in problems_by_record[index]]
  return good, all_problems


def check_input(source, show_progress: bool = False
                ) -> tuple[list[_Record], list[Problem]]:
  """Every record and image of a source checked, in this process, as
  `prepare` checks them (for other writers of the same data, e.g.
  export_pfl_hdf5.py).

  Args:
    source: a `benchmark.sources` source.
    show_progress: show a tqdm progress bar.

  Returns:
    `(records, problems)`: the good records in input order (fields
    `index`, `user_id`, `image_id`, `labels`, `fine_grained_labels`,
    `partition`, `image_sha256`), and every problem found.

  Raises:
    FlairInputError: as `source.load_records`.
  """
  raw_records = source.load_records()
  _set_source(source)
  try:
    return _check_records(source, raw_records, None, show_progress)
  finally:
    _set_source(None)


# --- Writing -------------------------------------------------------------------

_tf = None
# The input (a `benchmark.sources` source) that `_check_image` and
# `_write_user` read images from, in this process.
_source = None


def _set_source(source) -> None:
  global _source
  _source = source


def _worker_init(source) -> None:
  # Silence TensorFlow's C++ start-up messages (GPU plugin registration noise
  # that TF prints at level ERROR) in the writer processes; a failure still
  # reaches the parent as a Python exception.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  _set_source(source)


def _tensorflow():
  global _tf
  if _tf is None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    _tf = tf
  return _tf


def _write_user(
    task: tuple[str, str, list[tuple[Any, list[int], list[int]]]]) -> str:
  """Pool task: writes one user's file atomically; returns its relative path.

  Args:
    task: (final path, path relative to the output directory, [(image key
      in the source set by `_worker_init`, label indices, fine label
      indices)]).

  Raises:
    errors.OutputWriteError: the output disk is full, read-only or not
      permitted (names the file; nothing left under its name).
  """
  tf = _tensorflow()
  path, relative, examples = task
  with file_io.atomic_path(path, flag="--tfrecords_dir") as tmp:
    with tf.io.TFRecordWriter(tmp) as writer:
      for image_key, labels, fine_labels in examples:
        jpeg = _source.read_image(image_key)
        writer.write(formats.encode_example(jpeg, labels, fine_labels))
  return relative


def _remove_stale_temp_files(tfrecords_dir: str) -> int:
  """Removes temporary files an interrupted run left; returns their count."""
  removed = 0
  for partition in constants.PARTITIONS:
    directory = os.path.join(tfrecords_dir, partition)
    if not os.path.isdir(directory):
      continue
    for name in os.listdir(directory):
      if _TEMP_FILE_PATTERN.match(name):
        os.remove(os.path.join(directory, name))
        removed += 1
  return removed


def _digest(obj: Any) -> str:
  """sha256 hex digest of `obj` as canonical JSON."""
  return hashlib.sha256(json.dumps(
      obj, sort_keys=True, ensure_ascii=False,
      separators=(",", ":")).encode("utf-8")).hexdigest()


def _manifest_entry(relative_path: str, label_index_digest: str,
                    user_records: Sequence[_Record]) -> dict[str, Any]:
  """What one user file is built from: its label index, the writer options
  and every record written (ids, labels, the image's sha256)."""
  return {
      "file": relative_path,
      "label_index_sha256": label_index_digest,
      "options": WRITER_OPTIONS,
      "records_sha256": _digest([
          [r.user_id, r.partition, r.image_id, list(r.labels),
           list(r.fine_grained_labels), r.image_sha256]
          for r in user_records]),
  }


def _manifest_line(entry: dict[str, Any]) -> str:
  return json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"


def _read_manifest(path: str) -> dict[str, dict[str, Any]]:
  """{relative file: entry} of a manifest; the last line for a file wins; a
  line that does not parse (cut by a kill) is ignored."""
  entries = {}
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.readlines()
  except FileNotFoundError:
    return entries
  for line in lines:
    try:
      entry = json.loads(line)
      entries[entry["file"]] = entry
    except (ValueError, TypeError, KeyError):
      continue
  return entries


def _write_manifest(path: str, entries: Iterable[dict[str, Any]]) -> None:
  file_io.write_text_atomic(
      path, "".join(_manifest_line(e) for e in
                    sorted(entries, key=lambda e: e["file"])),
      flag="--tfrecords_dir")


def _rebuild_reason(old: Optional[dict[str, Any]],
                    new: dict[str, Any]) -> Optional[str]:
  """Why an existing user file must be written again, or None to keep it."""
  if old is None:
    return REBUILD_NO_ENTRY
  if old.get("label_index_sha256") != new["label_index_sha256"]:
    return REBUILD_LABEL_INDEX
  if old.get("options") != new["options"]:
    return REBUILD_OPTIONS
  if old.get("records_sha256") != new["records_sha256"]:
    return REBUILD_RECORDS
  return None


def _existing_user_files(tfrecords_dir: str) -> set[str]:
  """Relative paths `<partition>/<name>.tfrecords` present now."""
  found = set()
  for partition in constants.PARTITIONS:
    directory = os.path.join(tfrecords_dir, partition)
    if os.path.isdir(directory):
      found.update(f"{partition}/{name}" for name in os.listdir(directory)
                   if name.endswith(constants.TFRECORD_SUFFIX)
                   and not name.startswith("."))
  return found


def default_num_workers() -> int:
  """The number of CPU cores this process may use."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not Linux.
    return os.cpu_count() or 1


def prepare(dataset_dir: Optional[str], tfrecords_dir: str,
            num_workers: Optional[int] = None, skip_bad_images: bool = False,
            show_progress: bool = True,
            report_path: Optional[str] = None,
            hf_dataset: Optional[str] = None,
            pfl_hdf5: Optional[str] = None) -> PrepareSummary:
  """Writes per-user TFRecords and label_index.json (see the module doc).

  The input is exactly one of `dataset_dir`, `hf_dataset` and `pfl_hdf5`
  (`benchmark.sources`); the same images and labels give the same bytes
  from each.

  Args:
    dataset_dir: a FLAIR dataset directory (labels_and_metadata.json and
      small_images/), or None.
    tfrecords_dir: output directory; created if needed. Users whose final
      file already exists there are skipped (resume).
    num_workers: processes that check and write; None = all cores. With 1,
      everything runs in this process.
    skip_bad_images: skip records with problems (listed in the report)
      instead of failing.
    show_progress: show tqdm progress bars.
    report_path: where the skip report goes with `skip_bad_images`; default
      `<tfrecords_dir>/skipped_images.json`.
    hf_dataset: a local copy of Hugging Face `apple/flair` (parquet shards
      or a `save_to_disk` directory), or None.
    pfl_hdf5: pfl-research's FLAIR HDF5 file, or None.

  Returns:
    A `PrepareSummary`.

  Raises:
    FlairInputError: a bad argument, not exactly one input, a missing
      dataset directory or metadata file, malformed JSON, an input not in
      its expected layout, or no usable record.
    BadInputError (a FlairInputError): bad records or images without
      `skip_bad_images`; its `problems` lists all of them.
  """
  if num_workers is None:
    num_workers = default_num_workers()
  if isinstance(num_workers, bool) or not isinstance(num_workers, int) or (
      num_workers < 1):
    raise errors.FlairInputError(
        f"--num_workers must be a positive integer, got {num_workers!r}")
  source = sources.open_source(dataset_dir, hf_dataset, pfl_hdf5)
  raw_records = source.load_records()
  metadata_path = source.name
  _set_source(source)

  pool = None
  try:
    if num_workers > 1:
      # "spawn": the parent may have imported TensorFlow (tests, notebooks),
      # and forking a process with TF's threads is unsafe.
      pool = multiprocessing.get_context("spawn").Pool(
          num_workers, initializer=_worker_init, initargs=(source,))
    records, problems = _check_records(source, raw_records, pool,
                                       show_progress)
    if problems and not skip_bad_images:
      shown = "; ".join(p.describe() for p in problems[:_PROBLEMS_IN_MESSAGE])
      more = len(problems) - _PROBLEMS_IN_MESSAGE
      raise BadInputError(
          f"{len(problems)} problem(s) in {metadata_path} / its images, "
          f"nothing written: {shown}"
          + (f"; and {more} more" if more > 0 else "")
          + " (rerun with --skip_bad_images to skip these records)",
          problems)
    if not records:
      raise errors.FlairInputError(
          f"no usable record in {metadata_path} (all "
          f"{len(raw_records)} have problems, see the report)")

    written_report = None
    if skip_bad_images:
      written_report = report_path or os.path.join(
          tfrecords_dir, SKIPPED_IMAGES_REPORT_FILE)
      file_io.write_json_atomic(written_report, {
          "dataset_dir": source.path,
          "num_records": len(raw_records),
          "num_skipped_records": len({p.record_index for p in problems}),
          "skipped": [p.to_json() for p in problems],
      }, flag="--report_path" if report_path else "--tfrecords_dir")
      if problems:
        logging.warning("skipping %d bad record(s); list in %s",
                        len({p.record_index for p in problems}),
                        written_report)
    else:
      # A report of an earlier --skip_bad_images run no longer describes
      # this output.
      # (Looked up first: on a read-only file system, removing even a
      # missing file fails.)
      old_report = os.path.join(tfrecords_dir, SKIPPED_IMAGES_REPORT_FILE)
      if os.path.lexists(old_report):
        with file_io.output_errors(old_report, flag="--tfrecords_dir",
                                    exact=True):
          os.remove(old_report)

    label_index = formats.build_label_index(
        (r.labels, r.fine_grained_labels) for r in records)

    # Group by user (a user's records need not be adjacent), metadata order.
    by_user: dict[str, list[_Record]] = collections.defaultdict(list)
    for record in records:
      by_user[record.user_id].append(record)
    with file_io.output_errors(tfrecords_dir, flag="--tfrecords_dir"):
      os.makedirs(tfrecords_dir, exist_ok=True)
      removed = _remove_stale_temp_files(tfrecords_dir)
    if removed:
      logging.info("removed %d temporary file(s) of an interrupted run",
                   removed)
    manifest_path = os.path.join(tfrecords_dir, MANIFEST_FILE)
    old_manifest = _read_manifest(manifest_path)
    existing = _existing_user_files(tfrecords_dir)
    label_index_digest = _digest(label_index)
    users = {p: 0 for p in constants.PARTITIONS}
    images = {p: 0 for p in constants.PARTITIONS}
    tasks = []
    entries = {}  # Relative path -> manifest entry, of every current user.
    kept = []
    rebuilt: dict[str, int] = collections.Counter()
    for user_id, user_records in by_user.items():
      partition = user_records[0].partition
      users[partition] += 1
      images[partition] += len(user_records)
      relative = f"{partition}/{user_id}{constants.TFRECORD_SUFFIX}"
      path = os.path.join(tfrecords_dir, partition,
                          user_id + constants.TFRECORD_SUFFIX)
      entries[relative] = _manifest_entry(relative, label_index_digest,
                                          user_records)
      if relative in existing:
        reason = _rebuild_reason(old_manifest.get(relative),
                                 entries[relative])
        if reason is None:
          kept.append(relative)
          continue
        rebuilt[reason] += 1
      tasks.append((path, relative, [
          (source.image_key(r.index, r.image_id),
           [label_index[constants.LABELS_KEY][n] for n in r.labels],
           [label_index[constants.FINE_GRAINED_LABELS_KEY][n]
            for n in r.fine_grained_labels])
          for r in user_records]))
    stale = sorted(existing - set(entries))
    already_complete = len(kept)
    for partition in constants.PARTITIONS:
      if users[partition]:
        with file_io.output_errors(tfrecords_dir, flag="--tfrecords_dir"):
          os.makedirs(os.path.join(tfrecords_dir, partition), exist_ok=True)
      else:
        logging.warning("partition %r has no users", partition)
    if already_complete:
      logging.info("%d user file(s) already complete, kept (resume)",
                   already_complete)
    for reason, count in sorted(rebuilt.items()):
      logging.warning("rebuilding %d user file(s) of an earlier run: %s",
                      count, reason)
    label_index_path = os.path.join(tfrecords_dir, constants.LABEL_INDEX_FILE)
    if tasks or stale:
      # Until this run completes, the directory holds no label index (so no
      # trainer reads a mix of old and new files), and the manifest lists
      # only the files that are kept; each file written is added below.
      with file_io.output_errors(tfrecords_dir, flag="--tfrecords_dir"):
        for name in constants.LABEL_INDEX_FILES:
          with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(tfrecords_dir, name))
      _write_manifest(manifest_path, [entries[r] for r in kept])
      with file_io.output_errors(tfrecords_dir, flag="--tfrecords_dir"):
        for relative in stale:
          os.remove(os.path.join(tfrecords_dir, relative))
      if stale:
        logging.warning(
            "removed %d user file(s) of an earlier run whose user is not in "
            "this output (skipped now, moved partition or not in the "
            "metadata): %s", len(stale), ", ".join(stale[:5])
            + (", ..." if len(stale) > 5 else ""))

    if tasks:
      if pool is None:
        results = map(_write_user, tasks)
      else:
        # Small chunks keep the workers balanced (user sizes are heavy-tailed).
        results = pool.imap_unordered(_write_user, tasks, chunksize=1)
      with file_io.output_errors(manifest_path, flag="--tfrecords_dir"), \
          open(manifest_path, "a", encoding="utf-8") as journal:
        for relative in _progress(results, show_progress, total=len(tasks),
                                  desc="writing users", unit="user"):
          journal.write(_manifest_line(entries[relative]))
          journal.flush()
  finally:
    _set_source(None)
    source.close()
    if pool is not None:
      pool.terminate()
      pool.join()
      # Workers stopped in the middle of a file (after an error elsewhere,
      # Ctrl-C) leave their temporary file: removed here, not at the rerun.
      if os.path.isdir(tfrecords_dir):
        with contextlib.suppress(OSError):
          _remove_stale_temp_files(tfrecords_dir)

  _write_manifest(manifest_path, entries.values())
  file_io.write_json_atomic(label_index_path, label_index,
                             flag="--tfrecords_dir")
  return PrepareSummary(
      tfrecords_dir=tfrecords_dir, users=users, images=images,
      users_written=len(tasks), users_already_complete=already_complete,
      skipped=tuple(problems), report_path=written_report,
      label_index_path=label_index_path, users_rebuilt=dict(rebuilt),
      files_removed=len(stale))


# --- Command line --------------------------------------------------------------


def _define_flags() -> None:
  # Defined only when run as a command: importing this module (the demo and
  # the tests do) adds no global flags.
  flags.DEFINE_string("dataset_dir", None,
                      "FLAIR dataset directory (labels_and_metadata.json, "
                      "small_images/). Or give --hf_dataset or --pfl_hdf5.")
  flags.DEFINE_string("hf_dataset", None,
                      "Instead of --dataset_dir: a local copy of Hugging Face "
                      "apple/flair (a parquet file, a directory of *.parquet "
                      "shards, or a directory written by save_to_disk).")
  flags.DEFINE_string("pfl_hdf5", None,
                      "Instead of --dataset_dir: pfl-research's FLAIR HDF5 "
                      "file (dataset/flair/download_preprocess.py, or "
                      "export_pfl_hdf5.py).")
  flags.DEFINE_string("tfrecords_dir", None,
                      "Output directory for <partition>/<user_id>.tfrecords "
                      "and label_index.json.")
  flags.DEFINE_integer("num_workers", None,
                       "Worker processes; default all cores.", lower_bound=1)
  flags.DEFINE_bool("skip_bad_images", False,
                    "Skip records with a bad image or record and list them "
                    "in a report instead of stopping.")
  flags.DEFINE_string("report_path", None,
                      "Report of skipped records (with --skip_bad_images); "
                      "default <tfrecords_dir>/" + SKIPPED_IMAGES_REPORT_FILE)
  flags.mark_flag_as_required("tfrecords_dir")


@commands.exit_on_input_error
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise errors.FlairInputError(
        f"unexpected positional arguments: {' '.join(argv[1:])}")
  flag_values = flags.FLAGS
  try:
    summary = prepare(flag_values.dataset_dir, flag_values.tfrecords_dir,
                      num_workers=flag_values.num_workers,
                      skip_bad_images=flag_values.skip_bad_images,
                      report_path=flag_values.report_path,
                      hf_dataset=flag_values.hf_dataset,
                      pfl_hdf5=flag_values.pfl_hdf5)
  except BadInputError as e:
    print(f"{len(e.problems)} problem(s) found:", file=sys.stderr)
    for problem in e.problems:
      print(f"  {problem.describe()}", file=sys.stderr)
    raise
  print(summary.describe())


def run() -> None:
  """Console-script entry point."""
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
