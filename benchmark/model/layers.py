"""The model's own Keras layers: the centre crop, a cheaper GroupNorm, and
convolutions of tiny maps as patch products."""

from typing import Optional

import tensorflow as tf


@tf.keras.utils.register_keras_serializable(package="flair")
class CropImages(tf.keras.layers.Layer):
  """Crops the centre `(height, width)` of every image, in training and at
  inference (torchvision's `CenterCrop`: offsets `((in_height - height) //
  2, (in_width - width) // 2)`).

  Input: `[batch, in_height, in_width, channels]`, any real dtype; output:
  `[batch, height, width, channels]`, float32 (the layer's compute dtype).
  Training's random crop and flip are drawn by the input pipeline from
  stateless seeds (`data.augmentation`), which places the random window
  where this crop takes it. The layer creates no variables.
  """

  def __init__(self, height: int, width: int, **kwargs):
    super().__init__(**kwargs)
    self.height = int(height)
    self.width = int(width)

  def call(self, images):
    images = tf.cast(images, self.compute_dtype)
    top = (images.shape[1] - self.height) // 2
    left = (images.shape[2] - self.width) // 2
    return images[:, top:top + self.height, left:left + self.width, :]

  def compute_output_shape(self, input_shape):
    shape = tf.TensorShape(input_shape).as_list()
    return tf.TensorShape([shape[0], self.height, self.width] + shape[3:])

  def get_config(self):
    config = super().get_config()
    config.update(height=self.height, width=self.width)
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
  (tests/model/test_resnet.py: outputs and gradients to 1e-5 relative).

  The statistics and the normalisation are computed in float32 (a bfloat16
  input is upcast and the result cast back to the input's dtype);
  `resnet.build_resnet(precision="bfloat16")` keeps these layers' policy
  float32, so gamma and beta are read in float32 too. Any other case (a
  mask, another rank or axis) runs Keras' own implementation.
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


def conv_output_size(size: int, kernel: int, stride: int,
                     padding: str) -> int:
  """Output length of a convolution along one axis, Keras' rule: "same"
  gives `ceil(size / stride)`, "valid" `(size - kernel) // stride + 1`."""
  if padding == "same":
    return -(-size // stride)
  return (size - kernel) // stride + 1


# Convolutions whose output map has at most this many positions (height x
# width) are `PatchConv2D` layers: the last stage's 2x2 maps at 64x64 crops.
# The threshold is a CPU measurement (docs/performance.md): 2x2 maps as
# patch products were faster, 4x4 ones slower.
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
  output. For tiny maps this is cheaper on CPU than TensorFlow's
  convolution ops, which reorder the whole kernel to and from oneDNN's
  blocked layout in every forward and backward op (docs/performance.md).
  Equal to `Conv2D` within float32 round-off
  (tests/model/test_resnet.py: outputs and gradients to 1e-5 relative).

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
            conv_output_size(height, kh, sh, self.padding),
            conv_output_size(width, kw, sw, self.padding))

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
