"""A federated run from its configuration: FedAvg of ResNet-18 on FLAIR with
TFF, optionally with user-level central DP, to its final metrics.

`run_federated(config, label_spec)` wires the pieces and runs
`training.loop.run_rounds` (docs/original_benchmark.md, "A FedAvg round"):

* the clients: one per training user file (`data.pipeline`), or with
  `--iid` the same users holding FLAIR-IID's dealing of the training images,
  or pfl-research's made-up users (`data.iid`); val and test are the
  users' own data;
* the process: FedAvg (or FedProx) with TFF's builders
  (`training.fedavg`), example-weighted or uniform, or with DP the
  unweighted mean with Gaussian or DP-FTRL tree noise (`training.dp`);
* the backend that runs rounds (`backends.factory.open_backend`:
  `inprocess`, `tff_worker`, `ray`), stopped however the run ends;
* the cohort of each round (`training.cohorts`), the evaluation of the
  global model on val (`training.evaluation`), the checkpoints
  (`training.checkpoints`) and the outputs (`training.outputs`: metrics.csv,
  tensorboard/, the best weights, log lines, a progress bar);
* at the end, the best weights evaluated on val and test:
  `final_metrics.json`.

Rerunning the same configuration resumes after the latest checkpoint.
"""

import os
from typing import Any, Optional

from absl import logging
import tensorflow as tf
import tensorflow_federated as tff

from benchmark.backends import base
from benchmark.backends import factory
from benchmark.core import constants
from benchmark.core import file_io
from benchmark.data import iid
from benchmark.data import label_sets
from benchmark.data import pipeline
from benchmark.model import metrics as metrics_lib
from benchmark.training import checkpoints
from benchmark.training import cohorts
from benchmark.training import config as config_lib
from benchmark.training import dp
from benchmark.training import evaluation
from benchmark.training import fedavg
from benchmark.training import loop
from benchmark.training import models
from benchmark.training import outputs
from benchmark.training import run_dir
from benchmark.training import seeds

TRAINER_NAME = "federated"


def _client_data(config: config_lib.FederatedConfig,
                 label_spec: label_sets.LabelSpec
                ) -> dict[str, tff.simulation.datasets.ClientData]:
  """The three partitions' clients; FLAIR-IID's training clients with
  `--iid` (`--iid_definition`: `real_users` or `pfl`)."""
  tfrecords_dir = config.data.tfrecords_dir
  client_data = pipeline.load_client_data(tfrecords_dir, label_spec)
  cohort = config.cohort
  if cohort.iid and cohort.iid_definition == iid.PFL:
    client_data[constants.TRAIN] = iid.load_pfl_iid_partition(
        tfrecords_dir, label_spec, cohort.iid_user_size)
    logging.info("FLAIR-IID (pfl): made-up users drawing %d training images "
                 "each at random every time they are sampled",
                 cohort.iid_user_size)
  elif cohort.iid:
    client_data[constants.TRAIN] = iid.load_iid_partition(
        tfrecords_dir, label_spec, cohort.iid_seed)
    logging.info("FLAIR-IID: training images dealt out at random to the "
                 "training users (--iid_seed %d)", cohort.iid_seed)
  return client_data


def _cohort_size(config: config_lib.FederatedConfig,
                 num_train_clients: int) -> int:
  """`--clients_per_round`, capped (with a warning) at the training users."""
  size = config.cohort.clients_per_round
  if size > num_train_clients:
    logging.warning(
        "--clients_per_round %d is more than the %d training users; using %d",
        size, num_train_clients, num_train_clients)
  return min(size, num_train_clients)


def check_settings(config: config_lib.FederatedConfig,
                   num_train_clients: int) -> None:
  """Refuses the settings that cannot work with `num_train_clients`
  training users, before anything is written (`cli.trainers.start_run`
  calls it before it claims the run directory; `run_federated` meets the
  same refusals when called alone): DP that cannot be calibrated, or
  adaptive clipping whose noised clipped count needs a larger cohort
  (`fedavg.build_aggregator`).

  Raises:
    FlairInputError: naming the flags to change.
  """
  _aggregator(config, num_train_clients,
              min(config.cohort.clients_per_round, num_train_clients))


