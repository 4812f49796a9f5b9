"""FLAIR-IID: the training images given to users at random, by one of two
definitions (`--iid_definition`).

`real_users` (this suite's, `load_iid_partition`): the IID variant keeps
the training users (their ids and number) and how many images each has, and
only changes which images: all training images are put in one list (users
in sorted id order, each user's records in file order), a seeded
permutation of that list is drawn (`numpy.random.default_rng(seed)
.permutation`), and it is cut into consecutive pieces of the users' sizes,
in sorted user order. So each training user gets a uniformly random set of
images of its own size, every image goes to exactly one user, and the same
seed and data always give the same dealing (a resumed run trains on the same
clients).

`pfl` (pfl-research's `flair_iid`, `load_pfl_iid_partition`): users are
made up, ignoring the user ids. pfl-research's `ArtificialFederatedDataset`
(apple/pfl-research benchmarks/dataset/flair/numpy.py,
`make_artificial_federated_dataset`, with benchmarks/flair/configs/
baseline.yaml's constant 50 images per user) draws, every time a user is
sampled, that many image indices uniformly at random with replacement from
all the partition's images (`pfl.data.sampling.get_data_sampler("random")`).
Here a made-up user draws `user_size` images the same way from the seed its
round and place give it (`training.seeds.client_seed`, so the draws follow
`--seed` and a resumed run draws what the uninterrupted one did); there are
as many made-up users as real ones, so cohorts and the DP population keep
their sizes.

The val and test partitions are not changed. Nothing is rewritten: a
client's dataset reads its records from the per-user files (`(file, record
number)` pairs, a `tf.data` pipeline that can be traced inside a TFF
computation). Reading record k of a file reads the file up to it, so an
IID client reads more than a non-IID one.

`label_skew` measures how far users' label mixes are from the partition's
(0 when every user has the partition's mix), the statistic that shows the
variant is more uniform than the users' own data.
"""

from typing import Callable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from benchmark.core import constants
from benchmark.core.errors import FlairInputError
from benchmark.data import formats
from benchmark.data import label_sets
from benchmark.data import pipeline

REAL_USERS = "real_users"
PFL = "pfl"
DEFINITIONS = (REAL_USERS, PFL)
# pfl-research's images per made-up FLAIR user (benchmarks/flair/configs/
# baseline.yaml: mean_datapoints_per_user 50, datapoints_per_user_distribution
# constant).
PFL_USER_SIZE = 50
# Client ids of the made-up users: this prefix and a zero-padded number.
PFL_CLIENT_PREFIX = "iid_"


def deal(sizes: Sequence[int], seed: int) -> list[np.ndarray]:
  """Deals `sum(sizes)` items out to users of the given sizes, at random.

  Args:
    sizes: the number of items of each user (>= 0), in user order.
    seed: the permutation's seed (>= 0).

  Returns:
    For each user, an int64 array of `sizes[u]` distinct item numbers in
    `[0, sum(sizes))` (items numbered in user order); together a partition
    of all items. The same sizes and seed give the same arrays.

  Raises:
    FlairInputError: a negative size or seed.
  """
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or (
      seed < 0):
    raise FlairInputError(f"--iid_seed must be an integer >= 0, got {seed!r}")
  sizes = np.asarray(sizes, dtype=np.int64)
  if sizes.size and sizes.min() < 0:
    raise FlairInputError(f"user sizes must be >= 0, got {sizes.min()}")
  permutation = np.random.default_rng(seed).permutation(int(sizes.sum()))
  return np.split(permutation.astype(np.int64), np.cumsum(sizes)[:-1])


