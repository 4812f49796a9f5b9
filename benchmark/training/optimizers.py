"""The server and client optimizers of federated training, by name, the
server's learning-rate schedules, and the gradient clipping that both
trainers' optimizers use.

All are TFF's own (`tff.learning.optimizers`), as compared in Reddi et al.
2021, "Adaptive Federated Optimization" (ICLR, arXiv 2003.00295): the server
applies the averaged client model delta as a pseudo-gradient with SGD, SGD
with momentum, Adagrad, Adam, AdamW or Yogi; clients run SGD (optionally
with momentum) whose gradients are first clipped per weight, as the
original FLAIR benchmark's `tf.keras.optimizers.SGD(lr, clipnorm=c)` did,
or by their global norm, as pfl-research's FLAIR benchmark does
(`torch.nn.utils.clip_grad_norm_`, apple/pfl-research
pfl/internal/bridge/pytorch/utils.py).

AdamW (`TorchAdamW`) is TFF's `build_adamw` with its epsilon placed as
PyTorch's `torch.optim.AdamW` places it, the optimizer of pfl-research's
FLAIR benchmark (benchmarks/flair/train.py). The learning-rate schedules
(`LearningRateSchedule`) are applied by TFF's `schedule_learning_rate`,
whose round counter lives in the optimizer's state: it is checkpointed
with the server state, so a resumed run continues its schedule.

Defaults are the reference benchmark's: server Adam with epsilon 0.01
(Reddi et al. tune epsilon in 1e-3..1e-1; `SERVER_EPSILON`) at a constant
learning rate, client SGD without momentum, clipped per weight.
"""

import dataclasses
import math
from typing import Callable

import tensorflow as tf
import tensorflow_federated as tff

