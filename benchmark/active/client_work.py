"""The clients' work of the active-learning process: a
`tff.learning.templates.ClientWorkProcess` (TFF's template, shaped like
TFF's `model_delta_client_work`) that trains on a client's labelled images
and scores its pool.

Each client, from the broadcast global model and its data
(`active.client_data`):

1. trains on its `train` batches with the clients' optimizer, from the
   global model: on the model's loss (binary cross-entropy: FedAvg), or,
   with KCFU (`--strategy kafal`), on `balanced_loss + kcfu_weight *
   compensate * compensation_loss` (`active.scores`; the compensatory term
   distils the broadcast global model, kept unchanged as the teacher, on
   the mixed pool images `u`);
2. scores its `score` batches: KSAS with its trained (local) model and the
   global model (kafal), or the global model's entropy (entropy), and
   writes each pool image's score into its row (`slot`) of a
   `[cohort_size, max_images]` matrix, zeros elsewhere;
3. returns its model delta weighted by the labelled examples it trained on
   (0 and no delta when the delta is not finite, as TFF's client work).

The round's measurements are `train` (the model's metrics, TFF's
`sum_then_finalize`), `kcfu` (the mean balanced and compensatory losses
over the round's batches) and `scores` (the sum of the clients' matrices:
each client's row is its own, so the sum gives every client's scores back
through any backend's aggregation).
"""

import collections
import dataclasses
from typing import Callable

import tensorflow as tf
import tensorflow_federated as tff

from benchmark.active import client_data
from benchmark.active import config as config_lib
from benchmark.active import scores

TRAIN_KEY = "train"
KCFU_KEY = "kcfu"
SCORES_KEY = "scores"
BALANCED_LOSS_KEY = "balanced_loss"
COMPENSATION_LOSS_KEY = "compensation_loss"


@dataclasses.dataclass(frozen=True)
class WorkSpec:
  """What the clients' work is built for.

  Attributes:
    strategy: one of `config.STRATEGIES`.
    num_outputs: the model's outputs `L`.
    cohort_size: clients per round (rows of the score matrix).
    max_images: the largest number of images of one training user
      (columns of the score matrix).
    kcfu_weight: the compensatory term's weight (kafal).
  """
  strategy: str
  num_outputs: int
  cohort_size: int
  max_images: int
  kcfu_weight: float = 1.0

  @property
  def kcfu(self) -> bool:
    return self.strategy == config_lib.STRATEGY_KAFAL


def _assign(variables, values) -> None:
  tf.nest.map_structure(lambda v, t: v.assign(t), variables, values)


def kcfu_loss(model, teacher, logits: tf.Tensor, labels: tf.Tensor,
              pool_images: tf.Tensor, prior, weight: float):
  """KCFU's loss on one batch: `balanced_loss(logits, labels, b) + weight *
  compensate * compensation_loss(model(u), teacher(u), Gamma)`
  (`active.scores`; docs/active_learning.md, KCFU).

  Args:
    model: the model being trained (`predict_on_batch`).
    teacher: the broadcast global model, unchanged.
    logits: float32 `[B, L]`, `model`'s logits on the labelled images.
    labels: int32 `[B, L]`.
    pool_images: `[B', H, W, 3]`, the mixed pool images `u`.
    prior: `(b float32 [L], Gamma float32 [L], compensate float32 scalar)`.
    weight: `--kcfu_weight`.

  Returns:
    `(loss, balanced, compensation)`, float32 scalars.
  """
  log_odds, gamma, compensate = prior
  balanced = scores.balanced_loss(logits, labels, log_odds)
  compensation = scores.compensation_loss(
      model.predict_on_batch(pool_images, training=True),
      teacher.predict_on_batch(pool_images, training=False), gamma)
  return balanced + weight * compensate * compensation, balanced, compensation


def _train_step(model, teacher, optimizer, spec: WorkSpec, prior, state,
                batch):
  """One optimizer step on one batch; returns the new loop state."""
  opt_state, num_examples, sums = state
  weights = tff.learning.models.ModelWeights.from_model(model)
  with tf.GradientTape() as tape:
    output = model.forward_pass((batch["x"], batch["y"]), training=True)
    loss = output.loss
    if spec.kcfu:
      loss, balanced, compensation = kcfu_loss(
          model, teacher, output.predictions, batch["y"], batch["u"], prior,
          spec.kcfu_weight)
      sums += tf.stack([balanced, compensation, 1.0])
  gradients = tape.gradient(loss, weights.trainable)
  opt_state, updated = optimizer.next(
      opt_state, tuple(tf.nest.flatten(weights.trainable)),
      tuple(tf.nest.flatten(gradients)))
  _assign(weights.trainable,
          tf.nest.pack_sequence_as(weights.trainable, updated))
  num_examples += tf.cast(tf.shape(batch["y"])[0], tf.int64)
  return opt_state, num_examples, sums


def _score_batch(model, teacher, spec: WorkSpec, log_odds, slot, matrix,
                 batch):
  """Writes one batch of pool scores into row `slot` of `matrix`."""
  global_logits = teacher.predict_on_batch(batch["s"], training=False)
  if spec.kcfu:
    values = scores.ksas_scores(
        model.predict_on_batch(batch["s"], training=False), global_logits,
        log_odds)
  else:
    values = scores.entropy_scores(global_logits)
  rows = tf.fill(tf.shape(batch["i"]), slot)
  return tf.tensor_scatter_nd_update(
      matrix, tf.stack([rows, batch["i"]], axis=1), values)


