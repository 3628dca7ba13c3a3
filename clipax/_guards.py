"""Whole-step guards around any optimizer: skip non-finite steps and gradient-norm spikes.

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
from clipax._adaptive import _known_size, static_int
from clipax._norms import AxisName, global_norm
from clipax._state import _value, add_count, register_state, stat_dtype

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
  """

  count: jax.Array
  norm: jax.Array
  skipped: jax.Array
  skipped_count: jax.Array
  nonfinite_count: jax.Array
  consecutive_nonfinite: jax.Array
  invalid_count: jax.Array
  inner_state: Any

  def clipax_metrics(self) -> dict[str, jax.Array]:
    return guard_metrics(self)


@register_state
class SkipState(NamedTuple):
  """State of :func:`clipax.skip_spikes`.

  Attributes:
    count: int32, number of steps seen, skipped ones included (saturates at 2**31 - 1).
    norm: global norm of the last step's gradients, in ``_state.stat_dtype()``.
    skipped: bool, whether the last step was skipped.
    skipped_count: int32, number of skipped steps: non-finite, spike or invalid (saturates).
    nonfinite_count: int32, number of steps whose norm was NaN or Inf (saturates).
    spike_count: int32, number of steps skipped as spikes (saturates).
    consecutive_nonfinite: int32, non-finite steps in a row up to the last one (saturates).
    invalid_count: int32, number of steps skipped because a traced hyperparameter
      (``threshold``, ``warmup``, ``max_consecutive``) was NaN or out of its range (saturates).
    threshold: the band in force at the last step, ``median + k * 1.4826 * MAD`` of the
      history (a norm above it is a spike); ``inf`` while spikes are not detected (warm-up);
      left as it was on an invalid step. In ``_state.stat_dtype()``.
    history: ``[window]`` ring buffer of the last recorded finite norms (accepted norms as
      they were, spikes bounded to the band they broke), in ``_state.stat_dtype()``.
    cursor: int32, the slot the next norm is written to (modulo ``window``).
    accepted: int32, number of norms written to ``history`` (saturates); the number of filled
      slots is ``min(accepted, window)``.
    inner_state: the wrapped optimizer's state. Under ``shard_map``/``pmap`` every field above
      is computed from the all-reduced global norm and is identical on every device;
      ``inner_state`` is laid out as the inner optimizer lays it out (e.g. sharded moments).
  """

  count: jax.Array
  norm: jax.Array
  skipped: jax.Array
  skipped_count: jax.Array
  nonfinite_count: jax.Array
  spike_count: jax.Array
  consecutive_nonfinite: jax.Array
  invalid_count: jax.Array
  threshold: jax.Array
  history: jax.Array
  cursor: jax.Array
  accepted: jax.Array
  inner_state: Any

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
  out = {
      "norm": _value(_field(state, "norm")),
      "skipped": _value(_field(state, "skipped")),
      "skip_rate": rate,
      "skipped_count": skipped_count,
      "nonfinite_count": _value(_field(state, "nonfinite_count")),
      "invalid_count": _value(_field(state, "invalid_count")),
      "count": count,
  }
  for extra in ("spike_count", "threshold"):
    value = _field(state, extra)
    if value is not None:
      out[extra] = _value(value)
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
    )

  def update_fn(updates, state, params=None, **extra_args):
    with jax.named_scope("clipax/skip_nonfinite"):
      norm = global_norm(updates, axis_name=axis_name).astype(state.norm.dtype)
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
      )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_warmup(warmup: Any, window: int | None) -> None:
  """``2 <= warmup <= window`` for a python integer or a concrete array (``window`` known)."""
  if hasattr(warmup, "shape") and hasattr(warmup, "dtype"):
    _checks.scalar_array("warmup", warmup)
  value = static_int("warmup", warmup, low=2)
  if value is not None and window is not None and value > window:
    raise ValueError(
        f"`warmup` must be an integer in [2, window={window}] (the history holds `window` norms), "
        f"got {warmup!r}"
    )


