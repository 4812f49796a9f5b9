"""Federated training of ResNet-18 on FLAIR with TFF FedAvg, optionally with
user-level central DP.

One plain function, `run_federated(FederatedConfig) -> dict`, runs the whole
program (docs/original_benchmark.md, "A FedAvg round"):

* FedAvg (`tff.learning.algorithms.build_weighted_fed_avg`, or the unweighted
  builder with a DP aggregator): each round samples `clients_per_round`
  training users uniformly without replacement
  (`tff.simulation.build_uniform_sampling_fn`, a deterministic function of the
  round number and seed, so a resumed run samples the same cohorts); client
  datasets are built *inside* the TFF computation from the client ids
  (`tff.simulation.compose_dataset_computation_with_learning_process`); each
  client runs SGD with per-weight gradient clipping; the server applies the
  averaged model delta with Adam (epsilon 0.01).
* FLAIR-IID when `iid`: the training clients are `benchmark.iid`'s dealing
  of the training images to the same users (seeded by `iid_seed`); val and
  test are the users' own data.
* DP when `epsilon > 0`: `benchmark.dp` calibrates the noise and builds the
  Gaussian aggregator (fixed or adaptive clipping).
* Every `rounds_per_eval` rounds (and before the first round and after the
  last) the global model is evaluated on the merged val clients with Keras;
  the weights are saved when val loss improves; at the end the best weights
  are evaluated on val and test.
* Outputs in `save_model_dir`: `metrics.csv` (via
  `tff.program.CSVFileReleaseManager`), `tensorboard/`
  (`tff.program.TensorBoardReleaseManager`), `final_metrics.json`, the best
  weights `resnet18_federated_{N}labels.h5`, checkpoints in `checkpoints/`
  (`tff.program.FileProgramStateManager`) and the TFF worker's log.
* Resume: the program state (learning-process state, round, best val loss,
  sampling seed) is checkpointed every `rounds_per_checkpoint` rounds and at
  the end; running the same configuration again continues after the latest
  checkpoint, and metrics.csv rows after that round are replaced.

Rounds run on a backend (`benchmark.backends`: `inprocess`, the default, TFF's
compiled round run by TensorFlow in this process, on GPUs when there are any;
`tff_worker`, TFF's own worker process; `ray`, Ray actors); whatever a backend
starts is stopped however the run ends.

metrics.csv: one row per round, `round` first, then the other columns in
alphabetical order (the order `tff.program.CSVFileReleaseManager` writes):
`round_time_s` (wall time of the round, from handing the cohort to the
backend to receiving the round's metrics: client data loading, training,
aggregation and the server update; the state stays in the backend),
`train_<name>` for the clients' training metrics (`train_loss`, the
`metrics.metric_names` metrics, `train_num_examples`, `train_num_batches`),
the aggregator's measurements (always: client update norms
`client_update_norm_mean` / `client_update_norm_std` and the averaged update's
`server_update_norm` / `_max` / `_min`; with DP also `dp_clip`, the L2 clip
applied this round, and `dp_noise_stddev`, the stddev of the Gaussian noise
added to the *sum* of clipped updates, see `dp.sum_noise_multiplier`), and, on
evaluated rounds only (empty elsewhere), `eval_time_s` and `val_<name>`.
Round 0 holds the evaluation of the initial model only. On resume, rows after
the checkpointed round are dropped and rewritten, so each round appears once.
"""

import asyncio
import collections
import dataclasses
import functools
import math
import os
import shutil
import time
from typing import Any, Optional

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
import tqdm

from benchmark.backends import base
from benchmark.backends import factory
from benchmark.backends import graph_runner
from benchmark.core import constants
from benchmark.core import file_io
from benchmark.core import validate
from benchmark.core.errors import FlairInputError
from benchmark.data import iid
from benchmark.data import label_sets
from benchmark.data import pipeline
from benchmark.data import triage
from benchmark.model import metrics as metrics_lib
from benchmark.model import mixed_precision
from benchmark.model import resnet
from benchmark.training import dp
from benchmark.training import optimizers

