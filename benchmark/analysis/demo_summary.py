"""The demo's results: one table of test metrics per setting, and a figure.

`benchmark.demo` collects one run per training setting (central, FedAvg, ...)
and hands them here: `summary_rows` turns each run's `final_metrics.json` into
a row (test metrics, wall time, DP guarantee), `format_table` prints the rows,
`write_summary` stores them as `summary.json` and `summary.csv`, and
`plot_val_metrics` draws each run's validation metrics from its
`metrics.csv` into `val_metrics.png`. This module owns those file names.
"""

import csv
import math
import os
from typing import Any

from benchmark.core import constants
from benchmark.core import file_io

# Files in the demo's results folder.
SUMMARY_CSV_FILE = "summary.csv"
SUMMARY_JSON_FILE = "summary.json"
VAL_METRICS_FIGURE = "val_metrics.png"


def _read_csv(path: str) -> list[dict[str, str]]:
  if not os.path.exists(path):
    return []
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _float(value: Any) -> float:
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


def summary_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per setting: test metrics, wall time and DP guarantee.

  Args:
    runs: dicts with keys `setting`, `final_metrics` (the `final_metrics.json`
      content) and `wall_time_s` (seconds).

  Returns:
    Rows with keys setting, macro_averaged_precision, micro_averaged_precision,
    macro_f1, loss (all on the test partition; NaN when missing),
    wall_time_s, privacy (a text: "(eps, delta)-DP, z=<noise multiplier>" or
    "none").
  """
  rows = []
  for run in runs:
    test = run["final_metrics"].get("test", {})
    privacy = run["final_metrics"].get("privacy")
    if privacy:
      guarantee = (f"({privacy['epsilon']:g}, {privacy['delta']:.1e})-DP, "
                   f"z={privacy['noise_multiplier']:.3f}")
    else:
      guarantee = "none"
    rows.append({
        "setting": run["setting"],
        "macro_averaged_precision": _float(
            test.get("macro_averaged_precision")),
        "micro_averaged_precision": _float(
            test.get("micro_averaged_precision")),
        "macro_f1": _float(test.get("macro_f1")),
        "loss": _float(test.get("loss")),
        "wall_time_s": run["wall_time_s"],
        "privacy": guarantee,
    })
  return rows


def format_table(rows: list[dict[str, Any]]) -> str:
  """Formats `summary_rows` output as a fixed-width text table (a header
  line, a rule, one line per row; no trailing newline)."""
  headers = ["setting", "macro AP", "micro AP", "macro F1", "loss",
             "wall time", "privacy"]
  cells = [[
      r["setting"], f"{r['macro_averaged_precision']:.4f}",
      f"{r['micro_averaged_precision']:.4f}", f"{r['macro_f1']:.4f}",
      f"{r['loss']:.4f}", f"{r['wall_time_s']:.0f} s", r["privacy"]
  ] for r in rows]
  widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in
            enumerate(headers)]
  lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)),
           "  ".join("-" * w for w in widths)]
  lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths))
            for cell in cells]
  return "\n".join(lines)


def write_summary(out_dir: str, rows: list[dict[str, Any]]) -> None:
  """Writes `rows` (`summary_rows`, at least one) as `SUMMARY_JSON_FILE` (a
  JSON list) and `SUMMARY_CSV_FILE` (a header of the row keys, one line per
  row) into `out_dir`, each atomically.

  Raises:
    errors.OutputWriteError: a storage failure (`file_io.atomic_path`).
  """
  file_io.write_json_atomic(os.path.join(out_dir, SUMMARY_JSON_FILE), rows)
  with file_io.atomic_path(os.path.join(out_dir, SUMMARY_CSV_FILE)) as tmp:
    with open(tmp, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)


def plot_val_metrics(runs: list[dict[str, Any]], png_path: str) -> None:
  """Plots val macro averaged precision and val loss per epoch (central) and
  per round (federated) from each run's `metrics.csv`, into `png_path`.

  Args:
    runs: dicts with keys `setting` (the legend) and `save_dir` (the folder
      holding the run's `constants.METRICS_CSV_FILE`; a missing file or
      empty values draw nothing).
    png_path: the PNG written (atomically).

  Raises:
    errors.OutputWriteError: a storage failure (`file_io.atomic_path`).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), squeeze=False)
  panels = (("macro_averaged_precision", "val macro averaged precision"),
            ("loss", "val loss"))
  for col, (step_key, step_label) in enumerate((("epoch", "epoch"),
                                                ("round", "round"))):
    for row, (metric, metric_label) in enumerate(panels):
      ax = axes[row][col]
      max_step = 1.0
      for run in runs:
        records = _read_csv(os.path.join(run["save_dir"],
                                         constants.METRICS_CSV_FILE))
        points = [(_float(r.get(step_key)), _float(r.get(f"val_{metric}")))
                  for r in records if r.get(step_key) not in (None, "")]
        points = [(x, y) for x, y in points if not math.isnan(y)]
        if step_key == "epoch":
          # Keras' CSVLogger counts epochs from 0; show them from 1.
          points = [(x + 1, y) for x, y in points]
        if points:
          xs, ys = zip(*points)
          max_step = max(max_step, *xs)
          ax.plot(xs, ys, marker="o", markersize=3, label=run["setting"])
      # From 0 (the initial model) so that a run of one epoch still shows
      # whole-number ticks.
      ax.set_xlim(-0.05 * max_step, 1.05 * max_step)
      ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
      ax.set_xlabel(step_label)
      ax.set_ylabel(metric_label)
      ax.set_title(f"{metric_label} by {step_label}")
      ax.grid(alpha=0.3)
      if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=9)
  fig.suptitle("FLAIR demo: validation metrics", fontsize=13)
  fig.tight_layout()
  with file_io.atomic_path(png_path) as tmp:
    fig.savefig(tmp, format="png", dpi=110)
  plt.close(fig)
