"""Whole-step guards around any optimizer: skip non-finite steps and gradient-norm spikes.

A guard measures the global norm of the incoming gradients, decides whether to skip the step,
and on a skip returns all-zero updates and the inner optimizer's state unchanged (selected with
``jnp.where`` inside the compiled program: no host sync). Skips are counted in the guard's
:class:`SkipState`, which :func:`clipax.metrics` reads along with any clipax state inside
``inner_state``.

A NaN or Inf norm never enters the rolling history of :func:`skip_spikes`: one poisoned entry
would make the mean and standard deviation NaN and, in implementations that let it in, turn off
(or on) every spike decision for the next ``window`` steps.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from clipax import _checks
from clipax._adaptive import _known_size, static_int
from clipax._norms import AxisName, global_norm
from clipax._state import _value

_F32 = jnp.float32


class SkipState(NamedTuple):
  """State of :func:`clipax.skip_nonfinite` and :func:`clipax.skip_spikes`.

  Attributes:
    count: int32, number of steps seen, skipped ones included (saturates).
    norm: float32, global norm of the last step's gradients.
    skipped: bool, whether the last step was skipped.
    skipped_count: int32, number of skipped steps (non-finite or spike).
    nonfinite_count: int32, number of steps whose norm was NaN or Inf (skipped or let through).
    spike_count: int32, number of steps skipped as spikes.
    consecutive_nonfinite: int32, non-finite steps in a row up to the last one.
    threshold: float32, the norm above which the last step would have been skipped as a spike
      (``mean + threshold * std`` of the history); ``inf`` when spikes are not being detected.
    history: float32 ``[window]``, ring buffer of the last accepted finite norms (empty for
      :func:`skip_nonfinite`); slot ``i % window`` holds the ``i``-th accepted norm.
    accepted: int32, number of norms written to ``history`` (saturates).
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
  threshold: jax.Array
  history: jax.Array
  accepted: jax.Array
  inner_state: Any

  def clipax_metrics(self) -> dict[str, jax.Array]:
    count = _value(self.count)
    skipped_count = _value(self.skipped_count)
    rate = skipped_count.astype(_F32) / jnp.maximum(count, 1).astype(_F32)
    out = {
        "norm": _value(self.norm),
        "skipped": _value(self.skipped),
        "skip_rate": rate,
        "skipped_count": skipped_count,
        "nonfinite_count": _value(self.nonfinite_count),
        "count": count,
    }
    if _value(self.history).shape[0]:
      out["spike_count"] = _value(self.spike_count)
      out["threshold"] = _value(self.threshold)
    return out


