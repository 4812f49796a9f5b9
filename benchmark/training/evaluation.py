"""Evaluation of a model on a pooled partition with Keras, as both trainers
report it (`metrics.metric_names`: "loss" first)."""

from typing import Any

import tensorflow as tf
import tensorflow_federated as tff


def evaluate(keras_model: tf.keras.Model, dataset: tf.data.Dataset,
             verbose: int = 0) -> dict[str, float]:
  """`keras_model.evaluate` over `dataset` as `{metric name: value}`.

  Args:
    keras_model: a model compiled with the run's loss and metrics.
    dataset: batches `(images, labels)`, e.g. `pipeline.eval_dataset`.
    verbose: Keras' verbosity (0: silent).

  Returns:
    Every compiled metric, loss included, as Python floats.
  """
  results = keras_model.evaluate(dataset, verbose=verbose, return_dict=True)
  return {name: float(value) for name, value in results.items()}


class KerasEvaluation:
  """The `evaluation_fn` of `training.loop.run_rounds`: sets given model
  weights on a compiled Keras model and evaluates them on one partition.

  Args:
    keras_model: compiled with the run's loss and metrics.
    dataset: the partition's batches (`pipeline.eval_dataset`).
    prefix: put before every metric name (e.g. "val_").
  """

  def __init__(self, keras_model: tf.keras.Model, dataset: tf.data.Dataset,
               prefix: str):
    self._keras_model = keras_model
    self._dataset = dataset
    self._prefix = prefix
    self._last_weights = None

  def last_weights(self) -> tff.learning.models.ModelWeights:
    """The weights of the last evaluation (e.g. to save them when they are
    the best so far)."""
    return self._last_weights

  def __call__(self, weights: tff.learning.models.ModelWeights
              ) -> dict[str, Any]:
    """`{prefix + metric name: value}` of `weights` on the partition."""
    self._last_weights = weights
    weights.assign_weights_to(self._keras_model)
    return {self._prefix + name: value for name, value in
            evaluate(self._keras_model, self._dataset).items()}
