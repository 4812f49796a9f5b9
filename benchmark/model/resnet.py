"""ResNet-18 in the torchvision layout, as a Keras functional model.

The body follows torchvision's `resnet18` (He et al. 2016, "Deep Residual
Learning for Image Recognition", arXiv 1512.03385; torchvision
`models/resnet.py`): a 7x7/2 convolution with 64 filters, normalisation, ReLU,
3x3/2 max-pooling, four stages of two basic blocks (64, 128, 256, 512
filters; the first block of stages 2-4 has stride 2 and a 1x1 convolution +
normalisation shortcut), global average pooling and a dense classifier that
returns logits. Every layer carries the name listed in
docs/original_benchmark.md ("Model"), so that the published ImageNet
`resnet18.h5` loads by layer name (see `benchmark.restore`); that file's
model also has padding layers that this one folds into its convolutions
(below), which hold no weights.

Preprocessing is part of the model, in front of `initial_padding`:

1. crop to `crop_size`: a random crop (its own offset for every image) when
   training, the centre crop at inference;
2. random horizontal flip (probability 1/2 per image) when training only;
3. rescale by 1/255;
4. normalise with the ImageNet channel mean and std
   (`constants.IMAGENET_MEAN` / `IMAGENET_STD`).

The crop and flip are two small layers built on TensorFlow's random ops rather
than Keras `RandomCrop`/`RandomFlip`: in TF 2.14 those hold a hidden
`tf.random.Generator` variable (created with `force_generator=True`), crop a
whole batch at one offset, and at inference *resize* the image
(`smart_resize`) instead of cropping it. The layers here create no variables
at all, so the model can be traced inside a TFF computation
(`tff.learning.models.from_keras_model`).

Randomness: `seed` fixes the initial weights. The crop and flip draw from
TensorFlow's stateful random ops, unseeded by default. An op-level seed
(`augmentation_seed`) makes a Keras run repeatable, but inside TFF every
client's training loop is a fresh instantiation of the graph, so a seeded op
restarts its stream there: every client in every round would get the same
sequence of offsets and flips (seen with TFF 0.87: a seeded `tf.random.uniform`
inside `dataset.reduce` returned equal values on each call, an unseeded one
did not). Leave `augmentation_seed` unset for federated training.

Padding: every 3x3 convolution sees one pixel of zeros on each side, as in
torchvision. A stride-1 3x3 convolution pads inside the op (`padding="same"`,
which is exactly one pixel per side for it); only the stride-2 convolutions,
the 7x7 stem and the max-pooling keep a `ZeroPadding2D` layer in front of a
"valid" op, because "same" would pad their even-sized inputs on the bottom
and right only. The outputs are the same either way (`tests/test_model.py`:
outputs and gradients against the all-`ZeroPadding2D` layout, to 1e-5
relative), but the speed is not: for a padded input, the gradient with
respect to the input is also computed for the padding rows and columns and
then thrown away, which on the last stage's 2x2 maps (64x64 crops) is 4x the
useful work. Measured with `scripts/bench_train_step.py --variants
zeropad,fast,zeropad_bf16,bf16` (Keras steps, batch 16, 2-core CPU, median
of 8 interleaved fits): with 64x64 crops, float32 166 -> 182 images/s (CPU
11.1 -> 9.9 ms per image) and bfloat16 188 -> 212; with 224x224 crops,
float32 26.2 -> 27.2. TensorFlow's per-side padding inside the op
(`tf.nn.conv2d` with a list of paddings), which would cover the stride-2
convolutions too, ran at 42 against 151 images/s with oneDNN.

Small maps: a convolution whose output has at most `PATCH_MAX_POSITIONS`
positions (the last stage's 2x2 maps at 64x64 crops) is a `PatchConv2D`,
computed as one matrix product over its patches; the others use
TensorFlow's convolution op. With 2x2 maps a stage-4 convolution is a
`[64, 4608] x [4608, 512]` product at batch 16, and on CPU TensorFlow's
oneDNN convolution ops spent more time reordering its 2.4M-weight kernel
(to and from oneDNN's blocked layout, in each of the forward, input-gradient
and weight-gradient ops, every step) and in a slow weight-gradient kernel
than in the product itself. Measured (64x64 crops, batch 16, 2-core CPU,
Keras steps on images in memory, median of 8 interleaved fits): in an
in-process A/B, float32 158 -> 173 images/s, CPU 11.4 -> 10.2 ms per
image; with `scripts/bench_train_step.py --variants
convop,fast,convop_bf16,bf16`, float32 183 -> 187 images/s (CPU 10.0 -> 9.3
ms) and bfloat16 201 -> 224 (CPU 8.9 -> 7.7 ms). Patch products for stage
3's stride-1 convolutions on 4x4 maps as well made the step slower (149
against 158 in the A/B), so the threshold stays at 2x2; with 224x224 crops
no map is that small and nothing changes. Measured on CPU only.
"""

