"""The whole benchmark path in one command, small enough for a laptop CPU.

`make demo` runs `python -m benchmark.demo`, which:
  1. generates a FLAIR-like dataset (`benchmark.synthetic_dataset`), or uses a
     downloaded one given with `--dataset_dir`;
  2. prepares per-user TFRecords (`prepare_tfrecords`);
  3. trains centrally (`benchmark.central_main`), with FedAvg and with FedAvg
     plus central DP (`benchmark.federated_main`), all at a small crop so that
     the run takes minutes on 2 CPU cores; each step is the suite's own
     command, run in a child process and printed first;
     With `--iid`, FedAvg also runs on FLAIR-IID (`federated_main --iid`:
     the same users and image counts, images dealt out at random) beside the
     users' own non-IID data, so the table shows the cost of heterogeneity;
  4. prints one table (test metrics, wall time, DP guarantee), writes it as
     `summary.csv`/`summary.json`, and plots the validation metrics over
     epochs and rounds as `val_metrics.png`, all in one results folder whose
     path is the last line printed.

The settings are a demonstration, not the paper's: 32x32 crops, a few epochs
and rounds. Use the `central_main` / `federated_main` commands for real runs.
"""

import csv
import dataclasses
import datetime
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Optional

from absl import app
from absl import flags

from benchmark.cli import commands
from benchmark.core import constants
from benchmark.core import errors
from benchmark.core import file_io
from benchmark.core import validate

_DEMO_SCALES = ("tiny", "small")
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

@dataclasses.dataclass(frozen=True)
class DemoScale:
  """Training sizes of one demo scale (all counts are positive integers)."""
  crop: int
  num_users: Optional[int]
  central_epochs: int
  central_batch_size: int
  rounds: int
  rounds_per_eval: int
  clients_per_round: int
  client_batch_size: int
  max_elements_per_client: int
  client_epochs_per_round: int
  dp_epsilon: float


# `small` fits the 10-minute budget on a 2-core CPU (measured, README);
# `tiny` only checks the path end to end.
SCALES = {
    "small": DemoScale(crop=32, num_users=None, central_epochs=5,
                       central_batch_size=32, rounds=8, rounds_per_eval=2,
                       clients_per_round=10, client_batch_size=8,
                       max_elements_per_client=16, client_epochs_per_round=2,
                       dp_epsilon=8.0),
    "tiny": DemoScale(crop=24, num_users=24, central_epochs=1,
                      central_batch_size=16, rounds=2, rounds_per_eval=1,
                      clients_per_round=5, client_batch_size=8,
                      max_elements_per_client=8, client_epochs_per_round=1,
                      dp_epsilon=8.0),
}


def _step(message: str) -> None:
  print(f"\n=== {message}", flush=True)


def _read_csv(path: str) -> list[dict[str, str]]:
  if not os.path.exists(path):
    return []
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _float(value: Any) -> float:
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


