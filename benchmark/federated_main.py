"""Federated training (FedAvg with TFF, optionally user-level DP) of ResNet-18
on FLAIR.

    python -m benchmark.federated_main --tfrecords_dir T [flags]

Flags and defaults are those of the original benchmark
(docs/original_benchmark.md, "Command lines"), plus
`--rounds_per_checkpoint`, `--dp_calibration`, `--seed`, `--backend`,
`--num_workers`, `--ray_address`, `--algorithm`, `--proximal_strength`,
`--iid` and `--iid_seed` (FLAIR-IID), the optimizer choices
(`--server_optimizer` and its
hyperparameters, `--client_optimizer`, `--client_momentum`),
`--skip_bad_records` and `--overwrite`. The run itself is
`benchmark.federated.run_federated`; this module
reads the flags, rejects bad input with a one-line error (exit status 1),
checks every user file (`data.check_tfrecords`: all bad files listed at once,
or skipped with `--skip_bad_records`), claims the save directory
(`io_utils.claim_save_dir`: `run.json` records the
run; another run's directory is refused unless `--overwrite`), writes the
flag values to `<save_model_dir>/flags.json` and starts training.
Rerunning the same command resumes after the latest checkpoint. SIGTERM and
Ctrl-C stop the run cleanly (whatever the backend started is stopped too).
"""

import dataclasses
import json
import os

from absl import app
from absl import flags
from absl import logging

from benchmark import backends
from benchmark import constants
from benchmark import data
from benchmark import dp
from benchmark import errors
from benchmark import federated
from benchmark import io_utils
from benchmark import model as model_lib
from benchmark import optimizers

_TFRECORDS_DIR = flags.DEFINE_string(
    "tfrecords_dir", None,
    "Directory of per-user TFRecords written by prepare_tfrecords.py "
    "(train/, val/, test/ and label_index.json).")
_CLIENT_LEARNING_RATE = flags.DEFINE_float(
    "client_learning_rate", 0.1, "Learning rate of the clients' SGD.")
_CLIENT_CLIPNORM = flags.DEFINE_float(
    "client_clipnorm", 10.0,
    "Clients clip each weight's gradient to this L2 norm before the SGD step "
    "(as Keras SGD(clipnorm=...)).")
_SERVER_LEARNING_RATE = flags.DEFINE_float(
    "server_learning_rate", 0.1,
    "Learning rate of the server optimizer (--server_optimizer, default Adam "
    "with epsilon 0.01), applied to the averaged client model delta.")
_CLIENT_EPOCHS_PER_ROUND = flags.DEFINE_integer(
    "client_epochs_per_round", 2,
    "Passes each sampled client makes over its (truncated) data per round.")
_CLIENT_BATCH_SIZE = flags.DEFINE_integer(
    "client_batch_size", 16, "Batch size of local client training.")
_CLIENTS_PER_ROUND = flags.DEFINE_integer(
    "clients_per_round", 200,
    "Training users sampled uniformly without replacement each round (capped "
    "at the number of training users).")
_CLIENTS_PER_THREAD = flags.DEFINE_integer(
    "clients_per_thread", 50,
    "Accepted for compatibility with the original command line; has no "
    "effect (a warning says so when it is given): each --backend schedules a "
    "round's clients itself; --num_workers sets how many train at once.")
_CLIENT_DATASETS_RANDOM_SEED = flags.DEFINE_integer(
    "client_datasets_random_seed", None,
    "Seed of the per-round client sampling (the cohort of round r depends "
    "only on the seed and r). Unset: a random seed, kept in the checkpoint "
    "so that a resumed run continues the same sequence.")
_TOTAL_ROUNDS = flags.DEFINE_integer(
    "total_rounds", 5000, "Number of federated rounds.")
_ROUNDS_PER_EVAL = flags.DEFINE_integer(
    "rounds_per_eval", 10,
    "Evaluate the global model on val every this many rounds (and after the "
    "last); the weights are saved when val loss improves.")
_MAX_ELEMENTS_PER_CLIENT = flags.DEFINE_integer(
    "max_elements_per_client", 512,
    "Each client trains on at most this many of its images (a random subset "
    "per round).")
_EVAL_BATCH_SIZE = flags.DEFINE_integer(
    "eval_batch_size", 512, "Batch size in images for val/test evaluation.")
_RESTORE_MODEL_PATH = flags.DEFINE_string(
    "restore_model_path", None,
    "Optional Keras weights .h5 (e.g. the ImageNet resnet18.h5): builds the "
    "BatchNorm model, loads layers by name (skipping the classifier when its "
    "size differs) and uses them as the initial global model.")
