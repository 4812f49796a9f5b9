"""Which labels a model predicts (`LabelSpec`: coarse, fine-grained or one
binary label), read from a prepared directory's label index."""

import dataclasses
import difflib
from typing import Optional

from benchmark.core import constants
from benchmark.core.errors import FlairInputError
from benchmark.data import formats

# Above this many valid names, an unknown-label error lists close matches
# instead of every name (the fine-grained set has ~1,628).
_MAX_NAMES_IN_ERROR = 50


@dataclasses.dataclass(frozen=True)
class LabelSpec:
  """Which labels a model predicts.

  Attributes:
    names: label names in index order (the index in the label index JSON), of
      the coarse labels or, with `use_fine_grained_labels`, the fine-grained
      ones.
    use_fine_grained_labels: read the `fine_grained_labels` feature instead of
      the coarse `labels`.
    binary_label: when set, the one label (a member of `names`) that becomes a
      single 0/1 target.
  """
  names: tuple[str, ...]
  use_fine_grained_labels: bool = False
  binary_label: Optional[str] = None

  def __post_init__(self):
    if not isinstance(self.names, tuple) or not self.names:
      raise FlairInputError("LabelSpec.names must be a non-empty tuple of "
                            "label names")
    if len(set(self.names)) != len(self.names):
      raise FlairInputError("LabelSpec.names has duplicate label names")
    if self.binary_label is not None and self.binary_label not in self.names:
      raise FlairInputError(
          f"LabelSpec.binary_label {self.binary_label!r} is not one of the "
          f"{self.kind} labels")

  @property
  def kind(self) -> str:
    """`"fine-grained"` or `"coarse"`."""
    return "fine-grained" if self.use_fine_grained_labels else "coarse"

  @property
  def feature_key(self) -> str:
    """The `tf.train.Example` feature holding this label set's indices."""
    return (constants.FINE_GRAINED_LABELS_FEATURE
            if self.use_fine_grained_labels else constants.LABELS_FEATURE)

  @property
  def num_labels(self) -> int:
    """Size of the label set (`len(names)`)."""
    return len(self.names)

  @property
  def num_outputs(self) -> int:
    """Model outputs: 1 with a binary label, else the number of labels."""
    return 1 if self.binary_label is not None else len(self.names)

  @property
  def binary_index(self) -> Optional[int]:
    """The index of `binary_label`, or None."""
    if self.binary_label is None:
      return None
    return self.names.index(self.binary_label)


def _unknown_label_message(label: str, spec_kind: str,
                           names: tuple[str, ...], path: str) -> str:
  if len(names) <= _MAX_NAMES_IN_ERROR:
    valid = ", ".join(names)
    return (f"--binary_label {label!r} is not a {spec_kind} label; valid "
            f"names: {valid}")
  close = difflib.get_close_matches(label, names, n=10)
  hint = (f"close matches: {', '.join(close)}" if close
          else "no close matches")
  return (f"--binary_label {label!r} is not one of the {len(names)} "
          f"{spec_kind} labels listed in {path} ({hint})")


def load_label_spec(tfrecords_dir: str,
                    use_fine_grained_labels: bool = False,
                    binary_label: Optional[str] = None) -> LabelSpec:
  """Reads the label index of a TFRecords directory into a `LabelSpec`.

  Args:
    tfrecords_dir: a directory written by `prepare_tfrecords.py`.
    use_fine_grained_labels: use the fine-grained label set instead of the 17
      coarse labels.
    binary_label: optional name of one label (of the chosen set) to predict as
      a single 0/1 output.

  Returns:
    The label spec, `names` in index order.

  Raises:
    FlairInputError: if the directory or label index is missing or malformed,
      or `binary_label` is not a label of the chosen set (the message lists
      the valid names, or close matches for the fine-grained set).
  """
  path, index = formats.read_label_index(tfrecords_dir)
  key = (constants.FINE_GRAINED_LABELS_KEY if use_fine_grained_labels
         else constants.LABELS_KEY)
  names = index[key]
  if not names:
    raise FlairInputError(f"{path}: {key!r} holds no labels")
  kind = "fine-grained" if use_fine_grained_labels else "coarse"
  if binary_label is not None and binary_label not in names:
    raise FlairInputError(
        _unknown_label_message(binary_label, kind, names, path))
  return LabelSpec(names=names,
                   use_fine_grained_labels=bool(use_fine_grained_labels),
                   binary_label=binary_label)
