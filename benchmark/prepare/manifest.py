"""`prepare_manifest.jsonl`: what each user file was built from, and whether
a file found on disk may be kept.

One JSON object per line and user file (sorted keys, no spaces):
`{"file": "<partition>/<user_id>.tfrecords", "label_index_sha256": ...,
"options": WRITER_OPTIONS, "records_sha256": ...}`, where the digests are
sha256 hex digests of canonical JSON (`digest`; the label index's is
`label_index_sha256`, which the trainers also check label_index.json
against). A file is kept by a rerun only when all three inputs are
unchanged (`rebuild_reason`). The writer appends one line per file finished
(`line`), so the last line of a file wins when reading (`read`), and a line
cut short by a kill is ignored.
"""

import collections
import hashlib
import json
from typing import Any, Iterable, Mapping, Optional, Sequence

from benchmark.core import constants
from benchmark.core import file_io
from benchmark.data import formats

MANIFEST_FILE = "prepare_manifest.jsonl"
# The options a user file's bytes depend on; a change rebuilds every file.
# Bump "format" when the writer changes what it writes.
WRITER_OPTIONS = {"format": 1, "images": constants.SMALL_IMAGES_DIR}
# Why a user file found on disk is written again (summary and log).
REBUILD_NO_ENTRY = ("not in the manifest (written by an earlier version or an "
                    "interrupted run)")
REBUILD_LABEL_INDEX = "label index changed"
REBUILD_OPTIONS = "writer options changed"
REBUILD_RECORDS = "the user's records or images changed"


def digest(obj: Any) -> str:
  """sha256 hex digest of `obj` as canonical JSON (sorted keys, no spaces,
  UTF-8)."""
  return hashlib.sha256(json.dumps(
      obj, sort_keys=True, ensure_ascii=False,
      separators=(",", ":")).encode("utf-8")).hexdigest()


def label_index_sha256(label_index: Mapping[str, Any]) -> str:
  """The digest of a label index that each entry records
  (`label_index_sha256`): `digest` of the label index as
  `formats.build_label_index` returns it and `label_index.json` holds it
  (`{"labels": {name: index}, "fine_grained_labels": {name: index}}`), so
  that a reader can check the file against the manifest."""
  return digest(label_index)


def label_index_sha256_counts(entries: Mapping[str, Mapping[str, Any]]
                              ) -> collections.Counter:
  """How many entries of a manifest (`read`) record each label index
  digest; entries without one are not counted."""
  return collections.Counter(
      e["label_index_sha256"] for e in entries.values()
      if isinstance(e.get("label_index_sha256"), str))


def entry(relative_path: str, label_index_digest: str,
          user_records: Sequence[formats.MetadataRecord]) -> dict[str, Any]:
  """What one user file is built from: its label index, the writer options
  and every record written (ids, labels, the image's sha256).

  Args:
    relative_path: `<partition>/<user_id>.tfrecords`.
    label_index_digest: `digest` of the label index.
    user_records: the user's records in file order, each with an
      `image_sha256` (`input_checks.CheckedRecord`).
  """
  return {
      "file": relative_path,
      "label_index_sha256": label_index_digest,
      "options": WRITER_OPTIONS,
      "records_sha256": digest([
          [r.user_id, r.partition, r.image_id, list(r.labels),
           list(r.fine_grained_labels), r.image_sha256]
          for r in user_records]),
  }


def line(manifest_entry: dict[str, Any]) -> str:
  """One manifest line (with its newline) for `manifest_entry`."""
  return json.dumps(manifest_entry, sort_keys=True,
                    separators=(",", ":")) + "\n"


def read(path: str) -> dict[str, dict[str, Any]]:
  """{relative file: entry} of a manifest; the last line for a file wins; a
  line that does not parse (cut by a kill) is ignored; {} when the file is
  missing."""
  entries = {}
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.readlines()
  except FileNotFoundError:
    return entries
  for text in lines:
    try:
      parsed = json.loads(text)
      entries[parsed["file"]] = parsed
    except (ValueError, TypeError, KeyError):
      continue
  return entries


def write(path: str, entries: Iterable[dict[str, Any]]) -> None:
  """Replaces the manifest at `path` atomically with `entries`, sorted by
  file.

  Raises:
    errors.OutputWriteError: a storage failure (names `--tfrecords_dir`).
  """
  file_io.write_text_atomic(
      path, "".join(line(e) for e in
                    sorted(entries, key=lambda e: e["file"])),
      flag="--tfrecords_dir")


def rebuild_reason(old: Optional[dict[str, Any]],
                   new: dict[str, Any]) -> Optional[str]:
  """Why an existing user file must be written again (a `REBUILD_*` text),
  or None to keep it.

  Args:
    old: the file's entry in the manifest on disk, or None.
    new: the entry of the file this run would write (`entry`).
  """
  if old is None:
    return REBUILD_NO_ENTRY
  if old.get("label_index_sha256") != new["label_index_sha256"]:
    return REBUILD_LABEL_INDEX
  if old.get("options") != new["options"]:
    return REBUILD_OPTIONS
  if old.get("records_sha256") != new["records_sha256"]:
    return REBUILD_RECORDS
  return None
