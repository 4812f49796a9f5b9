"""Fast tests of `benchmark.demo`'s steps, with the commands it starts
replaced (the whole `make demo` path runs at tiny scale in
tests/test_readme.py; the report it ends with is tested in
tests/analysis/test_report.py)."""

import os
import shlex
import sys

import pytest

from benchmark import demo
from benchmark.core import constants
from benchmark.core import errors


@pytest.fixture
def started(monkeypatch):
  """The commands the demo starts (argv lists), none of them run."""
  commands = []
  monkeypatch.setattr(demo, "_run_step",
                      lambda argv: commands.append(argv) or 1.0)
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
                     "benchmark.federated_main", "benchmark.report"]
  assert all(argv[:2] == [sys.executable, "-m"] for argv in started)
  assert f"--dataset_dir={os.path.join(out, 'dataset')}" in started[0]
  assert "--num_users=24" in started[0]  # tiny's users, not --num_users
  settings = ["central", "fedavg", "fedavg_dp"]
  for argv, setting in zip(started[2:5], settings):
    # The run's folder is the first flag, named after the setting.
    assert argv[3] == f"--save_model_dir={os.path.join(out, setting)}"
    assert f"--tfrecords_dir={os.path.join(out, 'tfrecords')}" in argv
    assert "--seed=3" in argv and "--image_height=24" in argv
  # The report compares the three runs, into the results folder.
  assert started[5][3:] == [f"--output_dir={out}"] + [
      os.path.join(out, s) for s in settings]
  printed = capsys.readouterr().out
  assert [l for l in printed.splitlines() if l.startswith("=== ")] == [
      "=== 1/6 generating a FLAIR-like dataset (24 users)",
      "=== 2/6 preparing per-user TFRecords",
      "=== 3/6 centralized training (1 epochs, 24x24 crops)",
      "=== 4/6 FedAvg: 2 rounds of 5 clients",
      "=== 5/6 FedAvg with central DP (epsilon 8): 2 rounds of 5 clients",
      "=== 6/6 comparing the runs"]
  assert printed.splitlines()[-1] == f"Results: {out}"


def test_run_demo_with_iid_runs_fedavg_on_flair_iid_beside_non_iid(
    tmp_path, started):
  out = demo.run_demo(str(tmp_path), scale="tiny", iid=True)
  federated = [c for c in started if "benchmark.federated_main" in c]
  assert len(federated) == 3
  assert ["--iid" in c for c in federated] == [False, True, False]
  assert any(a.startswith("--epsilon=") and a != "--epsilon=0.0"
             for a in federated[2])
  assert started[-1][4:] == [os.path.join(out, s) for s in (
      "central", "fedavg", "fedavg_iid", "fedavg_dp")]


def test_a_step_is_printed_as_it_can_be_run_again(capsys):
  argv = [sys.executable, "-c", "import sys; print('step ran', sys.argv[1])",
          "a b"]
  demo._run_step(argv)  # pylint: disable=protected-access
  printed = capsys.readouterr().out.splitlines()
  assert printed[0].startswith("$ ")
  assert shlex.split(printed[0][2:]) == argv  # interpreter and quoting


def test_a_failing_step_stops_the_demo_in_one_line():
  argv = [sys.executable, "-c", "raise SystemExit(3)"]
  with pytest.raises(errors.FlairInputError,
                     match="demo step failed with exit code 3"):
    demo._run_step(argv)  # pylint: disable=protected-access
