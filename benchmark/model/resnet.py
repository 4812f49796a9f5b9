"""ResNet in the torchvision layout, as a Keras functional model (ResNet-18
by default).

The body follows torchvision's `resnet18` (He et al. 2016, "Deep Residual
Learning for Image Recognition", arXiv 1512.03385; torchvision
`models/resnet.py`): a 7x7/2 convolution, normalisation, ReLU, 3x3/2
max-pooling, stages of basic blocks (the first block of every stage after
the first has stride 2 and a 1x1 convolution + normalisation shortcut),
global average pooling and a dense classifier that returns logits. The
stages' widths and depths are a `Layout` (`LAYOUTS`: ResNet-18's four
stages of two blocks of 64, 128, 256, 512 filters, or a tiny two-stage one
for smoke tests). Every layer carries the name listed in
docs/original_benchmark.md ("Model"), so that the published ImageNet
`resnet18.h5` loads by layer name (`model.restore`); that file's model also
has padding layers that this one folds into its stride-1 convolutions,
which hold no weights.

Preprocessing is part of the model, in front of `initial_padding`
(`model.layers`): the centre crop to `crop_size`, rescaling by 1/255 and
normalisation with the ImageNet channel mean and std
(`constants.IMAGENET_MEAN` / `IMAGENET_STD`). Training's random crop and
flip are the input pipeline's (`data.augmentation`), drawn from stateless
seeds, so the model itself has no randomness.

Padding: every 3x3 convolution sees one pixel of zeros on each side, as in
torchvision. A stride-1 3x3 convolution pads inside the op
(`padding="same"`, exactly one pixel per side for it); the stride-2
convolutions, the 7x7 stem and the max-pooling keep a `ZeroPadding2D`
layer in front of a "valid" op, because "same" would pad their even-sized
inputs on the bottom and right only. Convolutions whose output has at most
`layers.PATCH_MAX_POSITIONS` positions are `layers.PatchConv2D` (one matrix
product over the patches). Both choices change the speed on CPU
(docs/performance.md), not the function: outputs and gradients equal the
plain layout (`ZeroPadding2D` everywhere, TensorFlow's convolution op)
within float32 round-off (tests/model/test_resnet.py).

Randomness: `seed` fixes the initial weights (each layer's initializer gets
a seed derived from it and the layer's name).
"""

import dataclasses
from typing import Sequence
import zlib

import numpy as np
import tensorflow as tf

from benchmark.core import constants
from benchmark.core import errors
from benchmark.core import validate
from benchmark.model import layers
from benchmark.model import mixed_precision


@dataclasses.dataclass(frozen=True)
class Layout:
  """The widths and depth of a ResNet.

  Attributes:
    initial_filters: filters of the 7x7 stem convolution.
    stage_filters: filters of each stage's convolutions, one per stage.
    blocks_per_stage: basic blocks of each stage, one per stage.
  """
  initial_filters: int
  stage_filters: tuple[int, ...]
  blocks_per_stage: tuple[int, ...]


RESNET18 = "resnet18"
TINY = "tiny"
# torchvision's `resnet18` (BasicBlock, layers [2, 2, 2, 2]); and a tiny
# network for smoke tests of the pipeline: two stages of one block, the
# second downsampling as ResNet-18's stages 2-4 do, 32 filters being the
# smallest width GroupNorm's 32 groups allow.
LAYOUTS = {
    RESNET18: Layout(64, (64, 128, 256, 512), (2, 2, 2, 2)),
    TINY: Layout(32, (32, 64), (1, 1)),
}
DEFAULT_LAYOUT = RESNET18

# Groups of every GroupNorm layer. 32 is the default of Wu & He 2018, "Group
# Normalization" (ECCV, arXiv 1803.08494, Sec. 4: G = 32 works best for
# ResNet on ImageNet) and of tensorflow-addons' GroupNormalization, which the
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

  def __init__(self, pretrained: bool, seed: int,
               precision: str = mixed_precision.FLOAT32):
    self.pretrained = pretrained
    self.seed = seed
    self.compute = mixed_precision.layer_dtype(precision)
    self.norm_dtype = mixed_precision.layer_dtype(precision, "norm")

  def conv(self, x, name: str, filters: int, kernel_size: int, stride: int,
           padding: str = "valid"):
    positions = (
        layers.conv_output_size(x.shape[1], kernel_size, stride, padding) *
        layers.conv_output_size(x.shape[2], kernel_size, stride, padding))
    small = self.patch_small_maps and positions <= layers.PATCH_MAX_POSITIONS
    return (layers.PatchConv2D if small else tf.keras.layers.Conv2D)(
        filters, kernel_size, strides=stride, padding=padding, use_bias=False,
        kernel_initializer=tf.keras.initializers.HeNormal(
            seed=_layer_seed(self.seed, name)),
        dtype=self.compute, name=name)(x)

  def conv3x3(self, x, scope: str, index: int, filters: int, stride: int):
    """`{scope}_conv{index}_3x3` with one pixel of zero padding per side:
    inside the op at stride 1, else a `{scope}_conv{index}_padding` layer
    (see the module docstring)."""
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


