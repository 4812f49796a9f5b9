"""The server and client optimizers of federated training, by name, and the
per-weight gradient clipping that both trainers' optimizers use.

All are TFF's own (`tff.learning.optimizers`), as compared in Reddi et al.
2021, "Adaptive Federated Optimization" (ICLR, arXiv 2003.00295): the server
applies the averaged client model delta as a pseudo-gradient with SGD, SGD
with momentum, Adagrad, Adam or Yogi; clients run SGD (optionally with
momentum) whose gradients are first clipped per weight, as the original FLAIR
benchmark's `tf.keras.optimizers.SGD(lr, clipnorm=c)` did.

Defaults are the reference benchmark's: server Adam with epsilon 0.01
(Reddi et al. tune epsilon in 1e-3..1e-1; `SERVER_EPSILON`), client SGD
without momentum.
"""

from typing import Callable

import tensorflow as tf
import tensorflow_federated as tff

SERVER_OPTIMIZERS = ("sgd", "sgdm", "adagrad", "adam", "yogi")
CLIENT_OPTIMIZERS = ("sgd", "sgdm")
# The reference's server Adam epsilon (see module doc); used by the adaptive
# server optimizers (Adagrad, Adam, Yogi).
SERVER_EPSILON = 0.01
MOMENTUM = 0.9
BETA_1 = 0.9
BETA_2 = 0.999

# A Keras optimizer's `[(gradient, variable)]` pairs.
GradsAndVars = list[tuple[tf.Tensor, tf.Variable]]


def build_server_optimizer(name: str, learning_rate: float, *,
                           momentum: float = MOMENTUM, beta_1: float = BETA_1,
                           beta_2: float = BETA_2,
                           epsilon: float = SERVER_EPSILON
                          ) -> tff.learning.optimizers.Optimizer:
  """The server optimizer `name` (one of `SERVER_OPTIMIZERS`), TFF's own
  (`tff.learning.optimizers.build_*`): `momentum` for "sgdm", `beta_1` and
  `beta_2` for "adam" and "yogi", `epsilon` for "adagrad", "adam" and
  "yogi"; Adagrad's and Yogi's initial preconditioner values are TFF's
  defaults. The values are checked by `training.config.ServerConfig`.

  Raises:
    ValueError: an unknown `name`.
  """
  lr = learning_rate
  builders = {
      "sgd": lambda: tff.learning.optimizers.build_sgdm(learning_rate=lr),
      "sgdm": lambda: tff.learning.optimizers.build_sgdm(
          learning_rate=lr, momentum=momentum),
      "adagrad": lambda: tff.learning.optimizers.build_adagrad(
          learning_rate=lr, epsilon=epsilon),
      "adam": lambda: tff.learning.optimizers.build_adam(
          learning_rate=lr, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon),
      "yogi": lambda: tff.learning.optimizers.build_yogi(
          learning_rate=lr, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon),
  }
  if name not in builders:
    raise ValueError(f"unknown server optimizer {name!r}")
  return builders[name]()


def clip_factor(gradient: tf.Tensor, clipnorm: float) -> tf.Tensor:
  """The scalar `tf.clip_by_norm(gradient, clipnorm)` multiplies `gradient`
  by: `clipnorm / max(||gradient||_2, clipnorm)` (1 when the norm is at most
  `clipnorm`), in `gradient`'s dtype.

  The norm comes from one pass over the gradient (`tf.nn.l2_loss`, which
  sums the squares without writing them out); `tf.clip_by_norm` makes about
  seven passes (squares, their sum, then two scalings of the whole tensor).
  `clipnorm` must be > 0.
  """
  norm = tf.sqrt(2.0 * tf.nn.l2_loss(gradient))
  clipnorm = tf.cast(clipnorm, gradient.dtype)
  return clipnorm / tf.maximum(norm, clipnorm)


def clip_gradient(gradient: tf.Tensor, clipnorm: float) -> tf.Tensor:
  """`tf.clip_by_norm(gradient, clipnorm)` with the one-pass norm of
  `clip_factor`: `gradient * clip_factor(gradient, clipnorm)`, same shape and
  dtype as `gradient`."""
  return gradient * clip_factor(gradient, clipnorm)


def clip_each_gradient(
    clipnorm: float) -> Callable[[GradsAndVars], GradsAndVars]:
  """A Keras (legacy) optimizer `gradient_transformers` entry that clips each
  gradient as `clipnorm=clipnorm` does (`tf.clip_by_norm` per variable),
  with `clip_gradient`: `[(gradient, variable)] -> [(clip_gradient(gradient,
  clipnorm), variable)]`."""

  def transform(grads_and_vars):
    return [(clip_gradient(g, clipnorm), v) for g, v in grads_and_vars]

  return transform


class PerWeightClippedSGD(tff.learning.optimizers.Optimizer):
  """SGD (with optional momentum) that first clips each weight's gradient to
  an L2 norm.

  The client update of the original benchmark, `tf.keras.optimizers.SGD(lr,
  clipnorm=c)`: Keras' `clipnorm` clips every gradient tensor separately
  (`tf.clip_by_norm`), not the global norm. TFF 0.87 takes only
  `tff.learning.optimizers.Optimizer`s, so this wraps `build_sgdm` (its
  state and hyperparameters). Without momentum the update is
  `w - (lr * clip_factor(g)) * g`: the clipping folds into the learning rate
  and never rescales the gradient tensor; equal to `tf.clip_by_norm` then
  `build_sgdm` within float32 round-off (tests/training/test_optimizers.py).
  """

  def __init__(self, learning_rate: float, clipnorm: float,
               momentum: float = 0.0):
    self._sgd = tff.learning.optimizers.build_sgdm(
        learning_rate=learning_rate, momentum=momentum or None)
    self._clipnorm = clipnorm
    self._momentum = bool(momentum)

  def initialize(self, specs):
    return self._sgd.initialize(specs)

  def next(self, state, weights, gradients):
    if self._momentum:
      clipped = tf.nest.map_structure(
          lambda g: clip_gradient(g, self._clipnorm), gradients)
      return self._sgd.next(state, weights, clipped)
    learning_rate = self._sgd.get_hparams(state)["learning_rate"]
    updated = tf.nest.map_structure(
        lambda w, g: w - (tf.cast(learning_rate, g.dtype) *
                          clip_factor(g, self._clipnorm)) * g,
        weights, gradients)
    return state, updated

  def get_hparams(self, state):
    return self._sgd.get_hparams(state)

  def set_hparams(self, state, hparams):
    return self._sgd.set_hparams(state, hparams)


def build_client_optimizer(name: str, learning_rate: float, clipnorm: float,
                           momentum: float = MOMENTUM
                          ) -> tff.learning.optimizers.Optimizer:
  """The clients' optimizer: `sgd` or `sgdm` (momentum `momentum`), each with
  per-weight gradient clipping at `clipnorm` (`PerWeightClippedSGD`). The
  values are checked by `training.config.ClientConfig`.

  Raises:
    ValueError: an unknown `name`.
  """
  if name not in CLIENT_OPTIMIZERS:
    raise ValueError(f"unknown client optimizer {name!r}")
  return PerWeightClippedSGD(learning_rate, clipnorm,
                             momentum if name == "sgdm" else 0.0)
