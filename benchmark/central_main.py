"""The centralized-training command: ResNet-18 trained with Keras on all
training images pooled (the upper-bound baseline).

    python -m benchmark.central_main --tfrecords_dir T [flags]

Flags and defaults are those of the original benchmark
(docs/original_benchmark.md, "Command lines"), plus the project's own, each
declared once with its setting in `training.config` (`--help` lists them),
and `--skip_bad_records` and `--overwrite` (`cli.trainers`). The run itself
is `training.central.train_central`. This module parses the flags, checks
the data and claims the run directory (`cli.trainers`), trains, and prints
the final metrics. Bad input ends in one line and exit status 1. Rerunning
the same command resumes a killed run.
"""

from absl import flags

from benchmark.cli import commands
from benchmark.cli import trainers
from benchmark.training import central
from benchmark.training import config as config_lib


def _define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines this command's flags (called by `run`, not at import, so that
  this module can be imported beside the other commands)."""
  trainers.define_trainer_flags(
      config_lib.CentralConfig, central.TRAINER_NAME, "to fine-tune from",
      "the best weights, metrics.csv, tensorboard/, final_metrics.json, "
      "flags.json and run.json", flag_values)


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS
                     ) -> config_lib.CentralConfig:
  """The parsed flags as a validated `CentralConfig` (FlairInputError on bad
  values, naming the flag); an unset --save_model_dir becomes a new
  directory under ./runs/."""
  return trainers.config_from_flags(config_lib.CentralConfig,
                                    central.TRAINER_NAME, flag_values)


def run_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> dict:
  """The command after its flags are parsed: validates them, checks the
  data, claims the save directory, trains, prints the final metrics (JSON)
  and returns them.

  Raises:
    FlairInputError: a bad flag or data (nothing written), or a record that
      fails in training (naming its file).
    OutputWriteError: see `cli.commands`.
  """
  config = config_from_flags(flag_values)
  config, label_spec, bad = trainers.start_run(config, central.TRAINER_NAME,
                                               flag_values)
  with trainers.data_errors_named(config.data.tfrecords_dir, label_spec):
    final = central.train_central(config, label_spec)
  return trainers.finish_run(config.output.save_model_dir, final, bad)


@commands.exit_on_input_error
def main(argv: list[str]) -> None:
  """Trains as the parsed flags say and prints the final metrics (JSON)."""
  del argv  # The wrapper refuses positional arguments.
  run_from_flags()


# Console-script entry point (`flair-central`).
run = commands.entry_point(_define_flags, main)


if __name__ == "__main__":
  run()