def summary_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per setting: test metrics, wall time and DP guarantee.

  Args:
    runs: dicts with keys `setting`, `final_metrics` (the `final_metrics.json`
      content) and `wall_time_s` (seconds).

  Returns:
    Rows with keys setting, macro_averaged_precision, micro_averaged_precision,
    macro_f1, loss (all on the test partition), wall_time_s, privacy (a text:
    "(eps, delta)-DP, noise multiplier z" or "none").
  """
  rows = []
  for run in runs:
    test = run["final_metrics"].get("test", {})
    privacy = run["final_metrics"].get("privacy")
    if privacy:
      guarantee = (f"({privacy['epsilon']:g}, {privacy['delta']:.1e})-DP, "
                   f"z={privacy['noise_multiplier']:.3f}")
    else:
      guarantee = "none"
    rows.append({
        "setting": run["setting"],
        "macro_averaged_precision": _float(test.get("macro_averaged_precision")),
        "micro_averaged_precision": _float(test.get("micro_averaged_precision")),
        "macro_f1": _float(test.get("macro_f1")),
        "loss": _float(test.get("loss")),
        "wall_time_s": run["wall_time_s"],
        "privacy": guarantee,
    })
  return rows


def format_table(rows: list[dict[str, Any]]) -> str:
  """Formats `summary_rows` output as a fixed-width text table."""
  headers = ["setting", "macro AP", "micro AP", "macro F1", "loss",
             "wall time", "privacy"]
  cells = [[
      r["setting"], f"{r['macro_averaged_precision']:.4f}",
      f"{r['micro_averaged_precision']:.4f}", f"{r['macro_f1']:.4f}",
      f"{r['loss']:.4f}", f"{r['wall_time_s']:.0f} s", r["privacy"]
  ] for r in rows]
  widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in
            enumerate(headers)]
  lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)),
           "  ".join("-" * w for w in widths)]
  lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths))
            for cell in cells]
  return "\n".join(lines)


def plot_val_metrics(runs: list[dict[str, Any]], png_path: str) -> None:
  """Plots val macro averaged precision and val loss per epoch (central) and
  per round (federated) from each run's `metrics.csv`, into `png_path`."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import MaxNLocator

  fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), squeeze=False)
  panels = (("macro_averaged_precision", "val macro averaged precision"),
            ("loss", "val loss"))
  for col, (step_key, step_label) in enumerate((("epoch", "epoch"),
                                                ("round", "round"))):
    for row, (metric, metric_label) in enumerate(panels):
      ax = axes[row][col]
      max_step = 1.0
      for run in runs:
        records = _read_csv(os.path.join(run["save_dir"],
                                         constants.METRICS_CSV_FILE))
        points = [(_float(r.get(step_key)), _float(r.get(f"val_{metric}")))
                  for r in records if r.get(step_key) not in (None, "")]
        points = [(x, y) for x, y in points if not math.isnan(y)]
        if step_key == "epoch":
          # Keras' CSVLogger counts epochs from 0; show them from 1.
          points = [(x + 1, y) for x, y in points]
        if points:
          xs, ys = zip(*points)
          max_step = max(max_step, *xs)
          ax.plot(xs, ys, marker="o", markersize=3, label=run["setting"])
      # From 0 (the initial model) so that a run of one epoch still shows
      # whole-number ticks.
      ax.set_xlim(-0.05 * max_step, 1.05 * max_step)
      ax.xaxis.set_major_locator(MaxNLocator(integer=True))
      ax.set_xlabel(step_label)
      ax.set_ylabel(metric_label)
      ax.set_title(f"{metric_label} by {step_label}")
      ax.grid(alpha=0.3)
      if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=9)
  fig.suptitle("FLAIR demo: validation metrics", fontsize=13)
  fig.tight_layout()
  with file_io.atomic_path(png_path) as tmp:
    fig.savefig(tmp, format="png", dpi=110)
  plt.close(fig)


def _command(module: str, **flag_values: Any) -> list[str]:
  """`python -m module --flag=value ...` (None values are left out; booleans
  become --flag / --noflag)."""
  argv = [sys.executable, "-m", module]
  for name, value in flag_values.items():
    if value is None:
      continue
    if isinstance(value, bool):
      argv.append(f"--{name}" if value else f"--no{name}")
    else:
      argv.append(f"--{name}={value}")
  return argv


def _run_step(argv: list[str]) -> float:
  """Runs one benchmark command in its own process, its output streaming to
  ours; returns its wall time in seconds.

  Raises:
    FlairInputError: the command failed (its own error is printed above).
  """
  print("$ " + " ".join(argv[1:]), flush=True)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (_REPO_ROOT, os.environ.get("PYTHONPATH")) if p))
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  start = time.monotonic()
  returncode = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL).returncode
  if returncode != 0:
    raise errors.FlairInputError(
        f"demo step failed with exit code {returncode}: "
        f"{' '.join(argv[1:])}")
  return time.monotonic() - start


