"""Tests of reading run directories back (benchmark.analysis.runs) and of
the results table made from them (benchmark.analysis.results_table), on
run directories written as the trainers write them (tests/run_dirs.py)."""

import csv
import io
import json
import math
import os
import statistics

import pytest

from benchmark.analysis import results_table
from benchmark.analysis import runs
import run_dirs


def test_a_finished_central_run(tmp_path):
  path = str(tmp_path / "central")
  final = run_dirs.central_run(path, num_epochs=3, val_bases=[0.1, 0.3, 0.2])
  run = runs.read_run(path)
  assert (run.trainer, run.unit, run.planned, run.completed) == (
      "central", "epoch", 3, 3)
  assert run.finished and run.notes == ()
  assert run.test_metrics() == {
      "macro_ap": final["test"]["macro_averaged_precision"],
      "micro_ap": final["test"]["micro_averaged_precision"],
      "macro_f1": final["test"]["macro_f1"],
      "micro_f1": final["test"]["micro_f1"],
      "loss": final["test"]["loss"]}
  # The best epoch (lowest val loss) is the second, counted from 1.
  step, val = run.best_val()
  assert step == 2
  assert val["macro_ap"] == final["val"]["macro_averaged_precision"]
  assert [s for s, _ in run.curve("loss")] == [1, 2, 3]


def test_an_unfinished_federated_run_reports_its_best_val_so_far(tmp_path):
  path = str(tmp_path / "fedavg")
  run_dirs.federated_run(path, total_rounds=10, rounds_done=3,
                         finished=False)
  run = runs.read_run(path)
  assert (run.trainer, run.unit, run.planned, run.completed) == (
      "federated", "round", 10, 3)
  assert not run.finished
  assert run.test_metrics() is None
  step, val = run.best_val()
  with open(os.path.join(path, "metrics.csv"), newline="") as f:
    last = list(csv.DictReader(f))[-1]
  assert step == 3
  assert val["micro_ap"] == float(last["val_micro_averaged_precision"])
  assert run.notes == ("unfinished: 3 of 10 rounds done, no test metrics "
                       "yet",)


def test_final_metrics_of_an_earlier_shorter_part_are_not_final(tmp_path):
  # A finished 4-round run resumed with --total_rounds 10, now at round 6.
  path = str(tmp_path / "resumed")
  run_dirs.federated_run(path, total_rounds=10, rounds_done=6,
                         final_rounds=4)
  run = runs.read_run(path)
  assert not run.finished and run.test_metrics() is None
  assert "earlier, shorter part" in run.notes[0]


def test_missing_and_broken_files_are_notes(tmp_path):
  path = str(tmp_path / "broken")
  run_dirs.federated_run(path)
  with open(os.path.join(path, "run.json"), "w") as f:
    f.write("{not json")
  os.remove(os.path.join(path, "flags.json"))
  run = runs.read_run(path)
  assert run.notes[0].startswith("run.json cannot be read")
  assert run.notes[1] == "no flags.json"
  # What is left still tells: metrics.csv counts rounds.
  assert (run.trainer, run.completed, run.finished) == ("federated", 4, True)


def test_a_binary_label_run_reports_its_one_ap_and_f1(tmp_path):
  path = str(tmp_path / "binary")
  run_dirs.central_run(path)
  binary = {"loss": 0.2, "averaged_precision": 0.7, "precision": 0.5,
            "recall": 0.4, "f1": 0.45}
  with open(os.path.join(path, "final_metrics.json"), "w") as f:
    json.dump({"val": binary, "test": binary}, f)
  assert runs.read_run(path).test_metrics() == {
      "macro_ap": 0.7, "micro_ap": 0.7, "macro_f1": 0.45, "micro_f1": 0.45,
      "loss": 0.2}


def test_find_run_dirs_takes_runs_globs_and_folders_of_runs(tmp_path):
  results = tmp_path / "demo"
  for name in ("central", "fedavg"):
    run_dirs.central_run(str(results / name))
  (results / "dataset").mkdir()
  (tmp_path / "notes.txt").write_text("x")
  found, notes = runs.find_run_dirs([
      str(results), str(results / "c*"), str(results / "dataset"),
      str(tmp_path / "notes.txt"), str(tmp_path / "missing"),
      str(tmp_path / "nothing*")])
  # The folder gives its runs (not dataset/); the glob adds none twice.
  assert found == [str(results / "central"), str(results / "fedavg")]
  assert notes == [
      f"{results / 'dataset'}: not a run directory (none of run.json, "
      "flags.json, metrics.csv, final_metrics.json in it or its "
      "sub-folders)",
      f"{tmp_path / 'notes.txt'}: not a directory",
      f"{tmp_path / 'missing'}: does not exist",
      f"{tmp_path / 'nothing*'}: matches nothing"]


