"""Generates a FLAIR-like synthetic dataset: the demo's and the tests' data.

`generate(dataset_dir, num_users, seed)` writes a directory in the layout of a
downloaded FLAIR dataset (docs/formats.md, "Download layout"):

* `labels_and_metadata.json`: one record per image with `user_id`,
  `image_id` (a string of digits), `labels` (coarse), `fine_grained_labels`
  and `partition` (`train`, `val` or `test`);
* `label_relationship.txt`: `fine -> coarse` lines;
* `small_images/<image_id>.jpg`: 256x256 RGB JPEGs;
* `README.txt`: says that the data is synthetic.

Statistics follow the full FLAIR dataset (`statistics.json` in
../shared/flair_sample, computed from the outputs of explore_labels.ipynb in
apple/ml-flair); the numbers are copied into this module as constants so that
it runs without that folder:

* the 17 real coarse label names (`constants.COARSE_LABELS`) at their real
  relative image frequencies, ~2.8 coarse labels per image (each label is an
  independent draw with its real per-image probability, redrawn when an image
  would get none);
* heavy-tailed images per user (a discretised log-normal with median 2 and
  quartiles 1 and 5, like the real counts; optional cap);
* users split 8:1:1 into train/val/test, every partition non-empty.

The fine-grained labels and their mapping to coarse labels are MADE UP: each
coarse label `c` gets `FINE_LABELS_PER_COARSE` children named `c_0`, `c_1`, ...
(the real 1,628 names and their mapping are not reproduced).

Images: every label has a fixed "look" (a colour and a sinusoidal texture of
its own orientation and period, 4-16 pixels) that is added over the whole
image, so the label set can be learnt even from small random crops (32x32).
Each user shifts that look (its own tint, brightness, contrast, background
texture and a small rotation/scaling of every label texture), making the data
non-IID by user; each image adds an illumination ramp and pixel noise.

Generation is deterministic: the same arguments and seed give the same bytes
(with the same Pillow/libjpeg build).
"""

import io
import math
import os
from typing import Any, Optional

import numpy as np
from PIL import Image

from benchmark.core import constants
from benchmark.core import file_io
from benchmark.core import validate

# --- Statistics of the full FLAIR dataset -------------------------------------
# Source: ../shared/flair_sample/statistics.json ("computed on the full
# labels_and_metadata.json, as printed in the outputs of explore_labels.ipynb in
# apple/ml-flair").
REAL_NUM_IMAGES = 429078
REAL_COARSE_LABEL_IMAGE_COUNTS = {
    "structure": 228923,
    "equipment": 225862,
    "material": 139733,
    "outdoor": 131322,
    "plant": 123363,
    "food": 110792,
    "animal": 68858,
    "liquid": 68677,
    "art": 37230,
    "interior_room": 32042,
    "light": 11326,
    "recreation": 5651,
    "celebration": 3769,
    "fire": 3011,
    "music": 2571,
    "games": 1093,
    "religion": 866,
}
# per_image_labels.mean in statistics.json.
REAL_MEAN_LABELS_PER_IMAGE = 2.785249
# per_user_images median / q25 / q75 in statistics.json.
REAL_MEDIAN_IMAGES_PER_USER = 2
# Users per partition, statistics.json partition_users: 41131 / 5141 / 5142,
# i.e. 8:1:1.
PARTITION_FRACTIONS = {constants.TRAIN: 0.8, constants.VAL: 0.1,
                       constants.TEST: 0.1}

# --- Generator settings -------------------------------------------------------
# Made-up fine-grained labels: this many children per coarse label.
FINE_LABELS_PER_COARSE = 4
# Images per user: ceil(exp(N(log(1.7), 1.5^2))), i.e. median 2, quartiles 1
# and 5, a long right tail (a fit by eye to statistics.json per_user_images).
_IMAGES_PER_USER_LOG_MEDIAN = math.log(1.7)
_IMAGES_PER_USER_LOG_STD = 1.5
# Per-user label preference: the probability of label k for user u is
# p_k * exp(s * z_uk - s^2 / 2), z ~ N(0, 1) (mean-1 log-normal factor).
_USER_LABEL_PREFERENCE_STD = 0.5
_MAX_LABEL_PROBABILITY = 0.97
# The flag of benchmark/synthetic_dataset.py naming the output, in messages.
_FLAG = "--dataset_dir"
# Fine labels per present coarse label: 1 + Binomial(2, 0.33), mean ~1.66,
# giving ~4.6 fine labels per image like statistics.json per_image_fine_labels.
_EXTRA_FINE_TRIALS, _EXTRA_FINE_PROBABILITY = 2, 0.33
# Seed of the label "looks": fixed, so a label looks the same in every dataset.
_WORLD_SEED = 20220715
_JPEG_QUALITY = 90
_NOISE_STD = 8.0

