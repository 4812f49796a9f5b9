"""The Keras model a trainer builds from its `ModelConfig`: the ResNet, its
starting weights (fresh, or restored from `--restore_model_path`) and its
loss."""

from absl import logging
import tensorflow as tf
import tensorflow_federated as tff

from benchmark.core import constants
from benchmark.model import resnet
from benchmark.model import restore
from benchmark.training import config as config_lib


def build_model(model: config_lib.ModelConfig,
                num_outputs: int) -> tf.keras.Model:
  """The configured ResNet (`resnet.build_resnet`) with fresh weights from
  `model.seed`: the BatchNorm variant when `model.pretrained`, GroupNorm
  otherwise; input uint8-range images `[batch, 256, 256, 3]`, output
  float32 logits `[batch, num_outputs]`. Not compiled."""
  return resnet.build_resnet(
      input_shape=constants.IMAGE_SHAPE, num_classes=num_outputs,
      pretrained=model.pretrained, crop_size=model.crop_size,
      seed=model.seed, precision=model.precision, layout=model.model_layout)


def build_initial_model(model: config_lib.ModelConfig,
                        num_outputs: int) -> tf.keras.Model:
  """`build_model`, then `model.restore_model_path`'s weights loaded by
  layer name when it is set (`restore.restore_weights_by_name`: layers
  whose shapes differ, the classifier, are skipped and logged; a file that
  leaves every normalisation layer or most layers unrestored is refused
  unless `model.restore_partial`).

  Raises:
    FlairInputError: the weights file cannot be read, matches no layer, or
      (without `model.restore_partial`) fits the model too little.
  """
  keras_model = build_model(model, num_outputs)
  if model.pretrained:
    report = restore.restore_weights_by_name(
        keras_model, model.restore_model_path,
        allow_partial=model.restore_partial)
    logging.info("Starting from %s: %d layer(s) restored, %d not (%s).",
                 model.restore_model_path, len(report.loaded),
                 len(report.skipped),
                 ", ".join(name for name, _ in report.skipped) or "none")
  return keras_model


def loss() -> tf.keras.losses.Loss:
  """Binary cross-entropy on logits, averaged over labels and examples
  (FLAIR's multi-label loss, docs/original_benchmark.md)."""
  return tf.keras.losses.BinaryCrossentropy(from_logits=True)


def model_weights(keras_model: tf.keras.Model
                 ) -> tff.learning.models.ModelWeights:
  """A Keras model's weights as numpy arrays in TFF's `ModelWeights` (its
  trainable and non-trainable weights, each in the model's order)."""
  return tff.learning.models.ModelWeights(
      trainable=[w.numpy() for w in keras_model.trainable_weights],
      non_trainable=[w.numpy() for w in keras_model.non_trainable_weights])
