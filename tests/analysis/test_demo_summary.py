"""Tests of the demo's summary (benchmark.analysis.demo_summary): the table's
rows from each run's final metrics, the summary files and the validation
plot (the whole `make demo` path runs at tiny scale in tests/test_readme.py)."""

import csv
import json
import math
import os

import pytest

from benchmark.analysis import demo_summary


def _final(macro_ap, loss, privacy=None):
  metrics = {"macro_averaged_precision": macro_ap,
             "micro_averaged_precision": macro_ap + 0.1, "macro_f1": 0.25,
             "loss": loss}
  final = {"val": dict(metrics), "test": dict(metrics)}
  if privacy:
    final["privacy"] = privacy
  return final


def _write_metrics_csv(path, step_key, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=[step_key, "val_loss",
                                           "val_macro_averaged_precision"])
    writer.writeheader()
    writer.writerows(rows)


def test_summary_rows_take_test_metrics_and_privacy():
  privacy = {"epsilon": 8.0, "delta": 2.5e-3, "noise_multiplier": 0.61}
  runs = [
      dict(setting="central", final_metrics=_final(0.5, 0.3), wall_time_s=12.0),
      dict(setting="fedavg_dp", final_metrics=_final(0.4, 0.4, privacy),
           wall_time_s=30.0),
  ]
  rows = demo_summary.summary_rows(runs)
  assert [r["setting"] for r in rows] == ["central", "fedavg_dp"]
  assert rows[0]["macro_averaged_precision"] == 0.5
  assert rows[0]["micro_averaged_precision"] == pytest.approx(0.6)
  assert rows[1]["loss"] == 0.4
  assert rows[0]["privacy"] == "none"
  assert "(8, 2.5e-03)-DP" in rows[1]["privacy"]
  assert "z=0.610" in rows[1]["privacy"]
  table = demo_summary.format_table(rows).splitlines()
  assert table[0].split()[:3] == ["setting", "macro", "AP"]
  assert table[2].startswith("central") and "0.5000" in table[2]
  assert "30 s" in table[3]


def test_write_summary_writes_json_and_csv(tmp_path):
  runs = [dict(setting="central", final_metrics={}, wall_time_s=3.0)]
  rows = demo_summary.summary_rows(runs)
  demo_summary.write_summary(str(tmp_path), rows)
  with open(tmp_path / demo_summary.SUMMARY_CSV_FILE, newline="") as f:
    (row,) = list(csv.DictReader(f))
  assert list(row) == list(rows[0])
  assert row["setting"] == "central" and row["privacy"] == "none"
  (stored,) = json.loads((tmp_path / demo_summary.SUMMARY_JSON_FILE
                          ).read_text())
  assert math.isnan(stored["loss"])  # no test metrics: NaN, as in the table
  assert stored["wall_time_s"] == 3.0
  assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_plot_val_metrics_writes_png(tmp_path):
  central_dir = str(tmp_path / "central")
  fed_dir = str(tmp_path / "fedavg")
  _write_metrics_csv(os.path.join(central_dir, "metrics.csv"), "epoch",
                     [{"epoch": e, "val_loss": 1.0 / (e + 1),
                       "val_macro_averaged_precision": 0.1 * e}
                      for e in range(3)])
  # Federated rows without evaluation leave the val columns empty.
  _write_metrics_csv(os.path.join(fed_dir, "metrics.csv"), "round",
                     [{"round": r, "val_loss": "" if r % 2 else 0.5,
                       "val_macro_averaged_precision": "" if r % 2 else 0.3}
                      for r in range(1, 5)])
  png = str(tmp_path / "val.png")
  runs = [dict(setting="central", save_dir=central_dir),
          dict(setting="fedavg", save_dir=fed_dir)]
  demo_summary.plot_val_metrics(runs, png)
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.path.getsize(png) > 20_000
  assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []
