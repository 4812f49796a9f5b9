"""Time of one clipped optimizer update of ResNet-18's weights, interleaved.

    python scripts/bench_clipped_update.py [--repeats 60] [--clipnorm 10]

The update each trainer applies after every training step, on the 62
trainable weights (11.2M float32 values) of ResNet-18
(`benchmark.model.resnet.build_resnet`, 64x64 crops, 17 outputs) with fixed
random gradients, each variant a `tf.function` that reads the weights and
writes them back:

* FedAvg client (SGD 0.1, each gradient clipped to `--clipnorm`):
  `client_clip_by_norm` (`tf.clip_by_norm` per gradient, then TFF's
  `build_sgdm`) against `client_ours`
  (`optimizers.build_client_optimizer("sgd", ...)`);
* central (Adam 1e-4): `central_keras_adam` (`tf.keras.optimizers.Adam` with
  `clipnorm`), `central_legacy_clipnorm` (Keras' legacy Adam with
  `clipnorm`) and `central_ours` (`central.make_optimizer`).

The variants run in turn, `--repeats` times, so that load from other
processes hits them alike; prints each one's median and 10th-percentile
milliseconds per update.
"""

import collections
import os
import sys
import time

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmark.model import resnet
from benchmark.training import central
from benchmark.training import config as config_lib
from benchmark.training import optimizers

# pylint: enable=g-import-not-at-top,wrong-import-position

_REPEATS = flags.DEFINE_integer("repeats", 60, "Timed updates per variant.")
_CLIPNORM = flags.DEFINE_float("clipnorm", 10.0, "Per-weight clipping norm.")


def _tff_update(optimizer, variables, gradients):
  """A tf.function applying one step of a TFF optimizer to `variables`."""
  state = optimizer.initialize(
      [tf.TensorSpec(v.shape, v.dtype) for v in variables])

  @tf.function
  def update():
    _, weights = optimizer.next(state, [v.read_value() for v in variables],
                                gradients)
    for variable, weight in zip(variables, weights):
      variable.assign(weight)

  return update


def _keras_update(optimizer, variables, gradients):
  """A tf.function applying one step of a Keras optimizer to `variables`."""

  @tf.function
  def update():
    optimizer.apply_gradients(zip(gradients, variables))

  return update


def main(argv):
  del argv
  clipnorm = _CLIPNORM.value
  keras_model = resnet.build_resnet(num_classes=17, crop_size=(64, 64))
  initial = [v.numpy() for v in keras_model.trainable_variables]
  rng = np.random.default_rng(0)
  gradients = [tf.constant(rng.normal(size=w.shape), tf.float32)
               for w in initial]

  class ClipByNormSGD(optimizers.PerWeightClippedSGD):

    def next(self, state, weights, gradients):
      return self._sgd.next(
          state, weights,
          [tf.clip_by_norm(g, self._clipnorm) for g in gradients])

  training = config_lib.CentralTrainingConfig(learning_rate=1e-4,
                                             clipnorm=clipnorm)
  variants = {
      "client_clip_by_norm": (_tff_update, ClipByNormSGD(0.1, clipnorm)),
      "client_ours": (_tff_update, optimizers.build_client_optimizer(
          "sgd", 0.1, clipnorm)),
      "central_keras_adam": (_keras_update, tf.keras.optimizers.Adam(
          1e-4, clipnorm=clipnorm)),
      "central_legacy_clipnorm": (_keras_update,
                                  tf.keras.optimizers.legacy.Adam(
                                      1e-4, clipnorm=clipnorm)),
      "central_ours": (_keras_update, central.make_optimizer(training)),
  }
  updates = {}
  for name, (build, optimizer) in variants.items():
    variables = [tf.Variable(w) for w in initial]
    updates[name] = build(optimizer, variables, gradients)
    updates[name]()  # Traces and warms up.
  seconds = collections.defaultdict(list)
  for repeat in range(_REPEATS.value):
    order = list(updates.items())
    for name, update in order if repeat % 2 else order[::-1]:
      start = time.perf_counter()
      update()
      seconds[name].append(time.perf_counter() - start)
  print(f"ResNet-18: {len(initial)} weights, "
        f"{sum(w.size for w in initial) / 1e6:.1f}M values; "
        f"{_REPEATS.value} repeats, {os.cpu_count()} CPU(s); TFF "
        f"{tff.__version__}")
  print(f"{'variant':26s} {'ms median':>10s} {'ms p10':>8s}")
  for name in updates:
    times = seconds[name]
    print(f"{name:26s} {1000 * np.median(times):10.1f} "
          f"{1000 * np.percentile(times, 10):8.1f}")


if __name__ == "__main__":
  app.run(main)
