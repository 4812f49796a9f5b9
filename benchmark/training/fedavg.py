"""The FedAvg learning process of a configuration, built with TFF's own
builders (`tff.learning.algorithms`), and its aggregator (plain mean,
example-weighted or uniform, or the DP mean of `training.dp`).

A learning process runs on client datasets; the backends take client ids
with a seed (`backends.factory.open_backend`, `cohorts.ClientSampler`), so
the process is composed with a TFF computation that builds each client's
dataset from its id and seed inside the round (`compose_with_client_ids`).
Any `tff.learning` process over `(images, labels)` batches composes the same
way (docs/extending.md).
"""

import functools
from typing import Optional, Sequence

from absl import logging
import tensorflow as tf
import tensorflow_federated as tff

from benchmark.data import augmentation
from benchmark.data import iid
from benchmark.data import label_sets
from benchmark.data import pipeline
from benchmark.model import metrics as metrics_lib
from benchmark.training import config as config_lib
from benchmark.training import dp
from benchmark.training import models


def _client_dataset_options() -> tf.data.Options:
  """tf.data options of a client's dataset: no static graph optimizations
  and no autotuning. A client dataset lives for one round and a few
  batches, and both costs are paid again for every client (measured in
  docs/performance.md); the elements are unchanged."""
  options = tf.data.Options()
  options.experimental_optimization.apply_default_optimizations = False
  options.autotune.enabled = False
  return options


# Folded into a client's seed to draw a pfl-IID user's images, so that the
# draw and the shuffle/augmentation use different streams.
_PFL_DRAW_SEED_TAG = 1


def _examples_fn(train_data):
  """`(client_id, seed) -> the client's examples` of `train_data`: a
  `ClientData`'s dataset of that id, or a pfl-IID user's draw from the
  seed folded with `_PFL_DRAW_SEED_TAG` (`iid.PflIidClients`)."""
  if isinstance(train_data, iid.PflIidClients):
    return lambda client_id, seed: train_data.seeded_dataset_fn(
        tf.random.experimental.stateless_fold_in(seed, _PFL_DRAW_SEED_TAG))
  dataset_fn = train_data.serializable_dataset_fn
  return lambda client_id, seed: dataset_fn(client_id)


def client_dataset_computation(
    train_data, client_spec: pipeline.ClientSpec,
    crop_size: Optional[Sequence[int]] = None) -> tff.Computation:
  """A TFF computation `(client_id tf.string, seed int64 [2]) -> the
  client's training dataset`: its examples shuffled, truncated, repeated,
  augmented (when `crop_size` is given) and batched as `client_spec` says,
  drawn from `seed` (`pipeline.create_train_preprocess_fn`); elements
  `(uint8 [b, 256, 256, 3], int32 [b, num_outputs])`. The client inputs
  a backend sends are such `(client id, seed)` pairs
  (`cohorts.ClientSampler`). `train_data` is a
  `tff.simulation.datasets.ClientData`, or `iid.PflIidClients`, whose
  users draw their images from the seed too."""
  preprocess = pipeline.create_train_preprocess_fn(client_spec, crop_size)
  examples = _examples_fn(train_data)

  @tff.tensorflow.computation(
      tf.string, tf.TensorSpec(augmentation.SEED_SHAPE, tf.int64))
  def client_dataset(client_id, seed):
    return preprocess(examples(client_id, seed), seed).with_options(
        _client_dataset_options())

  return client_dataset


def compose_with_client_ids(
    process: tff.learning.templates.LearningProcess,
    client_dataset: tff.Computation
) -> tff.learning.templates.LearningProcess:
  """`process` (over client datasets) as a process over client ids: each
  round builds every client's dataset from its id with `client_dataset`
  (`tff.simulation.compose_dataset_computation_with_learning_process`), so
  the backends send ids, not data."""
  return tff.simulation.compose_dataset_computation_with_learning_process(
      client_dataset, process)


def input_spec(client_dataset: tff.Computation) -> tuple[tf.TensorSpec, ...]:
  """The Keras input spec of `client_dataset`'s batches (any batch size)."""
  element = client_dataset.type_signature.result.element
  return tuple(tf.TensorSpec([None] + list(t.shape[1:]), t.dtype)
               for t in (element[0], element[1]))


def _builder(client: config_lib.ClientConfig, weighted: bool):
  """TFF's FedAvg or FedProx builder, weighted or unweighted."""
  algorithms = tff.learning.algorithms
  if client.algorithm == config_lib.ALGORITHM_FEDPROX:
    prox = (algorithms.build_weighted_fed_prox if weighted
            else algorithms.build_unweighted_fed_prox)
    return functools.partial(prox,
                             proximal_strength=client.proximal_strength)
  return (algorithms.build_weighted_fed_avg if weighted
          else algorithms.build_unweighted_fed_avg)


