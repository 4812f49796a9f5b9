"""What a federated run writes and shows, as `tff.program.ReleaseManager`s
to which `training.loop.run_rounds` releases each round's metrics, and the
`metrics.csv` columns a round's TFF metrics become (`RoundColumns`).

* `CsvRoundsManager`: `metrics.csv`, one row per round (TFF's
  `tff.program.CSVFileReleaseManager`);
* `TensorBoardManager`: TensorBoard scalars (TFF's
  `tff.program.TensorBoardReleaseManager`);
* `BestWeightsManager`: the global model's weights whenever val loss
  improves;
* `LoggingManager`: one log line per evaluated round;
* `ProgressManager`: a progress bar over rounds.

Storage failures (disk full, read-only, permission) become one-line
`OutputWriteError`s naming the file, with nothing cut short left behind.

metrics.csv: one row per round, `round` first, then the other columns in
alphabetical order (the order `tff.program.CSVFileReleaseManager` writes):
`round_time_s` (wall time of the round: client data, training, aggregation
and the server update), `train_<name>` for the clients' training metrics
(`train_loss`, the `metrics.metric_names` metrics, `train_num_examples`,
`train_num_batches`), the aggregator's measurements (client update norms
`client_update_norm_mean` / `_std`, the averaged update's
`server_update_norm` / `_max` / `_min`; with DP `dp_clip`, the L2 clip
applied this round, and `dp_noise_stddev`, the stddev of the Gaussian noise
added to the *sum* of clipped updates, `dp.sum_noise_multiplier`), and, on
evaluated rounds only (empty elsewhere), `eval_time_s` and `val_<name>`.
Round 0 holds the evaluation of the initial model. On resume, rows after
the checkpointed round are dropped and rewritten, so each round appears
once.
"""

import collections
import math
from typing import Any, Callable, Mapping, Optional, Sequence

from absl import logging
import tensorflow as tf
import tensorflow_federated as tff
import tqdm

from benchmark.core import file_io
from benchmark.training import loop

TRAIN_PREFIX = "train_"
VAL_PREFIX = "val_"
DP_CLIP_KEY = "dp_clip"
DP_NOISE_STDDEV_KEY = "dp_noise_stddev"
# Aggregator measurements -> metrics.csv column names. Keys are the last
# element of TFF's measurement path: `add_debug_measurements` names
# (tff.learning, debug_measurements.py).
_MEASUREMENT_COLUMNS = {
    "average_client_norm": "client_update_norm_mean",
    "std_dev_client_norm": "client_update_norm_std",
    "server_update_norm": "server_update_norm",
    "server_update_max": "server_update_max",
    "server_update_min": "server_update_min",
}
# tensorflow_privacy's QuantileAdaptiveClipSumQuery.derive_metrics name of
# the adaptive clip (after the round's update: the next round's clip).
_ADAPTIVE_CLIP_MEASUREMENT = "clip"


class RoundColumns(loop.Resumable):
  """A round's TFF metrics -> `metrics.csv` columns (module docstring).

  With DP (`sum_noise_multiplier` given) it adds `dp_clip` and
  `dp_noise_stddev`; the clip of the next round comes from the adaptive
  clipping query's measurement, and is kept across a resume
  (`loop.Resumable`, key `dp_clip`).

  Args:
    metric_names: `metrics.metric_names(num_outputs)`.
    initial_clip: the clip of the first round (`--l2_norm_clip`).
    sum_noise_multiplier: noise stddev on the sum of clipped updates in
      units of the clip (`dp.sum_noise_multiplier`), or None without DP.
  """

  def __init__(self, metric_names: Sequence[str], initial_clip: float,
               sum_noise_multiplier: Optional[float] = None):
    self._train_names = list(metric_names) + ["num_examples", "num_batches"]
    self._clip = float(initial_clip)
    self._sum_noise_multiplier = sum_noise_multiplier

  def resume_state(self) -> dict[str, Any]:
    return {DP_CLIP_KEY: self._clip}

  def restore(self, values: Mapping[str, Any]) -> None:
    self._clip = float(values[DP_CLIP_KEY])

  def __call__(self, round_metrics: Any) -> dict[str, float]:
    flat = loop.flatten_metrics(round_metrics)
    row = collections.OrderedDict()
    train = {p.rsplit("/", 1)[-1]: v for p, v in flat.items()
             if "/train/" in f"/{p}/"}
    for name in self._train_names:
      if name in train:
        row[TRAIN_PREFIX + name] = train[name]
    aggregator = {p.rsplit("/", 1)[-1]: v for p, v in flat.items()
                  if p.startswith("aggregator/")}
    for key, column in _MEASUREMENT_COLUMNS.items():
      if key in aggregator:
        row[column] = aggregator[key]
    if self._sum_noise_multiplier is not None:
      row[DP_CLIP_KEY] = self._clip
      row[DP_NOISE_STDDEV_KEY] = self._sum_noise_multiplier * self._clip
      if _ADAPTIVE_CLIP_MEASUREMENT in aggregator:
        self._clip = aggregator[_ADAPTIVE_CLIP_MEASUREMENT]
    return row


