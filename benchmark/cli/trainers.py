"""What the two trainers' commands share: their common flags, and the steps
from parsed flags to a claimed run directory and from a finished run to its
printed results.

`central_main` and `federated_main` define their flags with
`define_trainer_flags` (every setting of their config, declared once in
`training.config`, plus `--skip_bad_records` and `--overwrite`), then
`config_from_flags`, `start_run` (check the data and every setting that
needs only the data's counts, lock and claim the run directory), the
trainer, inside `data_errors_named`, and `finish_run` (the final metrics as
a short table, and where the files are).

The run directory's lock (`run_dir.lock_save_dir`) is held by the process
from `start_run` until `release_run_lock`, the next `start_run` in the same
process (runs in one process follow each other), or the process's end (the
operating system releases it however the process ends).
"""

import atexit
import contextlib
import dataclasses
import json
import os
from typing import Any, Iterator, Optional

from absl import flags
from absl import logging

from benchmark.analysis import runs as runs_lib
from benchmark.cli import console
from benchmark.cli import flags as flags_lib
from benchmark.core import constants
from benchmark.core import cuda_env
from benchmark.core import errors
from benchmark.core import locks
from benchmark.data import formats
from benchmark.data import label_sets
from benchmark.data import pipeline
from benchmark.data import triage
from benchmark.prepare import manifest
from benchmark.training import config as config_lib
from benchmark.training import federated
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


def check_label_index(tfrecords_dir: str) -> None:
  """Checks the label index of `tfrecords_dir` against the digest that
  `prepare_manifest.jsonl` records for every user file
  (`prepare.manifest.label_index_sha256`, the one function that computes
  it): a label index edited after prepare (two names swapped, say) would
  train each name on another label's images. A directory without a
  manifest (prepared before manifests existed) gets one warning.

  Raises:
    FlairInputError: the label index is not the one the user files were
      written with (one line naming both files and what to do).
  """
  manifest_path = os.path.join(tfrecords_dir, manifest.MANIFEST_FILE)
  counts = manifest.label_index_sha256_counts(manifest.read(manifest_path))
  path = formats.find_label_index_file(tfrecords_dir)
  if not counts:
    logging.warning(
        "%s has no %s (prepared before manifests existed): %s cannot be "
        "checked against the user files; rerun prepare_tfrecords.py into it "
        "to add one (it keeps the files that are current).", tfrecords_dir,
        manifest.MANIFEST_FILE, os.path.basename(path))
    return
  with open(path, "rb") as f:  # Read and checked by load_label_spec.
    digest = manifest.label_index_sha256(json.load(f))
  others = sum(n for d, n in counts.items() if d != digest)
  if others:
    raise errors.FlairInputError(
        f"{path} is not the label index that {others} of the "
        f"{sum(counts.values())} user files of --tfrecords_dir were written "
        f"with ({manifest_path} records another digest): it was changed "
        "after prepare_tfrecords.py, or a prepare was interrupted, and label "
        "names would not match the labels of the images; rerun "
        "prepare_tfrecords.py into this --tfrecords_dir")


def _users_per_partition(tfrecords_dir: str,
                         bad: list[triage.FileCheck]) -> dict[str, int]:
  """The users each partition trains or evaluates on: its user files, less
  those with no usable record when bad records are skipped (which
  `triage.mirror_without_bad_records` leaves out).

  Raises:
    FlairInputError: a partition holds no user file
      (`pipeline.partition_files`), or none left once bad records are
      skipped.
  """
  left_out = {os.path.abspath(c.path) for c in bad
              if c.num_records == len(set(c.bad_records))}
  counts = {}
  for partition in constants.PARTITIONS:
    files = pipeline.partition_files(tfrecords_dir, partition)
    counts[partition] = sum(os.path.abspath(p) not in left_out
                            for p in files.values())
    if not counts[partition]:
      raise errors.FlairInputError(
          f"partition {partition!r} of --tfrecords_dir {tfrecords_dir!r} has "
          f"no user left once its bad records are skipped (all its "
          f"{len(files)} user file(s) are bad): rerun prepare_tfrecords.py "
          "on the dataset")
  return counts