def _delta_and_weight(initial, trained, num_examples):
  """The model delta and its weight; zeros and 0 when not finite."""
  delta = tf.nest.map_structure(tf.subtract, initial, trained)
  finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(d))
                          for d in tf.nest.flatten(delta)])
  delta = tf.nest.map_structure(
      lambda d: tf.where(finite, d, tf.zeros_like(d)), delta)
  weight = tf.where(finite, tf.cast(num_examples, tf.float32), 0.0)
  return delta, weight


def build_client_update(model_fn: Callable[[], tff.learning.models
                                           .VariableModel],
                        spec: WorkSpec) -> Callable:
  """The client's computation as a `tf.function` (module docstring):
  `(optimizer, hparams, initial_weights, data) -> (ClientResult,
  unfinalized metrics, kcfu sums float32 [3], scores float32 [cohort_size,
  max_images])`. Builds its two models (trained and teacher) here."""
  model, teacher = model_fn(), model_fn()

  @tf.function
  def client_update(optimizer, hparams, initial_weights, data):
    weights = tff.learning.models.ModelWeights.from_model(model)
    _assign(weights, initial_weights)
    _assign(tff.learning.models.ModelWeights.from_model(teacher),
            initial_weights)
    info = data["info"].reduce(collections.OrderedDict(
        counts=tf.zeros([spec.num_outputs + 1]),
        control=tf.zeros([client_data.CONTROL_SIZE], tf.int32)),
                               lambda _, element: element)
    counts, control = info["counts"], info["control"]
    log_odds = scores.label_log_odds(counts[:-1], counts[-1])
    prior = (log_odds, scores.compensation_weights(counts[:-1], counts[-1]),
             tf.cast(control[client_data.CONTROL_COMPENSATE], tf.float32))
    specs = tuple(tf.TensorSpec(v.shape, v.dtype)
                  for v in tf.nest.flatten(weights.trainable))
    state = (optimizer.set_hparams(optimizer.initialize(specs), hparams),
             tf.constant(0, tf.int64), tf.zeros([3]))
    for batch in iter(data["train"]):
      state = _train_step(model, teacher, optimizer, spec, prior, state,
                          batch)
    matrix = tf.zeros([spec.cohort_size, spec.max_images])
    for batch in iter(data["score"]):
      matrix = _score_batch(model, teacher, spec, log_odds,
                            control[client_data.CONTROL_SLOT], matrix, batch)
    delta, weight = _delta_and_weight(initial_weights.trainable,
                                      weights.trainable, state[1])
    return (tff.learning.templates.ClientResult(update=delta,
                                                update_weight=weight),
            model.report_local_unfinalized_metrics(), state[2], matrix)

  return client_update


def _kcfu_means(sums: tf.Tensor) -> collections.OrderedDict:
  """The round's mean balanced and compensatory losses from the summed
  `[balanced, compensation, batches]`."""
  steps = tf.maximum(sums[2], 1.0)
  return collections.OrderedDict([(BALANCED_LOSS_KEY, sums[0] / steps),
                                  (COMPENSATION_LOSS_KEY, sums[1] / steps)])


def build_client_work(
    model_fn: Callable[[], tff.learning.models.VariableModel],
    optimizer: tff.learning.optimizers.Optimizer, spec: WorkSpec,
    data_type: tff.Type) -> tff.learning.templates.ClientWorkProcess:
  """The clients' work (module docstring) as TFF's `ClientWorkProcess`.

  Args:
    model_fn: builds a fresh `tff.learning.models.VariableModel` of the
      run's model, loss and metrics.
    optimizer: the clients' `tff.learning.optimizers.Optimizer`; its
      hyperparameters are the process's state, as in TFF's FedAvg.
    spec: what to build for.
    data_type: the client data's TFF type
      (`client_data.client_data_computation`'s result).
  """
  with tf.Graph().as_default():
    whimsy = model_fn()
    metrics_fn = tff.learning.metrics.sum_then_finalize(
        whimsy.metric_finalizers())
  weights_type = tff.learning.models.weights_type_from_model(whimsy)
  hparams = optimizer.get_hparams(optimizer.initialize(
      tf.TensorSpec([], tf.float32)))

  @tff.federated_computation
  def init_fn():
    return tff.federated_value(hparams, tff.SERVER)

  state_type = init_fn.type_signature.result.member

  kcfu_means = tff.tensorflow.computation(
      _kcfu_means, tf.TensorSpec([3], tf.float32))

  @tff.tensorflow.computation(state_type, weights_type, data_type)
  def client_update(state, initial_weights, data):
    return build_client_update(model_fn, spec)(optimizer, state,
                                               initial_weights, data)

  @tff.federated_computation(
      init_fn.type_signature.result,
      tff.FederatedType(weights_type, tff.CLIENTS),
      tff.FederatedType(data_type, tff.CLIENTS))
  def next_fn(state, weights, data):
    result, model_outputs, kcfu_sums, matrix = tff.federated_map(
        client_update, (tff.federated_broadcast(state), weights, data))
    measurements = tff.federated_zip(collections.OrderedDict([
        (TRAIN_KEY, metrics_fn(model_outputs)),
        (KCFU_KEY, tff.federated_map(kcfu_means,
                                     tff.federated_sum(kcfu_sums))),
        (SCORES_KEY, tff.federated_sum(matrix))]))
    return tff.templates.MeasuredProcessOutput(state, result, measurements)

  @tff.tensorflow.computation(state_type)
  def get_hparams_fn(state):
    return state

  @tff.tensorflow.computation(state_type, state_type)
  def set_hparams_fn(state, new_hparams):
    del state
    return new_hparams

  return tff.learning.templates.ClientWorkProcess(
      init_fn, next_fn, get_hparams_fn=get_hparams_fn,
      set_hparams_fn=set_hparams_fn)