def _aggregator(config: config_lib.FederatedConfig, num_train_clients: int,
                cohort_size: int):
  """`fedavg.build_aggregator` of this configuration."""
  return fedavg.build_aggregator(
      config.dp, num_train_clients, cohort_size, config.run.total_rounds,
      weighted=fedavg.is_weighted(config), seed=config.model.seed)


def run_federated(config: config_lib.FederatedConfig,
                  label_spec: label_sets.LabelSpec) -> dict[str, Any]:
  """Runs (or resumes) federated training and returns the final metrics.

  Args:
    config: the validated configuration.
    label_spec: the labels of `config.data` (`label_sets.load_label_spec`).

  Returns:
    `{"val": {name: value}, "test": {name: value}, "best_round": int,
    "rounds_completed": int}` plus `"privacy": {...}`
    (`dp.DpCalibration.to_dict`) with DP; the same is written to
    `final_metrics.json`. Names are `metrics.metric_names(num_outputs)`.

  Raises:
    FlairInputError: a bad data directory, settings that cannot work
      together (e.g. adaptive clipping with too few clients), an unreadable
      --restore_model_path, or checkpoints of another configuration.
    errors.ClientDataError: a client's data could not be read.
    BackendDiedError, OutputWriteError: see `backends`, `core.file_io`.
  """
  seeds.use_deterministic_ops(config.model.deterministic_ops)
  seeds.clear_global_seed()
  client_data = _client_data(config, label_spec)
  train_ids = list(client_data[constants.TRAIN].client_ids)
  cohort_size = _cohort_size(config, len(train_ids))
  aggregator, calibration = _aggregator(config, len(train_ids), cohort_size)
  process = fedavg.build_learning_process(
      config, label_spec, client_data[constants.TRAIN], aggregator,
      weighted=fedavg.is_weighted(config))
  with open_run_backend(config, process, cohort_size) as backend:
    return _train(config, label_spec, client_data, train_ids, cohort_size,
                  calibration, backend)


def open_run_backend(config, process, cohort_size: int):
  """`factory.open_backend` of `config.run`'s backend for `process` and
  cohorts of `cohort_size` clients, its worker log in the run directory
  (created if missing). `config`: a federated run's config (e.g.
  `FederatedConfig`, or active learning's)."""
  save_model_dir = config.output.save_model_dir
  os.makedirs(save_model_dir, exist_ok=True)
  return factory.open_backend(
      config.run.backend, process, cohort_size,
      worker_log_path=os.path.join(save_model_dir,
                                   constants.FEDERATED_WORKER_LOG_FILE),
      num_workers=config.run.num_workers,
      ray_address=config.run.ray_address)


def _round_columns(config: config_lib.FederatedConfig, names: list[str],
                   cohort_size: int,
                   calibration: Optional[dp.DpCalibration]
                  ) -> outputs.RoundColumns:
  """metrics.csv's columns; with DP-FTRL `dp_noise_stddev` is the tree
  node's noise (docs/dp.md)."""
  noise = None
  if calibration is not None and calibration.mechanism == dp.MECHANISM_TREE:
    noise = calibration.noise_multiplier
  elif calibration is not None:
    noise = dp.sum_noise_multiplier(calibration.noise_multiplier,
                                    cohort_size, adaptive=config.dp.adaptive)
  return outputs.RoundColumns(names, config.dp.l2_norm_clip, noise)


def _sampler(config: config_lib.FederatedConfig) -> type:
  """The cohorts' sampler: DP-FTRL's passes over the users
  (`cohorts.CyclicSampler`) with `--dp_mechanism tree`, else uniform."""
  if config.dp.enabled and config.dp.dp_mechanism == dp.MECHANISM_TREE:
    return cohorts.CyclicSampler
  return cohorts.ClientSampler


