"""Thresholds learned from the norm history: ZClip, AutoClip and AdaGC.

Each clipper is ``measure -> threshold -> act -> record`` like the fixed clippers, with the
threshold coming from a *policy*: one small pure function per method that maps the statistics
and this step's norm to a clip value and the next statistics. The pieces shared by all three:

* one warm-up rule (:func:`warming_up`): the first ``warmup_steps`` *finite* norms fill the
  statistics while a fixed threshold applies;
* statistics are only ever updated with a finite norm: a NaN/Inf step zeroes the update
  (``nonfinite="zero"``), is counted, and leaves every statistic as it was;
* an optional absolute cap ``max_norm`` on top of the learned threshold;
* the state extends :class:`~clipax.ClipState` (same leading fields, so
  :func:`clipax.metrics` reads it) with ``threshold`` and the method's statistics.

Everything is computed from the global norm (all-reduced once with ``axis_name``), so the state
is identical on every device of a ``shard_map``/``pmap``.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clipax import _checks
from clipax._checks import Nonfinite
from clipax._clipping import combine_norms, rescale, scale_for
from clipax._norms import AxisName, _leafwise, float_leaves, global_norm
from clipax._state import _value, clip_state_metrics, init_clip_state, record

ZClipMode = Literal["reciprocal", "mean", "zscore"]

# The reference ZClip adds this to the standard deviation before dividing by it.
_ZCLIP_EPS = 1e-6

_F32 = jnp.float32


def _threshold_metrics(state: Any) -> dict[str, jax.Array]:
  return {**clip_state_metrics(state), "threshold": _value(state.threshold)}


class ZClipState(NamedTuple):
  """State of :func:`clipax.zclip`.

  Attributes:
    count: int32, number of updates seen (saturates).
    norm: float32, pre-clip global norm of the last update.
    scale: float32, factor applied to the last update (0 when it was zeroed as non-finite).
    clipped: bool, whether the last update was clipped.
    clipped_count: int32, number of clipped updates.
    nonfinite_count: int32, number of updates whose norm was NaN or Inf.
    threshold: float32, the norm above which the last update would have been clipped: the
      z-score boundary ``mu + z_threshold * (sigma + eps)`` after warm-up, capped by
      ``max_norm``; ``max_norm`` during warm-up (``inf`` without a cap).
    mu: float32, EMA of the (clipped) norm; the running mean during warm-up.
    var: float32, EMA of the squared deviation; the running (population) variance during warm-up.
  """

  count: jax.Array
  norm: jax.Array
  scale: jax.Array
  clipped: jax.Array
  clipped_count: jax.Array
  nonfinite_count: jax.Array
  threshold: jax.Array
  mu: jax.Array
  var: jax.Array

  def clipax_metrics(self) -> dict[str, jax.Array]:
    return _threshold_metrics(self)


class AutoClipState(NamedTuple):
  """State of :func:`clipax.autoclip`.

  Attributes:
    count: int32, number of updates seen (saturates).
    norm: float32, pre-clip global norm of the last update.
    scale: float32, factor applied to the last update.
    clipped: bool, whether the last update was clipped.
    clipped_count: int32, number of clipped updates.
    nonfinite_count: int32, number of updates whose norm was NaN or Inf.
    threshold: float32, the clip value used for the last update (the percentile, capped by
      ``max_norm``; ``inf`` while the history is empty and there is no cap).
    history: float32 ``[history]``, ring buffer of the last finite pre-clip norms; slot
      ``i % history`` holds the ``i``-th finite norm.
  """

  count: jax.Array
  norm: jax.Array
  scale: jax.Array
  clipped: jax.Array
  clipped_count: jax.Array
  nonfinite_count: jax.Array
  threshold: jax.Array
  history: jax.Array

  def clipax_metrics(self) -> dict[str, jax.Array]:
    return _threshold_metrics(self)


class AdaGCState(NamedTuple):
  """State of :func:`clipax.adagc`.

  Attributes:
    count: int32, number of updates seen (saturates).
    norm: float32, pre-clip global norm of the last update.
    scale: float32, the smallest factor applied to any leaf of the last update.
    clipped: bool, whether any leaf of the last update was clipped.
    clipped_count: int32, number of updates with at least one clipped leaf.
    nonfinite_count: int32, number of updates whose norm was NaN or Inf.
    threshold: float32, the global norm the last update was bounded by: ``warmup_max_norm``
      during warm-up, afterwards the L2 norm of the per-leaf thresholds
      ``sqrt(sum_i (ratio * gamma_i)^2)``; capped by ``max_norm``.
    gamma: a pytree with the structure of the parameters holding, per leaf, a float32 EMA of that
      leaf's clipped norm (its running minimum during warm-up).
  """

  count: jax.Array
  norm: jax.Array
  scale: jax.Array
  clipped: jax.Array
  clipped_count: jax.Array
  nonfinite_count: jax.Array
  threshold: jax.Array
  gamma: Any

  def clipax_metrics(self) -> dict[str, jax.Array]:
    return _threshold_metrics(self)


def observed_norms(state: Any) -> jax.Array:
  """Number of finite norms a clipper state has absorbed into its statistics."""
  return state.count - state.nonfinite_count


def warming_up(state: Any, warmup_steps: Any) -> jax.Array:
  """The warm-up rule shared by every adaptive clipper.

  The step is a warm-up step while fewer than ``warmup_steps`` finite norms have been seen
  *before* it: the first ``warmup_steps`` finite norms fill the statistics under a fixed
  threshold and the learned threshold applies from the next one on. Non-finite steps do not
  count, so a NaN in warm-up does not shorten it.
  """
  return observed_norms(state) < warmup_steps


def _cap(limit: jax.Array, max_norm: Any) -> jax.Array:
  if max_norm is None:
    return limit
  return jnp.minimum(limit, jnp.maximum(jnp.asarray(max_norm, _F32), 0))


def _keep_if(finite: jax.Array, new: Any, old: Any) -> Any:
  return jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o).astype(o.dtype), new, old)


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


# ----------------------------------------------------------------------------- policies
# A policy maps (state, norm) -> (clip value, reported threshold, next statistics). The clip
# value is ``inf`` when this step is not clipped by the learned rule; the caller applies the
# ``max_norm`` cap, acts, and keeps the statistics only when the norm is finite.


def _zclip_policy(state: ZClipState, norm: jax.Array, *, alpha, z_threshold, warmup_steps, mode):
  alpha = jnp.asarray(alpha, _F32)
  z_thr = jnp.asarray(z_threshold, _F32)
  warm = warming_up(state, warmup_steps)

  # Warm-up: Welford's running mean and population variance of the raw norms.
  n = (observed_norms(state) + 1).astype(_F32)
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
  var_e = alpha * state.var + (1 - alpha) * jnp.square(effective - mu_e)

  inf = jnp.asarray(jnp.inf, _F32)
  limit = jnp.where(warm | ~spike, inf, clip_value)
  reported = jnp.where(warm, inf, state.mu + z_thr * (std + _ZCLIP_EPS))
  stats = {"mu": jnp.where(warm, mu_w, mu_e), "var": jnp.where(warm, var_w, var_e)}
  return limit, reported, stats


def _percentile(values: jax.Array, n: jax.Array, q: jax.Array) -> jax.Array:
  """``np.percentile(values[:n], q)`` (linear interpolation) for a traced ``n``; inf if n == 0."""
  size = values.shape[0]
  valid = jnp.arange(size) < n
  ordered = jnp.sort(jnp.where(valid, values, jnp.inf))
  last = jnp.maximum(n - 1, 0)
  pos = q * last.astype(_F32) / 100
  lo = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, last)
  hi = jnp.minimum(lo + 1, last)
  frac = pos - lo.astype(_F32)
  a, b = ordered[lo], ordered[hi]
  value = jnp.where(frac > 0, a + (b - a) * frac, a)
  return jnp.where(n > 0, value, jnp.inf)


def _autoclip_policy(state: AutoClipState, norm: jax.Array, *, percentile):
  size = state.history.shape[0]
  seen = observed_norms(state)
  finite = jnp.isfinite(norm)
  history = jnp.where(finite, state.history.at[seen % size].set(norm), state.history)
  n = jnp.minimum(seen + finite.astype(seen.dtype), size)
  q = jnp.clip(jnp.asarray(percentile, _F32), 0, 100)
  limit = _percentile(history, n, q)
  return limit, limit, {"history": history}


# ----------------------------------------------------------------------------- builders


def _global_clipper(name, state_cls, init_stats, policy, max_norm, axis_name, nonfinite):
  """A global-norm clipper whose threshold comes from ``policy``."""

  def init_fn(params):
    del params
    threshold = _cap(jnp.asarray(jnp.inf, _F32), max_norm)
    return state_cls(*init_clip_state(), threshold, **init_stats())

  def update_fn(updates, state, params=None):
    del params
    with jax.named_scope(f"clipax/{name}"):
      norm = global_norm(updates, axis_name=axis_name)
      norm32 = norm.astype(_F32)
      finite = jnp.isfinite(norm32)
      limit, reported, stats = policy(state, norm32)
      limit = _cap(limit, max_norm)
      scale, over = scale_for(norm32, limit)
      zero = ~finite if nonfinite == "zero" else None
      out = jax.tree_util.tree_map(lambda g: rescale(g, scale, zero), updates)
      applied = scale if zero is None else jnp.where(zero, 0, scale)
      old = {k: getattr(state, k) for k in stats}
      new_state = state_cls(
          *record(state, norm32, applied, over & finite, ~finite),
          _cap(reported, max_norm),
          **_keep_if(finite, stats, old),
      )
      return out, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def zclip(
    *,
    alpha: Any = 0.97,
    z_threshold: Any = 2.5,
    warmup_steps: Any = 25,
    max_norm: Any = 1.0,
    mode: ZClipMode = "reciprocal",
    axis_name: AxisName = None,
    nonfinite: Nonfinite = "zero",
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
  update is clipped at ``max_norm`` only and :math:`\mu, \sigma^2` are initialised to the mean
  and population variance of those norms, as the reference implementation does. A NaN/Inf norm
  zeroes the update (``nonfinite="zero"``), is counted, and never enters the statistics.

  Args:
    alpha: EMA factor in (0, 1).
    z_threshold: z-score above which a norm is a spike (> 0).
    warmup_steps: number of finite norms used to initialise the statistics (integer >= 1).
    max_norm: absolute cap on the threshold (>= 0), also the fixed threshold during warm-up;
      ``None`` for no cap.
    mode: ``"reciprocal"`` (default, the paper's choice), ``"mean"`` or ``"zscore"``.
    axis_name: inside ``shard_map``/``pmap`` with sharded gradients, the axis to all-reduce the
      norm over; the statistics are then identical on every device.
    nonfinite: ``"zero"`` (default) or ``"propagate"`` (passed through, still counted and kept
      out of the statistics).

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
    10.00 -> 1.017, threshold 1.354

  References:
    Kumar, Owen, Ashraf, Sterbenz, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training",
    2025, https://arxiv.org/abs/2504.02507 (reference code: bluorion-com/ZClip)
  """
  _checks.number("alpha", alpha, low=0.0, low_open=True, high=1.0)
  _checks.number("z_threshold", z_threshold, low=0.0, low_open=True)
  _checks.number("warmup_steps", warmup_steps, low=1, integer=True)
  _check_max_norm(max_norm)
  _checks.choice("mode", mode, get_args(ZClipMode))
  _checks.nonfinite(nonfinite)

  def init_stats():
    return {"mu": jnp.zeros([], _F32), "var": jnp.zeros([], _F32)}

  def policy(state, norm):
    return _zclip_policy(
        state, norm, alpha=alpha, z_threshold=z_threshold, warmup_steps=warmup_steps, mode=mode
    )

  return _global_clipper("zclip", ZClipState, init_stats, policy, max_norm, axis_name, nonfinite)


