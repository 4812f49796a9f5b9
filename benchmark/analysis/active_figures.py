"""The report's federated active-learning figure: test macro AP against
labelled images, one line per strategy (the mean over its runs, e.g. seeds,
with a band of one standard deviation), from each run's `cycles.csv`
(`benchmark.active_main`)."""

import csv
import json
import os
import statistics
from typing import Sequence

from benchmark.core import constants
from benchmark.core import file_io

# What active_main writes (benchmark.active.records; read here without
# importing the trainer, which loads TensorFlow).
CYCLES_CSV_FILE = "cycles.csv"
ACTIVE_TRAINER = "active"
_LABELLED = "labelled_images"
_TEST_MACRO_AP = "test_macro_averaged_precision"


def _read_cycles(path: str) -> list[tuple[float, float]]:
  """`(labelled images, test macro AP)` of each evaluated cycle of a run."""
  points = []
  with open(os.path.join(path, CYCLES_CSV_FILE), newline="",
            encoding="utf-8") as f:
    for row in csv.DictReader(f):
      try:
        points.append((float(row[_LABELLED]), float(row[_TEST_MACRO_AP])))
      except (KeyError, TypeError, ValueError):
        continue  # Not evaluated yet (a run stopped mid-cycle).
  return points


def curves_by_strategy(paths: Sequence[str]
                       ) -> dict[str, list[list[tuple[float, float]]]]:
  """`{strategy: [each run's (labelled images, test macro AP) per cycle]}`
  of the active-learning runs among `paths` (run directories); other runs,
  and runs without an evaluated cycle, are left out."""
  curves = {}
  for path in paths:
    try:
      with open(os.path.join(path, constants.RUN_IDENTITY_FILE),
                encoding="utf-8") as f:
        identity = json.load(f)
      if identity.get("trainer") != ACTIVE_TRAINER:
        continue
      points = _read_cycles(path)
    except (OSError, ValueError):
      continue
    strategy = (identity.get("settings") or {}).get("strategy", "?")
    if points:
      curves.setdefault(str(strategy), []).append(points)
  return curves


def _mean_curve(runs: list[list[tuple[float, float]]]
               ) -> tuple[list[float], list[float], list[float]]:
  """Labelled images, mean and std of AP at each cycle all `runs` have."""
  cycles = min(len(points) for points in runs)
  xs = [statistics.fmean(r[c][0] for r in runs) for c in range(cycles)]
  values = [[r[c][1] for r in runs] for c in range(cycles)]
  means = [statistics.fmean(v) for v in values]
  stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
  return xs, means, stds


def plot_active_learning(paths: Sequence[str], png_path: str) -> bool:
  """Draws `curves_by_strategy(paths)` into `png_path` (PNG, written
  atomically); returns False, writing nothing, when no path is an
  active-learning run with an evaluated cycle.

  Raises:
    errors.OutputWriteError: a storage failure (`file_io.atomic_path`).
  """
  curves = curves_by_strategy(paths)
  if not curves:
    return False
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for strategy, runs in sorted(curves.items()):
    xs, means, stds = _mean_curve(runs)
    line, = ax.plot(xs, means, marker="o", markersize=3,
                    label=f"{strategy} ({len(runs)} run(s))")
    if len(runs) > 1:
      ax.fill_between(xs, [m - s for m, s in zip(means, stds)],
                      [m + s for m, s in zip(means, stds)],
                      color=line.get_color(), alpha=0.2, linewidth=0)
  ax.set_xlabel("labelled images")
  ax.set_ylabel("test macro AP")
  ax.set_title("Federated active learning")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  with file_io.atomic_path(png_path, flag="--output_dir") as tmp:
    fig.savefig(tmp, format="png", dpi=110)
  plt.close(fig)
  return True