def _check_arguments(input_shape, num_classes, crop_size, seed, precision,
                     layout) -> None:
  """The argument checks of `build_resnet` (its Raises)."""
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
  mixed_precision.check_precision(precision)
  if layout not in LAYOUTS:
    raise errors.FlairInputError(
        f"--model_layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


def _preprocess(images, crop_size: Sequence[int], precision: str):
  """Centre crop, rescaling and ImageNet normalisation (module docstring)."""
  dtype = mixed_precision.layer_dtype(precision, "preprocessing")
  x = layers.CropImages(int(crop_size[0]), int(crop_size[1]), dtype=dtype,
                        name="crop")(images)
  x = tf.keras.layers.Rescaling(1.0 / 255.0, dtype=dtype, name="rescale")(x)
  return tf.keras.layers.Normalization(
      axis=-1, mean=list(constants.IMAGENET_MEAN),
      variance=[s**2 for s in constants.IMAGENET_STD],
      dtype=dtype, name="imagenet_normalization")(x)


def _body(builder: _Builder, x, layout: Layout):
  """The stem and the stages of basic blocks, up to the last feature map."""
  compute = builder.compute
  x = tf.keras.layers.ZeroPadding2D(3, dtype=compute,
                                    name="initial_padding")(x)
  x = builder.conv(x, "initial_conv", layout.initial_filters, 7, 2)
  x = builder.norm(x, "initial_norm")
  x = tf.keras.layers.ReLU(dtype=compute, name="initial_relu")(x)
  x = tf.keras.layers.ZeroPadding2D(1, dtype=compute,
                                    name="pooling_padding")(x)
  x = tf.keras.layers.MaxPooling2D(3, strides=2, dtype=compute,
                                   name="initial_pooling")(x)
  in_filters = layout.initial_filters
  for stage, (filters, blocks) in enumerate(
      zip(layout.stage_filters, layout.blocks_per_stage), start=1):
    for block in range(1, blocks + 1):
      stride = 2 if (block == 1 and stage > 1) else 1
      downsample = block == 1 and (stride != 1 or in_filters != filters)
      x = builder.basic_block(x, f"layer{stage}_block{block}", filters,
                              stride, downsample)
      in_filters = filters
  return x


def build_resnet(input_shape: Sequence[int] = constants.IMAGE_SHAPE,
                 num_classes: int = len(constants.COARSE_LABELS),
                 pretrained: bool = False,
                 crop_size: Sequence[int] = (224, 224),
                 seed: int = 0,
                 precision: str = mixed_precision.FLOAT32,
                 layout: str = DEFAULT_LAYOUT) -> tf.keras.Model:
  """Builds the ResNet with FLAIR preprocessing inside; returns logits.

  Args:
    input_shape: `(height, width, 3)` of the input images; FLAIR's small
      images are `(256, 256, 3)`.
    num_classes: number of logits (17 coarse labels, 1,628 fine-grained, or
      1 with a binary label).
    pretrained: False builds the GroupNorm variant (`GROUP_NORM_GROUPS`
      groups; no batch statistics, so it suits DP and small client
      batches). True builds the BatchNorm variant meant for ImageNet
      weights: its BatchNormalization layers always run in inference mode,
      so their moving mean and variance never change; gamma and beta train.
    crop_size: `(crop_height, crop_width)` in pixels (`--image_height`,
      `--image_width`; 224x224 in the FLAIR paper), inside `input_shape`.
    seed: seeds every initializer (He-normal for the convolutions, Glorot-
      uniform for the classifier; each layer its own seed derived from this
      one): the same seed gives the same initial weights.
    precision: "float32" or "bfloat16" (`mixed_precision.layer_dtype` says
      which layers compute in bfloat16; weights stay float32).
    layout: a key of `LAYOUTS` (`--model_layout`).

  Returns:
    A `tf.keras.Model` named after `layout`, not compiled. Input: float32
    `[batch, height, width, 3]` pixel values in [0, 255] (Keras casts a
    uint8 tensor). Output: float32 logits `[batch, num_classes]`.

  Raises:
    benchmark.core.errors.FlairInputError (a ValueError): an unknown
      `precision` or `layout`, or a `crop_size` larger than the images.
    ValueError: `input_shape` is not 3 positive integers with 3 channels,
      `crop_size` not 2 positive integers, `num_classes` not an integer
      >= 1, `seed` not an integer.
  """
  _check_arguments(input_shape, num_classes, crop_size, seed, precision,
                   layout)
  builder = _Builder(pretrained=bool(pretrained), seed=int(seed),
                     precision=precision)
  images = tf.keras.Input(shape=tuple(int(v) for v in input_shape),
                          dtype=tf.float32, name="image")
  x = _preprocess(images, crop_size, precision)
  x = _body(builder, x, LAYOUTS[layout])
  x = tf.keras.layers.GlobalAveragePooling2D(
      dtype=mixed_precision.layer_dtype(precision, "pooling_output"),
      name="global_pooling")(x)
  logits = tf.keras.layers.Dense(
      num_classes,
      kernel_initializer=tf.keras.initializers.GlorotUniform(
          seed=_layer_seed(int(seed), "classifier")),
      dtype=mixed_precision.layer_dtype(precision, "classifier"),
      name="classifier")(x)
  return tf.keras.Model(images, logits, name=layout)