ALGORITHM_FEDAVG = "fedavg"
ALGORITHM_FEDPROX = "fedprox"
ALGORITHMS = (ALGORITHM_FEDAVG, ALGORITHM_FEDPROX)
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "program_state_"
# Checkpoints kept (the latest ones); one spare in case the latest is cut.
CHECKPOINTS_KEPT = 2
WORKER_LOG_FILE = "tff_worker.log"
ROUND_KEY = "round"
ROUND_TIME_KEY = "round_time_s"
EVAL_TIME_KEY = "eval_time_s"
TRAIN_PREFIX = "train_"
VAL_PREFIX = "val_"
TEST_PREFIX = "test_"

# Aggregator measurements -> metrics.csv column names. Keys are the last
# element of TFF's measurement path: `add_debug_measurements` names
# (tff.learning, debug_measurements.py) and the DP query metrics of
# tensorflow_privacy (`clip` for adaptive clipping).
_MEASUREMENT_COLUMNS = {
    "average_client_norm": "client_update_norm_mean",
    "std_dev_client_norm": "client_update_norm_std",
    "server_update_norm": "server_update_norm",
    "server_update_max": "server_update_max",
    "server_update_min": "server_update_min",
}
# tensorflow_privacy's QuantileAdaptiveClipSumQuery.derive_metrics name.
_ADAPTIVE_CLIP_MEASUREMENT = "clip"
DP_CLIP_KEY = "dp_clip"
DP_NOISE_STDDEV_KEY = "dp_noise_stddev"


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise FlairInputError(message)


