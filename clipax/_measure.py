"""The *measure* piece of a transformation, with the optional per-leaf norms for the metrics.

A transformation built with ``leaf_metrics=True`` keeps the pre-clip norm of every leaf in its
state (``leaf_norms``, a pytree shaped like the updates with one scalar per leaf) and
:func:`clipax.metrics` reports them by key path. The per-leaf norms are the global norm's own
partial results: each leaf is reduced once, alone, and the global norm is combined from those
leaf norms (exactly, with the overflow rescue of :mod:`clipax._norms`), so no gradient is read a
second time. Without ``leaf_metrics`` the state holds an empty tuple in their place (no array,
so orbax has nothing of size zero to refuse).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from clipax._elements import AxisName, Replicated, Specs, by_ord, float_leaves
from clipax._norms import _global, _leafwise, global_norm
from clipax._sharding import layout

NO_LEAF_NORMS: tuple = ()


def check_leaf_metrics(leaf_metrics: Any) -> bool:
  """``leaf_metrics`` must be a python bool (it decides the state's structure)."""
  if not isinstance(leaf_metrics, bool):
    raise TypeError(
        f"`leaf_metrics` must be True or False, got {leaf_metrics!r} of type "
        f"{type(leaf_metrics).__name__}"
    )
  return leaf_metrics


def init_leaf_norms(params: Any, leaf_metrics: bool, dtype: jnp.dtype) -> Any:
  """The ``leaf_norms`` field of a fresh state: zeros shaped like ``params``' leaves, or ``()``."""
  if not leaf_metrics:
    return NO_LEAF_NORMS
  return jax.tree_util.tree_map(lambda _: jnp.zeros([], dtype), params)


def as_tree(updates: Any, norms: list[jax.Array], dtype: jnp.dtype) -> Any:
  """Per-leaf norms (a list in leaf order) as a pytree shaped like ``updates``."""
  treedef: Any = jax.tree_util.tree_structure(updates)
  return treedef.unflatten([jnp.asarray(n).astype(dtype) for n in norms])


def measure(
    updates: Any,
    *,
    ord: Any = 2,
    axis_name: AxisName = None,
    replicated: Replicated = None,
    specs: Specs = None,
    leaf_metrics: bool = False,
    dtype: jnp.dtype | None = None,
) -> tuple[jax.Array, Any]:
  """The global norm of ``updates`` and, with ``leaf_metrics``, each leaf's norm.

  Returns ``(norm, leaf_norms)`` where ``leaf_norms`` is a pytree shaped like ``updates`` (each
  leaf's norm in ``dtype``) or ``()`` without ``leaf_metrics``.
  """
  if not leaf_metrics:
    return global_norm(updates, ord=ord, axis_name=axis_name, replicated=replicated,
                       specs=specs), ()
  leaves = float_leaves(updates)
  axis_name, rep = layout(updates, axis_name, replicated, specs)
  with jax.named_scope("clipax/global_norm"):
    per_leaf = by_ord(ord, lambda o: _leafwise(leaves, o, axis_name, rep))
    # The global norm combined from the (already all-reduced) leaf norms: exact, and no second
    # read of any gradient.
    norm = by_ord(ord, lambda o: _global([jnp.ravel(jnp.stack(per_leaf))], o, None)
                  if per_leaf else jnp.zeros([], jnp.float32))
  dt = norm.dtype if dtype is None else dtype
  return norm, as_tree(updates, per_leaf, dt)
