"""FedAvg rounds on FLAIR-shaped cohorts: seconds per round, the fitted
per-client and per-image costs, Keras `fit` on the same images, and
pfl-research on the same users.

    python scripts/bench_flair_rounds.py [--tfrecords_dir T --dataset_dir D] \
        [--synthetic_users 2000] \
        [--shapes largest:8:64,smallest:8,random:50,random:200] \
        [--crop 64] [--batch_size 16] [--max_elements_per_client 512] \
        [--epochs 2] [--rounds 2] [--backend inprocess] [--num_workers N] \
        [--seed 0] [--pfl_python PYTHON --pfl_driver bench_pfl.py]

FLAIR's training users hold a median of 2 images (quartiles 1 and 5), and a
round samples its users uniformly, so a real round is many clients of a few
images each. Each `--shapes` entry is a cohort, `KIND:N[:MAX]`: `random`
draws N training users uniformly at random (`--seed`), `largest` takes the
N with the most images, `smallest` the N with the fewest (ties by id); each
user trains on at most MAX images (default `--max_elements_per_client`) for
`--epochs` epochs.
Without `--tfrecords_dir` a population of `--synthetic_users` users is
generated (`benchmark.prepare.synthetic`, whose user sizes follow FLAIR's)
and prepared in a temporary directory.

For each cohort, one after the other on this machine:
* ours: the product's learning process (ResNet-18 with GroupNorm, 17
  labels, client SGD 0.1 with per-weight clipping, weighted FedAvg, server
  Adam) on `--backend`, one untimed warm-up round then `--rounds` timed
  rounds, everything a round costs included;
* Keras: the same model `fit` for one epoch on the cohort's client datasets
  concatenated (the same batches as the clients), after a warm-up epoch: the
  compute floor of the same images;
* pfl-research (with `--pfl_python` and `--pfl_driver`): its FedAvg on the
  same users (`--user_ids`), at the same settings.

Then the least-squares fit of the median round time over the cohorts,
`seconds ~ a + b * clients + c * images` (images: trained per round, epochs
counted), gives b, the cost of a client beyond its images, and c, the cost
of an image; and the same fit for pfl-research. The last line is
`RESULT {json}`.
"""

import json
import os
import statistics
import sys
import time

# TensorFlow's C++ info lines (Grappler, oneDNN) off the console: set before
# TensorFlow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from benchmark.backends import factory
from benchmark.cli import commands
from benchmark.core import constants
from benchmark.core import errors
from benchmark.data import label_sets
from benchmark.data import pipeline
from benchmark.training import cohorts
from benchmark.training import config as config_lib
from benchmark.training import fedavg
from benchmark.training import models
import bench_common
import pfl_peer
# pylint: enable=g-import-not-at-top,wrong-import-position

_TFRECORDS_DIR = flags.DEFINE_string(
    "tfrecords_dir", None,
    "Prepared TFRecords; default: a generated population, prepared in a "
    "temporary directory.")
_DATASET_DIR = flags.DEFINE_string(
    "dataset_dir", None,
    "The dataset directory --tfrecords_dir was prepared from (only for the "
    "pfl-research conversion).")
_SYNTHETIC_USERS = flags.DEFINE_integer(
    "synthetic_users", 2000, "Users of the generated population.")
_SHAPES = flags.DEFINE_list(
    "shapes", ["largest:8:64", "smallest:8", "random:50", "random:200"],
    "Cohorts to time, KIND:N or KIND:N:MAX (MAX: images per client at "
    "most, default --max_elements_per_client), KIND random, largest or "
    "smallest.")
_CROP = flags.DEFINE_integer("crop", 64, "Square crop size in pixels.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Client batch size.")
_MAX_ELEMENTS = flags.DEFINE_integer(
    "max_elements_per_client", 512, "Images a client trains on at most.")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Client epochs per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Timed rounds per cohort.")
_BACKEND = flags.DEFINE_enum("backend", constants.BACKEND_INPROCESS,
                             constants.BACKENDS, "Our FedAvg backend.")
_NUM_WORKERS = flags.DEFINE_integer(
    "num_workers", None, "Clients trained at once by our backend "
    "(`--num_workers` of the trainers); default: the backend's.")
_KERAS = flags.DEFINE_boolean(
    "keras", True, "Also time Keras fit on each cohort's images.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random cohorts.")

_KINDS = ("random", "largest", "smallest")