def _rolling_stats(history: jax.Array, n: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean and population standard deviation of the first ``n`` entries (n >= 1)."""
  valid = jnp.arange(history.shape[0]) < n
  count = jnp.maximum(n, 1).astype(_F32)
  mean = jnp.sum(jnp.where(valid, history, 0)) / count
  dev = jnp.where(valid, history - mean, 0)
  return mean, jnp.sqrt(jnp.sum(dev * dev) / count)


def _guard(
    inner: optax.GradientTransformation,
    *,
    name: str,
    window: int | None,
    threshold: Any,
    warmup: Any,
    max_consecutive: int | None,
    axis_name: AxisName,
) -> optax.GradientTransformationExtraArgs:
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    zero = jnp.zeros([], jnp.int32)
    return SkipState(
        count=zero,
        norm=jnp.zeros([], _F32),
        skipped=jnp.zeros([], jnp.bool_),
        skipped_count=zero,
        nonfinite_count=zero,
        spike_count=zero,
        consecutive_nonfinite=zero,
        threshold=jnp.asarray(jnp.inf, _F32),
        history=jnp.zeros([_known_size("window", window)], _F32),
        accepted=zero,
        inner_state=inner.init(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    with jax.named_scope(f"clipax/{name}"):
      norm = global_norm(updates, axis_name=axis_name).astype(_F32)
      finite = jnp.isfinite(norm)
      consecutive = jnp.where(finite, 0, optax.safe_increment(state.consecutive_nonfinite))
      let_through = jnp.zeros([], jnp.bool_)
      if max_consecutive is not None:
        let_through = consecutive > max_consecutive

      size = state.history.shape[0]  # `window`, also when inject_hyperparams traced it
      if size:
        n = jnp.minimum(state.accepted, size)
        mean, std = _rolling_stats(state.history, n)
        active = state.accepted >= (size if warmup is None else warmup)
        limit = jnp.where(active, mean + jnp.asarray(threshold, _F32) * std, jnp.inf)
        spike = finite & (norm > limit)
        accept = finite & ~spike
        history = jnp.where(accept, state.history.at[state.accepted % size].set(norm),
                            state.history)
        accepted = jnp.where(accept, optax.safe_increment(state.accepted), state.accepted)
      else:
        limit = jnp.asarray(jnp.inf, _F32)
        spike = jnp.zeros([], jnp.bool_)
        history, accepted = state.history, state.accepted

      skip = (~finite & ~let_through) | spike
      new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
      out = jax.tree_util.tree_map(
          lambda u: jnp.where(skip, jnp.zeros([], u.dtype), u), new_updates
      )
      inner_state = jax.tree_util.tree_map(
          lambda new, old: jnp.where(skip, old, new).astype(jnp.asarray(old).dtype),
          new_inner,
          state.inner_state,
      )
      return out, SkipState(
          count=optax.safe_increment(state.count),
          norm=norm,
          skipped=skip,
          skipped_count=state.skipped_count + skip.astype(jnp.int32),
          nonfinite_count=state.nonfinite_count + (~finite).astype(jnp.int32),
          spike_count=state.spike_count + spike.astype(jnp.int32),
          consecutive_nonfinite=consecutive,
          threshold=limit.astype(_F32),
          history=history,
          accepted=accepted,
          inner_state=inner_state,
      )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_max_consecutive(max_consecutive: Any) -> None:
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
  of silently standing still.

  Args:
    inner: any optax transformation (extra arguments such as ``value`` are passed on).
    max_consecutive: ``None`` (default) to skip every non-finite step, or an integer >= 0: the
      number of non-finite steps in a row that are skipped before they are let through.
    axis_name: inside ``shard_map``/``pmap`` with sharded gradients, the axis to all-reduce the
      norm over, so every device takes the same decision.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`clipax.SkipState`
    (``metrics`` adds ``skipped_count`` and ``skip_rate``).

  Raises:
    ValueError: for a negative or non-integer ``max_consecutive``.

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
  """
  _check_max_consecutive(max_consecutive)
  return _guard(
      inner,
      name="skip_nonfinite",
      window=0,
      threshold=0.0,
      warmup=0,
      max_consecutive=max_consecutive,
      axis_name=axis_name,
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
  r"""Skips steps whose gradient norm is a spike against the recent accepted norms.

  With :math:`m_t, s_t` the mean and (population) standard deviation of the last ``window``
  accepted norms, the current step excluded,

  .. math::
    \text{skip}_t = \|g_t\| > m_t + k\,s_t \quad\text{or}\quad \|g_t\| \text{ is NaN/Inf}

  (Levanter / OLMo-core / MaxText style). A skipped step returns all-zero updates and leaves the
  inner state untouched. Only accepted, finite norms enter the history, so a NaN never poisons
  the statistics and a spike does not widen the band for the next one. Spikes are detected once
  ``warmup`` norms have been accepted. The non-finite rule is that of :func:`skip_nonfinite`.

  Args:
    inner: any optax transformation (extra arguments are passed on).
    window: number of accepted norms the statistics are taken over (python integer >= 2).
    threshold: ``k`` > 0, in standard deviations.
    warmup: accepted norms needed before spikes are skipped (integer >= 2); ``None`` (default)
      means ``window``.
    max_consecutive: as in :func:`skip_nonfinite` (``None``: always skip non-finite steps).
    axis_name: inside ``shard_map``/``pmap`` with sharded gradients, the axis to all-reduce the
      norm over.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`clipax.SkipState`
    (``metrics`` adds ``skipped_count``, ``spike_count`` and ``threshold``).

  Raises:
    ValueError: for a bad ``window``, ``threshold``, ``warmup`` or ``max_consecutive``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import clipax
    >>> tx = clipax.skip_spikes(optax.sgd(1.0), window=4, threshold=3.0)
    >>> state = tx.init({"w": jnp.zeros(1)})
    >>> for n in [1.0, 1.1, 0.9, 1.0, 50.0, 1.05]:
    ...   out, state = jax.jit(tx.update)({"w": jnp.array([n])}, state)
    >>> m = clipax.metrics(state)
    >>> print(int(m["clip/skipped_count"]), f"{m['clip/threshold']:.3f}")
    1 1.212

  References:
    Levanter ``SkipStepConfig``; OLMo-core ``SkipStepOptimizer``; Chowdhery et al., "PaLM",
    2022, https://arxiv.org/abs/2204.02311 (skipping batches around spikes)
  """
  window = static_int("window", window, low=2)
  _checks.number("threshold", threshold, low=0.0, low_open=True)
  if warmup is not None:  # None: the window, resolved from the state's history in update
    _checks.number("warmup", warmup, low=2, integer=True)
  _check_max_consecutive(max_consecutive)
  return _guard(
      inner,
      name="skip_spikes",
      window=window,
      threshold=threshold,
      warmup=warmup,
      max_consecutive=max_consecutive,
      axis_name=axis_name,
  )

