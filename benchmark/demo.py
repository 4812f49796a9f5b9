"""The whole benchmark path in one command, small enough for a laptop CPU.

`make demo` runs `python -m benchmark.demo`, which:
  1. generates a FLAIR-like dataset (`benchmark.synthetic_dataset`), or uses a
     downloaded one given with `--dataset_dir`;
  2. prepares per-user TFRecords (`prepare_tfrecords`);
  3. trains centrally (`benchmark.central_main`), with FedAvg and with FedAvg
     plus central DP (`benchmark.federated_main`), all at a small crop and
     a few epochs and rounds (`SCALES`) so that a laptop CPU runs it;
     With `--iid`, FedAvg also runs on FLAIR-IID (`federated_main --iid`:
     the same users and image counts, images dealt out at random) beside the
     users' own non-IID data, so the table shows the cost of heterogeneity;
  4. compares the runs (`benchmark.report`): one table of their test and
     best validation metrics (`results.md`, `results.csv`) and a figure of
     their validation metrics over epochs and rounds (`val_curves.png`), in
     the results folder whose path is the last line printed.

Each step is the suite's own command, run in a child process and printed
first as it can be run again (the interpreter's path included); each
writes its own log file (`log.txt`) into its output folder, the demo its
own into the results folder.

The settings are a demonstration, not the paper's: 32x32 crops, a few epochs
and rounds. Use the `central_main` / `federated_main` commands for real runs.
"""

import dataclasses
import datetime
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Optional

from absl import flags

from benchmark.cli import commands
from benchmark.cli import console
from benchmark.cli import stderr_filter
from benchmark.core import constants
from benchmark.core import errors
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
  # --model_layout of the trainers; None keeps their default, ResNet-18.
  model_layout: Optional[str] = None


# `small` is the default demo, sized for the README's time budget on a 2-core
# CPU (its measured time: docs/performance.md); `tiny` only checks the path
# end to end, with the tiny network (`--model_layout tiny`).
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
                      dp_epsilon=8.0, model_layout="tiny"),
}


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What every step of one demo run needs.

  Attributes:
    out_dir: the run's results folder (absolute).
    sizes: the scale's training sizes.
    total_steps: the number of steps announced ("<n>/<total_steps> ...").
    seed: seed for generation, model initialisation and client sampling.
  """
  out_dir: str
  sizes: DemoScale
  total_steps: int
  seed: int


def _step(message: str) -> None:
  print(f"\n=== {message}", flush=True)


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
  ours (its stderr to the console itself: it filters its own, see
  `cli.stderr_filter`); returns its wall time in seconds.

  Raises:
    FlairInputError: the command failed (its own error is printed above).
  """
  print("$ " + shlex.join(argv), flush=True)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (_REPO_ROOT, os.environ.get("PYTHONPATH")) if p))
  start = time.monotonic()
  returncode = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL,
                              stderr=stderr_filter.console_fd(),
                              check=False).returncode
  if returncode != 0:
    raise errors.FlairInputError(
        f"demo step failed with exit code {returncode}: {shlex.join(argv)}")
  seconds = time.monotonic() - start
  print(f"(done in {seconds:.0f} s)", flush=True)
  return seconds


def _check_arguments(dataset_dir: Optional[str], scale: str) -> DemoScale:
  """Returns `SCALES[scale]`.

  Raises:
    FlairInputError: `scale` is not a key of `SCALES`, or `dataset_dir` is
      given and holds no `constants.METADATA_FILE`.
  """
  if scale not in SCALES:
    raise errors.FlairInputError(
        f"--scale must be one of {', '.join(SCALES)}, got {scale!r}")
  if dataset_dir is not None and not os.path.isfile(
      os.path.join(dataset_dir, constants.METADATA_FILE)):
    raise errors.FlairInputError(
        f"--dataset_dir {dataset_dir} has no {constants.METADATA_FILE}; "
        "expected a downloaded FLAIR dataset (see download_dataset.py)")
  return SCALES[scale]


