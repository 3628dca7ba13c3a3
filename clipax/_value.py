"""``clip_by_value``: element-wise clipping, with the pre- and post-clip norms recorded.

On GPU and TPU every number the state records (the pre-clip global L2 norm, the largest
magnitude, the post-clip norm, with the overflow rescue of :mod:`clipax._norms`) comes out of one
variadic reduction per leaf: one kernel that reads each gradient once. Each leaf is reduced over
its trailing axes only (at least ``_MIN_ROW`` elements), so XLA never splits the reduction in two
kernels, and the per-row partial results of all leaves are combined by one final reduction.

* ``nonfinite="zero"`` / ``"propagate"``: the clipped update waits for that reduction (the step is
  zeroed or NaN when the norm is not finite), so each gradient is read twice: by the reduction and
  by the optimizer's element-wise pass. Small leaves are concatenated first (fewer kernels).
* ``nonfinite="elementwise"``: the update never waits for a norm, so the reduction of each leaf
  has no consumer in the step but the state, and XLA fuses it into the optimizer's element-wise
  pass over the same leaf (a multi-output reduction fusion): each gradient is read once.

On the CPU the norms are measured by :mod:`clipax._norms` as everywhere else (its float16
slicing and optimisation barriers keep XLA:CPU from writing a float32 copy of the gradients).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.typing import ArrayLike

from clipax import _checks
from clipax._checks import Nonfinite
from clipax._clipping import (
    Action,
    _apart_on_cpu,
    action,
    combine_norms,
    invalid_threshold,
    scale_for,
)
from clipax._elements import _magnitude, _result_dtype, float_leaves
from clipax._measure import as_tree, check_leaf_metrics, init_leaf_norms, measure
from clipax._norms import _leafwise, global_norm
from clipax._platform import _blocks
from clipax._rescue import _pick_sum, _scaled_powers
from clipax._state import clip_state, init_clip_state, named, record, stat_dtype

ValueNonfinite = Nonfinite | Literal["elementwise"]
_POLICIES = ("zero", "propagate", "elementwise")

# A leaf is reduced over its smallest run of trailing axes holding at least this many elements
# (or over all of them): one kernel per leaf, whose per-row results are small. A full reduction
# of a large leaf to a scalar is split by XLA (GPU) into two kernels.
_MIN_ROW = 256


def _clip(g: jax.Array, c: jax.Array) -> jax.Array:
  """``g`` clipped to ``[-c, c]`` in its dtype (complex: the magnitude, the phase kept)."""
  if jnp.issubdtype(g.dtype, jnp.complexfloating):
    mag = jnp.abs(g)
    over = mag > c
    return jnp.where(over, g * (c / jnp.where(over, mag, 1)).astype(g.dtype), g)
  c = c.astype(g.dtype)
  return jnp.clip(g, -c, c)


def _clip_value_leaf(g: jax.Array, c: jax.Array) -> jax.Array:
  if jnp.issubdtype(g.dtype, jnp.floating) and g.dtype.itemsize < 4:
    g = _apart_on_cpu(g, c)  # the clip's convert is not the norms' (see _apart_on_cpu)
  return _clip(g, c)


# ----------------------------------------------------------------------------- the fused pass

_ADD = (0, 1, 2, 4, 5, 6)  # operands summed; 3 (the magnitude) is maxed


def _reducer(xs, ys):
  return tuple(lax.max(x, y) if i == 3 else x + y
               for i, (x, y) in enumerate(zip(xs, ys, strict=True)))


def _trailing_axes(x: jax.Array) -> tuple[int, ...]:
  n = 1
  for k in range(x.ndim - 1, -1, -1):
    n *= x.shape[k]
    if n >= _MIN_ROW:
      return tuple(range(k, x.ndim))
  return tuple(range(x.ndim))


def _operands(b: jax.Array, c: jax.Array, dtype: jnp.dtype) -> list[jax.Array]:
  """The seven element-wise terms of one pass: ``|b|^2`` plain, scaled down and up (the rescue
  of :mod:`clipax._norms`), ``|b|``, and the same three squares of the clipped ``b``."""
  powers = _scaled_powers(dtype, 2)
  clipped = _clip(b, c)
  return ([f(b).astype(dtype) for f in powers] + [_magnitude(b).astype(dtype)]
          + [f(clipped).astype(dtype) for f in powers])


def _reduce(ops: list[jax.Array], axes: tuple[int, ...], dtype: jnp.dtype) -> list[jax.Array]:
  zero = jnp.zeros([], dtype)
  return list(lax.reduce(tuple(ops), (zero,) * 7, _reducer, axes))


def _finish(sums: list[jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(norm, peak, post-clip norm)`` from the seven reduced terms."""
  return _pick_sum(sums[0], sums[1], sums[2], 2), sums[3], _pick_sum(sums[4], sums[5], sums[6], 2)