_SAVE_MODEL_DIR = flags.DEFINE_string(
    "save_model_dir", None,
    "Directory for the best weights, metrics.csv, tensorboard/, checkpoints/,"
    " final_metrics.json, flags.json and run.json; rerun with the same "
    "directory to resume. Default: a new directory runs/federated-<UTC "
    "time>.")
_SKIP_BAD_RECORDS = flags.DEFINE_boolean(
    "skip_bad_records", False,
    "Train without the records of --tfrecords_dir that cannot be used "
    "(unreadable, cut short, missing features, label indices outside the "
    "label index) instead of refusing to start; they are counted in the log "
    "and in final_metrics.json.")
_OVERWRITE = flags.DEFINE_boolean(
    "overwrite", False,
    "Delete the outputs of an earlier run in --save_model_dir (other files "
    "are kept) and start afresh, instead of refusing a directory that holds "
    "a different run.")
_IMAGE_HEIGHT = flags.DEFINE_integer(
    "image_height", 224, "Height in pixels of the crop fed to the model.")
_IMAGE_WIDTH = flags.DEFINE_integer(
    "image_width", 224, "Width in pixels of the crop fed to the model.")
_USE_FINE_GRAINED_LABELS = flags.DEFINE_boolean(
    "use_fine_grained_labels", False,
    "Train on the fine-grained labels instead of the 17 coarse labels.")
_BINARY_LABEL = flags.DEFINE_string(
    "binary_label", None,
    "Train a binary classifier (one output) for this single label name.")
_EPSILON = flags.DEFINE_float(
    "epsilon", 0.0,
    "User-level DP epsilon over all --total_rounds rounds (delta = "
    "1/n^1.1, n = training users); 0 disables DP.")
_L2_NORM_CLIP = flags.DEFINE_float(
    "l2_norm_clip", 0.1,
    "With DP: the L2 clip of each client's model update (fixed clipping), or "
    "its initial value (adaptive clipping).")
_TARGET_UNCLIPPED_QUANTILE = flags.DEFINE_float(
    "target_unclipped_quantile", 0.1,
    "With DP: 0 for fixed clipping at --l2_norm_clip; otherwise the clip "
    "adapts toward this quantile of the client update norms.")
_SIMULATED_CLIENTS_PER_ROUND = flags.DEFINE_integer(
    "simulated_clients_per_round", None,
    "With DP: calibrate the noise for this larger cohort and scale it by "
    "clients_per_round / simulated_clients_per_round, simulating the noise "
    "level of a large cohort with fewer clients trained.")
_ROUNDS_PER_CHECKPOINT = flags.DEFINE_integer(
    "rounds_per_checkpoint", 50,
    "Save the program state (model, optimizer and DP state, round) every "
    "this many rounds and after the last round.")
_DP_CALIBRATION = flags.DEFINE_enum(
    "dp_calibration", dp.CALIBRATION_ROUNDS, list(dp.CALIBRATIONS),
    "With DP: 'rounds' calibrates the noise for exactly --total_rounds rounds "
    "at sampling rate cohort/n; 'original' reproduces the original "
    "benchmark, which accounted for total_rounds*n/cohort rounds (about 10x "
    "the noise at FLAIR's settings).")
_SEED = flags.DEFINE_integer(
    "seed", 0, "Seed of the initial model weights and of its crop/flip ops.")
_BACKEND = flags.DEFINE_enum(
    "backend", backends.BACKEND_INPROCESS, list(backends.BACKENDS),
    "Where rounds run. 'inprocess': TFF's round compiled to TensorFlow graphs "
    "and run in this process, clients on every visible GPU (else the CPU); "
    "'tff_worker': TFF 0.87's own worker process (CPU only, memory grows with "
    "the cohort); 'ray': Ray actors, local or on a cluster (--ray_address).")
_NUM_WORKERS = flags.DEFINE_integer(
    "num_workers", None,
    "Clients trained at once: with 'inprocess', parallel client trainers "
    "(default one per GPU, or 1 using all CPU cores); with 'ray', actors "
    "(default one per GPU of the cluster, else one per CPU).")
_ALGORITHM = flags.DEFINE_enum(
    "algorithm", federated.ALGORITHM_FEDAVG, list(federated.ALGORITHMS),
    "fedavg, or fedprox: clients add proximal_strength/2 * ||w - w_global||^2 "
    "to their loss (Li et al. 2020).")
_PROXIMAL_STRENGTH = flags.DEFINE_float(
    "proximal_strength", 0.01, "With --algorithm fedprox: mu, >= 0.")
_SERVER_OPTIMIZER = flags.DEFINE_enum(
    "server_optimizer", "adam", list(optimizers.SERVER_OPTIMIZERS),
    "Server optimizer applied to the averaged client model delta "
    "(tff.learning.optimizers; Reddi et al. 2021), at --server_learning_rate.")