def load_iid_partition(
    tfrecords_dir: str, label_spec: label_sets.LabelSpec, seed: int,
    partition: str = constants.TRAIN) -> tff.simulation.datasets.ClientData:
  """The partition's users with their images dealt out at random (see the
  module doc).

  Args:
    tfrecords_dir: a directory written by `prepare_tfrecords.py`.
    label_spec: from `label_sets.load_label_spec` on the same directory.
    seed: the dealing's seed.
    partition: the partition to deal (the trainers deal `train` only).

  Returns:
    Client data with the partition's user ids as client ids, client `u`
    holding as many examples as user `u`'s file; elements as
    `pipeline.load_partition`'s: `(image uint8 [256, 256, 3], label int32
    [num_outputs])`. Its `serializable_dataset_fn` can be traced inside a
    TFF computation.

  Raises:
    FlairInputError: as `pipeline.load_partition`, or a user file that cannot
      be read or ends inside a record.
  """
  user_ids, paths, sizes, item_file, item_record = _items(tfrecords_dir,
                                                         partition)
  dealt = deal(sizes, seed)
  order = np.concatenate(dealt)
  row_splits = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
  return tff.simulation.datasets.ClientData.from_clients_and_tf_fn(
      user_ids, _make_dataset_fn(user_ids, paths, item_file[order],
                                 item_record[order], row_splits,
                                 pipeline.create_parse_fn(label_spec)))


def _items(tfrecords_dir: str, partition: str
          ) -> tuple[list[str], list[str], list[int], np.ndarray, np.ndarray]:
  """The partition's users (sorted), their files, their numbers of records,
  and for each image (numbered in user order, each user's records in file
  order) its file number and record number, int64 arrays.

  Raises:
    FlairInputError: as `pipeline.partition_files`, or no record at all.
  """
  files = pipeline.partition_files(tfrecords_dir, partition)
  user_ids = sorted(files)
  paths = [files[u] for u in user_ids]
  sizes = [len(formats.tfrecord_lengths(p)) for p in paths]
  if not sum(sizes):
    raise FlairInputError(
        f"partition {partition!r} of --tfrecords_dir {tfrecords_dir!r} holds "
        "no records to deal")
  item_file = np.repeat(np.arange(len(paths), dtype=np.int64), sizes)
  item_record = np.concatenate(
      [np.arange(n, dtype=np.int64) for n in sizes])
  return user_ids, paths, sizes, item_file, item_record


def _records(files: tf.Tensor, records: tf.Tensor,
             parse: Callable) -> tf.data.Dataset:
  """The parsed examples of `(file, record number)` pairs, in order."""

  def one_record(path, record):
    return tf.data.TFRecordDataset(path).skip(record).take(1)

  return tf.data.Dataset.from_tensor_slices((files, records)).flat_map(
      one_record).map(parse, num_parallel_calls=tf.data.AUTOTUNE,
                      deterministic=True)


def _make_dataset_fn(user_ids: list[str], paths: list[str],
                     pair_file: np.ndarray, pair_record: np.ndarray,
                     row_splits: np.ndarray,
                     parse: Callable) -> Callable[[tf.Tensor], tf.data.Dataset]:
  """`client id -> dataset` over the client's `(file, record)` pairs, the
  pairs of user `user_ids[i]` being `[row_splits[i], row_splits[i + 1])`."""

  def dataset_fn(client_id) -> tf.data.Dataset:
    # Built inside the caller's graph (a TFF computation may trace it), as
    # FilePerUserClientData builds its table.
    rows = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(user_ids), tf.range(len(user_ids), dtype=tf.int64)),
        default_value=-1)
    row = rows.lookup(tf.convert_to_tensor(client_id, tf.string))
    splits = tf.constant(row_splits)
    start, end = splits[row], splits[row + 1]
    client_files = tf.gather(tf.constant(paths), tf.constant(pair_file)[
        start:end])
    client_records = tf.constant(pair_record)[start:end]
    return _records(client_files, client_records, parse)

  return dataset_fn


