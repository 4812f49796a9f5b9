"""Centralized (non-federated) training of ResNet-18 on FLAIR with Keras.

The centralized run is the upper bound that federated results are compared
with (docs/original_benchmark.md, "Command lines"): every training user's
images are pooled into one dataset and the model is trained with Adam on binary
cross-entropy over logits. `train_central(config)` is the whole run; the flags
live in `benchmark.central_main`.

Outputs in `config.save_model_dir` (file names from `benchmark.constants`):

* `metrics.csv`: one row per epoch, Keras `CSVLogger` columns (`epoch`,
  0-based as in Keras, then `loss`, the metrics, `val_loss`, `val_<metric>`,
  in Keras' sorted order);
* `tensorboard/`: Keras `TensorBoard` logs;
* `resnet18_central_{N}labels.h5`: the weights with the lowest val loss so
  far (Keras weights HDF5, N = number of model outputs), written atomically;
* `backup/`: Keras `BackupAndRestore` state while training runs (removed by
  Keras when training ends);
* `final_metrics.json`: `{"val": {name: value}, "test": {name: value}}`, the
  best weights evaluated on val and test, names from `metrics.metric_names`.

Resuming: rerunning the same configuration after the process was killed
continues from the last epoch whose backup was saved. Callbacks run in the
order best-weights, CSV, TensorBoard, backup, so a backed-up epoch always has
its CSV row and its best-weights decision on disk; an epoch that wrote its row
but was killed before its backup is trained again, and its old row is dropped
first so that `metrics.csv` never repeats an epoch. A run that already
finished is not trained again.

A full disk, read-only directory or permission error while saving weights,
the backup or metrics raises `errors.OutputWriteError` naming the output
(no partial file is left under a final name, a metrics row cut short is
removed); a record or image TensorFlow cannot read raises a
`FlairInputError` naming the user files that fail
(`triage.training_data_error`). Rerunning after the cause is fixed resumes.
"""

import contextlib
import csv
import dataclasses
import json
import math
import os
import shutil
import sys
from typing import Optional

from absl import logging
import tensorflow as tf
import tensorflow_federated as tff

from benchmark.core import constants
from benchmark.core import errors
from benchmark.core import file_io
from benchmark.core import validate
from benchmark.core.errors import FlairInputError
from benchmark.data import label_sets
from benchmark.data import pipeline
from benchmark.data import triage
from benchmark.model import metrics
from benchmark.model import mixed_precision
from benchmark.model import resnet
from benchmark.model import restore
from benchmark.training import optimizers

BACKUP_DIR = constants.CENTRAL_BACKUP_DIR
TRAINER_NAME = "central"
# Images kept in the shuffle buffer of the pooled training set. Each decoded
# image is 256*256*3 bytes = 192 KiB, so 2,000 images hold ~400 MiB of RAM.
DEFAULT_SHUFFLE_BUFFER_SIZE = 2000
# User files read at once when pooling the training users (interleaved, so
# consecutive examples come from different users before the shuffle buffer).
_INTERLEAVE_CYCLE_LENGTH = 16