_SERVER_MOMENTUM = flags.DEFINE_float(
    "server_momentum", optimizers.MOMENTUM,
    "With --server_optimizer sgdm: the momentum.")
_SERVER_BETA_1 = flags.DEFINE_float(
    "server_beta_1", optimizers.BETA_1,
    "With --server_optimizer adam or yogi: beta_1.")
_SERVER_BETA_2 = flags.DEFINE_float(
    "server_beta_2", optimizers.BETA_2,
    "With --server_optimizer adam or yogi: beta_2.")
_SERVER_EPSILON = flags.DEFINE_float(
    "server_epsilon", optimizers.SERVER_EPSILON,
    "With --server_optimizer adagrad, adam or yogi: epsilon (the reference "
    "Adam's 0.01).")
_CLIENT_OPTIMIZER = flags.DEFINE_enum(
    "client_optimizer", "sgd", list(optimizers.CLIENT_OPTIMIZERS),
    "Clients' optimizer, at --client_learning_rate with per-weight gradient "
    "clipping at --client_clipnorm.")
_CLIENT_MOMENTUM = flags.DEFINE_float(
    "client_momentum", optimizers.MOMENTUM,
    "With --client_optimizer sgdm: the momentum.")
_PRECISION = flags.DEFINE_enum(
    "precision", model_lib.FLOAT32, list(model_lib.PRECISIONS),
    "float32, or bfloat16 for Keras mixed precision of the clients' and the "
    "evaluation model (bfloat16 convolutions and activations; float32 "
    "weights, normalisation, logits, loss and metrics).")
_RAY_ADDRESS = flags.DEFINE_string(
    "ray_address", None,
    "With --backend ray: the address of a running Ray cluster (as `ray start "
    "--head` prints it); unset starts an embedded local Ray that is stopped "
    "with the run.")
_IID = flags.DEFINE_boolean(
    "iid", False,
    "Train on FLAIR-IID: the training images dealt out uniformly at random "
    "to the training users, each user keeping its number of images "
    "(benchmark.iid); val and test are unchanged.")
_IID_SEED = flags.DEFINE_integer(
    "iid_seed", 0,
    "With --iid: the seed of the dealing (the same seed gives the same "
    "clients, also on resume).")
flags.mark_flag_as_required("tfrecords_dir")

_ALL_FLAGS = (
    _TFRECORDS_DIR, _CLIENT_LEARNING_RATE, _CLIENT_CLIPNORM,
    _SERVER_LEARNING_RATE, _CLIENT_EPOCHS_PER_ROUND, _CLIENT_BATCH_SIZE,
    _CLIENTS_PER_ROUND, _CLIENTS_PER_THREAD, _CLIENT_DATASETS_RANDOM_SEED,
    _TOTAL_ROUNDS, _ROUNDS_PER_EVAL, _MAX_ELEMENTS_PER_CLIENT,
    _EVAL_BATCH_SIZE, _RESTORE_MODEL_PATH, _SAVE_MODEL_DIR, _IMAGE_HEIGHT,
    _IMAGE_WIDTH, _USE_FINE_GRAINED_LABELS, _BINARY_LABEL, _EPSILON,
    _L2_NORM_CLIP, _TARGET_UNCLIPPED_QUANTILE, _SIMULATED_CLIENTS_PER_ROUND,
    _ROUNDS_PER_CHECKPOINT, _DP_CALIBRATION, _SEED, _BACKEND, _NUM_WORKERS,
    _RAY_ADDRESS, _ALGORITHM, _PROXIMAL_STRENGTH, _SERVER_OPTIMIZER,
    _SERVER_MOMENTUM, _SERVER_BETA_1, _SERVER_BETA_2, _SERVER_EPSILON,
    _CLIENT_OPTIMIZER, _CLIENT_MOMENTUM, _PRECISION, _IID, _IID_SEED)


# The flags that change a run's results (io_utils.claim_save_dir); with DP
# also _DP_RESULT_FLAGS. --total_rounds is one only with DP (the noise is
# calibrated for it); without DP more rounds continue the same run.
_RESULT_FLAGS = (
    _CLIENT_LEARNING_RATE, _CLIENT_CLIPNORM, _SERVER_LEARNING_RATE,
    _CLIENT_EPOCHS_PER_ROUND, _CLIENT_BATCH_SIZE, _CLIENTS_PER_ROUND,
    _CLIENT_DATASETS_RANDOM_SEED, _ROUNDS_PER_EVAL, _MAX_ELEMENTS_PER_CLIENT,
    _RESTORE_MODEL_PATH, _IMAGE_HEIGHT, _IMAGE_WIDTH, _USE_FINE_GRAINED_LABELS,
    _BINARY_LABEL, _EPSILON, _SEED, _ALGORITHM, _PROXIMAL_STRENGTH,
    _SERVER_OPTIMIZER, _SERVER_MOMENTUM, _SERVER_BETA_1, _SERVER_BETA_2,
    _SERVER_EPSILON, _CLIENT_OPTIMIZER, _CLIENT_MOMENTUM, _PRECISION)
