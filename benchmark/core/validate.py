"""Checks of integer and number arguments, with one wording for every module.

Configs and library functions call these to refuse a bad value with an error
that names it (a flag as "--name", an argument as "name") and says what was
expected. Booleans are refused where an integer is expected, although Python
counts them as integers.
"""

import math
from typing import Optional, Sequence

import numpy as np

from benchmark.core.errors import FlairInputError


def is_int(value) -> bool:
  """True for a Python or NumPy integer; False for a bool and anything else."""
  return (isinstance(value, (int, np.integer))
          and not isinstance(value, (bool, np.bool_)))


def check_int(name: str, value, minimum: int = 1, *, allow_none: bool = False,
              reason: Optional[str] = None,
              error: type[Exception] = FlairInputError) -> None:
  """Raises `error` unless `value` is an integer >= `minimum`.

  Args:
    name: what the message calls the value, e.g. "--total_rounds" for a flag
      or "num_outputs" for an argument.
    value: the value to check.
    minimum: the smallest value accepted.
    allow_none: also accept None (an optional setting left unset).
    reason: why the minimum, added to the message in parentheses.
    error: the exception type; FlairInputError for user input, ValueError for
      a programming error.

  Raises:
    `error`: "<name> must be an integer >= <minimum>[ or None] [(<reason>)],
      got <value!r>".
  """
  if allow_none and value is None:
    return
  if not is_int(value) or value < minimum:
    expected = f"an integer >= {minimum}" + (" or None" if allow_none else "")
    why = f" ({reason})" if reason else ""
    raise error(f"{name} must be {expected}{why}, got {value!r}")


def check_ints(name: str, values: Sequence[int], length: int,
               minimum: int = 1,
               error: type[Exception] = FlairInputError) -> None:
  """Raises `error` unless `values` is a tuple or list of `length` integers,
  each >= `minimum` (e.g. a crop size (height, width))."""
  if (not isinstance(values, (tuple, list)) or len(values) != length
      or not all(is_int(v) for v in values) or min(values) < minimum):
    raise error(f"{name} must be {length} integers >= {minimum}, got "
                f"{values!r}")


def check_positive_number(name: str, value,
                          error: type[Exception] = FlairInputError) -> None:
  """Raises `error` unless `value` is a finite int or float > 0 (not a
  bool): "<name> must be a positive number, got <value!r>"."""
  if (isinstance(value, bool) or not isinstance(value, (int, float))
      or not math.isfinite(value) or value <= 0):
    raise error(f"{name} must be a positive number, got {value!r}")