@dataclasses.dataclass(frozen=True)
class CentralConfig:
  """Settings of one centralized run; field names are the flags of
  `benchmark.central_main` (defaults from docs/original_benchmark.md).

  Attributes:
    tfrecords_dir: directory written by `prepare_tfrecords.py`.
    learning_rate: Adam learning rate (> 0).
    clipnorm: Adam gradient clipping by norm (> 0), per variable as in Keras.
    train_batch_size: global training batch size in images (> 0), split over
      the replicas of the distribution strategy.
    eval_batch_size: global batch size for val/test evaluation (> 0).
    num_epochs: number of passes over the pooled training set (> 0).
    restore_model_path: optional Keras weights `.h5` (the ImageNet ResNet-18);
      when set, the BatchNorm variant is built and the weights are loaded by
      layer name, skipping layers whose shapes differ (the classifier).
    save_model_dir: where every output goes (created if missing).
    image_height: crop height in pixels, 1..256 (the model crops the 256x256
      image: randomly in training, centrally in evaluation).
    image_width: crop width in pixels, 1..256.
    use_fine_grained_labels: train on the fine-grained labels instead of the
      17 coarse ones.
    binary_label: optional single label name to predict with one logit.
    seed: seeds weight initialisation, the user order, shuffling, crops and
      flips (a non-negative integer).
    shuffle_buffer_size: images in the training shuffle buffer (> 0).
    precision: "float32" (default) or "bfloat16": Keras mixed precision for
      training and evaluation (`benchmark.model.layer_dtype`; variables,
      loss and metrics stay float32).

  Raises:
    FlairInputError: (from `__post_init__`) a field is out of range; the
      message names the flag.
  """
  tfrecords_dir: str
  learning_rate: float = 1e-4
  clipnorm: float = 10.0
  train_batch_size: int = 512
  eval_batch_size: int = 512
  num_epochs: int = 100
  restore_model_path: Optional[str] = None
  save_model_dir: str = "./"
  image_height: int = 224
  image_width: int = 224
  use_fine_grained_labels: bool = False
  binary_label: Optional[str] = None
  seed: int = 0
  shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER_SIZE
  precision: str = mixed_precision.FLOAT32

  def __post_init__(self):
    if not isinstance(self.tfrecords_dir, str) or not self.tfrecords_dir:
      raise FlairInputError(
          "--tfrecords_dir is required: the directory written by "
          "prepare_tfrecords.py")
    validate.check_positive_number("--learning_rate", self.learning_rate)
    validate.check_positive_number("--clipnorm", self.clipnorm)
    for flag in ("train_batch_size", "eval_batch_size", "num_epochs",
                 "image_height", "image_width", "shuffle_buffer_size"):
      validate.check_int(f"--{flag}", getattr(self, flag))
    for flag in ("image_height", "image_width"):
      if getattr(self, flag) > constants.IMAGE_SIZE:
        raise FlairInputError(
            f"--{flag} must be at most {constants.IMAGE_SIZE} (the stored "
            f"image size), got {getattr(self, flag)}")
    if not isinstance(self.save_model_dir, str) or not self.save_model_dir:
      raise FlairInputError("--save_model_dir must be a non-empty path")
    if self.restore_model_path is not None:
      if not isinstance(self.restore_model_path, str):
        raise FlairInputError(
            f"--restore_model_path must be a path, got "
            f"{self.restore_model_path!r}")
      if not os.path.isfile(self.restore_model_path):
        raise FlairInputError(
            f"--restore_model_path {self.restore_model_path!r} is not a file "
            "(expected Keras weights in HDF5, e.g. resnet18.h5)")
    if self.binary_label is not None and (
        not isinstance(self.binary_label, str) or not self.binary_label):
      raise FlairInputError(
          f"--binary_label must be a label name, got {self.binary_label!r}")
    validate.check_int("--seed", self.seed, 0)
    mixed_precision.check_precision(self.precision)


def load_inputs(config: CentralConfig
               ) -> tuple[label_sets.LabelSpec,
                          dict[str, tff.simulation.datasets.ClientData]]:
  """Reads the label index and the three partitions named by `config`.

  Cheap (lists files, reads `label_index.json`); `central_main` calls it to
  reject bad input before writing anything.

  Returns:
    `(label_spec, {"train": ..., "val": ..., "test": ...})`, see
    `benchmark.data.load_client_data`.

  Raises:
    FlairInputError: missing or empty `--tfrecords_dir`, missing label index
      or partition, unknown `--binary_label` (the message lists valid names).
  """
  label_spec = label_sets.load_label_spec(
      config.tfrecords_dir,
      use_fine_grained_labels=config.use_fine_grained_labels,
      binary_label=config.binary_label)
  return label_spec, pipeline.load_client_data(config.tfrecords_dir, label_spec)


def best_weights_path(save_model_dir: str, num_outputs: int) -> str:
  """Path of the best weights: `<dir>/resnet18_central_{num_outputs}labels.h5`."""
  return os.path.join(
      save_model_dir,
      constants.BEST_WEIGHTS_FILE_PATTERN.format(trainer=TRAINER_NAME,
                                                 num_outputs=num_outputs))


def _train_dataset(client_data, config: CentralConfig) -> tf.data.Dataset:
  """Pools every training user: users in a fresh random order each epoch,
  `_INTERLEAVE_CYCLE_LENGTH` user files read at once, then a shuffle buffer
  and batches of `train_batch_size`. Elements: `(uint8 [b, 256, 256, 3],
  int32 [b, num_outputs])`."""
  client_ids = tf.data.Dataset.from_tensor_slices(list(client_data.client_ids))
  client_ids = client_ids.shuffle(
      len(client_data.client_ids), seed=config.seed,
      reshuffle_each_iteration=True)
  images = client_ids.interleave(
      client_data.serializable_dataset_fn,
      cycle_length=_INTERLEAVE_CYCLE_LENGTH,
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True)
  return pipeline.keras_input(
      images.shuffle(config.shuffle_buffer_size, seed=config.seed,
                     reshuffle_each_iteration=True)
      .batch(config.train_batch_size))


