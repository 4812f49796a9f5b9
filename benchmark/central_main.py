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

import dataclasses
import json
import os

from absl import app
from absl import flags
from absl import logging

from benchmark import central
from benchmark import constants
from benchmark import data
from benchmark import errors
from benchmark import io_utils

_TFRECORDS_DIR = flags.DEFINE_string(
    "tfrecords_dir", None,
    "Directory of per-user TFRecords written by prepare_tfrecords.py "
    "(train/, val/, test/ and label_index.json).")
_LEARNING_RATE = flags.DEFINE_float(
    "learning_rate", 1e-4, "Learning rate of the Adam optimizer.")
_CLIPNORM = flags.DEFINE_float(
    "clipnorm", 10.0,
    "Adam clips each gradient to this L2 norm (Keras clipnorm).")
_TRAIN_BATCH_SIZE = flags.DEFINE_integer(
    "train_batch_size", 512,
    "Training batch size in images, over all GPUs together.")
_EVAL_BATCH_SIZE = flags.DEFINE_integer(
    "eval_batch_size", 512, "Batch size in images for val/test evaluation.")
_NUM_EPOCHS = flags.DEFINE_integer(
    "num_epochs", 100, "Number of passes over the pooled training users.")
_RESTORE_MODEL_PATH = flags.DEFINE_string(
    "restore_model_path", None,
    "Optional Keras weights .h5 (e.g. the ImageNet resnet18.h5) to fine-tune "
    "from: builds the BatchNorm model and loads layers by name, skipping the "
    "classifier when its size differs.")
_SAVE_MODEL_DIR = flags.DEFINE_string(
    "save_model_dir", None,
    "Directory for the best weights, metrics.csv, tensorboard/, "
    "final_metrics.json, flags.json and run.json; rerun with the same "
    "directory to resume. Default: a new directory runs/central-<UTC time>.")
_SKIP_BAD_RECORDS = flags.DEFINE_boolean(
    "skip_bad_records", False,
    "Train without the records of --tfrecords_dir that cannot be used "
    "(unreadable, cut short, missing features, label indices outside the "
    "label index) instead of refusing to start; they are counted in the log "
    "and in final_metrics.json.")
_OVERWRITE = flags.DEFINE_boolean(
    "overwrite", False,
    "Delete the outputs of an earlier run in --save_model_dir (other files "
    "are kept) and start afresh, instead of refusing a directory that holds "
    "a different run.")
_IMAGE_HEIGHT = flags.DEFINE_integer(
    "image_height", 224, "Height in pixels of the crop fed to the model.")
_IMAGE_WIDTH = flags.DEFINE_integer(
    "image_width", 224, "Width in pixels of the crop fed to the model.")
_USE_FINE_GRAINED_LABELS = flags.DEFINE_boolean(
    "use_fine_grained_labels", False,
    "Train on the fine-grained labels instead of the 17 coarse labels.")
_BINARY_LABEL = flags.DEFINE_string(
    "binary_label", None,
    "Train a binary classifier (one output) for this single label name.")
_SEED = flags.DEFINE_integer(
    "seed", 0,
    "Seed for weight initialisation, data order, shuffling, crops and flips.")
_PRECISION = flags.DEFINE_string(
    "precision", "float32",
    "float32, or bfloat16 for Keras mixed precision (bfloat16 convolutions "
    "and activations; float32 weights, normalisation, logits, loss and "
    "metrics): faster on CPUs with AVX512-BF16/AMX and on GPUs.")
flags.mark_flag_as_required("tfrecords_dir")

# The flags that change a run's results: a run with other values is a
# different run (io_utils.claim_save_dir). --num_epochs is not one: more
# epochs continue the same run.
_RESULT_FLAGS = (_LEARNING_RATE, _CLIPNORM, _TRAIN_BATCH_SIZE,
                 _RESTORE_MODEL_PATH, _IMAGE_HEIGHT, _IMAGE_WIDTH,
                 _USE_FINE_GRAINED_LABELS, _BINARY_LABEL, _SEED, _PRECISION)

_ALL_FLAGS = (_TFRECORDS_DIR, _LEARNING_RATE, _CLIPNORM, _TRAIN_BATCH_SIZE,
              _EVAL_BATCH_SIZE, _NUM_EPOCHS, _RESTORE_MODEL_PATH,
              _SAVE_MODEL_DIR, _IMAGE_HEIGHT, _IMAGE_WIDTH,
              _USE_FINE_GRAINED_LABELS, _BINARY_LABEL, _SEED, _PRECISION)


def _config_from_flags() -> central.CentralConfig:
  """The flag values as a validated `CentralConfig` (FlairInputError on bad
  values, naming the flag); an unset --save_model_dir becomes a new
  directory under ./runs/."""
  values = {holder.name: holder.value for holder in _ALL_FLAGS}
  if values["save_model_dir"] is None:
    values["save_model_dir"] = io_utils.fresh_run_dir(central.TRAINER_NAME)
  return central.CentralConfig(**values)


def _identity(config: central.CentralConfig, label_spec) -> dict:
  """The run identity recorded in `run.json` (see `io_utils.run_identity`)."""
  return io_utils.run_identity(
      central.TRAINER_NAME,
      io_utils.labels_identity(label_spec.names,
                               label_spec.use_fine_grained_labels,
                               label_spec.binary_label),
      io_utils.model_identity(config.restore_model_path is not None,
                              label_spec.num_outputs),
      {h.name: getattr(config, h.name) for h in _RESULT_FLAGS})


@errors.exit_on_input_error
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise errors.FlairInputError(
        f"unexpected positional arguments: {' '.join(argv[1:])} (all "
        "settings are --flags)")
  config = _config_from_flags()
  # Rejects bad data flags before writing files.
  label_spec, _ = central.load_inputs(config)
  flag_values = {h.name: getattr(config, h.name) for h in _ALL_FLAGS}
  # Every user file read once (no image decoded): all bad files are
  # reported at once, before anything is written.
  bad = data.check_tfrecords(config.tfrecords_dir, label_spec,
                             skip_bad_records=_SKIP_BAD_RECORDS.value)
  for holder in (_SKIP_BAD_RECORDS, _OVERWRITE):
    flag_values[holder.name] = holder.value
  identity = _identity(config, label_spec)
  identity["settings"][_SKIP_BAD_RECORDS.name] = _SKIP_BAD_RECORDS.value
  io_utils.claim_save_dir(config.save_model_dir, identity, flag_values,
                          overwrite=_OVERWRITE.value)
  logging.info("This run writes to %s (rerun with --save_model_dir %s to "
               "resume it).", config.save_model_dir, config.save_model_dir)
  if bad:
    config = dataclasses.replace(
        config, tfrecords_dir=data.mirror_without_bad_records(
            config.tfrecords_dir, bad, os.path.join(
                config.save_model_dir,
                constants.TFRECORDS_WITHOUT_BAD_RECORDS_DIR)))
  final = central.train_central(config)
  if bad:
    final = data.record_skipped_records(config.save_model_dir, final, bad)
  print(json.dumps(final, indent=2, sort_keys=True))


def run() -> None:
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
