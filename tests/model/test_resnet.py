"""Tests of benchmark.model.resnet: layout, parameter counts, preprocessing,
seeds, frozen BatchNorm and use inside TFF."""

import numpy as np
import pytest
import tensorflow as tf

from benchmark.core import constants
from benchmark.core import errors
from benchmark.model import layers
from benchmark.model import mixed_precision
from benchmark.model import resnet

NUM_CLASSES = 17
SMALL_INPUT = (40, 40, 3)
SMALL_CROP = (32, 32)

# Stage widths and blocks per stage of ResNet-18 (He et al. 2016, Table 1).
STAGES = ((64, 2), (128, 2), (256, 2), (512, 2))


def _layout():
  """The reference layout: conv shapes (k, c_in, c_out) and norm widths."""
  convs = [(7, 3, 64)]
  norms = [64]
  c_in = 64
  for stage, (c_out, blocks) in enumerate(STAGES, start=1):
    for block in range(1, blocks + 1):
      stride = 2 if (stage > 1 and block == 1) else 1
      convs += [(3, c_in, c_out), (3, c_out, c_out)]
      norms += [c_out, c_out]
      if block == 1 and (stride != 1 or c_in != c_out):
        convs.append((1, c_in, c_out))
        norms.append(c_out)
      c_in = c_out
  return convs, norms


def _expected_counts(num_classes, batch_norm):
  """(trainable, non_trainable) parameter counts from the layout arithmetic:
  conv k*k*c_in*c_out (no bias), norm gamma+beta 2*c, BatchNorm moving
  mean+variance 2*c (non-trainable), dense 512*n + n."""
  convs, norms = _layout()
  trainable = (sum(k * k * c_in * c_out for k, c_in, c_out in convs) +
               sum(2 * c for c in norms) + 512 * num_classes + num_classes)
  non_trainable = sum(2 * c for c in norms) if batch_norm else 0
  return trainable, non_trainable


def _reference_layer_names():
  """Layer names listed in docs/original_benchmark.md ("Model"): every layer
  of the model, padding layers only in front of the stride-2 convolutions."""
  names = ["image", "crop", "rescale", "imagenet_normalization",
           "initial_padding", "initial_conv", "initial_norm", "initial_relu",
           "pooling_padding", "initial_pooling", "global_pooling",
           "classifier"]
  for s in range(1, 5):
    for b in range(1, 3):
      if s > 1 and b == 1:
        names.append(f"layer{s}_block{b}_conv1_padding")
      for part in ("conv1_3x3", "norm1", "relu1", "conv2_3x3", "norm2",
                   "add", "relu2"):
        names.append(f"layer{s}_block{b}_{part}")
    if s > 1:
      names += [f"layer{s}_downsample_conv_1x1", f"layer{s}_downsample_norm"]
  return names


def _count(weights):
  return sum(int(np.prod(w.shape)) for w in weights)


def test_layout_arithmetic_matches_torchvision():
  # torchvision documents 11,689,512 parameters for resnet18 (1000 classes);
  # our arithmetic must reproduce it before it is used as the expectation.
  assert _expected_counts(1000, batch_norm=False)[0] == 11_689_512


@pytest.mark.parametrize("pretrained", [False, True])
def test_parameter_counts_and_layer_names(pretrained):
  m = resnet.build_resnet(num_classes=NUM_CLASSES, pretrained=pretrained)
  trainable, non_trainable = _expected_counts(NUM_CLASSES, pretrained)
  assert _count(m.trainable_weights) == trainable
  assert _count(m.non_trainable_weights) == non_trainable
  assert sorted(layer.name for layer in m.layers) == sorted(
      _reference_layer_names())
  # Convolutions have no bias; stride-1 3x3 ones pad inside the op, the
  # others have a padding layer in front (or, 1x1, need none).
  for layer in m.layers:
    if isinstance(layer, tf.keras.layers.Conv2D):
      inside = layer.kernel_size == (3, 3) and layer.strides == (1, 1)
      assert not layer.use_bias, layer.name
      assert layer.padding == ("same" if inside else "valid"), layer.name
  norm_type = (tf.keras.layers.BatchNormalization if pretrained else
               tf.keras.layers.GroupNormalization)
  _, norms = _layout()
  norm_layers = [l for l in m.layers if isinstance(l, norm_type)]
  assert len(norm_layers) == len(norms)
  if not pretrained:
    assert all(l.groups == resnet.GROUP_NORM_GROUPS for l in norm_layers)
  # Preprocessing creates no hidden variables (TFF needs every variable to be
  # a model weight).
  assert len(m.variables) == len(m.weights)