README_TEXT = """\
This is a SYNTHETIC FLAIR-like dataset made by benchmark/synthetic_dataset.py.
The images are generated patterns, not photos. The 17 coarse label names and
their relative frequencies, the labels per image, the images per user and the
8:1:1 user split follow the statistics of the real FLAIR dataset. The
fine-grained label names and label_relationship.txt (fine -> coarse) are made
up: each coarse label c has children c_0, c_1, ...
"""


def fine_grained_label_names(coarse: str) -> list[str]:
  """The made-up fine-grained labels of coarse label `coarse`: `coarse_k`."""
  return [f"{coarse}_{k}" for k in range(FINE_LABELS_PER_COARSE)]


def label_relationship() -> list[tuple[str, str]]:
  """All (fine-grained label, coarse label) pairs of the generator (made up)."""
  return [(fine, coarse) for coarse in constants.COARSE_LABELS
          for fine in fine_grained_label_names(coarse)]


def coarse_label_probabilities() -> np.ndarray:
  """Per-image probability of each coarse label, float64 [17], in
  `constants.COARSE_LABELS` order: image count / number of images of the full
  dataset (statistics.json). They sum to ~2.79, the real labels per image."""
  return np.array([REAL_COARSE_LABEL_IMAGE_COUNTS[name] / REAL_NUM_IMAGES
                   for name in constants.COARSE_LABELS])


def _split_counts(num_users: int) -> dict[str, int]:
  """Users per partition, 8:1:1, each partition at least one user."""
  num_val = max(1, round(num_users * PARTITION_FRACTIONS[constants.VAL]))
  num_test = max(1, round(num_users * PARTITION_FRACTIONS[constants.TEST]))
  return {constants.TRAIN: num_users - num_val - num_test,
          constants.VAL: num_val, constants.TEST: num_test}


def _validate_arguments(num_users: int, seed: int,
                        max_images_per_user: Optional[int]) -> None:
  validate.check_int("num_users", num_users, 3,
                     reason="one user per partition at least")
  validate.check_int("seed", seed, 0)
  validate.check_int("max_images_per_user", max_images_per_user,
                     allow_none=True)


def _draw_users(rng: np.random.Generator, num_users: int,
                max_images_per_user: Optional[int]
                ) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
  """The users of a dataset: what `make_metadata` draws before the labels.

  Returns:
    `(partitions, user_ids, images_per_user, image_numbers)`: per user its
    partition (a random 8:1:1 assignment) and Flickr-like id
    (`<digits>@N0<d>`), int [num_users] image counts (at least 1, at most
    `max_images_per_user`), and int [total images] photo ids, increasing.
  """
  partitions = []
  for name, count in _split_counts(num_users).items():
    partitions += [name] * count
  partitions = [partitions[i] for i in rng.permutation(num_users)]

  # Flickr-like ids (NSID "<digits>@N0<d>", photo id a digit string), unique
  # because they grow by positive random gaps.
  user_numbers = 10_000_000 + np.cumsum(rng.integers(1, 1_000_000, num_users))
  user_suffixes = rng.integers(0, 10, num_users)
  user_ids = [f"{user_numbers[u]}@N0{user_suffixes[u]}"
              for u in range(num_users)]
  images_per_user = np.ceil(np.exp(
      _IMAGES_PER_USER_LOG_MEDIAN
      + _IMAGES_PER_USER_LOG_STD * rng.standard_normal(num_users))).astype(int)
  images_per_user = np.maximum(images_per_user, 1)
  if max_images_per_user is not None:
    images_per_user = np.minimum(images_per_user, max_images_per_user)
  total_images = int(images_per_user.sum())
  image_numbers = 10_000_000_000 + np.cumsum(
      rng.integers(1, 100_000, total_images))
  return partitions, user_ids, images_per_user, image_numbers


