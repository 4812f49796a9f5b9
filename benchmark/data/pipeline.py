"""Per-user FLAIR TFRecords as TFF client data, and client preprocessing.

A prepared TFRecords directory (docs/formats.md, "Per-user TFRecords") is

    <tfrecords_dir>/label_index.json   (or label_to_index.json)
    <tfrecords_dir>/<partition>/<user_id>.tfrecords

with partitions `train`, `val` (also accepted as `dev`) and `test`. Each user
file holds one `tf.train.Example` per image with the JPEG bytes and the int64
indices of its coarse and fine-grained labels. Here each partition becomes a
`tff.simulation.datasets.FilePerUserClientData` with one client per user file
(client id = file name without `.tfrecords` = the FLAIR user id), whose
elements are `(image, label)`:

* `image`: `tf.uint8`, shape `[256, 256, 3]`, the decoded JPEG;
* `label`: `tf.int32`, shape `[num_outputs]`: a multi-hot vector over the
  coarse (17) or fine-grained labels, or, with a binary label, a single 0/1
  value that is 1 iff the image carries that label.

Decoding and preprocessing are pure `tf.data` / TF ops, so the client datasets
can be built inside TFF computations (`serializable_dataset_fn`).

The layout follows TFF's `FilePerUserClientData` and the preprocessing mirrors
TFF's baseline `ClientSpec` (shuffle, take `max_elements`, repeat epochs,
batch).
"""

import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from benchmark.core import constants
from benchmark.core import validate
from benchmark.core.errors import FlairInputError
from benchmark.data import augmentation
from benchmark.data import formats
from benchmark.data import label_sets

PreprocessFn = Callable[[tf.data.Dataset], tf.data.Dataset]


