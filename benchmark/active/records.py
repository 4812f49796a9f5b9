"""What an active-learning run records of its cycles, and reads back to
resume: `chosen_images.json` (the seed sets, then per cycle its labelled
counts, val/test metrics and the images chosen at its end) and
`cycles.csv` (one row per cycle, rewritten from the JSON).

`chosen_images.json` is the run's cycle state: it is written atomically
after a cycle's evaluation and again after its selection, so a run killed
at any point resumes from what it says (`active.cycles`). Images are named
by user id and index in the user's TFRecord file (0-based, file order).

    {"seed_sets": {user: [index, ...]},
     "cycles": [{"cycle": 1, "labelled_images": int, "pool_images": int,
                 "labelled_users": int, "val": {metric: value},
                 "test": {metric: value},
                 "chosen": {user: [index, ...]}}, ...]}

"chosen" is absent until the cycle's selection is done (and after the last
cycle, whose labels would never be used).
"""

import csv
import io
import json
import os
from typing import Any, Optional, Sequence

import numpy as np

from benchmark.active import pools
from benchmark.core import errors
from benchmark.core import file_io

CHOSEN_FILE = "chosen_images.json"
CYCLES_CSV_FILE = "cycles.csv"
CHOSEN_KEY = "chosen"
CYCLES_KEY = "cycles"
SEED_SETS_KEY = "seed_sets"
# The metrics of cycles.csv, for val and test (`metrics.metric_names`).
CSV_METRICS = ("macro_averaged_precision", "micro_averaged_precision",
               "loss")
CSV_COUNTS = ("labelled_images", "pool_images", "labelled_users",
              "chosen_images")


def new_record(images: pools.TrainImages,
               seed_masks: Sequence[np.ndarray]) -> dict[str, Any]:
  """A fresh run's record: its seed sets, no cycle yet."""
  return {SEED_SETS_KEY: _by_user(images, dict(enumerate(
      np.flatnonzero(m) for m in seed_masks))), CYCLES_KEY: []}


def _by_user(images: pools.TrainImages, chosen) -> dict[str, list[int]]:
  return {images.client_ids[u]: [int(i) for i in v]
          for u, v in sorted(chosen.items())}


def load(save_model_dir: str) -> Optional[dict[str, Any]]:
  """The recorded cycles, or None for a fresh run.

  Raises:
    FlairInputError: the file is not a record of this kind.
  """
  path = os.path.join(save_model_dir, CHOSEN_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      record = json.load(f)
    valid = (isinstance(record[CYCLES_KEY], list)
             and isinstance(record[SEED_SETS_KEY], dict))
  except (ValueError, KeyError, TypeError):
    valid = False
  if not valid:
    raise errors.FlairInputError(
        f"{path} is not an active-learning record; use another "
        "--save_model_dir or --overwrite")
  return record


def remove(save_model_dir: str) -> None:
  """Removes the record files (with `--overwrite`: `cli.trainers` removes
  the outputs every trainer writes, not these)."""
  for name in (CHOSEN_FILE, CYCLES_CSV_FILE):
    path = os.path.join(save_model_dir, name)
    if os.path.exists(path):
      os.remove(path)


def masks_of(record: dict[str, Any],
             images: pools.TrainImages) -> list[np.ndarray]:
  """Per user, bool `[n_images]`: the seed set and every recorded choice.

  Raises:
    FlairInputError: the record names a user or image the data lacks, or
      an image twice.
  """
  index = {c: i for i, c in enumerate(images.client_ids)}
  masks = [np.zeros(len(l), bool) for l in images.labels]
  steps = [record[SEED_SETS_KEY]] + [c[CHOSEN_KEY] for c in
                                     record[CYCLES_KEY] if CHOSEN_KEY in c]
  try:
    for step in steps:
      masks = pools.add_chosen(masks, {index[u]: v for u, v in step.items()})
  except (KeyError, ValueError) as e:
    raise errors.FlairInputError(
        f"{CHOSEN_FILE} does not fit --tfrecords_dir ({e}); use another "
        "--save_model_dir or --overwrite") from None
  return masks


def add_choice(record: dict[str, Any], images: pools.TrainImages,
               chosen: dict[int, np.ndarray]) -> None:
  """Records the choice at the end of the last recorded cycle."""
  record[CYCLES_KEY][-1][CHOSEN_KEY] = _by_user(images, chosen)


def cycle_counts(masks: Sequence[np.ndarray]) -> dict[str, int]:
  """The labelled images, pool images and users with a labelled image."""
  return {"labelled_images": int(sum(m.sum() for m in masks)),
          "pool_images": int(sum((~m).sum() for m in masks)),
          "labelled_users": int(sum(bool(m.any()) for m in masks))}


def save(save_model_dir: str, record: dict[str, Any]) -> None:
  """Writes chosen_images.json, then cycles.csv from it (both atomic).

  Raises:
    OutputWriteError: a file cannot be written.
  """
  file_io.write_json_atomic(os.path.join(save_model_dir, CHOSEN_FILE),
                            record)
  file_io.write_text_atomic(os.path.join(save_model_dir, CYCLES_CSV_FILE),
                            cycles_csv(record))


def csv_columns() -> list[str]:
  """cycles.csv's columns: cycle, rounds_completed, the counts, then
  `val_`/`test_` metrics."""
  return (["cycle", "rounds_completed", *CSV_COUNTS]
          + [f"{p}_{m}" for p in ("val", "test") for m in CSV_METRICS])


def cycles_csv(record: dict[str, Any]) -> str:
  """cycles.csv's text: one row per recorded cycle (`chosen_images` is
  empty until the cycle's selection is done)."""
  out = io.StringIO()
  writer = csv.DictWriter(out, csv_columns(), lineterminator="\n")
  writer.writeheader()
  for cycle in record[CYCLES_KEY]:
    row = {k: cycle[k] for k in ("cycle", "rounds_completed",
                                 *CSV_COUNTS[:3])}
    if CHOSEN_KEY in cycle:
      row["chosen_images"] = sum(len(v) for v in cycle[CHOSEN_KEY].values())
    for partition in ("val", "test"):
      for metric in CSV_METRICS:
        row[f"{partition}_{metric}"] = cycle[partition].get(metric, "")
    writer.writerow(row)
  return out.getvalue()
