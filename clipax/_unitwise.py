"""Unit-wise norms (one norm per output unit of each leaf), the measure behind AGC.

Which axes a leaf's units reduce over (:func:`unit_axes`: optax's and NFNets' rule by default),
and the per-unit L2 norm with the same float32 accumulation and overflow rescue as every other
norm in :mod:`clipax._norms`, whose private pieces it reuses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from clipax import _checks, _platform
from clipax._elements import (
    ReductionAxes,
    UnitRule,
    _accum_dtype,
    _magnitude,
    _power,
    _root,
    float_leaves,
)
from clipax._grouping import gpu_unit_reduce
from clipax._platform import _CPU_CHUNK, _CPU_CHUNKED, _cpu_sum
from clipax._rescue import _needs_rescue, _pick_sum, _rescue_factor, _scaled_powers


def unit_axes(x: jax.Array, units: UnitRule = "nfnets", path: str = "<root>") -> tuple[int, ...]:
  """The axes one leaf is reduced over to get its per-unit norms.

  ``"nfnets"`` (optax's and the NFNets code's rule): a leaf that squeezes to a scalar or a vector
  is one unit; rank 2 and 3 reduce axis 0 (``(in, out)`` and ``(in, heads, head_dim)`` kernels);
  rank 4 axes 0-2 (``HWIO`` convolutions); rank 5 axes 0-3. ``"last_axis"``: every axis but the
  last (a unit per output feature), rank <= 1 one unit.

  Raises:
    ValueError: under ``"nfnets"`` for a leaf of rank > 5 (pass ``axes`` or ``units="last_axis"``).
  """
  if units == "last_axis":
    return tuple(range(x.ndim)) if x.ndim <= 1 else tuple(range(x.ndim - 1))
  if sum(d != 1 for d in x.shape) <= 1:
    return tuple(range(x.ndim))
  by_rank = {2: (0,), 3: (0,), 4: (0, 1, 2), 5: (0, 1, 2, 3)}
  if x.ndim not in by_rank:
    raise ValueError(
        f"unitwise_norms: leaf {path} has shape {x.shape}; the 'nfnets' unit rule covers ranks "
        "0-5: pass `axes` (a function from a leaf to its reduction axes) or units='last_axis'"
    )
  return by_rank[x.ndim]


def _checked_axes(axes: Any, x: jax.Array, path: str) -> tuple[int, ...]:
  """``axes`` as a tuple of distinct non-negative ints in range for ``x``, or a ValueError."""
  seq = (axes,) if isinstance(axes, (int, np.integer)) else axes
  try:
    seq = tuple(seq)
  except TypeError:
    seq = (None,)
  if not all(isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in seq):
    raise TypeError(f"`axes` must give a sequence of ints for leaf {path}, got {axes!r}")
  out = tuple(int(a) for a in seq)
  for a in out:
    if not -max(x.ndim, 1) <= a < max(x.ndim, 1) or (x.ndim == 0 and a not in (0, -1)):
      raise ValueError(f"`axes` gave axis {a} for leaf {path} of shape {x.shape}: out of range")
  canonical = tuple(a % x.ndim for a in out) if x.ndim else ()
  if len(set(canonical)) != len(canonical):
    raise ValueError(f"`axes` gave repeated axes {out} for leaf {path} of shape {x.shape}")
  return canonical


def _cpu_unit_sum(
    x: jax.Array, fn: Callable, factor: jax.Array | None, axes: tuple[int, ...]
) -> jax.Array:
  """``sum(fn(x, factor), axes, keepdims=True)``, for the CPU path: a large float16 ``x`` reduced
  over leading axes (every unit rule reduces a prefix ``0..k-1``) is viewed as a ``(rows, units)``
  matrix and summed in slices of rows, for the reason given in :func:`_cpu_sum`; ``fn`` is
  elementwise, ``factor`` broadcasts like the result."""
  if x.dtype == jnp.float16 and axes == tuple(range(x.ndim)):  # one unit: the whole leaf
    f = None if factor is None else factor.reshape(())
    return _cpu_sum(x, lambda y: fn(y, f)).reshape((1,) * x.ndim)
  k_axes = len(axes)
  prefix = x.ndim >= 2 and 1 <= k_axes < x.ndim and axes == tuple(range(k_axes))
  c = math.prod(x.shape[k_axes:]) if prefix else 1
  rows = max(1, _CPU_CHUNK // c)
  if (x.dtype != jnp.float16 or x.size <= _CPU_CHUNKED or not prefix
      or x.size // c < 2 * rows):
    return jnp.sum(fn(x, factor), axis=axes, keepdims=True)
  flat = x.reshape(-1, c)
  f = None if factor is None else factor.reshape(1, c)
  k = flat.shape[0] // rows
  parts = lax.map(
      lambda i: jnp.sum(fn(lax.dynamic_slice(flat, (i * rows, 0), (rows, c)), f), axis=0),
      jnp.arange(k))
  total = jnp.sum(parts, axis=0)
  if flat.shape[0] > k * rows:
    total = total + jnp.sum(fn(flat[k * rows :], f), axis=0)
  return total.reshape((1,) * k_axes + x.shape[k_axes:])


def _unitwise(x: jax.Array, axes: tuple[int, ...], cpu: bool) -> jax.Array:
  """Per-unit L2 norms of one leaf, with the overflow rescue of :func:`clipax._rescue._exact_root`:
  a ``lax.cond`` on the CPU (``cpu``), the three sums and a select on the TPU."""

  def unit_sum(y):
    return jnp.sum(y, axis=axes, keepdims=True)

  def with_cond():
    s = _cpu_unit_sum(x, lambda y, f: _power(y, 2), None, axes)

    def rescued(_):
      factor, inverse = _rescue_factor(s)
      t = _cpu_unit_sum(x, lambda y, f: _power(_magnitude(y) * f, 2), factor, axes)
      return _root(t, 2) * inverse

    return lax.cond(jnp.any(_needs_rescue(s)), rescued, lambda _: _root(s, 2), None)

  def branch_free():
    sums = [unit_sum(f(x)) for f in _scaled_powers(_accum_dtype(x.dtype), 2)]
    return _pick_sum(*sums, 2)

  return with_cond() if cpu else branch_free()


def _tree_unitwise(leaves: list[jax.Array], axes: list[tuple[int, ...]]) -> list[jax.Array]:
  """Per-unit norms of every leaf, in the program of the platform compiled for: per leaf on the
  CPU and the TPU; on a GPU one :func:`_scaled_ssq` per stack of same-shape leaves
  (:func:`clipax._grouping.gpu_unit_reduce`), a few kernels for the whole tree."""
  def per_leaf(cpu):
    return [_unitwise(x, a, cpu) for x, a in zip(leaves, axes, strict=True)]

  def gpu():
    return gpu_unit_reduce(leaves, axes, _scaled_ssq, _platform._maybe_sharded)

  return _platform._by_platform(lambda: per_leaf(True), lambda: per_leaf(False), gpu)


def _scaled_ssq(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """Per-unit L2 norms as ``scale * sqrt(ssq)`` (LAPACK's ``lassq``): one variadic reduction of
  ``(scale, ssq)`` pairs, ``scale`` the largest magnitude seen and ``ssq`` the sum of squares of
  the magnitudes divided by it, so no partial sum can overflow or underflow and no rescue sum is
  needed; exact for every finite input whose norm is finite. The GPU path: XLA's column
  reductions (a unit reduces leading axes) allow at most two outputs per kernel within its
  shared-memory budget, so the three sums of the branch-free rescue cost three kernels per leaf
  (and a float32 copy of each gradient); this is one kernel reading the leaf once. Half-precision
  magnitudes are reduced as their bit patterns (the maximum of non-negative floats is the maximum
  of their bits, NaN above inf), so XLA fuses the reduction with the leaf instead of writing a
  float32 copy of it (a variadic reduction cannot mix float widths).
  """
  acc = _accum_dtype(x.dtype)
  mag = _magnitude(x) if x.dtype.itemsize >= 4 or not jnp.issubdtype(x.dtype, jnp.floating) \
      else jnp.abs(x)
  if mag.dtype.itemsize < 4:
    bits = jnp.dtype(f"uint{8 * mag.dtype.itemsize}")
    half = mag.dtype

    def value(b):
      return lax.bitcast_convert_type(b, half).astype(acc)

    mag = lax.bitcast_convert_type(mag, bits)
  else:
    def value(b):
      return b

  def combine(a, b):
    (s_a, q_a), (s_b, q_b) = a, b
    big, small = jnp.maximum(s_a, s_b), jnp.minimum(s_a, s_b)
    # big == small also covers 0 and inf on both sides (a ratio of 1 instead of 0/0, inf/inf).
    r = jnp.where(big == small, jnp.ones([], acc), value(small) / value(big))
    a_big = s_a >= s_b
    return big, jnp.where(a_big, q_a, q_b) + jnp.where(a_big, q_b, q_a) * (r * r)

  # Every element enters as (|x|, 1); a zero scale makes the norm 0 whatever its ssq.
  scale, ssq = lax.reduce(
      (mag, jnp.ones(x.shape, acc)), (jnp.zeros([], mag.dtype), jnp.zeros([], acc)), combine,
      axes)
  shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
  return (value(scale) * jnp.sqrt(ssq)).reshape(shape)


def unitwise_norms(tree: Any, *, axes: ReductionAxes = None, units: UnitRule = "nfnets") -> Any:
  """L2 norms per unit (output neuron), kept broadcastable against each leaf.

  By default (``units="nfnets"``, the rule of optax's ``unitwise_norm`` and of the NFNets code) a
  leaf that squeezes to a scalar or a vector is one unit; a Flax ``Dense`` kernel ``(in, out)``
  and a multi-head kernel ``(in, heads, head_dim)`` reduce axis 0; a convolution kernel
  ``(h, w, in, out)`` reduces ``(h, w, in)``; rank 5 reduces its first four axes.
  ``units="last_axis"`` (clipax 0.1's rule) reduces every axis but the last. See
  :func:`unit_axes`.

  Args:
    tree: a pytree of floating arrays.
    axes: ``None`` for the ``units`` rule, or a function from a leaf to the axes to reduce over
      (ints in ``[-ndim, ndim)``, no repeats).
    units: ``"nfnets"`` (default) or ``"last_axis"``.

  Returns:
    A pytree of the same structure whose leaves have the leaf's rank (``keepdims``), float32.

  Raises:
    ValueError: for an unknown ``units``, axes out of range or repeated (naming the leaf path),
      a leaf of rank > 5 under ``"nfnets"``, or an integer leaf.

  Examples:
    >>> import jax.numpy as jnp
    >>> import clipax
    >>> w = jnp.array([[3.0, 0.0], [4.0, 1.0]])
    >>> print(clipax.unitwise_norms({"w": w})["w"].tolist())
    [[5.0, 1.0]]
  """
  _checks.choice("units", units, get_args(UnitRule))
  if axes is not None and not callable(axes):
    raise TypeError(f"`axes` must be None or a function from a leaf to its axes, got {axes!r}")
  flat, treedef_ = jax.tree_util.tree_flatten_with_path(tree)
  treedef: Any = treedef_
  leaves = float_leaves(tree, "unitwise_norms")
  reduce = []
  for (p, _), x in zip(flat, leaves, strict=True):
    path = jax.tree_util.keystr(p) or "<root>"
    chosen = unit_axes(x, units, path) if axes is None else axes(x)
    reduce.append(_checked_axes(chosen, x, path))
  with jax.named_scope("clipax/unitwise_norms"):
    return treedef.unflatten(_tree_unitwise(leaves, reduce))
