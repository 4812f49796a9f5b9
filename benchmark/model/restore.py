"""Restores Keras weights from an HDF5 file by layer name, skipping layers whose
shapes differ, and reports what was loaded and what was skipped.

Used for `--restore_model_path` (docs/original_benchmark.md, "Fine-tuning"): the
published ImageNet `resnet18.h5` carries a 1000-way classifier, so every layer
but the classifier loads into a FLAIR ResNet-18 built with the same layer
names (`benchmark.model`).

File layout read (the one `model.save_weights("x.h5")` writes in tf.keras
2.x, and the `model_weights` group of `model.save("x.h5")`): one HDF5 group
per layer, named after the layer, with an attribute `weight_names` listing its
weights (e.g. `initial_norm/gamma:0`); each name is also the path of the
weight's dataset inside the group. The root attribute `layer_names`, when
present, gives the layer order.
"""

import dataclasses
import os
import re

from absl import logging
import h5py
import numpy as np
import tensorflow as tf

from benchmark.core import errors

# A weight name without its layer scope and `:N` suffix
# ("model/initial_norm/gamma:0" -> "gamma").
_WEIGHT_SUFFIX = re.compile(r":\d+$")


@dataclasses.dataclass
class RestoreReport:
  """What `restore_weights_by_name` did.

  Attributes:
    loaded: names of the model's layers whose weights were all set from the
      file, in model order.
    skipped: `(layer name, reason)` for every weight-bearing layer that was
      not loaded: a model layer absent from the file, a layer whose weights
      differ in number or shape (typically `classifier` with another number
      of classes), or a file layer the model does not have.
  """
  loaded: list[str] = dataclasses.field(default_factory=list)
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    """One line: counts, then each skipped layer with its reason."""
    text = f"loaded {len(self.loaded)} layers, skipped {len(self.skipped)}"
    if self.skipped:
      text += ": " + "; ".join(f"{name} ({reason})"
                               for name, reason in self.skipped)
    return text


def _decode(value) -> str:
  return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _short_name(weight_name: str) -> str:
  return _WEIGHT_SUFFIX.sub("", weight_name).rsplit("/", 1)[-1]


def _read_layers(h5_path: str) -> dict[str, list[tuple[str, np.ndarray]]]:
  """Reads `{layer name: [(weight name, array), ...]}` for layers with
  weights, in file order. Raises FlairInputError if the file is unusable."""
  if not os.path.exists(h5_path):
    raise errors.FlairInputError(
        f"weights file {h5_path} does not exist (expected a Keras weights "
        ".h5)")
  if not os.path.isfile(h5_path) or not h5py.is_hdf5(h5_path):
    raise errors.FlairInputError(
        f"weights file {h5_path} is not an HDF5 file (expected a Keras "
        "weights .h5 as written by model.save_weights)")
  layers = {}
  try:
    with h5py.File(h5_path, "r") as f:
      root = f["model_weights"] if "model_weights" in f else f
      if "layer_names" in root.attrs:
        names = [_decode(n) for n in root.attrs["layer_names"]]
      else:
        names = list(root.keys())
      for name in names:
        group = root.get(name)
        if not isinstance(group, h5py.Group):
          continue
        weight_names = [_decode(n) for n in group.attrs.get("weight_names",
                                                            [])]
        if weight_names:
          layers[name] = [(w, np.asarray(group[w])) for w in weight_names]
  except (OSError, KeyError, ValueError) as e:
    raise errors.FlairInputError(
        f"weights file {h5_path} could not be read as Keras weights: "
        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
  return layers


def _pair_weights(layer: tf.keras.layers.Layer,
                  stored: list[tuple[str, np.ndarray]]):
  """Pairs the layer's variables with stored arrays.

  By short weight name ("kernel", "gamma", ...) when both sides have the same
  set of unique names; otherwise in the order Keras saves weights
  (trainable, then non-trainable).

  Returns:
    `(pairs, None)` with `pairs` a list of `(variable, array)`, or
    `(None, reason)` when the weights do not match in number or shape.
  """
  variables = list(layer.trainable_weights) + list(
      layer.non_trainable_weights)
  if len(variables) != len(stored):
    return None, (f"{len(stored)} weights in the file, {len(variables)} in "
                  "the model")
  model_names = [_short_name(v.name) for v in variables]
  file_names = [_short_name(name) for name, _ in stored]
  if (len(set(model_names)) == len(model_names) and
      set(model_names) == set(file_names)):
    by_name = {_short_name(name): array for name, array in stored}
    arrays = [by_name[n] for n in model_names]
  else:
    arrays = [array for _, array in stored]
  for variable, name, array in zip(variables, model_names, arrays):
    if tuple(variable.shape) != tuple(array.shape):
      return None, (f"shape of {name} differs: {tuple(array.shape)} in the "
                    f"file, {tuple(variable.shape)} in the model")
  return list(zip(variables, arrays)), None


def restore_weights_by_name(model: tf.keras.Model,
                            h5_path: str) -> RestoreReport:
  """Sets the model's layer weights from a Keras weights `.h5`, by layer name.

  A model layer is loaded only when the file has a layer of the same name
  whose weights match it in number and shape; all its weights are then set
  (for BatchNormalization that includes the moving mean and variance).
  Nothing is changed unless at least one layer matches.

  Args:
    model: a built Keras model, e.g. `benchmark.model.resnet.build_resnet(...,
      pretrained=True)`.
    h5_path: path of the weights file (see the module docstring for the
      layout).

  Returns:
    A `RestoreReport`; its summary is also logged.

  Raises:
    benchmark.errors.FlairInputError: the file is missing, not HDF5, not in
      the Keras weights layout, or no layer of the model matches it.
  """
  stored_layers = _read_layers(h5_path)
  report = RestoreReport()
  assignments = []
  model_layer_names = set()
  for layer in model.layers:
    if not layer.weights:
      continue
    model_layer_names.add(layer.name)
    stored = stored_layers.get(layer.name)
    if stored is None:
      report.skipped.append((layer.name, "not in the file"))
      continue
    pairs, reason = _pair_weights(layer, stored)
    if pairs is None:
      report.skipped.append((layer.name, reason))
      continue
    assignments.extend(pairs)
    report.loaded.append(layer.name)
  for name in stored_layers:
    if name not in model_layer_names:
      report.skipped.append((name, "in the file, not in the model"))

  if not report.loaded:
    file_layers = ", ".join(list(stored_layers)[:5]) or "none"
    if len(stored_layers) > 5:
      file_layers += ", ..."
    raise errors.FlairInputError(
        f"no layer of the model matches weights file {h5_path} by name and "
        f"shape (its layers with weights: {file_layers})")
  for variable, array in assignments:
    variable.assign(array.astype(variable.dtype.as_numpy_dtype))
  logging.info("Restored weights from %s: %s", h5_path, report.summary())
  return report
