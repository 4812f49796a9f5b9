"""FLAIR's evaluation metrics as Keras metrics that also aggregate in TFF.

Every metric takes LOGITS as `y_pred` and 0/1 labels as `y_true` (int or
float), both `[batch, num_outputs]` (`[batch]` is accepted for one output),
and an optional `sample_weight` (`[batch]`, `[batch, 1]` or
`[batch, num_outputs]`) that weights each decision's count.

Multi-label (`num_outputs > 1`): macro and micro precision, recall, F1 and
averaged precision. One binary label (`num_outputs == 1`): precision, recall,
F1 and averaged precision. Names as in docs/original_benchmark.md
("Metrics").

Definitions (scikit-learn's, so that the values can be checked against
`sklearn.metrics`):

* A label is predicted positive iff `sigmoid(logit) > threshold` (0.5 by
  default), evaluated as `logit > log(t / (1 - t))` (so `logit > 0` at 0.5,
  free of sigmoid rounding).
* Per label, from true-positive, false-positive and false-negative counts:
  precision = TP / (TP + FP), recall = TP / (TP + FN),
  F1 = 2 TP / (2 TP + FP + FN), each defined as 0 when its denominator is 0
  (scikit-learn's `zero_division=0`). Macro = unweighted mean of the
  per-label values over ALL labels (scikit-learn `average="macro"`); micro =
  the same formulas on the counts pooled over labels (`average="micro"`).
* Averaged precision (AP) is scikit-learn's `average_precision_score`: with
  the distinct scores as thresholds in descending order,
  AP = sum_k (R_k - R_{k-1}) * P_k, the step-wise (not interpolated) area
  under the precision-recall curve. A streaming metric cannot keep every
  score, so the scores are bucketised and the bins serve as the thresholds:
  per label we keep a histogram of positive and of negative counts per bin;
  then, walking the bins from the top, TP_k and FP_k are cumulative counts,
  P_k = TP_k / (TP_k + FP_k), R_k = TP_k / (number of positives), so
  AP = sum_k pos_k * P_k / positives. This is exactly scikit-learn's value on
  scores rounded to the bin grid; the only error is that distinct scores in
  one bin count as ties.
  The bins are `num_bins` equal-width bins of the LOGIT on
  [-logit_range, logit_range] = [-32, 32] (logits outside are clipped), i.e.
  a grid on sigmoid scores that is dense near 0 and 1 (bin edges
  sigmoid(edge)). Equal-width bins of the score itself were tried first and
  rejected: a confident model puts many scores within 1e-4 of 0 or 1,
  where they share one bin; on 1,000 x 17 simulated confident predictions
  (logits ~ N(+-4, 6)), 10,000 score bins were off from scikit-learn by 0.012
  (macro AP) while 10,000 logit bins were off by < 0.001, and on
  uncalibrated random logits both were within 3e-4. The default is 10,000
  bins (width 0.0064 in logit, at most 0.0016 in score) for up to 200
  labels; beyond that, `default_num_bins` lowers it (not below 1,000) to
  keep each histogram at <= 2M counts (8 MB), e.g. 1,228 bins for the ~1,628
  fine-grained labels (measured error then ~0.003). Logits beyond +-32 are
  saturated anyway: float32 sigmoid(32) == 1.
  Macro AP = mean over ALL labels of the per-label AP; a label without any
  positive example has AP 0 and still counts in the mean, as in
  scikit-learn 1.3 (which warns and returns 0 for such a label). Micro AP =
  AP of the histogram pooled over labels (scikit-learn `average="micro"`,
  which ravels labels and scores); its state is one pooled histogram.

State: every metric's state is a set of sums of counts (float32 variables,
exact integers while each stored count stays below 2**24 = 16.7M; FLAIR's
largest partition has 345,879 images, so even the micro histogram pooled
over 17 labels stays below 5.9M), so
TFF's sum-then-finalize aggregation over clients is exact: the result from
the summed states equals the result on the pooled data. Results are computed
in float64 and returned as float32.

No private Keras APIs are used; `get_config` returns every constructor
argument, so Keras and TFF (`tff.learning.models.from_keras_model`) can rebuild
the metrics with `from_config`.
"""

import math
from typing import Optional