def _draw_user_labels(rng: np.random.Generator, count: int,
                      base_probability: np.ndarray
                      ) -> list[tuple[list[str], list[str]]]:
  """The (coarse, fine-grained) label lists of one user's `count` images.

  The user's probability of coarse label k is `base_probability[k]` times a
  mean-1 log-normal preference factor (capped at `_MAX_LABEL_PROBABILITY`);
  an image drawn without labels is drawn again. Each present coarse label
  gets 1 + Binomial(`_EXTRA_FINE_TRIALS`, `_EXTRA_FINE_PROBABILITY`) of its
  fine labels, chosen without replacement with weights 1/(j+1).
  """
  coarse = constants.COARSE_LABELS
  preference = np.exp(_USER_LABEL_PREFERENCE_STD * rng.standard_normal(
      len(coarse)) - _USER_LABEL_PREFERENCE_STD ** 2 / 2)
  probability = np.minimum(base_probability * preference,
                           _MAX_LABEL_PROBABILITY)
  present = rng.random((count, len(coarse))) < probability
  empty = ~present.any(axis=1)
  while empty.any():  # Every image has a label: redraw the empty rows.
    present[empty] = rng.random((empty.sum(), len(coarse))) < probability
    empty = ~present.any(axis=1)
  # Fine labels of each present coarse label: 1 + Binomial draws, chosen
  # without replacement with weights 1/(j+1) (Gumbel top-k sampling).
  num_fine = 1 + rng.binomial(_EXTRA_FINE_TRIALS, _EXTRA_FINE_PROBABILITY,
                              present.shape)
  log_fine_weights = -np.log(np.arange(1, FINE_LABELS_PER_COARSE + 1.0))
  order = np.argsort(-(log_fine_weights + rng.gumbel(
      size=present.shape + (FINE_LABELS_PER_COARSE,))), axis=-1)
  result = []
  for i in range(count):
    labels, fine = [], []
    for k in np.flatnonzero(present[i]):
      labels.append(coarse[k])
      fine_names = fine_grained_label_names(coarse[k])
      fine += [fine_names[j] for j in sorted(order[i, k, :num_fine[i, k]])]
    result.append((labels, fine))
  return result


def make_metadata(num_users: int, seed: int = 0,
                  max_images_per_user: Optional[int] = None
                  ) -> list[dict[str, Any]]:
  """The records of a synthetic dataset, without writing anything.

  Args:
    num_users: number of users, >= 3.
    seed: non-negative integer; the same seed gives the same records.
    max_images_per_user: optional cap on the images of one user.

  Returns:
    A list of records like those of FLAIR's labels_and_metadata.json, grouped
    by user: `{"user_id": str, "image_id": str of digits, "labels": [...],
    "fine_grained_labels": [...], "partition": "train" | "val" | "test"}`.
    Label lists follow `constants.COARSE_LABELS` order; image ids are unique.

  Raises:
    FlairInputError: on an invalid argument.
  """
  _validate_arguments(num_users, seed, max_images_per_user)
  rng = np.random.default_rng([seed, 0])
  base_probability = coarse_label_probabilities()
  partitions, user_ids, images_per_user, image_numbers = _draw_users(
      rng, num_users, max_images_per_user)
  records = []
  for u in range(num_users):
    for labels, fine in _draw_user_labels(rng, images_per_user[u],
                                          base_probability):
      records.append({
          constants.USER_ID_KEY: user_ids[u],
          constants.IMAGE_ID_KEY: str(image_numbers[len(records)]),
          constants.LABELS_KEY: labels,
          constants.FINE_GRAINED_LABELS_KEY: fine,
          constants.PARTITION_KEY: partitions[u],
      })
  return records


