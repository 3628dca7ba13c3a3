"""Whole-step guards around any optimizer: skip non-finite steps (spikes: :mod:`clipax._spikes`).

A guard measures the global norm of the incoming gradients, decides whether to skip the step,
and on a skip returns all-zero updates and the inner optimizer's state unchanged (selected with
``jnp.where`` inside the compiled program: no host sync). Skips are counted in the guard's
state (:class:`SkipNonfiniteState`, :class:`SkipState`), which :func:`clipax.metrics` reads
along with any clipax state inside ``inner_state``.

The rules every guard keeps (see ``docs/ARCHITECTURE.md``, "Shared rules"):

* a NaN or Inf norm never enters the history of :func:`skip_spikes`;
* the spike band is robust: the median plus a multiple of the (scaled) median absolute
  deviation of the accepted norms, so one huge norm let in during warm-up cannot widen it;
* a traced hyperparameter that is NaN or out of its range skips the step (zero update, inner
  state and history unchanged) and is counted in ``invalid_count``; it never disables a guard;
* every counter saturates at 2**31 - 1, and the ring buffer keeps its own write position, so
  it keeps rotating after the counters saturate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from clipax import _checks
from clipax._elements import AxisName, Specs
from clipax._measure import check_leaf_metrics, init_leaf_norms, measure
from clipax._sharding import check_specs
from clipax._state import _value, add_count, named, register_state, stat_dtype

MAD_TO_STD = 1.4826
"""The median absolute deviation of a normal distribution times this is its standard deviation."""

DEFAULT_WARMUP = 16
"""Accepted norms :func:`skip_spikes` needs before it skips spikes (or ``window`` if smaller)."""


@register_state
class SkipNonfiniteState(NamedTuple):
  """State of :func:`clipax.skip_nonfinite`.

  Attributes:
    count: int32, number of steps seen, skipped ones included (saturates at 2**31 - 1).
    norm: global norm of the last step's gradients, in ``_state.stat_dtype()`` (float32, or
      float64 under x64).
    skipped: bool, whether the last step was skipped.
    skipped_count: int32, number of skipped steps (saturates).
    nonfinite_count: int32, number of steps whose norm was NaN or Inf, skipped or let through
      (saturates).
    consecutive_nonfinite: int32, non-finite steps in a row up to the last one (saturates).
    invalid_count: int32, number of steps skipped because a traced hyperparameter
      (``max_consecutive``) was NaN or out of its range (saturates).
    inner_state: the wrapped optimizer's state. Under ``shard_map``/``pmap`` every field above
      is computed from the all-reduced global norm and is identical on every device.
    leaf_norms: with ``leaf_metrics=True``, each leaf's norm (a pytree shaped like the
      gradients); otherwise ``()``.
    tag: uint8, the kind and ``name=`` as UTF-8, so :func:`clipax.metrics` names the state also
      in its dict forms.
  """

  count: jax.Array  # type: ignore[assignment]  # a field, shadows tuple.count
  norm: jax.Array
  skipped: jax.Array
  skipped_count: jax.Array
  nonfinite_count: jax.Array
  consecutive_nonfinite: jax.Array
  invalid_count: jax.Array
  inner_state: Any
  leaf_norms: Any = ()
  tag: Any = ()

  def clipax_metrics(self) -> dict[str, jax.Array]:
    return guard_metrics(self)


def _field(state: Any, name: str) -> Any:
  if isinstance(state, Mapping):
    return state.get(name)
  return getattr(state, name, None)


def guard_metrics(state: Any) -> dict[str, jax.Array]:
  """The metrics of a guard state, given as the state itself or as a ``dict`` of its fields
  (``flax.serialization.to_state_dict``, ``nnx.to_pure_dict``, a checkpoint restored without
  a target); fields may be arrays or Flax NNX variables."""
  count = _value(_field(state, "count"))
  skipped_count = _value(_field(state, "skipped_count"))
  rate = skipped_count.astype(jnp.float32) / jnp.maximum(count, 1).astype(jnp.float32)
  norm = _value(_field(state, "norm"))
  skipped = _value(_field(state, "skipped"))
  out = {
      "norm": norm,
      # what reached the inner optimizer: the gradients, or nothing on a skipped step
      "update_norm": jnp.where(skipped, jnp.zeros_like(norm), norm),
      "skipped": skipped,
      "skip_rate": rate,
      "skipped_count": skipped_count,
      "nonfinite_count": _value(_field(state, "nonfinite_count")),
      "invalid_count": _value(_field(state, "invalid_count")),
      "count": count,
  }
  for extra in ("spike_count", "threshold", "loss", "loss_threshold", "loss_spike_count"):
    value = _field(state, extra)
    if value is not None and not (isinstance(value, (tuple, Mapping)) and not value):
      out[extra] = _value(value)
  if "loss_threshold" in out:  # not in force during warm-up: report the step's own loss
    t = out["loss_threshold"]
    out["loss_threshold"] = jnp.where(jnp.isposinf(t), out["loss"].astype(t.dtype), t)
  return out


def _median(values: jax.Array, n: jax.Array) -> jax.Array:
  """The median of the first ``n`` entries of ``values`` (``1 <= n <= len(values)``)."""
  size = values.shape[0]
  ordered = jnp.sort(jnp.where(jnp.arange(size) < n, values, jnp.inf))
  n = jnp.maximum(n, 1)
  lo, hi = ordered[(n - 1) // 2], ordered[n // 2]
  return lo + (hi - lo) / 2  # no overflow for two norms near the largest float


def robust_band(history: jax.Array, n: jax.Array, k: jax.Array) -> jax.Array:
  """``median + k * 1.4826 * MAD`` of the first ``n`` entries of ``history`` (n >= 1)."""
  median = _median(history, n)
  mad = _median(jnp.abs(history - median), n)
  return median + k * (MAD_TO_STD * mad).astype(history.dtype)


def _skip_select(skip: jax.Array, new_updates: Any, new_inner: Any, old_inner: Any):
  """All-zero updates and the old inner state where ``skip``, the inner step's otherwise."""
  out = jax.tree_util.tree_map(lambda u: jnp.where(skip, jnp.zeros([], u.dtype), u), new_updates)
  inner_state = jax.tree_util.tree_map(
      lambda new, old: jnp.where(skip, old, new).astype(jnp.asarray(old).dtype),
      new_inner,
      old_inner,
  )
  return out, inner_state


