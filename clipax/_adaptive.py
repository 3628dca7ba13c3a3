"""Thresholds learned from the norm history: ZClip and AutoClip (AdaGC is in ``_adagc``).

Each clipper is ``measure -> threshold -> act -> record`` like the fixed clippers, with the
threshold coming from a *policy*: one small pure function per method that maps the statistics
and this step's norm to a clip value and the next statistics. The pieces shared by all of them:

* one warm-up rule (:func:`warming_up`): the first ``warmup_steps`` *finite* norms fill the
  statistics while a fixed threshold applies; the statistics built in warm-up are robust
  (median and MAD, never mean and variance), so one bad step in warm-up cannot poison them;
* statistics are only ever updated with a finite norm and valid hyperparameters: a NaN/Inf step
  gets the ``nonfinite`` action (zero by default), a traced hyperparameter that is NaN or out of
  range zeroes the update; both are counted and leave every statistic as it was;
* an optional absolute cap ``max_norm`` on top of the learned threshold (``inf``: no cap);
* the state extends :class:`~clipax.ClipState` (same leading fields, so
  :func:`clipax.metrics` reads it) with ``threshold``, ``observed`` (finite norms absorbed,
  saturating) and the method's statistics; ring buffers keep their own ``cursor``.

Everything is computed from the global norm (all-reduced once with ``axis_name``), so the state
is identical on every device of a ``shard_map``/``pmap``.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from clipax import _checks
from clipax._checks import Nonfinite
from clipax._clipping import action, invalid_threshold, scale_for
from clipax._elements import AxisName, Specs, float_leaves
from clipax._measure import check_leaf_metrics, init_leaf_norms, measure
from clipax._sharding import check_specs
from clipax._state import (
    _value,
    add_count,
    clip_state_metrics,
    init_base,
    named,
    record,
    register_state,
)

ZClipMode = Literal["reciprocal", "mean", "zscore"]
WarmupStats = Literal["robust", "mean"]

# The reference ZClip adds this to the standard deviation before dividing by it.
_ZCLIP_EPS = 1e-6

# 1.4826 * MAD estimates the standard deviation of a normal distribution.
MAD_TO_STD = 1.4826


def _threshold_metrics(state: Any) -> dict[str, jax.Array]:
  """The shared metrics (``threshold`` and ``update_norm`` included) and ``observed``, the
  number of finite norms the learned statistics absorbed."""
  return {**clip_state_metrics(state), "observed": _value(state.observed)}


def _zclip_metrics(state: Any) -> dict[str, jax.Array]:
  """zclip's metrics and its learned statistics: ``mean`` (the EMA of the norm) and ``std``."""
  var = _value(state.var)
  return {**_threshold_metrics(state), "mean": _value(state.mu),
          "std": jnp.sqrt(jnp.maximum(var, 0))}


@register_state
class ZClipState(NamedTuple):
  """State of :func:`clipax.zclip`.

  Attributes:
    count: int32, number of updates seen (saturates).
    norm: pre-clip global norm of the last update (float32; float64 under x64).
    scale: factor applied to the last update (0 when it was zeroed).
    clipped: bool, whether the last update was clipped.
    clipped_count: int32, number of clipped updates (saturates).
    nonfinite_count: int32, number of updates whose norm was NaN or Inf (saturates).
    invalid_count: int32, number of updates zeroed for an invalid traced hyperparameter.
    threshold: the norm above which the last update would have been clipped: the z-score
      boundary ``mu + z_threshold * (sigma + eps)`` after warm-up, capped by ``max_norm``;
      ``max_norm`` during warm-up (``inf`` without a cap).
    observed: int32, finite norms absorbed into the statistics (saturates).
    mu: EMA of the (clipped) norm; during warm-up the median of the warm-up norms.
    var: EMA of the squared deviation; during warm-up ``(1.4826 * MAD)^2`` of the warm-up norms.
    warmup_norms: ``[warmup_steps]``, the finite norms seen during warm-up, in order.
    leaf_norms: with ``leaf_metrics=True``, each leaf's pre-clip norm (a pytree shaped like the
      updates); otherwise ``()``.
    tag: uint8, the transformation's kind and ``name=`` as UTF-8 (``b"zclip/"``), so that
      :func:`clipax.metrics` names the state also in its dict forms; set by the transformation.
  """

  count: jax.Array  # type: ignore[assignment]  # a field, shadows tuple.count
  norm: jax.Array
  scale: jax.Array
  clipped: jax.Array
  clipped_count: jax.Array
  nonfinite_count: jax.Array
  invalid_count: jax.Array
  threshold: jax.Array
  observed: jax.Array
  mu: jax.Array
  var: jax.Array
  warmup_norms: jax.Array
  leaf_norms: Any = ()
  tag: Any = ()

  def clipax_metrics(self) -> dict[str, jax.Array]:
    return _zclip_metrics(self)


