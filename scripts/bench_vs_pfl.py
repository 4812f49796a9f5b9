"""Our central and FedAvg images/s, float32 and bfloat16, beside pfl-research.

    python scripts/bench_vs_pfl.py [--tfrecords_dir T --dataset_dir D] \
        [--precisions float32,bfloat16] [--crop 64] [--batch_size 16] \
        [--num_clients 8] [--images_per_client 64] [--epochs 2] [--rounds 3] \
        [--repeats 1] [--pfl_python PYTHON --pfl_driver bench_pfl.py]

Settings of issue 12 by default: ResNet-18 with GroupNorm, 17 coarse labels,
64x64 crops, batch 16, the 8 training users with the most images (each
truncated to 64 images), 2 client epochs, one untimed warm-up round (or
epoch) then 3 timed ones. Every figure is images trained per second of wall
time (timed images / timed seconds), measured one after the other in this
run, never side by side:

* "central": the product's centralized model and compile step
  (`benchmark.training.central.build_model`, in the scope of
  `central.distribution_strategy()` as `train_central` builds it: Adam,
  clipnorm 10, the suite's metrics) trained with Keras `fit` on central's
  own input pipeline (`central.train_dataset`: the users interleaved and
  shuffled together, batches of `--batch_size`) over the chosen users, each
  read up to its first `--images_per_client` images, so that it decodes only
  the images it trains on, as central training does; `--epochs` passes per
  timed epoch-round.
* "FedAvg": the product's learning process on its default backend
  (`benchmark.training.fedavg.build_learning_process`,
  `factory.open_backend` with the default `--backend`, in-process): client
  SGD 0.1 with
  per-weight clipping, weighted FedAvg, server Adam. Everything a round
  costs is in the figure.
* bfloat16 is the product's `--precision bfloat16` (the `precision` of both
  trainers' `ModelConfig`: Keras mixed precision).
* pfl-research (when `--pfl_python` and `--pfl_driver` are given, after
  ours): its FedAvg and a plain PyTorch loop on the same users and settings,
  run by the given driver with the given interpreter (pfl 0.6 lives in its
  own environment); the data is first converted to pfl's FLAIR HDF5 layout
  by the `to_hdf5.py` converter beside the driver (or `--pfl_converter`).

Without `--tfrecords_dir` a synthetic FLAIR-like dataset (`--synthetic_users`
users, seed 0) is generated and prepared in a temporary directory; pfl needs
`--dataset_dir` too (the directory the TFRecords were prepared from). The
last line is `RESULT {json}` with every figure.

With `--repeats N`, that whole sequence (ours, then pfl-research) runs N
times in turn: every figure is the median of its N measurements (`RESULT`
also lists them, as `<figure>_runs`), and each ratio against pfl-research
is printed as the ratio of the medians and as N ratios within a repeat. On
a shared machine, where one figure can drop by a third while a neighbour
runs, this shows a disturbed repeat instead of letting it decide.
"""

import collections
import contextlib
import json
import os
import sys
import tempfile
import time
from unittest import mock

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmark.backends import factory
from benchmark.cli import commands
from benchmark.core import constants
from benchmark.core import errors
from benchmark.data import label_sets
from benchmark.data import pipeline
from benchmark.model import layers
from benchmark.model import mixed_precision
from benchmark.training import central
from benchmark.training import config as config_lib
from benchmark.training import fedavg
from benchmark.training import models
from benchmark.training import cohorts
import bench_common
import pfl_peer

# pylint: enable=g-import-not-at-top,wrong-import-position

_TFRECORDS_DIR = flags.DEFINE_string(
    "tfrecords_dir", None,
    "Prepared TFRecords; default: synthetic data in a temporary directory.")
_DATASET_DIR = flags.DEFINE_string(
    "dataset_dir", None,
    "The dataset directory --tfrecords_dir was prepared from (only for the "
    "pfl-research conversion).")
_PRECISIONS = flags.DEFINE_list(
    "precisions", ["float32", "bfloat16"], "Precisions to measure ours at.")
_CROP = flags.DEFINE_integer("crop", 64, "Square crop size in pixels.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Client batch size.")
_NUM_CLIENTS = flags.DEFINE_integer("num_clients", 8,
                                    "Clients trained per round.")
_IMAGES_PER_CLIENT = flags.DEFINE_integer(
    "images_per_client", 64, "Images each client trains on (max elements).")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Client epochs per round.")
