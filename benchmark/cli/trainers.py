"""The command-line layer the two trainers share (`central_main`,
`federated_main`): their common flags, defined once, and the steps from parsed
flags to a claimed run directory.

Every command defines its flags in a `_define_flags` function called by its
`run()`, never at import, so that any set of commands can be imported in one
process (tests/test_cli.py does). The trainers call `define_trainer_flags`
there for the flags they have in common; the flag names and defaults are the
original benchmark's (docs/original_benchmark.md, "Command lines").
"""

import dataclasses
import json
import os
from typing import Callable, Sequence, TypeVar

from absl import flags
from absl import logging

from benchmark.core import constants
from benchmark.data import label_sets
from benchmark.data import triage
from benchmark.training import run_dir

# Both trainers' flags that are fields of their config.
TRAINER_CONFIG_FLAGS = (
    "tfrecords_dir", "eval_batch_size", "restore_model_path",
    "save_model_dir", "image_height", "image_width",
    "use_fine_grained_labels", "binary_label")


# Both trainers' flags that change a run's results (run_dir.claim_save_dir).
TRAINER_RESULT_FLAGS = (
    "restore_model_path", "image_height", "image_width",
    "use_fine_grained_labels", "binary_label")


# Flags that steer the command, not the run: recorded in flags.json only.
SKIP_BAD_RECORDS = "skip_bad_records"


OVERWRITE = "overwrite"


Config = TypeVar("Config")


