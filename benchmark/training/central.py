"""A central run from its configuration: ResNet-18 trained with Keras on
all training images pooled (the upper bound federated results are compared
with), to its final metrics.

`train_central(config, label_spec)` is the whole run
(docs/original_benchmark.md, "Command lines"): every training user's images pooled into one dataset,
Adam on binary cross-entropy over logits, the weights with the best val
loss kept and evaluated on val and test at the end; the flags live in
`benchmark.central_main`.

Outputs in `save_model_dir` (file names from `core.constants`):

* `metrics.csv`: one row per epoch, Keras `CSVLogger` columns (`epoch`,
  0-based as in Keras, then `loss`, the metrics, `val_loss`, `val_<metric>`,
  in Keras' sorted order);
* `tensorboard/`: Keras `TensorBoard` logs;
* `<layout>_central_{N}labels.h5`: the weights with the lowest val loss so
  far (Keras weights HDF5, N = number of model outputs), written atomically;
* `backup/`: the checkpoint of the last epochs (model, optimizer, epochs
  done; `central_outputs.EpochCheckpoint`), what a rerun resumes from;
* `final_metrics.json`: `{"val": {name: value}, "test": {name: value}}`, the
  best weights evaluated on val and test, names from `metrics.metric_names`.

Resuming: rerunning the same configuration continues after the last epoch
whose checkpoint was saved, also with a larger `--num_epochs` (a longer run
continues the same one). Each epoch is one Keras `fit` over that epoch's
dataset, whose order of users and images and whose crops and flips come
from `--seed` and the epoch (`training.seeds.epoch_seed`), so a resumed run
trains on the same batches as an uninterrupted one. Callbacks run in the
order best-weights, CSV, TensorBoard, and the checkpoint is saved after
them, so a checkpointed epoch always has its CSV row and its best-weights
decision on disk; an epoch that wrote its row but was killed before its
checkpoint is trained again, and its old row is dropped first so that
`metrics.csv` never repeats an epoch (`central_outputs.ResumableBestWeights`).
A run that already finished is not trained again. A full disk, read-only
directory or permission error while saving raises `errors.OutputWriteError`
naming the output, and nothing cut short is left
(`central_outputs.tidy_after_write_error`).
"""

import contextlib
import csv
import json
import math
import os
import sys
from typing import Any

from absl import logging
import tensorflow as tf

from benchmark.core import constants
from benchmark.core import errors
from benchmark.core import file_io
from benchmark.data import augmentation
from benchmark.data import label_sets
from benchmark.data import pipeline
from benchmark.model import metrics
from benchmark.training import central_outputs
from benchmark.training import config as config_lib
from benchmark.training import evaluation
from benchmark.training import models
from benchmark.training import optimizers
from benchmark.training import run_dir
from benchmark.training import seeds

TRAINER_NAME = "central"
# User files read at once when pooling the training users (interleaved, so
# consecutive examples come from different users before the shuffle buffer).
_INTERLEAVE_CYCLE_LENGTH = 16