_ROUNDS = flags.DEFINE_integer(
    "rounds", 3, "Timed rounds (and timed central epoch-rounds).")
_REPEATS = flags.DEFINE_integer(
    "repeats", 1,
    "Times to run the whole sequence (ours, then pfl-research); every figure "
    "is the median over the repeats, and each ratio is also printed per "
    "repeat, so that a disturbed repeat shows instead of deciding.")
_SYNTHETIC_USERS = flags.DEFINE_integer(
    "synthetic_users", 120, "Users of the generated dataset.")
_KERAS_GROUP_NORM = flags.DEFINE_boolean(
    "keras_group_norm", True,
    "Also time central float32 training of the same model built with Keras' "
    "own tf.keras.layers.GroupNormalization (the formulation before "
    "benchmark.model.layers.GroupNormalization), for the ratio.")
_SKIP_FEDAVG = flags.DEFINE_boolean(
    "skip_fedavg", False, "Measure central training only.")
def _process_tree_cpu_seconds() -> float:
  """User + system CPU seconds used so far by this process and its living
  descendants (the TFF worker), from /proc/<pid>/stat (Linux)."""
  parents, times = {}, {}
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
      continue
    # After "pid (comm)": state ppid ... utime (14th field) stime (15th).
    parents[int(entry)] = int(fields[1])
    times[int(entry)] = int(fields[11]) + int(fields[12])
  tree, frontier = {os.getpid()}, [os.getpid()]
  while frontier:
    parent = frontier.pop()
    for pid, ppid in parents.items():
      if ppid == parent and pid not in tree:
        tree.add(pid)
        frontier.append(pid)
  return sum(times.get(pid, 0) for pid in tree) / os.sysconf("SC_CLK_TCK")


class _Timer:
  """Wall and process-tree CPU seconds of a `with` block."""

  def __enter__(self):
    self.wall = time.perf_counter()
    self.cpu = _process_tree_cpu_seconds()
    return self

  def __exit__(self, *exc):
    self.wall = time.perf_counter() - self.wall
    self.cpu = _process_tree_cpu_seconds() - self.cpu


def _check_flags() -> None:
  for flag in (_CROP, _BATCH_SIZE, _NUM_CLIENTS, _IMAGES_PER_CLIENT, _EPOCHS,
               _ROUNDS, _REPEATS, _SYNTHETIC_USERS):
    if flag.value <= 0:
      raise errors.FlairInputError(
          f"--{flag.name} must be a positive integer, got {flag.value}")
  if not _PRECISIONS.value:
    raise errors.FlairInputError("--precisions must name at least one")
  for precision in _PRECISIONS.value:
    mixed_precision.check_precision(precision, flag="precisions")
  pfl_peer.check_flags()


def _pick_clients(train_data, count: int,
                  max_images: int) -> tuple[list[str], int]:
  """The `count` training users with the most images (ties by id, as the
  pfl driver picks them); returns their ids and the images one pass trains
  on (each user truncated to `max_images`)."""
  sizes = {}
  for client_id in train_data.client_ids:
    sizes[client_id] = int(train_data.create_tf_dataset_for_client(
        client_id).reduce(0, lambda n, _: n + 1))
  chosen = sorted(sizes, key=lambda c: (-sizes[c], c))[:count]
  return chosen, sum(min(sizes[c], max_images) for c in chosen)


def _central_seconds(tfrecords_dir: str, label_spec, clients: list[str],
                     precision: str, keras_group_norm: bool = False) -> _Timer:
  """Wall and CPU seconds of `--rounds` timed epoch-rounds of central Keras
  `fit`; with `keras_group_norm`, the model uses Keras' GroupNormalization.

  The input is central's own training pipeline (`central.train_dataset`:
  users interleaved, shuffled, batched) over the chosen users, each user
  file read up to its first `--images_per_client` images, so that every
  image decoded is trained on, as in central training."""
  files = pipeline.partition_files(tfrecords_dir, constants.TRAIN)
  chosen = tff.simulation.datasets.FilePerUserClientData(
      {client_id: files[client_id] for client_id in clients},
      pipeline.create_dataset_fn(label_spec,
                                 max_records=_IMAGES_PER_CLIENT.value))
  config = config_lib.build(config_lib.CentralConfig, dict(
      tfrecords_dir=tfrecords_dir, save_model_dir=tempfile.gettempdir(),
      image_height=_CROP.value, image_width=_CROP.value,
      train_batch_size=_BATCH_SIZE.value, precision=precision))
  dataset = central.train_dataset(chosen, config).repeat(_EPOCHS.value)
  patch = (mock.patch.object(layers, "GroupNormalization",
                             tf.keras.layers.GroupNormalization)
           if keras_group_norm else contextlib.nullcontext())
  with patch, central.distribution_strategy().scope():
    keras_model = central.build_model(config, label_spec.num_outputs)
  keras_model.fit(dataset, epochs=1, verbose=0)  # Warm-up.
  with _Timer() as timer:
    keras_model.fit(dataset, epochs=_ROUNDS.value, verbose=0)
  return timer