import tensorflow as tf

from benchmark.core import validate

MACRO = "macro"
MICRO = "micro"
AVERAGES = (MACRO, MICRO)
PRECISION = "precision"
RECALL = "recall"
F1 = "f1"
STATISTICS = (PRECISION, RECALL, F1)
AVERAGED_PRECISION = "averaged_precision"
LOSS = "loss"

DEFAULT_THRESHOLD = 0.5
# Logit bins for averaged precision (see the module docstring).
DEFAULT_NUM_BINS = 10_000
MIN_DEFAULT_NUM_BINS = 1_000
MAX_HISTOGRAM_COUNTS = 2_000_000
DEFAULT_LOGIT_RANGE = 32.0


def _check_num_outputs(num_outputs) -> None:
  validate.check_int("num_outputs", num_outputs, error=ValueError)


def _check_average(average) -> None:
  if average not in AVERAGES:
    raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")


def _prepare_inputs(num_outputs, y_true, y_pred, sample_weight):
  """Returns (y_true, logits, weight), float32 `[batch, num_outputs]`."""
  y_true = tf.reshape(tf.cast(y_true, tf.float32), [-1, num_outputs])
  logits = tf.reshape(tf.cast(y_pred, tf.float32), [-1, num_outputs])
  if sample_weight is None:
    weight = tf.ones_like(y_true)
  else:
    weight = tf.cast(sample_weight, tf.float32)
    if weight.shape.rank == 1:
      weight = weight[:, tf.newaxis]
    weight = tf.broadcast_to(weight, tf.shape(y_true))
  return y_true, logits, weight


def _safe_divide(numerator, denominator):
  """numerator / denominator, and 0 where denominator is 0 (sklearn's
  zero_division=0)."""
  return tf.math.divide_no_nan(numerator, denominator)


class PrecisionRecallF1(tf.keras.metrics.Metric):
  """Macro or micro precision, recall or F1 at a score threshold.

  See the module docstring for the definitions (scikit-learn's
  `precision_score` / `recall_score` / `f1_score` with `zero_division=0`).
  The state is per-label TP, FP and FN counts, float32 `[num_outputs]`.

  Args:
    num_outputs: number of labels (columns of y_true / y_pred), >= 1.
    statistic: "precision", "recall" or "f1".
    average: "macro" or "micro" (identical for one output).
    threshold: a label is positive iff sigmoid(logit) > threshold, in (0, 1).
    name: metric name.
    dtype: result dtype (Keras' metric dtype).
  """

  def __init__(self, num_outputs: int, statistic: str = F1,
               average: str = MACRO, threshold: float = DEFAULT_THRESHOLD,
               name: Optional[str] = None, dtype=None):
    _check_num_outputs(num_outputs)
    _check_average(average)
    if statistic not in STATISTICS:
      raise ValueError(f"statistic must be one of {STATISTICS}, got "
                       f"{statistic!r}")
    if not 0.0 < threshold < 1.0:
      raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
    super().__init__(name=name or f"{average}_{statistic}", dtype=dtype)
    self.num_outputs = num_outputs
    self.statistic = statistic
    self.average = average
    self.threshold = float(threshold)
    self._logit_threshold = math.log(self.threshold / (1.0 - self.threshold))
    shape = (num_outputs,)
    self.true_positives = self.add_weight(
        "true_positives", shape=shape, initializer="zeros", dtype=tf.float32)
    self.false_positives = self.add_weight(
        "false_positives", shape=shape, initializer="zeros", dtype=tf.float32)
    self.false_negatives = self.add_weight(
        "false_negatives", shape=shape, initializer="zeros", dtype=tf.float32)

  def update_state(self, y_true, y_pred, sample_weight=None):
    """Adds a batch: y_true 0/1 and y_pred logits, `[batch, num_outputs]`."""
    y_true, logits, weight = _prepare_inputs(self.num_outputs, y_true, y_pred,
                                             sample_weight)
    predicted = tf.cast(logits > self._logit_threshold, tf.float32)
    self.true_positives.assign_add(
        tf.reduce_sum(weight * y_true * predicted, axis=0))
    self.false_positives.assign_add(
        tf.reduce_sum(weight * (1.0 - y_true) * predicted, axis=0))
    self.false_negatives.assign_add(
        tf.reduce_sum(weight * y_true * (1.0 - predicted), axis=0))

  def result(self):
    tp = tf.cast(self.true_positives, tf.float64)
    fp = tf.cast(self.false_positives, tf.float64)
    fn = tf.cast(self.false_negatives, tf.float64)
    if self.average == MICRO:
      tp, fp, fn = (tf.reduce_sum(tp), tf.reduce_sum(fp), tf.reduce_sum(fn))
    if self.statistic == PRECISION:
      value = _safe_divide(tp, tp + fp)
    elif self.statistic == RECALL:
      value = _safe_divide(tp, tp + fn)
    else:
      value = _safe_divide(2.0 * tp, 2.0 * tp + fp + fn)
    return tf.cast(tf.reduce_mean(value), self.dtype)

  def reset_state(self):
    for v in self.variables:
      v.assign(tf.zeros_like(v))

  def get_config(self):
    config = super().get_config()
    config.update(num_outputs=self.num_outputs, statistic=self.statistic,
                  average=self.average, threshold=self.threshold)
    return config