def skip_spikes(
    inner: optax.GradientTransformation,
    *,
    window: int = 128,
    threshold: Any = 6.0,
    warmup: int | None = None,
    max_consecutive: int | None = None,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Skips steps whose gradient norm is a spike against the recent norms.

  With :math:`\operatorname{med}_t` and :math:`\operatorname{MAD}_t` the median and the median
  absolute deviation of the last ``window`` recorded norms (the current step excluded),

  .. math::
    \text{skip}_t = \|g_t\| > \operatorname{med}_t + k \cdot 1.4826\,\operatorname{MAD}_t
    \quad\text{or}\quad \|g_t\| \text{ is NaN/Inf}

  (1.4826 MAD is the standard deviation of a normal distribution). A skipped step returns
  all-zero updates and leaves the inner state untouched.

  **Warm-up and robustness.** Spikes are detected once ``warmup`` norms have been accepted
  (16 by default); until then every finite norm is accepted into the history. The band is
  built from the median and the MAD, never the mean and standard deviation, so one huge norm
  that got in during warm-up (or a few, fewer than half the history) moves the band by at most
  one rank: it cannot widen it and let the next spikes through. After warm-up a spike enters
  the history bounded to the band it broke (the shared rule: a statistic absorbs the clipped
  value), so an isolated spike moves the band by at most one rank, while a lasting rise of the
  norm level (a new data mix, the end of a learning-rate warm-up) is followed after about
  ``window / 2`` skipped steps instead of stopping training for good. NaN/Inf norms never enter
  the history. The history is a ring buffer with its own
  write position (``cursor``), so it keeps rotating after the counters saturate at 2**31 - 1.
  The non-finite rule is that of :func:`skip_nonfinite`.

  **Invalid hyperparameters.** Python numbers are checked here, concrete arrays (what
  ``optax.inject_hyperparams`` makes of numbers) at ``init``, the same way. A *traced*
  ``threshold`` that is NaN, ``inf`` or <= 0, a ``warmup`` outside ``[2, window]`` or a
  negative ``max_consecutive`` never disables the guard: the step is skipped (zero update,
  inner state and history unchanged) and counted in ``invalid_count`` and ``skipped_count``.

  Args:
    inner: any optax transformation (extra arguments are passed on).
    window: number of recorded norms the statistics are taken over (integer in
      ``[2, 2**31 - 1]``; it sets an array shape, so it must be concrete at ``init``).
    threshold: ``k`` > 0 (finite), in standard deviations (1.4826 MAD).
    warmup: accepted norms needed before spikes are skipped, an integer in ``[2, window]``;
      ``None`` (default) means 16, or ``window`` if it is smaller.
    max_consecutive: as in :func:`skip_nonfinite` (``None``: always skip non-finite steps).
    axis_name: inside ``shard_map``/``pmap`` with sharded gradients, the axis to all-reduce the
      norm over.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`clipax.SkipState`
    (``metrics`` adds ``skipped_count``, ``spike_count``, ``invalid_count`` and
    ``threshold``).

  Raises:
    TypeError: if ``inner`` is not an optax transformation, or ``window``, ``warmup`` or
      ``max_consecutive`` is not an integer.
    ValueError: for a ``window``, ``threshold``, ``warmup`` or ``max_consecutive`` out of its
      range (integers above 2**31 - 1 included).

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import clipax
    >>> tx = clipax.skip_spikes(optax.sgd(1.0), window=4, threshold=3.0, warmup=4)
    >>> state = tx.init({"w": jnp.zeros(1)})
    >>> for n in [1.0, 1.1, 0.9, 1.0, 50.0, 1.05]:
    ...   out, state = jax.jit(tx.update)({"w": jnp.array([n])}, state)
    >>> m = clipax.metrics(state)  # 50 was recorded as its band 1.222: median 1.05, MAD 0.1
    >>> print(int(m["clip/skipped_count"]), f"{m['clip/threshold']:.3f}")
    1 1.495

  References:
    Levanter ``SkipStepConfig``; OLMo-core ``SkipStepOptimizer``; Chowdhery et al., "PaLM",
    2022, https://arxiv.org/abs/2204.02311 (skipping batches around spikes); Hampel, "The
    influence curve and its role in robust estimation", JASA 1974 (median and MAD).
  """
  _check_inner_and_max_consecutive(inner, max_consecutive)
  _checks.axis_name(axis_name)
  window = static_int("window", window, low=2)
  _checks.number("threshold", threshold, low=0.0, low_open=True)
  if warmup is not None:
    _check_warmup(warmup, window)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    zero = jnp.zeros([], jnp.int32)
    dtype = stat_dtype()
    return SkipState(
        count=zero,
        norm=jnp.zeros([], dtype),
        skipped=jnp.zeros([], jnp.bool_),
        skipped_count=zero,
        nonfinite_count=zero,
        spike_count=zero,
        consecutive_nonfinite=zero,
        invalid_count=zero,
        threshold=jnp.asarray(jnp.inf, dtype),
        history=jnp.zeros([_known_size("window", window)], dtype),
        cursor=zero,
        accepted=zero,
        inner_state=inner.init(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    with jax.named_scope("clipax/skip_spikes"):
      dtype = state.history.dtype
      size = state.history.shape[0]  # `window`, also when inject_hyperparams traced it
      norm = global_norm(updates, axis_name=axis_name).astype(dtype)
      invalid = _flag(_checks.any_of(
          _checks.invalid(threshold, low=0.0, low_open=True),
          None if warmup is None else _checks.invalid(warmup, low=2.0, high=size, high_open=False),
          _invalid_max_consecutive(max_consecutive),
      ))
      finite, consecutive, let_through = _nonfinite_rule(state, norm, max_consecutive)

      n = jnp.minimum(state.accepted, size)
      need = jnp.asarray(min(DEFAULT_WARMUP, size) if warmup is None else warmup)
      need = jnp.ceil(need) if jnp.issubdtype(need.dtype, jnp.floating) else need
      active = n.astype(need.dtype) >= need
      k = jnp.asarray(threshold).astype(dtype)
      limit = jnp.where(active, robust_band(state.history, n, k), jnp.inf)
      spike = finite & ~invalid & (norm > limit)
      accept = finite & ~invalid & ~spike
      skip = invalid | spike | (~finite & ~let_through)

      # Every finite step with valid hyperparameters is recorded: an accepted norm as it is, a
      # spike bounded to the band it broke (so one spike moves the band by at most one rank,
      # while a lasting rise of the level is followed after about window / 2 steps instead of
      # being skipped forever).
      record = accept | spike
      slot = state.cursor % size
      value = jnp.where(spike, limit, norm)
      history = jnp.where(record, state.history.at[slot].set(value), state.history)
      cursor = jnp.where(record, (slot + 1) % size, state.cursor)
      accepted = jnp.where(record, optax.safe_increment(state.accepted), state.accepted)

      new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
      out, inner_state = _skip_select(skip, new_updates, new_inner, state.inner_state)
      return out, SkipState(
          count=optax.safe_increment(state.count),
          norm=norm,
          skipped=skip,
          skipped_count=add_count(state.skipped_count, skip),
          nonfinite_count=add_count(state.nonfinite_count, ~finite),
          spike_count=add_count(state.spike_count, spike),
          consecutive_nonfinite=jnp.where(invalid, state.consecutive_nonfinite, consecutive),
          invalid_count=add_count(state.invalid_count, invalid),
          threshold=jnp.where(invalid, state.threshold, limit.astype(dtype)),
          history=history,
          cursor=cursor.astype(jnp.int32),
          accepted=accepted,
          inner_state=inner_state,
      )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
