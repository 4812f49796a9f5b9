"""Which training images are labelled: the labels of every training image
(read once), each user's seed set, the split of a cycle's budget across
users, and the choices that spend it (top scores, or uniform at random).

An image is named by its user and its index in the user's TFRecord file
(0-based; the records are in the order of the user's records in
labels_and_metadata.json, docs/formats.md). A user's labelled set is a
boolean mask over its images; the rest is its pool. Everything here is
NumPy on the host; the draws are stateless, keyed by (`--seed`, purpose,
cycle, user index) through NumPy's `SeedSequence`, so a resumed run draws
what the uninterrupted one did.
"""

import dataclasses
import math
from typing import Mapping, Optional, Sequence

import numpy as np

from benchmark.core import constants
from benchmark.data import label_sets
from benchmark.data import pipeline

# Purpose tags of the draws (each its own stream).
_SEED_SET = 11
_RANDOM_CHOICE = 12
_SELECTION_CLIENT = 13

# Records parsed at once when the labels are read.
_READ_BATCH = 1024


def generator(seed: int, purpose: int, *keys: int) -> np.random.Generator:
  """A NumPy generator that depends only on `(seed, purpose, *keys)`."""
  entropy = [int(seed), int(purpose)] + [int(k) for k in keys]
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def selection_seed(seed: int, cycle: int, client_index: int) -> np.ndarray:
  """The stateless seed (int64 `[2]`) of one client's data in the
  selection pass of `cycle`: its shuffle, crops and flips when it trains
  (KSAS's local model) before scoring."""
  return generator(seed, _SELECTION_CLIENT, cycle, client_index).integers(
      0, 2**31, size=2, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class TrainImages:
  """The training users and the labels of their images.

  Attributes:
    client_ids: the training users, sorted (the order of every per-user
      array here).
    labels: per user, uint8 `[n_images, num_outputs]` multi-hot labels in
      file order.
  """
  client_ids: tuple[str, ...]
  labels: tuple[np.ndarray, ...]

  @property
  def sizes(self) -> np.ndarray:
    """int64 `[num_users]`: each user's number of images."""
    return np.array([len(l) for l in self.labels], np.int64)

  @property
  def max_images(self) -> int:
    """The largest number of images of one user."""
    return int(self.sizes.max())


def _label_parser(label_spec: label_sets.LabelSpec):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  features = {label_spec.feature_key: tf.io.VarLenFeature(tf.int64)}

  def parse(serialized):
    indices = tf.io.parse_example(serialized, features)[
        label_spec.feature_key]
    hot = tf.sparse.to_indicator(indices, label_spec.num_labels)
    if label_spec.binary_index is not None:
      hot = hot[:, label_spec.binary_index:label_spec.binary_index + 1]
    return hot

  return parse


def read_train_images(tfrecords_dir: str,
                      label_spec: label_sets.LabelSpec) -> TrainImages:
  """Reads the labels of every training image (no image decoded).

  Args:
    tfrecords_dir: a prepared directory (checked by the trainer first).
    label_spec: the labels the run trains on (coarse, fine-grained or one
      binary label, as `data.pipeline` makes them).

  Returns:
    The `TrainImages` of the `train` partition.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  files = pipeline.partition_files(tfrecords_dir, constants.TRAIN)
  client_ids = tuple(sorted(files))
  parse = _label_parser(label_spec)
  labels = []
  for client_id in client_ids:
    batches = tf.data.TFRecordDataset(files[client_id]).batch(_READ_BATCH)
    parts = [parse(batch).numpy().astype(np.uint8) for batch in batches]
    labels.append(np.concatenate(parts) if parts else
                  np.zeros([0, label_spec.num_outputs], np.uint8))
  return TrainImages(client_ids, tuple(labels))


def seed_masks(sizes: Sequence[int], seed: int, fraction: float,
               count: Optional[int] = None) -> list[np.ndarray]:
  """Each user's seed set, drawn uniformly without replacement.

  Args:
    sizes: each user's number of images (>= 1), in user order.
    seed: the run's `--seed`.
    fraction: the seed set is `ceil(fraction * size)` images (at least
      one), as KAFAL's code takes its base set.
    count: when given, `min(count, size)` images instead.

  Returns:
    Per user, a bool mask `[size]` of its labelled images.
  """
  masks = []
  for index, size in enumerate(sizes):
    take = (min(int(count), int(size)) if count is not None
            else max(1, math.ceil(fraction * int(size) - 1e-9)))
    mask = np.zeros(int(size), bool)
    chosen = generator(seed, _SEED_SET, index).permutation(int(size))[:take]
    mask[chosen] = True
    masks.append(mask)
  return masks


def split_budget(weights: Sequence[float], room: Sequence[int],
                 budget: int) -> np.ndarray:
  """Splits `budget` images across users in proportion to `weights`,
  spending exactly `min(budget, sum(room))` and giving no user more than
  its `room` (its pool).

  Largest remainders (Hamilton's apportionment): each user gets the floor
  of its quota, the images left go to the largest fractional parts (ties
  to the lower user index); what users without room cannot take is split
  again over the others, in the same way, until it is spent.

  Args:
    weights: per user, >= 0 (KAFAL's code: the user's number of images).
    room: per user, the images it can still label (>= 0).
    budget: the images to label (>= 0).

  Returns:
    int64 `[num_users]`, summing to `min(budget, sum(room))`.
  """
  weights = np.asarray(weights, np.float64)
  room = np.asarray(room, np.int64)
  given = np.zeros(len(room), np.int64)
  left = int(min(budget, int(room.sum())))
  while left > 0:
    open_ = given < room
    share = np.where(open_, weights, 0.0)
    if share.sum() <= 0:
      share = open_.astype(np.float64)
    quota = left * share / share.sum()
    base = np.floor(quota).astype(np.int64)
    rest = left - int(base.sum())
    order = sorted(np.flatnonzero(open_),
                   key=lambda i: (-(quota[i] - base[i]), i))
    base[order[:rest]] += 1
    give = np.minimum(base, room - given)
    given += give
    left -= int(give.sum())
  return given


def choose_top(scores: np.ndarray, pool: np.ndarray,
               budget: int) -> np.ndarray:
  """The `budget` pool images of highest score (ties to the lower index),
  sorted by index.

  Args:
    scores: float `[n_images]` of one user (only pool entries are read;
      NaN counts as the lowest score).
    pool: int indices of the user's pool images.
    budget: at most `len(pool)`.
  """
  values = np.nan_to_num(np.asarray(scores, np.float64)[pool], nan=-np.inf)
  order = np.lexsort((pool, -values))
  return np.sort(pool[order[:budget]])


def choose_random(pool: np.ndarray, budget: int, seed: int, cycle: int,
                  client_index: int) -> np.ndarray:
  """`budget` pool images drawn uniformly without replacement, keyed by
  `(seed, cycle, client_index)`; sorted by index."""
  rng = generator(seed, _RANDOM_CHOICE, cycle, client_index)
  return np.sort(rng.choice(pool, size=budget, replace=False))


def add_chosen(masks: Sequence[np.ndarray],
               chosen: Mapping[int, Sequence[int]]) -> list[np.ndarray]:
  """The labelled masks with the `chosen` images (user index -> image
  indices) labelled too.

  Raises:
    ValueError: an index out of range, repeated, or of an image already
      labelled.
  """
  masks = [m.copy() for m in masks]
  for user, indices in chosen.items():
    indices = np.asarray(indices, np.int64)
    mask = masks[user]
    if len(set(indices.tolist())) != len(indices):
      raise ValueError(f"user {user}: an image is chosen twice")
    if len(indices) and (indices.min() < 0 or indices.max() >= len(mask)):
      raise ValueError(f"user {user}: an image index is out of range")
    if mask[indices].any():
      raise ValueError(f"user {user}: an image already labelled is chosen")
    mask[indices] = True
  return masks