@pytest.mark.parametrize("crop, batch", [(224, 1), (64, 2)])
def test_output_shape(crop, batch):
  m = resnet.build_resnet(num_classes=NUM_CLASSES, crop_size=(crop, crop))
  images = tf.random.uniform((batch,) + constants.IMAGE_SHAPE, 0, 256,
                             dtype=tf.int32)
  for training in (True, False):
    logits = m(tf.cast(images, tf.uint8), training=training)
    assert logits.shape == (batch, NUM_CLASSES)
    assert logits.dtype == tf.float32
    assert np.all(np.isfinite(logits.numpy()))


def test_same_seed_same_weights_different_seed_different():
  a = resnet.build_resnet(SMALL_INPUT, NUM_CLASSES, crop_size=SMALL_CROP,
                          seed=3)
  b = resnet.build_resnet(SMALL_INPUT, NUM_CLASSES, crop_size=SMALL_CROP,
                          seed=3)
  c = resnet.build_resnet(SMALL_INPUT, NUM_CLASSES, crop_size=SMALL_CROP,
                          seed=4)
  for wa, wb in zip(a.get_weights(), b.get_weights()):
    np.testing.assert_array_equal(wa, wb)
  kernels_a = [l.kernel.numpy() for l in a.layers if hasattr(l, "kernel")]
  kernels_c = [l.kernel.numpy() for l in c.layers if hasattr(l, "kernel")]
  assert all(not np.array_equal(ka, kc)
             for ka, kc in zip(kernels_a, kernels_c))
  # Same-shaped layers of one model are not copies of each other.
  assert not np.array_equal(
      a.get_layer("layer1_block1_conv1_3x3").kernel.numpy(),
      a.get_layer("layer1_block1_conv2_3x3").kernel.numpy())


@pytest.mark.parametrize("kwargs, argument", [
    (dict(crop_size=(300, 224)), "crop_size"),
    (dict(crop_size=(224, 257)), "crop_size"),
    (dict(crop_size=(0, 224)), "crop_size"),
    (dict(crop_size=(224,)), "crop_size"),
    (dict(input_shape=(256, -1, 3)), "input_shape"),
    (dict(input_shape=(256, 256, 1)), "input_shape"),
    (dict(num_classes=0), "num_classes"),
    (dict(seed=1.5), "seed"),
    (dict(layout="resnet50"), "--model_layout"),
])
def test_invalid_arguments(kwargs, argument):
  with pytest.raises(ValueError, match=argument):
    resnet.build_resnet(**kwargs)


def test_tiny_layout_has_its_stages_and_the_same_layer_names():
  # The smoke-test network (--model_layout tiny): the stem, two stages of one
  # block (the second downsampling) and the classifier, named as ResNet-18's.
  tiny = resnet.LAYOUTS[resnet.TINY]
  m = resnet.build_resnet(SMALL_INPUT, NUM_CLASSES, crop_size=SMALL_CROP,
                          layout=resnet.TINY)
  assert m.name == resnet.TINY
  names = {layer.name for layer in m.layers}
  assert {"initial_conv", "layer1_block1_conv1_3x3",
          "layer2_block1_conv1_padding", "layer2_downsample_conv_1x1",
          "global_pooling", "classifier"} <= names
  assert not any(n.startswith(("layer3", "layer1_block2")) for n in names)
  assert m.get_layer("initial_conv").kernel.shape[-1] == (
      tiny.initial_filters)
  assert m.get_layer("classifier").kernel.shape == (
      tiny.stage_filters[-1], NUM_CLASSES)


def _preprocessing_model(m):
  return tf.keras.Model(m.input, m.get_layer("imagenet_normalization").output)


