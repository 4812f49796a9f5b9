"""Writes per-user TFRecords and label_index.json from one FLAIR source (the
prepare pipeline).

`prepare` reads the metadata records and small images of a `sources` source
(a downloaded dataset directory, a local Hugging Face `apple/flair` copy or
pfl-research's HDF5) and writes, in the format of docs/formats.md
("Per-user TFRecords"):

* `T/<partition>/<user_id>.tfrecords`: one `tf.train.Example` per image of the
  user (in metadata order) with `image/encoded_jpeg` (the JPEG file's bytes,
  unchanged), `labels` and `fine_grained_labels` (int64 label indices);
* `T/label_index.json`: `{"labels": {name: index}, "fine_grained_labels":
  {name: index}}`, indices in sorted label order over the labels found in the
  metadata (of the records that are written).

Steps:
1. The output location, every record (its fields, its labels against
   FLAIR's 17 coarse labels and the source's `label_relationship.txt`, its
   user id's length) and every image are checked before anything is
   written (`input_checks`). By default any problem stops the run with the
   full list (`input_checks.BadInputError`). With `skip_bad_images` the
   records with problems are skipped and listed, with the reason, in a JSON
   report (default `T/skipped_images.json`; a run without it removes a
   report left there). Nothing is dropped silently.
2. Users are written in parallel by a process pool (`pool`), one whole file
   per task, each to a temporary name and then renamed
   (`file_io.atomic_path`): a final `<user_id>.tfrecords` is always complete.
3. `T/prepare_manifest.jsonl` (`manifest`) records what each user file was
   built from. A rerun keeps a user file only when its inputs are unchanged;
   any other file is written again (the summary counts them by reason), and
   user files of users no longer in the output are removed. So an
   interrupted run resumes, and a rerun after the inputs changed (an image
   restored after `skip_bad_images`, edited metadata) ends equal to a fresh
   run. While files are (re)written the directory holds no label index, and
   each file finished is appended to the manifest at once; stale temporary
   files of an interrupted run are removed.
4. `label_index.json` is written last.

A full disk, a read-only output or a permission error raises
`errors.OutputWriteError` naming the file; nothing partial is left under a
final name and a rerun completes it. TensorFlow is imported only by the
processes that write.
"""

import collections
import contextlib
import dataclasses
import os
import re
from typing import Any, Optional, Sequence

from absl import logging

from benchmark.core import constants
from benchmark.core import errors
from benchmark.core import file_io
from benchmark.data import formats
from benchmark.prepare import input_checks
from benchmark.prepare import manifest
from benchmark.prepare import pool as pool_lib
from benchmark.prepare import sources

# Report of the skipped records, written in the tfrecords directory by default.
SKIPPED_IMAGES_REPORT_FILE = "skipped_images.json"
# The flag named by output errors.
_FLAG = "--tfrecords_dir"
# Temporary files of file_io.atomic_path for a "<name>.tfrecords" target.
_TEMP_FILE_PATTERN = re.compile(
    r"^\..+" + re.escape(constants.TFRECORD_SUFFIX) + r"\..+\.tmp$")
# How many removed files the warning names.
_STALE_IN_LOG = 5

# One `_write_user` task: (final path, path relative to the output
# directory, [(image key, label indices, fine label indices)]).
_UserTask = tuple[str, str, list[tuple[Any, list[int], list[int]]]]


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
      from other inputs, by reason (the `manifest.REBUILD_*` texts).
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
  skipped: tuple[input_checks.Problem, ...]
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


def _partition_counts() -> dict[str, int]:
  return {p: 0 for p in constants.PARTITIONS}


@dataclasses.dataclass
class _Plan:
  """What one run writes, keeps and removes in the output directory.

  Attributes:
    users, images: users and images per partition, of every current user.
    entries: relative path -> manifest entry, of every current user.
    tasks: `_write_user` tasks of the files to (re)write.
    kept: relative paths of the files kept from an earlier run.
    rebuilt: files to rewrite, by `manifest.REBUILD_*` reason.
    stale: relative paths of files whose user is not in this output.
  """
  users: dict[str, int] = dataclasses.field(default_factory=_partition_counts)
  images: dict[str, int] = dataclasses.field(
      default_factory=_partition_counts)
  entries: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
  tasks: list[_UserTask] = dataclasses.field(default_factory=list)
  kept: list[str] = dataclasses.field(default_factory=list)
  rebuilt: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)
  stale: list[str] = dataclasses.field(default_factory=list)