def _fused(
    leaves: list[jax.Array], c: jax.Array, per_leaf: bool, concat: bool
) -> tuple[jax.Array, jax.Array, jax.Array, list[jax.Array]]:
  """``(norm, peak, post-clip norm, per-leaf norms)``: one reduction per leaf (per block of small
  leaves with ``concat``) and one over the per-row results (one per leaf with ``per_leaf``)."""
  dtype = _result_dtype(leaves)
  empty = jnp.zeros([], dtype)
  if per_leaf:
    norms, rows = [], []
    for x in leaves:
      if x.size == 0:
        norms.append(empty)
        continue
      part = _reduce(_operands(x, c, dtype), _trailing_axes(x), dtype)
      total = _reduce(part, tuple(range(part[0].ndim)), dtype)
      norms.append(_finish(total)[0])
      rows.append(total)
    if not rows:
      return empty, empty, empty, norms
    stacked = [jnp.stack([r[i] for r in rows]) for i in range(7)]
    return (*_finish(_reduce(stacked, (0,), dtype)), norms)
  blocks = _blocks(leaves) if concat else [x for x in leaves if x.size]
  if concat:
    # a concatenated block is written once (a small buffer) and reduced from there: left to
    # itself XLA:GPU fuses part of the concatenate into the reduction and re-reads the rest of the
    # leaves there, a third read of each
    blocks = [lax.optimization_barrier(b) if b.ndim == 1 and b.size > 1 else b for b in blocks]
  if not blocks:
    return empty, empty, empty, []
  parts = [_reduce(_operands(b, c, dtype), _trailing_axes(b), dtype) for b in blocks]
  flat = [jnp.concatenate([jnp.ravel(p[i]) for p in parts]) for i in range(7)]
  return (*_finish(_reduce(flat, (0,), dtype)), [])


def _plain(
    leaves: list[jax.Array], c: jax.Array, per_leaf: bool, cpu: bool, concat: bool = True
) -> tuple[jax.Array, jax.Array, jax.Array, list[jax.Array]]:
  """The same four results measured by :mod:`clipax._norms` (the CPU's pass, and the
  derivative of the fused one). ``cpu``: the clipped leaves are reduced behind an optimization
  barrier, so that they share no float32 convert with the clip (no float32 copy on the CPU).
  ``concat=False`` (the TPU's one-pass policy) with half-precision leaves: every statistic from
  per-leaf reductions, which the TPU fuses into the optimizer's kernel of each leaf, where the
  norms' concatenation of small bfloat16 leaves is read a second time (XLA:TPU does not fuse it:
  344 kernels against 202 for the benchmark tree). A float32 tree keeps the concatenation,
  which the TPU fuses and which needs a third of the temporary memory (32 MB against 94)."""
  if not concat and any(jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4
                        for x in leaves):
    return _per_leaf_plain(list(leaves), c, per_leaf)
  tree = list(leaves)
  norm, norms = measure(tree, leaf_metrics=per_leaf, dtype=_result_dtype(leaves))
  peak = global_norm(tree, ord=math.inf)
  clipped = [(_clip_value_leaf if cpu else _clip)(g, c) for g in leaves]
  if cpu and clipped:
    clipped = list(lax.optimization_barrier(clipped))
  after = global_norm(clipped)
  return norm, peak, after, list(norms) if per_leaf else []