def _read_final_metrics(save_dir: str) -> dict[str, Any]:
  with open(os.path.join(save_dir, constants.FINAL_METRICS_FILE)) as f:
    return json.load(f)


def run_demo(results_dir: str, dataset_dir: Optional[str] = None,
             num_users: int = 300, seed: int = 0,
             scale: str = "small",
             backend: str = constants.BACKEND_INPROCESS,
             iid: bool = False) -> str:
  """Runs data generation/preparation, central, FedAvg and DP-FedAvg.

  Each step is the suite's own command (`benchmark.synthetic_dataset`,
  `prepare_tfrecords`, `benchmark.central_main`, `benchmark.federated_main`)
  run in a child process, exactly as a user would type it; the commands are
  printed before they run. Wall times include each command's start-up
  (importing TensorFlow, about 10 s).

  Args:
    results_dir: parent folder; a new `demo-<UTC time>` folder is made in it.
    dataset_dir: a downloaded FLAIR dataset; `None` generates one.
    num_users: users of the generated dataset (overridden by `scale` "tiny").
    seed: seed for generation, model initialisation and client sampling.
    scale: a key of `SCALES`.
    backend: the FedAvg runs' `--backend` (`constants.BACKENDS`).
    iid: also run FedAvg on FLAIR-IID (setting `fedavg_iid`, after
      `fedavg`).

  Returns:
    The results folder (summary.csv, summary.json, val_metrics.png and one
    sub-folder per setting with its own outputs).

  Raises:
    FlairInputError: bad `dataset_dir` or `scale`, or a step failed.
  """
  if scale not in SCALES:
    raise errors.FlairInputError(
        f"--scale must be one of {', '.join(SCALES)}, got {scale!r}")
  sizes = SCALES[scale]
  if dataset_dir is not None and not os.path.isfile(
      os.path.join(dataset_dir, constants.METADATA_FILE)):
    raise errors.FlairInputError(
        f"--dataset_dir {dataset_dir} has no {constants.METADATA_FILE}; "
        "expected a downloaded FLAIR dataset (see download_dataset.py)")
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime(
      "%Y%m%d-%H%M%S")
  out_dir = os.path.abspath(os.path.join(results_dir, f"demo-{stamp}"))
  os.makedirs(out_dir, exist_ok=True)

  total_steps = 6 if iid else 5
  if dataset_dir is None:
    dataset_dir = os.path.join(out_dir, "dataset")
    users = sizes.num_users or num_users
    _step(f"1/{total_steps} generating a FLAIR-like dataset ({users} users)")
    _run_step(_command("benchmark.synthetic_dataset", dataset_dir=dataset_dir,
                       num_users=users, seed=seed))
  else:
    _step(f"1/{total_steps} using the dataset in {dataset_dir}")

  tfrecords_dir = os.path.join(out_dir, "tfrecords")
  _step(f"2/{total_steps} preparing per-user TFRecords")
  # One worker: at demo scale, worker processes would spend longer importing
  # TensorFlow than writing (scripts/bench_prepare.py).
  _run_step(_command("prepare_tfrecords", dataset_dir=dataset_dir,
                     tfrecords_dir=tfrecords_dir, num_workers=1))

  runs = []
  common = dict(tfrecords_dir=tfrecords_dir, image_height=sizes.crop,
                image_width=sizes.crop, eval_batch_size=128, seed=seed)

  _step(f"3/{total_steps} centralized training ({sizes.central_epochs} epochs, "
        f"{sizes.crop}x{sizes.crop} crops)")
  save_dir = os.path.join(out_dir, "central")
  seconds = _run_step(_command(
      "benchmark.central_main", save_model_dir=save_dir,
      num_epochs=sizes.central_epochs,
      train_batch_size=sizes.central_batch_size, learning_rate=1e-3,
      **common))
  runs.append(dict(setting="central", final_metrics=_read_final_metrics(
      save_dir), wall_time_s=seconds, save_dir=save_dir))

  federated_common = dict(
      total_rounds=sizes.rounds, rounds_per_eval=sizes.rounds_per_eval,
      clients_per_round=sizes.clients_per_round,
      client_batch_size=sizes.client_batch_size,
      max_elements_per_client=sizes.max_elements_per_client,
      client_epochs_per_round=sizes.client_epochs_per_round,
      client_datasets_random_seed=seed, backend=backend, **common)
  federated_runs = [("fedavg", 0.0, False)]
  if iid:
    federated_runs.append(("fedavg_iid", 0.0, True))
  federated_runs.append(("fedavg_dp", sizes.dp_epsilon, False))
  for number, (setting, epsilon, on_iid) in enumerate(federated_runs, 4):
    what = "FedAvg" + (" on FLAIR-IID" if on_iid else "") + (
        f" with central DP (epsilon {epsilon:g})" if epsilon else "")
    _step(f"{number}/{total_steps} {what}: {sizes.rounds} rounds of "
          f"{sizes.clients_per_round} clients")
    save_dir = os.path.join(out_dir, setting)
    seconds = _run_step(_command(
        "benchmark.federated_main", save_model_dir=save_dir, epsilon=epsilon,
        iid=on_iid or None, **federated_common))
    runs.append(dict(setting=setting, final_metrics=_read_final_metrics(
        save_dir), wall_time_s=seconds, save_dir=save_dir))

  rows = summary_rows(runs)
  table = format_table(rows)
  file_io.write_json_atomic(os.path.join(out_dir, "summary.json"), rows)
  with file_io.atomic_path(os.path.join(out_dir, "summary.csv")) as tmp:
    with open(tmp, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)
  plot_val_metrics(runs, os.path.join(out_dir, "val_metrics.png"))
  print("\nTest-set results (demo scale: small crops, few rounds; "
        "not comparable with the paper):\n")
  print(table)
  print(f"\nPlot: {os.path.join(out_dir, 'val_metrics.png')}")
  print(f"Results: {out_dir}", flush=True)
  return out_dir


