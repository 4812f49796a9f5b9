"""Trainers' run directories read back: what each run is, how far it got,
its final test metrics, its best validation metrics and its validation
curve.

A run directory is a trainer's `--save_model_dir` (file names from
`core.constants`): `run.json` (what the run is), `flags.json` (every flag),
`metrics.csv` (one row per epoch or round) and, once it finished,
`final_metrics.json` (the best weights by val loss, evaluated on val and
test). Runs of both trainers, written by this version or an earlier one,
finished or not, are read; any of the files may be missing or unreadable
(a run killed early, a folder copied in part), and then what can be read is
used and `Run.notes` says what is missing. No TensorFlow is imported.
"""

import csv
import dataclasses
import glob
import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

from benchmark.core import constants

CENTRAL = "central"
FEDERATED = "federated"
EPOCH = "epoch"
ROUND = "round"
_RUN_FILES = (constants.RUN_IDENTITY_FILE, constants.FLAGS_FILE,
              constants.METRICS_CSV_FILE, constants.FINAL_METRICS_FILE)


@dataclasses.dataclass(frozen=True)
class Metric:
  """A metric of the report.

  Attributes:
    key: its name in the report's columns (`macro_ap`, ...).
    label: its name in tables ("macro AP", ...).
    names: the trainers' names for it, first found wins: a binary-label run
      has one averaged precision and one F1, reported as both macro and
      micro (one label: the two averages are the same).
    higher_is_better: False for the loss.
  """
  key: str
  label: str
  names: tuple[str, ...]
  higher_is_better: bool = True


METRICS = (
    Metric("macro_ap", "macro AP",
           ("macro_averaged_precision", "averaged_precision")),
    Metric("micro_ap", "micro AP",
           ("micro_averaged_precision", "averaged_precision")),
    Metric("macro_f1", "macro F1", ("macro_f1", "f1")),
    Metric("micro_f1", "micro F1", ("micro_f1", "f1")),
    Metric("loss", "loss", ("loss",), higher_is_better=False),
)


def to_float(value: Any) -> float:
  """`value` as a float; NaN when it is missing or not a number."""
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


def pick_metrics(values: Mapping[str, Any], prefix: str = ""
                ) -> dict[str, float]:
  """The `METRICS` of a trainer's metrics dict (`final_metrics.json`'s
  "val"/"test", or a metrics.csv row with `prefix` "val_"): key -> value,
  NaN where absent."""
  picked = {}
  for metric in METRICS:
    found = [values[prefix + n] for n in metric.names if prefix + n in values]
    picked[metric.key] = to_float(found[0]) if found else math.nan
  return picked


@dataclasses.dataclass(frozen=True)
class Run:
  """One run directory as read (`read_run`).

  Attributes:
    path: the directory.
    identity: run.json ({} when missing or unreadable).
    flags: flags.json ({} when missing or unreadable).
    final: final_metrics.json ({} when missing or unreadable).
    history: metrics.csv rows, values as floats (NaN where empty), in
      file order.
    notes: what is missing or unfinished, one sentence each.
  """
  path: str
  identity: Mapping[str, Any]
  flags: Mapping[str, Any]
  final: Mapping[str, Any]
  history: tuple[Mapping[str, float], ...]
  notes: tuple[str, ...]

  @property
  def name(self) -> str:
    return os.path.basename(os.path.normpath(self.path))

  def setting(self, name: str, default: Any = None) -> Any:
    """A flag's value: flags.json's, else run.json's settings'."""
    if name in self.flags:
      return self.flags[name]
    return (self.identity.get("settings") or {}).get(name, default)

  @property
  def trainer(self) -> Optional[str]:
    """"central", "federated", or None when nothing tells."""
    trainer = self.identity.get("trainer")
    if trainer in (CENTRAL, FEDERATED):
      return trainer
    if "total_rounds" in self.flags or (self.history
                                        and ROUND in self.history[0]):
      return FEDERATED
    if "num_epochs" in self.flags or (self.history
                                      and EPOCH in self.history[0]):
      return CENTRAL
    return None

  @property
  def unit(self) -> str:
    """What the run counts: "epoch" (central) or "round" (federated)."""
    return ROUND if self.trainer == FEDERATED else EPOCH

  @property
  def planned(self) -> Optional[int]:
    """The epochs or rounds its flags ask for, or None."""
    value = self.setting("total_rounds" if self.unit == ROUND
                         else "num_epochs")
    return int(value) if isinstance(value, (int, float)) else None

  def curve(self, metric: str = "loss") -> list[tuple[float, float]]:
    """`(epoch or round, val value of METRICS key `metric`)` for each row
    of metrics.csv that has it: epochs counted from 1 (Keras writes them
    from 0), round 0 the initial model."""
    points = []
    for row in self.history:
      step = row.get(self.unit, math.nan)
      value = pick_metrics(row, "val_")[metric]
      if math.isnan(step) or math.isnan(value):
        continue
      points.append((step + 1 if self.unit == EPOCH else step, value))
    return points

  @property
  def completed(self) -> int:
    """Epochs or rounds done: metrics.csv's last, or final_metrics.json's
    `rounds_completed` when metrics.csv is missing."""
    steps = [row.get(self.unit, math.nan) for row in self.history]
    steps = [s for s in steps if not math.isnan(s)]
    if steps:
      return int(max(steps)) + (1 if self.unit == EPOCH else 0)
    rounds = to_float(self.final.get("rounds_completed"))
    return 0 if math.isnan(rounds) else int(rounds)

  @property
  def finished(self) -> bool:
    """Whether final_metrics.json holds test metrics of the whole run (not
    of an earlier, shorter part that a longer run resumed)."""
    if not isinstance(self.final.get(constants.TEST), Mapping):
      return False
    planned = self.planned
    if planned is None or not self.history:
      return True
    return self.completed >= planned

  def test_metrics(self) -> Optional[dict[str, float]]:
    """The best weights' test metrics (`METRICS` keys), once finished."""
    if not self.finished:
      return None
    return pick_metrics(self.final[constants.TEST])

  def best_val(self) -> tuple[Optional[float], dict[str, float]]:
    """`(epoch or round, val metrics)` of the best weights (lowest val
    loss): final_metrics.json's once finished, else the best row of
    metrics.csv so far; `(None, all NaN)` without either."""
    best_step = None
    losses = self.curve("loss")
    if losses:
      best_step = min(losses, key=lambda p: p[1])[0]
    if self.finished and isinstance(self.final.get(constants.VAL), Mapping):
      if "best_round" in self.final:
        best_step = to_float(self.final["best_round"])
      return best_step, pick_metrics(self.final[constants.VAL])
    for row in self.history:
      step = row.get(self.unit, math.nan)
      if best_step is not None and (
          step + 1 if self.unit == EPOCH else step) == best_step:
        return best_step, pick_metrics(row, "val_")
    return None, pick_metrics({})