from typing import Optional, Sequence
import zlib

import numpy as np
import tensorflow as tf

from benchmark.core import constants
from benchmark.core import errors
from benchmark.core import validate
from benchmark.model import layers
from benchmark.model import mixed_precision

# Filters per stage and blocks per stage of ResNet-18 (torchvision
# `resnet18`: BasicBlock, layers [2, 2, 2, 2]).
STAGE_FILTERS = (64, 128, 256, 512)


BLOCKS_PER_STAGE = (2, 2, 2, 2)


INITIAL_FILTERS = 64


# Groups of every layers.GroupNormalization layer. 32 is the default of Wu & He 2018,
# "Group Normalization" (ECCV, arXiv 1803.08494, Sec. 4: G = 32 works best for
# ResNet on ImageNet) and of tensorflow-addons' layers.GroupNormalization, which the
# original FLAIR benchmark used with its default; every width of ResNet-18
# (64..512) is a multiple of 32.
GROUP_NORM_GROUPS = 32


# torchvision's BatchNorm2d default epsilon; used for both norms so that
# converted ImageNet statistics normalise as they did in PyTorch.
NORM_EPSILON = 1e-5


def _layer_seed(seed: int, layer_name: str) -> int:
  """A 31-bit seed for one layer, fixed by (`seed`, `layer_name`).

  Keras initializers given the same seed draw the same values, so every layer
  gets its own seed; CRC-32 (not Python's salted `hash`) keeps it stable
  across processes.
  """
  sequence = np.random.SeedSequence([seed, zlib.crc32(layer_name.encode())])
  return int(sequence.generate_state(1)[0] & 0x7FFFFFFF)