@commands.exit_on_input_error
def main(argv):
  if len(argv) > 1:
    raise errors.FlairInputError(
        f"unexpected arguments: {' '.join(argv[1:])}")
  values = flags.FLAGS
  validate.check_int("--num_users", values.num_users, 3,
                     reason="one user per partition")
  run_demo(values.results_dir, values.dataset_dir, values.num_users,
           values.seed, values.scale, values.backend, values.iid)


def _define_flags() -> None:
  """Defines the demo's flags (here, not at import, so that importing this
  module next to other commands, as the tests do, adds no global flags)."""
  flags.DEFINE_string(
      "dataset_dir", None,
      "A downloaded FLAIR dataset directory (labels_and_metadata.json, "
      "small_images/). When unset, a FLAIR-like dataset is generated.")
  flags.DEFINE_string(
      "results_dir", "results",
      "Parent folder of the results; each run writes a new demo-<time> folder "
      "inside it.")
  flags.DEFINE_integer(
      "num_users", 300,
      "Users in the generated dataset (ignored with --dataset_dir).")
  flags.DEFINE_integer("seed", 0,
                       "Seed for data generation, models and sampling.")
  flags.DEFINE_enum(
      "scale", "small", _DEMO_SCALES,
      "small: the default demo (minutes on 2 CPU cores); tiny: a smoke run used "
      "by the tests.")
  flags.DEFINE_enum(
      "backend", constants.BACKEND_INPROCESS, list(constants.BACKENDS),
      "Where the FedAvg runs' rounds run (federated_main --backend).")
  flags.DEFINE_boolean(
      "iid", False,
      "Also run FedAvg on FLAIR-IID (federated_main --iid: the training "
      "images dealt out at random to the same users) beside the non-IID run.")


def run():
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
