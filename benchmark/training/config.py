"""The trainers' settings: small frozen parts, each checked on construction,
each field declaring its command-line flag once.

A part is a frozen dataclass whose fields are `setting(...)`s: the field's
name is the flag's name (ml-flair's names and defaults where it had the
flag, docs/original_benchmark.md), and its metadata holds the flag's help,
its choices or bounds (checked when the part is built) and whether the
value is part of the run's identity (`IDENTITY_*`, see
`training.run_dir`). `benchmark.cli.flags` defines the flags of a config
from these declarations and builds the config from the parsed values;
`build` builds one from a mapping of flag names to values.

`FederatedConfig` = data, model, client, server, DP, cohort, run parts;
`CentralConfig` = data, model, central parts. `data` and `model` are shared
by both trainers, so their flags are declared once.
"""

import dataclasses
import math
import os
import typing
from typing import Any, Mapping, Optional

from benchmark.core import constants
from benchmark.core import validate
from benchmark.core.errors import FlairInputError
from benchmark.data import iid as iid_lib
from benchmark.model import mixed_precision
from benchmark.model import resnet
from benchmark.training import dp
from benchmark.training import optimizers

# When a setting is part of a run's identity (run.json): a rerun with another
# value is a different run (training.run_dir.claim_save_dir).
IDENTITY_ALWAYS = "always"
IDENTITY_NEVER = "never"  # More epochs/rounds continue the run; paths; speed.
IDENTITY_WITH_DP = "with_dp"  # Only when --epsilon > 0 (the noise depends).
IDENTITY_WITH_IID = "with_iid"  # Only with --iid (old runs keep resuming).
# Only with DP or a learning-rate schedule (both depend on the run's length).
IDENTITY_WITH_DP_OR_SCHEDULE = "with_dp_or_schedule"


@dataclasses.dataclass(frozen=True)
class Declaration:
  """How a setting is a flag and what it must be (see `setting`)."""
  help: str
  identity: str = IDENTITY_ALWAYS
  choices: Optional[tuple[str, ...]] = None
  minimum: Optional[int] = None
  positive: bool = False
  flag: bool = True
  required: bool = False
  # In the identity only when the value is not the default: a setting added
  # after runs existed leaves their run.json valid (they keep resuming).
  identity_if_changed: bool = False


_DECLARATION = "declaration"


def setting(default: Any, help: str,  # pylint: disable=redefined-builtin
            **declared) -> Any:
  """A config field that is also the command-line flag of the same name.

  Args:
    default: the default value (the flag's default).
    help: the flag's help; may name `{trainer}`, `{outputs}`,
      `{restore_use}` or `{runs_dir}`, which each command fills in.
    **declared: the other fields of `Declaration`: `identity` (one of
      `IDENTITY_*`, default always), `choices` (an enum flag), `minimum`
      (an integer's smallest value; None is allowed when the default is
      None), `positive` (a finite float > 0), `flag` (False: no flag sets
      it), `required` (the flag must be given), `identity_if_changed` (in
      the identity only when not the default).

  Returns:
    A `dataclasses.field` carrying the `Declaration`.
  """
  return dataclasses.field(default=default, metadata={
      _DECLARATION: Declaration(help=help, **declared)})


def declaration(field: dataclasses.Field) -> Declaration:
  """The `Declaration` of a config field made by `setting`."""
  return field.metadata[_DECLARATION]


def _check_declared(part) -> None:
  """Checks every field of `part` against its declaration (required,
  choices, bounds); FlairInputError naming the flag."""
  for field in dataclasses.fields(part):
    value, declared = getattr(part, field.name), declaration(field)
    name = f"--{field.name}"
    if declared.required and not value:
      raise FlairInputError(f"{name} is required")
    if declared.choices is not None and value not in declared.choices:
      raise FlairInputError(f"{name} must be one of "
                            f"{', '.join(declared.choices)}, got {value!r}")
    if declared.minimum is not None:
      validate.check_int(name, value, declared.minimum,
                         allow_none=field.default is None)
    if declared.positive:
      validate.check_positive_number(name, value)