class _Renderer:
  """Draws the images: label looks are fixed, user shifts come from a seed.

  Every texture is a plane wave cos(a*x + b*y + phi) written as the separable
  sum cos(a*x + phi) cos(b*y) - sin(a*x + phi) sin(b*y), so an image is three
  small matrix products (one per colour channel) plus noise.
  """

  def __init__(self, size: int = constants.IMAGE_SIZE):
    self.size = size
    self.grid = np.arange(size, dtype=np.float64)
    world = np.random.default_rng(_WORLD_SEED)
    names = list(constants.COARSE_LABELS) + [
        fine for fine, _ in label_relationship()]
    self.index = {name: i for i, name in enumerate(names)}
    n = len(names)
    num_coarse = len(constants.COARSE_LABELS)
    # Coarse labels: orientations spread over 180 degrees, periods 4-16 px,
    # strong colours. Fine labels: random orientation/period, weaker.
    angle = np.empty(n)
    angle[:num_coarse] = (np.arange(num_coarse) * (math.pi / num_coarse)
                          + world.uniform(0, 0.1, num_coarse))
    angle[num_coarse:] = world.uniform(0, math.pi, n - num_coarse)
    period = np.empty(n)
    period[:num_coarse] = np.geomspace(4.0, 16.0, num_coarse)[
        world.permutation(num_coarse)]
    period[num_coarse:] = world.uniform(3.0, 24.0, n - num_coarse)
    self.angle, self.period = angle, period
    # Colour of the texture (RGB, zero-mean-ish) and a flat colour offset.
    self.texture_colour = world.uniform(-1.0, 1.0, (n, 3))
    self.flat_colour = world.uniform(-1.0, 1.0, (n, 3))
    self.amplitude = np.where(np.arange(n) < num_coarse, 40.0, 14.0)
    self.flat_amplitude = np.where(np.arange(n) < num_coarse, 18.0, 6.0)

  def user_style(self, rng: np.random.Generator) -> dict[str, Any]:
    """A user's shift of the label looks and of the whole image."""
    n = len(self.index)
    return {
        "tint": rng.normal(0.0, 20.0, 3),
        "brightness": rng.normal(120.0, 15.0),
        "contrast": rng.uniform(0.7, 1.3),
        "angle_jitter": rng.normal(0.0, math.radians(8.0), n),
        "period_scale": np.exp(rng.normal(0.0, 0.1, n)),
        "background_angle": rng.uniform(0, math.pi),
        "background_period": rng.uniform(6.0, 40.0),
        "background_colour": rng.uniform(-1.0, 1.0, 3) * 20.0,
    }

  def render(self, names: list[str], style: dict[str, Any],
             rng: np.random.Generator, noise_bank: np.ndarray) -> np.ndarray:
    """The image of one record: uint8 [size, size, 3].

    `noise_bank` is float32 [size + pad, size + pad, 3] of N(0, 1) noise; the
    image takes a random window of it (cheaper than fresh noise per image).
    """
    idx = np.array([self.index[name] for name in names], dtype=int)
    angle = np.concatenate([self.angle[idx] + style["angle_jitter"][idx],
                            [style["background_angle"]]])
    period = np.concatenate([self.period[idx] * style["period_scale"][idx],
                             [style["background_period"]]])
    colour = np.concatenate([
        self.texture_colour[idx] * self.amplitude[idx, None],
        style["background_colour"][None, :]]) * style["contrast"]
    phase = rng.uniform(0, 2 * math.pi, len(angle))
    wave = 2 * math.pi / period
    a, b = wave * np.cos(angle), wave * np.sin(angle)
    x = np.outer(self.grid, a) + phase  # [size, m]
    y = np.outer(self.grid, b)  # [size, m]
    # Constant colour (+0.5 so that truncation to uint8 rounds) and an
    # illumination ramp, as rank-one terms of the same product.
    flat = (style["brightness"] + 0.5 + style["contrast"] * (
        style["tint"] + (self.flat_colour[idx]
                         * self.flat_amplitude[idx, None]).sum(axis=0)))
    ramp = rng.normal(0.0, 0.08, 2)
    centred = self.grid - self.size / 2
    ones = np.ones(self.size)
    # image[y, x, c] = left[y, :] @ right[:, x, c], rows are y, columns x:
    # sum_i w_ic (cos_y_i cos_x_i - sin_y_i sin_x_i) + flat_c + ramp terms.
    left = np.concatenate(
        [np.cos(y), -np.sin(y), ones[:, None], ramp[1] * centred[:, None]],
        axis=1)
    right_x = np.concatenate(
        [np.cos(x), np.sin(x), ones[:, None], ones[:, None]], axis=1)  # [x, k]
    right_colour = np.concatenate(
        [colour, colour, flat[None, :], np.ones((1, 3))], axis=0)
    right = right_x.T[:, :, None] * right_colour[:, None, :]  # [k, x, c]
    right[-2] += (ramp[0] * centred)[:, None]  # ramp along x on the ones row
    image = (left.astype(np.float32)
             @ right.reshape(len(right), -1).astype(np.float32))
    image = image.reshape(self.size, self.size, 3)
    dy, dx = rng.integers(0, noise_bank.shape[0] - self.size + 1, 2)
    image += noise_bank[dy:dy + self.size, dx:dx + self.size] * _NOISE_STD
    np.clip(image, 0, 255, out=image)
    return image.astype(np.uint8)


def _noise_bank(seed: int, size: int = constants.IMAGE_SIZE) -> np.ndarray:
  """float32 [size + 128, size + 128, 3] standard normal noise."""
  rng = np.random.default_rng([seed, 3])
  return rng.standard_normal((size + 128, size + 128, 3), dtype=np.float32)


