"""Construction-time validation of hyperparameters.

Python numbers are checked when a transformation is built, so a bad value fails with a message
naming the argument instead of a wrong result inside a jitted step. Arrays and tracers pass
unchecked: they may come from ``optax.inject_hyperparams`` or a schedule.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import numpy as np

Nonfinite = Literal["zero", "propagate"]


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
      value, (bool, np.bool_)
  )


def _is_array(value: Any) -> bool:
  return hasattr(value, "shape") and hasattr(value, "dtype") and not _is_number(value)


def number(
    name: str,
    value: Any,
    *,
    low: float = 0.0,
    low_open: bool = False,
    high: float = math.inf,
    high_open: bool = True,
    integer: bool = False,
    allow_array: bool = True,
) -> None:
  """Checks that ``value`` is a finite number in the given interval, or an array.

  Raises:
    ValueError: naming ``name``, the value received and what is allowed.
  """
  if allow_array and _is_array(value):
    return
  lo = "(" if low_open else "["
  hi = ")" if high_open else "]"
  kind = "an integer" if integer else "a finite number"
  allowed = f"{kind} in {lo}{low}, {high}{hi}"
  if not _is_number(value) or (integer and not isinstance(value, (int, np.integer))):
    raise ValueError(f"`{name}` must be {allowed}, got {value!r} of type {type(value).__name__}")
  v = float(value)
  bad = (
      not math.isfinite(v)
      or (v <= low if low_open else v < low)
      or (v >= high if high_open else v > high)
  )
  if bad:
    raise ValueError(f"`{name}` must be {allowed}, got {value!r}")


def threshold(name: str, value: Any) -> None:
  """A clipping threshold: a finite number >= 0 (0 clips everything to zero), or an array."""
  number(name, value, low=0.0)


def choice(name: str, value: Any, allowed: tuple) -> None:
  if value not in allowed or isinstance(value, bool) and not any(a is value for a in allowed):
    raise ValueError(f"`{name}` must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def nonfinite(value: Any) -> None:
  choice("nonfinite", value, get_args(Nonfinite))
