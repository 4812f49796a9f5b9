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
checks every user file (`triage.check_tfrecords`: all bad files listed at once,
or skipped with `--skip_bad_records`), claims the save directory
(`io_utils.claim_save_dir`: `run.json` records the
run; another run's directory is refused unless `--overwrite`), writes the
flag values to `<save_model_dir>/flags.json` and starts training.
Rerunning the same command resumes after the latest checkpoint. SIGTERM and
Ctrl-C stop the run cleanly (whatever the backend started is stopped too).
"""

from absl import flags
from absl import logging

from benchmark.cli import commands
from benchmark.cli import trainers
from benchmark.core import constants
from benchmark.core import errors
from benchmark.data import label_sets
from benchmark.data import triage
from benchmark.model import mixed_precision
from benchmark.training import dp
from benchmark.training import federated
from benchmark.training import optimizers

_TRAINER = "federated"
# The flags that are fields of `FederatedConfig`.
_CONFIG_FLAGS = trainers.TRAINER_CONFIG_FLAGS + (
    "client_learning_rate", "client_clipnorm", "server_learning_rate",
    "client_epochs_per_round", "client_batch_size", "clients_per_round",
    "clients_per_thread", "client_datasets_random_seed", "total_rounds",
    "rounds_per_eval", "max_elements_per_client", "epsilon", "l2_norm_clip",
    "target_unclipped_quantile", "simulated_clients_per_round",
    "rounds_per_checkpoint", "dp_calibration", "seed", "backend",
    "num_workers", "ray_address", "algorithm", "proximal_strength",
    "server_optimizer", "server_momentum", "server_beta_1", "server_beta_2",
    "server_epsilon", "client_optimizer", "client_momentum", "precision",
    "iid", "iid_seed")
# The flags that change a run's results (io_utils.claim_save_dir); with DP
# also _DP_RESULT_FLAGS. --total_rounds is one only with DP (the noise is
# calibrated for it); without DP more rounds continue the same run.
_RESULT_FLAGS = trainers.TRAINER_RESULT_FLAGS + (
    "client_learning_rate", "client_clipnorm", "server_learning_rate",
    "client_epochs_per_round", "client_batch_size", "clients_per_round",
    "client_datasets_random_seed", "rounds_per_eval",
    "max_elements_per_client", "epsilon", "seed", "algorithm",
    "proximal_strength", "server_optimizer", "server_momentum",
    "server_beta_1", "server_beta_2", "server_epsilon", "client_optimizer",
    "client_momentum", "precision")
_DP_RESULT_FLAGS = ("total_rounds", "l2_norm_clip", "target_unclipped_quantile",
                    "simulated_clients_per_round", "dp_calibration")
# With --iid (left out otherwise, so that runs made before the flag existed
# keep resuming): an IID run and a non-IID one, or two dealings, never share
# a save directory.
_IID_RESULT_FLAGS = ("iid", "iid_seed")


def _define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines this command's flags (called by `run`, not at import, so that
  this module can be imported beside the other commands)."""
  trainers.define_trainer_flags(
      _TRAINER, "to start the global model from",
      "the best weights, metrics.csv, tensorboard/, checkpoints/, "
      "final_metrics.json, flags.json and run.json", flag_values)
  flags.DEFINE_float(
      "client_learning_rate", 0.1, "Learning rate of the clients' SGD.",
      flag_values=flag_values)
  flags.DEFINE_float(
      "client_clipnorm", 10.0,
      "Clients clip each weight's gradient to this L2 norm before the SGD step "
      "(as Keras SGD(clipnorm=...)).",
      flag_values=flag_values)
  flags.DEFINE_float(
      "server_learning_rate", 0.1,
      "Learning rate of the server optimizer (--server_optimizer, default Adam "
      "with epsilon 0.01), applied to the averaged client model delta.",
      flag_values=flag_values)
  flags.DEFINE_integer(
      "client_epochs_per_round", 2,
      "Passes each sampled client makes over its (truncated) data per round.",
      flag_values=flag_values)
  flags.DEFINE_integer(
      "client_batch_size", 16, "Batch size of local client training.",
      flag_values=flag_values)
  flags.DEFINE_integer(
      "clients_per_round", 200,
      "Training users sampled uniformly without replacement each round (capped "
      "at the number of training users).",
      flag_values=flag_values)
  flags.DEFINE_integer(
      "clients_per_thread", 50,
      "Accepted for compatibility with the original command line; has no "
      "effect (a warning says so when it is given): each --backend schedules a "
      "round's clients itself; --num_workers sets how many train at once.",
      flag_values=flag_values)
  flags.DEFINE_integer(
      "client_datasets_random_seed", None,
      "Seed of the per-round client sampling (the cohort of round r depends "
      "only on the seed and r). Unset: a random seed, kept in the checkpoint "
      "so that a resumed run continues the same sequence.",
      flag_values=flag_values)
  flags.DEFINE_integer(
      "total_rounds", 5000, "Number of federated rounds.",
      flag_values=flag_values)
  flags.DEFINE_integer(
      "rounds_per_eval", 10,
      "Evaluate the global model on val every this many rounds (and after the "
      "last); the weights are saved when val loss improves.",
      flag_values=flag_values)
  flags.DEFINE_integer(
      "max_elements_per_client", 512,
      "Each client trains on at most this many of its images (a random subset "
      "per round).",
      flag_values=flag_values)
  flags.DEFINE_float(
      "epsilon", 0.0,
      "User-level DP epsilon over all --total_rounds rounds (delta = "
      "1/n^1.1, n = training users); 0 disables DP.",
      flag_values=flag_values)
  flags.DEFINE_float(
      "l2_norm_clip", 0.1,
      "With DP: the L2 clip of each client's model update (fixed clipping), or "
      "its initial value (adaptive clipping).",
      flag_values=flag_values)
  flags.DEFINE_float(
      "target_unclipped_quantile", 0.1,
      "With DP: 0 for fixed clipping at --l2_norm_clip; otherwise the clip "
      "adapts toward this quantile of the client update norms.",
      flag_values=flag_values)
  flags.DEFINE_integer(
      "simulated_clients_per_round", None,
      "With DP: calibrate the noise for this larger cohort and scale it by "
      "clients_per_round / simulated_clients_per_round, simulating the noise "
      "level of a large cohort with fewer clients trained.",
      flag_values=flag_values)
  flags.DEFINE_integer(
      "rounds_per_checkpoint", 50,
      "Save the program state (model, optimizer and DP state, round) every "
      "this many rounds and after the last round.",
      flag_values=flag_values)
  flags.DEFINE_enum(
      "dp_calibration", dp.CALIBRATION_ROUNDS, list(dp.CALIBRATIONS),
      "With DP: 'rounds' calibrates the noise for exactly --total_rounds "
      "rounds at sampling rate cohort/n; 'original' reproduces the original "
      "benchmark, which accounted for total_rounds*n/cohort rounds (about 10x "
      "the noise at FLAIR's settings).",
      flag_values=flag_values)
  flags.DEFINE_integer(
      "seed", 0, "Seed of the initial model weights and of its crop/flip ops.",
      flag_values=flag_values)
  flags.DEFINE_enum(
      "backend", constants.BACKEND_INPROCESS, list(constants.BACKENDS),
      "Where rounds run. 'inprocess': TFF's round compiled to TensorFlow "
      "graphs and run in this process, clients on every visible GPU (else the "
      "CPU); 'tff_worker': TFF 0.87's own worker process (CPU only, memory "
      "grows with the cohort); 'ray': Ray actors, local or on a cluster "
      "(--ray_address).",
      flag_values=flag_values)
  flags.DEFINE_integer(
      "num_workers", None,
      "Clients trained at once: with 'inprocess', parallel client trainers "
      "(default one per GPU, or 1 using all CPU cores); with 'ray', actors "
      "(default one per GPU of the cluster, else one per node using the "
      "node's cores).",
      flag_values=flag_values)
  flags.DEFINE_enum(
      "algorithm", federated.ALGORITHM_FEDAVG, list(federated.ALGORITHMS),
      "fedavg, or fedprox: clients add "
      "proximal_strength/2 * ||w - w_global||^2 to their loss (Li et al. "
      "2020).",
      flag_values=flag_values)
  flags.DEFINE_float(
      "proximal_strength", 0.01, "With --algorithm fedprox: mu, >= 0.",
      flag_values=flag_values)
  flags.DEFINE_enum(
      "server_optimizer", "adam", list(optimizers.SERVER_OPTIMIZERS),
      "Server optimizer applied to the averaged client model delta "
      "(tff.learning.optimizers; Reddi et al. 2021), at "
      "--server_learning_rate.",
      flag_values=flag_values)
  flags.DEFINE_float(
      "server_momentum", optimizers.MOMENTUM,
      "With --server_optimizer sgdm: the momentum.",
      flag_values=flag_values)
  flags.DEFINE_float(
      "server_beta_1", optimizers.BETA_1,
      "With --server_optimizer adam or yogi: beta_1.",
      flag_values=flag_values)
  flags.DEFINE_float(
      "server_beta_2", optimizers.BETA_2,
      "With --server_optimizer adam or yogi: beta_2.",
      flag_values=flag_values)
  flags.DEFINE_float(
      "server_epsilon", optimizers.SERVER_EPSILON,
      "With --server_optimizer adagrad, adam or yogi: epsilon (the reference "
      "Adam's 0.01).",
      flag_values=flag_values)
  flags.DEFINE_enum(
      "client_optimizer", "sgd", list(optimizers.CLIENT_OPTIMIZERS),
      "Clients' optimizer, at --client_learning_rate with per-weight gradient "
      "clipping at --client_clipnorm.",
      flag_values=flag_values)
  flags.DEFINE_float(
      "client_momentum", optimizers.MOMENTUM,
      "With --client_optimizer sgdm: the momentum.",
      flag_values=flag_values)
  flags.DEFINE_enum(
      "precision", mixed_precision.FLOAT32, list(mixed_precision.PRECISIONS),
      "float32, or bfloat16 for Keras mixed precision of the clients' and the "
      "evaluation model (bfloat16 convolutions and activations; float32 "
      "weights, normalisation, logits, loss and metrics).",
      flag_values=flag_values)
  flags.DEFINE_string(
      "ray_address", None,
      "With --backend ray: the address of a running Ray cluster (as `ray start "
      "--head` prints it); unset starts an embedded local Ray that is stopped "
      "with the run.",
      flag_values=flag_values)
  flags.DEFINE_boolean(
      "iid", False,
      "Train on FLAIR-IID: the training images dealt out uniformly at random "
      "to the training users, each user keeping its number of images "
      "(benchmark.iid); val and test are unchanged.",
      flag_values=flag_values)
  flags.DEFINE_integer(
      "iid_seed", 0,
      "With --iid: the seed of the dealing (the same seed gives the same "
      "clients, also on resume).", flag_values=flag_values)


def config_from_flags(
    flag_values: flags.FlagValues = flags.FLAGS) -> federated.FederatedConfig:
  """The parsed flags as a validated `FederatedConfig` (FlairInputError on bad
  values, naming the flag); an unset --save_model_dir becomes a new
  directory under ./runs/."""
  return trainers.config_from_flags(federated.FederatedConfig, _CONFIG_FLAGS,
                               _TRAINER, flag_values)


def run_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> dict:
  """The command after its flags are parsed: validates them, checks the
  data, claims the save directory, trains, prints the final metrics (JSON)
  and returns them. Raises FlairInputError (bad flag or data, nothing
  written; or a record that fails in training, naming its file),
  OutputWriteError or BackendDiedError, which `main` turns into one line."""
  config = config_from_flags(flag_values)
  if flag_values["clients_per_thread"].present:
    logging.warning(
        "--clients_per_thread %d has no effect: it is accepted for the "
        "original command line only (each --backend schedules a round's "
        "clients itself; --num_workers sets how many train at once).",
        config.clients_per_thread)
  # Rejects a bad data directory or label flag before writing any file.
  label_spec = label_sets.load_label_spec(config.tfrecords_dir,
                                    config.use_fine_grained_labels,
                                    config.binary_label)
  result_flags = (_RESULT_FLAGS
                  + (_DP_RESULT_FLAGS if config.epsilon > 0 else ())
                  + (_IID_RESULT_FLAGS if config.iid else ()))
  config, bad = trainers.claim_run(config, label_spec, _TRAINER, _CONFIG_FLAGS,
                              result_flags, flag_values)
  try:
    final = federated.run_federated(config)
  except Exception as e:  # pylint: disable=broad-except
    # A record or image the pre-check could not see (it decodes no image)
    # or a file changed during the run: one line per user file that fails.
    if isinstance(e, (errors.FlairInputError, errors.OutputWriteError,
                      errors.BackendDiedError)) or not triage.is_data_error(e):
      raise
    raise triage.training_data_error(config.tfrecords_dir, label_spec,
                                   e) from None
  return trainers.finish_run(config.save_model_dir, final, bad)


@commands.exit_on_input_error
def main(argv: list[str]) -> None:
  """Trains as the parsed flags say and prints the final metrics (JSON)."""
  del argv  # Refused by the wrapper when it holds more than the program.
  run_from_flags()


# Console-script entry point (`flair-federated`).
run = commands.entry_point(_define_flags, main)


if __name__ == "__main__":
  run()