# --- Pool task ----------------------------------------------------------------


def _write_user(task: _UserTask) -> str:
  """Pool task: writes one user's file atomically; returns its relative path.

  Args:
    task: (final path, path relative to the output directory, [(image key
      in `pool_lib.source()`, label indices, fine label indices)]).

  Raises:
    errors.OutputWriteError: the output disk is full, read-only or not
      permitted (names the file; nothing left under its name).
  """
  tf = pool_lib.tensorflow()
  source = pool_lib.source()
  path, relative, examples = task
  with file_io.atomic_path(path, flag=_FLAG) as tmp:
    with tf.io.TFRecordWriter(tmp) as writer:
      for image_key, labels, fine_labels in examples:
        jpeg = source.read_image(image_key)
        writer.write(formats.encode_example(jpeg, labels, fine_labels))
  return relative


# --- The output directory -----------------------------------------------------


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


def _open_output_dir(tfrecords_dir: str) -> None:
  """Creates `tfrecords_dir` and removes an interrupted run's temporary
  files (`errors.OutputWriteError` on a storage failure)."""
  with file_io.output_errors(tfrecords_dir, flag=_FLAG):
    os.makedirs(tfrecords_dir, exist_ok=True)
    removed = _remove_stale_temp_files(tfrecords_dir)
  if removed:
    logging.info("removed %d temporary file(s) of an interrupted run",
                 removed)


def _update_skip_report(source, num_records: int,
                        problems: Sequence[input_checks.Problem],
                        tfrecords_dir: str, skip_bad_images: bool,
                        report_path: Optional[str]) -> Optional[str]:
  """With `skip_bad_images`, writes the skip report and returns its path;
  otherwise removes a report an earlier skipping run left in
  `tfrecords_dir` (it no longer describes this output) and returns None.

  Raises:
    errors.OutputWriteError: a storage failure (names `--report_path` for a
      report there, else `--tfrecords_dir`).
  """
  if not skip_bad_images:
    # Looked up first: on a read-only file system, removing even a missing
    # file fails.
    old_report = os.path.join(tfrecords_dir, SKIPPED_IMAGES_REPORT_FILE)
    if os.path.lexists(old_report):
      with file_io.output_errors(old_report, flag=_FLAG, exact=True):
        os.remove(old_report)
    return None
  written_report = report_path or os.path.join(tfrecords_dir,
                                               SKIPPED_IMAGES_REPORT_FILE)
  num_skipped = len({p.record_index for p in problems})
  file_io.write_json_atomic(written_report, {
      "dataset_dir": source.path,
      "num_records": num_records,
      "num_skipped_records": num_skipped,
      "skipped": [p.to_json() for p in problems],
  }, flag="--report_path" if report_path else _FLAG)
  if problems:
    logging.warning("skipping %d bad record(s); list in %s", num_skipped,
                    written_report)
  return written_report


# --- Planning -----------------------------------------------------------------


def _user_task(source, label_index: dict[str, dict[str, int]],
               tfrecords_dir: str, user_records: Sequence[Any]) -> _UserTask:
  """The `_write_user` task of one user's records (all of one partition)."""
  partition, user_id = user_records[0].partition, user_records[0].user_id
  coarse = label_index[constants.LABELS_KEY]
  fine = label_index[constants.FINE_GRAINED_LABELS_KEY]
  return (os.path.join(tfrecords_dir, partition,
                       user_id + constants.TFRECORD_SUFFIX),
          f"{partition}/{user_id}{constants.TFRECORD_SUFFIX}",
          [(source.image_key(r.index, r.image_id),
            [coarse[n] for n in r.labels],
            [fine[n] for n in r.fine_grained_labels])
           for r in user_records])