def build_learning_process(
    config: config_lib.FederatedConfig, label_spec: label_sets.LabelSpec,
    train_data, aggregator,
    weighted: bool = True) -> tff.learning.templates.LearningProcess:
  """FedAvg (or FedProx) for this configuration, over client ids.

  Args:
    config: the run's configuration (model, client and server parts).
    label_spec: the labels (gives the number of model outputs).
    train_data: the training clients (`client_dataset_computation`).
    aggregator: the model-update aggregation factory (weighted when
      `weighted`, else unweighted, e.g. a DP factory).
    weighted: weight client updates by their number of examples
      (`is_weighted`).

  Returns:
    The process, `next(state, client_ids)`, its server optimizer following
    `--server_lr_schedule` over `--total_rounds` (the schedule's round
    count is in the state, so checkpoints carry it); building it needs no
    runtime,
    `backends.factory.open_backend` runs it. Clients train with TFF's
    dataset-iterator loop (the training step in a while loop of the client
    graph, instantiated once per round rather than once per client).
  """
  num_outputs = label_spec.num_outputs
  client = config.client
  client_dataset = client_dataset_computation(
      train_data, pipeline.ClientSpec(
          num_epochs=client.client_epochs_per_round,
          batch_size=client.client_batch_size,
          max_elements=client.max_elements_per_client),
      crop_size=config.model.crop_size)
  spec = input_spec(client_dataset)

  def model_fn():
    return tff.learning.models.from_keras_model(
        models.build_model(config.model, num_outputs), loss=models.loss(),
        input_spec=spec, metrics=metrics_lib.make_metrics(num_outputs))

  process = _builder(client, weighted)(
      model_fn, client_optimizer_fn=client.build_optimizer(),
      server_optimizer_fn=config.server.build_optimizer(
          config.run.total_rounds),
      model_aggregator=aggregator,
      loop_implementation=tff.learning.LoopImplementation.DATASET_ITERATOR)
  return compose_with_client_ids(process, client_dataset)


def is_weighted(config: config_lib.FederatedConfig) -> bool:
  """Whether the server weights client updates by their number of examples:
  without DP and with `--client_weighting examples` (the DP mean is
  uniform)."""
  return (not config.dp.enabled and config.client.client_weighting ==
          config_lib.WEIGHTING_EXAMPLES)


def build_aggregator(dp_config: config_lib.DpConfig, num_train_clients: int,
                     clients_per_round: int, total_rounds: int, *,
                     weighted: bool = True, seed: Optional[int] = None
                    ) -> tuple[tff.aggregators.AggregationFactory,
                               Optional[dp.DpCalibration]]:
  """The model-update aggregator of a run and its DP calibration.

  Without DP: the mean, example-weighted when `weighted` (`is_weighted`)
  else uniform. With DP: the noise multiplier for `dp_config.epsilon` by
  its mechanism, accountant, population and delta (`dp.calibrate`) and the
  DP mean of that mechanism (`dp.build_aggregator`: TFF's Gaussian
  aggregator with fixed or adaptive clipping, or DP-FTRL's tree restarted
  every `rounds_per_tree` rounds, its noise seeded from the run's `seed`,
  `dp.tree_noise_seed`; an unweighted mean). All report client update
  norms (`tff.learning.add_debug_measurements`).

  Returns:
    `(aggregator, calibration)`; calibration None without DP. The
    aggregator is weighted exactly when calibration is None and `weighted`.

  Raises:
    FlairInputError: DP settings that cannot be calibrated or that TFF's
      adaptive clipping refuses (naming the flags to change).
  """
  if not dp_config.enabled:
    mean = (tff.aggregators.MeanFactory() if weighted
            else tff.aggregators.UnweightedMeanFactory())
    return tff.learning.add_debug_measurements(mean), None
  calibration = dp.calibrate(
      dp_config.epsilon, num_train_clients, clients_per_round, total_rounds,
      dp_config.simulated_clients_per_round, dp_config.dp_calibration,
      mechanism=dp_config.dp_mechanism, accountant=dp_config.accountant,
      population=dp_config.dp_population, delta=dp_config.dp_delta)
  logging.info("DP: %s", calibration.guarantee)
  return dp.build_aggregator(
      calibration.noise_multiplier, clients_per_round,
      dp_config.l2_norm_clip, dp_config.target_unclipped_quantile,
      mechanism=dp_config.dp_mechanism,
      rounds_per_tree=calibration.rounds_per_tree,
      noise_seed=None if seed is None else dp.tree_noise_seed(seed)
  ), calibration
