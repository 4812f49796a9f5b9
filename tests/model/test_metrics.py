"""Tests of benchmark.model.metrics against scikit-learn, in Keras and in
TFF."""

import warnings

import numpy as np
import pytest
from sklearn import metrics as skm
import tensorflow as tf

from benchmark.model import metrics

NUM_EXAMPLES = 1200
NUM_LABELS = 17
AP_TOLERANCE = 0.01
EXACT = 1e-6


def _random_data(num_outputs, seed=0, num_examples=NUM_EXAMPLES):
  """Seeded labels with label-specific prevalence, and logits that carry some
  signal plus noise (float32, like a model's output)."""
  rng = np.random.default_rng(seed)
  prevalence = rng.uniform(0.03, 0.6, num_outputs)
  labels = (rng.random((num_examples, num_outputs)) < prevalence
           ).astype(np.int32)
  signal = rng.uniform(0.0, 3.0, num_outputs)
  logits = (rng.normal(-0.5, 2.0, (num_examples, num_outputs))
            + signal * (2 * labels - 1)).astype(np.float32)
  return labels, logits


def _sigmoid(logits):
  return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))


def _sklearn_values(labels, logits):
  """The reference values, computed by scikit-learn, keyed by metric name."""
  scores = _sigmoid(logits)
  predicted = (scores > 0.5).astype(np.int32)
  kw = dict(zero_division=0)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Labels without positives warn.
    if labels.shape[1] == 1:
      y, p, s = labels[:, 0], predicted[:, 0], scores[:, 0]
      return {
          "averaged_precision": skm.average_precision_score(y, s),
          "precision": skm.precision_score(y, p, **kw),
          "recall": skm.recall_score(y, p, **kw),
          "f1": skm.f1_score(y, p, **kw),
      }
    values = {}
    for average in ("macro", "micro"):
      values[f"{average}_averaged_precision"] = skm.average_precision_score(
          labels, scores, average=average)
      values[f"{average}_precision"] = skm.precision_score(
          labels, predicted, average=average, **kw)
      values[f"{average}_recall"] = skm.recall_score(
          labels, predicted, average=average, **kw)
      values[f"{average}_f1"] = skm.f1_score(
          labels, predicted, average=average, **kw)
    return values


def _assert_match(got, want):
  """AP within AP_TOLERANCE, precision / recall / F1 within 1e-6."""
  assert set(got) >= set(want)
  for name, value in want.items():
    tolerance = AP_TOLERANCE if "averaged_precision" in name else EXACT
    assert got[name] == pytest.approx(value, abs=tolerance), name


def _streamed(metric_list, labels, logits, batch_size=100):
  for start in range(0, len(labels), batch_size):
    for m in metric_list:
      m.update_state(labels[start:start + batch_size],
                     logits[start:start + batch_size])
  return {m.name: float(m.result()) for m in metric_list}


# --- names and construction ------------------------------------------------


def test_names():
  assert metrics.metric_names(17) == [
      "loss", "macro_averaged_precision", "micro_averaged_precision",
      "macro_precision", "macro_recall", "macro_f1", "micro_precision",
      "micro_recall", "micro_f1"]
  assert metrics.metric_names(1) == [
      "loss", "averaged_precision", "precision", "recall", "f1"]
  for n in (1, 2, 17):
    names = [m.name for m in metrics.make_metrics(n)]
    assert names == metrics.metric_names(n)[1:]


def test_invalid_arguments():
  for bad in (0, -1, 2.0, True):
    with pytest.raises(ValueError, match="num_outputs"):
      metrics.make_metrics(bad)
  with pytest.raises(ValueError, match="average"):
    metrics.PrecisionRecallF1(3, average="weighted")
  with pytest.raises(ValueError, match="statistic"):
    metrics.PrecisionRecallF1(3, statistic="accuracy")
  with pytest.raises(ValueError, match="threshold"):
    metrics.PrecisionRecallF1(3, threshold=1.0)
  with pytest.raises(ValueError, match="num_bins"):
    metrics.AveragedPrecision(3, num_bins=1)