def _plan(source, records: Sequence[input_checks.CheckedRecord],
          label_index: dict[str, dict[str, int]], tfrecords_dir: str
          ) -> _Plan:
  """Compares the user files this run would write with the files and the
  manifest in `tfrecords_dir` (read only)."""
  # Group by user (a user's records need not be adjacent), metadata order.
  by_user: dict[str, list[Any]] = collections.defaultdict(list)
  for record in records:
    by_user[record.user_id].append(record)
  old_manifest = manifest.read(os.path.join(tfrecords_dir,
                                            manifest.MANIFEST_FILE))
  existing = _existing_user_files(tfrecords_dir)
  label_index_digest = manifest.digest(label_index)
  plan = _Plan()
  for user_id, user_records in by_user.items():
    partition = user_records[0].partition
    plan.users[partition] += 1
    plan.images[partition] += len(user_records)
    relative = f"{partition}/{user_id}{constants.TFRECORD_SUFFIX}"
    plan.entries[relative] = manifest.entry(relative, label_index_digest,
                                            user_records)
    if relative in existing:
      reason = manifest.rebuild_reason(old_manifest.get(relative),
                                       plan.entries[relative])
      if reason is None:
        plan.kept.append(relative)
        continue
      plan.rebuilt[reason] += 1
    plan.tasks.append(_user_task(source, label_index, tfrecords_dir,
                                 user_records))
  plan.stale = sorted(existing - set(plan.entries))
  return plan


def _announce(plan: _Plan, tfrecords_dir: str) -> None:
  """Creates the partition directories of `plan`'s users; logs empty
  partitions, kept files and rebuilds."""
  for partition in constants.PARTITIONS:
    if plan.users[partition]:
      with file_io.output_errors(tfrecords_dir, flag=_FLAG):
        os.makedirs(os.path.join(tfrecords_dir, partition), exist_ok=True)
    else:
      logging.warning("partition %r has no users", partition)
  if plan.kept:
    logging.info("%d user file(s) already complete, kept (resume)",
                 len(plan.kept))
  for reason, count in sorted(plan.rebuilt.items()):
    logging.warning("rebuilding %d user file(s) of an earlier run: %s",
                    count, reason)


# --- Writing ------------------------------------------------------------------


def _clear_for_rewrite(plan: _Plan, tfrecords_dir: str) -> None:
  """Before files are (re)written or removed: removes the label index (so no
  trainer reads a mix of old and new files until this run completes),
  rewrites the manifest with only the kept files, and removes the stale
  files. Does nothing when nothing is to be written or removed."""
  if not (plan.tasks or plan.stale):
    return
  with file_io.output_errors(tfrecords_dir, flag=_FLAG):
    for name in constants.LABEL_INDEX_FILES:
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(tfrecords_dir, name))
  manifest.write(os.path.join(tfrecords_dir, manifest.MANIFEST_FILE),
                 [plan.entries[r] for r in plan.kept])
  with file_io.output_errors(tfrecords_dir, flag=_FLAG):
    for relative in plan.stale:
      os.remove(os.path.join(tfrecords_dir, relative))
  if plan.stale:
    logging.warning(
        "removed %d user file(s) of an earlier run whose user is not in "
        "this output (skipped now, moved partition or not in the "
        "metadata): %s", len(plan.stale),
        ", ".join(plan.stale[:_STALE_IN_LOG])
        + (", ..." if len(plan.stale) > _STALE_IN_LOG else ""))


def _write_users(plan: _Plan, pool, tfrecords_dir: str,
                 show_progress: bool) -> None:
  """Runs `plan`'s tasks (on `pool`, or here when None) and appends each
  finished file's manifest entry at once."""
  if not plan.tasks:
    return
  if pool is None:
    results = map(_write_user, plan.tasks)
  else:
    # Small chunks keep the workers balanced (user sizes are heavy-tailed).
    results = pool.imap_unordered(_write_user, plan.tasks, chunksize=1)
  manifest_path = os.path.join(tfrecords_dir, manifest.MANIFEST_FILE)
  with file_io.output_errors(manifest_path, flag=_FLAG), \
      open(manifest_path, "a", encoding="utf-8") as journal:
    for relative in pool_lib.progress(results, show_progress,
                                      total=len(plan.tasks),
                                      desc="writing users", unit="user"):
      journal.write(manifest.line(plan.entries[relative]))
      journal.flush()


def _stop_workers(pool, tfrecords_dir: str) -> None:
  """`pool_lib.stop`; then removes the temporary files of workers stopped in
  the middle of a file (after an error elsewhere, Ctrl-C)."""
  pool_lib.stop(pool)
  if pool is not None and os.path.isdir(tfrecords_dir):
    with contextlib.suppress(OSError):
      _remove_stale_temp_files(tfrecords_dir)


# --- The whole prepare --------------------------------------------------------


