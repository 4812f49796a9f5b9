"""The report's figure: validation metrics against epochs (central runs)
and rounds (federated runs), one line per row of the results table; a
group of seeds is its mean, with a band of one standard deviation where
every run of the group has the epoch or round."""

import statistics
from typing import Sequence

from benchmark.analysis import results_table
from benchmark.analysis import runs as runs_lib
from benchmark.core import file_io

# (runs.METRICS key, axis label) of the figure's rows.
PANELS = (("macro_ap", "val macro AP"), ("loss", "val loss"))


def _series(row: results_table.Row, metric: str
           ) -> tuple[list[float], list[float], list[float]]:
  """`(steps, mean values, standard deviations)` of a row's runs."""
  by_step = {}
  for run in row.runs:
    for step, value in run.curve(metric):
      by_step.setdefault(step, []).append(value)
  steps = sorted(s for s, v in by_step.items() if len(v) == len(row.runs))
  means = [statistics.fmean(by_step[s]) for s in steps]
  stds = [statistics.stdev(by_step[s]) if len(by_step[s]) > 1 else 0.0
          for s in steps]
  return steps, means, stds


def plot_val_curves(rows: Sequence[results_table.Row], png_path: str,
                    title: str = "Validation metrics") -> None:
  """Draws `PANELS` (rows of subplots) against epochs and against rounds
  (columns, only those some run counts) into `png_path` (PNG, written
  atomically). Rows without a validation point draw nothing.

  Raises:
    errors.OutputWriteError: a storage failure (`file_io.atomic_path`).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top

  units = [u for u in (runs_lib.EPOCH, runs_lib.ROUND)
           if any(r.first.unit == u for r in rows)] or [runs_lib.ROUND]
  fig, axes = plt.subplots(len(PANELS), len(units), squeeze=False,
                           figsize=(5.5 * len(units), 3.8 * len(PANELS)))
  for col, unit in enumerate(units):
    for row_index, (metric, label) in enumerate(PANELS):
      ax = axes[row_index][col]
      max_step = 1.0
      for row in rows:
        if row.first.unit != unit:
          continue
        steps, means, stds = _series(row, metric)
        if not steps:
          continue
        max_step = max(max_step, *steps)
        line, = ax.plot(steps, means, marker="o", markersize=3,
                        label=row.name)
        if len(row.runs) > 1:
          ax.fill_between(steps, [m - s for m, s in zip(means, stds)],
                          [m + s for m, s in zip(means, stds)],
                          color=line.get_color(), alpha=0.2, linewidth=0)
      ax.set_xlim(-0.05 * max_step, 1.05 * max_step)
      ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
      ax.set_xlabel(unit)
      ax.set_ylabel(label)
      ax.set_title(f"{label} by {unit}")
      ax.grid(alpha=0.3)
      if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=13)
  fig.tight_layout()
  with file_io.atomic_path(png_path, flag="--output_dir") as tmp:
    fig.savefig(tmp, format="png", dpi=110)
  plt.close(fig)


def has_points(rows: Sequence[results_table.Row]) -> bool:
  """Whether any row has a validation point to draw."""
  return any(run.curve(metric) for row in rows for run in row.runs
             for metric, _ in PANELS)