class _Builder:
  """Creates the named layers of one model, with seeds derived from `seed`."""

  # For tests and benchmarks, the slower formulations of the same model:
  # False pads in front of every 3x3 convolution with a ZeroPadding2D layer
  # (the layout of the original benchmark), and False computes every
  # convolution with TensorFlow's convolution op (no `PatchConv2D`).
  pad_inside_conv = True
  patch_small_maps = True

  def __init__(self, pretrained: bool, seed: int, precision: str = mixed_precision.FLOAT32):
    self.pretrained = pretrained
    self.seed = seed
    self.compute = mixed_precision.layer_dtype(precision)
    self.norm_dtype = mixed_precision.layer_dtype(precision, "norm")

  def conv(self, x, name: str, filters: int, kernel_size: int, stride: int,
           padding: str = "valid"):
    positions = (
        layers._conv_output_size(x.shape[1], kernel_size, stride, padding) *
        layers._conv_output_size(x.shape[2], kernel_size, stride, padding))
    small = self.patch_small_maps and positions <= layers.PATCH_MAX_POSITIONS
    return (layers.PatchConv2D if small else tf.keras.layers.Conv2D)(
        filters, kernel_size, strides=stride, padding=padding, use_bias=False,
        kernel_initializer=tf.keras.initializers.HeNormal(
            seed=_layer_seed(self.seed, name)),
        dtype=self.compute, name=name)(x)

  def conv3x3(self, x, scope: str, index: int, filters: int, stride: int):
    """`{scope}_conv{index}_3x3` with one pixel of zero padding per side:
    inside the op at stride 1, else a `{scope}_conv{index}_padding` layer
    (see the module docstring, "Padding")."""
    name = f"{scope}_conv{index}_3x3"
    if stride == 1 and self.pad_inside_conv:
      return self.conv(x, name, filters, 3, 1, padding="same")
    x = tf.keras.layers.ZeroPadding2D(1, dtype=self.compute,
                                      name=f"{scope}_conv{index}_padding")(x)
    return self.conv(x, name, filters, 3, stride)

  def norm(self, x, name: str):
    if self.pretrained:
      # training=False at every call: the layer always normalises with its
      # moving statistics and never updates them; gamma and beta still train.
      return tf.keras.layers.BatchNormalization(
          epsilon=NORM_EPSILON, dtype=self.norm_dtype, name=name)(
              x, training=False)
    return layers.GroupNormalization(
        groups=GROUP_NORM_GROUPS, epsilon=NORM_EPSILON, dtype=self.norm_dtype,
        name=name)(x)

  def basic_block(self, x, scope: str, filters: int, stride: int,
                  downsample: bool):
    shortcut = x
    out = self.conv3x3(x, scope, 1, filters, stride)
    out = self.norm(out, f"{scope}_norm1")
    out = tf.keras.layers.ReLU(dtype=self.compute, name=f"{scope}_relu1")(out)
    out = self.conv3x3(out, scope, 2, filters, 1)
    out = self.norm(out, f"{scope}_norm2")
    if downsample:
      stage = scope.split("_")[0]
      shortcut = self.conv(x, f"{stage}_downsample_conv_1x1", filters, 1,
                           stride)
      shortcut = self.norm(shortcut, f"{stage}_downsample_norm")
    out = tf.keras.layers.Add(dtype=self.compute,
                              name=f"{scope}_add")([out, shortcut])
    return tf.keras.layers.ReLU(dtype=self.compute, name=f"{scope}_relu2")(out)


