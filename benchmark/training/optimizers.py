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

import dataclasses
from typing import Callable

import tensorflow as tf
import tensorflow_federated as tff

from benchmark.core.errors import FlairInputError

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


@dataclasses.dataclass(frozen=True)
class ServerOptimizerSpec:
  """A server optimizer and its hyperparameters.

  Attributes:
    name: one of `SERVER_OPTIMIZERS`.
    learning_rate: > 0.
    momentum: `sgdm` only, in [0, 1).
    beta_1, beta_2: `adam` and `yogi`, in [0, 1).
    epsilon: `adagrad`, `adam` and `yogi`, > 0.
  """
  name: str = "adam"
  learning_rate: float = 0.1
  momentum: float = MOMENTUM
  beta_1: float = BETA_1
  beta_2: float = BETA_2
  epsilon: float = SERVER_EPSILON

  def __post_init__(self):
    if self.name not in SERVER_OPTIMIZERS:
      raise FlairInputError(
          f"--server_optimizer must be one of {', '.join(SERVER_OPTIMIZERS)}, "
          f"got {self.name!r}")
    for flag, value in (("server_momentum", self.momentum),
                        ("server_beta_1", self.beta_1),
                        ("server_beta_2", self.beta_2)):
      if not 0 <= value < 1:
        raise FlairInputError(f"--{flag} must be in [0, 1), got {value}")
    if not self.epsilon > 0:
      raise FlairInputError(f"--server_epsilon must be > 0, got "
                            f"{self.epsilon}")

  def build(self) -> tff.learning.optimizers.Optimizer:
    """The TFF optimizer (`tff.learning.optimizers.build_*`; Adagrad's and
    Yogi's initial preconditioner values are TFF's defaults)."""
    lr = self.learning_rate
    if self.name == "sgd":
      return tff.learning.optimizers.build_sgdm(learning_rate=lr)
    if self.name == "sgdm":
      return tff.learning.optimizers.build_sgdm(learning_rate=lr,
                                                momentum=self.momentum)
    if self.name == "adagrad":
      return tff.learning.optimizers.build_adagrad(learning_rate=lr,
                                                   epsilon=self.epsilon)
    if self.name == "adam":
      return tff.learning.optimizers.build_adam(
          learning_rate=lr, beta_1=self.beta_1, beta_2=self.beta_2,
          epsilon=self.epsilon)
    return tff.learning.optimizers.build_yogi(
        learning_rate=lr, beta_1=self.beta_1, beta_2=self.beta_2,
        epsilon=self.epsilon)


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
  `build_sgdm` within float32 round-off (tests/test_optimizers.py).
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
  per-weight gradient clipping at `clipnorm`.

  Raises:
    FlairInputError: an unknown name or a momentum outside [0, 1).
  """
  if name not in CLIENT_OPTIMIZERS:
    raise FlairInputError(
        f"--client_optimizer must be one of {', '.join(CLIENT_OPTIMIZERS)}, "
        f"got {name!r}")
  if not 0 <= momentum < 1:
    raise FlairInputError(f"--client_momentum must be in [0, 1), got "
                          f"{momentum}")
  return PerWeightClippedSGD(learning_rate, clipnorm,
                             momentum if name == "sgdm" else 0.0)
