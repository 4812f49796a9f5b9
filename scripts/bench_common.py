"""What the speed scripts share: a generated dataset to measure on, the
clients' model compiled for Keras `fit` (the compute floor beside FedAvg),
and a `main` that runs a benchmark on given or generated data."""

import os
import tempfile
from typing import Callable, Optional

from absl import logging
import tensorflow as tf

from benchmark.core import errors
from benchmark.model import metrics
from benchmark.training import models


def prepare_synthetic(root: str, num_users: int) -> tuple[str, str]:
  """Generates a FLAIR-like dataset of `num_users` users (seed 0,
  `benchmark.prepare.synthetic`) under `root` and prepares it; returns
  (dataset directory, TFRecords directory)."""
  # pylint: disable=g-import-not-at-top
  from benchmark.prepare import synthetic
  from benchmark.prepare import tfrecords
  # pylint: enable=g-import-not-at-top
  dataset_dir = os.path.join(root, "dataset")
  tfrecords_dir = os.path.join(root, "tfrecords")
  synthetic.generate(dataset_dir, num_users=num_users, seed=0)
  tfrecords.prepare(dataset_dir, tfrecords_dir, show_progress=False)
  return dataset_dir, tfrecords_dir


def client_keras_model(config, num_outputs: int,
                       with_metrics: bool = True) -> tf.keras.Model:
  """The FedAvg clients' model (`config`: a `FederatedConfig`) compiled as
  they train it: SGD at the client learning rate with per-weight clipping,
  binary cross-entropy on logits, the suite's metrics unless
  `with_metrics` is False."""
  model = models.build_model(config.model, num_outputs)
  model.compile(
      optimizer=tf.keras.optimizers.SGD(
          config.client.client_learning_rate,
          clipnorm=config.client.client_clipnorm),
      loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
      metrics=metrics.make_metrics(num_outputs) if with_metrics else None)
  return model


def run_on_data(argv: list[str], tfrecords_dir: Optional[str],
                dataset_dir: Optional[str], synthetic_users: int,
                benchmark: Callable[[Optional[str], str, str], None]) -> None:
  """A script's `main`: refuses positional arguments, quiets absl, and runs
  `benchmark(dataset_dir, tfrecords_dir, scratch_dir)` on the given
  TFRecords, or on `synthetic_users` generated users in a temporary
  directory (also the scratch directory, removed at the end).

  Raises:
    FlairInputError: positional arguments were given.
  """
  if len(argv) > 1:
    raise errors.FlairInputError(
        f"unexpected positional arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  with tempfile.TemporaryDirectory() as root:
    if tfrecords_dir:
      benchmark(dataset_dir, tfrecords_dir, root)
    else:
      benchmark(*prepare_synthetic(root, synthetic_users), root)