def _fedavg_seconds(tfrecords_dir: str, label_spec, train_data,
                    clients: list[str], precision: str) -> _Timer:
  """Wall and CPU seconds (ours and the TFF worker's) of `--rounds` timed
  FedAvg rounds, after one warm-up round."""
  settings = dict(
      tfrecords_dir=tfrecords_dir, save_model_dir=tempfile.gettempdir(),
      client_epochs_per_round=_EPOCHS.value,
      client_batch_size=_BATCH_SIZE.value,
      clients_per_round=_NUM_CLIENTS.value,
      max_elements_per_client=_IMAGES_PER_CLIENT.value,
      image_height=_CROP.value, image_width=_CROP.value, show_progress=False)
  config = config_lib.build(config_lib.FederatedConfig,
                            dict(settings, precision=precision))
  initial_weights = models.model_weights(
      models.build_model(config.model, label_spec.num_outputs))
  process = fedavg.build_learning_process(
      config, label_spec, train_data,
      tff.learning.add_debug_measurements(tff.aggregators.MeanFactory()))
  with factory.open_backend(config.run.backend, process,
                            len(clients)) as backend:
    backend.set_state(backend.initialize(initial_weights))
    backend.run_round(cohorts.client_inputs(clients, 0))  # Warm-up.
    with _Timer() as timer:
      for _ in range(_ROUNDS.value):
        backend.run_round(cohorts.client_inputs(clients, 1))
  return timer


def _run_pfl(hdf5: str) -> dict:
  """Runs the pfl-research driver on `hdf5` at this run's settings."""
  return pfl_peer.run(hdf5, [
      "--crop", str(_CROP.value), "--batch_size", str(_BATCH_SIZE.value),
      "--num_clients", str(_NUM_CLIENTS.value),
      "--images_per_client", str(_IMAGES_PER_CLIENT.value),
      "--epochs", str(_EPOCHS.value), "--rounds", str(_ROUNDS.value)])


def _print_ratio(name: str, samples: dict[str, list[float]], numerator: str,
                 denominator: str) -> None:
  """Prints `ratio NAME: R` (R: the ratio of the two medians), then with
  several repeats the ratio within each repeat (its two figures taken
  minutes apart, not a whole run apart) and the median of those."""
  ratio = float(np.median(samples[numerator]) /
                np.median(samples[denominator]))
  line = f"ratio {name}: {ratio:.3f}"
  if len(samples[numerator]) > 1:
    paired = [a / b for a, b in zip(samples[numerator], samples[denominator])]
    line += (" (per repeat: " + ", ".join(f"{r:.3f}" for r in paired) +
             f"; their median {float(np.median(paired)):.3f})")
  print(line)