def autoclip(
    percentile: Any = 10.0,
    *,
    history: int = 1000,
    max_norm: Any = None,
    axis_name: AxisName = None,
    nonfinite: Nonfinite = "zero",
) -> optax.GradientTransformation:
  r"""AutoClip: clips to a percentile of the recent global norms, the current one included.

  .. math::
    c_t = \operatorname{percentile}_p\big(g_{t-h+1}, \dots, g_t\big),\qquad
    g \leftarrow g \cdot \min\Big(1, \frac{\min(c_t, \text{max\_norm})}{g_t}\Big)

  over the last :math:`h` = ``history`` finite norms (a ring buffer; the reference keeps all of
  them), with numpy's default linear interpolation. The history holds the pre-clip norms, as in
  the reference. A NaN/Inf norm zeroes the update (``nonfinite="zero"``), is counted, and is
  never written to the history.

  Args:
    percentile: ``p`` in [0, 100]; the paper's recommendation is 10.
    history: ring buffer length (an integer >= 1; under ``optax.inject_hyperparams`` the size is
      fixed by ``init`` and read off the state afterwards).
    max_norm: optional absolute cap on the threshold (>= 0); ``None`` (default) for no cap.
    axis_name: inside ``shard_map``/``pmap`` with sharded gradients, the axis to all-reduce the
      norm over.
    nonfinite: ``"zero"`` (default) or ``"propagate"``.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`clipax.AutoClipState`.

  Raises:
    ValueError: for a ``percentile`` outside [0, 100], a bad ``history``, ``max_norm`` or
      ``nonfinite``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import clipax
    >>> tx = clipax.autoclip(50.0, history=4)
    >>> state = tx.init(None)
    >>> for n in [1.0, 2.0, 3.0, 4.0, 100.0]:
    ...   out, state = jax.jit(tx.update)({"w": jnp.array([n])}, state)
    >>> print(f"{out['w'][0]:.2f} {state.threshold:.2f} {int(state.clipped_count)}")
    3.50 3.50 4

  References:
    Seetharaman, Wichern, Pardo, Le Roux, "AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks", 2020, https://arxiv.org/abs/2007.14469 (reference code:
    pseeth/autoclip)
  """
  _checks.number("percentile", percentile, low=0.0, high=100.0, high_open=False)
  size = static_int("history", history)
  _check_max_norm(max_norm)
  _checks.nonfinite(nonfinite)

  def init_stats():
    return {"history": jnp.zeros([_known_size("history", size)], _F32)}

  def policy(state, norm):
    return _autoclip_policy(state, norm, percentile=percentile)

  return _global_clipper(
      "autoclip", AutoClipState, init_stats, policy, max_norm, axis_name, nonfinite
  )