def test_inference_preprocessing_is_center_crop_and_imagenet_normalisation():
  m = resnet.build_resnet((10, 12, 3), 2, crop_size=(4, 6))
  images = np.random.default_rng(0).integers(
      0, 256, (3, 10, 12, 3)).astype(np.float32)
  out = _preprocessing_model(m)(images, training=False).numpy()
  # Centre window: rows (10-4)//2 = 3.., columns (12-6)//2 = 3..
  window = images[:, 3:7, 3:9, :]
  expected = ((window / 255.0 - np.array(constants.IMAGENET_MEAN)) /
              np.array(constants.IMAGENET_STD))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_the_model_crops_the_centre_in_training_too():
  # Training's random crop and flip belong to the input pipeline
  # (tests/data/test_augmentation.py): the model is deterministic.
  crop = layers.CropImages(3, 4)
  images = tf.reshape(tf.range(2 * 8 * 9, dtype=tf.float32), (2, 8, 9, 1))
  source = images.numpy()[..., 0]
  for training in (True, False):
    np.testing.assert_array_equal(crop(images, training=training)
                                  .numpy()[..., 0], source[:, 2:5, 2:6])
  m = resnet.build_resnet(SMALL_INPUT, 3, crop_size=SMALL_CROP)
  batch = np.random.default_rng(0).integers(
      0, 256, (2,) + SMALL_INPUT).astype(np.float32)
  np.testing.assert_array_equal(m(batch, training=True).numpy(),
                                m(batch, training=True).numpy())


def test_traceable_in_tf1_graph_with_python_and_tensor_training_flag():
  # TFF builds its computations in a graph; both training modes must trace
  # there without creating variables beyond the model weights.
  with tf.Graph().as_default() as graph:
    m = resnet.build_resnet(SMALL_INPUT, 3, crop_size=SMALL_CROP)
    images = tf.compat.v1.placeholder(tf.uint8, (None,) + SMALL_INPUT)
    flag = tf.compat.v1.placeholder(tf.bool, ())
    outputs = [m(images, training=True), m(images, training=False),
               m(images, training=flag)]
    assert all(o.shape.as_list() == [None, 3] for o in outputs)
    num_variables = len(graph.get_collection(
        tf.compat.v1.GraphKeys.GLOBAL_VARIABLES))
    assert num_variables == len(m.weights)


def _train_step(m, images, labels):
  optimizer = tf.keras.optimizers.SGD(0.1)
  with tf.GradientTape() as tape:
    loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(
        labels, m(images, training=True)))
  grads = tape.gradient(loss, m.trainable_variables)
  optimizer.apply_gradients(zip(grads, m.trainable_variables))


def test_pretrained_batch_norm_moving_statistics_stay_frozen():
  m = resnet.build_resnet(SMALL_INPUT, 3, pretrained=True, crop_size=SMALL_CROP)
  norms = [l for l in m.layers
           if isinstance(l, tf.keras.layers.BatchNormalization)]
  # Non-trivial moving statistics, so an update would move them.
  rng = np.random.default_rng(0)
  for layer in norms:
    c = layer.moving_mean.shape[0]
    layer.moving_mean.assign(rng.uniform(-0.1, 0.1, c).astype(np.float32))
    layer.moving_variance.assign(rng.uniform(0.5, 1.5, c).astype(np.float32))
  before = {l.name: [w.numpy().copy() for w in l.weights] for l in norms}
  images = rng.integers(0, 256, (4,) + SMALL_INPUT).astype(np.float32)
  labels = (rng.random((4, 3)) < 0.5).astype(np.float32)

  _train_step(m, images, labels)
  m.compile(optimizer=tf.keras.optimizers.SGD(0.1),
            loss=tf.keras.losses.BinaryCrossentropy(from_logits=True))
  m.fit(images, labels, batch_size=4, epochs=1, verbose=0)

  for layer in norms:
    gamma, beta, mean, variance = before[layer.name]
    np.testing.assert_array_equal(layer.moving_mean.numpy(), mean)
    np.testing.assert_array_equal(layer.moving_variance.numpy(), variance)
    assert layer.gamma.trainable and layer.beta.trainable
  changed = [not np.array_equal(l.gamma.numpy(), before[l.name][0])
             for l in norms]
  assert all(changed)