SERVER_OPTIMIZERS = ("sgd", "sgdm", "adagrad", "adam", "adamw", "yogi")
CLIENT_OPTIMIZERS = ("sgd", "sgdm")
# What a client's clip norm bounds (see the module doc).
CLIP_PER_WEIGHT = "per_weight"
CLIP_GLOBAL = "global"
CLIP_SCOPES = (CLIP_PER_WEIGHT, CLIP_GLOBAL)
# Server learning-rate schedules (`LearningRateSchedule`).
SCHEDULE_CONSTANT = "constant"
SCHEDULE_POLYNOMIAL = "polynomial"
SCHEDULE_COSINE = "cosine"
SCHEDULES = (SCHEDULE_CONSTANT, SCHEDULE_POLYNOMIAL, SCHEDULE_COSINE)
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
                           epsilon: float = SERVER_EPSILON,
                           weight_decay: float = 0.0
                          ) -> tff.learning.optimizers.Optimizer:
  """The server optimizer `name` (one of `SERVER_OPTIMIZERS`), TFF's own
  (`tff.learning.optimizers.build_*`): `momentum` for "sgdm", `beta_1` and
  `beta_2` for "adam", "adamw" and "yogi", `epsilon` for "adagrad", "adam",
  "adamw" and "yogi", `weight_decay` for "adamw" (`TorchAdamW`); Adagrad's
  and Yogi's initial preconditioner values are TFF's defaults. The values
  are checked by `training.config.ServerConfig`.

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
      "adamw": lambda: TorchAdamW(lr, beta_1, beta_2, epsilon, weight_decay),
      "yogi": lambda: tff.learning.optimizers.build_yogi(
          learning_rate=lr, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon),
  }
  if name not in builders:
    raise ValueError(f"unknown server optimizer {name!r}")
  return builders[name]()


_EPSILON_KEY = "epsilon"  # TFF's AdamW state keys (adamw.py).
_STEP_KEY = "step"
_BETA_2_KEY = "beta_2"


class TorchAdamW(tff.learning.optimizers.Optimizer):
  """AdamW as PyTorch's `torch.optim.AdamW` computes it (Loshchilov and
  Hutter 2019, arXiv 1711.05101), built on TFF's `build_adamw`.

  PyTorch's step `t` (from 1) with gradient `g` (its documentation):

      m = beta_1 * m + (1 - beta_1) * g
      v = beta_2 * v + (1 - beta_2) * g**2
      w = w - lr * weight_decay * w
            - lr * (m / (1 - beta_1**t)) / (sqrt(v / (1 - beta_2**t)) + eps)

  TFF's AdamW folds both bias corrections into the learning rate and
  divides by `sqrt(v) + eps`, which is PyTorch's update with epsilon
  `eps * sqrt(1 - beta_2**t)`. This optimizer keeps PyTorch's `eps` in the
  state and gives TFF's AdamW that epsilon at each step, so the update is
  PyTorch's (tests/training/test_schedules.py checks it against the
  formula above). With eps 0.01 and beta_2 0.99 the forms differ most in
  the first few hundred steps: at t = 1, TFF's form alone acts as eps 0.1.
  Hyperparameters (`get_hparams`) are TFF's AdamW's, epsilon PyTorch's.
  """

  def __init__(self, learning_rate: float, beta_1: float, beta_2: float,
               epsilon: float, weight_decay: float):
    self._adamw = tff.learning.optimizers.build_adamw(
        learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2,
        epsilon=epsilon, weight_decay=weight_decay)

  def initialize(self, specs):
    return self._adamw.initialize(specs)

  def next(self, state, weights, gradients):
    step = tf.cast(state[_STEP_KEY], tf.float32) + 1.0
    beta_2 = tf.cast(state[_BETA_2_KEY], tf.float32)
    torch_epsilon = state[_EPSILON_KEY]
    inner = type(state)(state)
    inner[_EPSILON_KEY] = tf.cast(torch_epsilon, tf.float32) * tf.sqrt(
        1.0 - tf.pow(beta_2, step))
    new_state, new_weights = self._adamw.next(inner, weights, gradients)
    new_state[_EPSILON_KEY] = torch_epsilon
    return new_state, new_weights

  def get_hparams(self, state):
    return self._adamw.get_hparams(state)

  def set_hparams(self, state, hparams):
    return self._adamw.set_hparams(state, hparams)


@dataclasses.dataclass(frozen=True)
class LearningRateSchedule:
  """The server learning rate of each round, `schedule(t)` for the update
  that follows `t` earlier ones, i.e. round `t + 1` (TFF's
  `schedule_learning_rate` numbers its optimizer's calls from 0).

  With `W` = `warmup_rounds`, `T` = `total_rounds`, `base` =
  `learning_rate` and `end` = `end_learning_rate`:

  * `constant`: `base` in every round (no warm-up);
  * otherwise, while `t < W`: `base * t / W` (linear warm-up from 0: round
    1's rate is 0 when `W > 0`); then, with progress
    `p = min((t - W) / max(T - W, 1), 1)`:
    * `polynomial`: `end + (base - end) * (1 - p)**decay_power`;
    * `cosine`: `end + (base - end) * (1 + cos(pi * p)) / 2`.

  `polynomial` is pfl-research's FLAIR schedule,
  `get_polynomial_decay_schedule_with_warmup` (apple/pfl-research
  benchmarks/utils/callback/pytorch.py, after the Hugging Face transformers
  function of that name), whose step `t` is the server update after `t`
  others: pfl's iteration `t` is our round `t + 1`. `cosine` is the cosine
  annealing of Loshchilov and Hutter 2017 (SGDR, arXiv 1608.03983) without
  restarts, after the same warm-up.

  Attributes are checked on construction (ValueError); the flags'
  one-line errors come first (`training.config.ServerConfig`).
  """
  kind: str
  learning_rate: float
  total_rounds: int
  warmup_rounds: int = 0
  decay_power: float = 1.0
  end_learning_rate: float = 0.0

  def __post_init__(self):
    if self.kind not in SCHEDULES:
      raise ValueError(f"unknown learning-rate schedule {self.kind!r}")
    if not (isinstance(self.total_rounds, int) and self.total_rounds >= 1):
      raise ValueError(f"total_rounds must be an integer >= 1, got "
                       f"{self.total_rounds!r}")
    if not (isinstance(self.warmup_rounds, int) and self.warmup_rounds >= 0):
      raise ValueError(f"warmup_rounds must be an integer >= 0, got "
                       f"{self.warmup_rounds!r}")
    if not (self.decay_power > 0 and
            0 <= self.end_learning_rate <= self.learning_rate):
      raise ValueError("decay_power must be > 0 and end_learning_rate in "
                       f"[0, learning_rate], got {self.decay_power!r}, "
                       f"{self.end_learning_rate!r}")

  def __call__(self, step) -> tf.Tensor:
    """The learning rate after `step` updates (an integer, or an integer
    tensor inside a TFF computation): a float32 scalar tensor."""
    t = tf.cast(step, tf.float32)
    base = tf.constant(self.learning_rate, tf.float32)
    if self.kind == SCHEDULE_CONSTANT:
      return base + 0.0 * t
    warmup = float(self.warmup_rounds)
    end = tf.constant(self.end_learning_rate, tf.float32)
    progress = tf.minimum(
        (t - warmup) / float(max(self.total_rounds - self.warmup_rounds, 1)),
        1.0)
    if self.kind == SCHEDULE_POLYNOMIAL:
      decayed = end + (base - end) * tf.pow(1.0 - progress, self.decay_power)
    else:
      decayed = end + (base - end) * 0.5 * (1.0 + tf.cos(math.pi * progress))
    return tf.where(t < warmup, base * t / max(warmup, 1.0), decayed)


def schedule_server_learning_rate(
    optimizer: tff.learning.optimizers.Optimizer,
    schedule: LearningRateSchedule) -> tff.learning.optimizers.Optimizer:
  """`optimizer` with its learning rate set by `schedule` before each step
  (TFF's `tff.learning.optimizers.schedule_learning_rate`: the step count
  and the rate are in the optimizer's state, so checkpoints carry them)."""
  return tff.learning.optimizers.schedule_learning_rate(optimizer, schedule)


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


class GlobalNormClippedSGD(tff.learning.optimizers.Optimizer):
  """SGD (with optional momentum) that first scales all gradients together
  to a global L2 norm of at most `clipnorm` (`tf.clip_by_global_norm`), as
  pfl-research's clients do before each local step with
  `torch.nn.utils.clip_grad_norm_` (which adds 1e-6 to the norm it divides
  by; the difference is below float32 round-off for norms above 0.1)."""

  def __init__(self, learning_rate: float, clipnorm: float,
               momentum: float = 0.0):
    self._sgd = tff.learning.optimizers.build_sgdm(
        learning_rate=learning_rate, momentum=momentum or None)
    self._clipnorm = clipnorm

  def initialize(self, specs):
    return self._sgd.initialize(specs)

  def next(self, state, weights, gradients):
    clipped, _ = tf.clip_by_global_norm(tf.nest.flatten(gradients),
                                        self._clipnorm)
    return self._sgd.next(state, weights,
                          tf.nest.pack_sequence_as(gradients, clipped))

  def get_hparams(self, state):
    return self._sgd.get_hparams(state)

  def set_hparams(self, state, hparams):
    return self._sgd.set_hparams(state, hparams)


def build_client_optimizer(name: str, learning_rate: float, clipnorm: float,
                           momentum: float = MOMENTUM,
                           clip_scope: str = CLIP_PER_WEIGHT
                          ) -> tff.learning.optimizers.Optimizer:
  """The clients' optimizer: `sgd` or `sgdm` (momentum `momentum`), each with
  gradient clipping at `clipnorm`, per weight (`PerWeightClippedSGD`) or of
  the global norm (`GlobalNormClippedSGD`) as `clip_scope` says. The values
  are checked by `training.config.ClientConfig`.

  Raises:
    ValueError: an unknown `name` or `clip_scope`.
  """
  if name not in CLIENT_OPTIMIZERS:
    raise ValueError(f"unknown client optimizer {name!r}")
  optimizer_types = {CLIP_PER_WEIGHT: PerWeightClippedSGD,
                     CLIP_GLOBAL: GlobalNormClippedSGD}
  if clip_scope not in optimizer_types:
    raise ValueError(f"unknown clip scope {clip_scope!r}")
  return optimizer_types[clip_scope](learning_rate, clipnorm,
                                     momentum if name == "sgdm" else 0.0)
