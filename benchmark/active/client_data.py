"""A client's data in the active-learning process, built inside TFF from
its input: its labelled images as training batches, its pool as images to
score, and its label counts and orders.

A client's input (`INPUT_NAMES`, what the host sends: `active.inputs`):

* `client_id`: tf.string, the training user;
* `seed`: int64 `[2]`, the stateless seed of its shuffle, crops, flips
  and mixing (`data.pipeline.create_train_preprocess_fn`);
* `labelled`: int32 `[n_images]`, 1 for each labelled image of its file,
  0 for each pool image;
* `counts`: float32 `[L + 1]`, how many labelled images carry each label,
  then the number of labelled images (its label prior,
  `active.scores.label_log_odds`);
* `control`: int32 `[4]`: train (1: train on the labelled images), score
  (1: score the pool), compensate (1: KCFU's compensatory term on), slot
  (its row in the round's score matrix, -1 for none).

Its data (`client_data_computation`), a structure of three sequences as
TFF's client work takes them:

* `train`: batches `(x uint8 [b, 256, 256, 3], y int32 [b, L])` of the
  labelled images, shuffled, truncated, repeated, augmented and batched
  exactly as FedAvg's clients do (`pipeline.create_train_preprocess_fn`,
  from `seed` itself); with KCFU each batch also holds `u float32 [b', 256,
  256, 3]`, mixed augmented pool images (`active.scores.mixup`; the
  labelled images when the pool is empty); empty when train is 0;
* `score`: batches `(s uint8 [b, 256, 256, 3], i int32 [b])` of the pool
  images and their indices in the file, in file order, not augmented;
  empty when score is 0;
* `info`: one element, `(counts, control)`.

Records are selected before they are decoded, so a round decodes only the
images it uses.
"""

import collections
import os
from typing import Optional, Sequence

import tensorflow as tf
import tensorflow_federated as tff

from benchmark.active import scores
from benchmark.core import constants
from benchmark.data import augmentation
from benchmark.data import label_sets
from benchmark.data import pipeline

INPUT_NAMES = ("client_id", "seed", "labelled", "counts", "control")
CONTROL_TRAIN = 0
CONTROL_SCORE = 1
CONTROL_COMPENSATE = 2
CONTROL_SLOT = 3
CONTROL_SIZE = 4


def input_specs(num_outputs: int) -> tuple[tf.TensorSpec, ...]:
  """The TensorSpecs of a client's input, in `INPUT_NAMES` order."""
  return (tf.TensorSpec([], tf.string),
          tf.TensorSpec(augmentation.SEED_SHAPE, tf.int64),
          tf.TensorSpec([None], tf.int32),
          tf.TensorSpec([num_outputs + 1], tf.float32),
          tf.TensorSpec([CONTROL_SIZE], tf.int32))


def _records(train_dir: str, client_id: tf.Tensor) -> tf.data.Dataset:
  """`(index int64, serialized record)` of the user's file."""
  path = tf.strings.join([train_dir, os.sep, client_id,
                          constants.TFRECORD_SUFFIX])
  return pipeline.enumerated(tf.data.TFRecordDataset(path))


def _when(dataset: tf.data.Dataset, flag: tf.Tensor) -> tf.data.Dataset:
  """`dataset` when `flag` is 1, else empty."""
  return dataset.take(tf.where(tf.equal(flag, 1), tf.constant(-1, tf.int64),
                               tf.constant(0, tf.int64)))


def _pool_images(records: tf.data.Dataset, labelled: tf.Tensor, parse,
                 spec: pipeline.ClientSpec, crop_size: Sequence[int],
                 seed: tf.Tensor) -> tf.data.Dataset:
  """KCFU's unlabelled batches: the pool (all images when it is empty),
  shuffled, repeated without end, augmented, batched and mixed."""
  empty_pool = tf.equal(tf.reduce_sum(1 - labelled), 0)

  def in_pool(index, record):
    del record
    return tf.logical_or(tf.equal(labelled[index], 0), empty_pool)

  def image_only(image, label):
    del label
    return image

  shuffle_seed, augment_seed, mix_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  images = records.filter(in_pool).map(_parsed(parse)).shuffle(
      spec.shuffle_buffer_size, seed=augmentation.scalar_seed(shuffle_seed),
      reshuffle_each_iteration=True).repeat()
  batches = pipeline.augmented(images, augment_seed, crop_size).map(
      image_only).batch(spec.batch_size)

  def mix(step, batch):
    return scores.mixup(batch, augmentation.example_seeds(mix_seed, step))

  return pipeline.enumerated(batches).map(mix)


def _parsed(parse):
  """`(index, record) -> (image, label)`."""

  def parse_indexed(index, record):
    del index
    return parse(record)

  return parse_indexed


def _labelled_is(labelled: tf.Tensor, value: int):
  """`(index, record) -> whether labelled[index] == value`."""

  def predicate(index, record):
    del record
    return tf.equal(labelled[index], value)

  return predicate


def client_data_computation(
    train_dir: str, label_spec: label_sets.LabelSpec,
    client_spec: pipeline.ClientSpec, crop_size: Optional[Sequence[int]],
    score_batch_size: int, kcfu: bool) -> tff.Computation:
  """The TFF computation `client input -> client data` (module docstring).

  Args:
    train_dir: the training partition's folder (`<user id>.tfrecords`).
    label_spec: the labels trained on.
    client_spec: the clients' batches, epochs and truncation (FedAvg's).
    crop_size: the training crop (augmentation), or None for none.
    score_batch_size: images per batch when scoring the pool.
    kcfu: add KCFU's mixed pool images `u` to the training batches.
  """
  parse = pipeline.create_parse_fn(label_spec)
  preprocess = pipeline.create_train_preprocess_fn(client_spec, crop_size)
  options = tf.data.Options()
  options.experimental_optimization.apply_default_optimizations = False
  options.autotune.enabled = False

  @tff.tensorflow.computation(*input_specs(label_spec.num_outputs))
  def client_data(client_id, seed, labelled, counts, control):
    records = _records(train_dir, client_id)
    train = preprocess(records.filter(_labelled_is(labelled, 1)).map(
        _parsed(parse)), seed).map(_as_dict("x", "y"))
    if kcfu:
      pool = _pool_images(records, labelled, parse, client_spec,
                          crop_size or (constants.IMAGE_SIZE,) * 2,
                          tf.random.experimental.stateless_fold_in(seed, 1))
      train = tf.data.Dataset.zip((train, pool)).map(_with_pool)
    score = records.filter(_labelled_is(labelled, 0)).map(
        _image_and_index(parse)).batch(score_batch_size)
    info = tf.data.Dataset.from_tensors(
        collections.OrderedDict(counts=counts, control=control))
    return collections.OrderedDict(
        train=_when(train, control[CONTROL_TRAIN]).with_options(options),
        score=_when(score, control[CONTROL_SCORE]).with_options(options),
        info=info)

  return client_data


def _as_dict(*names: str):
  def as_dict(*values):
    return collections.OrderedDict(zip(names, values))
  return as_dict


def _with_pool(batch, pool_images):
  return collections.OrderedDict(x=batch["x"], y=batch["y"], u=pool_images)


def _image_and_index(parse):
  def image_and_index(index, record):
    return collections.OrderedDict(s=parse(record)[0],
                                   i=tf.cast(index, tf.int32))
  return image_and_index