_DP_RESULT_FLAGS = (_TOTAL_ROUNDS, _L2_NORM_CLIP, _TARGET_UNCLIPPED_QUANTILE,
                    _SIMULATED_CLIENTS_PER_ROUND, _DP_CALIBRATION)
# With --iid (left out otherwise, so that runs made before the flag existed
# keep resuming): an IID run and a non-IID one, or two dealings, never share
# a save directory.
_IID_RESULT_FLAGS = (_IID, _IID_SEED)


def _config_from_flags() -> federated.FederatedConfig:
  """The flag values as a validated `FederatedConfig` (FlairInputError on bad
  values, naming the flag); an unset --save_model_dir becomes a new
  directory under ./runs/."""
  values = {holder.name: holder.value for holder in _ALL_FLAGS}
  if values["save_model_dir"] is None:
    values["save_model_dir"] = io_utils.fresh_run_dir("federated")
  return federated.FederatedConfig(**values)


def _identity(config: federated.FederatedConfig, label_spec) -> dict:
  """The run identity recorded in `run.json` (see `io_utils.run_identity`)."""
  result_flags = (_RESULT_FLAGS
                  + (_DP_RESULT_FLAGS if config.epsilon > 0 else ())
                  + (_IID_RESULT_FLAGS if config.iid else ()))
  return io_utils.run_identity(
      "federated",
      io_utils.labels_identity(label_spec.names,
                               label_spec.use_fine_grained_labels,
                               label_spec.binary_label),
      io_utils.model_identity(config.restore_model_path is not None,
                              label_spec.num_outputs),
      {h.name: getattr(config, h.name) for h in result_flags})


@errors.exit_on_input_error
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise errors.FlairInputError(
        f"unexpected positional arguments: {' '.join(argv[1:])} (all "
        "settings are --flags)")
  config = _config_from_flags()
  if _CLIENTS_PER_THREAD.present:
    logging.warning(
        "--clients_per_thread %d has no effect: it is accepted for the "
        "original command line only (each --backend schedules a round's "
        "clients itself; --num_workers sets how many train at once).",
        config.clients_per_thread)
  # Rejects a bad data directory or label flag before writing any file.
  label_spec = data.load_label_spec(config.tfrecords_dir,
                                    config.use_fine_grained_labels,
                                    config.binary_label)
  flag_values = {h.name: getattr(config, h.name) for h in _ALL_FLAGS}
  # Every user file read once (no image decoded): all bad files are
  # reported at once, before anything is written.
  bad = data.check_tfrecords(config.tfrecords_dir, label_spec,
                             skip_bad_records=_SKIP_BAD_RECORDS.value)
  for holder in (_SKIP_BAD_RECORDS, _OVERWRITE):
    flag_values[holder.name] = holder.value
  identity = _identity(config, label_spec)
  identity["settings"][_SKIP_BAD_RECORDS.name] = _SKIP_BAD_RECORDS.value
  io_utils.claim_save_dir(config.save_model_dir, identity, flag_values,
                          overwrite=_OVERWRITE.value)
  logging.info("This run writes to %s (rerun with --save_model_dir %s to "
               "resume it).", config.save_model_dir, config.save_model_dir)
  if bad:
    config = dataclasses.replace(
        config, tfrecords_dir=data.mirror_without_bad_records(
            config.tfrecords_dir, bad, os.path.join(
                config.save_model_dir,
                constants.TFRECORDS_WITHOUT_BAD_RECORDS_DIR)))
  try:
    final = federated.run_federated(config)
  except Exception as e:  # pylint: disable=broad-except
    # A record or image the pre-check could not see (it decodes no image)
    # or a file changed during the run: one line per user file that fails.
    if isinstance(e, (errors.FlairInputError, errors.OutputWriteError,
                      errors.BackendDiedError)) or not data.is_data_error(e):
      raise
    raise data.training_data_error(config.tfrecords_dir, label_spec,
                                   e) from None
  if bad:
    final = data.record_skipped_records(config.save_model_dir, final, bad)
  print(json.dumps(final, indent=2, sort_keys=True))


def run() -> None:
  """Console-script entry point (`flair-federated`)."""
  app.run(main)


if __name__ == "__main__":
  run()