def _read_json(path: str, notes: list[str]) -> dict[str, Any]:
  name = os.path.basename(path)
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except FileNotFoundError:
    notes.append(f"no {name}")
    return {}
  except (OSError, ValueError) as e:
    notes.append(f"{name} cannot be read ({e})")
    return {}
  if not isinstance(value, dict):
    notes.append(f"{name} is not a JSON object")
    return {}
  return value


def _read_history(path: str, notes: list[str]
                 ) -> tuple[Mapping[str, float], ...]:
  try:
    with open(path, newline="", encoding="utf-8") as f:
      rows = list(csv.DictReader(f))
  except FileNotFoundError:
    notes.append(f"no {constants.METRICS_CSV_FILE}")
    return ()
  except (OSError, ValueError, csv.Error) as e:
    notes.append(f"{constants.METRICS_CSV_FILE} cannot be read ({e})")
    return ()
  return tuple({k: to_float(v) for k, v in row.items() if k is not None}
               for row in rows)


def is_run_dir(path: str) -> bool:
  """Whether `path` is a directory holding any file a trainer writes first
  or last (run.json, flags.json, metrics.csv, final_metrics.json)."""
  return os.path.isdir(path) and any(
      os.path.isfile(os.path.join(path, name)) for name in _RUN_FILES)


def read_run(path: str) -> Run:
  """Reads the run directory `path` (`is_run_dir`); never raises for
  missing or broken files (see `Run.notes`)."""
  notes = []
  identity = _read_json(os.path.join(path, constants.RUN_IDENTITY_FILE),
                        notes)
  flag_values = _read_json(os.path.join(path, constants.FLAGS_FILE), notes)
  history = _read_history(os.path.join(path, constants.METRICS_CSV_FILE),
                          notes)
  final_notes = []
  final = _read_json(os.path.join(path, constants.FINAL_METRICS_FILE),
                     final_notes)
  run = Run(path=path, identity=identity, flags=flag_values, final=final,
            history=history, notes=())
  if not run.finished:
    done = f"{run.completed}" + (f" of {run.planned}" if run.planned else "")
    final_notes = [f"unfinished: {done} {run.unit}s done, no test metrics "
                   "yet" + (" (final_metrics.json is of an earlier, shorter "
                            "part)" if final else "")]
  return dataclasses.replace(run, notes=tuple(notes + final_notes))


_GLOB_CHARACTERS = frozenset("*?[")


def find_run_dirs(arguments: Sequence[str]) -> tuple[list[str], list[str]]:
  """The run directories that `arguments` name, and notes on the others.

  Each argument is a run directory, a glob of them (expanded here when the
  shell did not), or a folder whose sub-folders are runs (such as the
  demo's results folder; its other sub-folders are left out).

  Returns:
    `(run directories in argument order, each once; notes "<argument>:
    <why it is not a run>")`.
  """
  found, notes, seen = [], [], set()
  for argument in arguments:
    paths = [argument]
    if _GLOB_CHARACTERS & set(argument) and not os.path.exists(argument):
      paths = sorted(glob.glob(argument))
      if not paths:
        notes.append(f"{argument}: matches nothing")
    for path in paths:
      if is_run_dir(path):
        candidates = [path]
      elif os.path.isdir(path):
        try:
          names = sorted(os.listdir(path))
        except OSError as e:
          notes.append(f"{path}: cannot be read ({e.strerror or e})")
          continue
        candidates = [os.path.join(path, n) for n in names
                      if is_run_dir(os.path.join(path, n))]
        if not candidates:
          notes.append(f"{path}: not a run directory (none of "
                       f"{', '.join(_RUN_FILES)} in it or its sub-folders)")
      else:
        candidates = []
        notes.append(f"{path}: " + ("not a directory" if os.path.exists(path)
                                    else "does not exist"))
      for candidate in candidates:
        if os.path.realpath(candidate) not in seen:
          seen.add(os.path.realpath(candidate))
          found.append(candidate)
  return found, notes
