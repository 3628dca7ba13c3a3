"""Validation of hyperparameters: at construction, at ``init`` and inside the compiled step.

Three moments, one set of ranges:

* a python number is checked when the transformation is built, so a bad value fails with a
  message naming the argument;
* a *concrete* array (what ``optax.inject_hyperparams`` makes of a python number when it calls
  the factory in ``init``) is checked the same way, so ``inject_hyperparams(zclip)(
  warmup_steps=0)`` fails as loudly as ``zclip(warmup_steps=0)``;
* a *traced* value (a schedule, an injected hyperparameter inside ``jit``) cannot raise. Its
  range check is compiled into the step by :func:`invalid`, and a transformation that sees an
  invalid value applies the shared rule: zero update, statistics unchanged, the event counted
  in ``invalid_count``. It is never a silent disable.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np

Nonfinite = Literal["zero", "propagate"]

INT_MAX = 2**31 - 1
"""The largest step count or size accepted: counters and steps are int32."""


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
      value, (bool, np.bool_)
  )


def _is_array(value: Any) -> bool:
  return hasattr(value, "shape") and hasattr(value, "dtype") and not _is_number(value)


def is_traced(value: Any) -> bool:
  return isinstance(value, jax.core.Tracer)


def _concrete_item(value: Any) -> Any:
  """The python scalar held by a concrete one-element array; ``None`` for anything else."""
  if is_traced(value) or not _is_array(value) or np.size(value) != 1:
    return None
  dtype = np.dtype(value.dtype)
  if dtype.kind not in "iuf":
    return None
  try:
    return np.asarray(value).item()
  except (TypeError, ValueError, jax.errors.JAXTypeError):
    return None


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
    allow_inf: bool = False,
) -> None:
  """Checks that ``value`` is a finite number in the given interval, or a traced array.

  A concrete one-element array is checked like the number it holds. Integers are limited to
  ``[low, 2**31 - 1]``. ``allow_inf`` lets ``+inf`` through (a threshold that means "off").

  Raises:
    ValueError: naming ``name``, the value received and what is allowed.
  """
  if integer:
    high, high_open = min(high, INT_MAX), False
  if allow_array and _is_array(value):
    scalar_array(name, value)
    item = _concrete_item(value)
    if item is None:
      return
    if integer and isinstance(item, float):
      if not item.is_integer():
        raise ValueError(f"`{name}` must be an integer, got {value!r}")
      item = int(item)
    value = item
  lo = "(" if low_open else "["
  hi = ")" if high_open else "]"
  kind = "an integer" if integer else ("a number" if allow_inf else "a finite number")
  top = "inf" if allow_inf and math.isinf(high) else high
  allowed = f"{kind} in {lo}{low}, {top}{']' if allow_inf else hi}"
  if not _is_number(value) or (integer and not isinstance(value, (int, np.integer))):
    raise TypeError(f"`{name}` must be {allowed}, got {value!r} of type {type(value).__name__}")
  v = float(value)
  if allow_inf and v == math.inf:
    return
  bad = (
      not math.isfinite(v)
      or (v <= low if low_open else v < low)
      or (v >= high if high_open else v > high)
  )
  if bad:
    raise ValueError(f"`{name}` must be {allowed}, got {value!r}")


def scalar_array(name: str, value: Any) -> None:
  """An array hyperparameter must be a real scalar: any other shape would broadcast against the
  gradients (or change the state's shapes) instead of being one number."""
  shape = tuple(getattr(value, "shape", ()))
  if shape != ():
    raise ValueError(f"`{name}` must be a scalar (shape ()), got an array of shape {shape}")
  kind = np.dtype(value.dtype).kind
  if kind not in "iuf" and not (kind == "V" and jnp.issubdtype(value.dtype, jnp.floating)):
    shown = value.item() if not is_traced(value) else "a traced value"
    raise TypeError(f"`{name}` must be a real number, got {shown!r} (an array of dtype "
                    f"{value.dtype})")


def axis_name(value: Any) -> None:
  """``None``, one axis name (any hashable, usually a str) or a tuple/list of them."""
  names = value if isinstance(value, (tuple, list)) else [value]
  for n in names:
    try:
      hash(n)
    except TypeError:
      raise TypeError(
          f"`axis_name` must be None, an axis name (a str) or a tuple of them, got {value!r}"
      ) from None
    if isinstance(n, (tuple, list)):
      raise TypeError(
          f"`axis_name` must be None, an axis name (a str) or a tuple of them, got {value!r}")


def threshold(name: str, value: Any) -> None:
  """A clipping threshold: a number >= 0 (0 clips everything to zero, ``inf`` clips nothing)."""
  number(name, value, low=0.0, allow_inf=True)


def invalid(
    value: Any,
    *,
    low: float = 0.0,
    low_open: bool = False,
    high: float = math.inf,
    high_open: bool = True,
    allow_inf: bool = False,
) -> jax.Array | None:
  """In the compiled step: whether an array hyperparameter is NaN or outside its range.

  Returns ``None`` for a python number (already checked when the transformation was built), so
  a transformation built from numbers compiles no check at all.
  """
  if not _is_array(value):
    return None
  x = jnp.asarray(value)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  ok = jnp.isfinite(x) | (allow_inf & (x == jnp.inf))
  ok &= (x > low) if low_open else (x >= low)
  if high != math.inf:
    ok &= (x < high) if high_open else (x <= high)
  return ~jnp.all(ok)


def any_of(*flags: jax.Array | None) -> jax.Array | None:
  """The OR of the flags that are not ``None``; ``None`` if all are."""
  present = [f for f in flags if f is not None]
  if not present:
    return None
  out = present[0]
  for f in present[1:]:
    out = out | f
  return out


def choice(name: str, value: Any, allowed: tuple) -> None:
  if value not in allowed or isinstance(value, bool) and not any(a is value for a in allowed):
    raise ValueError(f"`{name}` must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def nonfinite(value: Any) -> None:
  choice("nonfinite", value, get_args(Nonfinite))


def transformation(name: str, value: Any) -> None:
  """An optax transformation to wrap (anything with callable ``init`` and ``update``)."""
  if not (callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))):
    raise TypeError(
        f"`{name}` must be an optax GradientTransformation (with init and update), got "
        f"{value!r} of type {type(value).__name__}"
    )
