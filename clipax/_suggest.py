"""Proposing a clipping threshold from logged pre-clip gradient norms (:func:`suggest_max_norm`).

The companion of :mod:`clipax._health`: :func:`clipax.diagnose` says whether the threshold in use
fits the norms, this proposes one that does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from clipax import _checks
from clipax._history import _floats


def _index(shape: tuple[int, ...], flat: int) -> str:
  return str(flat) if len(shape) <= 1 else str(tuple(int(i) for i in np.unravel_index(flat, shape)))


def _as_norms(norms: Any) -> np.ndarray:
  """``norms`` as a float64 array, or a TypeError naming the first element that is no number."""
  if norms is None or isinstance(norms, (str, bytes, Mapping)):
    raise TypeError(f"`norms` must be a sequence or array of numbers, got {type(norms).__name__}")
  try:
    x = np.asarray(norms)
    if x.dtype.kind in "US" and isinstance(norms, (list, tuple)):
      x = np.asarray(norms, dtype=object)  # numpy made every number a string: find the bad one
  except (TypeError, ValueError) as e:
    raise TypeError(f"`norms` must be a sequence or array of numbers: {e}") from e
  out = _floats(x)
  if out is not None and x.dtype.kind != "b":
    return out
  values = []
  for i, v in enumerate(x.reshape(-1)):
    a = _floats(v) if x.dtype.kind == "O" and not isinstance(v, (bool, np.bool_)) else None
    if a is None or a.size != 1:
      raise TypeError(f"`norms[{_index(x.shape, i)}]` must be a number, got {v!r} of type "
                      f"{type(v).__name__}")
    values.append(a.reshape(()))
  return np.asarray(values, np.float64).reshape(x.shape)


def suggest_max_norm(
    norms: Any,
    *,
    percentile: float = 95.0,
    margin: float = 1.2,
    window: int | None = 1000,
    ignore_nonfinite: bool = False,
) -> float:
  """A clipping threshold just above the typical range of the pre-clip gradient norms.

  The rule: ``margin * percentile(norms[-window:], percentile)`` (numpy's default linear
  interpolation). With the defaults, the 95th percentile of the last 1,000 norms times 1.2:
  ordinary steps pass untouched and only the outliers are clipped. Log the norms with
  ``clipax.metrics(state)["clip/global_norm/norm"]`` (or :func:`clipax.global_norm` of the
  gradients) during a run without clipping, or with a loose threshold. A non-finite step logs a
  NaN or Inf norm: pass ``ignore_nonfinite=True`` to leave those out (after windowing).

  Args:
    norms: a non-empty sequence or array of pre-clip gradient norms (numbers >= 0), oldest first.
    percentile: in (0, 100].
    margin: a factor >= 1 above that percentile.
    window: use only the most recent ``window`` norms (``None``: all of them; else an integer in
      [1, 2**31 - 1]).
    ignore_nonfinite: leave NaN and ``+inf`` norms out instead of raising.

  Returns:
    The suggested ``max_norm`` as a python float.

  Raises:
    TypeError: if ``norms`` is not a sequence or array of numbers (naming the first element that
      is not), or for a non-number argument.
    ValueError: if ``norms`` is empty, has a negative norm, has a NaN or Inf norm (unless
      ``ignore_nonfinite``; naming its index and value), has no finite norm in the window, or for
      invalid ``percentile``, ``margin``, ``window``.

  Examples:
    >>> import numpy as np
    >>> import clipax
    >>> norms = np.linspace(1.0, 2.0, 101)  # typical norms between 1 and 2
    >>> print(f"{clipax.suggest_max_norm(norms):.3f}")
    2.340
    >>> print(f"{clipax.suggest_max_norm([1.0, float('nan'), 2.0], ignore_nonfinite=True):.2f}")
    2.34
  """
  _checks.number("percentile", percentile, low=0.0, low_open=True, high=100.0, high_open=False,
                 allow_array=False)
  _checks.number("margin", margin, low=1.0, allow_array=False)
  if window is not None:
    _checks.number("window", window, low=1, integer=True, allow_array=False)
  if not isinstance(ignore_nonfinite, (bool, np.bool_)):
    raise TypeError(f"`ignore_nonfinite` must be a bool, got {ignore_nonfinite!r}")
  x = _as_norms(norms)
  if x.size == 0:
    raise ValueError("`norms` is empty: pass at least one pre-clip gradient norm")
  flat = x.reshape(-1)
  negative = np.flatnonzero(flat < 0)
  if negative.size:
    i = int(negative[0])
    raise ValueError(f"`norms[{_index(x.shape, i)}]` must be >= 0 (a norm), got {flat[i]}")
  nonfinite = np.flatnonzero(~np.isfinite(flat))
  if nonfinite.size and not ignore_nonfinite:
    i = int(nonfinite[0])
    raise ValueError(f"`norms[{_index(x.shape, i)}]` is {flat[i]}: non-finite norms (steps that "
                     "were zeroed or skipped) say nothing of the threshold; drop them or pass "
                     "ignore_nonfinite=True")
  if window is not None:
    flat = flat[-int(window):]
  flat = flat[np.isfinite(flat)]
  if flat.size == 0:
    raise ValueError("`norms` has no finite value to suggest a threshold from")
  return float(margin * np.percentile(flat, percentile))