def _new_results_folder(results_dir: str) -> str:
  """Makes `<results_dir>/demo-<UTC time, %Y%m%d-%H%M%S>` (and its parents),
  sends the demo's log there (`console.log_into`) and returns its absolute
  path."""
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime(
      "%Y%m%d-%H%M%S")
  out_dir = os.path.abspath(os.path.join(results_dir, f"demo-{stamp}"))
  os.makedirs(out_dir, exist_ok=True)
  console.log_into(out_dir)
  return out_dir


def _data_step(plan: _Plan, dataset_dir: Optional[str],
               num_users: int) -> str:
  """Step 1: generates a dataset of `num_users` users into
  `<out_dir>/dataset` when `dataset_dir` is None; returns the dataset
  directory to use."""
  if dataset_dir is not None:
    _step(f"1/{plan.total_steps} using the dataset in {dataset_dir}")
    return dataset_dir
  dataset_dir = os.path.join(plan.out_dir, "dataset")
  _step(f"1/{plan.total_steps} generating a FLAIR-like dataset ({num_users} "
        "users)")
  _run_step(_command("benchmark.synthetic_dataset", dataset_dir=dataset_dir,
                     num_users=num_users, seed=plan.seed))
  return dataset_dir


def _prepare_step(plan: _Plan, dataset_dir: str) -> str:
  """Step 2: prepares per-user TFRecords into `<out_dir>/tfrecords`;
  returns that directory."""
  tfrecords_dir = os.path.join(plan.out_dir, "tfrecords")
  _step(f"2/{plan.total_steps} preparing per-user TFRecords")
  # One worker: at demo scale, worker processes would spend longer importing
  # TensorFlow than writing (scripts/bench_prepare.py).
  _run_step(_command("prepare_tfrecords", dataset_dir=dataset_dir,
                     tfrecords_dir=tfrecords_dir, num_workers=1))
  return tfrecords_dir


def _train(plan: _Plan, setting: str, module: str,
           **flag_values: Any) -> str:
  """Runs trainer `module` with `--save_model_dir=<out_dir>/<setting>` and
  `flag_values` (in that order); returns that run directory."""
  save_dir = os.path.join(plan.out_dir, setting)
  _run_step(_command(module, save_model_dir=save_dir, **flag_values))
  return save_dir


def _central_step(plan: _Plan, common: dict[str, Any]) -> str:
  """Step 3: centralized training (setting `central`); returns its run
  directory."""
  sizes = plan.sizes
  _step(f"3/{plan.total_steps} centralized training ({sizes.central_epochs} "
        f"epochs, {sizes.crop}x{sizes.crop} crops)")
  return _train(plan, "central", "benchmark.central_main",
                num_epochs=sizes.central_epochs,
                train_batch_size=sizes.central_batch_size, learning_rate=1e-3,
                **common)


def _federated_settings(sizes: DemoScale,
                        iid: bool) -> list[tuple[str, float, bool]]:
  """The FedAvg settings in run order: `(setting, epsilon, on FLAIR-IID)`;
  epsilon 0 is no DP."""
  settings = [("fedavg", 0.0, False)]
  if iid:
    settings.append(("fedavg_iid", 0.0, True))
  settings.append(("fedavg_dp", sizes.dp_epsilon, False))
  return settings


def _federated_step(plan: _Plan, number: int, setting: str, epsilon: float,
                    on_iid: bool, federated_common: dict[str, Any]) -> str:
  """Step `number`: one FedAvg setting (`_federated_settings`); returns its
  run directory."""
  what = "FedAvg" + (" on FLAIR-IID" if on_iid else "") + (
      f" with central DP (epsilon {epsilon:g})" if epsilon else "")
  _step(f"{number}/{plan.total_steps} {what}: {plan.sizes.rounds} rounds of "
        f"{plan.sizes.clients_per_round} clients")
  return _train(plan, setting, "benchmark.federated_main", epsilon=epsilon,
                iid=on_iid or None, **federated_common)


