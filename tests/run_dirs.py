"""Run directories as the trainers write them today (run.json, flags.json,
metrics.csv, final_metrics.json; the files and columns of a real tiny
central run and a real federated run of the sample), for the tests of
`benchmark.analysis.runs` and `benchmark.report`: the report must read
runs written before it existed."""

import csv
import json
import os
from typing import Optional

_METRICS = ("loss", "macro_averaged_precision", "micro_averaged_precision",
            "macro_precision", "macro_recall", "macro_f1", "micro_precision",
            "micro_recall", "micro_f1")
_LABELS = {"binary_label": None, "names_sha256": "a92bd4c9" * 8,
           "num_labels": 12, "set": "coarse"}


def _metrics(base: float) -> dict[str, float]:
  """A metrics dict whose values follow from `base` (loss = 1 - base)."""
  values = {name: round(base + 0.01 * i, 6) for i, name in enumerate(_METRICS)}
  values["loss"] = round(1.0 - base, 6)
  return values


def _write_json(path: str, value) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, sort_keys=True)


def _write_identity(path: str, trainer: str, settings: dict) -> None:
  """run.json of a run of the tiny network on 12 coarse labels."""
  _write_json(os.path.join(path, "run.json"), {
      "labels": _LABELS, "model": {"architecture": "tiny",
                                   "normalization": "group",
                                   "num_outputs": 12},
      "settings": settings, "trainer": trainer})


def _write_csv(path: str, columns: list[str], rows: list[dict]) -> None:
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows({c: row.get(c, "") for c in columns} for row in rows)


def central_run(path: str, num_epochs: int = 3, epochs_done: int = 3,
                finished: bool = True, seed: int = 0,
                learning_rate: float = 1e-4, val_bases=None,
                test_base: float = 0.3) -> dict:
  """A central run: `epochs_done` rows of metrics.csv (epoch from 0, the
  val metrics of `val_bases[e]`), final_metrics.json when `finished` (the
  best epoch's val metrics, test metrics of `test_base`). Returns
  final_metrics.json's content (or {})."""
  os.makedirs(path, exist_ok=True)
  val_bases = val_bases or [0.1 + 0.05 * e for e in range(epochs_done)]
  settings = {"binary_label": None, "clipnorm": 10.0, "image_height": 32,
              "image_width": 32, "learning_rate": learning_rate,
              "precision": "float32", "restore_model_path": None,
              "seed": seed, "skip_bad_records": False, "train_batch_size": 8,
              "use_fine_grained_labels": False}
  _write_identity(path, "central", settings)
  _write_json(os.path.join(path, "flags.json"), dict(
      settings, eval_batch_size=8, model_layout="tiny",
      num_epochs=num_epochs, overwrite=False, save_model_dir=path,
      tfrecords_dir="/data/tfrecords"))
  columns = ["epoch"] + list(_METRICS) + [f"val_{m}" for m in _METRICS]
  rows = []
  for epoch in range(epochs_done):
    row = {"epoch": epoch, **_metrics(0.2)}
    row.update({f"val_{k}": v for k, v in _metrics(val_bases[epoch]).items()})
    rows.append(row)
  _write_csv(os.path.join(path, "metrics.csv"), columns, rows)
  if not finished:
    return {}
  best = max(val_bases[:epochs_done])  # The lowest val loss (1 - base).
  final = {"val": _metrics(best), "test": _metrics(test_base)}
  _write_json(os.path.join(path, "final_metrics.json"), final)
  return final


def federated_run(path: str, total_rounds: int = 4, rounds_done: int = 4,
                  finished: bool = True, seed: int = 0,
                  epsilon: float = 0.0, iid: bool = False,
                  backend: str = "inprocess", test_base: float = 0.4,
                  final_rounds: Optional[int] = None) -> dict:
  """A federated run evaluated every round: metrics.csv rounds 0 to
  `rounds_done` (val metrics of base 0.1 + 0.05 * round), final_metrics.json
  when `finished` (best round `rounds_done`, `final_rounds` completed:
  default all; with `epsilon` its privacy). Returns final_metrics.json's
  content (or {})."""
  os.makedirs(path, exist_ok=True)
  settings = {"algorithm": "fedavg", "binary_label": None,
              "client_batch_size": 4, "client_datasets_random_seed": seed,
              "clients_per_round": 3, "epsilon": epsilon,
              "image_height": 32, "image_width": 32, "seed": seed,
              "restore_model_path": None, "skip_bad_records": False,
              "use_fine_grained_labels": False}
  _write_identity(path, "federated", settings)
  _write_json(os.path.join(path, "flags.json"), dict(
      settings, backend=backend, eval_batch_size=8, iid=iid, iid_seed=seed,
      model_layout="tiny", overwrite=False, rounds_per_eval=1,
      save_model_dir=path, tfrecords_dir="/data/tfrecords",
      total_rounds=total_rounds))
  columns = (["round", "client_update_norm_mean", "eval_time_s",
              "round_time_s", "train_loss"]
             + [f"val_{m}" for m in _METRICS])
  rows = []
  for round_num in range(rounds_done + 1):
    row = {"round": round_num, "eval_time_s": 0.2}
    if round_num:
      row.update(client_update_norm_mean=0.1, round_time_s=1.5,
                 train_loss=0.9)
    row.update({f"val_{k}": v for k, v in
                _metrics(0.1 + 0.05 * round_num).items()})
    rows.append(row)
  _write_csv(os.path.join(path, "metrics.csv"), columns, rows)
  if not finished:
    return {}
  final = {"val": _metrics(0.1 + 0.05 * rounds_done),
           "test": _metrics(test_base), "best_round": rounds_done,
           "rounds_completed": final_rounds or rounds_done}
  if epsilon:
    final["privacy"] = {"delta": 0.0371, "epsilon": epsilon,
                        "noise_multiplier": 0.3865,
                        "guarantee": f"({epsilon:g}, 0.0371)-DP at the user "
                                     "level"}
  _write_json(os.path.join(path, "final_metrics.json"), final)
  return final
