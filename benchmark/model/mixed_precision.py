"""Mixed precision of the model: `--precision` values and which layers
compute in bfloat16 (`layer_dtype`)."""

import tensorflow as tf

from benchmark.core import errors

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
    benchmark.core.errors.FlairInputError: any other value (one line, naming
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
  `resnet.build_resnet(precision=...)`: with "float32" every layer is
  float32; with "bfloat16" convolutions, paddings, ReLUs, max-pooling and residual adds use
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
    benchmark.core.errors.FlairInputError: `precision` is not valid.
    ValueError: unknown `role`.
  """
  check_precision(precision)
  if role != "compute" and role not in _FLOAT32_ROLES:
    raise ValueError(f"unknown layer role {role!r}")
  if precision == BFLOAT16 and role == "compute":
    return tf.keras.mixed_precision.Policy("mixed_bfloat16")
  return tf.keras.mixed_precision.Policy("float32")