def _adagc_policy(state: AdaGCState, norms, global_n, *, ratio, beta, warmup_steps, warmup_max):
  """Per-leaf scales, over flags, reported threshold and the next ``gamma`` leaves."""
  beta = jnp.asarray(beta, _F32)
  ratio = jnp.asarray(ratio, _F32)
  warm = warming_up(state, warmup_steps)
  gammas = jax.tree_util.tree_leaves(state.gamma)
  warm_scale, warm_over = scale_for(global_n, warmup_max)
  limits = [ratio * gm for gm in gammas]
  scales, overs, new_gammas = [], [], []
  for n, gm, limit in zip(norms, gammas, limits, strict=True):
    # gamma == 0: nothing learned yet for this leaf (only zero gradients so far); it is not
    # clipped, and its first nonzero clipped norm starts the statistic.
    known = gm > 0
    local_scale, local_over = scale_for(n, jnp.where(known, limit, jnp.inf))
    s = jnp.where(warm, warm_scale, local_scale)
    clipped_norm = s * n
    running_min = jnp.where(known, jnp.minimum(gm, clipped_norm), clipped_norm)
    ema = jnp.where(known, beta * gm + (1 - beta) * clipped_norm, clipped_norm)
    scales.append(s)
    overs.append(jnp.where(warm, warm_over, local_over))
    new_gammas.append(jnp.where(warm, running_min, ema))
  local_threshold = combine_norms(limits, 2) if limits else jnp.zeros([], _F32)
  threshold = jnp.where(warm, jnp.asarray(warmup_max, _F32), local_threshold)
  return scales, overs, threshold, new_gammas


