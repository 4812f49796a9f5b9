"""The report's results table: one row per run, or per group of finished
runs whose settings differ only by their seeds (mean ± sample standard
deviation, as the paper reports seeds), sortable, as Markdown and CSV.

Each row says what the runs are (trainer and algorithm, DP and its
epsilon, pretrained or not, the label set, IID or not, the backend, the
epochs or rounds done) and their final test metrics and best validation
metrics (`runs.METRICS`; the best weights are those of the lowest val
loss, as both trainers keep them).
"""

import csv
import dataclasses
import io
import math
import statistics
from typing import Any, Optional, Sequence

from benchmark.analysis import runs as runs_lib

# Seeds: runs that differ only in these are repetitions of one setting.
SEED_FLAGS = frozenset({"seed", "client_datasets_random_seed", "iid_seed"})
# Flags that do not change results (where outputs go, how the work is
# spread, evaluation batch sizes): ignored when grouping.
_NO_RESULT_FLAGS = frozenset({
    "save_model_dir", "overwrite", "rounds_per_checkpoint", "num_workers",
    "ray_address", "backend", "eval_batch_size", "clients_per_thread"})
_MISSING = "-"


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of the table: a run, or a group of repetitions of one setting.

  Attributes:
    runs: the runs (one, or the finished runs of one group).
  """
  runs: tuple[runs_lib.Run, ...]

  @property
  def first(self) -> runs_lib.Run:
    return self.runs[0]

  @property
  def name(self) -> str:
    """The first run's folder name, with "+n" for the others."""
    others = len(self.runs) - 1
    return self.first.name + (f" (+{others})" if others else "")

  def describe(self) -> dict[str, Any]:
    """What the runs are: the table's descriptive columns."""
    run = self.first
    federated = run.trainer == runs_lib.FEDERATED
    epsilon = runs_lib.to_float(run.setting("epsilon"))
    privacy = run.final.get("privacy") or {}
    backends = sorted({str(r.setting("backend", _MISSING))
                       for r in self.runs}) if federated else []
    return {
        "run": self.name,
        "runs": ";".join(r.path for r in self.runs),
        "num_runs": len(self.runs),
        "trainer": _trainer(run),
        "dp_epsilon": epsilon if epsilon > 0 else None,
        "dp_delta": privacy.get("delta") if epsilon > 0 else None,
        "pretrained": bool(run.setting("restore_model_path")) or (
            (run.identity.get("model") or {}).get("normalization")
            == "batch"),
        "labels": _labels(run),
        "iid": bool(run.setting("iid", False)) if federated else None,
        "backend": "/".join(backends) if backends else None,
        "unit": run.unit,
        "completed": min(r.completed for r in self.runs),
        "planned": run.planned,
        "finished": all(r.finished for r in self.runs),
        "seeds": ";".join(str(r.setting("seed", _MISSING))
                          for r in self.runs),
    }

  def metrics(self) -> dict[str, Optional[float]]:
    """`test_<key>`, `val_<key>` (mean over the runs) and `<...>_std`
    (sample standard deviation, groups only) for each `runs.METRICS`
    key, plus `best_val_at` (the first run's epoch or round); None where a
    run has no value (test metrics of an unfinished run)."""
    values = {}
    tests = [r.test_metrics() for r in self.runs]
    bests = [r.best_val() for r in self.runs]
    values["best_val_at"] = bests[0][0]
    for metric in runs_lib.METRICS:
      for prefix, per_run in (
          ("test", [t[metric.key] if t else math.nan for t in tests]),
          ("val", [b[1][metric.key] for b in bests])):
        key = f"{prefix}_{metric.key}"
        known = [v for v in per_run if not math.isnan(v)]
        complete = len(known) == len(per_run)
        values[key] = statistics.fmean(known) if complete and known else None
        values[key + "_std"] = (statistics.stdev(known)
                                if complete and len(known) > 1 else None)
    return values

  def notes(self) -> list[str]:
    return [f"{r.path}: {note}" for r in self.runs for note in r.notes]


def _trainer(run: runs_lib.Run) -> str:
  if run.trainer == runs_lib.FEDERATED:
    algorithm = str(run.setting("algorithm", "fedavg"))
    return {"fedavg": "FedAvg", "fedprox": "FedProx"}.get(algorithm,
                                                          algorithm)
  return run.trainer or "unknown"


def _labels(run: runs_lib.Run) -> str:
  """"17 coarse", "1628 fine-grained", "binary: food"."""
  labels = run.identity.get("labels") or {}
  binary = labels.get("binary_label", run.setting("binary_label"))
  if binary:
    return f"binary: {binary}"
  kind = labels.get("set") or (
      "fine-grained" if run.setting("use_fine_grained_labels") else "coarse")
  count = labels.get("num_labels")
  return f"{count} {kind}" if count else kind


