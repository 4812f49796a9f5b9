"""Centralized training of ResNet-18 on FLAIR (the upper-bound baseline).

    python -m benchmark.central_main --tfrecords_dir T [flags]

Flags and defaults are those of the original benchmark
(docs/original_benchmark.md, "Command lines"), plus `--seed`. The run itself is
`benchmark.central.train_central`; this module only reads the flags, rejects
bad input with a one-line error (exit status 1), checks every user file
(`data.check_tfrecords`: all bad files listed at once, or skipped with
`--skip_bad_records`), claims the save directory
(`io_utils.claim_save_dir`: `run.json` records the run; another run's
directory is refused unless `--overwrite`), writes the flag values to
`<save_model_dir>/flags.json` and starts training. Rerunning the same command
resumes a killed run; see `benchmark.central` for every output file.
"""

from absl import flags

from benchmark.cli import commands
from benchmark.cli import trainers
from benchmark.training import central

# The flags that are fields of `CentralConfig`.
_CONFIG_FLAGS = trainers.TRAINER_CONFIG_FLAGS + (
    "learning_rate", "clipnorm", "train_batch_size", "num_epochs", "seed",
    "precision")
# The flags that change a run's results: a run with other values is a
# different run (io_utils.claim_save_dir). --num_epochs is not one: more
# epochs continue the same run.
_RESULT_FLAGS = trainers.TRAINER_RESULT_FLAGS + (
    "learning_rate", "clipnorm", "train_batch_size", "seed", "precision")


def _define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines this command's flags (called by `run`, not at import, so that
  this module can be imported beside the other commands)."""
  trainers.define_trainer_flags(
      central.TRAINER_NAME, "to fine-tune from",
      "the best weights, metrics.csv, tensorboard/, final_metrics.json, "
      "flags.json and run.json", flag_values)
  flags.DEFINE_float(
      "learning_rate", 1e-4, "Learning rate of the Adam optimizer.",
      flag_values=flag_values)
  flags.DEFINE_float(
      "clipnorm", 10.0,
      "Adam clips each gradient to this L2 norm (Keras clipnorm).",
      flag_values=flag_values)
  flags.DEFINE_integer(
      "train_batch_size", 512,
      "Training batch size in images, over all GPUs together.",
      flag_values=flag_values)
  flags.DEFINE_integer(
      "num_epochs", 100, "Number of passes over the pooled training users.",
      flag_values=flag_values)
  flags.DEFINE_integer(
      "seed", 0,
      "Seed for weight initialisation, data order, shuffling, crops and "
      "flips.", flag_values=flag_values)
  flags.DEFINE_string(
      "precision", "float32",
      "float32, or bfloat16 for Keras mixed precision (bfloat16 convolutions "
      "and activations; float32 weights, normalisation, logits, loss and "
      "metrics): faster on CPUs with AVX512-BF16/AMX and on GPUs.",
      flag_values=flag_values)


def config_from_flags(
    flag_values: flags.FlagValues = flags.FLAGS) -> central.CentralConfig:
  """The parsed flags as a validated `CentralConfig` (FlairInputError on bad
  values, naming the flag); an unset --save_model_dir becomes a new
  directory under ./runs/."""
  return trainers.config_from_flags(central.CentralConfig, _CONFIG_FLAGS,
                               central.TRAINER_NAME, flag_values)


def run_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> dict:
  """The command after its flags are parsed: validates them, checks the
  data, claims the save directory, trains, prints the final metrics (JSON)
  and returns them. Raises FlairInputError (bad flag or data; nothing
  written) or OutputWriteError, which `main` turns into one line."""
  config = config_from_flags(flag_values)
  # Rejects bad data flags before writing files.
  label_spec, _ = central.load_inputs(config)
  config, bad = trainers.claim_run(config, label_spec, central.TRAINER_NAME,
                              _CONFIG_FLAGS, _RESULT_FLAGS, flag_values)
  final = central.train_central(config)
  return trainers.finish_run(config.save_model_dir, final, bad)


@commands.exit_on_input_error
def main(argv: list[str]) -> None:
  """Trains as the parsed flags say and prints the final metrics (JSON)."""
  del argv  # Refused by the wrapper when it holds more than the program.
  run_from_flags()


# Console-script entry point (`flair-central`).
run = commands.entry_point(_define_flags, main)


if __name__ == "__main__":
  run()
