"""SPAM: Adam with spike-aware element-wise clipping and periodic momentum resets.

SPAM is an optimizer rather than a gradient transformation to chain: its clipping threshold is
its own second moment, and its momentum reset must reach into its own moments.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from clipax import _checks, _platform
from clipax._norms import global_norm
from clipax._spam_checks import _check_matches, _check_params, _check_real, _dtype
from clipax._state import _value, add_count, named, register_state, stat_dtype

_F32 = jnp.float32

# As in the reference (`grad_accu_steps`): spike clipping starts this many steps after the start
# and after each momentum reset, once the second moment holds something to compare against
# (with v = 0 every element would be a "spike" clipped to zero).
_CLIP_DELAY = 20

# The reference's cosine warm-up starts from 1 - 0.99 of the update after each reset.
_WARMUP_FLOOR = 0.01

# Length of the ring buffer of recent global norms whose median bounds the gradient while
# spike clipping is off (clipax's addition, see :func:`spam`).
_HISTORY = 20


@register_state
class SpamState(NamedTuple):
  """State of :func:`clipax.spam`.

  Attributes:
    count: int32, number of Adam steps taken (saturates); skipped steps do not count.
    mu: first moment, a pytree like the parameters (float32, or wider for float64 leaves; a
      zero-size parameter gets a 0-d placeholder, never a zero-size array).
    nu: second moment, same structure and dtypes as ``mu``.
    spikes: int32, number of gradient elements clipped as spikes on the last step.
    norm: global norm of the last gradient (before any bound or clipping), in
      ``stat_dtype()``.
    nonfinite_count: int32, steps skipped because the gradient was NaN/Inf or its (bounded)
      norm's square would overflow the moments (saturates; see :func:`spam`, "Skipped steps").
    spike_count: int32, total gradient elements clipped as spikes (saturates).
    bounded_count: int32, steps whose global norm was bounded while spike clipping was off
      (saturates).
    invalid_count: int32, updates zeroed because a traced hyperparameter was NaN or out of its
      range (saturates).
    since_reset: int32, Adam steps since the last momentum reset, modulo ``reset_interval``:
      the reset schedule's own position, which keeps turning after ``count`` saturates.
    history: the last finite global norms (after the bound), a ring buffer of 20, in
      ``stat_dtype()``.
    cursor: int32, the next write position in ``history`` (modulo its length).
    filled: int32, how many entries of ``history`` hold a norm (at most its length).
    tag: uint8, the transformation's kind and ``name=`` as UTF-8 (``b"zclip/"``), so that
      :func:`clipax.metrics` names the state also in its dict forms; set by the transformation.
  """

  count: jax.Array  # type: ignore[assignment]  # a field, shadows tuple.count
  mu: Any
  nu: Any
  spikes: jax.Array
  norm: jax.Array
  nonfinite_count: jax.Array
  spike_count: jax.Array
  bounded_count: jax.Array
  invalid_count: jax.Array
  since_reset: jax.Array
  history: jax.Array
  cursor: jax.Array
  filled: jax.Array
  tag: Any = ()

  def clipax_metrics(self) -> dict[str, jax.Array]:
    nonfinite, invalid = _value(self.nonfinite_count), _value(self.invalid_count)
    return {
        "norm": _value(self.norm),
        "spikes": _value(self.spikes),
        "spike_count": _value(self.spike_count),
        "bounded_count": _value(self.bounded_count),
        "nonfinite_count": nonfinite,
        "invalid_count": invalid,
        # updates seen, skipped ones included (``count`` itself is Adam's step, which skips)
        "count": add_count(add_count(_value(self.count), nonfinite), invalid),
    }


def _moment_dtype(dtype: jnp.dtype) -> jnp.dtype:
  """float32 moments for float32 and narrower leaves, float64 for float64 leaves."""
  return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(_F32)


def _complement(b: Any) -> jax.Array:
  """``1 - b`` in float32, computed in python float64 for a python ``b`` (float32 cannot hold
  0.999 exactly: ``1 - float32(0.999)`` is off by 1.3e-5 relative)."""
  if isinstance(b, (int, float)):
    return jnp.asarray(1.0 - b, _F32)
  return 1 - jnp.asarray(b, _F32)


def _bias_correction(one_minus_b: jax.Array, t: jax.Array) -> jax.Array:
  """``1 - b**t`` without cancellation: ``-expm1(t * log1p(-(1 - b)))``."""
  return -jnp.expm1(t * jnp.log1p(-one_minus_b))


def _ramp(since: jax.Array, after_reset: jax.Array, warmup_steps: Any) -> jax.Array:
  """The cosine ramp at ``since`` steps after a reset (1 where there is none)."""
  ramping = after_reset & (since < warmup_steps)
  w = jnp.asarray(warmup_steps, _F32)
  cosine = (1 + jnp.cos(math.pi * since.astype(_F32) / (w + 1))) / 2
  return jnp.where(ramping, 1 - (1 - _WARMUP_FLOOR) * cosine, jnp.ones([], _F32))


def warmup_scale(step: jax.Array, reset_interval: Any, warmup_steps: Any) -> jax.Array:
  """The factor on the update at 1-indexed ``step``: a cosine ramp after each momentum reset.

  With ``c`` the number of steps since the last reset (resets happen at steps
  ``reset_interval, 2 * reset_interval, ...``; before the first one there is no ramp) and
  ``W = warmup_steps``: ``1 - 0.99 * (1 + cos(pi * c / (W + 1))) / 2`` for ``c < W``, else 1.
  """
  step = jnp.asarray(step, jnp.int32)
  return _ramp(step % reset_interval, step >= reset_interval, warmup_steps)


def _median(history: jax.Array, filled: jax.Array) -> jax.Array:
  """The median of the first ``filled`` entries (+inf when there are none)."""
  valid = jnp.arange(history.shape[0]) < filled
  s = jnp.sort(jnp.where(valid, history, jnp.inf))
  lo = s[jnp.maximum(filled - 1, 0) // 2]
  hi = s[filled // 2]
  return jnp.where(filled > 0, lo + (hi - lo) / 2, jnp.inf)


def _cap(dtype: jnp.dtype) -> float:
  """The cap on the spike bound ``theta * v``: a quarter of the moment dtype's largest value, so
  that a clipped element's square stays finite (``sqrt`` rounding included) and spike clipping
  never makes a step overflow the moments (see :func:`spam`, "Skipped steps")."""
  return float(jnp.finfo(dtype).max) / 4


# A count summed in float32 is exact while every partial sum stays below 2**24.
_EXACT_F32 = 1 << 24


def _count(mask: jax.Array) -> jax.Array:
  """The number of True elements of ``mask``, int32, exactly, summed in float32 (see
  :func:`_spike_count`): exact because no partial sum exceeds the leaf's size. A leaf of more
  than 2**24 elements is summed along its last axis in float32 first, the row counts then in
  int32 (or, when even its rows are that long, in int32 only).
  """
  if mask.size <= _EXACT_F32:
    return jnp.sum(mask, dtype=jnp.float32).astype(jnp.int32)
  if mask.ndim >= 2 and mask.shape[-1] <= _EXACT_F32:
    rows = jnp.sum(mask, axis=-1, dtype=jnp.float32).astype(jnp.int32)
    return jnp.sum(rows, dtype=jnp.int32)
  return jnp.sum(mask, dtype=jnp.int32)


def _spike_count(masks: list[jax.Array]) -> jax.Array:
  """The number of True elements in ``masks``, int32. The TPU fuses a float32 sum into the
  kernel that computes a mask (the moment update), where an int32 sum is a kernel of its own
  that reads every gradient a third time, so there each mask is counted by :func:`_count`;
  elsewhere in int32 (on an H100 sharded over 8 devices the float32 sums cost 60 kernels more)."""
  def total(count):
    return sum((count(m) for m in masks), jnp.zeros([], jnp.int32))

  int32 = lambda: total(lambda m: jnp.sum(m, dtype=jnp.int32))  # noqa: E731
  return _platform._by_platform(int32, lambda: total(_count), int32)


def _overflows(grads: list, raw: jax.Array, scale: jax.Array) -> jax.Array:
  """True when an element of the gradient scaled by ``scale`` could square to inf in its moment
  dtype, decided from norms alone, before the element-wise pass.

  The global norm ``raw`` bounds every element (a rounded sum of squares never drops below its
  largest term), so ``(raw * scale)**2`` finite means no square overflows. Leaves whose moments
  are narrower than the norm (float32 leaves next to float64 ones under x64) use their own peak
  instead, so a large float64 leaf does not skip the step for them.
  """
  groups: dict[Any, list] = {}
  for g in grads:
    g = jnp.asarray(g)
    if g.size:
      groups.setdefault(_moment_dtype(g.dtype), []).append(g)
  out = jnp.zeros([], jnp.bool_)
  for dt, leaves in groups.items():
    peak = raw if dt == raw.dtype else global_norm(leaves, ord=math.inf)
    top = peak.astype(dt) * scale.astype(dt)
    out = out | ~jnp.isfinite(top * top)
  return out


def spam(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-6,
    theta: ArrayLike = 5000.0,
    reset_interval: ArrayLike = 500,
    warmup_steps: ArrayLike = 150,
    weight_decay: ArrayLike = 0.0,
    name: str | None = None,
) -> optax.GradientTransformation:
  r"""SPAM: Adam with spike-aware clipping, momentum resets and a warm-up after each reset.

  At 1-indexed step :math:`t`, element-wise on each leaf:

  .. math::
    \tilde g = \begin{cases} \operatorname{sign}(g)\sqrt{\theta\,v_{t-1}} &
      g^2 > \theta\,v_{t-1} \\ g & \text{otherwise} \end{cases}\qquad
    m_t = \beta_1 m_{t-1} + (1-\beta_1)\tilde g,\quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2)\tilde g^2

  .. math::
    u_t = -\eta_t\,s_t\,\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,\frac{m_t}{\sqrt{v_t}+\epsilon}
      \;-\; \eta_t\lambda\,(p + u^{adam}_t)

  The moments are reset to zero at the start of steps ``reset_interval, 2 * reset_interval,
  ...`` (bias correction keeps counting from the first step, as in the reference), and
  :math:`s_t` ramps the update back up with a cosine over ``warmup_steps`` steps after each
  reset (see :func:`warmup_scale`). Spike clipping is off for the first 20 steps after the start
  and after each reset, while :math:`v` is still near zero. Weight decay is decoupled and
  applied to the parameters after the Adam step, as the reference's ``p -= lr * wd * p`` does.
  The reset schedule keeps its own position (``since_reset``), so resets go on after the step
  count saturates at 2**31 - 1.

  **Robust warm-up (a deliberate difference from the reference, which has no such bound).**
  While spike clipping is off (the first 20 steps and the 20 after each reset) and
  :math:`\theta > 0`, the gradient's global norm is bounded by
  :math:`\sqrt{\theta}\cdot\operatorname{median}` of the last 20 finite global norms: a larger
  gradient is scaled down to that norm (counted in ``bounded_count``), so one spike cannot fill
  :math:`v` while nothing clips it. The norms sit in a ring buffer that survives the resets; every
  accepted step adds its norm capped at the same bound (outside these periods too), so a spike
  enters the median bounded. Before any norm is known (empty buffer, or a median of 0) there is
  no bound, and a gradient whose norm's square would overflow is skipped (below).

  **Skipped steps.** A gradient with a NaN or Inf element, or, while spike clipping is off,
  whose global norm after the bound, squared, would overflow the moment dtype (float32: a
  norm above 1.8e19; float32 leaves next to float64 ones under x64 use their largest element
  instead), skips the step: zero update; moments, step count, reset position and norm buffer
  unchanged; counted in ``nonfinite_count``. The decision is taken from the norm before the
  element-wise pass, which therefore reads each gradient once, fused with the moment update.
  While spike clipping is on, the clip bound :math:`\theta v` is capped at a quarter of the
  moment dtype's largest value (8.5e37 in float32), so a clipped square never overflows and
  spike clipping never skips a step. The moments therefore always stay finite.

  **Traced hyperparameters** (``optax.inject_hyperparams`` under ``jit``, or a schedule): a
  NaN, Inf or out-of-range ``learning_rate``, ``b1``, ``b2``, ``eps``, ``theta``,
  ``weight_decay``, ``reset_interval`` or ``warmup_steps`` zeroes the update, leaves the state
  unchanged and is counted in ``invalid_count``.

  Args:
    learning_rate: :math:`\eta`, a number >= 0 or an ``optax`` schedule of the step count.
    b1: first-moment decay in [0, 1).
    b2: second-moment decay in [0, 1).
    eps: added to :math:`\sqrt{v}` (> 0; 1e-6 as in the reference code).
    theta: spike threshold :math:`\theta` >= 0 on :math:`g^2 / v`; 0 turns spike clipping and
      the warm-up bound off.
    reset_interval: steps between momentum resets (integer in [1, 2**31 - 1]).
    warmup_steps: length of the cosine ramp after each reset (integer in [0, 2**31 - 1]).
    weight_decay: decoupled weight decay :math:`\lambda` >= 0; needs ``params`` unless 0.
    name: the name of its keys in :func:`clipax.metrics`; default: its ``named_chain`` key,
      else ``spam``.

  Returns:
    An ``optax.GradientTransformation`` (an optimizer: its updates are added to the
    parameters) whose state is a :class:`clipax.SpamState`; :func:`clipax.metrics` reports its
    ``norm``, ``spikes``, ``spike_count``, ``bounded_count``, ``nonfinite_count``,
    ``invalid_count`` and ``count`` (updates seen, skipped ones included).

  Raises:
    ValueError: for an out-of-range python number (or concrete array) or non-integer step
      count; at ``update`` when ``weight_decay`` is not 0 and ``params`` is missing, or when the
      gradients' structure or shapes differ from the state's.
    TypeError: at ``init`` or ``update`` for a complex (or integer) leaf, naming its path.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import clipax
    >>> tx = clipax.spam(0.1)
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> state = tx.init(params)
    >>> updates, state = jax.jit(tx.update)({"w": jnp.array([0.5, -3.0])}, state, params)
    >>> print([f"{u:.4f}" for u in updates["w"].tolist()])
    ['-0.1000', '0.1000']
    >>> _, state = jax.jit(tx.update)({"w": jnp.array([1e30, 1.0])}, state, params)
    >>> int(state.bounded_count), bool(jnp.isfinite(state.nu["w"]).all())
    (1, True)

  References:
    Huang, Zhu, Jin, Liu, Wang, Liu, "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
    Training", ICLR 2025, https://arxiv.org/abs/2501.06842 (reference code:
    TianjinYellow/SPAM-Optimizer, ``galore_torch/SPAM.py``)
  """
  if not callable(learning_rate):
    _checks.number("learning_rate", learning_rate, low=0.0)
  _checks.number("b1", b1, low=0.0, high=1.0)
  _checks.number("b2", b2, low=0.0, high=1.0)
  _checks.number("eps", eps, low=0.0, low_open=True)
  _checks.number("theta", theta, low=0.0)
  _checks.number("reset_interval", reset_interval, low=1, integer=True)
  _checks.number("warmup_steps", warmup_steps, low=0, integer=True)
  _checks.number("weight_decay", weight_decay, low=0.0)

  def init_fn(params):
    _check_real(params, "parameter")

    def zeros(p):
      shape = jnp.shape(p)
      dtype = _moment_dtype(_dtype(p))
      return jnp.zeros(shape if math.prod(shape) else (), dtype)

    zero, stat = jnp.zeros([], jnp.int32), stat_dtype()
    return SpamState(
        count=zero,
        mu=jax.tree_util.tree_map(zeros, params),
        nu=jax.tree_util.tree_map(zeros, params),
        spikes=zero,
        norm=jnp.zeros([], stat),
        nonfinite_count=zero,
        spike_count=zero,
        bounded_count=zero,
        invalid_count=zero,
        since_reset=zero,
        history=jnp.zeros([_HISTORY], stat),
        cursor=zero,
        filled=zero,
    )

  def update_fn(updates, state, params=None):
    no_decay = isinstance(weight_decay, (int, float)) and weight_decay == 0
    if params is None and not no_decay:
      raise ValueError("spam with `weight_decay` needs `params`: update(grads, state, params)")
    _check_real(updates, "gradient")
    if params is not None:
      _check_real(params, "parameter")
    treedef, grads, mus, nus = _check_matches(updates, state)
    if params is not None and not no_decay:
      _check_params(params, updates)
    with jax.named_scope("clipax/spam"):
      return _step(treedef, grads, mus, nus, state, params, no_decay)

  def _step(treedef, grads, mus, nus, state, params, no_decay):
    stat = stat_dtype()
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    invalid = _checks.any_of(
        _checks.invalid(lr, low=0.0),
        _checks.invalid(b1, low=0.0, high=1.0),
        _checks.invalid(b2, low=0.0, high=1.0),
        _checks.invalid(eps, low=0.0, low_open=True),
        _checks.invalid(theta, low=0.0),
        _checks.invalid(weight_decay, low=0.0),
        _checks.invalid(reset_interval, low=1.0, high=_checks.INT_MAX, high_open=False),
        _checks.invalid(warmup_steps, low=0.0, high=_checks.INT_MAX, high_open=False),
    )
    invalid = jnp.zeros([], jnp.bool_) if invalid is None else invalid
    lr = jnp.asarray(lr, _F32)
    c1, c2 = _complement(b1), _complement(b2)
    theta_ = jnp.asarray(theta, stat)
    interval = jnp.maximum(jnp.asarray(reset_interval, jnp.int32), 1)

    step = optax.safe_increment(state.count)
    since = optax.safe_increment(state.since_reset) % interval
    reset = since == 0
    clip_on = (step >= _CLIP_DELAY) & (since >= _CLIP_DELAY) & (theta_ > 0)
    t = step.astype(_F32)
    step_size = lr * jnp.sqrt(_bias_correction(c2, t)) / _bias_correction(c1, t)
    step_size = step_size * _ramp(since, step >= interval, warmup_steps)

    # The robust bound while spike clipping is off: sqrt(theta) times the median recent norm.
    raw = global_norm(treedef.unflatten(grads))
    norm = raw.astype(stat)
    median = _median(state.history, state.filled)
    known = (median > 0) & (theta_ > 0)
    bound = jnp.where(known, jnp.sqrt(theta_) * median, jnp.inf)
    bounded = ~clip_on & (norm > bound)
    scale = jnp.where(bounded, bound / norm, jnp.ones([], stat))
    # Everything that decides the step is known here, before the element-wise pass, so that
    # pass reads each gradient once and fuses into the moment update (see _overflows).
    overflow = ~clip_on & _overflows(grads, raw, scale)
    bad = ~jnp.isfinite(norm) | overflow | invalid

    def moments(g, m, v):
      dt = m.dtype
      g = g.astype(dt) * scale.astype(dt)
      m = jnp.where(reset, jnp.zeros([], dt), m)
      v = jnp.where(reset, jnp.zeros([], dt), v)
      bound2 = jnp.minimum(theta_.astype(dt) * v, jnp.asarray(_cap(dt), dt))
      spike = clip_on & (g * g > bound2)
      g = jnp.where(spike, jnp.sign(g) * jnp.sqrt(bound2), g)
      m_new = m + c1.astype(dt) * (g - m)
      v_new = v + c2.astype(dt) * (g * g - v)
      u = -(step_size.astype(dt) * m_new / (jnp.sqrt(v_new) + jnp.asarray(eps, dt)))
      return m_new, v_new, u, spike

    leaves = treedef.flatten_up_to(params) if params is not None else [None] * len(grads)
    wd = None if no_decay else lr * jnp.asarray(weight_decay, _F32)
    new_mu, new_nu, outs, masks = [], [], [], []
    for g, m, v, p in zip(grads, mus, nus, leaves, strict=True):
      g = jnp.asarray(g)
      if g.size == 0:  # nothing to update; the state holds a 0-d placeholder
        new_mu.append(m)
        new_nu.append(v)
        outs.append(jnp.zeros(g.shape, g.dtype))
        continue
      m_new, v_new, u, spike = moments(g, m, v)
      if wd is not None:
        u = u - wd.astype(u.dtype) * (jnp.asarray(p).astype(u.dtype) + u)
      new_mu.append(jnp.where(bad, m, m_new))
      new_nu.append(jnp.where(bad, v, v_new))
      outs.append(jnp.where(bad, jnp.zeros([], g.dtype), u.astype(g.dtype)))
      masks.append(spike)
    spikes = _spike_count(masks)

    skip = bad & ~invalid
    keep = lambda new, old: jnp.where(bad, old, new)  # noqa: E731
    taken = ~bad
    spikes = jnp.where(taken, spikes, 0)
    recorded = jnp.minimum(norm, bound)
    return treedef.unflatten(outs), SpamState(
        count=keep(step, state.count),
        mu=treedef.unflatten(new_mu),
        nu=treedef.unflatten(new_nu),
        spikes=spikes,
        norm=norm,
        nonfinite_count=add_count(state.nonfinite_count, skip),
        spike_count=add_count(state.spike_count, spikes),
        bounded_count=add_count(state.bounded_count, taken & bounded),
        invalid_count=add_count(state.invalid_count, invalid),
        since_reset=keep(since, state.since_reset),
        history=keep(state.history.at[state.cursor].set(recorded), state.history),
        cursor=keep((state.cursor + 1) % _HISTORY, state.cursor),
        filled=keep(jnp.minimum(state.filled + 1, _HISTORY), state.filled),
    )

  return named(optax.GradientTransformation(init_fn, update_fn), "spam", name)