@pytest.mark.slow
def test_one_federated_round_in_tff():
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  from benchmark.backends import tff_runtime  # pylint: disable=g-import-not-at-top

  def model_fn():
    keras_model = resnet.build_resnet(SMALL_INPUT, 3, pretrained=True,
                                      crop_size=SMALL_CROP)
    return tff.learning.models.from_keras_model(
        keras_model,
        loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
        input_spec=(tf.TensorSpec((None,) + SMALL_INPUT, tf.uint8),
                    tf.TensorSpec((None, 3), tf.int32)))

  process = tff.learning.algorithms.build_weighted_fed_avg(
      model_fn,
      client_optimizer_fn=tff.learning.optimizers.build_sgdm(0.01),
      server_optimizer_fn=tff.learning.optimizers.build_sgdm(1.0))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4,) + SMALL_INPUT).astype(np.uint8)
  labels = (rng.random((4, 3)) < 0.5).astype(np.int32)
  client = tf.data.Dataset.from_tensor_slices((images, labels)).batch(2)
  with tff_runtime.local_runtime():
    state = process.initialize()
    output = process.next(state, [client, client])
    # get_model_weights is a TFF computation too: it runs on this worker.
    before = process.get_model_weights(state)
    after = process.get_model_weights(output.state)
  assert output.metrics["client_work"]["train"]["num_examples"] == 8
  assert any(not np.array_equal(a, b)
             for a, b in zip(before.trainable, after.trainable))
  # BatchNorm moving statistics are the model's non-trainable weights.
  assert len(after.non_trainable) == 2 * len(_layout()[1])
  for a, b in zip(before.non_trainable, after.non_trainable):
    np.testing.assert_array_equal(a, b)


# --- Fast GroupNormalization and bfloat16 ---------------------------------

# Tolerance of the fast GroupNorm against Keras' layer: both compute in
# float32 with different summation orders, so results agree to float32
# round-off (~1e-7 relative per op) amplified by the division by the group
# standard deviation; 1e-5 of the largest magnitude is far above that and far
# below any real difference (a wrong group or a missing term changes values
# by O(1)).
GN_RTOL = 1e-5


def _keras_and_fast_norm(groups, channels, rng):
  keras_layer = tf.keras.layers.GroupNormalization(
      groups=groups, epsilon=resnet.NORM_EPSILON, name="some_norm")
  fast_layer = layers.GroupNormalization(
      groups=groups, epsilon=resnet.NORM_EPSILON, name="some_norm")
  for layer in (keras_layer, fast_layer):
    layer.build((None, 3, 3, channels))
  gamma = rng.uniform(0.5, 2.0, channels).astype(np.float32)
  beta = rng.normal(size=channels).astype(np.float32)
  for layer in (keras_layer, fast_layer):
    layer.set_weights([gamma, beta])
  return keras_layer, fast_layer


def _value_and_grads(layer, x, upstream):
  x = tf.constant(x)
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = layer(x)
    loss = tf.reduce_sum(y * upstream)
  grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
  return [y.numpy()] + [g.numpy() for g in grads]


