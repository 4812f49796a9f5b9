"""Restores Keras weights from an HDF5 file by layer name, skipping layers whose
shapes differ, and reports what was loaded and what was skipped; a file that
would leave most of the model, or all of its normalisation, untouched is
refused as the wrong file unless a partial restore is intended.

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
from typing import Optional, Sequence

from absl import logging
import h5py
import numpy as np
import tensorflow as tf

from benchmark.core import errors

# A weight name without its layer scope and `:N` suffix
# ("model/initial_norm/gamma:0" -> "gamma").
_WEIGHT_SUFFIX = re.compile(r":\d+$")
# The normalisation layers, by the name messages give their kind. A restore
# that skips all of a model's (a GroupNorm file restored into the BatchNorm
# model, say) is refused unless intended (`allow_partial`).
_NORMALIZATIONS = (("BatchNorm", tf.keras.layers.BatchNormalization),
                   ("GroupNorm", tf.keras.layers.GroupNormalization),
                   ("LayerNorm", tf.keras.layers.LayerNormalization))
# A normalisation layer's weights in a file, by short name, and the kind
# they show: BatchNorm keeps moving statistics, GroupNorm only gamma, beta.
_STORED_NORMALIZATIONS = (
    ("BatchNorm", {"gamma", "beta", "moving_mean", "moving_variance"}),
    ("GroupNorm", {"gamma", "beta"}))


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


def _model_norm_kind(layer: tf.keras.layers.Layer) -> Optional[str]:
  """The kind of a normalisation layer (a name of `_NORMALIZATIONS`, e.g.
  "BatchNorm"), or None for another layer."""
  for kind, layer_type in _NORMALIZATIONS:
    if isinstance(layer, layer_type):
      return kind
  return None


def _stored_norm_kind(stored: Sequence[tuple[str, np.ndarray]]
                     ) -> Optional[str]:
  """The kind of normalisation a file's layer holds, by its weights' short
  names, or None when they are not a normalisation's."""
  names = {_short_name(name) for name, _ in stored}
  for kind, weights in _STORED_NORMALIZATIONS:
    if names == weights:
      return kind
  return None


def _what_the_file_is(norms: list[tf.keras.layers.Layer],
                      stored_layers: dict, num_loaded: int,
                      num_layers: int) -> str:
  """How a file that does not fit the model differs from it, for a message:
  "looks like a GroupNorm model; this model uses BatchNorm" when its layers
  named as the model's normalisation layers hold one other kind, else how
  few of the model's layers it matches."""
  model_kinds = {_model_norm_kind(layer) for layer in norms}
  file_kinds = {_stored_norm_kind(stored_layers[layer.name])
                for layer in norms if layer.name in stored_layers}
  if (len(model_kinds) == 1 and len(file_kinds) == 1
      and None not in file_kinds and file_kinds != model_kinds):
    return (f"looks like a {file_kinds.pop()} model; this model uses "
            f"{model_kinds.pop()}")
  return (f"matches {num_loaded} of the model's {num_layers} layers with "
          "weights by name and shape (another network or --model_layout?)")


def _check_coverage(model: tf.keras.Model, stored_layers: dict,
                    report: RestoreReport, h5_path: str,
                    allow_partial: bool) -> None:
  """Refuses (with `allow_partial`, warns about) a restore that would leave
  every normalisation layer of the model, or more than half of its layers
  with weights, at their initial values: almost certainly the wrong file.

  Raises:
    benchmark.errors.FlairInputError: such a restore without
      `allow_partial` (one line naming the file, what it looks like and the
      flag that allows it).
  """
  layers = [layer for layer in model.layers if layer.weights]
  skipped = ({name for name, _ in report.skipped}
             & {layer.name for layer in layers})
  norms = [layer for layer in layers if _model_norm_kind(layer)]
  norms_skipped = sum(layer.name in skipped for layer in norms)
  if not ((norms and norms_skipped == len(norms))
          or 2 * len(skipped) > len(layers)):
    return
  what = _what_the_file_is(norms, stored_layers, len(report.loaded),
                           len(layers))
  message = (
      f"weights file {h5_path} {what}: {len(skipped)} of the model's "
      f"{len(layers)} layers with weights ({norms_skipped} of its "
      f"{len(norms)} normalisation layers) would keep their initial values")
  if not allow_partial:
    raise errors.FlairInputError(
        f"{message}; restore weights of this model, or pass --restore_partial "
        "if a partial restore is intended")
  logging.warning("%s; restoring the rest as --restore_partial allows.",
                  message)


def restore_weights_by_name(model: tf.keras.Model, h5_path: str,
                            allow_partial: bool = False) -> RestoreReport:
  """Sets the model's layer weights from a Keras weights `.h5`, by layer name.

  A model layer is loaded only when the file has a layer of the same name
  whose weights match it in number and shape; all its weights are then set
  (for BatchNormalization that includes the moving mean and variance).
  Nothing is changed unless at least one layer matches and, without
  `allow_partial`, unless the restore leaves neither every normalisation
  layer nor more than half of the layers with weights at their initial
  values (a file of another model: e.g. GroupNorm weights for the BatchNorm
  model).

  Args:
    model: a built Keras model, e.g. `benchmark.model.resnet.build_resnet(...,
      pretrained=True)`.
    h5_path: path of the weights file (see the module docstring for the
      layout).
    allow_partial: restore whatever matches, however little (a warning
      says how much is left at its initial values; `--restore_partial`).

  Returns:
    A `RestoreReport`; its summary is also logged.

  Raises:
    benchmark.errors.FlairInputError: the file is missing, not HDF5, not in
      the Keras weights layout, no layer of the model matches it, or,
      without `allow_partial`, it leaves every normalisation layer or more
      than half of the layers with weights unrestored (naming the file and
      what it looks like, e.g. "looks like a GroupNorm model; this model
      uses BatchNorm").
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
  _check_coverage(model, stored_layers, report, h5_path, allow_partial)
  for variable, array in assignments:
    variable.assign(array.astype(variable.dtype.as_numpy_dtype))
  logging.info("Restored weights from %s: %s", h5_path, report.summary())
  return report