def _train(config: config_lib.FederatedConfig,
           label_spec: label_sets.LabelSpec, client_data: dict,
           train_ids: list[str], cohort_size: int,
           calibration: Optional[dp.DpCalibration],
           backend: base.RoundBackend) -> dict[str, Any]:
  """The rounds (`loop.run_rounds` with this run's parameters), then the
  final evaluation."""
  num_outputs = label_spec.num_outputs
  names = metrics_lib.metric_names(num_outputs)
  save_model_dir = config.output.save_model_dir
  eval_model = models.build_initial_model(config.model, num_outputs)
  eval_model.compile(loss=models.loss(),
                     metrics=metrics_lib.make_metrics(num_outputs))
  initial_state = backend.initialize(models.model_weights(eval_model))
  val_dataset = pipeline.eval_dataset(client_data[constants.VAL],
                                      config.data.eval_batch_size)
  evaluation_fn = evaluation.KerasEvaluation(eval_model, val_dataset,
                                             outputs.VAL_PREFIX)
  best = outputs.BestWeightsManager(
      run_dir.best_weights_path(save_model_dir, TRAINER_NAME, num_outputs,
                                config.model.model_layout),
      eval_model, evaluation_fn.last_weights)
  val_columns = [outputs.VAL_PREFIX + n for n in names]
  with outputs.ProgressManager(
      config.run.total_rounds, outputs.VAL_PREFIX + names[1],
      show=config.run.show_progress) as progress:
    loop.run_rounds(
        backend, initial_state,
        _sampler(config)(train_ids, cohort_size, config.model.seed,
                         config.cohort.client_datasets_random_seed),
        config.run.total_rounds,
        checkpoints.CheckpointManager(save_model_dir),
        metrics_managers=[
            outputs.CsvRoundsManager(
                os.path.join(save_model_dir, constants.METRICS_CSV_FILE),
                [loop.EVAL_TIME_KEY] + val_columns),
            outputs.TensorBoardManager(
                os.path.join(save_model_dir, constants.TENSORBOARD_DIR)),
            best, outputs.LoggingManager(outputs.VAL_PREFIX + names[1]),
            progress],
        evaluation_fn=evaluation_fn,
        rounds_per_evaluation=config.run.rounds_per_eval,
        rounds_per_saving_program_state=config.run.rounds_per_checkpoint,
        round_metrics_fn=_round_columns(config, names, cohort_size,
                                        calibration))
  return _final_metrics(config, client_data, eval_model, val_dataset, best,
                        calibration, backend)


def _final_metrics(config: config_lib.FederatedConfig, client_data: dict,
                   eval_model: tf.keras.Model, val_dataset: tf.data.Dataset,
                   best: outputs.BestWeightsManager,
                   calibration: Optional[dp.DpCalibration],
                   backend: base.RoundBackend) -> dict[str, Any]:
  """The best weights on val and test, written to final_metrics.json."""
  if os.path.exists(best.path):
    eval_model.load_weights(best.path)
  else:  # Only when resumed after the end with the weights file removed.
    backend.get_model_weights().assign_weights_to(eval_model)
  test_dataset = pipeline.eval_dataset(client_data[constants.TEST],
                                       config.data.eval_batch_size)
  final = {
      constants.VAL: evaluation.evaluate(eval_model, val_dataset),
      constants.TEST: evaluation.evaluate(eval_model, test_dataset),
      "best_round": best.best_round,
      "rounds_completed": config.run.total_rounds,
  }
  if calibration is not None:
    final["privacy"] = calibration.to_dict()
  file_io.write_json_atomic(os.path.join(config.output.save_model_dir,
                                         constants.FINAL_METRICS_FILE), final)
  logging.info("Evaluated the best weights (round %d) on val and test.",
               best.best_round)
  return final