def _nonfinite_rule(state: Any, norm: jax.Array, max_consecutive: Any):
  """``(finite, consecutive, let_through)`` for this step's norm."""
  finite = jnp.isfinite(norm)
  consecutive = jnp.where(finite, 0, optax.safe_increment(state.consecutive_nonfinite))
  let_through = jnp.zeros([], jnp.bool_)
  if max_consecutive is not None:
    limit = jnp.asarray(max_consecutive)
    let_through = consecutive.astype(limit.dtype) > limit
  return finite, consecutive, let_through


def _invalid_max_consecutive(max_consecutive: Any) -> jax.Array | None:
  return None if max_consecutive is None else _checks.invalid(max_consecutive, low=0.0)


def _flag(x: jax.Array | None) -> jax.Array:
  return jnp.zeros([], jnp.bool_) if x is None else x


def _check_inner_and_max_consecutive(inner: Any, max_consecutive: Any) -> None:
  _checks.transformation("inner", inner)
  if max_consecutive is not None:
    _checks.number("max_consecutive", max_consecutive, low=0, integer=True)


def skip_nonfinite(
    inner: optax.GradientTransformation,
    *,
    max_consecutive: int | None = None,
    axis_name: AxisName = None,
    specs: Specs = None,
    name: str | None = None,
    leaf_metrics: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Skips steps whose gradients have a NaN or Inf: zero update, inner state unchanged.

  .. math::
    \text{skip}_t = \neg\operatorname{isfinite}(\|g_t\|) \wedge
    (\text{consecutive}_t \le \text{max\_consecutive})

  The decision is made inside the compiled program (``jnp.where``), so nothing syncs to the
  host. After ``max_consecutive`` non-finite steps in a row the next ones go through, as
  :func:`optax.apply_if_finite` does, so a run that keeps producing NaNs fails visibly instead
  of silently standing still. The norm is kept in ``_state.stat_dtype()``, so under x64 a
  finite float64 gradient of 1e40 is finite and goes through.

  A *traced* ``max_consecutive`` (``optax.inject_hyperparams`` under ``jit``) that is NaN or
  negative is an invalid event: the step is skipped (zero update, inner state unchanged) and
  counted in ``invalid_count`` and ``skipped_count``; a concrete one is checked at ``init``
  like a python number.

  Args:
    inner: any optax transformation (extra arguments such as ``value`` are passed on).
    max_consecutive: ``None`` (default) to skip every non-finite step, or an integer in
      ``[0, 2**31 - 1]``: the number of non-finite steps in a row that are skipped before they
      are let through.
    axis_name: inside ``shard_map``/``pmap`` with sharded gradients, the axis to all-reduce the
      norm over, so every device takes the same decision.
    specs: inside ``shard_map``, instead of ``axis_name``: the updates' ``PartitionSpec`` s (the
      ``in_specs`` pytree) or ``"varying"`` (read from the arrays' types); each leaf is summed
      over exactly the mesh axes it is split over (see :func:`clipax.global_norm`).
    name: the name of its keys in :func:`clipax.metrics`; default: its ``named_chain`` key,
      else ``skip_nonfinite``.
    leaf_metrics: also keep every leaf's norm (``clip/{name}/leaf_norm/<path>``), in the same
      pass as the global norm.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`SkipNonfiniteState` (``metrics`` adds ``skipped_count``, ``skip_rate`` and
    ``invalid_count``).

  Raises:
    TypeError: if ``inner`` is not an optax transformation, or ``max_consecutive`` is not an
      integer.
    ValueError: for a negative ``max_consecutive`` or one above 2**31 - 1.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import clipax
    >>> tx = clipax.skip_nonfinite(optax.chain(clipax.clip_by_global_norm(1.0), optax.sgd(0.1)))
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> out, state = jax.jit(tx.update)({"w": jnp.array([1.0, jnp.nan])}, state, params)
    >>> print(out["w"].tolist(), int(state.skipped_count), int(state.inner_state[0].count))
    [0.0, 0.0] 1 0

  References:
    ``optax.apply_if_finite`` (the ``max_consecutive`` rule).
  """
  _check_inner_and_max_consecutive(inner, max_consecutive)
  _checks.axis_name(axis_name)
  check_specs(specs, axis_name)
  check_leaf_metrics(leaf_metrics)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    zero = jnp.zeros([], jnp.int32)
    return SkipNonfiniteState(
        count=zero,
        norm=jnp.zeros([], stat_dtype()),
        skipped=jnp.zeros([], jnp.bool_),
        skipped_count=zero,
        nonfinite_count=zero,
        consecutive_nonfinite=zero,
        invalid_count=zero,
        inner_state=inner.init(params),
        leaf_norms=init_leaf_norms(params, leaf_metrics, stat_dtype()),
    )

  def update_fn(updates, state, params=None, **extra_args):
    with jax.named_scope("clipax/skip_nonfinite"):
      norm, leaves = measure(updates, axis_name=axis_name, specs=specs,
                             leaf_metrics=leaf_metrics, dtype=state.norm.dtype)
      norm = norm.astype(state.norm.dtype)
      invalid = _flag(_invalid_max_consecutive(max_consecutive))
      finite, consecutive, let_through = _nonfinite_rule(state, norm, max_consecutive)
      skip = invalid | (~finite & ~let_through)
      new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
      out, inner_state = _skip_select(skip, new_updates, new_inner, state.inner_state)
      return out, SkipNonfiniteState(
          count=optax.safe_increment(state.count),
          norm=norm,
          skipped=skip,
          skipped_count=add_count(state.skipped_count, skip),
          nonfinite_count=add_count(state.nonfinite_count, ~finite),
          consecutive_nonfinite=jnp.where(invalid, state.consecutive_nonfinite, consecutive),
          invalid_count=add_count(state.invalid_count, invalid),
          inner_state=inner_state,
          leaf_norms=leaves,
      )

  return named(optax.GradientTransformationExtraArgs(init_fn, update_fn), "skip_nonfinite", name)