def _read_metrics_rows(csv_path: str) -> tuple[Optional[str], list[dict]]:
  """Returns (header line or None, rows as dicts) of a CSVLogger file."""
  if not os.path.isfile(csv_path):
    return None, []
  with open(csv_path, newline="", encoding="utf-8") as f:
    text = f.read()
  if not text.strip():
    return None, []
  header = text.splitlines(keepends=True)[0]
  rows = list(csv.DictReader(text.splitlines()))
  return header, rows


def _row_epoch(row: dict) -> Optional[int]:
  try:
    return int(row.get("epoch", ""))
  except ValueError:
    return None


def _has_backup(backup_dir: str) -> bool:
  """Whether `BackupAndRestore` left any file under `backup_dir` (it removes
  its files when `fit` ends normally)."""
  return any(files for _, _, files in os.walk(backup_dir))


def _completed_epochs(csv_path: str) -> set[int]:
  _, rows = _read_metrics_rows(csv_path)
  return {e for e in map(_row_epoch, rows) if e is not None}


class _ResumableBestWeights(tf.keras.callbacks.Callback):
  """Keeps the weights with the lowest `val_loss` and tidies `metrics.csv`
  when a run resumes.

  At the first epoch `r` this process trains (0 for a fresh run, later after
  `BackupAndRestore` restored a backup), rows of `metrics.csv` with epoch >= r
  are dropped (an epoch killed after its row was written but before its backup
  is trained again), and the best val loss so far is taken from the rows
  kept, so that a worse epoch after a resume cannot replace the best weights
  (Keras' `ModelCheckpoint` would forget it). The file is truncated in place,
  keeping its header: `CSVLogger` holds it open in append mode.

  The weights are written to a temporary file and renamed, so a kill never
  leaves a half-written best-weights file (Keras' `ModelCheckpoint` writes in
  place). Must come before `CSVLogger` in the callback list.
  """

  def __init__(self, weights_path: str, csv_path: str):
    super().__init__()
    self._weights_path = weights_path
    self._csv_path = csv_path
    self._first_epoch = None
    self.best = math.inf

  def on_epoch_begin(self, epoch, logs=None):
    if self._first_epoch is not None:
      return
    self._first_epoch = epoch
    header, rows = _read_metrics_rows(self._csv_path)
    kept = [r for r in rows
            if _row_epoch(r) is not None and _row_epoch(r) < epoch]
    if header is not None and len(kept) != len(rows):
      logging.info("Dropping %d row(s) of %s from epoch %d on (trained again).",
                   len(rows) - len(kept), self._csv_path, epoch)
      with open(self._csv_path, "r+", newline="", encoding="utf-8") as f:
        f.write(header)
        if kept:
          writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()),
                                  dialect=csv.excel)
          writer.writerows(kept)
        f.truncate()
    losses = [float(r["val_loss"]) for r in kept if r.get("val_loss")]
    losses = [v for v in losses if math.isfinite(v)]
    self.best = min(losses, default=math.inf)
    if epoch > 0:
      logging.info("Resuming from the backup: epoch %d of %d (Keras counts "
                   "from 1); best val_loss so far %.6g.", epoch + 1,
                   (getattr(self, "params", None) or {}).get("epochs", -1),
                   self.best)

  def on_epoch_end(self, epoch, logs=None):
    val_loss = (logs or {}).get("val_loss")
    if val_loss is None or not math.isfinite(val_loss):
      logging.warning("Epoch %d: val_loss is %r; best weights not updated.",
                      epoch + 1, val_loss)
      return
    if val_loss < self.best:
      logging.info("Epoch %d: val_loss improved from %.6g to %.6g; saving %s",
                   epoch + 1, self.best, val_loss, self._weights_path)
      self.best = float(val_loss)
      file_io.save_keras_weights_h5(self.model, self._weights_path)