@dataclasses.dataclass(frozen=True)
class FederatedConfig:
  """A federated run: the reference flags of federated_main (same names and
  defaults, docs/original_benchmark.md) plus the project's own.

  Attributes beyond the reference:
    rounds_per_checkpoint: save the program state every this many rounds
      (and after the last round).
    dp_calibration: "rounds" (noise for exactly total_rounds rounds) or
      "original" (the original benchmark's calibration); see benchmark.dp.
    seed: initial-model seed (weights and the model's crop/flip op seeds).
    show_progress: show a tqdm progress bar over rounds.
    backend: where rounds run, one of `constants.BACKENDS` (see
      `benchmark.backends`).
    num_workers: clients trained at once (`factory.open_backend`); None for
      the backend's default.
    ray_address: with the `ray` backend, a running cluster's address; None
      starts an embedded local Ray.
    algorithm: `ALGORITHM_FEDAVG` or `ALGORITHM_FEDPROX` (FedAvg whose
      clients add `proximal_strength / 2 * ||w - w_global||^2` to their loss,
      Li et al. 2020, arXiv 1812.06127; TFF's `build_*_fed_prox`).
    proximal_strength: FedProx's mu, >= 0 (0 is FedAvg).
    server_optimizer, server_momentum, server_beta_1, server_beta_2,
      server_epsilon: the server optimizer (`optimizers.ServerOptimizerSpec`;
      the reference: Adam, epsilon 0.01).
    client_optimizer, client_momentum: the clients' optimizer
      (`optimizers.build_client_optimizer`; the reference: SGD).
    precision: `model.FLOAT32` or `model.BFLOAT16` (mixed precision of the
      clients' and the evaluation model, see `model.resnet18`).
    iid: train on FLAIR-IID: the training images dealt out at random to the
      training users, each keeping its number of images (`benchmark.iid`);
      val and test are unchanged.
    iid_seed: with `iid`, the seed of the dealing (>= 0).
    clients_per_thread: accepted for compatibility with the original command
      line; it has no effect (each backend schedules a round's clients
      itself, `num_workers` sets how many train at once), and
      `federated_main` warns when the flag is given.
  """
  tfrecords_dir: str
  save_model_dir: str = "./"
  client_learning_rate: float = 0.1
  client_clipnorm: float = 10.0
  server_learning_rate: float = 0.1
  client_epochs_per_round: int = 2
  client_batch_size: int = 16
  clients_per_round: int = 200
  clients_per_thread: int = 50
  client_datasets_random_seed: Optional[int] = None
  total_rounds: int = 5000
  rounds_per_eval: int = 10
  max_elements_per_client: int = 512
  eval_batch_size: int = 512
  restore_model_path: Optional[str] = None
  image_height: int = 224
  image_width: int = 224
  use_fine_grained_labels: bool = False
  binary_label: Optional[str] = None
  epsilon: float = 0.0
  l2_norm_clip: float = 0.1
  target_unclipped_quantile: float = 0.1
  simulated_clients_per_round: Optional[int] = None
  rounds_per_checkpoint: int = 50
  dp_calibration: str = dp.CALIBRATION_ROUNDS
  seed: int = 0
  show_progress: bool = True
  backend: str = constants.BACKEND_INPROCESS
  num_workers: Optional[int] = None
  ray_address: Optional[str] = None
  algorithm: str = ALGORITHM_FEDAVG
  proximal_strength: float = 0.01
  server_optimizer: str = "adam"
  server_momentum: float = optimizers.MOMENTUM
  server_beta_1: float = optimizers.BETA_1
  server_beta_2: float = optimizers.BETA_2
  server_epsilon: float = optimizers.SERVER_EPSILON
  client_optimizer: str = "sgd"
  client_momentum: float = optimizers.MOMENTUM
  precision: str = mixed_precision.FLOAT32
  iid: bool = False
  iid_seed: int = 0

  def __post_init__(self):
    _check(bool(self.tfrecords_dir), "--tfrecords_dir is required")
    _check(bool(self.save_model_dir), "--save_model_dir must not be empty")
    for name in ("client_learning_rate", "client_clipnorm",
                 "server_learning_rate", "l2_norm_clip"):
      validate.check_positive_number(f"--{name}", getattr(self, name))
    for name in ("client_epochs_per_round", "client_batch_size",
                 "clients_per_round", "clients_per_thread", "total_rounds",
                 "rounds_per_eval", "max_elements_per_client",
                 "eval_batch_size", "image_height", "image_width",
                 "rounds_per_checkpoint"):
      validate.check_int(f"--{name}", getattr(self, name))
    _check(self.epsilon >= 0 and math.isfinite(self.epsilon),
           f"--epsilon must be >= 0 (0 = no DP), got {self.epsilon}")
    _check(0 <= self.target_unclipped_quantile < 1,
           "--target_unclipped_quantile must be in [0, 1) (0 = fixed "
           f"clipping), got {self.target_unclipped_quantile}")
    _check(self.simulated_clients_per_round is None
           or self.simulated_clients_per_round >= 0,
           "--simulated_clients_per_round must be >= 1 when given, got "
           f"{self.simulated_clients_per_round}")
    _check(self.dp_calibration in dp.CALIBRATIONS,
           f"--dp_calibration must be one of {dp.CALIBRATIONS}, got "
           f"{self.dp_calibration!r}")
    _check(self.backend in constants.BACKENDS,
           f"--backend must be one of {', '.join(constants.BACKENDS)}, got "
           f"{self.backend!r}")
    if self.num_workers is not None:
      validate.check_int("--num_workers", self.num_workers)
    _check(self.ray_address is None or self.backend == constants.BACKEND_RAY,
           "--ray_address is only used with --backend ray")
    _check(self.algorithm in ALGORITHMS,
           f"--algorithm must be one of {', '.join(ALGORITHMS)}, got "
           f"{self.algorithm!r}")
    _check(self.proximal_strength >= 0 and math.isfinite(
        self.proximal_strength),
           f"--proximal_strength must be >= 0, got {self.proximal_strength}")
    mixed_precision.check_precision(self.precision)
    self.server_optimizer_spec  # Validates the server optimizer flags.
    optimizers.build_client_optimizer(self.client_optimizer, 0.1, 1.0,
                                      self.client_momentum)
    if self.client_datasets_random_seed is not None:
      validate.check_int("--client_datasets_random_seed",
                         self.client_datasets_random_seed, 0)
    validate.check_int("--iid_seed", self.iid_seed, 0)

  @property
  def use_dp(self) -> bool:
    return self.epsilon > 0

  @property
  def server_optimizer_spec(self) -> optimizers.ServerOptimizerSpec:
    return optimizers.ServerOptimizerSpec(
        name=self.server_optimizer, learning_rate=self.server_learning_rate,
        momentum=self.server_momentum, beta_1=self.server_beta_1,
        beta_2=self.server_beta_2, epsilon=self.server_epsilon)


def _build_keras_model(config: FederatedConfig, num_outputs: int
                      ) -> tf.keras.Model:
  return resnet.resnet18(
      input_shape=constants.IMAGE_SHAPE, num_classes=num_outputs,
      pretrained=config.restore_model_path is not None,
      crop_size=(config.image_height, config.image_width), seed=config.seed,
      precision=config.precision)