def test_default_num_bins():
  assert metrics.default_num_bins(17) == 10_000
  assert metrics.default_num_bins(1628) == 2_000_000 // 1628
  assert metrics.default_num_bins(100_000) == 1_000
  micro, = [m for m in metrics.make_metrics(17)
            if m.name == "micro_averaged_precision"]
  assert micro.positive_histogram.shape == (1, 10_000)  # Pooled state.


# --- values against scikit-learn -------------------------------------------


def test_multilabel_matches_sklearn():
  labels, logits = _random_data(NUM_LABELS)
  got = _streamed(metrics.make_metrics(NUM_LABELS), labels, logits)
  _assert_match(got, _sklearn_values(labels, logits))


def test_binary_matches_sklearn():
  labels, logits = _random_data(1, seed=1)
  got = _streamed(metrics.make_metrics(1), labels, logits)
  _assert_match(got, _sklearn_values(labels, logits))
  # A `[batch]` vector is accepted for one output.
  flat = metrics.make_metrics(1)
  for m in flat:
    m.update_state(labels[:, 0], logits[:, 0])
  for m in flat:
    assert float(m.result()) == pytest.approx(got[m.name], abs=EXACT)


def test_confident_model_ap_matches_sklearn():
  """Saturated scores (many within 1e-4 of 0 or 1), where equal-width score
  bins fail: the logit grid keeps AP within the tolerance."""
  rng = np.random.default_rng(2)
  labels = (rng.random((NUM_EXAMPLES, NUM_LABELS)) < 0.3).astype(np.int32)
  logits = (rng.normal(0, 6, labels.shape) + 4 * (2 * labels - 1)
           ).astype(np.float32)
  want = _sklearn_values(labels, logits)
  got = _streamed(metrics.make_metrics(NUM_LABELS), labels, logits)
  _assert_match(got, want)


def test_zero_division_conventions_match_sklearn():
  """A label with no positives (AP 0, counted in the macro mean) and a label
  never predicted positive (precision 0)."""
  labels, logits = _random_data(5, seed=3, num_examples=1000)
  labels[:, 1] = 0
  logits[:, 3] = -np.abs(logits[:, 3]) - 0.1
  want = _sklearn_values(labels, logits)
  got = _streamed(metrics.make_metrics(5), labels, logits)
  _assert_match(got, want)
  # Label 1 counts as AP 0 in the mean over all 5 labels (not left out).
  others = np.mean(
      [skm.average_precision_score(labels[:, j], _sigmoid(logits[:, j]))
       for j in (0, 2, 3, 4)])
  assert got["macro_averaged_precision"] == pytest.approx(
      0.8 * others, abs=AP_TOLERANCE)
  assert got["macro_averaged_precision"] < others - 0.1


def test_sample_weight_and_reset():
  labels, logits = _random_data(NUM_LABELS, seed=4)
  half = NUM_EXAMPLES // 2
  weight = np.r_[np.ones(half), np.zeros(NUM_EXAMPLES - half)]
  weighted = metrics.make_metrics(NUM_LABELS)
  for m in weighted:
    m.update_state(labels, logits, sample_weight=weight)
  plain = _streamed(metrics.make_metrics(NUM_LABELS), labels[:half],
                    logits[:half])
  for m in weighted:
    assert float(m.result()) == pytest.approx(plain[m.name], abs=EXACT)
    m.reset_state()
    assert float(m.result()) == 0.0