def average_precision_from_histograms(positives: tf.Tensor,
                                      negatives: tf.Tensor) -> tf.Tensor:
  """Step-wise averaged precision from score histograms.

  Args:
    positives: float `[..., num_bins]`, count of positive examples per score
      bin, bins in ascending score order.
    negatives: float `[..., num_bins]`, the same for negative examples.

  Returns:
    float64 `[...]`: sum_k (R_k - R_{k-1}) P_k over bins from the top
    (scikit-learn's `average_precision_score` with bins as thresholds); 0
    where there are no positives.
  """
  positives = tf.reverse(tf.cast(positives, tf.float64), axis=[-1])
  negatives = tf.reverse(tf.cast(negatives, tf.float64), axis=[-1])
  true_positives = tf.cumsum(positives, axis=-1)
  false_positives = tf.cumsum(negatives, axis=-1)
  precision = _safe_divide(true_positives, true_positives + false_positives)
  # R_k - R_{k-1} = positives_k / total positives.
  return _safe_divide(tf.reduce_sum(positives * precision, axis=-1),
                      true_positives[..., -1])


class AveragedPrecision(tf.keras.metrics.Metric):
  """Macro or micro averaged precision (scikit-learn's step-wise AP).

  See the module docstring for the definition and the binning. The state is
  two float32 histograms of positive and negative counts per logit bin:
  `[num_outputs, num_bins]` for macro, `[1, num_bins]` (pooled over labels)
  for micro.

  Args:
    num_outputs: number of labels, >= 1.
    average: "macro" or "micro" (identical for one output).
    num_bins: equal-width logit bins on [-logit_range, logit_range], >= 2.
    logit_range: logits are clipped to [-logit_range, logit_range], > 0.
    name: metric name.
    dtype: result dtype.
  """

  def __init__(self, num_outputs: int, average: str = MACRO,
               num_bins: int = DEFAULT_NUM_BINS,
               logit_range: float = DEFAULT_LOGIT_RANGE,
               name: Optional[str] = None, dtype=None):
    _check_num_outputs(num_outputs)
    _check_average(average)
    if (isinstance(num_bins, bool) or not isinstance(num_bins, int)
        or num_bins < 2):
      raise ValueError(f"num_bins must be an integer >= 2, got {num_bins!r}")
    if not logit_range > 0:
      raise ValueError(f"logit_range must be > 0, got {logit_range!r}")
    super().__init__(name=name or f"{average}_{AVERAGED_PRECISION}",
                     dtype=dtype)
    self.num_outputs = num_outputs
    self.average = average
    self.num_bins = num_bins
    self.logit_range = float(logit_range)
    rows = num_outputs if average == MACRO else 1
    shape = (rows, num_bins)
    self.positive_histogram = self.add_weight(
        "positive_histogram", shape=shape, initializer="zeros",
        dtype=tf.float32)
    self.negative_histogram = self.add_weight(
        "negative_histogram", shape=shape, initializer="zeros",
        dtype=tf.float32)

  def update_state(self, y_true, y_pred, sample_weight=None):
    """Adds a batch: y_true 0/1 and y_pred logits, `[batch, num_outputs]`."""
    y_true, logits, weight = _prepare_inputs(self.num_outputs, y_true, y_pred,
                                             sample_weight)
    scaled = ((tf.clip_by_value(logits, -self.logit_range, self.logit_range)
               + self.logit_range) * (self.num_bins / (2.0 * self.logit_range)))
    bins = tf.clip_by_value(tf.cast(tf.floor(scaled), tf.int32), 0,
                            self.num_bins - 1)
    rows = self.positive_histogram.shape[0]
    if rows > 1:  # Macro: one histogram row per label.
      bins += tf.range(self.num_outputs, dtype=tf.int32) * self.num_bins
    flat = tf.reshape(bins, [-1])

    def histogram(values):
      counts = tf.math.unsorted_segment_sum(tf.reshape(values, [-1]), flat,
                                            rows * self.num_bins)
      return tf.reshape(counts, [rows, self.num_bins])

    self.positive_histogram.assign_add(histogram(weight * y_true))
    self.negative_histogram.assign_add(histogram(weight * (1.0 - y_true)))

  def result(self):
    value = average_precision_from_histograms(self.positive_histogram,
                                              self.negative_histogram)
    return tf.cast(tf.reduce_mean(value), self.dtype)

  def reset_state(self):
    for v in self.variables:
      v.assign(tf.zeros_like(v))

  def get_config(self):
    config = super().get_config()
    config.update(num_outputs=self.num_outputs, average=self.average,
                  num_bins=self.num_bins, logit_range=self.logit_range)
    return config