def keras_model_weights(keras_model: tf.keras.Model
                       ) -> tff.learning.models.ModelWeights:
  """A Keras model's weights as numpy arrays in TFF's `ModelWeights` (its
  trainable and non-trainable weights, each in the model's order)."""
  return tff.learning.models.ModelWeights(
      trainable=[w.numpy() for w in keras_model.trainable_weights],
      non_trainable=[w.numpy() for w in keras_model.non_trainable_weights])


def _loss() -> tf.keras.losses.Loss:
  return tf.keras.losses.BinaryCrossentropy(from_logits=True)


def _run_async(coroutine) -> Any:
  return asyncio.run(coroutine)


def _flatten(structure, prefix: str = "") -> dict[str, Any]:
  """Flattens nested mappings / named tuples / attrs into `{path: leaf}`."""
  out = collections.OrderedDict()
  if isinstance(structure, (dict, collections.OrderedDict)):
    items = structure.items()
  elif hasattr(structure, "_asdict"):
    items = structure._asdict().items()
  elif isinstance(structure, (list, tuple)):
    items = ((str(i), v) for i, v in enumerate(structure))
  else:
    out[prefix] = structure
    return out
  for key, value in items:
    out.update(_flatten(value, f"{prefix}/{key}" if prefix else str(key)))
  return out


def _to_float(value) -> float:
  return float(np.asarray(value))


def _round_columns(output_metrics, train_metric_names: list[str]
                  ) -> tuple["collections.OrderedDict[str, float]",
                             Optional[float]]:
  """Picks metrics.csv columns out of one round's TFF metrics.

  Returns:
    (row, next_clip): the `train_*` and aggregator-measurement columns, and
    the adaptive clip the DP aggregator will use *next* round (TFF reports the
    DP query's metrics after its update), or None without adaptive clipping.
  """
  flat = _flatten(output_metrics)
  row = collections.OrderedDict()
  train = {path.rsplit("/", 1)[-1]: v for path, v in flat.items()
           if "/train/" in f"/{path}/"}
  for name in list(train_metric_names) + ["num_examples", "num_batches"]:
    if name in train:
      row[TRAIN_PREFIX + name] = _to_float(train[name])
  aggregator = {path.rsplit("/", 1)[-1]: v for path, v in flat.items()
                if path.startswith("aggregator/")}
  for key, column in _MEASUREMENT_COLUMNS.items():
    if key in aggregator:
      row[column] = _to_float(aggregator[key])
  next_clip = aggregator.get(_ADAPTIVE_CLIP_MEASUREMENT)
  return row, (None if next_clip is None else _to_float(next_clip))


def _evaluate(keras_model: tf.keras.Model, dataset: tf.data.Dataset
             ) -> dict[str, float]:
  results = keras_model.evaluate(dataset, verbose=0, return_dict=True)
  return {name: float(value) for name, value in results.items()}


def _save_weights_atomic(keras_model: tf.keras.Model, path: str) -> None:
  # OutputWriteError (one line, nothing partial left) on a full disk.
  file_io.save_keras_weights_h5(keras_model, path)


def _client_dataset_options() -> tf.data.Options:
  """tf.data options of a client's dataset: no static graph optimizations and
  no autotuning. A client dataset lives for one round and a few batches, and
  both are paid again for every client: on a 2-core CPU a round of the real
  sample's one-to-five-image clients at 32x32 spent 520 ms per client with
  TF's defaults and 114 ms without them (benchmark/graph_runner.py run with a
  FULL_TRACE step profile: `IteratorGetNextAsOptional` and `MakeIterator`
  dominated). What is computed does not change."""
  options = tf.data.Options()
  options.experimental_optimization.apply_default_optimizations = False
  options.autotune.enabled = False
  return options