def make_optimizer(config: CentralConfig) -> tf.keras.optimizers.Optimizer:
  """Adam (Kingma & Ba 2015, arXiv 1412.6980; betas 0.9 / 0.999, epsilon
  1e-7, Keras' defaults) at `config.learning_rate`, each gradient clipped to
  L2 norm `config.clipnorm` first (Keras' per-variable `clipnorm`).

  Keras' legacy Adam: the same update as `tf.keras.optimizers.Adam` (equal
  within float32 round-off, tests/test_central.py), computed by one fused
  kernel per weight (`ResourceApplyAdam`) instead of about ten passes over
  each weight. The clipping is `optimizers.clip_each_gradient` (one pass
  for each norm) rather than Keras' `clipnorm`. Measured on a 2-core CPU
  (ResNet-18, 64x64, batch 16): interleaved fits on central's input path,
  two runs, 142 against 125 and 114 against 101 images/s median (legacy
  against Keras' Adam); one update, 10-11 ms against 14-16 ms with
  `clipnorm` (`scripts/bench_clipped_update.py`). Its optimizer state is
  laid out differently, so a backup written by the Keras optimizer (before
  this change) resumes with fresh Adam moments.
  """
  return tf.keras.optimizers.legacy.Adam(
      learning_rate=config.learning_rate,
      gradient_transformers=[optimizers.clip_each_gradient(config.clipnorm)])


def _build_model(config: CentralConfig, num_outputs: int) -> tf.keras.Model:
  """Builds and compiles ResNet-18 (in the current strategy scope); restores
  `config.restore_model_path` by layer name when given."""
  model = resnet.resnet18(
      input_shape=constants.IMAGE_SHAPE,
      num_classes=num_outputs,
      pretrained=config.restore_model_path is not None,
      crop_size=(config.image_height, config.image_width),
      seed=config.seed, precision=config.precision)
  if config.restore_model_path is not None:
    # Logs its own summary (layers loaded, layers skipped and why).
    report = restore.restore_weights_by_name(model, config.restore_model_path)
    logging.info("Fine-tuning from %s: %d layer(s) restored, %d not (%s).",
                 config.restore_model_path, len(report.loaded),
                 len(report.skipped),
                 ", ".join(name for name, _ in report.skipped) or "none")
  model.compile(
      optimizer=make_optimizer(config),
      loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
      metrics=metrics.make_metrics(num_outputs))
  return model


def _evaluate(model: tf.keras.Model, dataset: tf.data.Dataset,
              names: list[str], verbose: int) -> dict[str, float]:
  results = model.evaluate(dataset, return_dict=True, verbose=verbose)
  missing = [n for n in names if n not in results]
  if missing:
    raise RuntimeError(f"model.evaluate did not report {missing}: {results}")
  return {name: float(results[name]) for name in names}


def _keras_verbosity() -> int:
  """1 (a live progress bar) on a terminal, 2 (one line per epoch) in logs."""
  return 1 if sys.stdout.isatty() else 2


def tidy_after_write_error(save_dir: str) -> None:
  """Leaves only complete outputs in `save_dir` after a storage failure
  (`OutputWriteError`) during `model.fit`.

  CSVLogger appends in place: a row cut by a full disk is removed so that
  metrics.csv holds complete rows only (the epoch is trained again on
  resume, its backup was not written). The TensorBoard callback appends to
  its events files: a record cut short is removed, so TensorBoard reads
  them without error. A backup cut short stays in TF's temporary
  "<ckpt>_temp" directory, never listed in the backup's index: removed to
  free the space.
  """
  file_io.drop_partial_last_line(
      os.path.join(save_dir, constants.METRICS_CSV_FILE))
  file_io.drop_partial_event_records(
      os.path.join(save_dir, constants.TENSORBOARD_DIR))
  for root, dirs, _ in os.walk(os.path.join(save_dir, BACKUP_DIR)):
    for name in dirs:
      if name.endswith("_temp"):
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def distribution_strategy() -> tf.distribute.Strategy:
  """The strategy central training builds its model in: a
  `tf.distribute.MirroredStrategy` over the local GPUs when there are two or
  more, else TensorFlow's default strategy (the one GPU, or the CPU).

  One replica gains nothing from mirroring and pays for it: on a 2-core CPU
  (`scripts/bench_vs_pfl.py`'s central settings, interleaved runs) an epoch
  took 5.4 s under MirroredStrategy against 4.6-5.1 s without it.
  """
  if len(tf.config.list_logical_devices("GPU")) > 1:
    return tf.distribute.MirroredStrategy()
  return tf.distribute.get_strategy()