def _encode_jpeg(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels, mode="RGB").save(buffer, format="JPEG",
                                           quality=_JPEG_QUALITY)
  return buffer.getvalue()


def _write_images(image_dir: str, records: list[dict[str, Any]], seed: int,
                  show_progress: bool) -> None:
  """Renders and writes `<image_dir>/<image_id>.jpg` of every record (in
  record order, one random stream, so the same seed gives the same bytes)."""
  renderer = _Renderer()
  noise_bank = _noise_bank(seed)
  progress = None
  if show_progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    progress = tqdm.tqdm(total=len(records), unit="image",
                         desc="generating images")
  # One stream for all drawing, in record order (records are grouped by user).
  rng = np.random.default_rng([seed, 1])
  previous_user = None
  style = None
  for record in records:
    if record[constants.USER_ID_KEY] != previous_user:
      previous_user = record[constants.USER_ID_KEY]
      style = renderer.user_style(rng)
    pixels = renderer.render(
        record[constants.LABELS_KEY] + record[
            constants.FINE_GRAINED_LABELS_KEY], style, rng, noise_bank)
    path = os.path.join(
        image_dir, record[constants.IMAGE_ID_KEY] + constants.IMAGE_EXTENSION)
    with file_io.atomic_path(path, flag=_FLAG) as tmp:
      with open(tmp, "wb") as f:
        f.write(_encode_jpeg(pixels))
    if progress is not None:
      progress.update(1)
  if progress is not None:
    progress.close()


def _summary(dataset_dir: str, seed: int, num_users: int,
             records: list[dict[str, Any]]) -> dict[str, Any]:
  """`generate`'s summary of the records written."""
  partition_users = {p: 0 for p in constants.PARTITIONS}
  partition_images = {p: 0 for p in constants.PARTITIONS}
  seen = set()
  for record in records:
    partition = record[constants.PARTITION_KEY]
    partition_images[partition] += 1
    if record[constants.USER_ID_KEY] not in seen:
      seen.add(record[constants.USER_ID_KEY])
      partition_users[partition] += 1
  return {
      "dataset_dir": dataset_dir,
      "seed": seed,
      "num_users": num_users,
      "num_images": len(records),
      "partition_users": partition_users,
      "partition_images": partition_images,
      "num_coarse_labels": len(constants.COARSE_LABELS),
      "num_fine_grained_labels": len(label_relationship()),
      "mean_labels_per_image": float(np.mean(
          [len(r[constants.LABELS_KEY]) for r in records])),
  }


def generate(dataset_dir: str, num_users: int, seed: int = 0,
             max_images_per_user: Optional[int] = None,
             show_progress: bool = False) -> dict[str, Any]:
  """Writes a synthetic FLAIR-like dataset directory (see the module doc).

  Files are written atomically; an existing directory is written into (files
  of the same names are replaced, others are left alone). The metadata file
  is written last: a directory holding it is complete.

  Args:
    dataset_dir: output directory, created if needed.
    num_users: number of users, >= 3 (each partition gets at least one).
    seed: non-negative integer; the same seed gives byte-identical files.
    max_images_per_user: optional cap on the images of one user (keeps a
      demo small); None keeps the heavy tail uncapped.
    show_progress: show a tqdm progress bar over images.

  Returns:
    A summary: `{"dataset_dir", "seed", "num_users", "num_images",
    "partition_users": {partition: int}, "partition_images": {partition: int},
    "num_coarse_labels", "num_fine_grained_labels",
    "mean_labels_per_image"}`.

  Raises:
    FlairInputError: on an invalid argument.
    errors.OutputWriteError: a storage failure writing a file (names it).
  """
  records = make_metadata(num_users, seed, max_images_per_user)
  image_dir = os.path.join(dataset_dir, constants.SMALL_IMAGES_DIR)
  os.makedirs(image_dir, exist_ok=True)
  _write_images(image_dir, records, seed, show_progress)
  file_io.write_text_atomic(
      os.path.join(dataset_dir, constants.LABEL_RELATIONSHIP_FILE),
      "".join(f"{fine} -> {coarse}\n" for fine, coarse in label_relationship()),
      flag=_FLAG)
  file_io.write_text_atomic(os.path.join(dataset_dir, "README.txt"),
                            README_TEXT, flag=_FLAG)
  # The metadata last: a directory with it is complete.
  file_io.write_json_atomic(
      os.path.join(dataset_dir, constants.METADATA_FILE), records, flag=_FLAG)
  return _summary(dataset_dir, seed, num_users, records)
