"""AutoClip: clip to a percentile of the recent global norms (Seetharaman et al., 2020)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from clipax import _checks
from clipax._adaptive import (
    _check_max_norm,
    _global_clipper,
    _known_size,
    _threshold_metrics,
    static_int,
)
from clipax._checks import Nonfinite
from clipax._elements import AxisName, Specs
from clipax._sharding import check_specs
from clipax._state import register_state


@register_state
class AutoClipState(NamedTuple):
  """State of :func:`clipax.autoclip`.

  Attributes:
    count: int32, number of updates seen (saturates).
    norm: pre-clip global norm of the last update (float32; float64 under x64).
    scale: factor applied to the last update.
    clipped: bool, whether the last update was clipped.
    clipped_count: int32, number of clipped updates (saturates).
    nonfinite_count: int32, number of updates whose norm was NaN or Inf (saturates).
    invalid_count: int32, number of updates zeroed for an invalid traced hyperparameter.
    threshold: the clip value used for the last update (the percentile, capped by
      ``max_norm``; ``inf`` while the history is empty and there is no cap).
    observed: int32, finite norms written to the history (saturates).
    cursor: int32, the slot the next finite norm is written to (wraps at ``history``).
    history: ``[history]``, ring buffer of the last finite pre-clip norms.
    leaf_norms: with ``leaf_metrics=True``, each leaf's pre-clip norm; otherwise ``()``.
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
  cursor: jax.Array
  history: jax.Array
  leaf_norms: Any = ()
  tag: Any = ()

  def clipax_metrics(self) -> dict[str, jax.Array]:
    return _threshold_metrics(self)


def _percentile(values: jax.Array, n: jax.Array, q: jax.Array) -> jax.Array:
  """``np.percentile(values[:n], q)`` (linear interpolation) for a traced ``n``; inf if n == 0."""
  size = values.shape[0]
  valid = jnp.arange(size) < n
  ordered = jnp.sort(jnp.where(valid, values, jnp.inf))
  last = jnp.maximum(n - 1, 0)
  pos = q * last.astype(values.dtype) / 100
  lo = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, last)
  hi = jnp.minimum(lo + 1, last)
  frac = pos - lo.astype(values.dtype)
  a, b = ordered[lo], ordered[hi]
  value = jnp.where(frac > 0, a + (b - a) * frac, a)
  return jnp.where(n > 0, value, jnp.inf)


def _autoclip_policy(state: AutoClipState, norm: jax.Array, *, percentile):
  size = state.history.shape[0]
  finite = jnp.isfinite(norm)
  history = jnp.where(finite, state.history.at[state.cursor].set(norm), state.history)
  n = jnp.where(finite, jnp.minimum(state.observed, size - 1) + 1,
                jnp.minimum(state.observed, size))
  q = jnp.clip(jnp.asarray(percentile, norm.dtype), 0, 100)
  limit = _percentile(history, n, q)
  cursor = (state.cursor + 1) % size
  return limit, limit, {"history": history, "cursor": cursor}


def autoclip(
    percentile: ArrayLike = 10.0,
    *,
    history: int = 1000,
    max_norm: ArrayLike | None = None,
    axis_name: AxisName = None,
    specs: Specs = None,
    nonfinite: Nonfinite = "zero",
    name: str | None = None,
    leaf_metrics: bool = False,
) -> optax.GradientTransformation:
  r"""AutoClip: clips to a percentile of the recent global norms, the current one included.

  .. math::
    c_t = \operatorname{percentile}_p\big(g_{t-h+1}, \dots, g_t\big),\qquad
    g \leftarrow g \cdot \min\Big(1, \frac{\min(c_t, \text{max\_norm})}{g_t}\Big)

  over the last :math:`h` = ``history`` finite norms (a ring buffer; the reference keeps all of
  them), with numpy's default linear interpolation. The history holds the pre-clip norms, as in
  the reference. A NaN/Inf norm zeroes the update (``nonfinite="zero"``), is counted, and is
  never written to the history. The warm-up needs no special rule for the *statistics*: an
  order statistic is robust by itself (one 1e30 norm in a history of three or more moves the
  10th percentile by at most one rank, so it cannot poison later thresholds). It cannot protect
  the very first steps, though: the first norm is its own percentile (never clipped), and a
  1e30 second norm interpolates the 10th percentile to about 1e29; set ``max_norm`` to bound
  those steps. A
  traced ``percentile`` or ``max_norm`` that is NaN or out of range zeroes the update, is
  counted in ``invalid_count`` and leaves the history as it was.

  Args:
    percentile: ``p`` in [0, 100]; the paper's recommendation is 10.
    history: ring buffer length (an integer >= 1; under ``optax.inject_hyperparams`` the size is
      fixed by ``init`` and read off the state afterwards).
    max_norm: optional absolute cap on the threshold (>= 0); ``None`` (default) for no cap.
    axis_name: inside ``shard_map``/``pmap`` with sharded gradients, the axis to all-reduce the
      norm over.
    specs: inside ``shard_map``, instead of ``axis_name``: the updates' ``PartitionSpec`` s (the
      ``in_specs`` pytree) or ``"varying"`` (read from the arrays' types); each leaf is summed
      over exactly the mesh axes it is split over (see :func:`clipax.global_norm`).
    nonfinite: ``"zero"`` (default) or ``"propagate"``.
    name: the name of its keys in :func:`clipax.metrics`; default: its ``named_chain`` key,
      else ``autoclip``.
    leaf_metrics: also keep every leaf's pre-clip norm (``clip/{name}/leaf_norm/<path>``),
      computed in the same pass as the global norm.

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
  _checks.axis_name(axis_name)
  check_specs(specs, axis_name)

  def init_stats(dt):
    return {
        "cursor": jnp.zeros([], jnp.int32),
        "history": jnp.zeros([_known_size("history", size)], dt),
    }

  def policy(state, norm):
    return _autoclip_policy(state, norm, percentile=percentile)

  def invalid():
    return _checks.invalid(percentile, low=0.0, high=100.0, high_open=False)

  return _global_clipper(
      "autoclip", AutoClipState, init_stats, policy, invalid, max_norm, axis_name, nonfinite,
      name, leaf_metrics, specs,
  )


