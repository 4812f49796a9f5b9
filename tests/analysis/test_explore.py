"""Tests of the `python -m benchmark.explore` command, run as a user runs it:
the printed report is report.txt, the files are written, and bad input or a
positional argument ends it with one error line and exit status 1."""

import json
import os
import subprocess
import sys

from benchmark.analysis import dataset_figures
from benchmark.analysis import dataset_report

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _run_cli(*args):
  return subprocess.run(
      [sys.executable, "-m", "benchmark.explore", *args], cwd=REPO_ROOT,
      capture_output=True, text=True, timeout=300)


def test_cli_on_real_sample_bad_input_and_positional_arguments(
    flair_sample_dir, tmp_path):
  out = tmp_path / "cli"
  result = _run_cli("--dataset_dir", flair_sample_dir, "--output_dir",
                    str(out), "--num_sample_users", "2")
  assert result.returncode == 0, result.stderr
  assert result.stdout == (out / dataset_report.REPORT_TEXT_FILE).read_text()
  assert all((out / name).is_file() for name in dataset_figures.FIGURES)
  report = json.loads((out / dataset_report.REPORT_JSON_FILE).read_text())
  assert len(report["sample_users"]) == 2

  result = _run_cli("--dataset_dir", str(tmp_path / "missing"),
                    "--output_dir", str(out))
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  error_lines = [l for l in result.stderr.splitlines()
                 if l.startswith("error:")]
  assert len(error_lines) == 1 and "--dataset_dir" in error_lines[0]

  result = _run_cli("--dataset_dir", flair_sample_dir, "--output_dir",
                    str(tmp_path / "other"), "extra")
  assert result.returncode == 1
  assert "error: unexpected positional arguments: extra" in result.stderr
  assert not (tmp_path / "other").exists()