def warming_up(state: Any, warmup_steps: Any) -> jax.Array:
  """The warm-up rule shared by every adaptive clipper.

  The step is a warm-up step while fewer than ``warmup_steps`` finite norms have been absorbed
  *before* it (``state.observed``): the first ``warmup_steps`` finite norms fill the statistics
  under a fixed threshold and the learned threshold applies from the next one on. Non-finite
  steps and steps with an invalid hyperparameter do not count, so they do not shorten warm-up.
  """
  return state.observed < warmup_steps


def masked_median(values: jax.Array, n: jax.Array) -> jax.Array:
  """The median of ``values[:n]`` for a traced ``n >= 1`` (mean of the two middle values)."""
  valid = jnp.arange(values.shape[0]) < n
  ordered = jnp.sort(jnp.where(valid, values, jnp.inf))
  n = jnp.maximum(n, 1)
  lo, hi = ordered[(n - 1) // 2], ordered[n // 2]
  return lo + (hi - lo) / 2


def robust_stats(values: jax.Array, n: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Median and ``1.4826 * MAD`` (a standard deviation robust to outliers) of ``values[:n]``."""
  center = masked_median(values, n)
  mad = masked_median(jnp.abs(values - center), n)
  return center, MAD_TO_STD * mad


def _cap(limit: jax.Array, max_norm: Any) -> jax.Array:
  if max_norm is None:
    return limit
  return jnp.minimum(limit, jnp.maximum(jnp.asarray(max_norm, limit.dtype), 0))


def _keep_if(ok: jax.Array, new: Any, old: Any) -> Any:
  return jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o).astype(o.dtype), new, old)


def static_int(name: str, value: Any, *, low: int = 1) -> int | None:
  """A python int from an integer or a concrete integer array (``inject_hyperparams`` makes
  arrays of numeric arguments); raises ``ValueError`` naming ``name`` otherwise.

  A traced value gives ``None``: ``inject_hyperparams`` rebuilds the transformation inside the
  jitted update with traced hyperparameters, and there the size is read off the state's arrays
  (which ``init`` built from the concrete value).
  """
  if isinstance(value, jax.core.Tracer):
    return None
  if hasattr(value, "shape") and hasattr(value, "dtype"):
    try:
      value = np.asarray(value).item()
    except (TypeError, ValueError, jax.errors.JAXTypeError) as err:
      raise ValueError(
          f"`{name}` sets an array shape and must be a concrete integer, got {value!r}"
      ) from err
  _checks.number(name, value, low=low, integer=True, allow_array=False)
  return int(value)


def _known_size(name: str, size: int | None) -> int:
  if size is None:
    raise ValueError(
        f"`{name}` sets an array shape but is traced in init (optax.inject_hyperparams with init "
        f"inside jit): pass `static_args=('{name}',)` or call init outside jit"
    )
  return size


def _check_max_norm(max_norm: Any) -> None:
  if max_norm is not None:
    _checks.threshold("max_norm", max_norm)


def _invalid_cap(max_norm: Any) -> jax.Array | None:
  return None if max_norm is None else invalid_threshold(max_norm)


# ----------------------------------------------------------------------------- policies
# A policy maps (state, norm) -> (clip value, reported threshold, next statistics). The clip
# value is ``inf`` when this step is not clipped by the learned rule; the caller applies the
# ``max_norm`` cap, acts, and keeps the statistics only when the norm is finite and every
# hyperparameter valid.


def _root_max(dt: jnp.dtype) -> jax.Array:
  """Half the square root of the largest finite value: its square (and any convex combination of
  such squares) is finite."""
  return jnp.asarray(math.sqrt(float(jnp.finfo(dt).max)) / 2, dt)


def _zclip_policy(
    state: ZClipState, norm: jax.Array, *, alpha, z_threshold, warmup_steps, mode, warmup_stats
):
  dt = norm.dtype
  alpha = jnp.asarray(alpha, dt)
  z_thr = jnp.asarray(z_threshold, dt)
  warm = warming_up(state, warmup_steps)

  # Warm-up: the norm joins the warm-up buffer; mu and var are its median and MAD^2 (robust),
  # or Welford's running mean and population variance (the reference's rule, "mean").
  size = state.warmup_norms.shape[0]
  slot = jnp.clip(state.observed, 0, size - 1)
  buffer = jnp.where(warm, state.warmup_norms.at[slot].set(norm), state.warmup_norms)
  if warmup_stats == "robust":
    mu_w, sigma_w = robust_stats(buffer, jnp.minimum(state.observed + 1, size))
    # bounded, so a 1e30 norm among the first few keeps the variance finite until the median
    # and MAD of the full warm-up leave it behind
    var_w = jnp.square(jnp.minimum(sigma_w, _root_max(dt)))
  else:
    n = (state.observed + 1).astype(dt)
    delta = norm - state.mu
    mu_w = state.mu + delta / n
    var_w = state.var + (delta * (norm - mu_w) - state.var) / n

  # After warm-up: z-score of this norm against the EMAs.
  std = jnp.sqrt(jnp.maximum(state.var, 0))
  z = (norm - state.mu) / (std + _ZCLIP_EPS)
  spike = z > z_thr
  if mode == "reciprocal":
    clip_value = state.mu + z_thr * std / (jnp.where(spike, z, 1) / z_thr)
  elif mode == "mean":
    clip_value = state.mu
  else:
    clip_value = state.mu + z_thr * std
  effective = jnp.where(spike, clip_value, norm)  # the EMAs see the clipped norm
  mu_e = alpha * state.mu + (1 - alpha) * effective
  # bounded like var_w: after a 1e30 warm-up median the deviations of normal norms from it are
  # ~1e30, whose square overflows float32
  var_e = alpha * state.var + (1 - alpha) * jnp.square(
      jnp.minimum(jnp.abs(effective - mu_e), _root_max(dt)))

  inf = jnp.asarray(jnp.inf, dt)
  limit = jnp.where(warm | ~spike, inf, clip_value)
  reported = jnp.where(warm, inf, state.mu + z_thr * (std + _ZCLIP_EPS))
  stats = {
      "mu": jnp.where(warm, mu_w, mu_e),
      "var": jnp.where(warm, var_w, var_e),
      "warmup_norms": buffer,
  }
  return limit, reported, stats


# ----------------------------------------------------------------------------- builders


def _global_clipper(kind, state_cls, init_stats, policy, invalid_fn, max_norm, axis_name,
                    nonfinite, name, leaf_metrics, specs=None):
  """A global-norm clipper whose threshold comes from ``policy``."""
  check_leaf_metrics(leaf_metrics)

  def init_fn(params):
    base = init_base()
    dt = base.norm.dtype
    threshold = _cap(jnp.asarray(jnp.inf, dt), max_norm)
    zero = jnp.zeros([], jnp.int32)
    return state_cls(*base, threshold, zero, **init_stats(dt),
                     leaf_norms=init_leaf_norms(params, leaf_metrics, dt))

  def update_fn(updates, state, params=None):
    del params
    with jax.named_scope(f"clipax/{kind}"):
      dt = state.norm.dtype
      norm, leaves = measure(updates, axis_name=axis_name, specs=specs, leaf_metrics=leaf_metrics,
                             dtype=dt)
      norm = norm.astype(dt)
      invalid = _checks.any_of(invalid_fn(), _invalid_cap(max_norm))
      act = action(norm, nonfinite, invalid)
      limit, reported, stats = policy(state, norm)
      limit = _cap(limit, max_norm)
      scale, over = scale_for(norm, limit)
      treedef = jax.tree_util.tree_structure(updates)
      out = treedef.unflatten([act.apply(g, scale) for g in float_leaves(updates, kind)])
      ok = ~(act.bad if invalid is None else act.bad | invalid)
      old = {k: getattr(state, k) for k in stats}
      new_state = state_cls(
          *record(state, norm, act.recorded(scale), act.clipped(over), act.bad, invalid),
          jnp.where(ok, _cap(reported, max_norm), state.threshold).astype(dt),
          add_count(state.observed, ok.astype(jnp.int32)),
          **_keep_if(ok, stats, old),
          leaf_norms=leaves,
      )
      return out, new_state

  return named(optax.GradientTransformation(init_fn, update_fn), kind, name)


def zclip(
    *,
    alpha: ArrayLike = 0.97,
    z_threshold: ArrayLike = 2.5,
    warmup_steps: ArrayLike = 25,
    max_norm: ArrayLike = 1.0,
    mode: ZClipMode = "reciprocal",
    warmup_stats: WarmupStats = "robust",
    axis_name: AxisName = None,
    specs: Specs = None,
    nonfinite: Nonfinite = "zero",
    name: str | None = None,
    leaf_metrics: bool = False,
) -> optax.GradientTransformation:
  r"""ZClip: clips global-norm spikes detected by a z-score against EMAs of the norm.

  With :math:`g_t` the global norm, after warm-up

  .. math::
    z_t = \frac{g_t - \mu_{t-1}}{\sigma_{t-1} + \epsilon},\qquad
    c_t = \begin{cases}
      \mu_{t-1} + z_{thr}^2\,\sigma_{t-1} / z_t & \text{"reciprocal"} \\
      \mu_{t-1} & \text{"mean"} \\
      \mu_{t-1} + z_{thr}\,\sigma_{t-1} & \text{"zscore"}
    \end{cases}\ \text{if } z_t > z_{thr},\ \text{else } c_t = g_t,

  the update is scaled by :math:`\min(1, \min(c_t, \text{max\_norm}) / g_t)` and the EMAs see
  the clipped norm :math:`c_t`:

  .. math::
    \mu_t = \alpha\mu_{t-1} + (1-\alpha)c_t,\qquad
    \sigma^2_t = \alpha\sigma^2_{t-1} + (1-\alpha)(c_t - \mu_t)^2

  (:math:`\epsilon = 10^{-6}`). During warm-up (the first ``warmup_steps`` finite norms) the
  update is clipped at ``max_norm`` only and :math:`\mu, \sigma` are initialised to the
  median and ``1.4826 * MAD`` of those norms (``warmup_stats="robust"``, the default): one bad
  step in warm-up (a 1e30 norm) moves neither, where the reference's mean and variance
  (``warmup_stats="mean"``) would be ruined by it and clip nothing afterwards. A NaN/Inf norm
  zeroes the update (``nonfinite="zero"``), is counted, and never enters the statistics. A
  traced hyperparameter that is NaN or out of range zeroes the update, is counted in
  ``invalid_count`` and leaves the statistics as they were.

  Args:
    alpha: EMA factor in (0, 1).
    z_threshold: z-score above which a norm is a spike (> 0).
    warmup_steps: number of finite norms used to initialise the statistics (integer >= 1).
    max_norm: absolute cap on the threshold (>= 0), also the fixed threshold during warm-up;
      ``None`` or ``inf`` for no cap.
    mode: ``"reciprocal"`` (default, the paper's choice), ``"mean"`` or ``"zscore"``.
    warmup_stats: ``"robust"`` (default): median and MAD of the warm-up norms; ``"mean"``: their
      mean and population variance, as the reference does.
    axis_name: inside ``shard_map``/``pmap`` with sharded gradients, the axis to all-reduce the
      norm over; the statistics are then identical on every device.
    specs: inside ``shard_map``, instead of ``axis_name``: the updates' ``PartitionSpec`` s (the
      ``in_specs`` pytree) or ``"varying"`` (read from the arrays' types); each leaf is summed
      over exactly the mesh axes it is split over (see :func:`clipax.global_norm`).
    nonfinite: ``"zero"`` (default) or ``"propagate"`` (passed through, still counted and kept
      out of the statistics).
    name: the name of its keys in :func:`clipax.metrics`; default: its ``named_chain`` key,
      else ``zclip``.
    leaf_metrics: also keep every leaf's pre-clip norm (``clip/{name}/leaf_norm/<path>``),
      computed in the same pass as the global norm.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`clipax.ZClipState`;
    :func:`clipax.metrics` reports its ``threshold`` too.

  Raises:
    ValueError: for an out-of-range python number, a non-integer ``warmup_steps``, or an unknown
      ``mode`` or ``nonfinite``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import clipax
    >>> tx = clipax.zclip(warmup_steps=4, max_norm=None)
    >>> state = tx.init(None)
    >>> update = jax.jit(tx.update)
    >>> for n in [1.0, 1.2, 0.8, 1.0, 1.1, 10.0]:
    ...   out, state = update({"w": jnp.array([n])}, state)
    >>> print(f"{state.norm:.2f} -> {out['w'][0]:.3f}, threshold {state.threshold:.3f}")
    10.00 -> 1.018, threshold 1.370

  References:
    Kumar, Owen, Ashraf, Sterbenz, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training",
    2025, https://arxiv.org/abs/2504.02507 (reference code: bluorion-com/ZClip)
  """
  _checks.number("alpha", alpha, low=0.0, low_open=True, high=1.0)
  _checks.number("z_threshold", z_threshold, low=0.0, low_open=True)
  _checks.number("warmup_steps", warmup_steps, low=1, integer=True)
  _check_max_norm(max_norm)
  _checks.choice("mode", mode, get_args(ZClipMode))
  _checks.choice("warmup_stats", warmup_stats, get_args(WarmupStats))
  _checks.nonfinite(nonfinite)
  _checks.axis_name(axis_name)
  check_specs(specs, axis_name)
  size = static_int("warmup_steps", warmup_steps)

  def init_stats(dt):
    zero = jnp.zeros([], dt)
    buffer = jnp.zeros([_known_size("warmup_steps", size)], dt)
    return {"mu": zero, "var": zero, "warmup_norms": buffer}

  def policy(state, norm):
    return _zclip_policy(
        state,
        norm,
        alpha=alpha,
        z_threshold=z_threshold,
        warmup_steps=warmup_steps,
        mode=mode,
        warmup_stats=warmup_stats,
    )

  def invalid():
    return _checks.any_of(
        _checks.invalid(alpha, low=0.0, low_open=True, high=1.0),
        _checks.invalid(z_threshold, low=0.0, low_open=True),
        _checks.invalid(warmup_steps, low=1),
    )

  return _global_clipper(
      "zclip", ZClipState, init_stats, policy, invalid, max_norm, axis_name, nonfinite, name,
      leaf_metrics, specs,
  )
