"""Central training's own outputs: the per-epoch checkpoint it resumes from,
best weights kept across a resume, and `metrics.csv`/TensorBoard/checkpoint
files left complete after a storage failure (Keras callbacks and clean-up)."""

import csv
import math
import os
import shutil
from typing import Optional

from absl import logging
import tensorflow as tf

from benchmark.core import constants
from benchmark.core import file_io


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


class EpochCheckpoint:
  """The model's weights, the optimizer's state and the number of epochs
  done, saved after every epoch in `<save_model_dir>/backup/` (TensorFlow
  checkpoints, `tf.train.CheckpointManager`, the latest kept). A save cut
  short is never listed in the manager's index, so a restore reads the
  previous complete one.

  Args:
    directory: the checkpoint folder.
    model: the compiled Keras model (its optimizer is saved with it).
  """

  def __init__(self, directory: str, model: tf.keras.Model):
    self._epochs_done = tf.Variable(0, dtype=tf.int64, trainable=False)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer,
                                     epochs_done=self._epochs_done)
    self._manager = tf.train.CheckpointManager(checkpoint, directory,
                                               max_to_keep=1)

  @staticmethod
  def epochs_done_in(directory: str) -> int:
    """The epochs done of the latest checkpoint in `directory` (0 without
    one), read without building a model."""
    latest = tf.train.latest_checkpoint(directory)
    if latest is None:
      return 0
    return int(tf.train.load_variable(
        latest, "epochs_done/.ATTRIBUTES/VARIABLE_VALUE"))

  def restore(self) -> int:
    """Restores the latest checkpoint, if any; returns the epochs it had
    done (0 without one)."""
    if self._manager.latest_checkpoint is None:
      return 0
    self._manager.checkpoint.restore(
        self._manager.latest_checkpoint).assert_existing_objects_matched()
    logging.info("Resuming from %s.", self._manager.latest_checkpoint)
    return int(self._epochs_done.numpy())

  def save(self, epochs_done: int) -> None:
    """Saves the state after `epochs_done` epochs."""
    self._epochs_done.assign(epochs_done)
    self._manager.save(checkpoint_number=epochs_done)


def completed_epochs(csv_path: str) -> set[int]:
  _, rows = _read_metrics_rows(csv_path)
  return {e for e in map(_row_epoch, rows) if e is not None}


class ResumableBestWeights(tf.keras.callbacks.Callback):
  """Keeps the weights with the lowest `val_loss` and tidies `metrics.csv`
  when a run resumes.

  At the first epoch `r` this process trains (0 for a fresh run, later after
  `EpochCheckpoint` restored a checkpoint), rows of `metrics.csv` with epoch
  >= r are dropped (an epoch killed after its row was written but before
  its checkpoint is trained again), and the best val loss so far is taken
  from the rows
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
      logging.info("Resuming at epoch %d of %d (Keras counts "
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


def tidy_after_write_error(save_dir: str) -> None:
  """Leaves only complete outputs in `save_dir` after a storage failure
  (`OutputWriteError`) during `model.fit`.

  CSVLogger appends in place: a row cut by a full disk is removed so that
  metrics.csv holds complete rows only (the epoch is trained again on
  resume, its checkpoint was not written). The TensorBoard callback appends
  to its events files: a record cut short is removed, so TensorBoard reads
  them without error. A checkpoint cut short stays in TF's temporary
  "<ckpt>_temp" directory, never listed in the checkpoint index: removed
  to free the space.
  """
  file_io.drop_partial_last_line(
      os.path.join(save_dir, constants.METRICS_CSV_FILE))
  file_io.drop_partial_event_records(
      os.path.join(save_dir, constants.TENSORBOARD_DIR))
  backup_dir = os.path.join(save_dir, constants.CENTRAL_BACKUP_DIR)
  for root, dirs, _ in os.walk(backup_dir):
    for name in dirs:
      if name.endswith("_temp"):
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
