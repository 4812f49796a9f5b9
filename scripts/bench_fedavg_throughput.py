"""FedAvg throughput on each backend vs plain Keras `fit`, from one run.

    python scripts/bench_fedavg_throughput.py [--tfrecords_dir T] \
        [--crop 64] [--batch_size 16] [--num_clients 8] \
        [--images_per_client 64] [--epochs 1] [--rounds 3] \
        [--backends inprocess,tff_worker,ray] [--num_workers N]

Both sides train the same ResNet-18 (benchmark.model.resnet, GroupNorm), at
the same crop, batch size and learning rate (SGD with per-weight clipping),
on the same images: the `--num_clients` training users with the most images
(each truncated to `--images_per_client`), `--epochs` passes each.

* FedAvg, on each of `--backends` in turn: the trainer's own process and
  backends (`benchmark.training.fedavg.build_learning_process`,
  `benchmark.backends.factory.open_backend`: client datasets built from
  client ids inside the round, weighted FedAvg, server Adam, the state kept
  in the backend between rounds), `--rounds` rounds timed after one untimed
  warm-up round (graph compilation, session and actor start, first data
  read).
  Everything a round costs is included: broadcasting the model to the
  clients, building and decoding the client datasets, local training with
  the suite's training metrics, aggregation, the server update and fetching
  the round's metrics.
* Keras: `model.fit` on the concatenation of the same client datasets (same
  per-client batching), one untimed warm-up epoch, then one timed epoch
  right after each timed FedAvg round; once compiled with the suite's
  metrics (as `central_main` and the FedAvg clients train) and once with
  the loss only.

Interleaving the two sides makes a slow spell of a shared machine fall on
both. Prints images/s of each (the median repetition, all repetitions
beside it) and the ratios FedAvg / Keras (the median over rounds of each
round against the Keras epochs timed right after it). Without
`--tfrecords_dir` a synthetic FLAIR-like dataset is generated and prepared
in a temporary directory.
"""

import os
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
import tensorflow as tf

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import bench_common  # pylint: disable=g-import-not-at-top,wrong-import-position

_TFRECORDS_DIR = flags.DEFINE_string(
    "tfrecords_dir", None,
    "Prepared TFRecords; default: synthetic data in a temporary directory.")
_CROP = flags.DEFINE_integer("crop", 64, "Square crop size in pixels.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Client batch size.")
_NUM_CLIENTS = flags.DEFINE_integer("num_clients", 8,
                                    "Clients trained per round.")
_IMAGES_PER_CLIENT = flags.DEFINE_integer(
    "images_per_client", 64, "Images each client trains on (max elements).")
_EPOCHS = flags.DEFINE_integer("epochs", 1, "Client epochs per round.")
_ROUNDS = flags.DEFINE_integer(
    "rounds", 3, "Timed FedAvg rounds (and timed Keras epochs).")
_BACKENDS = flags.DEFINE_list(
    "backends", "inprocess,tff_worker,ray",
    "FedAvg backends to time, in this order "
    "(benchmark.core.constants.BACKENDS).")
_NUM_WORKERS = flags.DEFINE_integer(
    "num_workers", None, "--num_workers of the backends (default: theirs).")
_KERAS = flags.DEFINE_boolean(
    "keras", True, "Also time Keras fit on the same images.")
_SYNTHETIC_USERS = flags.DEFINE_integer(
    "synthetic_users", 120, "Users of the generated dataset.")


def _pick_clients(train_data, count: int,
                  max_images: int) -> tuple[list[str], int]:
  """The `count` training users with the most images; returns their ids and
  the images one pass trains on (each user truncated to `max_images`)."""
  sizes = {}
  for client_id in train_data.client_ids:
    sizes[client_id] = int(train_data.create_tf_dataset_for_client(
        client_id).reduce(0, lambda n, _: n + 1))
  chosen = sorted(sizes, key=lambda c: (-sizes[c], c))[:count]
  return chosen, sum(min(sizes[c], max_images) for c in chosen)