def _benchmark(dataset_dir: str, tfrecords_dir: str, root: str) -> None:
  label_spec = label_sets.load_label_spec(tfrecords_dir)
  train_data = pipeline.load_partition(tfrecords_dir, constants.TRAIN,
                                       label_spec)
  clients, images_per_pass = _pick_clients(train_data, _NUM_CLIENTS.value,
                                           _IMAGES_PER_CLIENT.value)
  images_per_round = images_per_pass * _EPOCHS.value
  timed_images = images_per_round * _ROUNDS.value
  print(f"{len(clients)} clients, {images_per_pass} images (at most "
        f"{_IMAGES_PER_CLIENT.value} per client) x {_EPOCHS.value} epoch(s) "
        f"= {images_per_round} images per round; crop {_CROP.value}, batch "
        f"{_BATCH_SIZE.value}; 1 warm-up + {_ROUNDS.value} timed; "
        f"{os.cpu_count()} CPU(s)", flush=True)
  hdf5 = (pfl_peer.hdf5_path(dataset_dir, tfrecords_dir, root)
          if pfl_peer.enabled() else None)
  samples = collections.defaultdict(list)
  for repeat in range(_REPEATS.value):
    if _REPEATS.value > 1:
      print(f"repeat {repeat + 1} of {_REPEATS.value}", flush=True)
    for precision in _PRECISIONS.value:
      runs = [("central", _central_seconds,
               (tfrecords_dir, label_spec, clients, precision))]
      if _KERAS_GROUP_NORM.value and precision == mixed_precision.FLOAT32:
        runs.append(("central_kerasgn", _central_seconds,
                     (tfrecords_dir, label_spec, clients, precision, True)))
      if not _SKIP_FEDAVG.value:
        runs.append(("fedavg", _fedavg_seconds,
                     (tfrecords_dir, label_spec, train_data, clients,
                      precision)))
      for name, measure, args in runs:
        timer = measure(*args)
        key = f"ours_{name}_{precision}"
        samples[key].append(timed_images / timer.wall)
        samples[f"{key}_cpu_ms_per_image"].append(
            1000 * timer.cpu / timed_images)
        print(f"ours  {name:15s} {precision:8s} {samples[key][-1]:7.1f} "
              f"images/s, {samples[f'{key}_cpu_ms_per_image'][-1]:6.2f} "
              "CPU ms/image", flush=True)
    if hdf5:
      pfl = _run_pfl(hdf5)
      samples["pfl_fedavg"].append(pfl["fedavg_img_s"])
      if pfl.get("plain_img_s"):
        samples["pfl_plain_torch"].append(pfl["plain_img_s"])
  results = {"images_per_round": images_per_round,
             "repeats": _REPEATS.value}
  results.update({key: float(np.median(values))
                  for key, values in samples.items()})
  if _REPEATS.value > 1:
    results.update({f"{key}_runs": values for key, values in samples.items()})
  if "pfl_fedavg" in results:
    results.setdefault("pfl_plain_torch", None)

  print()
  print(f"{'':28s} {'central/plain':>14s} {'FedAvg':>10s}  (images/s)")
  for precision in _PRECISIONS.value:
    fedavg = results.get(f"ours_fedavg_{precision}")
    print(f"{'ours (Keras/TFF) ' + precision:28s} "
          f"{results[f'ours_central_{precision}']:14.1f} "
          f"{fedavg if fedavg is not None else float('nan'):10.1f}")
  if "ours_central_kerasgn_float32" in results:
    print("ratio ours central float32, our GroupNorm / Keras' GroupNorm: "
          "images/s "
          f"{results['ours_central_float32'] / results['ours_central_kerasgn_float32']:.3f}"
          ", CPU per image "
          f"{results['ours_central_float32_cpu_ms_per_image'] / results['ours_central_kerasgn_float32_cpu_ms_per_image']:.3f}")
  for precision in _PRECISIONS.value[1:]:
    base = _PRECISIONS.value[0]
    for name in ("central", "fedavg"):
      if f"ours_{name}_{precision}" in results:
        print(f"ratio ours {name} {precision} / {base}: images/s "
              f"{results[f'ours_{name}_{precision}'] / results[f'ours_{name}_{base}']:.3f}"
              ", CPU per image "
              f"{results[f'ours_{name}_{precision}_cpu_ms_per_image'] / results[f'ours_{name}_{base}_cpu_ms_per_image']:.3f}")
  if "pfl_fedavg" in results:
    plain = results["pfl_plain_torch"]
    print(f"{'pfl-research (PyTorch) fp32':28s} "
          f"{plain if plain is not None else float('nan'):14.1f} "
          f"{results['pfl_fedavg']:10.1f}")
    for precision in _PRECISIONS.value:
      if plain:
        _print_ratio(f"ours central {precision} / plain PyTorch", samples,
                     f"ours_central_{precision}", "pfl_plain_torch")
      if f"ours_fedavg_{precision}" in results:
        _print_ratio(f"ours FedAvg {precision} / pfl FedAvg", samples,
                     f"ours_fedavg_{precision}", "pfl_fedavg")
  print("RESULT " + json.dumps(results))


@commands.exit_on_input_error
def main(argv):
  _check_flags()
  bench_common.run_on_data(argv, _TFRECORDS_DIR.value, _DATASET_DIR.value,
                           _SYNTHETIC_USERS.value, _benchmark)


if __name__ == "__main__":
  app.run(main)