class CsvRoundsManager(tff.program.ReleaseManager):
  """`metrics.csv` through TFF's `CSVFileReleaseManager`, every row with the
  same columns: rows are held until a training round has shown the
  round's columns (round 0 has the evaluation's only), then each is written
  with `""` for the columns it lacks.

  Args:
    path: the CSV file (appended to when it exists; rows at or after a
      released round are replaced, so a resumed run writes each round once).
    evaluation_columns: the columns only evaluated rounds have
      (`loop.EVAL_TIME_KEY` and the `val_<name>` columns).
  """

  def __init__(self, path: str, evaluation_columns: Sequence[str]):
    self._path = path
    with file_io.tff_output(path):
      self._csv = tff.program.CSVFileReleaseManager(
          path, key_fieldname=loop.ROUND_KEY)
    self._evaluation_columns = list(evaluation_columns)
    self._columns = None
    self._pending = []

  async def release(self, value: Mapping[str, Any], key: int) -> None:
    self._pending.append((key, value))
    if self._columns is None and loop.ROUND_TIME_KEY in value:
      self._columns = [c for c in value if c not in self._evaluation_columns]
      self._columns += self._evaluation_columns
    if self._columns is None:
      return
    for round_num, row in self._pending:
      with file_io.tff_output(self._path):
        await self._csv.release({c: row.get(c, "") for c in self._columns},
                                round_num)
    self._pending.clear()


class TensorBoardManager(tff.program.ReleaseManager):
  """TensorBoard scalars of each round through TFF's
  `TensorBoardReleaseManager`, named `<prefix>/<name>` (`train/loss`,
  `val/macro_averaged_precision`, `round/time_s`, ...)."""

  def __init__(self, directory: str):
    self._directory = directory
    self._manager = tff.program.TensorBoardReleaseManager(directory)

  async def release(self, value: Mapping[str, Any], key: int) -> None:
    with file_io.summary_output(self._directory):
      await self._manager.release(
          {name.replace("_", "/", 1): v for name, v in value.items()}, key)


class BestWeightsManager(tff.program.ReleaseManager, loop.Resumable):
  """Saves the global model's weights whenever an evaluated round's val
  loss is the lowest so far (Keras weights HDF5, written atomically), and
  remembers which round that was across a resume (`loop.Resumable`, keys
  `best_val_loss`, `best_round`).

  Args:
    path: the weights file.
    keras_model: a model of the run's architecture, to save from.
    weights_fn: returns the weights the released metrics were measured on
      (`tff.learning.models.ModelWeights`), e.g.
      `evaluation.KerasEvaluation.last_weights`; called only when they are
      saved, and synchronous work only (it runs inside the release).
  """

  def __init__(self, path: str, keras_model: tf.keras.Model,
               weights_fn: Callable[[], tff.learning.models.ModelWeights]):
    self.path = path
    self._keras_model = keras_model
    self._weights_fn = weights_fn
    self.best_val_loss = math.inf
    self.best_round = -1

  def resume_state(self) -> dict[str, Any]:
    return {"best_val_loss": self.best_val_loss,
            "best_round": self.best_round}

  def restore(self, values: Mapping[str, Any]) -> None:
    self.best_val_loss = float(values["best_val_loss"])
    self.best_round = int(values["best_round"])

  async def release(self, value: Mapping[str, Any], key: int) -> None:
    val_loss = value.get(VAL_PREFIX + "loss")
    if val_loss is None or not val_loss < self.best_val_loss:
      return
    self.best_val_loss, self.best_round = float(val_loss), int(key)
    self._weights_fn().assign_weights_to(self._keras_model)
    file_io.save_keras_weights_h5(self._keras_model, self.path)


class LoggingManager(tff.program.ReleaseManager):
  """Logs each evaluated round's val loss and `key_metric` (absl INFO; the
  other metrics are in metrics.csv)."""

  def __init__(self, key_metric: str):
    self._key_metric = key_metric

  async def release(self, value: Mapping[str, Any], key: int) -> None:
    if VAL_PREFIX + "loss" in value:
      logging.info("Round %d: val loss %.4f, %s %.4f", key,
                   value[VAL_PREFIX + "loss"], self._key_metric,
                   value.get(self._key_metric, float("nan")))


class ProgressManager(tff.program.ReleaseManager):
  """A tqdm progress bar over rounds, showing the last training loss and
  the last value of `key_metric`; a context manager that closes it.

  Args:
    total_rounds: the bar's total.
    key_metric: the column to show besides the training loss.
    show: False disables the bar.
  """

  def __init__(self, total_rounds: int, key_metric: str, show: bool = True):
    self._bar = tqdm.tqdm(total=total_rounds, desc="rounds", unit="round",
                          disable=not show, dynamic_ncols=True)
    self._key_metric = key_metric
    self._postfix = {}

  def __enter__(self) -> "ProgressManager":
    return self

  def __exit__(self, *exc_info) -> None:
    self._bar.close()

  async def release(self, value: Mapping[str, Any], key: int) -> None:
    loss = value.get(TRAIN_PREFIX + "loss")
    if loss is not None:
      self._postfix["loss"] = f"{loss:.4f}"
    if self._key_metric in value:
      self._postfix[self._key_metric] = f"{value[self._key_metric]:.4f}"
    if self._postfix:
      self._bar.set_postfix(self._postfix, refresh=False)
    if key > 0 and self._bar.n == 0:  # The first round of a resumed run.
      self._bar.initial = self._bar.n = key - 1
    self._bar.update(key - self._bar.n)