def train_central(config: CentralConfig) -> dict:
  """Trains ResNet-18 on the pooled training users, keeping the best weights
  by val loss, and evaluates them on val and test.

  Uses every local GPU (see `distribution_strategy`). Resumes a killed run
  found in `config.save_model_dir` (Keras `BackupAndRestore`); returns the
  stored results of a run that already finished there without training
  again.

  Args:
    config: the run's settings.

  Returns:
    `{"val": {name: value}, "test": {name: value}}` with the names of
    `benchmark.metrics.metric_names(num_outputs)` ("loss" first), as also
    written to `final_metrics.json`.

  Raises:
    FlairInputError: bad input (see `load_inputs`; a `--restore_model_path`
      that cannot be read or matches no layer).
    RuntimeError: no epoch produced a finite val loss, so there are no best
      weights to evaluate.
  """
  label_spec, client_data = load_inputs(config)
  num_outputs = label_spec.num_outputs
  names = metrics.metric_names(num_outputs)
  save_dir = config.save_model_dir
  os.makedirs(save_dir, exist_ok=True)
  csv_path = os.path.join(save_dir, constants.METRICS_CSV_FILE)
  final_path = os.path.join(save_dir, constants.FINAL_METRICS_FILE)
  weights_path = best_weights_path(save_dir, num_outputs)
  backup_dir = os.path.join(save_dir, BACKUP_DIR)

  trained = (set(range(config.num_epochs)) <= _completed_epochs(csv_path)
             and not _has_backup(backup_dir)
             and os.path.isfile(weights_path))
  if trained and os.path.isfile(final_path):
    logging.info("%s already holds a finished run (%s); not training again.",
                 save_dir, final_path)
    with open(final_path, encoding="utf-8") as f:
      return json.load(f)

  tf.keras.utils.set_random_seed(config.seed)
  strategy = distribution_strategy()
  logging.info("Training on %d replica(s) with %d output(s) (%s labels%s).",
               strategy.num_replicas_in_sync, num_outputs,
               "fine-grained" if config.use_fine_grained_labels else "coarse",
               f", binary {config.binary_label!r}" if config.binary_label
               else "")
  with strategy.scope():
    model = _build_model(config, num_outputs)
  val_ds = pipeline.eval_dataset(client_data[constants.VAL],
                             config.eval_batch_size)
  verbose = _keras_verbosity()

  if trained:
    logging.info("All %d epochs are done; evaluating the best weights.",
                 config.num_epochs)
  else:
    with contextlib.suppress(FileNotFoundError):
      os.remove(final_path)  # stale: from a run with fewer epochs.
    callbacks = [
        _ResumableBestWeights(weights_path, csv_path),
        tf.keras.callbacks.CSVLogger(csv_path, append=True),
        tf.keras.callbacks.TensorBoard(
            log_dir=os.path.join(save_dir, constants.TENSORBOARD_DIR)),
        tf.keras.callbacks.BackupAndRestore(backup_dir),
    ]
    try:
      with file_io.output_errors(save_dir):
        model.fit(_train_dataset(client_data[constants.TRAIN], config),
                  epochs=config.num_epochs, validation_data=val_ds,
                  callbacks=callbacks, verbose=verbose)
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError,
            tf.errors.NotFoundError) as e:
      # A record or image that TensorFlow cannot read (the main pre-checks
      # records and labels without decoding images; a file may change
      # during the run): one line per user file that fails.
      raise triage.training_data_error(config.tfrecords_dir, label_spec,
                                     e) from e
    except errors.OutputWriteError:
      tidy_after_write_error(save_dir)
      raise
    if not _has_backup(backup_dir):
      shutil.rmtree(backup_dir, ignore_errors=True)  # Keras leaves it empty.

  if not os.path.isfile(weights_path):
    raise RuntimeError(
        f"no best weights at {weights_path}: no epoch had a finite val loss")
  model.load_weights(weights_path)
  test_ds = pipeline.eval_dataset(client_data[constants.TEST],
                              config.eval_batch_size)
  try:
    final = {
        constants.VAL: _evaluate(model, val_ds, names, verbose),
        constants.TEST: _evaluate(model, test_ds, names, verbose),
    }
  except (tf.errors.InvalidArgumentError, tf.errors.DataLossError,
          tf.errors.NotFoundError) as e:
    raise triage.training_data_error(config.tfrecords_dir, label_spec,
                                   e) from e
  file_io.write_json_atomic(final_path, final)
  logging.info("Best weights (%s) on val: %s; on test: %s", weights_path,
               final[constants.VAL], final[constants.TEST])
  return final