class PflIidClients:
  """pfl-research's FLAIR-IID training clients (module doc): made-up users
  that draw their images anew each time they train.

  Attributes:
    client_ids: `PFL_CLIENT_PREFIX` and a zero-padded number for each made-up
      user, as many as the partition's users (sorted order is number
      order).
    user_size: the images each draws.
  """

  def __init__(self, num_users: int, user_size: int, paths: list[str],
               item_file: np.ndarray, item_record: np.ndarray,
               parse: Callable):
    width = len(str(max(num_users - 1, 0)))
    self.client_ids = [f"{PFL_CLIENT_PREFIX}{i:0{width}d}"
                       for i in range(num_users)]
    self.user_size = user_size
    self._paths = list(paths)
    self._item_file = item_file
    self._item_record = item_record
    self._parse = parse

  @property
  def num_images(self) -> int:
    """The images of the partition, which every draw chooses from."""
    return len(self._item_file)

  def seeded_dataset_fn(self, seed: tf.Tensor) -> tf.data.Dataset:
    """One made-up user's examples: `user_size` image numbers drawn
    uniformly from `[0, num_images)`, with replacement, by
    `tf.random.stateless_uniform` from `seed` (int64 [2]), then read and
    parsed as `pipeline.load_partition`'s elements `(image uint8 [256, 256,
    3], label int32 [num_outputs])`, in draw order. The same seed gives the
    same images. Pure TF ops: can be traced inside a TFF computation."""
    items = tf.random.stateless_uniform(
        [self.user_size], seed=tf.cast(seed, tf.int64), minval=0,
        maxval=self.num_images, dtype=tf.int64)
    files = tf.gather(tf.constant(self._paths),
                      tf.gather(tf.constant(self._item_file), items))
    records = tf.gather(tf.constant(self._item_record), items)
    return _records(files, records, self._parse)


def load_pfl_iid_partition(
    tfrecords_dir: str, label_spec: label_sets.LabelSpec, user_size: int,
    partition: str = constants.TRAIN) -> PflIidClients:
  """pfl-research's FLAIR-IID clients of a partition (see the module doc and
  `PflIidClients`), each drawing `user_size` images.

  Raises:
    FlairInputError: as `pipeline.load_partition`, a partition without
      records, or a `user_size` below 1.
  """
  if isinstance(user_size, bool) or not isinstance(user_size, int) or (
      user_size < 1):
    raise FlairInputError(
        f"--iid_user_size must be an integer >= 1, got {user_size!r}")
  user_ids, paths, _, item_file, item_record = _items(tfrecords_dir,
                                                      partition)
  return PflIidClients(len(user_ids), user_size, paths, item_file,
                       item_record, pipeline.create_parse_fn(label_spec))


def label_skew(user_labels: Sequence[np.ndarray]) -> float:
  """How far the users' label mixes are from the partition's, in [0, 1].

  A user's label mix is the share of each label among all label
  occurrences of its images; the partition's mix is the same over all
  images. The statistic is the mean over users, weighted by their number of
  images, of the total variation distance (half the L1 distance) between
  the user's mix and the partition's. It is 0 when every user has the
  partition's mix, and approaches 1 when many users each hold labels that
  no other user has (two such users of equal size give 0.5). Random
  dealing leaves a small value from sampling alone (users with few images).

  Args:
    user_labels: per user, an int array `[num_images, num_labels]` of 0/1
      (multi-hot labels).

  Returns:
    The statistic (a Python float).

  Raises:
    ValueError: no user with a labelled image.
  """
  counts = [np.asarray(u, dtype=np.float64).sum(axis=0) for u in user_labels
            if len(u)]
  weights = np.asarray([len(u) for u in user_labels if len(u)], np.float64)
  total = np.sum(counts, axis=0)
  if not counts or total.sum() == 0:
    raise ValueError("label_skew needs at least one labelled image")
  overall = total / total.sum()
  distances = []
  for c in counts:
    mix = c / c.sum() if c.sum() else np.zeros_like(c)
    distances.append(0.5 * np.abs(mix - overall).sum())
  return float(np.average(distances, weights=weights))