def _csv_rows(rows):
  return list(csv.DictReader(io.StringIO(results_table.to_csv(rows))))


def test_runs_differing_only_by_seed_are_one_row_with_mean_and_std(
    tmp_path):
  finals = [run_dirs.central_run(str(tmp_path / f"seed{s}"), seed=s,
                                 test_base=0.3 + 0.02 * s) for s in range(3)]
  other = run_dirs.central_run(str(tmp_path / "lr"), learning_rate=0.1)
  unfinished = str(tmp_path / "unfinished")
  run_dirs.central_run(unfinished, num_epochs=5, epochs_done=2,
                       finished=False)
  read = [runs.read_run(str(tmp_path / n)) for n in (
      "seed0", "lr", "seed1", "unfinished", "seed2")]
  rows = results_table.make_rows(read)
  assert [r.name for r in rows] == ["seed0 (+2)", "lr", "unfinished"]
  table = _csv_rows(rows)
  aps = [f["test"]["macro_averaged_precision"] for f in finals]
  assert float(table[0]["test_macro_ap"]) == pytest.approx(
      statistics.fmean(aps))
  assert float(table[0]["test_macro_ap_std"]) == pytest.approx(
      statistics.stdev(aps))
  assert table[0]["seeds"] == "0;1;2" and table[0]["num_runs"] == "3"
  assert float(table[1]["test_loss"]) == other["test"]["loss"]
  assert table[1]["test_loss_std"] == ""
  assert table[2]["finished"] == "False" and table[2]["test_loss"] == ""
  assert "unfinished: 2 of 5 epochs" in table[2]["notes"]
  # --nogroup_seeds: one row per run.
  assert len(results_table.make_rows(read, group_seeds=False)) == 5


def test_rows_describe_the_runs(tmp_path):
  run_dirs.federated_run(str(tmp_path / "dp"), epsilon=8.0, iid=True,
                         backend="ray")
  run_dirs.central_run(str(tmp_path / "central"))
  rows = results_table.make_rows([runs.read_run(str(tmp_path / n))
                                  for n in ("dp", "central")])
  dp, central = _csv_rows(rows)
  assert (dp["trainer"], dp["dp_epsilon"], dp["dp_delta"], dp["iid"],
          dp["backend"], dp["labels"], dp["pretrained"]) == (
              "FedAvg", "8.0", "0.0371", "True", "ray", "12 coarse", "False")
  assert (dp["completed"], dp["planned"], dp["unit"]) == ("4", "4", "round")
  assert (central["trainer"], central["dp_epsilon"], central["iid"],
          central["backend"]) == ("central", "", "", "")
  markdown = results_table.to_markdown(rows).splitlines()
  assert len(markdown) == 4  # Header, rule, two rows.
  assert markdown[2].split("|")[3].strip() == "ε=8, δ=3.7e-02"
  assert markdown[2].split("|")[6].strip() == "IID"


def test_sort_rows_puts_the_best_first_and_missing_values_last(tmp_path):
  for name, base in (("low", 0.2), ("high", 0.6), ("mid", 0.4)):
    run_dirs.central_run(str(tmp_path / name), learning_rate=base,
                         test_base=base)
  run_dirs.central_run(str(tmp_path / "running"), num_epochs=9,
                       epochs_done=1, finished=False)
  rows = results_table.make_rows([runs.read_run(str(tmp_path / n)) for n in (
      "low", "running", "high", "mid")])
  by_ap = results_table.sort_rows(rows, "test_macro_ap")
  assert [r.name for r in by_ap] == ["high", "mid", "low", "running"]
  by_loss = results_table.sort_rows(rows, "test_loss")
  assert [r.name for r in by_loss] == ["high", "mid", "low", "running"]
  assert [r.name for r in results_table.sort_rows(rows, "run")] == [
      "high", "low", "mid", "running"]
  with pytest.raises(ValueError, match="no column 'accuracy'"):
    results_table.sort_rows(rows, "accuracy")


def test_metric_values_are_nan_free(tmp_path):
  run_dirs.central_run(str(tmp_path / "c"))
  values = results_table.make_rows([runs.read_run(str(tmp_path / "c"))]
                                   )[0].metrics()
  assert not any(isinstance(v, float) and math.isnan(v)
                 for v in values.values())