def _per_leaf_plain(
    leaves: list[jax.Array], c: jax.Array, per_leaf: bool
) -> tuple[jax.Array, jax.Array, jax.Array, list[jax.Array]]:
  """:func:`_plain`'s results from one reduction per leaf and statistic (no concatenation)."""
  norms = _leafwise(leaves, 2, None)
  peaks = _leafwise(leaves, math.inf, None)
  after = _leafwise([_clip(g, c) for g in leaves], 2, None)
  zero = jnp.zeros([], _result_dtype(leaves))
  norm = combine_norms(norms, 2) if norms else zero
  peak = jnp.max(jnp.stack(peaks)) if peaks else zero
  return norm, peak, combine_norms(after, 2) if after else zero, norms if per_leaf else []


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _accelerated(
    xs: tuple[jax.Array, ...], c: jax.Array, per_leaf: bool, concat: bool
) -> tuple[jax.Array, jax.Array, jax.Array, list[jax.Array]]:
  """:func:`_fused`, differentiated as :func:`_plain` (the norms' own derivatives; a generic
  ``lax.reduce`` derivative would go through the rescue sums and overflow)."""
  return _fused(list(xs), c, per_leaf, concat)


@_accelerated.defjvp
def _accelerated_jvp(per_leaf, concat, primals, tangents):
  _, t = jax.jvp(lambda xs, c: _plain(list(xs), c, per_leaf, False), primals, tangents)
  return _accelerated(*primals, per_leaf, concat), t


def _stats(
    leaves: list[jax.Array], c: jax.Array, per_leaf: bool, concat: bool
) -> tuple[jax.Array, jax.Array, jax.Array, list[jax.Array]]:
  """``(norm, peak, post-clip norm, per-leaf norms)``: the fused pass on GPUs, :func:`_plain` on
  the CPU and the TPU (whose compiler fuses the norms' per-leaf reductions into one kernel per
  leaf by itself, and writes the fused pass's concatenated row results to memory: 418 kernels
  against 202 for the 100-leaf benchmark tree); never a conditional."""
  return lax.platform_dependent(
      tuple(leaves), c, cpu=lambda xs, c: _plain(list(xs), c, per_leaf, True),
      tpu=lambda xs, c: _plain(list(xs), c, per_leaf, False, concat),
      default=lambda xs, c: _accelerated(xs, c, per_leaf, concat))


# ----------------------------------------------------------------------------- the transformation