def build_learning_process(
    config: FederatedConfig, label_spec: label_sets.LabelSpec,
    train_data: tff.simulation.datasets.FilePerUserClientData, aggregator,
    weighted: bool = True
) -> tuple[tff.learning.templates.LearningProcess,
           tff.learning.templates.LearningProcess]:
  """Builds FedAvg for this configuration.

  Args:
    config: the run's configuration (client/server optimizer, client data
      and model settings are read from it).
    label_spec: the labels (gives the number of model outputs).
    train_data: the training clients.
    aggregator: the model-update aggregation factory (weighted when
      `weighted`, else unweighted, e.g. a DP factory).
    weighted: weight client updates by their number of examples.

  Returns:
    `(process, composed)`: the `tff.learning` FedAvg process over client
    datasets, and the same process composed with a TFF computation that
    builds each client's preprocessed dataset from its client id
    (`composed.next(state, client_ids)`). Building them needs no runtime;
    `factory.open_backend(..., composed, ...)` runs them.
  """
  num_outputs = label_spec.num_outputs
  client_spec = pipeline.ClientSpec(
      num_epochs=config.client_epochs_per_round,
      batch_size=config.client_batch_size,
      max_elements=config.max_elements_per_client)
  train_preprocess = pipeline.create_train_preprocess_fn(client_spec)
  dataset_fn = train_data.serializable_dataset_fn

  @tff.tensorflow.computation(tf.string)
  def client_dataset(client_id):
    return train_preprocess(dataset_fn(client_id)).with_options(
        _client_dataset_options())

  element_spec = client_dataset.type_signature.result.element
  input_spec = tuple(
      tf.TensorSpec([None] + list(t.shape[1:]), t.dtype)
      for t in (element_spec[0], element_spec[1]))

  def model_fn():
    return tff.learning.models.from_keras_model(
        _build_keras_model(config, num_outputs), loss=_loss(),
        input_spec=input_spec, metrics=metrics_lib.make_metrics(num_outputs))

  client_optimizer = optimizers.build_client_optimizer(
      config.client_optimizer, config.client_learning_rate,
      config.client_clipnorm, config.client_momentum)
  server_optimizer = config.server_optimizer_spec.build()
  if config.algorithm == ALGORITHM_FEDPROX:
    prox = (tff.learning.algorithms.build_weighted_fed_prox if weighted else
            tff.learning.algorithms.build_unweighted_fed_prox)
    builder = functools.partial(prox,
                                proximal_strength=config.proximal_strength)
  else:
    builder = (tff.learning.algorithms.build_weighted_fed_avg if weighted
               else tff.learning.algorithms.build_unweighted_fed_avg)
  # The iterator loop runs each client's training steps in a while loop of
  # the client computation's own graph. TFF's default, a `Dataset.reduce`
  # whose reduce function is the whole training step, instantiates that
  # function again for every client dataset: on a 2-core CPU a round of 8
  # one-image clients took 2.4 s with the iterator loop and 6 s with reduce
  # (scripts/bench_fedavg_throughput.py measures whole rounds).
  process = builder(
      model_fn, client_optimizer_fn=client_optimizer,
      server_optimizer_fn=server_optimizer, model_aggregator=aggregator,
      loop_implementation=tff.learning.LoopImplementation.DATASET_ITERATOR)
  composed = tff.simulation.compose_dataset_computation_with_learning_process(
      client_dataset, process)
  return process, composed


def run_federated(config: FederatedConfig) -> dict:
  """Runs (or resumes) federated training and returns the final metrics.

  Args:
    config: the validated configuration.

  Returns:
    `{"val": {name: value}, "test": {name: value}, "best_round": int,
    "rounds_completed": int}` plus `"privacy": {...}` (see
    `benchmark.dp.DpCalibration.to_dict`) with DP; the same is written to
    `save_model_dir/final_metrics.json`. Metric names are
    `metrics.metric_names(num_outputs)` ("loss" first).

  Raises:
    FlairInputError: bad data directory, flags that cannot work together
      (e.g. adaptive clipping with too few clients, see `benchmark.dp`), an
      unreadable --restore_model_path, or a checkpoint in save_model_dir that
      does not match this configuration.
  """
  label_spec = label_sets.load_label_spec(config.tfrecords_dir,
                                    config.use_fine_grained_labels,
                                    config.binary_label)
  num_outputs = label_spec.num_outputs
  client_data = pipeline.load_client_data(config.tfrecords_dir, label_spec)
  if config.iid:
    client_data[constants.TRAIN] = iid.load_iid_partition(
        config.tfrecords_dir, label_spec, config.iid_seed)
    logging.info("FLAIR-IID: training images dealt out at random to the "
                 "training users (--iid_seed %d)", config.iid_seed)
  train_ids = list(client_data[constants.TRAIN].client_ids)
  clients_per_round = config.clients_per_round
  if clients_per_round > len(train_ids):
    logging.warning(
        "--clients_per_round %d is more than the %d training users; using %d",
        clients_per_round, len(train_ids), len(train_ids))
    clients_per_round = len(train_ids)

  calibration = None
  if config.use_dp:
    calibration = dp.calibrate(config.epsilon, len(train_ids),
                               clients_per_round, config.total_rounds,
                               config.simulated_clients_per_round,
                               config.dp_calibration)
    logging.info("DP: %s", calibration.guarantee)
    aggregator = dp.build_aggregator(calibration.noise_multiplier,
                                     clients_per_round, config.l2_norm_clip,
                                     config.target_unclipped_quantile)
  else:
    aggregator = tff.learning.add_debug_measurements(
        tff.aggregators.MeanFactory())

  os.makedirs(config.save_model_dir, exist_ok=True)
  _, composed = build_learning_process(config, label_spec,
                                       client_data[constants.TRAIN],
                                       aggregator,
                                       weighted=calibration is None)
  with factory.open_backend(
      config.backend, composed, clients_per_round,
      worker_log_path=os.path.join(config.save_model_dir, WORKER_LOG_FILE),
      num_workers=config.num_workers, ray_address=config.ray_address
  ) as backend:
    return _train(config, label_spec, client_data, train_ids,
                  clients_per_round, calibration, backend)


