"""``clipax.monitor``: the metrics of a clipper, and no clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from clipax import _checks
from clipax._elements import AxisName, Replicated, Specs, canonical_ord
from clipax._measure import check_leaf_metrics, init_leaf_norms, measure
from clipax._sharding import check_replicated, check_specs
from clipax._state import clip_state, init_clip_state, named, record, stat_dtype


def monitor(
    *,
    ord: int | float | str = 2,
    axis_name: AxisName = None,
    replicated: Replicated = None,
    specs: Specs = None,
    name: str | None = None,
    leaf_metrics: bool = False,
) -> optax.GradientTransformation:
  """An identity transformation that records what a clipper would: the norm, counters and,
  optionally, every leaf's norm, for :func:`clipax.metrics`.

  The updates pass through bit-identical, non-finite ones included (a NaN/Inf norm is counted
  in ``nonfinite_count``; nothing is zeroed: put a guard such as :func:`clipax.skip_nonfinite`
  around the optimizer for that). ``clipped`` is always ``False`` and ``scale`` 1; there is no
  threshold, so the ``threshold`` metric is the step's own norm (see :func:`clipax.metrics`).
  Put it anywhere in a chain to watch the gradients there, e.g. after a clipper to see what it
  let through, or before one in "measure only" mode.

  Args:
    ord: 1, 2 (default) or ``math.inf``.
    axis_name: inside ``shard_map``/``pmap`` with sharded gradients, the axis to all-reduce the
      norm over (see :func:`clipax.global_norm`).
    replicated: with ``axis_name``, the leaves every shard holds whole (see
      :func:`clipax.global_norm`).
    specs: inside ``shard_map``, instead of ``axis_name`` and ``replicated``: the updates'
      ``PartitionSpec`` s or ``"varying"`` (see :func:`clipax.global_norm`).
    name: the name of its keys in :func:`clipax.metrics`; default: its ``named_chain`` key,
      else ``monitor``.
    leaf_metrics: also keep every leaf's norm (``clip/{name}/leaf_norm/<path>``), in the same
      pass as the global norm.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`clipax.ClipState`.

  Raises:
    TypeError: for a ``name`` that is not a string without ``/`` or a non-bool
      ``leaf_metrics``.
    ValueError: for an unknown ``ord`` or a bad ``replicated``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import clipax
    >>> tx = optax.chain(clipax.monitor(leaf_metrics=True), optax.sgd(1.0))
    >>> params = {"b": jnp.zeros(2), "w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"b": jnp.array([0.0, 5.0]), "w": jnp.array([3.0, 4.0])},
    ...                            state)
    >>> m = clipax.metrics(state)
    >>> print(updates["w"].tolist(), f"{m['clip/monitor/norm']:.3f}",
    ...       f"{m['clip/monitor/leaf_norm/w']:.1f}")
    [-3.0, -4.0] 7.071 5.0
  """
  ord = canonical_ord(ord)
  _checks.axis_name(axis_name)
  check_replicated(replicated)
  check_specs(specs, axis_name, replicated)
  check_leaf_metrics(leaf_metrics)

  def init_fn(params):
    return init_clip_state(jnp.inf, init_leaf_norms(params, leaf_metrics, stat_dtype()))

  def update_fn(updates, state, params=None):
    del params
    with jax.named_scope("clipax/monitor"):
      norm, leaves = measure(updates, ord=ord, axis_name=axis_name, replicated=replicated,
                             specs=specs, leaf_metrics=leaf_metrics, dtype=state.norm.dtype)
      bad = ~jnp.isfinite(norm)
      one = jnp.ones([], state.norm.dtype)
      base = record(state, norm, one, jnp.zeros([], jnp.bool_), bad)
      return updates, clip_state(base, jnp.inf, base.norm, leaves)

  return named(optax.GradientTransformation(init_fn, update_fn), "monitor", name)
