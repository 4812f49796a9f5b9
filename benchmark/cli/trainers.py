"""What the two trainers' commands share: their common flags, and the steps
from parsed flags to a claimed run directory and from a finished run to its
printed results.

`central_main` and `federated_main` define their flags with
`define_trainer_flags` (every setting of their config, declared once in
`training.config`, plus `--skip_bad_records` and `--overwrite`), then
`config_from_flags`, `start_run` (check the data, claim the run
directory), the trainer, inside `data_errors_named`, and `finish_run`
(the final metrics as a short table, and where the files are).
"""

import contextlib
import dataclasses
import os
from typing import Any, Iterator

from absl import flags
from absl import logging

from benchmark.analysis import runs as runs_lib
from benchmark.cli import console
from benchmark.cli import flags as flags_lib
from benchmark.core import constants
from benchmark.core import errors
from benchmark.data import label_sets
from benchmark.data import triage
from benchmark.training import config as config_lib
from benchmark.training import run_dir

# Flags that steer the command, not the run's settings: recorded in
# flags.json; --skip_bad_records also in the run's identity.
SKIP_BAD_RECORDS = "skip_bad_records"
OVERWRITE = "overwrite"


def define_trainer_flags(config_type: type, trainer: str, restore_use: str,
                         outputs: str,
                         flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines a trainer's flags: one per setting of `config_type`
  (`cli.flags.define_config_flags`), `--skip_bad_records` and
  `--overwrite`.

  Args:
    config_type: `training.config.CentralConfig` or `FederatedConfig`.
    trainer: the trainer's name, as in the default run directory
      `runs/<trainer>-<UTC time>` ("central" or "federated").
    restore_use: what the trainer does with --restore_model_path's weights,
      for its help (e.g. "to fine-tune from").
    outputs: the files and folders the trainer writes to --save_model_dir,
      for that flag's help.
    flag_values: where to define them (absl's global FLAGS by default).
  """
  flags_lib.define_config_flags(
      config_type, flag_values, trainer=trainer, restore_use=restore_use,
      outputs=outputs, runs_dir=constants.DEFAULT_RUNS_DIR)
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


def config_from_flags(config_type: type, trainer: str,
                      flag_values: flags.FlagValues = flags.FLAGS):
  """The parsed flags as a validated config of `config_type`; an unset
  --save_model_dir becomes a new directory `runs/<trainer>-<UTC time>`
  (`run_dir.fresh_run_dir`; not created here).

  Raises:
    FlairInputError: a bad value, naming the flag.
  """
  save_model_dir = (flag_values["save_model_dir"].value
                    or run_dir.fresh_run_dir(trainer))
  return flags_lib.config_from_flags(config_type, flag_values,
                                     {"save_model_dir": save_model_dir})


def _identity(config, label_spec: label_sets.LabelSpec, trainer: str,
              skip_bad_records: bool) -> dict[str, Any]:
  settings = config_lib.identity_settings(config)
  settings[SKIP_BAD_RECORDS] = skip_bad_records
  return run_dir.run_identity(
      trainer,
      run_dir.labels_identity(label_spec.names,
                              label_spec.use_fine_grained_labels,
                              label_spec.binary_label),
      run_dir.model_identity(config.model.pretrained, label_spec.num_outputs,
                             config.model.model_layout),
      settings)


def start_run(config, trainer: str,
              flag_values: flags.FlagValues = flags.FLAGS
             ) -> tuple[Any, label_sets.LabelSpec, list[triage.FileCheck]]:
  """Checks the data and claims the run directory; returns what to train.

  Reads the label index (`label_sets.load_label_spec`) and every user file
  of `--tfrecords_dir` once, no image decoded, so that all bad files are
  reported at once before anything is written (`triage.check_tfrecords`).
  Then claims `--save_model_dir` (`run_dir.claim_save_dir`: run.json holds
  the run's identity, flags.json every flag's value). With bad records
  skipped, the returned config reads a mirror of the data without them.

  Args:
    config: the validated config (`config_from_flags`).
    trainer: "central" or "federated".
    flag_values: the parsed flags (for --skip_bad_records, --overwrite).

  Returns:
    `(config to train with, its label spec, the bad files skipped: empty
    when none)`.

  Raises:
    FlairInputError: a bad data directory, label flag or user file (all
      listed), or a save directory that holds another run.
    OutputWriteError: run.json, flags.json or the mirror cannot be written.
  """
  data = config.data
  label_spec = label_sets.load_label_spec(
      data.tfrecords_dir, data.use_fine_grained_labels, data.binary_label)
  skip_bad_records = flag_values[SKIP_BAD_RECORDS].value
  overwrite = flag_values[OVERWRITE].value
  bad = triage.check_tfrecords(data.tfrecords_dir, label_spec,
                               skip_bad_records=skip_bad_records)
  recorded = dict(config_lib.flag_settings(config))
  recorded.update({SKIP_BAD_RECORDS: skip_bad_records, OVERWRITE: overwrite})
  save_model_dir = config.output.save_model_dir
  run_dir.claim_save_dir(
      save_model_dir, _identity(config, label_spec, trainer,
                                skip_bad_records),
      recorded, overwrite=overwrite)
  console.log_into(save_model_dir, constants.RUN_IDENTITY_FILE)
  logging.info("This run writes to %s (rerun with --save_model_dir %s to "
               "resume it).", save_model_dir, save_model_dir)
  if bad:
    mirror = triage.mirror_without_bad_records(
        data.tfrecords_dir, bad, os.path.join(
            save_model_dir, constants.TFRECORDS_WITHOUT_BAD_RECORDS_DIR))
    config = dataclasses.replace(
        config, data=dataclasses.replace(data, tfrecords_dir=mirror))
  return config, label_spec, bad


@contextlib.contextmanager
def data_errors_named(tfrecords_dir: str,
                      label_spec: label_sets.LabelSpec) -> Iterator[None]:
  """Turns a data error raised while training (a client's data that
  TensorFlow cannot read, `errors.ClientDataError`; an image that does not
  decode; a file changed during the run: `triage.is_data_error`) into the
  one-line-per-file `FlairInputError` of `triage.training_data_error`,
  which names every user file that fails. Other exceptions propagate."""
  try:
    yield
  except (errors.FlairInputError, errors.OutputWriteError,
          errors.BackendDiedError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    if not triage.is_data_error(e):
      raise
    raise triage.training_data_error(tfrecords_dir, label_spec, e) from None


def format_final_metrics(final: dict, save_model_dir: str) -> str:
  """The trainers' last words: the final val and test metrics of the best
  weights as a short table (`analysis.runs.METRICS`), the DP guarantee
  and skipped records when there are any, and where final_metrics.json and
  the log file are."""
  columns = [m.label for m in runs_lib.METRICS]
  cells = [[constants.VAL], [constants.TEST]]
  for line in cells:
    values = runs_lib.pick_metrics(final.get(line[0]) or {})
    line += [f"{values[m.key]:.4f}" for m in runs_lib.METRICS]
  widths = [max(len(c), 4) for c in [""] + columns]
  table = ["  ".join(c.ljust(w) for c, w in zip([""] + columns, widths))]
  table += ["  ".join(c.ljust(w) for c, w in zip(line, widths))
            for line in cells]
  best = (f", round {final['best_round']}" if "best_round" in final else "")
  lines = [f"Final metrics (best weights by val loss{best}):"]
  lines += ["  " + line.rstrip() for line in table]
  privacy = final.get("privacy") or {}
  if privacy.get("guarantee"):
    lines.append(f"Privacy: {privacy['guarantee']}")
  skipped = final.get("skipped_records") or {}
  if skipped.get("count"):
    lines.append(f"Skipped bad records: {skipped['count']} (listed in "
                 f"{constants.FINAL_METRICS_FILE})")
  lines.append("All metrics: " + os.path.join(
      os.path.abspath(save_model_dir), constants.FINAL_METRICS_FILE))
  log_path = console.log_file_path()
  if log_path:
    lines.append(f"Log: {log_path}")
  return "\n".join(lines)


def finish_run(save_model_dir: str, final: dict,
               bad: list[triage.FileCheck]) -> dict:
  """Adds the skipped bad records, when there were any, to the final
  metrics and to final_metrics.json (`triage.record_skipped_records`),
  sends the log to the run directory (when no --save_model_dir named it at
  the start, `console.log_into`), prints `format_final_metrics` on stdout
  (the command's output) and returns the final metrics."""
  if bad:
    final = triage.record_skipped_records(save_model_dir, final, bad)
  console.log_into(save_model_dir, constants.RUN_IDENTITY_FILE)
  print(format_final_metrics(final, save_model_dir), flush=True)
  return final
