"""The report's active-learning figure (benchmark/analysis/
active_figures.py): test macro AP against labelled images, one line per
strategy, from the runs' cycles.csv; other runs are left out."""

import json
import os

from benchmark import report
from benchmark.analysis import active_figures
from benchmark.core import constants

_HEADER = ("cycle,rounds_completed,labelled_images,pool_images,"
           "labelled_users,chosen_images,val_macro_averaged_precision,"
           "val_micro_averaged_precision,val_loss,test_macro_averaged_precision,"
           "test_micro_averaged_precision,test_loss\n")


def _run(directory, trainer, strategy, rows):
  os.makedirs(directory)
  with open(os.path.join(directory, constants.RUN_IDENTITY_FILE), "w") as f:
    json.dump({"trainer": trainer, "settings": {"strategy": strategy}}, f)
  with open(os.path.join(directory, active_figures.CYCLES_CSV_FILE), "w") as f:
    f.write(_HEADER)
    for cycle, (labelled, ap) in enumerate(rows, 1):
      f.write(f"{cycle},{2 * cycle},{labelled},10,3,5,0.1,0.2,0.3,"
              f"{ap},0.5,0.6\n")
  return str(directory)


def test_runs_are_grouped_by_strategy_and_other_runs_left_out(tmp_path):
  paths = [
      _run(tmp_path / "kafal-0", "active", "kafal", [(10, 0.2), (15, 0.3)]),
      _run(tmp_path / "kafal-1", "active", "kafal", [(10, 0.4), (15, 0.5)]),
      _run(tmp_path / "random-0", "active", "random", [(10, 0.1), (15, "")]),
      _run(tmp_path / "fedavg", "federated", None, [(10, 0.9)])]
  curves = active_figures.curves_by_strategy(paths)
  assert curves == {"kafal": [[(10.0, 0.2), (15.0, 0.3)],
                              [(10.0, 0.4), (15.0, 0.5)]],
                    "random": [[(10.0, 0.1)]]}  # Cycle 2 not evaluated.
  png = tmp_path / "active.png"
  assert active_figures.plot_active_learning(paths, str(png))
  assert png.read_bytes().startswith(b"\x89PNG")
  assert not active_figures.plot_active_learning(paths[3:], str(tmp_path / "x"))
  assert not (tmp_path / "x").exists()


def test_the_report_draws_it_for_active_runs(tmp_path):
  _run(tmp_path / "runs" / "kafal-0", "active", "kafal", [(10, 0.2)])
  out = tmp_path / "report"
  printed = report.make_report([str(tmp_path / "runs" / "*")], str(out))
  figure = out / report.ACTIVE_FIGURE
  assert f"Figure: {figure}" in printed
  assert figure.read_bytes().startswith(b"\x89PNG")