def _benchmark(tfrecords_dir: str) -> None:
  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff

  from benchmark.backends import factory
  from benchmark.core import constants
  from benchmark.data import label_sets
  from benchmark.data import pipeline
  from benchmark.training import cohorts
  from benchmark.training import config as config_lib
  from benchmark.training import fedavg
  from benchmark.training import models
  # pylint: enable=g-import-not-at-top

  config = config_lib.build(config_lib.FederatedConfig, dict(
      tfrecords_dir=tfrecords_dir, save_model_dir=tempfile.gettempdir(),
      client_epochs_per_round=_EPOCHS.value,
      client_batch_size=_BATCH_SIZE.value,
      clients_per_round=_NUM_CLIENTS.value,
      max_elements_per_client=_IMAGES_PER_CLIENT.value,
      image_height=_CROP.value, image_width=_CROP.value, show_progress=False))
  label_spec = label_sets.load_label_spec(tfrecords_dir)
  train_data = pipeline.load_partition(tfrecords_dir, constants.TRAIN,
                                       label_spec)
  clients, images_per_pass = _pick_clients(train_data, _NUM_CLIENTS.value,
                                           _IMAGES_PER_CLIENT.value)
  images_per_round = images_per_pass * _EPOCHS.value
  print(f"{len(clients)} clients, {images_per_pass} images (at most "
        f"{_IMAGES_PER_CLIENT.value} per client) x {_EPOCHS.value} epoch(s) "
        f"= {images_per_round} images per round; crop {_CROP.value}, batch "
        f"{_BATCH_SIZE.value}")

  # --- Keras on the same images (the same per-client batching). ---
  preprocess = pipeline.create_train_preprocess_fn(pipeline.ClientSpec(
      num_epochs=1, batch_size=_BATCH_SIZE.value,
      max_elements=_IMAGES_PER_CLIENT.value))
  dataset = None
  for client_id in clients:
    client_ds = preprocess(train_data.create_tf_dataset_for_client(client_id))
    dataset = client_ds if dataset is None else dataset.concatenate(client_ds)
  dataset = dataset.repeat(_EPOCHS.value).prefetch(tf.data.AUTOTUNE)

  def compiled_keras_model(with_metrics: bool) -> tf.keras.Model:
    model = bench_common.client_keras_model(config, label_spec.num_outputs,
                                            with_metrics)
    model.fit(dataset, epochs=1, verbose=0)  # Warm-up (tracing).
    return model

  keras_runs = {}
  if _KERAS.value:
    keras_runs = {
        "Keras fit, suite metrics": compiled_keras_model(True),
        "Keras fit, loss only": compiled_keras_model(False)}

  # --- FedAvg on each backend, its rounds interleaved with Keras epochs. ---
  initial_model = models.build_model(config.model, label_spec.num_outputs)
  initial_weights = models.model_weights(initial_model)
  process = fedavg.build_learning_process(
      config, label_spec, train_data,
      tff.learning.add_debug_measurements(tff.aggregators.MeanFactory()))
  seconds = {}  # Row name -> seconds of each timed repetition.

  def timed(name: str, run) -> None:
    start = time.perf_counter()
    run()
    seconds.setdefault(name, []).append(time.perf_counter() - start)

  for backend_name in _BACKENDS.value:
    start = time.perf_counter()
    with factory.open_backend(backend_name, process, len(clients),
                               num_workers=_NUM_WORKERS.value) as backend:
      backend.set_state(backend.initialize(initial_weights))
      backend.run_round(cohorts.client_inputs(clients, 0))  # Warm-up.
      # On a GPU whose kernels are compiled from PTX, mostly compilation
      # (benchmark/core/cuda_env.py); a rerun finds them in CUDA's cache.
      print(f"time to first round, {backend_name}: "
            f"{time.perf_counter() - start:.1f} s (backend start, graph "
            "compilation, first round)", flush=True)
      # TFF built Keras models inside v1 `wrap_function` graphs, and Keras
      # then switched the base classes of the model's (shared) classes to
      # its v1 ones; building one model eagerly switches them back, so the
      # Keras models above fit as v2 models again.
      models.build_model(config.model, label_spec.num_outputs)
      for _ in range(_ROUNDS.value):
        timed(f"FedAvg round, {backend_name}",
              lambda: backend.run_round(cohorts.client_inputs(clients, 1)))  # pylint: disable=cell-var-from-loop
        for keras_name, model in keras_runs.items():
          timed(keras_name, lambda: model.fit(dataset, epochs=1, verbose=0))  # pylint: disable=cell-var-from-loop

  for name, times in seconds.items():
    print(f"{name:40s} {images_per_round / statistics.median(times):8.1f} "
          f"images/s (median of {len(times)}; "
          f"{' '.join(f'{t:.2f}' for t in times)} s)")
  # Each FedAvg round against the Keras epochs timed right after it.
  for backend_name in _BACKENDS.value:
    rounds = seconds[f"FedAvg round, {backend_name}"]
    for keras_name in keras_runs:
      keras = seconds[keras_name]
      offset = _BACKENDS.value.index(backend_name) * _ROUNDS.value
      ratios = [keras[offset + i] / rounds[i] for i in range(len(rounds))]
      print(f"ratio FedAvg round, {backend_name} / {keras_name:24s} "
            f"{statistics.median(ratios):8.3f} (median; "
            f"{' '.join(f'{r:.2f}' for r in ratios)})")


def main(argv):
  bench_common.run_on_data(
      argv, _TFRECORDS_DIR.value, None, _SYNTHETIC_USERS.value,
      lambda dataset_dir, tfrecords_dir, root: _benchmark(tfrecords_dir))


if __name__ == "__main__":
  app.run(main)
