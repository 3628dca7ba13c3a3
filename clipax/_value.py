"""``clip_by_value``: element-wise clipping, with the pre- and post-clip norms recorded."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.typing import ArrayLike

from clipax import _checks
from clipax._checks import Nonfinite
from clipax._clipping import _apart_on_cpu, action, invalid_threshold, scale_for
from clipax._measure import check_leaf_metrics, init_leaf_norms, measure
from clipax._norms import float_leaves, global_norm
from clipax._state import clip_state, init_clip_state, named, record, stat_dtype


def _clip_value_leaf(g: jax.Array, c: jax.Array) -> jax.Array:
  if jnp.issubdtype(g.dtype, jnp.floating) and g.dtype.itemsize < 4:
    g = _apart_on_cpu(g, c)  # the clip's convert is not the norms' (see _apart_on_cpu)
  if jnp.issubdtype(g.dtype, jnp.complexfloating):
    mag = jnp.abs(g)
    over = mag > c
    return jnp.where(over, g * (c / jnp.where(over, mag, 1)).astype(g.dtype), g)
  c = c.astype(g.dtype)
  return jnp.clip(g, -c, c)


def clip_by_value(
    max_value: ArrayLike,
    *,
    nonfinite: Nonfinite = "zero",
    name: str | None = None,
    leaf_metrics: bool = False,
) -> optax.GradientTransformation:
  r"""Clips every element to ``[-max_value, max_value]``.

  .. math::
    g_i \leftarrow \operatorname{clip}(g_i, -c, c)

  Element-wise clipping bends the update's direction (large components shrink, small ones do
  not); prefer :func:`clip_by_global_norm` unless you want exactly that. Complex elements keep
  their phase and have their magnitude clipped.

  Args:
    max_value: the bound ``c`` >= 0 (python number or array).
    nonfinite: ``"zero"`` (default) or ``"propagate"``, applied when the global norm of the
      update is NaN or Inf, as in :func:`clip_by_global_norm`.
    name: the name of its keys in :func:`clipax.metrics`; default: its ``named_chain`` key,
      else ``value``.
    leaf_metrics: also keep every leaf's pre-clip L2 norm (``clip/{name}/leaf_norm/<path>``).

  Returns:
    An ``optax.GradientTransformation`` with a :class:`clipax.ClipState`; its ``norm`` is the
    pre-clip global L2 norm and ``scale`` is ``min(1, c / max|g|)``, the factor applied to the
    largest element.

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
  """
  _checks.threshold("max_value", max_value)
  _checks.nonfinite(nonfinite)
  check_leaf_metrics(leaf_metrics)

  def init_fn(params):
    return init_clip_state(max_value, init_leaf_norms(params, leaf_metrics, stat_dtype()))

  def update_fn(updates, state, params=None):
    del params
    with jax.named_scope("clipax/clip_by_value"):
      norm, leaves = measure(updates, leaf_metrics=leaf_metrics, dtype=state.norm.dtype)
      peak = global_norm(updates, ord=math.inf)
      scale, over = scale_for(peak, max_value)
      c = jnp.maximum(jnp.asarray(max_value).astype(peak.dtype), 0)
      act = action(norm, nonfinite, invalid_threshold(max_value))
      treedef: Any = jax.tree_util.tree_structure(updates)
      one = jnp.ones([], jnp.float32)
      out = treedef.unflatten([
          act.apply(_clip_value_leaf(g, c), one) for g in float_leaves(updates, "clip_by_value")
      ])
      base = record(state, norm, act.recorded(scale), act.clipped(over), act.bad, act.invalid)
      # post-clip norm from the clipped magnitudes, in the gradients' dtype (no float32 copy)
      # the post-clip norm of the output as returned (behind a barrier, so the reduction reads
      # the finished output and shares no convert with the clip: no float32 copy on the CPU)
      done = lax.optimization_barrier(float_leaves(out, "clip_by_value"))
      after = jnp.where(base.scale == 0, 0, global_norm(done)) if done else norm
      return out, clip_state(base, max_value, after, leaves)

  return named(optax.GradientTransformation(init_fn, update_fn), "value", name)
