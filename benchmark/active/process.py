"""The active-learning process: TFF's composed `LearningProcess` of the
active-learning client work, over the clients' inputs.

`build_process` composes, with TFF's composers
(`tff.learning.templates.compose_learning_process`), the pieces of TFF's
weighted FedAvg: the broadcast of the global model
(`build_broadcast_process`), the clients' work (`active.client_work`: FedAvg
or KCFU training, and pool scoring), the example-weighted mean of the
model deltas with TFF's debug measurements (update norms, as FedAvg's
metrics.csv has them), and the server optimizer
(`build_apply_optimizer_finalizer`). Then the process is composed with
the computation that builds each client's data from its input
(`active.client_data`), so the backends send inputs (id, seed, labelled
mask, label counts, orders), never data; TFF's own
`tff.simulation.compose_dataset_computation_with_learning_process` takes
computations that return one sequence only, and the client data here is a
structure of three.

The mean divides by zero to zero (`no_nan_division`): a selection pass
that only scores trains no client, and its state is thrown away anyway
(`active.selection`).
"""

import os

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from benchmark.active import client_data
from benchmark.active import client_work
from benchmark.active import config as config_lib
from benchmark.core import constants
from benchmark.data import label_sets
from benchmark.data import pipeline
from benchmark.model import metrics as metrics_lib
from benchmark.training import models


def _model_fn(config: config_lib.ActiveConfig, num_outputs: int):
  input_spec = (
      tf.TensorSpec([None, *constants.IMAGE_SHAPE], tf.uint8),
      tf.TensorSpec([None, num_outputs], tf.int32))

  def model_fn():
    return tff.learning.models.from_keras_model(
        models.build_model(config.model, num_outputs), loss=models.loss(),
        input_spec=input_spec, metrics=metrics_lib.make_metrics(num_outputs))

  return model_fn


def compose_with_client_inputs(
    process: tff.learning.templates.LearningProcess,
    data_computation: tff.Computation
) -> tff.learning.templates.LearningProcess:
  """`process` (over client data) as a process over client inputs: each
  round maps `data_computation` over the clients' inputs at the clients,
  then runs `process.next` (what
  `tff.simulation.compose_dataset_computation_with_learning_process` does
  for a computation that returns one sequence)."""
  state_type = process.next.type_signature.parameter[0]
  input_type = tff.FederatedType(data_computation.type_signature.parameter,
                                 tff.CLIENTS)

  @tff.federated_computation(state_type, input_type)
  def next_fn(state, inputs):
    return process.next(state, tff.federated_map(data_computation, inputs))

  return tff.learning.templates.LearningProcess(
      process.initialize, next_fn, process.get_model_weights,
      process.set_model_weights, get_hparams_fn=process.get_hparams,
      set_hparams_fn=process.set_hparams)


def build_process(config: config_lib.ActiveConfig,
                  label_spec: label_sets.LabelSpec, train_dir: str,
                  cohort_size: int, max_images: int
                 ) -> tff.learning.templates.LearningProcess:
  """The run's process over client inputs (module docstring).

  Args:
    config: the run's configuration.
    label_spec: the labels trained on.
    train_dir: the training partition's folder.
    cohort_size: clients per round (training rounds and selection passes).
    max_images: the largest number of images of one training user.

  Returns:
    The process: `next(state, client inputs)` with inputs as
    `client_data.INPUT_NAMES`; building it needs no runtime.
  """
  num_outputs = label_spec.num_outputs
  client = config.client
  spec = client_work.WorkSpec(
      strategy=config.active.strategy, num_outputs=num_outputs,
      cohort_size=cohort_size, max_images=max_images,
      kcfu_weight=config.active.kcfu_weight)
  data_computation = client_data.client_data_computation(
      os.path.abspath(train_dir), label_spec, pipeline.ClientSpec(
          num_epochs=client.client_epochs_per_round,
          batch_size=client.client_batch_size,
          max_elements=client.max_elements_per_client),
      config.model.crop_size, config.data.eval_batch_size, spec.kcfu)
  model_fn = _model_fn(config, num_outputs)

  @tff.tensorflow.computation()
  def initial_model_weights_fn():
    return tff.learning.models.ModelWeights.from_model(model_fn())

  weights_type = initial_model_weights_fn.type_signature.result
  aggregator = tff.learning.add_debug_measurements(
      tff.aggregators.MeanFactory(no_nan_division=True)).create(
          weights_type.trainable, tff.TensorType(np.float32))
  process = tff.learning.templates.compose_learning_process(
      initial_model_weights_fn,
      tff.learning.templates.build_broadcast_process(weights_type),
      client_work.build_client_work(
          model_fn, client.build_optimizer(), spec,
          data_computation.type_signature.result),
      aggregator,
      # Every cycle starts from a fresh server optimizer state
      # (`active.cycles`): a learning-rate schedule spans one cycle's rounds.
      tff.learning.templates.build_apply_optimizer_finalizer(
          config.server.build_optimizer(config.active.rounds_per_cycle),
          weights_type))
  return compose_with_client_inputs(process, data_computation)