def resnet18(input_shape: Sequence[int] = constants.IMAGE_SHAPE,
             num_classes: int = len(constants.COARSE_LABELS),
             pretrained: bool = False,
             crop_size: Sequence[int] = (224, 224),
             seed: int = 0,
             augmentation_seed: Optional[int] = None,
             precision: str = mixed_precision.FLOAT32) -> tf.keras.Model:
  """Builds ResNet-18 with FLAIR preprocessing inside; returns logits.

  Args:
    input_shape: `(height, width, 3)` of the input images; FLAIR's small images
      are `(256, 256, 3)`.
    num_classes: number of logits (17 coarse labels, ~1,628 fine-grained, or
      1 with a binary label).
    pretrained: False builds the GroupNorm variant (32 groups, see
      `GROUP_NORM_GROUPS`; no batch statistics, so it suits DP and small
      client batches). True builds the BatchNorm variant meant for ImageNet
      weights: its BatchNormalization layers always run in inference mode, so
      their moving mean/variance (non-trainable) never change and only gamma
      and beta train.
    crop_size: `(crop_height, crop_width)` in pixels (the `--image_height`,
      `--image_width` flags; 224x224 in the FLAIR paper). Must fit inside
      `input_shape`.
    seed: seeds every initializer (He-normal for the convolutions, Glorot-
      uniform for the classifier; each layer gets its own seed derived from
      this one). The same seed gives the same initial weights.
    augmentation_seed: None (default) leaves the random crop and flip
      unseeded; an integer gives them op-level seeds derived from it, which
      makes eager/Keras runs repeatable but repeats the same augmentation in
      every TFF round (see the module docstring).
    precision: "float32" (default) or "bfloat16" (mixed precision: see
      `layer_dtype` for which layers compute in bfloat16; the weights stay
      float32, so weights files are the same for both). Every layer gets an
      explicit dtype policy, so Keras' global policy has no effect.

  Returns:
    A `tf.keras.Model` named "resnet18", not compiled. Input: float32
    `[batch, height, width, 3]` pixel values in [0, 255] (a uint8 tensor is
    cast by Keras). Output: float32 logits `[batch, num_classes]`.

  Raises:
    benchmark.errors.FlairInputError (a ValueError): `precision` is not
      "float32" or "bfloat16".
    ValueError: `input_shape` is not 3 positive integers with 3 channels,
      `crop_size` is not 2 positive integers, `num_classes` is not an
      integer >= 1, `seed` or `augmentation_seed` is not an integer.
    benchmark.errors.FlairInputError (a ValueError): `crop_size` is larger
      than the input image.
  """
  validate.check_ints("input_shape", input_shape, 3, error=ValueError)
  if input_shape[2] != len(constants.IMAGENET_MEAN):
    raise ValueError(f"input_shape must have {len(constants.IMAGENET_MEAN)} "
                     f"(RGB) channels, got {tuple(input_shape)}")
  validate.check_ints("crop_size", crop_size, 2, error=ValueError)
  if crop_size[0] > input_shape[0] or crop_size[1] > input_shape[1]:
    raise errors.FlairInputError(
        f"crop_size (image_height, image_width) {tuple(crop_size)} must fit "
        f"inside the input images {tuple(input_shape[:2])}")
  validate.check_int("num_classes", num_classes, error=ValueError)
  if not validate.is_int(seed):
    raise ValueError(f"seed must be an integer, got {seed!r}")
  if augmentation_seed is not None and not validate.is_int(augmentation_seed):
    raise ValueError(f"augmentation_seed must be None or an integer, got "
                     f"{augmentation_seed!r}")
  mixed_precision.check_precision(precision)
  input_shape = tuple(int(v) for v in input_shape)
  crop_height, crop_width = (int(v) for v in crop_size)
  seed = int(seed)
  builder = _Builder(pretrained=bool(pretrained), seed=seed,
                     precision=precision)
  preprocessing = mixed_precision.layer_dtype(precision, "preprocessing")
  compute = builder.compute

  images = tf.keras.Input(shape=input_shape, dtype=tf.float32, name="image")
  if augmentation_seed is None:
    crop_seed = flip_seed = None
  else:
    crop_seed = _layer_seed(int(augmentation_seed), "crop")
    flip_seed = _layer_seed(int(augmentation_seed), "flip")
  x = layers.CropImages(crop_height, crop_width, seed=crop_seed,
                 dtype=preprocessing, name="crop")(images)
  x = layers.RandomHorizontalFlip(seed=flip_seed, dtype=preprocessing,
                           name="flip")(x)
  x = tf.keras.layers.Rescaling(1.0 / 255.0, dtype=preprocessing,
                                name="rescale")(x)
  x = tf.keras.layers.Normalization(
      axis=-1, mean=list(constants.IMAGENET_MEAN),
      variance=[s**2 for s in constants.IMAGENET_STD],
      dtype=preprocessing, name="imagenet_normalization")(x)

  x = tf.keras.layers.ZeroPadding2D(3, dtype=compute,
                                    name="initial_padding")(x)
  x = builder.conv(x, "initial_conv", INITIAL_FILTERS, 7, 2)
  x = builder.norm(x, "initial_norm")
  x = tf.keras.layers.ReLU(dtype=compute, name="initial_relu")(x)
  x = tf.keras.layers.ZeroPadding2D(1, dtype=compute,
                                    name="pooling_padding")(x)
  x = tf.keras.layers.MaxPooling2D(3, strides=2, dtype=compute,
                                   name="initial_pooling")(x)

  in_filters = INITIAL_FILTERS
  for stage, (filters, blocks) in enumerate(
      zip(STAGE_FILTERS, BLOCKS_PER_STAGE), start=1):
    for block in range(1, blocks + 1):
      stride = 2 if (block == 1 and stage > 1) else 1
      downsample = block == 1 and (stride != 1 or in_filters != filters)
      x = builder.basic_block(x, f"layer{stage}_block{block}", filters,
                              stride, downsample)
      in_filters = filters

  x = tf.keras.layers.GlobalAveragePooling2D(
      dtype=mixed_precision.layer_dtype(precision, "pooling_output"),
      name="global_pooling")(x)
  logits = tf.keras.layers.Dense(
      num_classes,
      kernel_initializer=tf.keras.initializers.GlorotUniform(
          seed=_layer_seed(seed, "classifier")),
      dtype=mixed_precision.layer_dtype(precision, "classifier"), name="classifier")(x)
  return tf.keras.Model(images, logits, name="resnet18")