def _check_num_workers(num_workers: Optional[int]) -> int:
  """`num_workers`, or all cores for None (`errors.FlairInputError` unless
  a positive int)."""
  if num_workers is None:
    num_workers = pool_lib.default_num_workers()
  if isinstance(num_workers, bool) or not isinstance(num_workers, int) or (
      num_workers < 1):
    raise errors.FlairInputError(
        f"--num_workers must be a positive integer, got {num_workers!r}")
  return num_workers


def _usable_records(source, raw_records: list[Any], pool,
                    skip_bad_images: bool, show_progress: bool
                    ) -> tuple[list[input_checks.CheckedRecord],
                               list[input_checks.Problem]]:
  """`input_checks.check_records`, raising when the run cannot go on.

  Raises:
    input_checks.BadInputError: problems without `skip_bad_images`.
    errors.FlairInputError: no record is usable.
  """
  records, problems = input_checks.check_records(source, raw_records, pool,
                                                 show_progress)
  if problems and not skip_bad_images:
    raise input_checks.bad_input_error(
        problems, source.name,
        " (rerun with --skip_bad_images to skip these records)")
  if not records:
    raise errors.FlairInputError(
        f"no usable record in {source.name} (all "
        f"{len(raw_records)} have problems, see the report)")
  return records, problems


def prepare(dataset_dir: Optional[str], tfrecords_dir: str,
            num_workers: Optional[int] = None, skip_bad_images: bool = False,
            show_progress: bool = True,
            report_path: Optional[str] = None,
            hf_dataset: Optional[str] = None,
            pfl_hdf5: Optional[str] = None) -> PrepareSummary:
  """Writes per-user TFRecords and label_index.json (see the module doc).

  The input is exactly one of `dataset_dir`, `hf_dataset` and `pfl_hdf5`
  (`sources`); the same images and labels give the same bytes from each.

  Args:
    dataset_dir: a FLAIR dataset directory (labels_and_metadata.json and
      small_images/), or None.
    tfrecords_dir: output directory; created if needed. User files already
      there, built from the same inputs, are kept (resume).
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
    FlairInputError: a bad argument (`tfrecords_dir` an existing file,
      `report_path` an existing directory...), not exactly one input, a
      missing dataset directory or metadata file, malformed JSON, a
      truncated or malformed label_relationship.txt, an input not in its
      expected layout, or no usable record.
    input_checks.BadInputError (a FlairInputError): bad records or images
      without `skip_bad_images`; its `problems` lists all of them.
    errors.OutputWriteError: a storage failure writing the output (names
      the file).
  """
  num_workers = _check_num_workers(num_workers)
  input_checks.check_output_dir(tfrecords_dir, _FLAG)
  if report_path is not None:
    input_checks.check_output_file(report_path, "--report_path")
  source = sources.open_source(dataset_dir, hf_dataset, pfl_hdf5)
  raw_records = source.load_records()
  pool = None
  try:
    pool = pool_lib.start(num_workers, source)
    records, problems = _usable_records(source, raw_records, pool,
                                        skip_bad_images, show_progress)
    written_report = _update_skip_report(source, len(raw_records), problems,
                                         tfrecords_dir, skip_bad_images,
                                         report_path)
    label_index = formats.build_label_index(
        (r.labels, r.fine_grained_labels) for r in records)
    _open_output_dir(tfrecords_dir)
    plan = _plan(source, records, label_index, tfrecords_dir)
    _announce(plan, tfrecords_dir)
    _clear_for_rewrite(plan, tfrecords_dir)
    _write_users(plan, pool, tfrecords_dir, show_progress)
  finally:
    source.close()
    _stop_workers(pool, tfrecords_dir)

  manifest.write(os.path.join(tfrecords_dir, manifest.MANIFEST_FILE),
                 plan.entries.values())
  label_index_path = os.path.join(tfrecords_dir, constants.LABEL_INDEX_FILE)
  file_io.write_json_atomic(label_index_path, label_index, flag=_FLAG)
  return PrepareSummary(
      tfrecords_dir=tfrecords_dir, users=plan.users, images=plan.images,
      users_written=len(plan.tasks), users_already_complete=len(plan.kept),
      skipped=tuple(problems), report_path=written_report,
      label_index_path=label_index_path, users_rebuilt=dict(plan.rebuilt),
      files_removed=len(plan.stale))