def _parse_shapes() -> list[tuple[str, int, int]]:
  """`--shapes` as (kind, size, max images per client) triples;
  FlairInputError naming the flag."""
  shapes = []
  for entry in _SHAPES.value:
    kind, size, *cap = entry.split(":")
    numbers = [size, *cap]
    if (kind not in _KINDS or len(cap) > 1 or
        not all(n.isdigit() and int(n) > 0 for n in numbers)):
      raise errors.FlairInputError(
          f"--shapes entry {entry!r}: expected KIND:N or KIND:N:MAX with "
          f"KIND one of {', '.join(_KINDS)} and N, MAX positive integers")
    shapes.append((kind, int(size),
                   int(cap[0]) if cap else _MAX_ELEMENTS.value))
  if len(shapes) < 3:
    raise errors.FlairInputError(
        "--shapes needs at least 3 cohorts to fit a + b * clients + c * "
        "images")
  return shapes


def _user_sizes(tfrecords_dir: str) -> dict[str, int]:
  """Images of each training user (its file's records)."""
  return {client_id: sum(1 for _ in tf.data.TFRecordDataset(path))
          for client_id, path in pipeline.partition_files(
              tfrecords_dir, constants.TRAIN).items()}


def _cohort(kind: str, size: int, sizes: dict[str, int],
            rng: np.random.Generator) -> list[str]:
  """The user ids of one cohort (see the module doc)."""
  ids = sorted(sizes)
  if size > len(ids):
    raise errors.FlairInputError(
        f"--shapes asks for {size} users; the population has {len(ids)}")
  if kind == "random":
    return [ids[i] for i in sorted(rng.choice(len(ids), size, replace=False))]
  sign = -1 if kind == "largest" else 1
  return sorted(ids, key=lambda u: (sign * sizes[u], u))[:size]


def _fit(clients: list[int], images: list[int],
         seconds: list[float]) -> dict[str, float]:
  """Least squares `seconds ~ a + b * clients + c * images`: a, b and c in
  seconds (b per client, c per image)."""
  design = np.column_stack([np.ones(len(clients)), clients, images])
  (a, b, c), *_ = np.linalg.lstsq(design, np.asarray(seconds), rcond=None)
  return {"a_s": float(a), "b_ms_per_client": 1000 * float(b),
          "c_ms_per_image": 1000 * float(c)}


def _keras_dataset(train_data, users: list[str],
                   cap: int) -> tf.data.Dataset:
  """The cohort's client datasets (their batches, at most `cap` images
  each) concatenated."""
  preprocess = pipeline.create_train_preprocess_fn(
      pipeline.ClientSpec(num_epochs=_EPOCHS.value,
                          batch_size=_BATCH_SIZE.value,
                          max_elements=cap),
      (_CROP.value, _CROP.value))
  datasets = [preprocess(train_data.create_tf_dataset_for_client(u),
                         tf.constant([_SEED.value, i], tf.int64))
              for i, u in enumerate(users)]
  dataset = datasets[0]
  for more in datasets[1:]:
    dataset = dataset.concatenate(more)
  return pipeline.keras_input(dataset)


def _keras_model(config, train_data, label_spec, users) -> tf.keras.Model:
  """The clients' model compiled for `fit`, warmed up on `users`."""
  model = bench_common.client_keras_model(config, label_spec.num_outputs)
  model.fit(_keras_dataset(train_data, users, _MAX_ELEMENTS.value), epochs=1,
            verbose=0)
  return model


def _timed(run) -> float:
  start = time.perf_counter()
  run()
  return time.perf_counter() - start


def _pfl_seconds(hdf5: str, users: list[str], cap: int, root: str) -> float:
  """pfl-research's seconds per timed round on `users`."""
  path = os.path.join(root, "user_ids.txt")
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(f"{u}\n" for u in users))
  result = pfl_peer.run(hdf5, [
      "--user_ids", path, "--crop", str(_CROP.value),
      "--batch_size", str(_BATCH_SIZE.value),
      "--images_per_client", str(cap),
      "--epochs", str(_EPOCHS.value), "--rounds", str(_ROUNDS.value),
      "--skip_plain"])
  return float(result["fedavg_s_per_round"])


def _print_fit(name: str, rows: list[dict], key: str) -> dict:
  fit = _fit([r["clients"] for r in rows], [r["images"] for r in rows],
             [r[key] for r in rows])
  print(f"fit {name:6s} seconds ~ a + b * clients + c * images: "
        f"a {fit['a_s']:.2f} s, b {fit['b_ms_per_client']:.1f} ms per "
        f"client, c {fit['c_ms_per_image']:.2f} ms per image", flush=True)
  return fit


