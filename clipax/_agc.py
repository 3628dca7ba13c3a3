"""Adaptive gradient clipping (AGC): each unit of a gradient clipped relative to its parameter.

``measure -> threshold -> act -> record`` as in :mod:`clipax._clipping`, with two norms per unit
(gradient and parameter, both from :func:`clipax.unitwise_norms`) and the threshold
``clipping * max(|w_u|, eps)``. Parameters are paired with updates by tree structure, never by
leaf order.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from clipax import _checks, _layers
from clipax._checks import Nonfinite
from clipax._clipping import invalid_threshold
from clipax._elements import ReductionAxes, UnitRule, float_leaves
from clipax._leaf_clipping import _by_layer, _per_leaf_clip, _transformation, _with_layer_init
from clipax._unitwise import unitwise_norms


def _paired(updates: Any, params: Any) -> None:
  """Raises ``ValueError`` unless ``params`` has the structure and leaf shapes of ``updates``."""
  u_def: Any = jax.tree_util.tree_structure(updates)
  p_def: Any = jax.tree_util.tree_structure(params)
  if u_def != p_def:
    raise ValueError(
        "adaptive_grad_clip: `params` and `updates` have different tree structures (leaves are "
        f"paired by structure, not by order): params {p_def} vs updates {u_def}"
    )
  flat = jax.tree_util.tree_flatten_with_path(updates)[0]
  for (path, g), p in zip(flat, jax.tree_util.tree_leaves(params), strict=True):
    if jnp.shape(g) != jnp.shape(p):
      raise ValueError(
          f"adaptive_grad_clip: leaf {jax.tree_util.keystr(path)} has shape {jnp.shape(g)} in "
          f"`updates` but {jnp.shape(p)} in `params`"
      )


def adaptive_grad_clip(
    clipping: ArrayLike,
    *,
    eps: ArrayLike = 1e-3,
    axes: ReductionAxes = None,
    units: UnitRule = "nfnets",
    nonfinite: Nonfinite = "zero",
    name: str | None = None,
    leaf_metrics: bool = False,
    layer_axis: _layers.LayerAxis = None,
) -> optax.GradientTransformation:
  r"""Adaptive gradient clipping (AGC): clips each unit relative to its parameter's norm.

  .. math::
    g_u \leftarrow g_u \cdot \min\Big(1, \frac{\lambda \max(\|w_u\|, \epsilon)}{\|g_u\|}\Big)

  Units follow optax's and NFNets' rule by default (see :func:`clipax.unitwise_norms`): a leaf
  that squeezes to a scalar or vector is one unit, a ``(in, out)`` or ``(in, heads, head_dim)``
  kernel reduces axis 0, a ``(h, w, in, out)`` convolution reduces its first three axes.
  ``units="last_axis"`` keeps clipax 0.1's rule (every axis but the last). Norms are in float32
  whatever the dtype of gradients and parameters. A traced ``clipping`` or ``eps`` that is NaN or
  out of range zeroes the update and is counted in ``invalid_count``.

  Args:
    clipping: ``lambda`` >= 0, the allowed ratio of gradient to parameter norm (``inf``: off).
    eps: floor on the parameter norm, so zero-initialised parameters can move (> 0).
    axes: ``None`` for the ``units`` rule, or a function from a leaf to the axes it reduces over.
    units: ``"nfnets"`` (default) or ``"last_axis"``.
    nonfinite: ``"zero"`` (default) or ``"propagate"``, as in :func:`clipax.clip_by_leaf_norm`.
    name: the name of its keys in :func:`clipax.metrics`; default: its ``named_chain`` key,
      else ``agc``.
    leaf_metrics: also keep every leaf's pre-clip norm (``clip/{name}/leaf_norm/<path>``),
      from the per-leaf norms it computes anyway.
    layer_axis: stacked (scanned) layers: each leaf stacked along its layer axis counts as L
      separate weights ``x[i]``, whose units are those of the unstacked weight (the layer axis is
      never reduced; ``units`` and ``axes`` see the layer ``x[i]``), bit-for-bit as the unstacked
      model for a leading layer axis. ``None`` (default): no stacked leaf; an int: every leaf is
      stacked along that axis; a pytree prefix of the updates with int/``None`` leaves; or a
      function ``(key_path, leaf) -> int | None``. With ``leaf_metrics`` a stacked leaf's norm entry
      is a ``(L,)`` vector (``leaf_norm/<path>/<i>``).

  Returns:
    An ``optax.GradientTransformation`` with a :class:`clipax.ClipState` (global L2 ``norm``,
    smallest unit ``scale``, ``clipped`` if any unit was). ``update`` needs ``params``.

  Raises:
    ValueError: for a bad ``clipping``, ``eps``, ``units`` or ``nonfinite``; at ``update``
      without ``params``, or with ``params`` whose structure or leaf shapes differ from the
      updates', or with axes (or a ``layer_axis``) out of range.
    TypeError: for a ``layer_axis`` of none of the accepted forms.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import clipax
    >>> tx = clipax.adaptive_grad_clip(0.1)
    >>> params = {"w": jnp.array([[1.0, 0.0], [0.0, 0.0]])}  # units: columns, norms 1 and 0
    >>> grads = {"w": jnp.array([[3.0, 0.0], [4.0, 0.0]])}   # column norms 5 and 0
    >>> out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    >>> print(f"{out['w'][0, 0]:.3f} {out['w'][1, 0]:.3f}")
    0.060 0.080

  References:
    Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image Recognition Without
    Normalization", 2021, https://arxiv.org/abs/2102.06171 (unit rule: optax
    ``transforms/_clipping.py`` ``unitwise_norm``)
  """
  _checks.threshold("clipping", clipping)
  _checks.number("eps", eps, low=0.0, low_open=True)
  _checks.choice("units", units, ("nfnets", "last_axis"))
  _checks.nonfinite(nonfinite)
  if axes is not None and not callable(axes):
    raise TypeError(f"`axes` must be None or a function from a leaf to its axes, got {axes!r}")
  _layers.check_layer_axis(layer_axis, "adaptive_grad_clip")

  def clip_layers(updates, params):
    g_norms = jax.tree_util.tree_leaves(unitwise_norms(updates, axes=axes, units=units))
    p_norms = jax.tree_util.tree_leaves(unitwise_norms(params, axes=axes, units=units))
    lam = jnp.asarray(clipping, jnp.float32)
    limits = [lam * jnp.maximum(p, jnp.asarray(eps, p.dtype)) for p in p_norms]
    invalid = _checks.any_of(
        invalid_threshold(clipping), _checks.invalid(eps, low=0.0, low_open=True)
    )
    return _per_leaf_clip(updates, g_norms, limits, nonfinite, 2, invalid)

  layered = _by_layer(clip_layers, layer_axis, "adaptive_grad_clip", with_params=True)

  def clip_fn(updates, params):
    if params is None:
      raise ValueError("adaptive_grad_clip needs `params`: call update(updates, state, params)")
    float_leaves(updates, "adaptive_grad_clip")  # a clear error for a non-numeric leaf first
    float_leaves(params, "adaptive_grad_clip")
    _paired(updates, params)
    return layered(updates, params)

  tx = _transformation("agc", clip_fn, clipping, name, leaf_metrics)
  return _with_layer_init(tx, layer_axis, leaf_metrics, "adaptive_grad_clip")