def _group_key(run: runs_lib.Run) -> str:
  """What must agree for runs to be repetitions of one setting: trainer,
  labels, model, and every flag that changes results but a seed."""
  settings = dict(run.identity.get("settings") or {})
  settings.update(run.flags)
  kept = {k: v for k, v in settings.items()
          if k not in SEED_FLAGS and k not in _NO_RESULT_FLAGS}
  return repr(sorted({
      "trainer": run.trainer, "labels": run.identity.get("labels"),
      "model": run.identity.get("model"),
      "settings": sorted(kept.items(), key=lambda kv: kv[0]),
  }.items()))


def make_rows(runs: Sequence[runs_lib.Run], group_seeds: bool = True
             ) -> list[Row]:
  """The table's rows in the order of `runs`: with `group_seeds`, finished
  runs of one setting (`_group_key`) share the row of the first of them;
  unfinished runs keep rows of their own."""
  rows, groups = [], {}
  for run in runs:
    key = _group_key(run) if group_seeds and run.finished else None
    if key is not None and key in groups:
      groups[key].append(run)
      continue
    members = [run]
    if key is not None:
      groups[key] = members
    rows.append(members)
  return [Row(tuple(members)) for members in rows]


def sort_rows(rows: list[Row], column: Optional[str]) -> list[Row]:
  """`rows` sorted by `column` (a CSV column): metrics best first (AP and
  F1 high, loss low), other columns ascending; rows without a value
  last. None keeps the order.

  Raises:
    ValueError: `column` is not a column of the table.
  """
  if column is None:
    return list(rows)
  if column not in CSV_COLUMNS:
    raise ValueError(f"no column {column!r}; the columns: "
                     f"{', '.join(CSV_COLUMNS)}")
  descending = any(column.endswith(f"_{m.key}") and m.higher_is_better
                   for m in runs_lib.METRICS)

  def value(row: Row) -> Any:
    return {**row.describe(), **row.metrics()}.get(column)

  present = [r for r in rows if value(r) is not None]
  missing = [r for r in rows if value(r) is None]
  try:
    present.sort(key=value, reverse=descending)
  except TypeError:
    present.sort(key=lambda r: str(value(r)), reverse=descending)
  return present + missing


def _metric_columns() -> list[str]:
  columns = []
  for prefix in ("test", "val"):
    if prefix == "val":
      columns.append("best_val_at")
    for metric in runs_lib.METRICS:
      columns += [f"{prefix}_{metric.key}", f"{prefix}_{metric.key}_std"]
  return columns


_DESCRIPTIVE_COLUMNS = ["run", "num_runs", "trainer", "dp_epsilon", "dp_delta",
                        "pretrained", "labels", "iid", "backend", "unit",
                        "completed", "planned", "finished", "seeds"]
CSV_COLUMNS = _DESCRIPTIVE_COLUMNS + _metric_columns() + ["runs", "notes"]


def to_csv(rows: Sequence[Row]) -> str:
  """The rows as CSV text: `CSV_COLUMNS`, numbers in full, empty where
  there is no value."""
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
  writer.writeheader()
  for row in rows:
    values = {**row.describe(), **row.metrics(),
              "notes": " | ".join(row.notes())}
    writer.writerow({k: "" if values.get(k) is None else values[k]
                     for k in CSV_COLUMNS})
  return out.getvalue()


def _number(value: Optional[float], std: Optional[float] = None) -> str:
  if value is None:
    return _MISSING
  text = f"{value:.4f}"
  return text if std is None else f"{text} ± {std:.4f}"


def _cells(row: Row) -> list[str]:
  info, values = row.describe(), row.metrics()
  epsilon = info["dp_epsilon"]
  dp = _MISSING
  if epsilon is not None:
    dp = f"ε={epsilon:g}" + (f", δ={info['dp_delta']:.1e}"
                             if info["dp_delta"] else "")
  done = f"{info['completed']}" + (f"/{info['planned']}" if info["planned"]
                                   else "") + f" {info['unit']}s"
  at = values["best_val_at"]
  cells = [info["run"], info["trainer"], dp,
           "yes" if info["pretrained"] else "no", info["labels"],
           _MISSING if info["iid"] is None else
           ("IID" if info["iid"] else "non-IID"),
           info["backend"] or _MISSING, done]
  cells += [_number(values[f"test_{m.key}"], values[f"test_{m.key}_std"])
            for m in runs_lib.METRICS]
  cells.append(_MISSING if at is None else f"{info['unit']} {at:g}")
  cells += [_number(values[f"val_{m.key}"], values[f"val_{m.key}_std"])
            for m in runs_lib.METRICS]
  return cells


def headers() -> list[str]:
  """The Markdown table's column headers."""
  return (["run", "trainer", "DP", "pretrained", "labels", "data",
           "backend", "done"]
          + [f"test {m.label}" for m in runs_lib.METRICS]
          + ["best val at"]
          + [f"val {m.label}" for m in runs_lib.METRICS])


def to_markdown(rows: Sequence[Row]) -> str:
  """The rows as a Markdown table (`headers`; metrics to 4 decimals,
  "mean ± std" for groups, "-" where there is no value), columns padded
  to line up in plain text too. No trailing newline."""
  table = [headers()] + [_cells(row) for row in rows]
  widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]

  def line(cells: list[str]) -> str:
    return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

  rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([line(table[0]), rule] + [line(c) for c in table[1:]])
