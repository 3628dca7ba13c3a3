"""What one element contributes to a norm: the ``ord`` dispatch, the accumulation dtype and the
checked list of leaves, shared by every norm in clipax.

* ``ord`` is 1, 2 or ``math.inf``; a traced ``ord`` (``optax.inject_hyperparams``) is dispatched at
  run time (:func:`by_ord`) and an invalid one gives NaN, which the clippers count;
* ``|x|`` and ``|x|^2`` are taken in float32 whatever the leaf dtype (float64 when x64 is on and a
  leaf is float64), so float16/bfloat16 gradients never overflow a norm;
* integer, boolean and non-array leaves raise an error naming their path (:func:`float_leaves`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

AxisName = str | tuple[str, ...] | None
ReductionAxes = Callable[[jax.Array], Sequence[int]] | None
UnitRule = Literal["nfnets", "last_axis"]
# None (no leaf), a bool, a pytree prefix of bools, or a predicate on the leaf's key path.
Replicated = Any
# None, "varying", or a pytree prefix of PartitionSpec (see clipax._sharding.layout).
Specs = Any

_ORDS = (1, 2, math.inf)


def canonical_ord(ord: Any) -> Any:
  """Returns ``ord`` as 1, 2 or ``math.inf``; raises ``ValueError`` for anything else.

  A traced ``ord`` (``optax.inject_hyperparams`` injects every numeric argument) is returned as
  it is and dispatched at run time by :func:`by_ord`.
  """
  if isinstance(ord, jax.core.Tracer):
    return ord
  if hasattr(ord, "shape") and hasattr(ord, "dtype") and getattr(ord, "ndim", 1) == 0:
    ord = ord.item()
  if isinstance(ord, str) and ord.lower() == "inf":
    return math.inf
  if isinstance(ord, (int, float)) and not isinstance(ord, bool) and ord in _ORDS:
    return math.inf if ord == math.inf else int(ord)
  raise ValueError(f"`ord` must be one of 1, 2 or math.inf, got {ord!r}")


def by_ord(ord: Any, fn: Callable[[float], Any]) -> Any:
  """``fn(ord)`` for a python ``ord``; for a traced one, the matching branch via ``lax.switch``.

  A traced ``ord`` that is not 1, 2 or inf selects the ``inf`` branch and gives NaN, so the
  clippers count it as non-finite instead of silently using another norm.
  """
  if not isinstance(ord, jax.core.Tracer):
    return fn(ord)
  index = jnp.where(ord == 1, 0, jnp.where(ord == 2, 1, 2))
  valid = (ord == 1) | (ord == 2) | jnp.isposinf(ord)

  def poisoned(result):
    def poison(x):
      if not jnp.issubdtype(x.dtype, jnp.inexact):
        return x
      return jnp.where(valid, x, jnp.asarray(jnp.nan, x.dtype))

    return jax.tree_util.tree_map(poison, result)

  return poisoned(lax.switch(index, [lambda: fn(1), lambda: fn(2), lambda: fn(math.inf)]))


def _accum_dtype(dtype: jnp.dtype) -> jnp.dtype:
  if dtype in (jnp.float64, jnp.complex128):
    return jnp.dtype(jnp.float64)
  return jnp.dtype(jnp.float32)


def float_leaves(tree: Any, what: str = "global_norm") -> list[jax.Array]:
  """The leaves of ``tree`` as arrays; integer and boolean leaves raise ``ValueError``."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  leaves = []
  for path, leaf in flat:
    where = jax.tree_util.keystr(path) or "<root>"
    if isinstance(leaf, (str, bytes)) or (
        hasattr(leaf, "dtype") and np.dtype(leaf.dtype).kind in "OSUV"
        and not jnp.issubdtype(leaf.dtype, jnp.floating)):
      raise TypeError(f"{what}: leaf {where} is {leaf!r:.60}, not a numeric array")
    try:
      x = jnp.asarray(leaf)
    except (TypeError, ValueError):
      raise TypeError(
          f"{what}: leaf {where} is {leaf!r:.60} of type {type(leaf).__name__}, not an array"
      ) from None
    if not jnp.issubdtype(x.dtype, jnp.inexact):
      raise ValueError(
          f"{what}: leaf {jax.tree_util.keystr(path) or '<root>'} has dtype {x.dtype}; "
          "gradient norms are defined for floating or complex leaves only"
      )
    leaves.append(x)
  return leaves


def _magnitude(x: jax.Array) -> jax.Array:
  """|x| in the accumulation dtype."""
  acc = _accum_dtype(x.dtype)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    return jnp.abs(x).astype(acc)
  return jnp.abs(x.astype(acc))


def _power(x: jax.Array, ord: float) -> jax.Array:
  """|x|^ord in the accumulation dtype (ord 1 or 2)."""
  if ord == 1:
    return _magnitude(x)
  acc = _accum_dtype(x.dtype)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    re, im = jnp.real(x).astype(acc), jnp.imag(x).astype(acc)
    return re * re + im * im
  y = x.astype(acc)
  return y * y


def _root(s: jax.Array, ord: float) -> jax.Array:
  """s^(1/ord) with a finite gradient at s == 0."""
  if ord == 1:
    return s
  positive = s > 0
  # s == 0 gives 0 with a finite gradient; NaN stays NaN (never reported as a zero norm).
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, s, 1)), s)


def _result_dtype(leaves: list[jax.Array]) -> jnp.dtype:
  wide = any(_accum_dtype(x.dtype) == jnp.float64 for x in leaves)
  return jnp.dtype(jnp.float64 if wide else jnp.float32)