def _report_step(plan: _Plan, run_dirs: list[str]) -> None:
  """The last step: `benchmark.report` on the runs, writing its table and
  figure into the results folder; then the results folder, last."""
  _step(f"{plan.total_steps}/{plan.total_steps} comparing the runs")
  print("Demo scale (small crops, few epochs and rounds): not comparable "
        "with the paper.", flush=True)
  _run_step(_command("benchmark.report", output_dir=plan.out_dir) + run_dirs)
  print(f"Results: {plan.out_dir}", flush=True)


def run_demo(results_dir: str, dataset_dir: Optional[str] = None,
             num_users: int = 300, seed: int = 0,
             scale: str = "small",
             backend: str = constants.BACKEND_INPROCESS,
             iid: bool = False) -> str:
  """Runs data generation/preparation, central, FedAvg and DP-FedAvg.

  Each step is the suite's own command (`benchmark.synthetic_dataset`,
  `prepare_tfrecords`, `benchmark.central_main`, `benchmark.federated_main`,
  `benchmark.report`) run in a child process, exactly as a user would type
  it; the commands are printed before they run.

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
    The results folder (the report's results.md, results.csv and
    val_curves.png, the demo's log.txt, and one sub-folder per setting with
    its own outputs).

  Raises:
    FlairInputError: bad `dataset_dir` or `scale`, or a step failed.
  """
  sizes = _check_arguments(dataset_dir, scale)
  plan = _Plan(out_dir=_new_results_folder(results_dir), sizes=sizes,
               total_steps=7 if iid else 6, seed=seed)
  dataset_dir = _data_step(plan, dataset_dir, sizes.num_users or num_users)
  tfrecords_dir = _prepare_step(plan, dataset_dir)

  common = dict(tfrecords_dir=tfrecords_dir, image_height=sizes.crop,
                image_width=sizes.crop, eval_batch_size=128, seed=seed,
                model_layout=sizes.model_layout)
  runs = [_central_step(plan, common)]
  federated_common = dict(
      total_rounds=sizes.rounds, rounds_per_eval=sizes.rounds_per_eval,
      clients_per_round=sizes.clients_per_round,
      client_batch_size=sizes.client_batch_size,
      max_elements_per_client=sizes.max_elements_per_client,
      client_epochs_per_round=sizes.client_epochs_per_round,
      client_datasets_random_seed=seed, backend=backend, **common)
  for number, (setting, epsilon, on_iid) in enumerate(
      _federated_settings(sizes, iid), 4):
    runs.append(_federated_step(plan, number, setting, epsilon, on_iid,
                                federated_common))
  _report_step(plan, runs)
  return plan.out_dir


@commands.exit_on_input_error
def main(argv):
  """Runs the demo the flags describe (positional arguments are refused by
  `commands.exit_on_input_error`).

  Raises:
    FlairInputError: `--num_users` below 3 (one user per partition), or as
      `run_demo`.
  """
  del argv  # Only the program name: exit_on_input_error refuses the rest.
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
      "small: the default demo (minutes on 2 CPU cores); tiny: a smoke run "
      "used by the tests.")
  flags.DEFINE_enum(
      "backend", constants.BACKEND_INPROCESS, list(constants.BACKENDS),
      "Where the FedAvg runs' rounds run (federated_main --backend).")
  flags.DEFINE_boolean(
      "iid", False,
      "Also run FedAvg on FLAIR-IID (federated_main --iid: the training "
      "images dealt out at random to the same users) beside the non-IID run.")


# Console-script entry point: defines the flags, then runs `main` under absl;
# the demo's log goes to its results folder (`_new_results_folder`).
run = commands.entry_point(_define_flags, main, log_dir_flags=())


if __name__ == "__main__":
  run()