def define_trainer_flags(trainer: str, restore_use: str, outputs: str,
                         flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the flags both trainers have, with one help string each.

  Args:
    trainer: the trainer's name, as in the default run directory
      `runs/<trainer>-<UTC time>` ("central" or "federated").
    restore_use: what the trainer does with --restore_model_path's weights,
      for its help string (e.g. "to fine-tune from").
    outputs: the files and folders the trainer writes to --save_model_dir,
      listed in that flag's help string.
    flag_values: where to define them (absl's global FLAGS by default).
  """
  flags.DEFINE_string(
      "tfrecords_dir", None,
      "Directory of per-user TFRecords written by prepare_tfrecords.py "
      "(train/, val/, test/ and label_index.json).", flag_values=flag_values)
  flags.mark_flag_as_required("tfrecords_dir", flag_values=flag_values)
  flags.DEFINE_integer(
      "eval_batch_size", 512, "Batch size in images for val/test evaluation.",
      flag_values=flag_values)
  flags.DEFINE_string(
      "restore_model_path", None,
      f"Optional Keras weights .h5 (e.g. the ImageNet resnet18.h5) "
      f"{restore_use}: builds the BatchNorm model and loads layers by name, "
      "skipping the classifier when its size differs.",
      flag_values=flag_values)
  flags.DEFINE_string(
      "save_model_dir", None,
      f"Directory for {outputs}; rerun with the same directory to resume. "
      f"Default: a new directory {constants.DEFAULT_RUNS_DIR}/{trainer}-<UTC "
      "time>.", flag_values=flag_values)
  flags.DEFINE_boolean(
      SKIP_BAD_RECORDS, False,
      "Train without the records of --tfrecords_dir that cannot be used "
      "(unreadable, cut short, missing features, label indices outside the "
      "label index) instead of refusing to start; they are counted in the log "
      "and in final_metrics.json.", flag_values=flag_values)
  flags.DEFINE_boolean(
      OVERWRITE, False,
      "Delete the outputs of an earlier run in --save_model_dir (other files "
      "are kept) and start afresh, instead of refusing a directory that holds "
      "a different run.", flag_values=flag_values)
  flags.DEFINE_integer(
      "image_height", 224, "Height in pixels of the crop fed to the model.",
      flag_values=flag_values)
  flags.DEFINE_integer(
      "image_width", 224, "Width in pixels of the crop fed to the model.",
      flag_values=flag_values)
  flags.DEFINE_boolean(
      "use_fine_grained_labels", False,
      "Train on the fine-grained labels instead of the 17 coarse labels.",
      flag_values=flag_values)
  flags.DEFINE_string(
      "binary_label", None,
      "Train a binary classifier (one output) for this single label name.",
      flag_values=flag_values)


def config_from_flags(config_type: Callable[..., Config],
                      names: Sequence[str], trainer: str,
                      flag_values: flags.FlagValues = flags.FLAGS) -> Config:
  """The parsed flags `names` as a config, `config_type(**{name: value})`.

  An unset --save_model_dir becomes a new directory
  `runs/<trainer>-<UTC time>` (`run_dir.fresh_run_dir`; not created here).
  The config validates the values (FlairInputError naming the flag).
  """
  values = {name: flag_values[name].value for name in names}
  if values.get("save_model_dir") is None:
    values["save_model_dir"] = run_dir.fresh_run_dir(trainer)
  return config_type(**values)


def claim_run(config: Config, label_spec: label_sets.LabelSpec, trainer: str,
              config_flags: Sequence[str], result_flags: Sequence[str],
              flag_values: flags.FlagValues = flags.FLAGS
              ) -> tuple[Config, list[triage.FileCheck]]:
  """Checks the data, claims the run directory; returns what to train on.

  Reads every user file of `config.tfrecords_dir` once (no image decoded),
  so that all bad files are reported at once before anything is written
  (`triage.check_tfrecords`; FlairInputError unless --skip_bad_records). Then
  claims `config.save_model_dir` (`run_dir.claim_save_dir`: run.json holds
  the run's identity, from `result_flags`; flags.json every flag of
  `config_flags` plus --skip_bad_records and --overwrite). With bad records
  skipped, the returned config reads a mirror of the data without them.

  Args:
    config: the validated config (`config_from_flags`).
    label_spec: the labels the run trains on (`label_sets.load_label_spec`).
    trainer: "central" or "federated" (`run_dir.run_identity`).
    config_flags: the names of the flags that are fields of `config`.
    result_flags: the names of the fields that change the run's results.
    flag_values: the parsed flags (absl's global FLAGS by default).

  Returns:
    (config to train with, the bad records skipped: `triage.check_tfrecords`'s
    list, empty when none).
  """
  skip_bad_records = flag_values[SKIP_BAD_RECORDS].value
  overwrite = flag_values[OVERWRITE].value
  bad = triage.check_tfrecords(config.tfrecords_dir, label_spec,
                             skip_bad_records=skip_bad_records)
  recorded = {name: getattr(config, name) for name in config_flags}
  recorded[SKIP_BAD_RECORDS] = skip_bad_records
  recorded[OVERWRITE] = overwrite
  identity = run_dir.run_identity(
      trainer,
      run_dir.labels_identity(label_spec.names,
                               label_spec.use_fine_grained_labels,
                               label_spec.binary_label),
      run_dir.model_identity(config.restore_model_path is not None,
                              label_spec.num_outputs),
      {name: getattr(config, name) for name in result_flags})
  identity["settings"][SKIP_BAD_RECORDS] = skip_bad_records
  run_dir.claim_save_dir(config.save_model_dir, identity, recorded,
                          overwrite=overwrite)
  logging.info("This run writes to %s (rerun with --save_model_dir %s to "
               "resume it).", config.save_model_dir, config.save_model_dir)
  if bad:
    config = dataclasses.replace(
        config, tfrecords_dir=triage.mirror_without_bad_records(
            config.tfrecords_dir, bad, os.path.join(
                config.save_model_dir,
                constants.TFRECORDS_WITHOUT_BAD_RECORDS_DIR)))
  return config, bad


def finish_run(save_model_dir: str, final: dict,
               bad: list[triage.FileCheck]) -> dict:
  """Adds the skipped bad records, when there were any, to the final metrics
  and to final_metrics.json (`triage.record_skipped_records`), prints the
  final metrics as JSON on stdout (the command's output) and returns them."""
  if bad:
    final = triage.record_skipped_records(save_model_dir, final, bad)
  print(json.dumps(final, indent=2, sort_keys=True))
  return final