def clip_by_value(
    max_value: ArrayLike,
    *,
    nonfinite: ValueNonfinite = "zero",
    name: str | None = None,
    leaf_metrics: bool = False,
) -> optax.GradientTransformation:
  r"""Clips every element to ``[-max_value, max_value]``.

  .. math::
    g_i \leftarrow \operatorname{clip}(g_i, -c, c)

  Element-wise clipping bends the update's direction (large components shrink, small ones do
  not); prefer :func:`clip_by_global_norm` unless you want exactly that. Complex elements keep
  their phase and have their magnitude clipped.

  Non-finite gradients: with ``"zero"`` (default) the whole update is zero and with
  ``"propagate"`` every element is NaN when the global norm of the update is NaN or Inf, as in
  :func:`clip_by_global_norm`. With ``"elementwise"`` clipping never waits for a norm: each
  element is clipped on its own, ``+-inf`` becomes ``+-max_value`` and NaN stays NaN (as
  ``optax.clip`` does), so pair it with a guard (:func:`clipax.skip_nonfinite`) if a NaN must
  never reach the parameters. In every mode such a step is counted in ``nonfinite_count`` and not
  in ``clipped_count``; under ``"elementwise"`` its ``norm`` is the NaN or Inf measured,
  ``scale`` is NaN when an element is NaN (``0`` for an Inf) and ``update_norm`` is the norm of
  the update as returned (NaN when it holds a NaN).

  Cost on GPU/TPU: ``"zero"`` and ``"propagate"`` read each gradient twice (once to measure,
  once to act on the verdict); ``"elementwise"`` reads it once, its measurements fused into the
  optimizer's element-wise pass.

  Args:
    max_value: the bound ``c`` >= 0 (python number or array).
    nonfinite: ``"zero"`` (default), ``"propagate"`` or ``"elementwise"`` (see above): what a
      step whose global norm is NaN or Inf returns; ``"elementwise"`` clips it element by
      element (NaN passes through) in a single read of the gradients.
    name: the name of its keys in :func:`clipax.metrics`; default: its ``named_chain`` key,
      else ``value``.
    leaf_metrics: also keep every leaf's pre-clip L2 norm (``clip/{name}/leaf_norm/<path>``).

  Returns:
    An ``optax.GradientTransformation`` with a :class:`clipax.ClipState`; its ``norm`` is the
    pre-clip global L2 norm, ``scale`` is ``min(1, c / max|g|)``, the factor applied to the
    largest element, and ``update_norm`` the global L2 norm of the clipped update.

  Raises:
    ValueError: for a negative, non-finite or non-numeric ``max_value`` or unknown ``nonfinite``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import clipax
    >>> tx = clipax.clip_by_value(1.0)
    >>> out, state = jax.jit(tx.update)({"w": jnp.array([-3.0, 0.5])}, tx.init(None))
    >>> print(out["w"].tolist(), f"{state.scale:.3f}")
    [-1.0, 0.5] 0.333
    >>> tx = clipax.clip_by_value(1.0, nonfinite="elementwise")
    >>> out, state = jax.jit(tx.update)({"w": jnp.array([-jnp.inf, 0.5])}, tx.init(None))
    >>> print(out["w"].tolist(), int(state.nonfinite_count))
    [-1.0, 0.5] 1
  """
  _checks.threshold("max_value", max_value)
  _checks.choice("nonfinite", nonfinite, _POLICIES)
  check_leaf_metrics(leaf_metrics)
  elementwise = nonfinite == "elementwise"

  def init_fn(params):
    return init_clip_state(max_value, init_leaf_norms(params, leaf_metrics, stat_dtype()))

  def update_fn(updates, state, params=None):
    del params
    with jax.named_scope("clipax/clip_by_value"):
      leaves = float_leaves(updates, "clip_by_value")
      dtype = _result_dtype(leaves) if leaves else jnp.dtype(jnp.float32)
      c = jnp.maximum(jnp.asarray(max_value).astype(dtype), 0)
      norm, peak, post, per_leaf = _stats(leaves, c, leaf_metrics, concat=not elementwise)
      scale, over = scale_for(peak, max_value)
      invalid = invalid_threshold(max_value)
      if elementwise:
        bad = ~jnp.isfinite(norm)
        act = Action(bad, invalid, invalid, None)
        scale = jnp.where(jnp.isnan(peak), jnp.nan, scale)
      else:
        act = action(norm, nonfinite, invalid)
      treedef: Any = jax.tree_util.tree_structure(updates)
      out = treedef.unflatten([_act(act, _clip_value_leaf(g, c)) for g in leaves])
      base = record(state, norm, act.recorded(scale), act.clipped(over), act.bad, act.invalid)
      after = post
      if act.nan is not None:
        after = jnp.where(act.nan, jnp.nan, after)
      if act.zero is not None:
        after = jnp.where(act.zero, 0, after)
      leaf_norms = as_tree(updates, per_leaf, state.norm.dtype) if leaf_metrics else ()
      return out, clip_state(base, max_value, after, leaf_norms)

  return named(optax.GradientTransformation(init_fn, update_fn), "value", name)


def _act(act: Action, g: jax.Array) -> jax.Array:
  """``g`` with the step's verdict applied: zeros where ``act.zero``, NaN where ``act.nan``."""
  if act.nan is not None:
    g = jnp.where(act.nan, jnp.full([], jnp.nan, g.dtype), g)
  if act.zero is not None:
    g = jnp.where(act.zero, jnp.zeros([], g.dtype), g)
  return g
