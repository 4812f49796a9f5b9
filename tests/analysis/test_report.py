"""Tests of `python -m benchmark.report`: two finished runs, an unfinished
one and a folder that is not a run, checked against the runs' files; the
command's one-line errors (tests/run_dirs.py writes the runs as the
trainers do)."""

import csv
import os
import subprocess
import sys

import pytest

from benchmark import report
from benchmark.core import errors
import run_dirs

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


@pytest.fixture
def four_folders(tmp_path):
  """`(folders, final metrics by name)`: central and fedavg_dp finished,
  fedavg unfinished (3 of 10 rounds), dataset not a run."""
  runs = tmp_path / "runs"
  finals = {
      "central": run_dirs.central_run(str(runs / "central"), test_base=0.3),
      "fedavg_dp": run_dirs.federated_run(str(runs / "fedavg_dp"),
                                          epsilon=8.0, test_base=0.45),
      "fedavg": run_dirs.federated_run(str(runs / "fedavg"), total_rounds=10,
                                       rounds_done=3, finished=False),
  }
  (runs / "dataset").mkdir()
  folders = [str(runs / n) for n in ("central", "fedavg_dp", "fedavg",
                                     "dataset")]
  return folders, finals


def test_report_rows_match_the_runs_files(four_folders, tmp_path):
  folders, finals = four_folders
  out = str(tmp_path / "report")
  printed = report.make_report(folders, out)
  with open(os.path.join(out, report.RESULTS_CSV), newline="") as f:
    rows = {r["run"]: r for r in csv.DictReader(f)}
  assert list(rows) == ["central", "fedavg_dp", "fedavg"]
  for name in ("central", "fedavg_dp"):
    test = finals[name]["test"]
    assert float(rows[name]["test_macro_ap"]) == test[
        "macro_averaged_precision"]
    assert float(rows[name]["test_micro_f1"]) == test["micro_f1"]
    assert float(rows[name]["test_loss"]) == test["loss"]
    assert float(rows[name]["val_loss"]) == finals[name]["val"]["loss"]
  assert rows["fedavg_dp"]["dp_epsilon"] == "8.0"
  assert rows["fedavg_dp"]["best_val_at"] == "4.0"
  assert rows["fedavg"]["test_macro_ap"] == ""
  assert rows["fedavg"]["completed"] == "3"
  with open(os.path.join(folders[2], "metrics.csv"), newline="") as f:
    best = min(csv.DictReader(f), key=lambda r: float(r["val_loss"]))
  assert float(rows["fedavg"]["val_macro_ap"]) == float(
      best["val_macro_averaged_precision"])
  # The Markdown file is the printed table; notes name what is missing.
  with open(os.path.join(out, report.RESULTS_MARKDOWN)) as f:
    markdown = f.read().strip()
  assert printed.startswith(markdown)
  assert len(markdown.splitlines()) == 5
  notes = [l for l in printed.splitlines() if l.startswith("note: ")]
  assert notes == [
      f"note: {folders[3]}: not a run directory (none of run.json, "
      "flags.json, metrics.csv, final_metrics.json in it or its "
      "sub-folders)",
      f"note: {folders[2]}: unfinished: 3 of 10 rounds done, no test "
      "metrics yet"]
  with open(os.path.join(out, report.VAL_CURVES_FIGURE), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_report_without_a_run_is_one_line_error(tmp_path):
  with pytest.raises(errors.FlairInputError, match="name the runs"):
    report.make_report([], str(tmp_path / "out"))
  with pytest.raises(errors.FlairInputError,
                     match="no run directory among"):
    report.make_report([str(tmp_path)], str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")
  run_dirs.central_run(str(tmp_path / "c"))
  with pytest.raises(errors.FlairInputError, match="--sort_by: no column"):
    report.make_report([str(tmp_path / "c")], str(tmp_path / "out"),
                       sort_by="nope")


def _report_command(*args, cwd):
  return subprocess.run(
      [sys.executable, "-m", "benchmark.report", *args], cwd=cwd,
      env=dict(os.environ, PYTHONPATH=REPO_ROOT), capture_output=True,
      text=True, timeout=300, check=False)


def test_report_command_takes_a_glob_and_prints_the_table(four_folders,
                                                          tmp_path):
  folders, _ = four_folders
  glob_of_runs = os.path.join(os.path.dirname(folders[0]), "*")
  result = _report_command(glob_of_runs, "--sort_by=test_macro_ap",
                           cwd=str(tmp_path))
  assert result.returncode == 0, result.stderr
  assert result.stderr == ""
  lines = result.stdout.splitlines()
  # Sorted best test macro AP first; the unfinished run last.
  assert [l.split("|")[1].strip() for l in lines[2:5]] == [
      "fedavg_dp", "central", "fedavg"]
  [table_line] = [l for l in lines if l.startswith("Table: ")]
  out_dir = os.path.dirname(table_line[len("Table: "):].split(" (")[0])
  assert os.path.dirname(out_dir) == os.path.join(str(tmp_path), "reports")


def test_report_command_errors_are_one_line(tmp_path):
  result = _report_command(str(tmp_path / "missing"), cwd=str(tmp_path))
  assert result.returncode == 1
  assert result.stderr.splitlines() == [
      f"error: no run directory among {tmp_path / 'missing'} "
      f"({tmp_path / 'missing'}: does not exist)"]
