"""Tests of benchmark.model.restore: loading Keras weights .h5 files by layer
name."""

import os

import h5py
import numpy as np
import pytest
import tensorflow as tf

from benchmark.core import errors
from benchmark.model import resnet
from benchmark.model import restore

INPUT = (40, 40, 3)
CROP = (32, 32)


def _small_resnet(num_classes, pretrained, seed):
  return resnet.build_resnet(INPUT, num_classes, pretrained=pretrained,
                             crop_size=CROP, seed=seed)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A 5-class BatchNorm ResNet-18 with non-default moving statistics, and
  the .h5 written from it by Keras."""
  src = _small_resnet(5, pretrained=True, seed=1)
  rng = np.random.default_rng(0)
  for layer in src.layers:
    if isinstance(layer, tf.keras.layers.BatchNormalization):
      c = layer.moving_mean.shape[0]
      layer.moving_mean.assign(rng.normal(size=c).astype(np.float32))
      layer.moving_variance.assign(rng.uniform(0.5, 2, c).astype(np.float32))
      layer.gamma.assign(rng.uniform(0.5, 2, c).astype(np.float32))
  path = str(tmp_path_factory.mktemp("weights") / "source.h5")
  src.save_weights(path)
  return src, path


def _weight_bearing(m):
  return [layer.name for layer in m.layers if layer.weights]


def test_restore_by_name_skips_the_classifier(source):
  src, path = source
  dst = _small_resnet(17, pretrained=True, seed=2)
  classifier_before = [w.copy() for w in dst.get_layer(
      "classifier").get_weights()]
  report = restore.restore_weights_by_name(dst, path)

  assert [name for name, _ in report.skipped] == ["classifier"]
  assert "shape" in report.skipped[0][1]
  expected = [n for n in _weight_bearing(dst) if n != "classifier"]
  assert report.loaded == expected
  for name in report.loaded:
    restored = dst.get_layer(name).weights
    original = src.get_layer(name).weights
    assert [w.name for w in restored] == [w.name for w in original]
    for r, o in zip(restored, original):  # BatchNorm moving stats included.
      np.testing.assert_array_equal(r.numpy(), o.numpy())
  for after, before in zip(dst.get_layer("classifier").get_weights(),
                           classifier_before):
    np.testing.assert_array_equal(after, before)
  assert "classifier" in report.summary()


def test_group_norm_model_loads_only_convolutions(source):
  _, path = source
  dst = _small_resnet(5, pretrained=False, seed=2)
  # Every normalisation layer would be skipped: refused unless intended.
  with pytest.raises(errors.FlairInputError,
                     match="looks like a BatchNorm model; this model uses "
                     "GroupNorm"):
    restore.restore_weights_by_name(dst, path)
  report = restore.restore_weights_by_name(dst, path, allow_partial=True)
  norms = [l.name for l in dst.layers
           if isinstance(l, tf.keras.layers.GroupNormalization)]
  convs = [l.name for l in dst.layers
           if isinstance(l, tf.keras.layers.Conv2D)]
  assert set(report.loaded) == set(convs) | {"classifier"}
  skipped = dict(report.skipped)
  assert set(skipped) == set(norms)
  assert all("4 weights in the file, 2 in the model" == skipped[n]
             for n in norms)


@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5")
def test_full_model_h5_and_extra_file_layers(tmp_path):
  # model.save("x.h5") nests the weights under "model_weights"; a layer the
  # model lacks is reported, not an error.
  inputs = tf.keras.Input((3,))
  hidden = tf.keras.layers.Dense(4, name="hidden")(inputs)
  outputs = tf.keras.layers.Dense(2, name="extra")(hidden)
  src = tf.keras.Model(inputs, outputs)
  path = str(tmp_path / "full.h5")
  src.save(path, save_format="h5")
  inputs = tf.keras.Input((3,))
  dst = tf.keras.Model(inputs,
                       tf.keras.layers.Dense(4, name="hidden")(inputs))
  report = restore.restore_weights_by_name(dst, path)
  assert report.loaded == ["hidden"]
  assert report.skipped == [("extra", "in the file, not in the model")]
  for r, o in zip(dst.get_layer("hidden").get_weights(),
                  src.get_layer("hidden").get_weights()):
    np.testing.assert_array_equal(r, o)


def _assert_one_line_error(m, path, match):
  with pytest.raises(errors.FlairInputError, match=match) as info:
    restore.restore_weights_by_name(m, path)
  assert "\n" not in str(info.value)
  assert path in str(info.value)


def test_nothing_matching_raises_and_changes_nothing(tmp_path):
  inputs = tf.keras.Input((3,))
  unrelated = tf.keras.Model(
      inputs, tf.keras.layers.Dense(2, name="classifier")(inputs))
  path = str(tmp_path / "unrelated.h5")
  unrelated.save_weights(path)
  dst = _small_resnet(17, pretrained=True, seed=2)
  before = dst.get_weights()
  _assert_one_line_error(dst, path, "no layer of the model matches")
  for a, b in zip(dst.get_weights(), before):
    np.testing.assert_array_equal(a, b)


def test_missing_or_unreadable_file_raises(tmp_path):
  inputs = tf.keras.Input((3,))
  dst = tf.keras.Model(inputs, tf.keras.layers.Dense(2, name="d")(inputs))
  _assert_one_line_error(dst, str(tmp_path / "absent.h5"), "does not exist")
  text = tmp_path / "not_hdf5.h5"
  text.write_text("not an HDF5 file")
  _assert_one_line_error(dst, str(text), "not an HDF5 file")
  empty = str(tmp_path / "empty.h5")
  with h5py.File(empty, "w"):
    pass
  assert os.path.getsize(empty) > 0
  _assert_one_line_error(dst, empty, "no layer of the model matches")


# --- A file that does not fit the model (issue 32, case 11) -----------------


def _tiny_resnet(pretrained, seed=2, num_classes=5):
  return resnet.build_resnet(INPUT, num_classes, pretrained=pretrained,
                             crop_size=CROP, seed=seed, layout=resnet.TINY)


def test_a_group_norm_file_into_the_batch_norm_model_is_refused(tmp_path,
                                                                caplog):
  """One of our own central outputs (GroupNorm) restored into the BatchNorm
  model that --restore_model_path builds: every normalisation layer would
  keep its initial values. Refused naming the file and what it looks like,
  nothing changed; with allow_partial (--restore_partial), restored with a
  warning."""
  path = str(tmp_path / "tiny_central_5labels.h5")
  _tiny_resnet(pretrained=False, seed=1).save_weights(path)
  dst = _tiny_resnet(pretrained=True)
  before = dst.get_weights()
  with pytest.raises(errors.FlairInputError) as info:
    restore.restore_weights_by_name(dst, path)
  message = str(info.value)
  norms = [layer.name for layer in dst.layers
           if isinstance(layer, tf.keras.layers.BatchNormalization)]
  assert message.startswith(
      f"weights file {path} looks like a GroupNorm model; this model uses "
      f"BatchNorm: {len(norms)} of the model's "), message
  assert f"({len(norms)} of its {len(norms)} normalisation layers)" in message
  assert "--restore_partial" in message and "\n" not in message
  for a, b in zip(dst.get_weights(), before):
    np.testing.assert_array_equal(a, b)
  report = restore.restore_weights_by_name(dst, path, allow_partial=True)
  assert {name for name, _ in report.skipped} == set(norms)
  assert "--restore_partial" in caplog.text


def test_a_file_that_matches_less_than_half_of_the_model_is_refused(
    source, tmp_path):
  """More than half of the model's layers with weights would not be
  restored (a file holding only the first stage of the BatchNorm ResNet-18,
  its normalisation included)."""
  _, full = source
  path = str(tmp_path / "first_stage.h5")
  with h5py.File(full, "r") as f, h5py.File(path, "w") as out:
    names = [n.decode() if isinstance(n, bytes) else str(n)
             for n in f.attrs["layer_names"]]
    names = [n for n in names if n.startswith(("initial_", "layer1_"))
             and len(f[n].attrs["weight_names"])]
    for name in names:
      f.copy(f[name], out, name=name)
    out.attrs["layer_names"] = names
  dst = _small_resnet(17, pretrained=True, seed=2)
  layers = _weight_bearing(dst)
  with pytest.raises(errors.FlairInputError) as info:
    restore.restore_weights_by_name(dst, path)
  message = str(info.value)
  assert message.startswith(
      f"weights file {path} matches {len(names)} of the model's "
      f"{len(layers)} layers with weights by name and shape"), message
  assert "--model_layout" in message and "--restore_partial" in message
  report = restore.restore_weights_by_name(dst, path, allow_partial=True)
  assert len(report.loaded) == len(names)


def test_restore_partial_reaches_the_restore(tmp_path):
  """`--restore_partial` (ModelConfig.restore_partial) is what lets
  `models.build_initial_model` restore a file that does not fit."""
  from benchmark.training import config as config_lib  # pylint: disable=g-import-not-at-top
  from benchmark.training import models  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "group_norm.h5")
  source = resnet.build_resnet(num_classes=3, crop_size=CROP, seed=1,
                               layout=resnet.TINY)
  source.save_weights(path)
  settings = dict(restore_model_path=path, model_layout=resnet.TINY,
                  image_height=CROP[0], image_width=CROP[1])
  with pytest.raises(errors.FlairInputError, match="GroupNorm"):
    models.build_initial_model(config_lib.ModelConfig(**settings), 3)
  model = models.build_initial_model(
      config_lib.ModelConfig(restore_partial=True, **settings), 3)
  np.testing.assert_array_equal(
      model.get_layer("initial_conv").get_weights()[0],
      source.get_layer("initial_conv").get_weights()[0])
