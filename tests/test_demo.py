"""Fast tests of `benchmark.demo`'s steps, with the commands it starts
replaced (the whole `make demo` path runs at tiny scale in
tests/test_readme.py; the summary's table and plot are tested in
tests/analysis/test_demo_summary.py)."""

import csv
import os

import pytest

from benchmark import demo
from benchmark.analysis import demo_summary
from benchmark.core import constants
from benchmark.core import errors


def _final():
  metrics = {"macro_averaged_precision": 0.5, "micro_averaged_precision": 0.6,
             "macro_f1": 0.25, "loss": 0.3}
  return {"val": dict(metrics), "test": dict(metrics)}


@pytest.fixture
def started(monkeypatch):
  """The commands the demo starts (argv lists), none of them run; each run's
  final metrics are `_final()` and no plot is drawn."""
  commands = []
  monkeypatch.setattr(demo, "_run_step",
                      lambda argv: commands.append(argv) or 1.0)
  monkeypatch.setattr(demo, "_read_final_metrics", lambda save_dir: _final())
  monkeypatch.setattr(demo_summary, "plot_val_metrics",
                      lambda runs, path: None)
  return commands


def test_run_demo_rejects_unknown_scale_and_dataset_dir(tmp_path):
  with pytest.raises(errors.FlairInputError, match="--scale"):
    demo.run_demo(str(tmp_path), scale="huge")
  with pytest.raises(errors.FlairInputError,
                     match=f"has no {constants.METADATA_FILE}"):
    demo.run_demo(str(tmp_path), dataset_dir=str(tmp_path))
  assert os.listdir(tmp_path) == []  # refused before the results folder


def test_run_demo_steps_in_order(tmp_path, started, capsys):
  out = demo.run_demo(str(tmp_path), scale="tiny", seed=3)
  modules = [argv[2] for argv in started]
  assert modules == ["benchmark.synthetic_dataset", "prepare_tfrecords",
                     "benchmark.central_main", "benchmark.federated_main",
                     "benchmark.federated_main"]
  assert f"--dataset_dir={os.path.join(out, 'dataset')}" in started[0]
  assert "--num_users=24" in started[0]  # tiny's users, not --num_users
  for argv, setting in zip(started[2:], ["central", "fedavg", "fedavg_dp"]):
    # The run's folder is the first flag, named after the setting.
    assert argv[3] == f"--save_model_dir={os.path.join(out, setting)}"
    assert f"--tfrecords_dir={os.path.join(out, 'tfrecords')}" in argv
    assert "--seed=3" in argv and "--image_height=24" in argv
  printed = capsys.readouterr().out
  assert [l for l in printed.splitlines() if l.startswith("=== ")] == [
      "=== 1/5 generating a FLAIR-like dataset (24 users)",
      "=== 2/5 preparing per-user TFRecords",
      "=== 3/5 centralized training (1 epochs, 24x24 crops)",
      "=== 4/5 FedAvg: 2 rounds of 5 clients",
      "=== 5/5 FedAvg with central DP (epsilon 8): 2 rounds of 5 clients"]
  assert printed.splitlines()[-1] == f"Results: {out}"
  assert os.path.isfile(os.path.join(out, demo_summary.SUMMARY_JSON_FILE))


def test_run_demo_with_iid_runs_fedavg_on_flair_iid_beside_non_iid(
    tmp_path, started):
  out = demo.run_demo(str(tmp_path), scale="tiny", iid=True)
  federated = [c for c in started if "benchmark.federated_main" in c]
  assert len(federated) == 3
  assert ["--iid" in c for c in federated] == [False, True, False]
  assert any(a.startswith("--epsilon=") and a != "--epsilon=0.0"
             for a in federated[2])
  with open(os.path.join(out, demo_summary.SUMMARY_CSV_FILE), newline="") as f:
    settings = [row["setting"] for row in csv.DictReader(f)]
  assert settings == ["central", "fedavg", "fedavg_iid", "fedavg_dp"]