def train_dataset(train_data, config: config_lib.CentralConfig,
                  epoch: int) -> tf.data.Dataset:
  """One epoch of the pooled training users, drawn from the epoch's seed
  (`seeds.epoch_seed(--seed, epoch)`): the users in a random order,
  `_INTERLEAVE_CYCLE_LENGTH` user files read at once, a shuffle buffer, each
  image randomly cropped and flipped (`pipeline.augmented`), batches of
  `train_batch_size`. The same seed and epoch give the same batches.
  Elements: `(uint8 [b, 256, 256, 3], int32 [b, num_outputs])`."""
  training = config.training
  seed = seeds.epoch_seed(config.model.seed, epoch)
  order_seed, shuffle_seed, augment_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  client_ids = tf.random.experimental.stateless_shuffle(
      tf.constant(sorted(train_data.client_ids)), seed=order_seed)
  images = tf.data.Dataset.from_tensor_slices(client_ids).interleave(
      train_data.serializable_dataset_fn,
      cycle_length=_INTERLEAVE_CYCLE_LENGTH,
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  images = images.shuffle(training.shuffle_buffer_size,
                          seed=augmentation.scalar_seed(shuffle_seed),
                          reshuffle_each_iteration=False)
  images = pipeline.augmented(images, augment_seed, config.model.crop_size)
  return pipeline.keras_input(images.batch(training.train_batch_size))


def make_optimizer(training: config_lib.CentralTrainingConfig
                  ) -> tf.keras.optimizers.Optimizer:
  """Adam (Kingma & Ba 2015, arXiv 1412.6980; betas 0.9 / 0.999, epsilon
  1e-7, Keras' defaults) at `training.learning_rate`, each gradient clipped
  to L2 norm `training.clipnorm` first (Keras' per-variable `clipnorm`, as
  `optimizers.clip_each_gradient`).

  Keras' legacy Adam: the same update as `tf.keras.optimizers.Adam` (equal
  within float32 round-off, tests/training/test_central.py) in one fused
  kernel per weight (`ResourceApplyAdam`). Its optimizer state is laid out
  unlike the Keras optimizer's, so a backup written by that one resumes
  with fresh Adam moments.
  """
  return tf.keras.optimizers.legacy.Adam(
      learning_rate=training.learning_rate,
      gradient_transformers=[optimizers.clip_each_gradient(training.clipnorm)])


def build_model(config: config_lib.CentralConfig,
                num_outputs: int) -> tf.keras.Model:
  """The configured model (`models.build_initial_model`: restored from
  `--restore_model_path` when given), compiled with `make_optimizer`, the
  loss and FLAIR's metrics; build it in the strategy's scope."""
  model = models.build_initial_model(config.model, num_outputs)
  model.compile(optimizer=make_optimizer(config.training), loss=models.loss(),
                metrics=metrics.make_metrics(num_outputs))
  return model


def _keras_verbosity() -> int:
  """1 (a live progress bar) on a terminal, 2 (one line per epoch) in logs."""
  return 1 if sys.stdout.isatty() else 2


def distribution_strategy() -> tf.distribute.Strategy:
  """The strategy central training builds its model in: a
  `tf.distribute.MirroredStrategy` over the local GPUs when there are two or
  more, else TensorFlow's default strategy (the one GPU, or the CPU; one
  replica gains nothing from mirroring, docs/performance.md)."""
  if len(tf.config.list_logical_devices("GPU")) > 1:
    return tf.distribute.MirroredStrategy()
  return tf.distribute.get_strategy()


class _Paths:
  """The files of one central run in its save directory."""

  def __init__(self, config: config_lib.CentralConfig, num_outputs: int):
    save_dir = config.output.save_model_dir
    self.save_dir = save_dir
    self.csv = os.path.join(save_dir, constants.METRICS_CSV_FILE)
    self.final = os.path.join(save_dir, constants.FINAL_METRICS_FILE)
    self.checkpoints = os.path.join(save_dir, constants.CENTRAL_BACKUP_DIR)
    self.tensorboard = os.path.join(save_dir, constants.TENSORBOARD_DIR)
    self.weights = run_dir.best_weights_path(
        save_dir, TRAINER_NAME, num_outputs, config.model.model_layout)


def _fit(model: tf.keras.Model, train_data, val_dataset: tf.data.Dataset,
         config: config_lib.CentralConfig, paths: _Paths,
         checkpoint: central_outputs.EpochCheckpoint,
         epochs_done: int) -> None:
  """Trains epochs `epochs_done` .. `num_epochs - 1`, one Keras `fit` each,
  with the run's callbacks and a checkpoint after each; storage failures
  leave complete outputs only and raise `OutputWriteError`."""
  with contextlib.suppress(FileNotFoundError):
    os.remove(paths.final)  # Stale: from a run with fewer epochs.
  callbacks = [
      central_outputs.ResumableBestWeights(paths.weights, paths.csv),
      tf.keras.callbacks.CSVLogger(paths.csv, append=True),
      tf.keras.callbacks.TensorBoard(log_dir=paths.tensorboard),
  ]
  try:
    with file_io.output_errors(paths.save_dir):
      for epoch in range(epochs_done, config.training.num_epochs):
        model.fit(train_dataset(train_data, config, epoch),
                  initial_epoch=epoch, epochs=epoch + 1,
                  validation_data=val_dataset, callbacks=callbacks,
                  verbose=_keras_verbosity())
        checkpoint.save(epoch + 1)
  except errors.OutputWriteError:
    central_outputs.tidy_after_write_error(paths.save_dir)
    raise


def train_central(config: config_lib.CentralConfig,
                  label_spec: label_sets.LabelSpec) -> dict[str, Any]:
  """Trains the model on the pooled training users, keeping the best weights
  by val loss, and evaluates them on val and test.

  Uses every local GPU (see `distribution_strategy`). Resumes a run found in
  `save_model_dir` after its last checkpointed epoch; returns the stored
  results of a run that already finished there without training again.

  Args:
    config: the run's settings.
    label_spec: the labels of `config.data` (`label_sets.load_label_spec`).

  Returns:
    `{"val": {name: value}, "test": {name: value}}` with the names of
    `metrics.metric_names(num_outputs)` ("loss" first), as also written to
    `final_metrics.json`.

  Raises:
    FlairInputError: a bad data directory, a `--restore_model_path` that
      cannot be read or does not fit the model, or training that diverged
      (no epoch had a finite val loss, so there are no best weights to
      evaluate: one line naming the flags to change).
    OutputWriteError: a storage failure while saving.
  """
  num_outputs = label_spec.num_outputs
  paths = _Paths(config, num_outputs)
  os.makedirs(paths.save_dir, exist_ok=True)
  num_epochs = config.training.num_epochs
  finished = (central_outputs.EpochCheckpoint.epochs_done_in(
      paths.checkpoints) >= num_epochs and os.path.isfile(paths.weights))
  if finished and os.path.isfile(paths.final):
    logging.info("%s already holds a finished run (%s); not training again.",
                 paths.save_dir, paths.final)
    with open(paths.final, encoding="utf-8") as f:
      return json.load(f)
  seeds.use_deterministic_ops(config.model.deterministic_ops)
  seeds.clear_global_seed()
  client_data = pipeline.load_client_data(config.data.tfrecords_dir,
                                          label_spec)
  strategy = distribution_strategy()
  logging.info("Training on %d replica(s) with %d output(s) (%s labels%s).",
               strategy.num_replicas_in_sync, num_outputs, label_spec.kind,
               f", binary {label_spec.binary_label!r}"
               if label_spec.binary_label else "")
  with strategy.scope():
    model = build_model(config, num_outputs)
    checkpoint = central_outputs.EpochCheckpoint(paths.checkpoints, model)
    epochs_done = checkpoint.restore()
  val_dataset = pipeline.eval_dataset(client_data[constants.VAL],
                                      config.data.eval_batch_size)
  if epochs_done >= num_epochs:
    logging.info("All %d epochs are done; evaluating the best weights.",
                 num_epochs)
  else:
    _fit(model, client_data[constants.TRAIN], val_dataset, config, paths,
         checkpoint, epochs_done)
  return _final_metrics(model, val_dataset, client_data, config, paths)


def _is_finite(text) -> bool:
  """Whether a CSV cell holds a finite number."""
  try:
    return math.isfinite(float(text))
  except (TypeError, ValueError):
    return False


def _no_best_weights_error(config: config_lib.CentralConfig,
                           paths: _Paths) -> errors.FlairInputError:
  """Why a run that trained has no best weights, as one line: training
  diverged (no epoch in metrics.csv has a finite val loss), with what to
  change; or the weights file was removed."""
  val_losses = []
  with contextlib.suppress(FileNotFoundError), \
      open(paths.csv, newline="", encoding="utf-8") as f:
    val_losses = [row.get("val_loss") for row in csv.DictReader(f)]
  if not val_losses or any(_is_finite(v) for v in val_losses):
    return errors.FlairInputError(
        f"--save_model_dir {paths.save_dir!r}: the best weights "
        f"{os.path.basename(paths.weights)} are missing (removed after "
        "training?); rerun with --overwrite to train again")
  training = config.training
  return errors.FlairInputError(
      f"training diverged: none of the {len(val_losses)} epoch(s) in "
      f"{paths.csv} had a finite val loss, so there are no best weights to "
      f"evaluate; lower --learning_rate (now {training.learning_rate:g}) or "
      f"--clipnorm (now {training.clipnorm:g}) and rerun with --overwrite "
      "(or another --save_model_dir)")


def _final_metrics(model: tf.keras.Model, val_dataset: tf.data.Dataset,
                   client_data: dict, config: config_lib.CentralConfig,
                   paths: _Paths) -> dict[str, Any]:
  """The best weights on val and test, written to final_metrics.json."""
  if not os.path.isfile(paths.weights):
    raise _no_best_weights_error(config, paths)
  model.load_weights(paths.weights)
  test_dataset = pipeline.eval_dataset(client_data[constants.TEST],
                                       config.data.eval_batch_size)
  final = {
      constants.VAL: evaluation.evaluate(model, val_dataset),
      constants.TEST: evaluation.evaluate(model, test_dataset),
  }
  file_io.write_json_atomic(paths.final, final)
  logging.info("Evaluated the best weights (%s) on val and test.",
               paths.weights)
  return final
