"""The seeds of a run, all derived from `--seed` (which clients train in a
round, each client's shuffle and augmentation in each round, each epoch's
order and augmentation in central training), and TensorFlow's deterministic
kernels on request (`--deterministic_ops`), from a process state that
earlier work in the process cannot change (`clear_global_seed`).

Each seed is a function of `--seed` and of what it is for (a purpose tag,
the round or epoch, the client's index among the training users), through
NumPy's `SeedSequence` (`numpy.random.SeedSequence`, NumPy pinned in the
lock): so a draw does not depend on which process, thread or backend makes
it, nor on what ran before it, and a resumed run draws what the
uninterrupted one did.
"""

import os

import numpy as np
import tensorflow as tf

# Purpose tags: each kind of seed its own stream.
_COHORTS = 1
_CLIENT = 2
_EPOCH = 3


def _derive(*entropy: int, words: int) -> np.ndarray:
  state = np.random.SeedSequence([int(e) for e in entropy]).generate_state(
      words, dtype=np.uint32)
  return (state & 0x7FFFFFFF).astype(np.int64)


def cohort_seed(seed: int) -> int:
  """The client-sampling seed of a run whose `--seed` is `seed` (when
  `--client_datasets_random_seed` is not given): an int in [0, 2**31)."""
  return int(_derive(seed, _COHORTS, words=1)[0])


def client_seed(seed: int, round_num: int, client_index: int) -> np.ndarray:
  """The seed of one client's dataset in one round: its shuffle and its
  examples' augmentation (`data.pipeline.create_train_preprocess_fn`).

  Args:
    seed: the run's `--seed`.
    round_num: the round (1-based).
    client_index: the client's position among the training users, sorted.

  Returns:
    int64 `[2]`, a stateless seed.
  """
  return _derive(seed, _CLIENT, round_num, client_index, words=2)


def epoch_seed(seed: int, epoch: int) -> np.ndarray:
  """The seed of one epoch of central training: its order of users and
  images, and its examples' augmentation. int64 `[2]`."""
  return _derive(seed, _EPOCH, epoch, words=2)


# The variable that makes TensorFlow (Python and C++, in this process and in
# the processes it starts, e.g. Ray actors) choose deterministic kernels.
_DETERMINISM_VARIABLE = "TF_DETERMINISTIC_OPS"


def use_deterministic_ops(enabled: bool) -> None:
  """With `enabled`, makes TensorFlow use deterministic kernels from now on,
  in this process (`tf.config.experimental.enable_op_determinism`) and in
  the processes it starts later (`TF_DETERMINISTIC_OPS=1` in the
  environment); otherwise does nothing. Ops without a deterministic kernel
  on the device then raise `tf.errors.UnimplementedError` (TensorFlow's
  rule)."""
  if enabled:
    os.environ[_DETERMINISM_VARIABLE] = "1"
    tf.config.experimental.enable_op_determinism()


def clear_global_seed() -> None:
  """Clears TensorFlow's global seed (`tf.random.set_seed(None)`), as in a
  fresh process.

  `tf.data.Dataset.shuffle(seed=s)` draws from the pair (global seed, `s`),
  the global seed defaulting to a constant when none is set: a run made in a
  process where something set one (`tf.keras.utils.set_random_seed`, say)
  would otherwise shuffle differently from the same run in a fresh process.
  The trainers call this before they build any dataset."""
  tf.random.set_seed(None)