def adagc(
    *,
    ratio: Any = 1.04,
    beta: Any = 0.99,
    warmup_steps: Any = 100,
    warmup_max_norm: Any = 1.0,
    max_norm: Any = None,
    axis_name: AxisName = None,
    nonfinite: Nonfinite = "zero",
) -> optax.GradientTransformation:
  r"""AdaGC: clips each leaf relative to an EMA of that leaf's own clipped norm.

  With :math:`g_{t,i}` leaf :math:`i` of the update, after warm-up

  .. math::
    h_{t,i} = \min\Big(1, \frac{r\,\gamma_{t-1,i}}{\|g_{t,i}\|}\Big),\qquad
    \hat g_{t,i} = h_{t,i}\,g_{t,i},\qquad
    \gamma_{t,i} = \beta\gamma_{t-1,i} + (1-\beta)\|\hat g_{t,i}\|.

  During warm-up (the first ``warmup_steps`` finite norms) the whole update is clipped at the
  global threshold ``warmup_max_norm`` and :math:`\gamma_{t,i}` is the running minimum of the
  nonzero clipped leaf norms, :math:`\gamma_{t,i} = \min(\gamma_{t-1,i}, \|\hat g_{t,i}\|)`.
  The optional ``max_norm`` then bounds the global norm of the clipped update (the EMAs still
  see the per-leaf clipped norms). A NaN/Inf global norm zeroes the update
  (``nonfinite="zero"``), is counted, and never enters :math:`\gamma`.

  Follows the paper's Algorithm 1 (``warmup_steps`` here is the number of warm-up steps; the
  paper's :math:`T_{start}` is ``warmup_steps + 1``), with one deliberate difference: a leaf
  norm of exactly zero (an unused embedding, a frozen branch) carries no information and is not
  recorded, so :math:`\gamma` stays "unknown" (0) for that leaf, which then passes unclipped
  until its first nonzero norm starts the statistic. In the reference such a leaf gets
  :math:`\gamma = 0` and is clipped to zero for the rest of training.

  Args:
    ratio: the relative threshold :math:`r` > 0 (the paper's :math:`\lambda_{rel}`).
    beta: EMA factor in [0, 1).
    warmup_steps: number of warm-up steps (integer >= 1).
    warmup_max_norm: the global threshold during warm-up (>= 0; the paper's
      :math:`\lambda_{abs}`).
    max_norm: optional absolute cap on the global norm of the clipped update; ``None`` (default)
      for none.
    axis_name: inside ``shard_map``/``pmap`` with sharded gradients, the axis to all-reduce the
      leaf norms over (one vector collective per step).
    nonfinite: ``"zero"`` (default) or ``"propagate"``.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`clipax.AdaGCState`. ``init``
    needs the parameters (or any pytree with their structure): ``gamma`` has one entry per leaf.

  Raises:
    ValueError: for an out-of-range python number, a non-integer ``warmup_steps`` or an unknown
      ``nonfinite`` at construction; at ``update`` when the state was built without parameters
      or for a tree of another structure.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import clipax
    >>> params = {"a": jnp.zeros(1), "b": jnp.zeros(1)}
    >>> tx = clipax.adagc(warmup_steps=2, warmup_max_norm=10.0)
    >>> state = tx.init(params)
    >>> for a, b in [(1.0, 2.0), (1.0, 2.0), (50.0, 2.0)]:
    ...   out, state = jax.jit(tx.update)({"a": jnp.array([a]), "b": jnp.array([b])}, state)
    >>> print(f"{out['a'][0]:.2f} {out['b'][0]:.2f} {state.gamma['a']:.3f}")
    1.04 2.00 1.000

  References:
    Wang, Li, Chen, Zeng, Yang, Sun, Ma, Yu, Shen, "AdaGC: Improving Training Stability for
    Large Language Model Pretraining", 2025, https://arxiv.org/abs/2502.11034
  """
  _checks.number("ratio", ratio, low=0.0, low_open=True)
  _checks.number("beta", beta, low=0.0, high=1.0)
  _checks.number("warmup_steps", warmup_steps, low=1, integer=True)
  _checks.threshold("warmup_max_norm", warmup_max_norm)
  _check_max_norm(max_norm)
  _checks.nonfinite(nonfinite)

  def init_fn(params):
    gamma = jax.tree_util.tree_map(lambda _: jnp.zeros([], _F32), params)
    threshold = _cap(jnp.asarray(warmup_max_norm, _F32), max_norm)
    return AdaGCState(*init_clip_state(), threshold, gamma)

  def update_fn(updates, state, params=None):
    del params
    with jax.named_scope("clipax/adagc"):
      treedef = jax.tree_util.tree_structure(updates)
      if treedef != jax.tree_util.tree_structure(state.gamma):
        raise ValueError(
            "adagc: the updates do not have the structure the state was built with; build the "
            f"state with `init(params)` for these updates ({treedef} vs "
            f"{jax.tree_util.tree_structure(state.gamma)})"
        )
      leaves = float_leaves(updates, "adagc")
      norms = [n.astype(_F32) for n in _leafwise(leaves, 2, axis_name)]
      global_n = combine_norms(norms, 2).astype(_F32) if norms else jnp.zeros([], _F32)
      finite = jnp.isfinite(global_n)
      scales, overs, threshold, gammas = _adagc_policy(
          state,
          norms,
          global_n,
          ratio=ratio,
          beta=beta,
          warmup_steps=warmup_steps,
          warmup_max=warmup_max_norm,
      )
      any_over = jnp.any(jnp.stack(overs)) if overs else jnp.zeros([], jnp.bool_)
      if max_norm is not None:
        clipped_global = combine_norms([s * n for s, n in zip(scales, norms, strict=True)], 2)
        cap_scale, cap_over = scale_for(clipped_global.astype(_F32), max_norm)
        scales = [s * cap_scale for s in scales]
        any_over = any_over | cap_over
      zero = ~finite if nonfinite == "zero" else None
      out = treedef.unflatten([rescale(g, s, zero) for g, s in zip(leaves, scales, strict=True)])
      smallest = jnp.min(jnp.stack(scales)) if scales else jnp.ones([], _F32)
      applied = smallest if zero is None else jnp.where(zero, 0, smallest)
      old = jax.tree_util.tree_leaves(state.gamma)
      gamma = treedef.unflatten(_keep_if(finite, gammas, old))
      return out, AdaGCState(
          *record(state, global_n, applied, any_over & finite, ~finite),
          _cap(threshold, max_norm),
          gamma,
      )

  return optax.GradientTransformation(init_fn, update_fn)

