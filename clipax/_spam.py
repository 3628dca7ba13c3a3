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

from clipax import _checks
from clipax._norms import global_norm
from clipax._state import _value

_F32 = jnp.float32

# As in the reference (`grad_accu_steps`): spike clipping starts this many steps after the start
# and after each momentum reset, once the second moment holds something to compare against
# (with v = 0 every element would be a "spike" clipped to zero).
_CLIP_DELAY = 20

# The reference's cosine warm-up starts from 1 - 0.99 of the update after each reset.
_WARMUP_FLOOR = 0.01


class SpamState(NamedTuple):
  """State of :func:`clipax.spam`.

  Attributes:
    count: int32, number of Adam steps taken (saturates); skipped non-finite steps do not count.
    mu: first moment, a pytree like the parameters (float32, or wider for float64 leaves).
    nu: second moment, same structure and dtypes as ``mu``.
    spikes: int32, number of gradient elements clipped as spikes on the last step.
    norm: float32, global norm of the last gradient (before spike clipping).
    nonfinite_count: int32, number of steps skipped because the gradient norm was NaN or Inf.
  """

  count: jax.Array
  mu: Any
  nu: Any
  spikes: jax.Array
  norm: jax.Array
  nonfinite_count: jax.Array

  def clipax_metrics(self) -> dict[str, jax.Array]:
    return {
        "norm": _value(self.norm),
        "spikes": _value(self.spikes),
        "nonfinite_count": _value(self.nonfinite_count),
        # updates seen, skipped ones included (``count`` itself is Adam's step, which skips)
        "count": _value(self.count) + _value(self.nonfinite_count),
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


def warmup_scale(step: jax.Array, reset_interval: Any, warmup_steps: Any) -> jax.Array:
  """The factor on the update at 1-indexed ``step``: a cosine ramp after each momentum reset.

  With ``c`` the number of steps since the last reset (resets happen at steps
  ``reset_interval, 2 * reset_interval, ...``; before the first one there is no ramp) and
  ``W = warmup_steps``: ``1 - 0.99 * (1 + cos(pi * c / (W + 1))) / 2`` for ``c < W``, else 1.
  """
  step = jnp.asarray(step, jnp.int32)
  since = step % reset_interval
  ramping = (step >= reset_interval) & (since < warmup_steps)
  w = jnp.asarray(warmup_steps, _F32)
  cosine = (1 + jnp.cos(math.pi * since.astype(_F32) / (w + 1))) / 2
  return jnp.where(ramping, 1 - (1 - _WARMUP_FLOOR) * cosine, jnp.ones([], _F32))


def spam(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    theta: Any = 5000.0,
    reset_interval: Any = 500,
    warmup_steps: Any = 150,
    weight_decay: Any = 0.0,
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

  Args:
    learning_rate: :math:`\eta`, a number >= 0 or an ``optax`` schedule of the step count.
    b1: first-moment decay in [0, 1).
    b2: second-moment decay in [0, 1).
    eps: added to :math:`\sqrt{v}` (>= 0).
    theta: spike threshold :math:`\theta` > 0 on :math:`g^2 / v`; 0 turns clipping off.
    reset_interval: steps between momentum resets (integer >= 1).
    warmup_steps: length of the cosine ramp after each reset (integer >= 0).
    weight_decay: decoupled weight decay :math:`\lambda` >= 0; needs ``params`` unless 0.

  A gradient whose global norm is NaN or Inf skips the step: zero update, moments and step count
  unchanged, counted in ``nonfinite_count`` (and in :func:`clipax.metrics`).

  Returns:
    An ``optax.GradientTransformation`` (an optimizer: its updates are added to the
    parameters) whose state is a :class:`clipax.SpamState`.

  Raises:
    ValueError: for an out-of-range python number or non-integer step count; at ``update`` when
      ``weight_decay`` is not 0 and ``params`` is missing.

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

  References:
    Huang, Zhu, Jin, Liu, Wang, Liu, "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
    Training", ICLR 2025, https://arxiv.org/abs/2501.06842 (reference code:
    TianjinYellow/SPAM-Optimizer, ``galore_torch/SPAM.py``)
  """
  if not callable(learning_rate):
    _checks.number("learning_rate", learning_rate, low=0.0)
  _checks.number("b1", b1, low=0.0, high=1.0)
  _checks.number("b2", b2, low=0.0, high=1.0)
  _checks.number("eps", eps, low=0.0)
  _checks.number("theta", theta, low=0.0)
  _checks.number("reset_interval", reset_interval, low=1, integer=True)
  _checks.number("warmup_steps", warmup_steps, low=0, integer=True)
  _checks.number("weight_decay", weight_decay, low=0.0)

  def init_fn(params):
    def zeros(p):
      p = jnp.asarray(p)
      return jnp.zeros(p.shape, _moment_dtype(p.dtype))

    mu = jax.tree_util.tree_map(zeros, params)
    nu = jax.tree_util.tree_map(zeros, params)
    zero = jnp.zeros([], jnp.int32)
    return SpamState(
        count=zero, mu=mu, nu=nu, spikes=zero, norm=jnp.zeros([], _F32), nonfinite_count=zero
    )

  def update_fn(updates, state, params=None):
    no_decay = isinstance(weight_decay, (int, float)) and weight_decay == 0
    if params is None and not no_decay:
      raise ValueError("spam with `weight_decay` needs `params`: update(grads, state, params)")
    with jax.named_scope("clipax/spam"):
      step = optax.safe_increment(state.count)
      lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
      lr = jnp.asarray(lr, _F32)
      c1, c2 = _complement(b1), _complement(b2)
      theta_ = jnp.asarray(theta, _F32)
      since = step % reset_interval
      reset = since == 0
      clip_on = (step >= _CLIP_DELAY) & (since >= _CLIP_DELAY) & (theta_ > 0)
      t = step.astype(_F32)
      step_size = lr * jnp.sqrt(_bias_correction(c2, t)) / _bias_correction(c1, t)
      step_size = step_size * warmup_scale(step, reset_interval, warmup_steps)

      def moments(g, m, v):
        dt = m.dtype
        g = g.astype(dt)
        m = jnp.where(reset, jnp.zeros([], dt), m)
        v = jnp.where(reset, jnp.zeros([], dt), v)
        bound2 = theta_.astype(dt) * v
        spike = clip_on & (g * g > bound2)
        g = jnp.where(spike, jnp.sign(g) * jnp.sqrt(bound2), g)
        m = m + c1.astype(dt) * (g - m)
        v = v + c2.astype(dt) * (g * g - v)
        return m, v, jnp.sum(spike, dtype=jnp.int32)

      treedef = jax.tree_util.tree_structure(updates)
      grads = treedef.flatten_up_to(updates)
      results = [
          moments(g, m, v)
          for g, m, v in zip(
              grads, treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu), strict=True
          )
      ]
      mu = treedef.unflatten([r[0] for r in results])
      nu = treedef.unflatten([r[1] for r in results])
      spikes = sum((r[2] for r in results), jnp.zeros([], jnp.int32))

      def direction(g, m, v):
        dt = m.dtype
        return -(step_size.astype(dt) * m / (jnp.sqrt(v) + jnp.asarray(eps, dt)))

      adam = jax.tree_util.tree_map(direction, updates, mu, nu)
      if not no_decay:
        wd = lr * jnp.asarray(weight_decay, _F32)

        def decayed(u, p):
          dt = u.dtype
          return u - wd.astype(dt) * (jnp.asarray(p).astype(dt) + u)

        adam = jax.tree_util.tree_map(decayed, adam, params)
      norm = global_norm(updates).astype(_F32)
      bad = ~jnp.isfinite(norm)

      def cast(u, g):
        u = u.astype(jnp.asarray(g).dtype)
        return jnp.where(bad, jnp.zeros([], u.dtype), u)

      out = jax.tree_util.tree_map(cast, adam, updates)
      keep = lambda new, old: jnp.where(bad, old, new)  # noqa: E731
      return out, SpamState(
          count=keep(step, state.count),
          mu=jax.tree_util.tree_map(keep, mu, state.mu),
          nu=jax.tree_util.tree_map(keep, nu, state.nu),
          spikes=jnp.where(bad, 0, spikes),
          norm=norm,
          nonfinite_count=state.nonfinite_count + bad.astype(jnp.int32),
      )

  return optax.GradientTransformation(init_fn, update_fn)