def create_parse_fn(label_spec: label_sets.LabelSpec
                   ) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
  """Returns a pure-TF function: serialized `tf.train.Example` -> example.

  The returned function maps a scalar `tf.string` to `(image, label)`, image
  `tf.uint8 [256, 256, 3]` (decoded JPEG, channels forced to 3; a JPEG of
  another size fails at run time with an `InvalidArgumentError`), label
  `tf.int32 [label_spec.num_outputs]` (multi-hot over `label_spec.names`, or
  `[1]` / `[0]` for the binary label). A label index outside
  `[0, num_labels)` fails at run time with an `InvalidArgumentError`.
  """
  num_labels = label_spec.num_labels
  binary_index = label_spec.binary_index
  features = {
      constants.IMAGE_FEATURE: tf.io.FixedLenFeature([], tf.string),
      label_spec.feature_key: tf.io.VarLenFeature(tf.int64),
  }

  def parse(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    parsed = tf.io.parse_single_example(serialized, features)
    image = tf.io.decode_jpeg(parsed[constants.IMAGE_FEATURE], channels=3)
    image = tf.ensure_shape(image, constants.IMAGE_SHAPE)
    indices = parsed[label_spec.feature_key].values
    checks = [
        _check(tf.reduce_all(indices >= 0),
               "negative label index in a TFRecord", indices),
        _check(tf.reduce_all(indices < num_labels),
               f"label index >= {num_labels} in a TFRecord (does the label "
               "index JSON match the records?)", indices),
    ]
    with tf.control_dependencies(checks):
      if binary_index is not None:
        present = tf.reduce_any(tf.equal(indices, binary_index))
        label = tf.reshape(tf.cast(present, tf.int32), [1])
      else:
        counts = tf.math.bincount(tf.cast(indices, tf.int32),
                                  minlength=num_labels, maxlength=num_labels,
                                  dtype=tf.int32)
        label = tf.minimum(counts, 1)
    label = tf.ensure_shape(label, [label_spec.num_outputs])
    return image, label

  return parse


def _check(condition: tf.Tensor, message: str,
           values: tf.Tensor) -> tf.Operation:
  """An op that fails with `InvalidArgumentError` ("assertion failed:
  [message] [values...]") when the boolean scalar `condition` is false.

  TensorFlow's `tf.debugging.assert_*` put their `Assert` in a `tf.cond`,
  whose two branches are functions of their own; a client's dataset
  instantiates the functions of its map anew for every client, and those
  branches cost about 1.3 ms per check and client (docs/performance.md,
  "Per-client cost"). The plain `Assert` op checks the same."""
  return tf.raw_ops.Assert(condition=condition,
                           data=[tf.constant(message), values], summarize=8)


def create_dataset_fn(
    label_spec: label_sets.LabelSpec,
    max_records: Optional[int] = None) -> Callable[[str], tf.data.Dataset]:
  """Returns `path -> tf.data.Dataset` of parsed examples of one user file.

  `path` may be a Python string or a scalar `tf.string` tensor (as TFF's
  `FilePerUserClientData.serializable_dataset_fn` passes it). With
  `max_records`, only the file's first `max_records` records are read and
  decoded (for a fixed subset of a user's images, as
  `scripts/bench_vs_pfl.py` trains central on).

  Raises:
    FlairInputError: if `max_records` is not None or a positive integer.
  """
  validate.check_int("max_records", max_records, allow_none=True)
  parse = create_parse_fn(label_spec)

  def dataset_fn(path) -> tf.data.Dataset:
    records = tf.data.TFRecordDataset(path)
    if max_records is not None:
      records = records.take(max_records)
    return records.map(
        parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  return dataset_fn


def _partition_dir(tfrecords_dir: str, partition: str) -> str:
  """Resolves `partition` (or its alias) to its one existing directory."""
  path = formats.find_partition_dir(tfrecords_dir, partition)
  if path is None:
    candidates = formats.partition_folder_names(partition)
    raise FlairInputError(
        f"partition {candidates[0]!r} not found in --tfrecords_dir "
        f"{tfrecords_dir!r}: expected a subdirectory "
        f"{' or '.join(repr(c + '/') for c in candidates)}")
  return path


def load_partition(tfrecords_dir: str, partition: str,
                   label_spec: label_sets.LabelSpec
                  ) -> tff.simulation.datasets.FilePerUserClientData:
  """Loads one partition as TFF client data, one client per user file.

  Args:
    tfrecords_dir: a directory written by `prepare_tfrecords.py`.
    partition: `train`, `val` or `test`; `dev` is accepted for `val`, and a
      `dev/` directory is read in place of `val/` (both is an error).
    label_spec: from `load_label_spec` on the same directory.

  Returns:
    Client data whose client ids are the user file stems (user ids) and whose
    elements are `(image uint8 [256, 256, 3], label int32 [num_outputs])`.

  Raises:
    FlairInputError: if the directory or partition is missing, the partition
      name is unknown, both `val/` and `dev/` exist, or the partition holds
      no `*.tfrecords` file.
  """
  return tff.simulation.datasets.FilePerUserClientData(
      partition_files(tfrecords_dir, partition), create_dataset_fn(label_spec))


def partition_files(tfrecords_dir: str, partition: str) -> dict[str, str]:
  """The user files of one partition: `{user id: path}`, sorted by user id.

  Raises:
    FlairInputError: as `load_partition`.
  """
  directory = _partition_dir(tfrecords_dir, partition)
  files = formats.user_files(directory)
  if not files:
    raise FlairInputError(
        f"partition directory {directory!r} holds no "
        f"*{constants.TFRECORD_SUFFIX} files "
        "(expected one file per user)")
  return files


def load_client_data(
    tfrecords_dir: str, label_spec: label_sets.LabelSpec
) -> dict[str, tff.simulation.datasets.FilePerUserClientData]:
  """Loads all three partitions: `{"train": ..., "val": ..., "test": ...}`.

  Raises:
    FlairInputError: as `load_partition`, for any partition.
  """
  return {partition: load_partition(tfrecords_dir, partition, label_spec)
          for partition in constants.PARTITIONS}


@dataclasses.dataclass(frozen=True)
class ClientSpec:
  """How a training client turns its examples into batches.

  Attributes:
    num_epochs: passes over the (possibly truncated) client data, >= 1.
    batch_size: examples per batch, >= 1 (the last batch may be smaller).
    max_elements: at most this many examples per client (>= 1), or None for
      all of them.
    shuffle_buffer_size: buffer of `tf.data.Dataset.shuffle`, >= 1; 1 means no
      shuffling.
  """
  num_epochs: int
  batch_size: int
  max_elements: Optional[int] = None
  shuffle_buffer_size: int = 1000

  def __post_init__(self):
    validate.check_int("ClientSpec.num_epochs", self.num_epochs)
    validate.check_int("ClientSpec.batch_size", self.batch_size)
    validate.check_int("ClientSpec.max_elements", self.max_elements,
                       allow_none=True)
    validate.check_int("ClientSpec.shuffle_buffer_size",
                       self.shuffle_buffer_size)


def create_train_preprocess_fn(
    spec: ClientSpec, crop_size: Optional[Sequence[int]] = None
) -> Callable[[tf.data.Dataset, tf.Tensor], tf.data.Dataset]:
  """Returns the training preprocessing of one client's dataset.

  `preprocess(dataset, seed)`: the client's examples are shuffled once
  (buffer `spec.shuffle_buffer_size`, order drawn from `seed`), the first
  `spec.max_elements` are kept, that sequence is repeated `spec.num_epochs`
  times, each example of it is augmented (`augmentation.augment`, its seed
  from `seed` and its position, so every epoch of an example draws anew)
  when `crop_size` is given, and the result is batched by `spec.batch_size`
  (the last batch may be smaller). The same `seed` gives the same batches.

  Only `tf.data` and stateless random ops are used, so the function can be
  traced inside a TFF computation.

  Args:
    spec: the validated client spec.
    crop_size: `(height, width)` of the model's input crop; None: no
      augmentation.

  Returns:
    `(dataset, seed int64 [2]) -> dataset` of batches `(images [b, 256,
    256, 3] uint8, labels [b, num_outputs] int32)`.
  """
  if not isinstance(spec, ClientSpec):
    raise TypeError(f"spec must be a ClientSpec, got {type(spec).__name__}")

  def preprocess(dataset: tf.data.Dataset,
                 seed: tf.Tensor) -> tf.data.Dataset:
    shuffle_seed, augment_seed = tf.unstack(
        tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2))
    if spec.shuffle_buffer_size > 1:
      dataset = dataset.shuffle(spec.shuffle_buffer_size,
                                seed=augmentation.scalar_seed(shuffle_seed),
                                reshuffle_each_iteration=False)
    if spec.max_elements is not None:
      dataset = dataset.take(spec.max_elements)
    dataset = dataset.repeat(spec.num_epochs)
    if crop_size is not None:
      dataset = augmented(dataset, augment_seed, crop_size)
    return dataset.batch(spec.batch_size)

  return preprocess


def augmented(dataset: tf.data.Dataset, seed: tf.Tensor,
              crop_size: Sequence[int]) -> tf.data.Dataset:
  """`dataset`'s `(image, label)` examples with each image augmented
  (`augmentation.augment`), example `i` from seed
  `augmentation.example_seeds(seed, i)`; order and labels unchanged.

  The map is sequential: a crop and a flip cost little beside the JPEG
  decoding (parallel in `create_dataset_fn`), and a parallel map here made
  every client's iterator about 20 ms slower to run through on the CPU,
  most of a one-image client's input cost (docs/performance.md, "Per-client
  cost"); the elements are the same either way."""

  def augment_one(index, example):
    image, label = example
    return augmentation.augment(
        image, augmentation.example_seeds(seed, index), crop_size), label

  return enumerated(dataset).map(augment_one)


def enumerated(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """`(index int64, element)` pairs of `dataset`, indices from 0: the
  elements of `dataset.enumerate()`. `enumerate` also marks its counter for
  a tf.data graph rewrite (`replicate_on_split`, for tf.data service
  splits), which every client's dataset then ran through when its iterator
  was made, about a millisecond per client (docs/performance.md,
  "Per-client cost"); a plain zip with a range is the same sequence."""
  counter = tf.data.Dataset.range(np.iinfo(np.int64).max)
  return tf.data.Dataset.zip((counter, dataset))


def create_eval_preprocess_fn(batch_size: int) -> PreprocessFn:
  """Returns the evaluation preprocessing: batching by `batch_size` (>= 1).

  Raises:
    FlairInputError: if `batch_size` is not a positive integer.
  """
  validate.check_int("eval batch_size", batch_size)

  def preprocess(dataset: tf.data.Dataset) -> tf.data.Dataset:
    return dataset.batch(batch_size)

  return preprocess


def keras_input(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Finishes a pipeline that Keras iterates afresh for every epoch or
  evaluation: `dataset.prefetch(tf.data.AUTOTUNE)` with tf.data's
  autotuning model turned off (`tf.data.Options().autotune.enabled =
  False`). Same elements, shapes and dtypes as `dataset`.

  With the model on (TF 2.14), destroying such an iterator returns only at
  the model thread's next wake-up; its wake-ups come 10, 20, 40, ... ms
  apart (doubling, up to 60 s), so each epoch or evaluation ended late
  (docs/performance.md). Without the model,
  `AUTOTUNE` stages run at TensorFlow's fixed default parallelism, and
  `prefetch(AUTOTUNE)` keeps its own buffer tuning.
  """
  options = tf.data.Options()
  options.autotune.enabled = False
  return dataset.prefetch(tf.data.AUTOTUNE).with_options(options)


def eval_dataset(client_data: tff.simulation.datasets.ClientData,
                 batch_size: int) -> tf.data.Dataset:
  """Every client of an evaluation partition pooled into one dataset, as both
  trainers evaluate: the clients in a fixed order (seed 0), batches of
  `batch_size` (`create_eval_preprocess_fn`), finished by `keras_input`.
  Elements: `(images [b, 256, 256, 3] uint8, labels [b, num_outputs]
  int32)`.

  Raises:
    FlairInputError: if `batch_size` is not a positive integer.
  """
  pooled = client_data.create_tf_dataset_from_all_clients(seed=0)
  return keras_input(create_eval_preprocess_fn(batch_size)(pooled))
