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

from benchmark import constants
from benchmark import errors
from benchmark import validate

# Filters per stage and blocks per stage of ResNet-18 (torchvision
# `resnet18`: BasicBlock, layers [2, 2, 2, 2]).
STAGE_FILTERS = (64, 128, 256, 512)
BLOCKS_PER_STAGE = (2, 2, 2, 2)
INITIAL_FILTERS = 64

# Groups of every GroupNormalization layer. 32 is the default of Wu & He 2018,
# "Group Normalization" (ECCV, arXiv 1803.08494, Sec. 4: G = 32 works best for
# ResNet on ImageNet) and of tensorflow-addons' GroupNormalization, which the
# original FLAIR benchmark used with its default; every width of ResNet-18
# (64..512) is a multiple of 32.
GROUP_NORM_GROUPS = 32
# torchvision's BatchNorm2d default epsilon; used for both norms so that
# converted ImageNet statistics normalise as they did in PyTorch.
NORM_EPSILON = 1e-5

# Values of `--precision`: "float32" computes everything in float32;
# "bfloat16" is Keras mixed precision (policy "mixed_bfloat16": variables,
# gradients and optimizer state in float32, convolutions and activations in
# bfloat16; see `layer_dtype`).
FLOAT32 = "float32"
BFLOAT16 = "bfloat16"
PRECISIONS = (FLOAT32, BFLOAT16)
# Layers that stay float32 under bfloat16 (Keras' mixed-precision guide keeps
# the model output in float32; normalisation statistics and the global mean
# over pixels are reductions where bfloat16's 8-bit mantissa would lose the
# most): preprocessing, every normalisation, global pooling, the classifier.
_FLOAT32_ROLES = ("preprocessing", "norm", "pooling_output", "classifier")