def check_settings(config, trainer: str, tfrecords_dir: str,
                   bad: list[triage.FileCheck]) -> None:
  """The refusals that need only `config` and the data's counts, made
  before anything is written: an empty partition (none left with bad
  records skipped), and the trainer's own
  (`federated.check_settings`: DP that cannot be calibrated, or adaptive
  clipping with too small a cohort).

  Raises:
    FlairInputError: one line naming the partition or the flags.
  """
  counts = _users_per_partition(tfrecords_dir, bad)
  if trainer == federated.TRAINER_NAME:
    federated.check_settings(config, counts[constants.TRAIN])


# The run directory lock this process holds (`start_run`), or None.
_run_lock: Optional[locks.DirectoryLock] = None


def release_run_lock() -> None:
  """Releases the run directory's lock that `start_run` took (nothing when
  none is held). Runs at exit; a caller that runs more than one run in a
  process may call it when a run ends."""
  global _run_lock
  lock, _run_lock = _run_lock, None
  if lock is not None:
    lock.release()


atexit.register(release_run_lock)


def _claim(config, trainer: str, flag_values: flags.FlagValues,
           label_spec: label_sets.LabelSpec,
           bad: list[triage.FileCheck]) -> Any:
  """Locks and claims `--save_model_dir` (run.json, flags.json), sends the
  log there, and builds the mirror without the bad records; the lock stays
  held when this returns (`release_run_lock`), and is released when it
  raises."""
  global _run_lock
  release_run_lock()  # An earlier run of this process has ended.
  data = config.data
  skip_bad_records = flag_values[SKIP_BAD_RECORDS].value
  overwrite = flag_values[OVERWRITE].value
  recorded = dict(config_lib.flag_settings(config))
  recorded.update({SKIP_BAD_RECORDS: skip_bad_records, OVERWRITE: overwrite})
  save_model_dir = config.output.save_model_dir
  lock = run_dir.lock_save_dir(save_model_dir)
  try:
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
  except BaseException:
    lock.release()
    raise
  _run_lock = lock
  return config


def start_run(config, trainer: str,
              flag_values: flags.FlagValues = flags.FLAGS
             ) -> tuple[Any, label_sets.LabelSpec, list[triage.FileCheck]]:
  """Checks the data and the settings, then locks and claims the run
  directory; returns what to train.

  Reads the label index (`label_sets.load_label_spec`) and checks it
  against the manifest (`check_label_index`), reads every user file of
  `--tfrecords_dir` once, no image decoded, so that all bad files are
  reported at once (`triage.check_tfrecords`), and makes the refusals that
  need only the settings and the data's counts (`check_settings`), all
  before anything is written. Then locks `--save_model_dir`
  (`run_dir.lock_save_dir`: a run already writing there refuses this one)
  and claims it (`run_dir.claim_save_dir`: run.json holds the run's
  identity, flags.json every flag's value). The lock stays held until
  `release_run_lock` (see the module doc). With bad records skipped, the
  returned config reads a mirror of the data without them.

  Args:
    config: the validated config (`config_from_flags`).
    trainer: "central" or "federated".
    flag_values: the parsed flags (for --skip_bad_records, --overwrite).

  Returns:
    `(config to train with, its label spec, the bad files skipped: empty
    when none)`.

  Raises:
    FlairInputError: a bad data directory, label index, label flag, user
      file (all listed) or setting, a save directory that holds another
      run, or one that another run is writing to
      (`locks.DirectoryLockedError`, naming that process).
    OutputWriteError: the lock file, run.json, flags.json or the mirror
      cannot be written.
  """
  cuda_env.warn_if_kernels_compile()
  data = config.data
  label_spec = label_sets.load_label_spec(
      data.tfrecords_dir, data.use_fine_grained_labels, data.binary_label)
  check_label_index(data.tfrecords_dir)
  bad = triage.check_tfrecords(
      data.tfrecords_dir, label_spec,
      skip_bad_records=flag_values[SKIP_BAD_RECORDS].value)
  check_settings(config, trainer, data.tfrecords_dir, bad)
  config = _claim(config, trainer, flag_values, label_spec, bad)
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