def _assert_close(actual, expected, rtol):
  scale = max(1.0, float(np.max(np.abs(expected))))
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("groups, shape", [
    (32, (3, 7, 5, 64)),    # 2 channels per group, odd spatial sizes
    (8, (2, 4, 4, 32)),     # 4 channels per group
    (32, (4, 1, 1, 512)),   # 1x1 maps (ResNet-18's last stage at 32 px)
])
def test_fast_group_norm_equals_keras_outputs_and_gradients(groups, shape):
  rng = np.random.default_rng(0)
  keras_layer, fast_layer = _keras_and_fast_norm(groups, shape[-1], rng)
  # A large common offset and per-channel scales: stresses the variance.
  x = (rng.normal(size=shape) * rng.uniform(0.1, 10, shape[-1]) +
       5.0).astype(np.float32)
  upstream = rng.normal(size=shape).astype(np.float32)
  expected = _value_and_grads(keras_layer, x, upstream)
  actual = _value_and_grads(fast_layer, x, upstream)
  for name, a, e in zip(("output", "d/dx", "d/dgamma", "d/dbeta"), actual,
                        expected):
    assert a.shape == e.shape, name
    _assert_close(a, e, GN_RTOL)
  # The normalised output really is per image and group: zero mean.
  normalised = (actual[0] - fast_layer.beta.numpy()) / fast_layer.gamma.numpy()
  per_group = normalised.reshape(shape[0], -1, groups, shape[-1] // groups)
  np.testing.assert_allclose(per_group.mean(axis=(1, 3)), 0, atol=1e-4)


def test_fast_group_norm_keeps_keras_layer_identity_and_weight_names():
  rng = np.random.default_rng(1)
  keras_layer, fast_layer = _keras_and_fast_norm(32, 64, rng)
  assert isinstance(fast_layer, tf.keras.layers.GroupNormalization)
  assert ([w.name for w in fast_layer.weights] ==
          [w.name for w in keras_layer.weights] == ["gamma:0", "beta:0"])
  config = fast_layer.get_config()
  assert layers.GroupNormalization.from_config(config).get_config() == config
  # With a mask it falls back to Keras' own (masked) computation.
  x = rng.normal(size=(2, 3, 3, 64)).astype(np.float32)
  mask = (rng.random((2, 3, 3, 64)) < 0.7).astype(np.float32)
  np.testing.assert_array_equal(fast_layer(x, mask=mask).numpy(),
                                keras_layer(x, mask=mask).numpy())


def test_group_norm_model_weights_load_into_a_keras_group_norm_model(
    tmp_path, monkeypatch):
  # .h5 weights written by the model with the fast layer load by name into
  # the same model built with Keras' layer (what earlier versions wrote and
  # read), and both compute the same logits.
  fast = resnet.build_resnet(SMALL_INPUT, NUM_CLASSES, crop_size=SMALL_CROP,
                             seed=5)
  rng = np.random.default_rng(2)
  for layer in fast.layers:
    if isinstance(layer, tf.keras.layers.GroupNormalization):
      c = layer.gamma.shape[0]
      layer.set_weights([rng.uniform(0.5, 2, c).astype(np.float32),
                         rng.normal(size=c).astype(np.float32)])
  assert [w.name for w in fast.get_layer("initial_norm").weights] == [
      "initial_norm/gamma:0", "initial_norm/beta:0"]
  path = str(tmp_path / "fast.h5")
  fast.save_weights(path)
  monkeypatch.setattr(layers, "GroupNormalization",
                      tf.keras.layers.GroupNormalization)
  reference = resnet.build_resnet(SMALL_INPUT, NUM_CLASSES,
                                  crop_size=SMALL_CROP, seed=6)
  norms = [l for l in reference.layers
           if isinstance(l, tf.keras.layers.GroupNormalization)]
  assert norms and all(type(l) is tf.keras.layers.GroupNormalization
                       for l in norms)
  reference.load_weights(path, by_name=True)
  images = rng.integers(0, 256, (2,) + SMALL_INPUT).astype(np.float32)
  _assert_close(fast(images, training=False).numpy(),
                reference(images, training=False).numpy(), 1e-4)


@pytest.mark.parametrize("crop", [(32, 32), (31, 29)])
def test_fast_convolutions_equal_the_plain_layout(crop, monkeypatch):
  # The model as built (stride-1 3x3 convolutions pad inside the op; small
  # maps as patch products) against the same weights in the plain layout (a
  # ZeroPadding2D layer before every 3x3 convolution, TensorFlow's
  # convolution op everywhere): equal logits and weight gradients to 1e-5
  # relative, on even and odd feature map sizes.
  fast = resnet.build_resnet(SMALL_INPUT, NUM_CLASSES, crop_size=crop, seed=3)
  builder = resnet._Builder  # pylint: disable=protected-access
  monkeypatch.setattr(builder, "pad_inside_conv", False)
  monkeypatch.setattr(builder, "patch_small_maps", False)
  reference = resnet.build_resnet(SMALL_INPUT, NUM_CLASSES, crop_size=crop,
                                  seed=3)
  paddings = [l for l in reference.layers
              if isinstance(l, tf.keras.layers.ZeroPadding2D)]
  assert len(paddings) == 2 + 2 * sum(blocks for _, blocks in STAGES)
  assert len(reference.layers) - len(fast.layers) == len(paddings) - 5
  assert not any(isinstance(l, layers.PatchConv2D) for l in reference.layers)
  # Stages 3 and 4 have maps of at most 2x2 positions at these crops.
  patched = [l.name for l in fast.layers if isinstance(l, layers.PatchConv2D)]
  assert sorted(patched) == sorted(
      f"layer{s}_{name}" for s in (3, 4)
      for name in ("block1_conv1_3x3", "block1_conv2_3x3", "block2_conv1_3x3",
                   "block2_conv2_3x3", "downsample_conv_1x1"))
  reference.set_weights(fast.get_weights())
  rng = np.random.default_rng(4)
  images = tf.constant(
      rng.integers(0, 256, (3,) + SMALL_INPUT).astype(np.float32))
  labels = tf.constant((rng.random((3, NUM_CLASSES)) < 0.3).astype(np.float32))
  results = []
  for m in (fast, reference):
    with tf.GradientTape() as tape:
      logits = m(images, training=False)
      loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(
          labels, logits))
    grads = tape.gradient(loss, m.trainable_variables)
    results.append([logits.numpy()] + [g.numpy() for g in grads])
  assert len(results[0]) == len(results[1])
  for actual, expected in zip(*results):
    _assert_close(actual, expected, 1e-5)