def _in_unit_interval(name: str, value: float, what: str = "") -> None:
  if not (isinstance(value, (int, float)) and 0 <= value < 1):
    raise FlairInputError(f"--{name} must be in [0, 1){what}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which prepared data and labels a trainer reads."""
  tfrecords_dir: Optional[str] = setting(
      None, "Directory of per-user TFRecords written by prepare_tfrecords.py "
      "(train/, val/, test/ and label_index.json).",
      identity=IDENTITY_NEVER, required=True)
  use_fine_grained_labels: bool = setting(
      False, "Train on the fine-grained labels instead of the 17 coarse "
      "labels.")
  binary_label: Optional[str] = setting(
      None, "Train a binary classifier (one output) for this single label "
      "name.")
  eval_batch_size: int = setting(
      512, "Batch size in images for val/test evaluation.",
      identity=IDENTITY_NEVER, minimum=1)

  def __post_init__(self):
    _check_declared(self)
    if self.binary_label is not None and (
        not isinstance(self.binary_label, str) or not self.binary_label):
      raise FlairInputError(
          f"--binary_label must be a label name, got {self.binary_label!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model both trainers build (`model.resnet.build_resnet`)."""
  image_height: int = setting(
      224, "Height in pixels of the crop fed to the model.", minimum=1)
  image_width: int = setting(
      224, "Width in pixels of the crop fed to the model.", minimum=1)
  restore_model_path: Optional[str] = setting(
      None, "Optional Keras weights .h5 (e.g. the ImageNet resnet18.h5) "
      "{restore_use}: builds the BatchNorm model and loads layers by name, "
      "skipping the classifier when its size differs.")
  restore_partial: bool = setting(
      False, "With --restore_model_path: accept a file that leaves every "
      "normalisation layer, or more than half of the layers with weights, at "
      "their initial values (refused otherwise, as the wrong file: e.g. "
      "GroupNorm weights for the BatchNorm model).", identity=IDENTITY_NEVER)
  model_layout: str = setting(
      resnet.DEFAULT_LAYOUT, "The network's depth and widths: resnet18 (the "
      "benchmark's), or tiny (two narrow stages of one block: a smoke test "
      "of the pipeline, not a result).", identity=IDENTITY_NEVER,
      choices=tuple(resnet.LAYOUTS))
  precision: str = setting(
      mixed_precision.FLOAT32, "float32, or bfloat16 for Keras mixed "
      "precision (bfloat16 convolutions and activations; float32 weights, "
      "normalisation, logits, loss and metrics).",
      choices=mixed_precision.PRECISIONS)
  seed: int = setting(
      0, "Seed of all of the run's randomness: initial weights, client "
      "sampling (unless --client_datasets_random_seed), each client's or "
      "epoch's data order, crops and flips.", minimum=0)
  deterministic_ops: bool = setting(
      False, "Ask TensorFlow for deterministic kernels "
      "(tf.config.experimental.enable_op_determinism, also in the processes "
      "the run starts). CPU runs repeat bit for bit without it; GPU kernels "
      "need it, and TensorFlow refuses ops that have no deterministic GPU "
      "kernel.", identity=IDENTITY_NEVER)

  def __post_init__(self):
    _check_declared(self)
    for flag in ("image_height", "image_width"):
      if getattr(self, flag) > constants.IMAGE_SIZE:
        raise FlairInputError(
            f"--{flag} must be at most {constants.IMAGE_SIZE} (the stored "
            f"image size), got {getattr(self, flag)}")
    if self.restore_model_path is not None and not (
        isinstance(self.restore_model_path, str)
        and os.path.isfile(self.restore_model_path)):
      raise FlairInputError(
          f"--restore_model_path {self.restore_model_path!r} is not a file "
          "(expected Keras weights in HDF5, e.g. resnet18.h5)")

  @property
  def pretrained(self) -> bool:
    """Whether the model starts from `restore_model_path` (BatchNorm)."""
    return self.restore_model_path is not None

  @property
  def crop_size(self) -> tuple[int, int]:
    """`(image_height, image_width)`."""
    return (self.image_height, self.image_width)


@dataclasses.dataclass(frozen=True)
class OutputConfig:
  """Where a trainer writes (see `training.run_dir`)."""
  save_model_dir: Optional[str] = setting(
      None, "Directory for {outputs}; rerun with the same directory to "
      "resume. Default: a new directory {runs_dir}/{trainer}-<UTC time>.",
      identity=IDENTITY_NEVER)

  def __post_init__(self):
    if not isinstance(self.save_model_dir, str) or not self.save_model_dir:
      raise FlairInputError(
          f"--save_model_dir must be a non-empty path, got "
          f"{self.save_model_dir!r}")


# --- Central training --------------------------------------------------------

# Images kept in the shuffle buffer of the pooled training set. Each decoded
# image is 256*256*3 bytes = 192 KiB, so 2,000 images hold ~400 MiB of RAM.
DEFAULT_SHUFFLE_BUFFER_SIZE = 2000


@dataclasses.dataclass(frozen=True)
class CentralTrainingConfig:
  """Central training's optimizer, batches, epochs and output directory."""
  learning_rate: float = setting(
      1e-4, "Learning rate of the Adam optimizer.", positive=True)
  clipnorm: float = setting(
      10.0, "Adam clips each gradient to this L2 norm (Keras clipnorm).",
      positive=True)
  train_batch_size: int = setting(
      512, "Training batch size in images, over all GPUs together.",
      minimum=1)
  num_epochs: int = setting(
      100, "Number of passes over the pooled training users.",
      identity=IDENTITY_NEVER, minimum=1)
  shuffle_buffer_size: int = setting(
      DEFAULT_SHUFFLE_BUFFER_SIZE, "Images in the training shuffle buffer.",
      identity=IDENTITY_NEVER, minimum=1, flag=False)

  def __post_init__(self):
    _check_declared(self)


# --- Federated training ------------------------------------------------------

ALGORITHM_FEDAVG = "fedavg"
ALGORITHM_FEDPROX = "fedprox"
ALGORITHMS = (ALGORITHM_FEDAVG, ALGORITHM_FEDPROX)
# How the server averages client updates without DP (with DP: uniform).
WEIGHTING_EXAMPLES = "examples"
WEIGHTING_UNIFORM = "uniform"
WEIGHTINGS = (WEIGHTING_EXAMPLES, WEIGHTING_UNIFORM)


@dataclasses.dataclass(frozen=True)
class ClientConfig:
  """What each sampled client does in a round: its data, optimizer and
  algorithm (FedAvg, or FedProx: Li et al. 2020, arXiv 1812.06127)."""
  client_learning_rate: float = setting(
      0.1, "Learning rate of the clients' SGD.", positive=True)
  client_clipnorm: float = setting(
      10.0, "Clients clip each weight's gradient to this L2 norm before the "
      "SGD step (as Keras SGD(clipnorm=...)).", positive=True)
  client_clip_scope: str = setting(
      optimizers.CLIP_PER_WEIGHT, "What --client_clipnorm bounds: the norm "
      "of each weight's gradient (per_weight, ml-flair's Keras clipnorm) or "
      "of all gradients together (global, pfl-research's "
      "torch.nn.utils.clip_grad_norm_).", choices=optimizers.CLIP_SCOPES,
      identity_if_changed=True)
  client_epochs_per_round: int = setting(
      2, "Passes each sampled client makes over its (truncated) data per "
      "round.", minimum=1)
  client_batch_size: int = setting(
      16, "Batch size of local client training.", minimum=1)
  max_elements_per_client: int = setting(
      512, "Each client trains on at most this many of its images (a random "
      "subset per round).", minimum=1)
  client_optimizer: str = setting(
      "sgd", "Clients' optimizer, at --client_learning_rate with per-weight "
      "gradient clipping at --client_clipnorm.",
      choices=optimizers.CLIENT_OPTIMIZERS)
  client_momentum: float = setting(
      optimizers.MOMENTUM, "With --client_optimizer sgdm: the momentum.")
  algorithm: str = setting(
      ALGORITHM_FEDAVG, "fedavg, or fedprox: clients add "
      "proximal_strength/2 * ||w - w_global||^2 to their loss (Li et al. "
      "2020).", choices=ALGORITHMS)
  proximal_strength: float = setting(
      0.01, "With --algorithm fedprox: mu, >= 0.")
  client_weighting: str = setting(
      WEIGHTING_EXAMPLES, "Without DP: the server averages client updates "
      "weighted by their number of examples (examples, ml-flair's) or "
      "equally (uniform, pfl-research's FLAIR benchmark). With DP: always "
      "uniform.", choices=WEIGHTINGS, identity_if_changed=True)

  def __post_init__(self):
    _check_declared(self)
    _in_unit_interval("client_momentum", self.client_momentum)
    if not (isinstance(self.proximal_strength, (int, float))
            and self.proximal_strength >= 0
            and math.isfinite(self.proximal_strength)):
      raise FlairInputError("--proximal_strength must be >= 0, got "
                            f"{self.proximal_strength!r}")

  def build_optimizer(self):
    """The clients' optimizer (`optimizers.build_client_optimizer`)."""
    return optimizers.build_client_optimizer(
        self.client_optimizer, self.client_learning_rate,
        self.client_clipnorm, self.client_momentum, self.client_clip_scope)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
  """The server optimizer that applies the averaged client model delta
  (`tff.learning.optimizers`, compared in Reddi et al. 2021, arXiv
  2003.00295; the reference: Adam with epsilon 0.01)."""
  server_learning_rate: float = setting(
      0.1, "Learning rate of the server optimizer (--server_optimizer, "
      "default Adam with epsilon 0.01), applied to the averaged client model "
      "delta.", positive=True)
  server_optimizer: str = setting(
      "adam", "Server optimizer applied to the averaged client model delta "
      "(tff.learning.optimizers; Reddi et al. 2021), at "
      "--server_learning_rate.", choices=optimizers.SERVER_OPTIMIZERS)
  server_momentum: float = setting(
      optimizers.MOMENTUM, "With --server_optimizer sgdm: the momentum.")
  server_beta_1: float = setting(
      optimizers.BETA_1, "With --server_optimizer adam or yogi: beta_1.")
  server_beta_2: float = setting(
      optimizers.BETA_2, "With --server_optimizer adam or yogi: beta_2.")
  server_epsilon: float = setting(
      optimizers.SERVER_EPSILON, "With --server_optimizer adagrad, adam, "
      "adamw or yogi: epsilon (the reference Adam's 0.01).", positive=True)
  server_weight_decay: float = setting(
      0.0, "With --server_optimizer adamw: the decoupled weight decay, >= 0 "
      "(pfl-research's --weight_decay, default 0).", identity_if_changed=True)
  server_lr_schedule: str = setting(
      optimizers.SCHEDULE_CONSTANT, "The server learning rate over rounds: "
      "constant, polynomial (linear warm-up over --server_lr_warmup_rounds, "
      "then polynomial decay of power --server_lr_decay_power to "
      "--server_lr_end at --total_rounds; pfl-research's) or cosine (the "
      "same warm-up, then cosine decay to --server_lr_end).",
      choices=optimizers.SCHEDULES, identity_if_changed=True)
  server_lr_warmup_rounds: int = setting(
      0, "With a --server_lr_schedule: rounds of linear warm-up from 0.",
      minimum=0, identity_if_changed=True)
  server_lr_decay_power: float = setting(
      1.0, "With --server_lr_schedule polynomial: the decay's power.",
      positive=True, identity_if_changed=True)
  server_lr_end: float = setting(
      0.0, "With a --server_lr_schedule: the learning rate the decay ends at "
      "(in [0, --server_learning_rate]).", identity_if_changed=True)

  def __post_init__(self):
    _check_declared(self)
    for name in ("server_momentum", "server_beta_1", "server_beta_2"):
      _in_unit_interval(name, getattr(self, name))
    if not (isinstance(self.server_weight_decay, (int, float))
            and 0 <= self.server_weight_decay < math.inf):
      raise FlairInputError("--server_weight_decay must be >= 0, got "
                            f"{self.server_weight_decay!r}")
    if not (isinstance(self.server_lr_end, (int, float))
            and 0 <= self.server_lr_end <= self.server_learning_rate):
      raise FlairInputError(
          "--server_lr_end must be in [0, --server_learning_rate "
          f"{self.server_learning_rate}], got {self.server_lr_end!r}")

  @property
  def scheduled(self) -> bool:
    """Whether the learning rate follows a schedule (not constant)."""
    return self.server_lr_schedule != optimizers.SCHEDULE_CONSTANT

  def build_optimizer(self, total_rounds: Optional[int] = None):
    """The server optimizer (`optimizers.build_server_optimizer`) with its
    learning-rate schedule over `total_rounds` rounds
    (`optimizers.schedule_server_learning_rate`; needed when `scheduled`)."""
    optimizer = optimizers.build_server_optimizer(
        self.server_optimizer, self.server_learning_rate,
        momentum=self.server_momentum, beta_1=self.server_beta_1,
        beta_2=self.server_beta_2, epsilon=self.server_epsilon,
        weight_decay=self.server_weight_decay)
    if not self.scheduled:
      return optimizer
    return optimizers.schedule_server_learning_rate(
        optimizer, optimizers.LearningRateSchedule(
            self.server_lr_schedule, self.server_learning_rate,
            total_rounds, self.server_lr_warmup_rounds,
            self.server_lr_decay_power, self.server_lr_end))


@dataclasses.dataclass(frozen=True)
class DpConfig:
  """User-level central DP of the aggregate (off when `epsilon` is 0);
  `training.dp` calibrates the noise and builds the aggregator."""
  epsilon: float = setting(
      0.0, "User-level DP epsilon over all --total_rounds rounds (delta = "
      "1/n^1.1, n = training users, unless --dp_delta, --dp_population); 0 "
      "disables DP.")
  l2_norm_clip: float = setting(
      0.1, "With DP: the L2 clip of each client's model update (fixed "
      "clipping), or its initial value (adaptive clipping).",
      identity=IDENTITY_WITH_DP, positive=True)
  target_unclipped_quantile: float = setting(
      0.1, "With DP: 0 for fixed clipping at --l2_norm_clip; otherwise the "
      "clip adapts toward this quantile of the client update norms.",
      identity=IDENTITY_WITH_DP)
  simulated_clients_per_round: Optional[int] = setting(
      None, "With DP: calibrate the noise for this larger cohort and scale "
      "it by clients_per_round / simulated_clients_per_round, simulating the "
      "noise level of a large cohort with fewer clients trained.",
      identity=IDENTITY_WITH_DP, minimum=1)
  dp_calibration: str = setting(
      dp.CALIBRATION_ROUNDS, "With DP: 'rounds' calibrates the noise for "
      "exactly --total_rounds rounds at sampling rate cohort/n; 'original' "
      "reproduces the original benchmark, which accounted for "
      "total_rounds*n/cohort rounds (about 10x the noise at FLAIR's "
      "settings).", identity=IDENTITY_WITH_DP, choices=dp.CALIBRATIONS)
  dp_mechanism: str = setting(
      dp.MECHANISM_GAUSSIAN, "With DP: gaussian (independent noise each "
      "round, amplified by sampling) or tree (DP-FTRL: tree-aggregated "
      "noise, each user at most once per tree, the tree restarted at every "
      "pass over the users; needs --target_unclipped_quantile 0; "
      "docs/dp.md).", identity=IDENTITY_WITH_DP, choices=dp.MECHANISMS,
      identity_if_changed=True)
  accountant: str = setting(
      dp.ACCOUNTANT_RDP, "With DP: the dp_accounting accountant that "
      "calibrates the noise and reports the guarantee: rdp (Renyi DP) or "
      "pld (privacy loss distributions, tighter; pfl-research's).",
      identity=IDENTITY_WITH_DP, choices=dp.ACCOUNTANTS,
      identity_if_changed=True)
  dp_population: Optional[int] = setting(
      None, "With DP: the number of users the accounting assumes (default: "
      "the training users); another value reproduces a configuration that "
      "assumes another population (pfl-research's default is 10^7).",
      identity=IDENTITY_WITH_DP, minimum=1, identity_if_changed=True)
  dp_delta: Optional[float] = setting(
      None, "With DP: the guarantee's delta, in (0, 1) (default: 1/N^1.1, N "
      "the accounted population).", identity=IDENTITY_WITH_DP,
      identity_if_changed=True)

  def __post_init__(self):
    _check_declared(self)
    if not (isinstance(self.epsilon, (int, float)) and self.epsilon >= 0
            and math.isfinite(self.epsilon)):
      raise FlairInputError(
          f"--epsilon must be >= 0 (0 = no DP), got {self.epsilon!r}")
    _in_unit_interval("target_unclipped_quantile",
                      self.target_unclipped_quantile, " (0 = fixed clipping)")
    if self.dp_delta is not None and not (
        isinstance(self.dp_delta, (int, float)) and 0 < self.dp_delta < 1):
      raise FlairInputError(
          f"--dp_delta must be in (0, 1), got {self.dp_delta!r}")
    if self.enabled:
      dp.check_combination(self.dp_mechanism, self.accountant,
                           self.dp_calibration, self.adaptive)

  @property
  def enabled(self) -> bool:
    return self.epsilon > 0

  @property
  def adaptive(self) -> bool:
    """Whether the clip adapts (`target_unclipped_quantile` > 0)."""
    return self.target_unclipped_quantile > 0


@dataclasses.dataclass(frozen=True)
class CohortConfig:
  """Which clients train: the per-round sample and, with FLAIR-IID, which
  images each training user holds (`data.iid`)."""
  clients_per_round: int = setting(
      200, "Training users sampled uniformly without replacement each round "
      "(capped at the number of training users).", minimum=1)
  client_datasets_random_seed: Optional[int] = setting(
      None, "Seed of the per-round client sampling (the cohort of round r "
      "depends only on the seed and r). Unset: derived from --seed.",
      minimum=0)
  iid: bool = setting(
      False, "Train on FLAIR-IID: by default (--iid_definition real_users) "
      "the training images dealt out uniformly at random to the training "
      "users, each user keeping its number of images (benchmark.data.iid); "
      "val and test are unchanged.",
      identity=IDENTITY_WITH_IID)
  iid_seed: int = setting(
      0, "With --iid: the seed of the dealing (the same seed gives the same "
      "clients, also on resume).", identity=IDENTITY_WITH_IID, minimum=0)
  iid_definition: str = setting(
      iid_lib.REAL_USERS, "With --iid: real_users (the training users keep "
      "their number of images, dealt at random with --iid_seed) or pfl "
      "(pfl-research's flair_iid: as many made-up users, each drawing "
      "--iid_user_size images uniformly at random, with replacement, from "
      "all training images every time it is sampled; the draws follow "
      "--seed).", identity=IDENTITY_WITH_IID, choices=iid_lib.DEFINITIONS,
      identity_if_changed=True)
  iid_user_size: int = setting(
      iid_lib.PFL_USER_SIZE, "With --iid --iid_definition pfl: the images of "
      "each made-up user (pfl-research's mean_datapoints_per_user).",
      identity=IDENTITY_WITH_IID, minimum=1, identity_if_changed=True)

  def __post_init__(self):
    _check_declared(self)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """How a federated run proceeds: rounds, evaluation, checkpoints, where
  rounds run and where the outputs go."""
  total_rounds: int = setting(
      5000, "Number of federated rounds.",
      identity=IDENTITY_WITH_DP_OR_SCHEDULE, minimum=1)
  rounds_per_eval: int = setting(
      10, "Evaluate the global model on val every this many rounds (and "
      "after the last); the weights are saved when val loss improves.",
      minimum=1)
  rounds_per_checkpoint: int = setting(
      50, "Save the program state (model, optimizer and DP state, round) "
      "every this many rounds and after the last round.",
      identity=IDENTITY_NEVER, minimum=1)
  backend: str = setting(
      constants.BACKEND_INPROCESS, "Where rounds run. 'inprocess': TFF's "
      "round compiled to TensorFlow graphs and run in this process, clients "
      "on every visible GPU (else the CPU); 'tff_worker': TFF 0.87's own "
      "worker process (CPU only, memory grows with the cohort); 'ray': Ray "
      "actors, local or on a cluster (--ray_address).",
      identity=IDENTITY_NEVER, choices=constants.BACKENDS)
  num_workers: Optional[int] = setting(
      None, "Clients trained at once: with 'inprocess', parallel client "
      "trainers (default one per GPU, or 1 using all CPU cores); with 'ray', "
      "actors (default one per GPU of the cluster, else one per node using "
      "the node's cores).", identity=IDENTITY_NEVER, minimum=1)
  ray_address: Optional[str] = setting(
      None, "With --backend ray: the address of a running Ray cluster (as "
      "`ray start --head` prints it); unset starts an embedded local Ray "
      "that is stopped with the run.", identity=IDENTITY_NEVER)
  show_progress: bool = setting(
      True, "Show a progress bar over rounds.", identity=IDENTITY_NEVER,
      flag=False)

  def __post_init__(self):
    _check_declared(self)
    if self.ray_address is not None and (
        self.backend != constants.BACKEND_RAY):
      raise FlairInputError("--ray_address is only used with --backend ray")


# --- Whole configurations ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CentralConfig:
  """A central run (`training.central.train_central`)."""
  data: DataConfig
  output: OutputConfig
  model: ModelConfig = ModelConfig()
  training: CentralTrainingConfig = CentralTrainingConfig()


@dataclasses.dataclass(frozen=True)
class FederatedConfig:
  """A federated run (`training.federated.run_federated`)."""
  data: DataConfig
  output: OutputConfig
  model: ModelConfig = ModelConfig()
  client: ClientConfig = ClientConfig()
  server: ServerConfig = ServerConfig()
  dp: DpConfig = DpConfig()
  cohort: CohortConfig = CohortConfig()
  run: RunConfig = RunConfig()


def parts(config_type: type) -> dict[str, type]:
  """The part types of a whole config type: `{attribute: part type}`."""
  hints = typing.get_type_hints(config_type)
  return {f.name: hints[f.name] for f in dataclasses.fields(config_type)}


def declared_settings(config_type: type) -> list[dataclasses.Field]:
  """Every setting of a whole config type, part by part, field order."""
  return [f for part in parts(config_type).values()
          for f in dataclasses.fields(part)]


def build(config_type: type, values: Mapping[str, Any]):
  """A whole config from `{setting name: value}` (settings not given keep
  their defaults).

  Raises:
    FlairInputError: a value its part refuses (naming the flag).
    TypeError: a name that is no setting of `config_type`.
  """
  unknown = set(values) - {f.name for f in declared_settings(config_type)}
  if unknown:
    raise TypeError(f"{config_type.__name__} has no setting "
                    f"{', '.join(sorted(unknown))}")
  built = {}
  for attribute, part in parts(config_type).items():
    names = {f.name for f in dataclasses.fields(part)}
    built[attribute] = part(**{k: v for k, v in values.items() if k in names})
  return config_type(**built)


def settings_of(config) -> dict[str, Any]:
  """`{setting name: value}` of every setting of a whole config."""
  return {f.name: getattr(getattr(config, attribute), f.name)
          for attribute, part in parts(type(config)).items()
          for f in dataclasses.fields(part)}


def flag_settings(config) -> dict[str, Any]:
  """`{flag name: value}` of the settings of `config` that have a flag
  (what flags.json records)."""
  values = settings_of(config)
  return {f.name: values[f.name] for f in declared_settings(type(config))
          if declaration(f).flag}


def identity_settings(config) -> dict[str, Any]:
  """The settings that make up a run's identity (`run.json`, see
  `IDENTITY_*`): `{setting name: value}`."""
  dp_on = getattr(getattr(config, "dp", None), "enabled", False)
  iid_on = getattr(getattr(config, "cohort", None), "iid", False)
  scheduled = getattr(getattr(config, "server", None), "scheduled", False)
  wanted = {IDENTITY_ALWAYS: True, IDENTITY_NEVER: False,
            IDENTITY_WITH_DP: dp_on, IDENTITY_WITH_IID: iid_on,
            IDENTITY_WITH_DP_OR_SCHEDULE: dp_on or scheduled}
  values = settings_of(config)
  return {f.name: values[f.name] for f in declared_settings(type(config))
          if wanted[declaration(f).identity] and not (
              declaration(f).identity_if_changed
              and values[f.name] == f.default)}


def replace(config, **values):
  """`config` with some settings changed (`build` checks them)."""
  return build(type(config), {**settings_of(config), **values})
