"""The federated active-learning command: FedAvg on each user's labelled
FLAIR images, in cycles, with a labelling budget spent at the end of each
cycle by `random`, `entropy` or `kafal` (docs/active_learning.md).

    python -m benchmark.active_main --tfrecords_dir T --strategy kafal \\
        --num_cycles 3 --rounds_per_cycle 10 --budget_per_cycle 100

Flags are the federated trainer's (without DP and FLAIR-IID) plus the
active-learning settings (`active.config`), each declared once; a run
trains `num_cycles * rounds_per_cycle` rounds, so `--total_rounds` is
refused. This module parses the flags, checks the data and claims the run
directory (`cli.trainers`), runs the cycles (`active.cycles.run_active`)
and prints the final metrics. Bad input ends in one line and exit status
1. Rerunning the same command resumes; more `--num_cycles` continue a run.
"""

from absl import flags

from benchmark.active import config as config_lib
from benchmark.active import cycles
from benchmark.active import records
from benchmark.cli import commands
from benchmark.cli import trainers
from benchmark.core.errors import FlairInputError
from benchmark.training import config as training_config

_TOTAL_ROUNDS = "total_rounds"


def _define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines this command's flags (called by `run`, not at import)."""
  trainers.define_trainer_flags(
      config_lib.ActiveConfig, cycles.TRAINER_NAME,
      "to start the global model from",
      "metrics.csv, cycles.csv, chosen_images.json, checkpoints/, the last "
      "global model's weights, final_metrics.json, flags.json and run.json",
      flag_values)


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS
                     ) -> config_lib.ActiveConfig:
  """The parsed flags as a validated `ActiveConfig` (`active.config.build`:
  `total_rounds` is `num_cycles * rounds_per_cycle`).

  Raises:
    FlairInputError: a bad value (naming the flag), or --total_rounds given.
  """
  if flag_values[_TOTAL_ROUNDS].present:
    raise FlairInputError(
        "--total_rounds is not used by active learning: a run trains "
        "--num_cycles * --rounds_per_cycle rounds")
  config = trainers.config_from_flags(config_lib.ActiveConfig,
                                      cycles.TRAINER_NAME, flag_values)
  return config_lib.build(training_config.settings_of(config))


def run_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> dict:
  """The command after its flags are parsed: validates them, checks the
  data, claims the save directory, runs the cycles, prints the final
  metrics and returns them.

  Raises:
    FlairInputError: a bad flag or data (nothing written), or a record that
      fails in training (naming its file).
    OutputWriteError, BackendDiedError: see `cli.commands`.
  """
  config = config_from_flags(flag_values)
  config, label_spec, bad = trainers.start_run(
      config, cycles.TRAINER_NAME, flag_values)
  if flag_values[trainers.OVERWRITE].value:
    records.remove(config.output.save_model_dir)
  with trainers.data_errors_named(config.data.tfrecords_dir, label_spec):
    final = cycles.run_active(config, label_spec)
  return trainers.finish_run(config.output.save_model_dir, final, bad)


@commands.exit_on_input_error
def main(argv: list[str]) -> None:
  """Runs the cycles as the parsed flags say; prints the final metrics."""
  del argv  # The wrapper refuses positional arguments.
  run_from_flags()


# Console-script entry point (`flair-active`).
run = commands.entry_point(_define_flags, main)


if __name__ == "__main__":
  run()