def test_checkpoint_of_the_plain_layout_restores_into_the_model(
    tmp_path, monkeypatch):
  # A TF checkpoint (what Keras' BackupAndRestore writes) saved by the plain
  # layout, with its extra padding layers, restores every weight of the model
  # as built now: a central run interrupted under the old layout resumes.
  builder = resnet._Builder  # pylint: disable=protected-access
  with monkeypatch.context() as patch:
    patch.setattr(builder, "pad_inside_conv", False)
    patch.setattr(builder, "patch_small_maps", False)
    plain = resnet.build_resnet(SMALL_INPUT, NUM_CLASSES, crop_size=SMALL_CROP,
                                seed=1)
  fast = resnet.build_resnet(SMALL_INPUT, NUM_CLASSES, crop_size=SMALL_CROP,
                             seed=2)
  assert len(plain.layers) > len(fast.layers)
  path = tf.train.Checkpoint(model=plain).save(str(tmp_path / "plain"))
  tf.train.Checkpoint(model=fast).restore(
      path).assert_existing_objects_matched()
  for restored, saved in zip(fast.weights, plain.weights):
    assert restored.name == saved.name
    np.testing.assert_array_equal(restored.numpy(), saved.numpy())


@pytest.mark.parametrize("shape, kernel, stride, padding", [
    ((3, 2, 2, 8), 3, 1, "same"),
    ((2, 1, 3, 5), 3, 1, "same"),
    ((2, 6, 6, 4), 3, 2, "valid"),
    ((2, 5, 4, 4), 3, 2, "valid"),
    ((2, 4, 4, 6), 1, 2, "valid"),
    ((2, 3, 3, 3), 3, 1, "valid"),
])
def test_patch_convolution_equals_keras_conv2d(shape, kernel, stride,
                                              padding):
  rng = np.random.default_rng(7)
  keras_conv = tf.keras.layers.Conv2D(6, kernel, strides=stride,
                                      padding=padding, use_bias=False,
                                      name="some_conv")
  patch_conv = layers.PatchConv2D(6, kernel, strides=stride, padding=padding,
                                 use_bias=False, name="some_conv")
  for layer in (keras_conv, patch_conv):
    layer.build((None,) + shape[1:])
  assert [(w.name, w.shape) for w in patch_conv.weights] == [
      (w.name, w.shape) for w in keras_conv.weights]
  weights = rng.normal(size=keras_conv.kernel.shape).astype(np.float32)
  x = tf.constant(rng.normal(size=shape).astype(np.float32))
  results = []
  for layer in (keras_conv, patch_conv):
    layer.set_weights([weights])
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = layer(x)
      upstream = tf.reshape(tf.cos(tf.range(tf.size(y), dtype=tf.float32)),
                            tf.shape(y))
      loss = tf.reduce_sum(y * upstream)
    grads = tape.gradient(loss, [x, layer.kernel])
    results.append([y.numpy()] + [g.numpy() for g in grads])
  assert results[0][0].shape == results[1][0].shape
  for actual, expected in zip(results[1], results[0]):
    _assert_close(actual, expected, 1e-5)


