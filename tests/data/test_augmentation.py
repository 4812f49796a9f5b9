"""Tests of training-time augmentation (benchmark/data/augmentation.py) and
of its seeds through the client pipeline: the same seed gives the same
images; clients, rounds, epochs and examples get different crops and flips;
the model's centre crop takes exactly the random window."""

import numpy as np
import tensorflow as tf

from benchmark.core import constants
from benchmark.data import augmentation
from benchmark.data import pipeline
from benchmark.model import layers
from benchmark.training import seeds

CROP = (5, 7)


def _image(offset=0):
  """A 256x256x3 uint8 image whose pixels (rows x columns) are unique."""
  rows = np.arange(256)[:, None] * 256 + np.arange(256)[None, :]
  values = np.stack([rows, rows + 1, rows + 2], axis=-1) + offset
  return tf.constant(values % 251 + 1, tf.uint8)


def _window_of(augmented, image):
  """Where in `image` the model's centre crop of `augmented` comes from,
  and whether it is mirrored: `((top, left), flipped)`."""
  seen = layers.CropImages(*CROP)(augmented[tf.newaxis])[0].numpy()
  source = image.numpy().astype(np.float32)
  for flipped in (False, True):
    window = seen[:, ::-1] if flipped else seen
    for top in range(256 - CROP[0] + 1):
      for left in range(256 - CROP[1] + 1):
        if np.array_equal(source[top:top + CROP[0], left:left + CROP[1]],
                          window):
          return (top, left), flipped
  raise AssertionError("the centre crop is no window of the image")


def test_the_model_sees_a_random_window_of_the_image():
  image = _image()
  draws = [_window_of(augmentation.augment(image, tf.constant([0, i],
                                                              tf.int64),
                                           CROP), image)
           for i in range(24)]
  offsets = {offset for offset, _ in draws}
  assert len(offsets) > 20  # Offsets spread over the image.
  assert all(0 <= t <= 256 - CROP[0] and 0 <= l <= 256 - CROP[1]
             for t, l in offsets)
  assert 4 < sum(flipped for _, flipped in draws) < 20  # About half.
  outside = augmentation.augment(image, tf.constant([0, 1], tf.int64),
                                 CROP).numpy()
  assert outside.shape == constants.IMAGE_SHAPE
  assert np.count_nonzero(outside) == CROP[0] * CROP[1] * 3


def test_the_same_seed_gives_the_same_image():
  image, seed = _image(), tf.constant([4, 2], tf.int64)
  np.testing.assert_array_equal(augmentation.augment(image, seed, CROP),
                                augmentation.augment(image, seed, CROP))


def test_the_flip_is_tensorflows_stateless_random_flip():
  """`augment`'s cond-free flip draws and flips exactly as
  `tf.image.stateless_random_flip_left_right`."""
  image = _image()[:9, :11]
  flips = 0
  for i in range(40):
    seed = tf.constant([3, i], tf.int64)
    ours = augmentation._flip_left_right(image, seed)  # pylint: disable=protected-access
    np.testing.assert_array_equal(
        ours, tf.image.stateless_random_flip_left_right(image, seed))
    flips += not np.array_equal(ours, image)
  assert 5 < flips < 35  # Both outcomes were compared.


def _client_images(seed, num_epochs=1):
  """The images one client trains on (3 examples, its seed), in order."""
  images = tf.data.Dataset.from_tensor_slices(
      (tf.stack([_image(i) for i in range(3)]), tf.zeros([3, 1], tf.int32)))
  preprocess = pipeline.create_train_preprocess_fn(
      pipeline.ClientSpec(num_epochs=num_epochs, batch_size=100,
                          shuffle_buffer_size=1), crop_size=CROP)
  (batch, _), = preprocess(images, tf.constant(seed, tf.int64))
  return batch.numpy()


def test_clients_rounds_epochs_and_examples_are_augmented_differently():
  first = _client_images(seeds.client_seed(0, 1, 0), num_epochs=2)
  # The same example in its two epochs, and two examples of one epoch.
  assert not np.array_equal(first[0], first[3])
  assert not np.array_equal(first[0], first[1])
  again = _client_images(seeds.client_seed(0, 1, 0), num_epochs=2)
  np.testing.assert_array_equal(first, again)
  for other in (seeds.client_seed(0, 1, 1),   # Another client.
                seeds.client_seed(0, 2, 0),   # Another round.
                seeds.client_seed(1, 1, 0)):  # Another --seed.
    assert not np.array_equal(first[:3], _client_images(other))


def test_derived_seeds_differ_by_purpose_round_and_client():
  drawn = {tuple(seeds.client_seed(0, r, c)) for r in range(1, 4)
           for c in range(50)}
  drawn |= {tuple(seeds.epoch_seed(0, e)) for e in range(10)}
  assert len(drawn) == 160
  assert seeds.cohort_seed(0) != seeds.cohort_seed(1)
  np.testing.assert_array_equal(seeds.client_seed(5, 3, 7),
                                seeds.client_seed(5, 3, 7))