def default_num_bins(num_outputs: int) -> int:
  """Averaged-precision bins for `num_outputs` labels: 10,000, reduced (not
  below 1,000) so that a macro histogram holds at most 2M counts (8 MB); 1,228
  for FLAIR's 1,628 fine-grained labels."""
  _check_num_outputs(num_outputs)
  return max(MIN_DEFAULT_NUM_BINS,
             min(DEFAULT_NUM_BINS, MAX_HISTOGRAM_COUNTS // num_outputs))


def metric_names(num_outputs: int) -> list[str]:
  """Names of the reported metrics, "loss" first, in `make_metrics` order.

  Args:
    num_outputs: model outputs (1 for a binary label).

  Returns:
    For num_outputs > 1: loss, macro_averaged_precision,
    micro_averaged_precision, macro_precision, macro_recall, macro_f1,
    micro_precision, micro_recall, micro_f1; for 1: loss, averaged_precision,
    precision, recall, f1.
  """
  _check_num_outputs(num_outputs)
  if num_outputs == 1:
    return [LOSS, AVERAGED_PRECISION] + list(STATISTICS)
  names = [LOSS] + [f"{a}_{AVERAGED_PRECISION}" for a in AVERAGES]
  for average in AVERAGES:
    names += [f"{average}_{s}" for s in STATISTICS]
  return names


def make_metrics(num_outputs: int, num_bins: Optional[int] = None,
                 threshold: float = DEFAULT_THRESHOLD
                ) -> list[tf.keras.metrics.Metric]:
  """Builds FLAIR's metrics (new, unshared instances) for logits outputs.

  Args:
    num_outputs: model outputs: the number of labels, or 1 for a binary label.
    num_bins: logit bins of averaged precision; None for
      `default_num_bins(num_outputs)` (see the module docstring).
    threshold: score threshold of precision / recall / F1.

  Returns:
    Metrics named as `metric_names(num_outputs)[1:]`, in that order.

  Raises:
    ValueError: on an invalid argument.
  """
  _check_num_outputs(num_outputs)
  if num_bins is None:
    num_bins = default_num_bins(num_outputs)
  if num_outputs == 1:
    # Macro and micro coincide for one output; use the plain names.
    return [AveragedPrecision(1, MICRO, num_bins, name=AVERAGED_PRECISION)] + [
        PrecisionRecallF1(1, s, MICRO, threshold, name=s) for s in STATISTICS
    ]
  metrics = [AveragedPrecision(num_outputs, a, num_bins) for a in AVERAGES]
  for average in AVERAGES:
    metrics += [PrecisionRecallF1(num_outputs, s, average, threshold)
                for s in STATISTICS]
  return metrics