def _benchmark(dataset_dir: str, tfrecords_dir: str, root: str) -> None:
  shapes = _parse_shapes()
  config = config_lib.build(config_lib.FederatedConfig, dict(
      tfrecords_dir=tfrecords_dir, save_model_dir=root,
      client_epochs_per_round=_EPOCHS.value,
      client_batch_size=_BATCH_SIZE.value, clients_per_round=1,
      max_elements_per_client=_MAX_ELEMENTS.value, backend=_BACKEND.value,
      image_height=_CROP.value, image_width=_CROP.value, show_progress=False))
  label_spec = label_sets.load_label_spec(tfrecords_dir)
  train_data = pipeline.load_partition(tfrecords_dir, constants.TRAIN,
                                       label_spec)
  sizes = _user_sizes(tfrecords_dir)
  print(f"{len(sizes)} training users, median {np.median(list(sizes.values()))}"
        f" images; crop {_CROP.value}, batch {_BATCH_SIZE.value}, "
        f"{_EPOCHS.value} epoch(s), <= {_MAX_ELEMENTS.value} images per "
        f"client; 1 warm-up + {_ROUNDS.value} timed rounds; "
        f"{os.cpu_count()} CPU(s)", flush=True)
  rng = np.random.default_rng(_SEED.value)
  cohorts_ = [(f"{kind}:{size}:{cap}", _cohort(kind, size, sizes, rng), cap)
              for kind, size, cap in shapes]
  keras = (_keras_model(config, train_data, label_spec, cohorts_[0][1])
           if _KERAS.value else None)
  hdf5 = (pfl_peer.hdf5_path(dataset_dir, tfrecords_dir, root)
          if pfl_peer.enabled() else None)
  weights = models.model_weights(
      models.build_model(config.model, label_spec.num_outputs))
  rows, processes = [], {}
  for name, users, cap in cohorts_:
    if cap not in processes:  # Its client datasets truncate at `cap`.
      processes[cap] = fedavg.build_learning_process(
          config_lib.replace(config, max_elements_per_client=cap),
          label_spec, train_data, tff.aggregators.MeanFactory())
    with factory.open_backend(_BACKEND.value, processes[cap], 1,
                              num_workers=_NUM_WORKERS.value) as backend:
      backend.set_state(backend.initialize(weights))
      rows.append(_measure(name, users, cap, sizes, backend, keras,
                           train_data, config, label_spec, hdf5, root))
  results = {"shapes": rows, "ours": _print_fit("ours", rows, "ours_s")}
  if hdf5:
    results["pfl"] = _print_fit("pfl", rows, "pfl_s")
  print("RESULT " + json.dumps(results))


def _measure(name, users, cap, sizes, backend, keras, train_data, config,
             label_spec, hdf5, root) -> dict:
  """One cohort's figures (see the module doc); prints its line."""
  images = _EPOCHS.value * sum(min(sizes[u], cap) for u in users)
  backend.run_round(cohorts.client_inputs(users, 0, _SEED.value))
  ours = statistics.median(
      _timed(lambda r=r: backend.run_round(
          cohorts.client_inputs(users, r, _SEED.value)))
      for r in range(1, _ROUNDS.value + 1))
  row = {"shape": name, "clients": len(users), "images": images,
         "ours_s": ours}
  line = (f"{name:13s} {len(users):4d} clients {images:6d} images: ours "
          f"{ours:7.2f} s/round ({images / ours:6.1f} images/s)")
  if keras is not None:
    # TFF built Keras models inside v1 graphs, which switched Keras' base
    # classes; building one model eagerly switches them back.
    models.build_model(config.model, label_spec.num_outputs)
    row["keras_s"] = _timed(lambda: keras.fit(
        _keras_dataset(train_data, users, cap), epochs=1, verbose=0))
    line += f", Keras fit {row['keras_s']:7.2f} s"
  if hdf5:
    row["pfl_s"] = _pfl_seconds(hdf5, users, cap, root)
    line += (f", pfl-research {row['pfl_s']:7.2f} s/round (pfl / ours "
             f"{row['pfl_s'] / ours:.2f})")
  print(line, flush=True)
  return row


@commands.exit_on_input_error
def main(argv):
  pfl_peer.check_flags()
  _parse_shapes()
  bench_common.run_on_data(argv, _TFRECORDS_DIR.value, _DATASET_DIR.value,
                           _SYNTHETIC_USERS.value, _benchmark)


if __name__ == "__main__":
  app.run(main)