def _run_round(backend: base.RoundBackend, cohort: list[str],
               tfrecords_dir: str, label_spec: label_sets.LabelSpec):
  """One round; a client whose data cannot be read becomes the one-line-per-
  file `FlairInputError` of `triage.training_data_error` (every user file that
  fails in TensorFlow is named; rerunning resumes from the last checkpoint
  once they are fixed)."""
  try:
    return backend.run_round(cohort)
  except graph_runner.ClientDataError as e:
    raise triage.training_data_error(tfrecords_dir, label_spec, e) from None


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _remove_unfinished_checkpoints(checkpoint_dir: str) -> None:
  """Removes what a save cut short left in `checkpoint_dir`: TFF writes a
  checkpoint to `<prefix><round>_temp<N>` and renames it when complete, so a
  process killed while saving (kill -9, power loss) leaves that directory,
  which no load ever reads. Each is logged."""
  try:
    names = os.listdir(checkpoint_dir)
  except FileNotFoundError:
    return
  for name in sorted(names):
    if name.startswith(CHECKPOINT_PREFIX) and "_temp" in name:
      path = os.path.join(checkpoint_dir, name)
      logging.warning("Removing %s, a checkpoint whose saving was cut short "
                      "(the process was stopped while writing it).", path)
      shutil.rmtree(path, ignore_errors=True)


def load_latest_checkpoint(state_manager: tff.program.FileProgramStateManager,
                           structure: Any, checkpoint_dir: str
                          ) -> tuple[Optional[Any], int]:
  """The latest checkpoint that can be read, for resuming a run.

  Saving is atomic (TFF renames a complete temporary directory), so a run
  killed while saving leaves its previous checkpoint intact; the unfinished
  temporary directory is removed here. A latest checkpoint that cannot be
  read (a file cut short or damaged after it was written: a disk or copy
  error) is logged, removed (so that the round can be saved again) and the
  previous one is used; `CHECKPOINTS_KEPT` keeps one spare for this.

  Args:
    state_manager: the run's program-state manager over `checkpoint_dir`.
    structure: the program state's structure (the initial state).
    checkpoint_dir: the directory the manager writes to.

  Returns:
    `(program_state, round)`, or `(None, 0)` when there is no checkpoint.

  Raises:
    FlairInputError: there are checkpoints but none can be read with this
      structure (another configuration's, or all damaged); one line naming
      the directory and the first error.
  """
  _remove_unfinished_checkpoints(checkpoint_dir)
  versions = _run_async(state_manager.get_versions()) or []
  unreadable = []
  for version in sorted(versions, reverse=True):
    path = os.path.join(checkpoint_dir, f"{CHECKPOINT_PREFIX}{version}")
    try:
      loaded = _run_async(state_manager.load(version, structure))
    except Exception as e:  # pylint: disable=broad-except
      # Damaged files, or a structure, shape or dtype mismatch.
      unreadable.append((path, e))
      continue
    for bad_path, error in unreadable:
      logging.warning(
          "Checkpoint %s cannot be read (%s); removed it and resuming from "
          "the previous checkpoint, %s.", bad_path, _first_line(error), path)
      shutil.rmtree(bad_path, ignore_errors=True)
    return loaded, version
  if unreadable:
    path, error = unreadable[0]
    raise FlairInputError(
        f"no checkpoint in {checkpoint_dir} can be read with this "
        f"configuration (labels, model or DP settings differ, or the files "
        f"are damaged); use another --save_model_dir or delete "
        f"{checkpoint_dir} ({os.path.basename(path)}: {_first_line(error)})"
    ) from error
  return None, 0


