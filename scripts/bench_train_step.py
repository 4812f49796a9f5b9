"""Keras training-step throughput of ResNet-18 variants, interleaved in one run.

    python scripts/bench_train_step.py \
        [--variants fast,keras_gn,bf16,jit,keras_adam,zeropad,convop] \
        [--crop 64] [--batch_size 16] [--steps 8] [--repeats 8] [--threads 0]

Isolates the training step from the input pipeline: random uint8 256x256
images and 0/1 labels (17 outputs) held in memory (`Dataset.cache`, fed to
Keras as central feeds it: `pipeline.keras_input`), the model ResNet-18
(`benchmark.model.resnet.build_resnet`, GroupNorm) compiled as
`benchmark.training.central` compiles it (`central.make_optimizer`: Adam
1e-4, clipnorm 10; the suite's metrics). Variants, any combination of these
words joined by "_":

* `fast`: the model as the suite builds it (float32);
* `keras_gn`: with Keras' own `tf.keras.layers.GroupNormalization` instead of
  `benchmark.model.layers.GroupNormalization`;
* `bf16`: `precision="bfloat16"`;
* `jit`: `compile(jit_compile=True)` (XLA);
* `nometrics`: compiled without metrics;
* `keras_adam`: Keras' `tf.keras.optimizers.Adam` (same settings) instead of
  central's optimizer (the fused legacy Adam);
* `zeropad`: a `ZeroPadding2D` layer in front of every 3x3 convolution
  instead of padding inside the stride-1 ones (see
  `benchmark.model.resnet`, "Padding");
* `convop`: every convolution through TensorFlow's convolution op, also
  those that the suite computes as a matrix product over their patches
  (`benchmark.model.layers.PatchConv2D`).

Each variant is built and warmed up (one `fit` of `--steps` steps), then the
variants are timed in turn, `--repeats` times, so that load from other
processes hits them alike. Prints per variant the median and best images/s
over the repeats, and the median and best CPU milliseconds per image (process
CPU time, all threads).
"""

import collections
import os
import sys
import time
from unittest import mock

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmark.core import errors
from benchmark.data import pipeline
from benchmark.model import layers
from benchmark.model import metrics
from benchmark.model import mixed_precision
from benchmark.model import resnet
from benchmark.training import central
from benchmark.training import config as config_lib

# pylint: enable=g-import-not-at-top,wrong-import-position

_VARIANTS = flags.DEFINE_list(
    "variants", ["keras_gn", "fast", "bf16"], "Variants to time (see above).")
_CROP = flags.DEFINE_integer("crop", 64, "Square crop size in pixels.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Batch size.")
_STEPS = flags.DEFINE_integer("steps", 8, "Training steps per timed fit.")
_REPEATS = flags.DEFINE_integer("repeats", 8, "Timed fits per variant.")
_THREADS = flags.DEFINE_integer(
    "threads", 0, "TensorFlow intra- and inter-op threads (0: default).")
_WORDS = ("fast", "keras_gn", "bf16", "jit", "nometrics", "keras_adam",
          "zeropad", "convop")
_NUM_OUTPUTS = 17


def _words(variant: str) -> list[str]:
  """A variant's words (`keras_gn`, `keras_adam` are one word each)."""
  for word in ("keras_gn", "keras_adam"):
    variant = variant.replace(word, word.replace("_", "-"))
  return [w.replace("-", "_") for w in variant.split("_")]


def _build(variant: str) -> tf.keras.Model:
  words = _words(variant)
  norm = (tf.keras.layers.GroupNormalization if "keras_gn" in words
          else layers.GroupNormalization)
  builder = resnet._Builder  # pylint: disable=protected-access
  with mock.patch.object(layers, "GroupNormalization", norm), \
      mock.patch.object(builder, "pad_inside_conv", "zeropad" not in words), \
      mock.patch.object(builder, "patch_small_maps", "convop" not in words):
    keras_model = resnet.build_resnet(
        num_classes=_NUM_OUTPUTS, crop_size=(_CROP.value, _CROP.value),
        precision=mixed_precision.BFLOAT16 if "bf16" in words else
        mixed_precision.FLOAT32)
  training = config_lib.CentralTrainingConfig(learning_rate=1e-4,
                                             clipnorm=10.0)
  keras_model.compile(
      optimizer=(tf.keras.optimizers.Adam(training.learning_rate,
                                          clipnorm=training.clipnorm)
                 if "keras_adam" in words
                 else central.make_optimizer(training)),
      loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
      metrics=(None if "nometrics" in words else
               metrics.make_metrics(_NUM_OUTPUTS)),
      jit_compile="jit" in words)
  return keras_model


def main(argv):
  del argv
  for variant in _VARIANTS.value:
    if not all(w in _WORDS for w in _words(variant)):
      raise errors.FlairInputError(
          f"--variants: unknown variant {variant!r} (words: {_WORDS})")
  if _THREADS.value:
    tf.config.threading.set_intra_op_parallelism_threads(_THREADS.value)
    tf.config.threading.set_inter_op_parallelism_threads(_THREADS.value)
  rng = np.random.default_rng(0)
  count = _BATCH_SIZE.value * 4
  images = rng.integers(0, 256, (count, 256, 256, 3)).astype(np.uint8)
  labels = (rng.random((count, _NUM_OUTPUTS)) < 0.2).astype(np.int32)
  dataset = pipeline.keras_input(
      tf.data.Dataset.from_tensor_slices((images, labels))
      .batch(_BATCH_SIZE.value).repeat().take(_STEPS.value).cache())
  models = {}
  for variant in _VARIANTS.value:
    models[variant] = _build(variant)
    models[variant].fit(dataset, epochs=1, verbose=0)  # Warm-up.
  wall = collections.defaultdict(list)
  cpu = collections.defaultdict(list)
  for _ in range(_REPEATS.value):
    for variant, keras_model in models.items():
      start_wall, start_cpu = time.perf_counter(), time.process_time()
      keras_model.fit(dataset, epochs=1, verbose=0)
      wall[variant].append(time.perf_counter() - start_wall)
      cpu[variant].append(time.process_time() - start_cpu)
  images_per_fit = _BATCH_SIZE.value * _STEPS.value
  print(f"crop {_CROP.value}, batch {_BATCH_SIZE.value}, {_STEPS.value} "
        f"steps per fit, {_REPEATS.value} repeats, {os.cpu_count()} CPU(s)")
  print(f"{'variant':20s} {'images/s median':>16s} {'best':>8s} "
        f"{'CPU ms/image median':>20s} {'best':>8s}")
  for variant in _VARIANTS.value:
    w, c = np.array(wall[variant]), np.array(cpu[variant])
    print(f"{variant:20s} {images_per_fit / np.median(w):16.1f} "
          f"{images_per_fit / w.min():8.1f} "
          f"{1000 * np.median(c) / images_per_fit:20.2f} "
          f"{1000 * c.min() / images_per_fit:8.2f}")


if __name__ == "__main__":
  app.run(main)
