"""Centralized training of ResNet-18 on FLAIR (the upper-bound baseline).

    python -m benchmark.central_main --tfrecords_dir T [flags]

Flags and defaults are those of the original benchmark (FLAIR_REFERENCE.md,
"Command lines"), plus `--seed`. The run itself is
`benchmark.central.train_central`; this module only reads the flags, rejects
bad input with a one-line error (exit status 1), writes the flag values to
`<save_model_dir>/flags.json` and starts training. Rerunning the same command
resumes a killed run; see `benchmark.central` for every output file.
"""

import json

from absl import app
from absl import flags

from benchmark import central
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
    "save_model_dir", "./",
    "Directory for the best weights, metrics.csv, tensorboard/, "
    "final_metrics.json and flags.json; rerun with the same directory to "
    "resume.")
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

_ALL_FLAGS = (_TFRECORDS_DIR, _LEARNING_RATE, _CLIPNORM, _TRAIN_BATCH_SIZE,
              _EVAL_BATCH_SIZE, _NUM_EPOCHS, _RESTORE_MODEL_PATH,
              _SAVE_MODEL_DIR, _IMAGE_HEIGHT, _IMAGE_WIDTH,
              _USE_FINE_GRAINED_LABELS, _BINARY_LABEL, _SEED, _PRECISION)


def _config_from_flags() -> central.CentralConfig:
  """The flag values as a validated `CentralConfig` (FlairInputError on bad
  values, naming the flag)."""
  return central.CentralConfig(
      **{holder.name: holder.value for holder in _ALL_FLAGS})


@errors.exit_on_input_error
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise errors.FlairInputError(
        f"unexpected positional arguments: {' '.join(argv[1:])} (all "
        "settings are --flags)")
  config = _config_from_flags()
  central.load_inputs(config)  # Rejects bad data flags before writing files.
  io_utils.prepare_save_dir(
      config.save_model_dir, {h.name: h.value for h in _ALL_FLAGS})
  final = central.train_central(config)
  print(json.dumps(final, indent=2, sort_keys=True))


def run() -> None:
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