def check_precision(precision, flag: str = "precision") -> str:
  """Validates a `--precision` value and returns it.

  Args:
    precision: "float32" or "bfloat16".
    flag: the flag name used in the error message.

  Raises:
    benchmark.errors.FlairInputError: any other value (one line, naming
      `--{flag}` and the valid values).
  """
  if precision not in PRECISIONS:
    raise errors.FlairInputError(
        f"--{flag} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
  return precision


def layer_dtype(precision: str, role: str = "compute"
               ) -> tf.keras.mixed_precision.Policy:
  """The Keras dtype policy of one layer of the model at `precision`.

  The one place that decides which layers run in bfloat16, used by
  `resnet18(precision=...)`: with "float32" every layer is float32; with
  "bfloat16" convolutions, paddings, ReLUs, max-pooling and residual adds use
  the "mixed_bfloat16" policy (float32 variables read as bfloat16, bfloat16
  activations), while the roles in `_FLOAT32_ROLES` ("preprocessing",
  "norm", "pooling_output", "classifier") stay float32, so the logits, and
  therefore the loss and the metrics, are float32.

  Args:
    precision: "float32" or "bfloat16".
    role: "compute" (default) or one of `_FLOAT32_ROLES`.

  Returns:
    A `tf.keras.mixed_precision.Policy` to pass as a layer's `dtype`.

  Raises:
    benchmark.errors.FlairInputError: `precision` is not valid.
    ValueError: unknown `role`.
  """
  check_precision(precision)
  if role != "compute" and role not in _FLOAT32_ROLES:
    raise ValueError(f"unknown layer role {role!r}")
  if precision == BFLOAT16 and role == "compute":
    return tf.keras.mixed_precision.Policy("mixed_bfloat16")
  return tf.keras.mixed_precision.Policy("float32")


def _layer_seed(seed: int, layer_name: str) -> int:
  """A 31-bit seed for one layer, fixed by (`seed`, `layer_name`).

  Keras initializers given the same seed draw the same values, so every layer
  gets its own seed; CRC-32 (not Python's salted `hash`) keeps it stable
  across processes.
  """
  sequence = np.random.SeedSequence([seed, zlib.crc32(layer_name.encode())])
  return int(sequence.generate_state(1)[0] & 0x7FFFFFFF)


def _is_training(training) -> "bool | tf.Tensor":
  """Normalises Keras' `training` argument: None means inference."""
  if training is None:
    return False
  if tf.is_tensor(training):
    return tf.cast(training, tf.bool)
  return bool(training)


def _cond(predicate, true_fn, false_fn):
  """`true_fn()` / `false_fn()` for a Python bool, `tf.cond` for a tensor."""
  if isinstance(predicate, bool):
    return true_fn() if predicate else false_fn()
  return tf.cond(predicate, true_fn, false_fn)


@tf.keras.utils.register_keras_serializable(package="flair")
class CropImages(tf.keras.layers.Layer):
  """Crops a batch of images to `(height, width)`: random when training,
  central at inference.

  Input: `[batch, in_height, in_width, channels]`, any real dtype; output:
  `[batch, height, width, channels]`, float32 (the layer's compute dtype).
  When training, each image gets its own offset, drawn uniformly from all
  `(in_height - height + 1) * (in_width - width + 1)` positions (the
  torchvision `RandomCrop` distribution). At inference the offset is
  `((in_height - height) // 2, (in_width - width) // 2)`, as torchvision's
  `CenterCrop`. The layer creates no variables.
  """

  def __init__(self, height: int, width: int, seed: Optional[int] = None,
               **kwargs):
    super().__init__(**kwargs)
    self.height = int(height)
    self.width = int(width)
    self.seed = seed

  def call(self, images, training=None):
    images = tf.cast(images, self.compute_dtype)
    shape = tf.shape(images)
    spare = tf.stack([shape[1] - self.height, shape[2] - self.width])

    def random_offsets():
      uniform = tf.random.uniform([shape[0], 2], seed=self.seed)
      offsets = tf.cast(
          tf.floor(uniform * tf.cast(spare + 1, tf.float32)), tf.int32)
      return tf.minimum(offsets, spare)  # Guards uniform == 1 - ulp rounding.

    def center_offsets():
      return tf.tile((spare // 2)[tf.newaxis, :], [shape[0], 1])

    offsets = _cond(_is_training(training), random_offsets, center_offsets)
    rows = offsets[:, 0:1] + tf.range(self.height)[tf.newaxis, :]
    cols = offsets[:, 1:2] + tf.range(self.width)[tf.newaxis, :]
    cropped = tf.gather(images, rows, axis=1, batch_dims=1)
    return tf.gather(cropped, cols, axis=2, batch_dims=1)

  def compute_output_shape(self, input_shape):
    shape = tf.TensorShape(input_shape).as_list()
    return tf.TensorShape([shape[0], self.height, self.width] + shape[3:])

  def get_config(self):
    config = super().get_config()
    config.update(height=self.height, width=self.width, seed=self.seed)
    return config


@tf.keras.utils.register_keras_serializable(package="flair")
class RandomHorizontalFlip(tf.keras.layers.Layer):
  """Mirrors each image left-right with probability 1/2 when training.

  Input and output: `[batch, height, width, channels]`; identity at
  inference. The layer creates no variables.
  """

  def __init__(self, seed: Optional[int] = None, **kwargs):
    super().__init__(**kwargs)
    self.seed = seed

  def call(self, images, training=None):
    images = tf.cast(images, self.compute_dtype)

    def flip():
      flip_mask = tf.random.uniform(
          [tf.shape(images)[0], 1, 1, 1], seed=self.seed) < 0.5
      return tf.where(flip_mask, tf.reverse(images, axis=[2]), images)

    return _cond(_is_training(training), flip, lambda: images)

  def get_config(self):
    config = super().get_config()
    config.update(seed=self.seed)
    return config


def _group_mean(values: tf.Tensor, groups: int) -> tf.Tensor:
  """Means over each group of consecutive channels, repeated per channel.

  `values`: `[batch, channels]` with `channels % groups == 0`; returns the
  same shape, where channel `c` holds the mean of its group's
  `channels // groups` entries (channels `g * C/G ... (g+1) * C/G - 1` form
  group `g`, the grouping of Keras' `GroupNormalization`).
  """
  channels = values.shape[-1]
  size = channels // groups
  means = tf.reduce_mean(tf.reshape(values, [-1, groups, size]), axis=2,
                         keepdims=True)
  return tf.reshape(
      tf.broadcast_to(means, [tf.shape(values)[0], groups, size]),
      [-1, channels])


@tf.keras.utils.register_keras_serializable(package="flair")
class GroupNormalization(tf.keras.layers.GroupNormalization):
  """Keras' `GroupNormalization` computed with fewer, cheaper ops.

  The same layer (a subclass: same constructor, weights `gamma` and `beta`
  of shape `[channels]`, same names, so `.h5` weights and restore-by-name are
  unchanged) and the same function (Wu & He 2018, arXiv 1803.08494, Eq. 1-3):
  for each image and each group of `channels / groups` consecutive channels,
  `y = (x - mean) / sqrt(var + epsilon) * gamma + beta`, with `mean` and the
  biased `var` over the group's height x width x channels entries.

  Keras 2.14 reshapes `[b, h, w, c]` to `[b, h, w, groups, c / groups]`,
  multiplies by an all-ones mask and calls `tf.nn.weighted_moments` (sums
  over two non-adjacent axes). Here, for a rank-4 channels-last input
  without a mask, the statistics are per-channel means over height and width
  (`[b, c]`, the reduction of global average pooling), averaged within each
  group on the tiny `[b, c]` tensors, and the output is one multiply-add,
  `y = x * a + b` with per-image, per-channel `a = gamma / sqrt(var + eps)`
  and `b = beta - mean * a`. The mean inside the variance is held constant
  for differentiation (`tf.stop_gradient`): d var / d mean =
  -2 mean(x - mean) = 0 exactly, so gradients are unchanged and autodiff
  emits fewer ops. Equal to Keras' layer within float32 round-off
  (tests/test_model.py: outputs and gradients to 1e-5 relative).

  The statistics and the normalisation are computed in float32 (a bfloat16
  input is upcast and the result cast back to the input's dtype);
  `resnet18(precision="bfloat16")` keeps these layers' policy float32, so
  gamma and beta are read in float32 too. Any other case (a mask, another
  rank or axis) runs Keras' own implementation.
  """

  def call(self, inputs, mask=None):
    if (mask is not None or inputs.shape.rank != 4 or
        self.axis not in (-1, 3)):
      return super().call(inputs, mask=mask)
    x = tf.cast(inputs, tf.float32)
    mean = _group_mean(tf.reduce_mean(x, axis=[1, 2]), self.groups)
    variance = _group_mean(
        tf.reduce_mean(
            tf.math.squared_difference(
                x, tf.stop_gradient(mean)[:, tf.newaxis, tf.newaxis, :]),
            axis=[1, 2]),
        self.groups)
    scale = tf.math.rsqrt(variance + self.epsilon)
    if self.scale:
      scale = scale * tf.cast(self.gamma, tf.float32)
    shift = -mean * scale
    if self.center:
      shift = shift + tf.cast(self.beta, tf.float32)
    outputs = (x * scale[:, tf.newaxis, tf.newaxis, :] +
               shift[:, tf.newaxis, tf.newaxis, :])
    return tf.cast(outputs, inputs.dtype)


def _conv_output_size(size: int, kernel: int, stride: int,
                      padding: str) -> int:
  """Output length of a convolution along one axis, Keras' rule: "same"
  gives `ceil(size / stride)`, "valid" `(size - kernel) // stride + 1`."""
  if padding == "same":
    return -(-size // stride)
  return (size - kernel) // stride + 1


# Convolutions whose output map has at most this many positions (height x
# width) are `PatchConv2D` layers: the last stage's 2x2 maps at 64x64 crops.
# Measured on a 2-core CPU (see the module docstring, "Small maps"): all
# convolutions with 2x2 outputs as patch products cut the step's CPU per
# image by 10%, the 3x3 ones with 4x4 outputs as well made it slower.
PATCH_MAX_POSITIONS = 4


@tf.keras.utils.register_keras_serializable(package="flair")
class PatchConv2D(tf.keras.layers.Conv2D):
  """Keras' `Conv2D` computed as one matrix product over its patches.

  The same layer (a subclass: same constructor, kernel `[kh, kw, c_in,
  c_out]`, same weight names, so `.h5` weights and restore-by-name are
  unchanged) and the same function: the input's `kh x kw` patches at the
  layer's strides are laid side by side ("im2col"), giving a `[batch *
  out_height * out_width, kh * kw * c_in]` matrix whose columns run over
  kernel row, kernel column, input channel (the kernel's own order), and
  that matrix times the kernel reshaped to `[kh * kw * c_in, c_out]` is the
  output. For tiny maps this is cheaper than TensorFlow's convolution ops on
  CPU, which reorder the whole kernel to and from oneDNN's blocked layout in
  every forward and backward op, and whose gradient for the weights ran 3x
  slower than the forward op there (see the module docstring, "Small
  maps"). Equal to `Conv2D` within float32 round-off
  (tests/test_model.py: outputs and gradients to 1e-5 relative).

  Handles "valid" padding at any stride and "same" padding at stride 1 with
  an odd kernel, dilation 1, channels-last, no groups, and an input of
  static height and width; anything else runs Keras' own op.
  """

  def _patch_layout(self, inputs) -> Optional[tuple[int, int, int, int]]:
    """`(pad_h, pad_w, out_h, out_w)`, or None where Keras' op must run."""
    (kh, kw), (sh, sw) = self.kernel_size, self.strides
    height, width = inputs.shape[1], inputs.shape[2]
    if (self.data_format != "channels_last" or self.groups != 1 or
        self.dilation_rate != (1, 1) or height is None or width is None):
      return None
    if self.padding == "valid":
      pad_h = pad_w = 0
    elif (self.padding == "same" and self.strides == (1, 1) and kh % 2 and
          kw % 2):
      pad_h, pad_w = kh // 2, kw // 2
    else:
      return None
    return (pad_h, pad_w,
            _conv_output_size(height, kh, sh, self.padding),
            _conv_output_size(width, kw, sw, self.padding))

  def convolution_op(self, inputs, kernel):
    layout = self._patch_layout(inputs)
    if layout is None:
      return super().convolution_op(inputs, kernel)
    pad_h, pad_w, out_h, out_w = layout
    (kh, kw), (sh, sw) = self.kernel_size, self.strides
    if pad_h or pad_w:
      inputs = tf.pad(inputs, [[0, 0], [pad_h, pad_h], [pad_w, pad_w], [0, 0]])
    rows, cols = (out_h - 1) * sh + 1, (out_w - 1) * sw + 1
    patches = tf.concat([inputs[:, i:i + rows:sh, j:j + cols:sw]
                         for i in range(kh) for j in range(kw)], axis=-1)
    outputs = tf.matmul(tf.reshape(patches, [-1, patches.shape[-1]]),
                        tf.reshape(kernel, [-1, self.filters]))
    return tf.reshape(outputs, [-1, out_h, out_w, self.filters])


class _Builder:
  """Creates the named layers of one model, with seeds derived from `seed`."""

  # For tests and benchmarks, the slower formulations of the same model:
  # False pads in front of every 3x3 convolution with a ZeroPadding2D layer
  # (the layout of the original benchmark), and False computes every
  # convolution with TensorFlow's convolution op (no `PatchConv2D`).
  pad_inside_conv = True
  patch_small_maps = True

  def __init__(self, pretrained: bool, seed: int, precision: str = FLOAT32):
    self.pretrained = pretrained
    self.seed = seed
    self.compute = layer_dtype(precision)
    self.norm_dtype = layer_dtype(precision, "norm")

  def conv(self, x, name: str, filters: int, kernel_size: int, stride: int,
           padding: str = "valid"):
    positions = (
        _conv_output_size(x.shape[1], kernel_size, stride, padding) *
        _conv_output_size(x.shape[2], kernel_size, stride, padding))
    small = self.patch_small_maps and positions <= PATCH_MAX_POSITIONS
    return (PatchConv2D if small else tf.keras.layers.Conv2D)(
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
    return GroupNormalization(
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
             precision: str = FLOAT32) -> tf.keras.Model:
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
  check_precision(precision)
  input_shape = tuple(int(v) for v in input_shape)
  crop_height, crop_width = (int(v) for v in crop_size)
  seed = int(seed)
  builder = _Builder(pretrained=bool(pretrained), seed=seed,
                     precision=precision)
  preprocessing = layer_dtype(precision, "preprocessing")
  compute = builder.compute

  images = tf.keras.Input(shape=input_shape, dtype=tf.float32, name="image")
  if augmentation_seed is None:
    crop_seed = flip_seed = None
  else:
    crop_seed = _layer_seed(int(augmentation_seed), "crop")
    flip_seed = _layer_seed(int(augmentation_seed), "flip")
  x = CropImages(crop_height, crop_width, seed=crop_seed,
                 dtype=preprocessing, name="crop")(images)
  x = RandomHorizontalFlip(seed=flip_seed, dtype=preprocessing,
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
      dtype=layer_dtype(precision, "pooling_output"),
      name="global_pooling")(x)
  logits = tf.keras.layers.Dense(
      num_classes,
      kernel_initializer=tf.keras.initializers.GlorotUniform(
          seed=_layer_seed(seed, "classifier")),
      dtype=layer_dtype(precision, "classifier"), name="classifier")(x)
  return tf.keras.Model(images, logits, name="resnet18")