def _initial_keras_model(config: FederatedConfig,
                         num_outputs: int) -> tf.keras.Model:
  keras_model = _build_keras_model(config, num_outputs)
  if config.restore_model_path is not None:
    from benchmark.model import restore  # pylint: disable=g-import-not-at-top
    report = restore.restore_weights_by_name(keras_model,
                                             config.restore_model_path)
    logging.info("Restored %d layers from %s; skipped %s", len(report.loaded),
                 config.restore_model_path, report.skipped)
  return keras_model


def _train(config: FederatedConfig, label_spec: label_sets.LabelSpec,
           client_data: dict, train_ids: list[str], clients_per_round: int,
           calibration: Optional[dp.DpCalibration],
           backend: base.RoundBackend) -> dict:
  """The round loop, the same for every backend.

  The learning-process state stays in the backend between rounds; only each
  round's metrics come back here, the model weights on evaluation rounds,
  and the whole state on checkpoint rounds.
  """
  num_outputs = label_spec.num_outputs
  names = metrics_lib.metric_names(num_outputs)

  # --- Initial or resumed program state. ---
  eval_model = _initial_keras_model(config, num_outputs)
  eval_model.compile(loss=_loss(),
                     metrics=metrics_lib.make_metrics(num_outputs))
  initial_weights = keras_model_weights(eval_model)
  state = backend.initialize(initial_weights)

  sampling_seed = config.client_datasets_random_seed
  if sampling_seed is None:
    sampling_seed = int(np.random.SeedSequence().generate_state(1)[0] >> 1)
  program_state = collections.OrderedDict(
      state=state, round=0, best_val_loss=np.inf, best_round=-1,
      sampling_seed=sampling_seed, dp_clip=config.l2_norm_clip)
  state_manager = tff.program.FileProgramStateManager(
      os.path.join(config.save_model_dir, CHECKPOINT_DIR),
      prefix=CHECKPOINT_PREFIX, keep_total=CHECKPOINTS_KEPT, keep_first=False)
  loaded, version = load_latest_checkpoint(
      state_manager, program_state,
      os.path.join(config.save_model_dir, CHECKPOINT_DIR))
  if loaded is not None:
    program_state = loaded
    logging.info("Resuming after round %d (checkpoint in %s)", version,
                 os.path.join(config.save_model_dir, CHECKPOINT_DIR))
  completed = int(program_state["round"])
  best_val_loss = float(program_state["best_val_loss"])
  best_round = int(program_state["best_round"])
  sampling_seed = int(program_state["sampling_seed"])
  clip = float(program_state["dp_clip"])  # The clip of the next round.
  # From here on the state lives in the backend.
  backend.set_state(program_state.pop("state"))
  del state, initial_weights, loaded  # Python's copies of the initial model.
  if calibration is not None:
    sum_noise_multiplier = dp.sum_noise_multiplier(
        calibration.noise_multiplier, clients_per_round,
        adaptive=config.target_unclipped_quantile > 0)
  sample_clients = tff.simulation.build_uniform_sampling_fn(
      train_ids, replace=False, random_seed=sampling_seed)

  # --- Outputs. ---
  best_path = os.path.join(
      config.save_model_dir,
      constants.BEST_WEIGHTS_FILE_PATTERN.format(trainer="federated",
                                                 num_outputs=num_outputs))
  csv_path = os.path.join(config.save_model_dir, constants.METRICS_CSV_FILE)
  tensorboard_dir = os.path.join(config.save_model_dir,
                                 constants.TENSORBOARD_DIR)
  with file_io.tff_output(csv_path):
    csv_manager = tff.program.CSVFileReleaseManager(csv_path,
                                                    key_fieldname=ROUND_KEY)
  tensorboard_manager = tff.program.TensorBoardReleaseManager(tensorboard_dir)
  val_dataset = pipeline.eval_dataset(client_data[constants.VAL],
                                  config.eval_batch_size)
  val_columns = [VAL_PREFIX + n for n in names]
  all_columns = None  # Known after the first training round.
  pending_rows = []

  def release(round_num: int, row: dict) -> None:
    nonlocal all_columns
    pending_rows.append((round_num, row))
    if all_columns is None:
      return
    for key, values in pending_rows:
      full = {c: values.get(c, "") for c in all_columns}
      with file_io.tff_output(csv_path):
        _run_async(csv_manager.release(full, key))
      with file_io.summary_output(tensorboard_dir):
        _run_async(tensorboard_manager.release(
            {c.replace("_", "/", 1): v for c, v in values.items()}, key))
    pending_rows.clear()

  def evaluate_and_maybe_save(round_num: int, row: dict) -> None:
    nonlocal best_val_loss, best_round
    backend.get_model_weights().assign_weights_to(eval_model)
    start = time.monotonic()
    results = _evaluate(eval_model, val_dataset)
    row[EVAL_TIME_KEY] = time.monotonic() - start
    for name in names:
      row[VAL_PREFIX + name] = results[name]
    if results["loss"] < best_val_loss:
      best_val_loss, best_round = results["loss"], round_num
      _save_weights_atomic(eval_model, best_path)
    logging.info("Round %d: val %s", round_num,
                 {k: round(v, 4) for k, v in results.items()})

  def is_eval_round(round_num: int) -> bool:
    return (round_num % config.rounds_per_eval == 0
            or round_num == config.total_rounds)

  if completed == 0:
    row = collections.OrderedDict()
    evaluate_and_maybe_save(0, row)
    release(0, row)

  key_metric = VAL_PREFIX + names[1]
  progress = tqdm.tqdm(total=config.total_rounds, initial=completed,
                       desc="rounds", unit="round",
                       disable=not config.show_progress, dynamic_ncols=True)
  last_val = None
  try:
    for round_num in range(completed + 1, config.total_rounds + 1):
      cohort = sample_clients(round_num, clients_per_round)
      start = time.monotonic()
      round_metrics = _run_round(backend, cohort, config.tfrecords_dir,
                                 label_spec)
      elapsed = time.monotonic() - start
      row = collections.OrderedDict([(ROUND_TIME_KEY, elapsed)])
      measured, next_clip = _round_columns(round_metrics, names)
      row.update(measured)
      if calibration is not None:
        row[DP_CLIP_KEY] = clip
        row[DP_NOISE_STDDEV_KEY] = sum_noise_multiplier * clip
        if next_clip is not None:
          clip = next_clip
      if all_columns is None:
        all_columns = list(row) + [EVAL_TIME_KEY] + val_columns
      if is_eval_round(round_num):
        evaluate_and_maybe_save(round_num, row)
        last_val = row[key_metric]
      release(round_num, row)
      if (round_num % config.rounds_per_checkpoint == 0
          or round_num == config.total_rounds):
        with file_io.tff_output(os.path.join(
            config.save_model_dir, CHECKPOINT_DIR,
            f"{CHECKPOINT_PREFIX}{round_num}")):
          _run_async(state_manager.save(
              collections.OrderedDict(
                  state=backend.get_state(), round=round_num,
                  best_val_loss=best_val_loss, best_round=best_round,
                  sampling_seed=sampling_seed, dp_clip=clip),
              round_num))
      postfix = {"loss": f"{row.get(TRAIN_PREFIX + 'loss', float('nan')):.4f}"}
      if last_val is not None:
        postfix[key_metric] = f"{last_val:.4f}"
      progress.set_postfix(postfix)
      progress.update(1)
  finally:
    progress.close()

  # --- Final evaluation of the best weights. ---
  if os.path.exists(best_path):
    eval_model.load_weights(best_path)
  else:  # Only when resumed after the end with the weights file removed.
    backend.get_model_weights().assign_weights_to(eval_model)
  final = {
      constants.VAL: _evaluate(eval_model, val_dataset),
      constants.TEST: _evaluate(
          eval_model, pipeline.eval_dataset(client_data[constants.TEST],
                                        config.eval_batch_size)),
      "best_round": best_round,
      "rounds_completed": config.total_rounds,
  }
  if calibration is not None:
    final["privacy"] = calibration.to_dict()
    logging.info("Privacy guarantee: %s", calibration.guarantee)
  file_io.write_json_atomic(
      os.path.join(config.save_model_dir, constants.FINAL_METRICS_FILE), final)
  logging.info("Best round %d; final val %s; test %s", best_round,
               final[constants.VAL], final[constants.TEST])
  return final