def test_config_round_trip_and_merge():
  """from_config rebuilds an equal metric, and summing two metrics' states
  (what TFF's sum-then-finalize does) gives the pooled result."""
  labels, logits = _random_data(NUM_LABELS, seed=5)
  split = 700
  for first in metrics.make_metrics(NUM_LABELS, num_bins=500):
    second = type(first).from_config(first.get_config())
    pooled = type(first).from_config(first.get_config())
    assert second.get_config() == first.get_config()
    first.update_state(labels[:split], logits[:split])
    second.update_state(labels[split:], logits[split:])
    pooled.update_state(labels, logits)
    merged = type(first).from_config(first.get_config())
    for v, a, b in zip(merged.variables, first.variables, second.variables):
      v.assign(a + b)
    assert float(merged.result()) == pytest.approx(float(pooled.result()),
                                                   abs=EXACT)


# --- Keras and TFF --------------------------------------------------------


def _identity_logits_model(num_outputs):
  """A model whose logits are its input: one Dense layer with an identity
  kernel and zero bias (so TFF has weights to evaluate)."""
  inputs = tf.keras.Input(shape=(num_outputs,), dtype=tf.float32)
  outputs = tf.keras.layers.Dense(
      num_outputs, kernel_initializer="identity",
      bias_initializer="zeros")(inputs)
  return tf.keras.Model(inputs, outputs)


def _bce(labels, logits):
  """Mean binary cross-entropy on logits, in float64."""
  x, y = logits.astype(np.float64), labels.astype(np.float64)
  return float(np.mean(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))))


@pytest.mark.parametrize("num_outputs", [NUM_LABELS, 1])
def test_keras_evaluate_matches_sklearn(num_outputs):
  labels, logits = _random_data(num_outputs, seed=6)
  model = _identity_logits_model(num_outputs)
  model.compile(loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
                metrics=metrics.make_metrics(num_outputs))
  got = model.evaluate(logits, labels, batch_size=128, verbose=0,
                       return_dict=True)
  assert list(got) == metrics.metric_names(num_outputs)
  _assert_match(got, _sklearn_values(labels, logits))
  assert got["loss"] == pytest.approx(_bce(labels, logits), abs=1e-4)


def _find_metrics(structure, name):
  """Finds the mapping that holds `name` in TFF's nested metrics output."""
  if isinstance(structure, dict):
    if name in structure:
      return structure
    for value in structure.values():
      found = _find_metrics(value, name)
      if found is not None:
        return found
  return None


@pytest.mark.slow
def test_tff_federated_evaluation_matches_sklearn():
  """from_keras_model(metrics=make_metrics(n)) + build_fed_eval over three
  clients gives the scikit-learn values of the pooled data. (~25-45 s, mostly
  TFF tracing; test_config_round_trip_and_merge is the fast test of the same
  rebuild-and-sum path.)"""
  import tensorflow_federated as tff

  from benchmark.backends import tff_runtime

  labels, logits = _random_data(NUM_LABELS, seed=7)
  bounds = [0, 500, 900, NUM_EXAMPLES]
  client_datasets = [
      tf.data.Dataset.from_tensor_slices(
          (logits[a:b], labels[a:b])).batch(64)
      for a, b in zip(bounds[:-1], bounds[1:])]
  input_spec = client_datasets[0].element_spec

  def model_fn():
    return tff.learning.models.from_keras_model(
        _identity_logits_model(NUM_LABELS),
        loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
        input_spec=input_spec,
        metrics=metrics.make_metrics(NUM_LABELS, num_bins=2000))

  with tff_runtime.local_runtime():
    process = tff.learning.algorithms.build_fed_eval(model_fn)
    state = process.initialize()
    output = process.next(state, client_datasets)
  got = _find_metrics(output.metrics, "macro_averaged_precision")
  assert got is not None, output.metrics
  got = {name: float(value) for name, value in got.items()}
  assert set(got) >= set(metrics.metric_names(NUM_LABELS))
  _assert_match(got, _sklearn_values(labels, logits))
  # TFF's loss is the example-weighted mean over clients.
  assert got["loss"] == pytest.approx(_bce(labels, logits), abs=1e-4)
