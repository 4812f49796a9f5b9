"""Training-time augmentation of FLAIR images, drawn from stateless seeds:
a random crop and a random horizontal flip that depend only on the seed
each example is given, whatever process, thread or backend computes them.

The model (`model.resnet`) crops the centre of every image it sees, in
training and at inference. For training, `augment` draws the crop here
instead: it cuts a `crop_size` window at a random offset (uniform over all
offsets, torchvision's `RandomCrop`), flips it left-right with probability
1/2, and puts it back at the centre of a black 256x256 image, so that the
model's centre crop is exactly the random window. An example's seed comes
from `example_seeds` (a run's seed, the round or epoch, the client, the
example's position), so that augmentation differs between examples,
epochs, clients and rounds, and is repeated exactly by a rerun.
"""

from typing import Sequence

import tensorflow as tf

from benchmark.core import constants

# A stateless seed: int64 [2] (TensorFlow's `tf.random.stateless_*`).
SEED_SHAPE = (2,)


def example_seeds(seed: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
  """The seed of example `index` of a dataset whose seed is `seed`.

  Args:
    seed: int64 `[2]`, the dataset's seed (e.g. one client in one round).
    index: int64 scalar, the example's position in the dataset (with its
      epochs repeated: a new position in each epoch).

  Returns:
    int64 `[2]` (`tf.random.experimental.stateless_fold_in`).
  """
  return tf.random.experimental.stateless_fold_in(
      tf.cast(seed, tf.int64), tf.cast(index, tf.int64))


def augment(image: tf.Tensor, seed: tf.Tensor,
            crop_size: Sequence[int]) -> tf.Tensor:
  """One image's random crop and flip, centred in a black image.

  Args:
    image: uint8 `[256, 256, 3]`.
    seed: int64 `[2]`, this example's seed (`example_seeds`).
    crop_size: `(height, width)` of the window, at most 256 each.

  Returns:
    uint8 `[256, 256, 3]`: zeros but for the window, flipped or not, at
    offsets `((256 - height) // 2, (256 - width) // 2)`, which is where the
    model's centre crop (`model.layers.CropImages`) takes it from.
  """
  height, width = (int(v) for v in crop_size)
  crop_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2))
  window = tf.image.stateless_random_crop(
      image, [height, width, constants.IMAGE_CHANNELS], seed=crop_seed)
  window = _flip_left_right(window, flip_seed)
  return tf.image.pad_to_bounding_box(
      window, (constants.IMAGE_SIZE - height) // 2,
      (constants.IMAGE_SIZE - width) // 2, constants.IMAGE_SIZE,
      constants.IMAGE_SIZE)


def _flip_left_right(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """`tf.image.stateless_random_flip_left_right(image, seed)` for one
  `[height, width, channels]` image, without its `tf.cond`: the same draw
  (a uniform float32 in [0, 1) from `seed`, flipped when below 0.5) and the
  same pixels. A cond's branches are functions that every client's dataset
  instantiates anew, about 1.8 ms per client (docs/performance.md,
  "Per-client cost"); here the flip is computed and selected."""
  draw = tf.random.stateless_uniform([], seed=seed, minval=0, maxval=1.0)
  return tf.where(draw < 0.5, tf.reverse(image, [1]), image)


def scalar_seed(seed: tf.Tensor) -> tf.Tensor:
  """An int64 scalar drawn from the stateless `seed` (int64 `[2]`), for the
  tf.data operations that take one (`Dataset.shuffle(seed=...)`)."""
  return tf.random.stateless_uniform([], seed=tf.cast(seed, tf.int64),
                                     minval=None, maxval=None,
                                     dtype=tf.int64)