def test_patch_convolution_falls_back_to_keras_op_where_it_cannot_apply():
  # "same" at stride 2 pads unevenly; an unknown height needs Keras' op.
  layer = layers.PatchConv2D(4, 3, strides=2, padding="same", use_bias=False)
  layer.build((None, 4, 4, 2))
  assert layer._patch_layout(tf.zeros([1, 4, 4, 2])) is None  # pylint: disable=protected-access
  layer = layers.PatchConv2D(4, 3, padding="valid", use_bias=False)
  layer.build((None, None, 4, 2))
  assert layer._patch_layout(  # pylint: disable=protected-access
      tf.keras.Input((None, 4, 2))) is None
  x = tf.random.normal([1, 4, 4, 2])
  same2 = layers.PatchConv2D(4, 3, strides=2, padding="same", use_bias=False)
  reference = tf.keras.layers.Conv2D(4, 3, strides=2, padding="same",
                                     use_bias=False)
  for l in (same2, reference):
    l.build((None, 4, 4, 2))
  same2.set_weights(reference.get_weights())
  np.testing.assert_allclose(same2(x).numpy(), reference(x).numpy(),
                             rtol=1e-6)


@pytest.mark.parametrize("value", ["float16", "bf16", "", None, 32])
def test_invalid_precision_is_a_one_line_flag_error(value):
  with pytest.raises(errors.FlairInputError, match="--precision") as info:
    mixed_precision.check_precision(value)
  assert "\n" not in str(info.value)
  with pytest.raises(errors.FlairInputError, match="--precision"):
    resnet.build_resnet(SMALL_INPUT, NUM_CLASSES, crop_size=SMALL_CROP,
                        precision=value)


# bfloat16 keeps 8 significand bits (relative rounding 2**-9 ~ 0.2%); through
# 17 convolutions the logits of the same weights drift further. Measured on
# this model (ResNet-18, 64 px, ImageNet-normalised random images): max
# |logit difference| ~ 2% of the float32 logits' standard deviation. We
# assert 10%: a wrong layer (e.g. a normalisation run in bfloat16 that loses
# its statistics, or an uncast output) gives differences of the order of the
# logits themselves.
BF16_LOGIT_TOLERANCE = 0.10


def test_bfloat16_model_is_mixed_precision_and_close_to_float32():
  f32 = resnet.build_resnet((72, 72, 3), NUM_CLASSES, crop_size=(64, 64),
                            seed=7)
  bf16 = resnet.build_resnet((72, 72, 3), NUM_CLASSES, crop_size=(64, 64),
                             seed=7, precision=mixed_precision.BFLOAT16)
  # Same weights, all float32 (so weights files do not depend on precision).
  assert [w.name for w in bf16.weights] == [w.name for w in f32.weights]
  assert all(w.dtype == tf.float32 for w in bf16.weights)
  for wa, wb in zip(f32.get_weights(), bf16.get_weights()):
    np.testing.assert_array_equal(wa, wb)
  policies = {l.name: l.dtype_policy.name for l in bf16.layers}
  assert policies["layer2_block1_conv1_3x3"] == "mixed_bfloat16"
  assert policies["initial_conv"] == "mixed_bfloat16"
  for name in ("crop", "imagenet_normalization", "initial_norm",
               "layer4_block2_norm2", "global_pooling", "classifier"):
    assert policies[name] == "float32", name
  assert {l.dtype_policy.name for l in f32.layers} == {"float32"}

  images = np.random.default_rng(3).integers(
      0, 256, (4, 72, 72, 3)).astype(np.float32)
  expected = f32(images, training=False).numpy()
  actual = bf16(images, training=False)
  assert actual.dtype == tf.float32
  difference = np.max(np.abs(actual.numpy() - expected))
  assert difference <= BF16_LOGIT_TOLERANCE * np.std(expected), (
      difference, np.std(expected))
  # It trains: float32 gradients, finite loss, weights move.
  labels = (np.random.default_rng(4).random((4, NUM_CLASSES)) < 0.3
           ).astype(np.float32)
  bf16.compile(optimizer=tf.keras.optimizers.SGD(0.1),
               loss=tf.keras.losses.BinaryCrossentropy(from_logits=True))
  before = bf16.get_layer("initial_conv").kernel.numpy().copy()
  history = bf16.fit(images, labels, batch_size=4, epochs=1, verbose=0)
  assert np.isfinite(history.history["loss"][0])
  assert not np.array_equal(before,
                            bf16.get_layer("initial_conv").kernel.numpy())
