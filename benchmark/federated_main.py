"""The FedAvg command: federated training of ResNet-18 on FLAIR with TFF,
optionally with user-level central DP.

    python -m benchmark.federated_main --tfrecords_dir T [flags]

Flags and defaults are those of the original benchmark
(docs/original_benchmark.md, "Command lines"), plus the project's own, each
declared once with its setting in `training.config` (`--help` lists them);
`--skip_bad_records` and `--overwrite` (`cli.trainers`); and
`--clients_per_thread`, accepted for the original command line only. The
run itself is `training.federated.run_federated`. This module parses the
flags, checks the data and claims the run directory (`cli.trainers`),
trains, and prints the final metrics. Bad input ends in one line and exit
status 1; SIGTERM and Ctrl-C stop the run and whatever its backend started.
Rerunning the same command resumes after the latest checkpoint.
"""

from absl import flags
from absl import logging

from benchmark.cli import commands
from benchmark.cli import trainers
from benchmark.core import validate
from benchmark.training import config as config_lib
from benchmark.training import federated

_CLIENTS_PER_THREAD = "clients_per_thread"


def _define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines this command's flags (called by `run`, not at import, so that
  this module can be imported beside the other commands)."""
  trainers.define_trainer_flags(
      config_lib.FederatedConfig, federated.TRAINER_NAME,
      "to start the global model from",
      "the best weights, metrics.csv, tensorboard/, checkpoints/, "
      "final_metrics.json, flags.json and run.json", flag_values)
  flags.DEFINE_integer(
      _CLIENTS_PER_THREAD, 50,
      "Accepted for compatibility with the original command line; has no "
      "effect (a warning says so when it is given): each --backend schedules a "
      "round's clients itself; --num_workers sets how many train at once.",
      flag_values=flag_values)


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS
                     ) -> config_lib.FederatedConfig:
  """The parsed flags as a validated `FederatedConfig` (FlairInputError on
  bad values, naming the flag); an unset --save_model_dir becomes a new
  directory under ./runs/."""
  validate.check_int(f"--{_CLIENTS_PER_THREAD}",
                     flag_values[_CLIENTS_PER_THREAD].value)
  if flag_values[_CLIENTS_PER_THREAD].present:
    logging.warning(
        "--clients_per_thread %d has no effect: it is accepted for the "
        "original command line only (each --backend schedules a round's "
        "clients itself; --num_workers sets how many train at once).",
        flag_values[_CLIENTS_PER_THREAD].value)
  return trainers.config_from_flags(config_lib.FederatedConfig,
                                    federated.TRAINER_NAME, flag_values)


def run_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> dict:
  """The command after its flags are parsed: validates them, checks the
  data, claims the save directory, trains, prints the final metrics (JSON)
  and returns them.

  Raises:
    FlairInputError: a bad flag or data (nothing written), or a record that
      fails in training (naming its file).
    OutputWriteError, BackendDiedError: see `cli.commands`.
  """
  config = config_from_flags(flag_values)
  config, label_spec, bad = trainers.start_run(
      config, federated.TRAINER_NAME, flag_values)
  with trainers.data_errors_named(config.data.tfrecords_dir, label_spec):
    final = federated.run_federated(config, label_spec)
  return trainers.finish_run(config.output.save_model_dir, final, bad)


@commands.exit_on_input_error
def main(argv: list[str]) -> None:
  """Trains as the parsed flags say and prints the final metrics (JSON)."""
  del argv  # The wrapper refuses positional arguments.
  run_from_flags()


# Console-script entry point (`flair-federated`).
run = commands.entry_point(_define_flags, main)


if __name__ == "__main__":
  run()
