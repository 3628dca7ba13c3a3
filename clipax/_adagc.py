"""AdaGC: each leaf clipped relative to an EMA of its own clipped norm.

The per-leaf sibling of the global adaptive clippers in :mod:`clipax._adaptive`, with the same
shared rules: one warm-up rule (:func:`clipax._adaptive.warming_up`), statistics updated only
with a finite norm and valid hyperparameters, the state extending :class:`~clipax.ClipState`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from clipax import _checks, _layers, _platform
from clipax._adaptive import (
    _cap,
    _check_max_norm,
    _invalid_cap,
    _keep_if,
    _threshold_metrics,
    warming_up,
)
from clipax._checks import Nonfinite
from clipax._clipping import action, combine_norms, scale_for
from clipax._elements import AxisName, Specs, float_leaves
from clipax._measure import as_tree, check_leaf_metrics
from clipax._norms import _leafwise
from clipax._sharding import check_specs, layout
from clipax._state import add_count, applied_norm, init_base, named, record, register_state


@register_state
class AdaGCState(NamedTuple):
  """State of :func:`clipax.adagc`.

  Attributes:
    count: int32, number of updates seen (saturates).
    norm: pre-clip global norm of the last update (float32; float64 under x64).
    scale: the smallest factor applied to any leaf of the last update.
    clipped: bool, whether any leaf of the last update was clipped.
    clipped_count: int32, number of updates with at least one clipped leaf (saturates).
    nonfinite_count: int32, number of updates whose norm was NaN or Inf (saturates).
    invalid_count: int32, number of updates zeroed for an invalid traced hyperparameter.
    threshold: the global norm the last update was bounded by: ``warmup_max_norm``
      during warm-up, afterwards the L2 norm of the per-leaf thresholds
      ``sqrt(sum_i (ratio * gamma_i)^2)``; capped by ``max_norm``.
    observed: int32, finite norms absorbed into the statistics (saturates).
    gamma: a pytree with the structure of the parameters holding, per leaf, an EMA of that
      leaf's clipped norm (its running minimum during warm-up); with ``layer_axis``, a ``(L,)``
      vector (one EMA per layer) for each stacked leaf.
    update_norm: the global norm of the last update after clipping (0 when it was zeroed).
    leaf_norms: with ``leaf_metrics=True``, each leaf's pre-clip norm (shaped like ``gamma``);
      otherwise ``()``.
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
  gamma: Any
  update_norm: Any = None
  leaf_norms: Any = ()
  tag: Any = ()

  def clipax_metrics(self) -> dict[str, jax.Array]:
    return _threshold_metrics(self)


def _adagc_policy(state: AdaGCState, norms, gammas, global_n, *, ratio, beta, warmup_steps,
                  warmup_max):
  """Per-leaf scales, over flags and next ``gamma`` values as vectors (one entry per leaf of
  ``norms``; ``gammas``: one scalar per leaf), and the reported threshold. On a GPU the rule is
  computed on vectors of all leaves, one kernel, and XLA merges the leaves' update kernels that
  read the shared scale vector (237 -> 50 kernels for the benchmark tree); on the CPU and the TPU
  per leaf, then stacked (there the vector form cost the TPU 12 kernels more)."""
  dt = global_n.dtype
  beta = jnp.asarray(beta, dt)
  ratio = jnp.asarray(ratio, dt)
  warm = warming_up(state, warmup_steps)
  warm_scale, warm_over = scale_for(global_n, warmup_max)

  def rule(n, gm):  # elementwise: scalars of one leaf, or vectors of all of them
    limit = ratio * gm
    # gamma == 0: nothing learned yet for this leaf (only zero gradients so far); it is not
    # clipped, and its first nonzero clipped norm starts the statistic.
    known = gm > 0
    local_scale, local_over = scale_for(n, jnp.where(known, limit, jnp.inf))
    s = jnp.where(warm, warm_scale, local_scale)
    clipped_norm = s * n
    running_min = jnp.where(known, jnp.minimum(gm, clipped_norm), clipped_norm)
    ema = jnp.where(known, beta * gm + (1 - beta) * clipped_norm, clipped_norm)
    return s, jnp.where(warm, warm_over, local_over), jnp.where(warm, running_min, ema), limit

  gms = [jnp.asarray(g, dt) for g in gammas]

  def per_leaf():  # the CPU and the TPU: scalar rules, which the compiler fuses per leaf
    outs = [rule(n, gm) for n, gm in zip(norms, gms, strict=True)]
    return tuple(jnp.stack([o[k] for o in outs]) for k in range(4))

  def vector():  # the GPU (see above)
    return rule(jnp.stack(norms), jnp.stack(gms))

  if not norms:
    empty = jnp.zeros((0,), dt)
    return empty, jnp.zeros((0,), jnp.bool_), jnp.where(warm, jnp.asarray(warmup_max, dt), 0), empty
  scales, overs, new_gammas, limits = _platform._by_platform(per_leaf, per_leaf, vector)
  local_threshold = combine_norms([limits], 2).astype(dt)
  threshold = jnp.where(warm, jnp.asarray(warmup_max, dt), local_threshold)
  return scales, overs, threshold, new_gammas


def adagc(
    *,
    ratio: ArrayLike = 1.04,
    beta: ArrayLike = 0.99,
    warmup_steps: ArrayLike = 100,
    warmup_max_norm: ArrayLike = 1.0,
    max_norm: ArrayLike | None = None,
    axis_name: AxisName = None,
    specs: Specs = None,
    nonfinite: Nonfinite = "zero",
    name: str | None = None,
    leaf_metrics: bool = False,
    layer_axis: _layers.LayerAxis = None,
) -> optax.GradientTransformation:
  r"""AdaGC: clips each leaf relative to an EMA of that leaf's own clipped norm.

  With :math:`g_{t,i}` leaf :math:`i` of the update, after warm-up

  .. math::
    h_{t,i} = \min\Big(1, \frac{r\,\gamma_{t-1,i}}{\|g_{t,i}\|}\Big),\qquad
    \hat g_{t,i} = h_{t,i}\,g_{t,i},\qquad
    \gamma_{t,i} = \beta\gamma_{t-1,i} + (1-\beta)\|\hat g_{t,i}\|.

  During warm-up (the first ``warmup_steps`` finite norms) the whole update is clipped at the
  global threshold ``warmup_max_norm`` and :math:`\gamma_{t,i}` is the running minimum of the
  nonzero clipped leaf norms, :math:`\gamma_{t,i} = \min(\gamma_{t-1,i}, \|\hat g_{t,i}\|)`:
  a minimum is robust to an upward spike in warm-up by construction (and the spike is clipped
  at ``warmup_max_norm`` first), and after warm-up :math:`\gamma` absorbs clipped norms only,
  so it rises by at most a factor ``ratio`` per step.
  The optional ``max_norm`` then bounds the global norm of the clipped update (the EMAs still
  see the per-leaf clipped norms). A NaN/Inf global norm zeroes the update
  (``nonfinite="zero"``), is counted, and never enters :math:`\gamma`. A traced ``ratio``,
  ``beta``, ``warmup_max_norm`` or ``max_norm`` that is NaN or out of range zeroes the update,
  is counted in ``invalid_count`` and leaves :math:`\gamma` as it was.

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
    specs: inside ``shard_map``, instead of ``axis_name``: the updates' ``PartitionSpec`` s or
      ``"varying"``; each leaf's norm is summed over exactly the mesh axes it is split over
      (see :func:`clipax.global_norm`). Not with ``layer_axis``.
    nonfinite: ``"zero"`` (default) or ``"propagate"``.
    name: the name of its keys in :func:`clipax.metrics`; default: its ``named_chain`` key,
      else ``adagc``.
    leaf_metrics: also keep every leaf's pre-clip norm (``clip/{name}/leaf_norm/<path>``),
      the per-leaf norms it computes anyway.
    layer_axis: stacked (scanned) layers: each leaf stacked along its layer axis counts as L
      separate layers, each with its own :math:`\gamma` (``gamma`` holds a ``(L,)`` vector for it,
      ``leaf_norms`` too: ``leaf_norm/<path>/<i>`` in the metrics), bit-for-bit as the unstacked
      model over any number of steps for a leading layer axis. ``None`` (default): no stacked leaf;
      an int: every leaf is stacked along that axis; a pytree prefix of the updates with
      int/``None`` leaves; or a function ``(key_path, leaf) -> int | None``. ``init`` then needs the
      parameters themselves (their shapes), not only their structure.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`clipax.AdaGCState`. ``init``
    needs the parameters (or any pytree with their structure): ``gamma`` has one entry per leaf.

  Raises:
    ValueError: for an out-of-range python number, a non-integer ``warmup_steps`` or an unknown
      ``nonfinite`` at construction; at ``update`` when the state was built without parameters
      or for a tree of another structure (or other layer counts); for a ``layer_axis`` out of
      range for a leaf (naming its path).
    TypeError: for a ``layer_axis`` of none of the accepted forms.

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
  _checks.axis_name(axis_name)
  check_specs(specs, axis_name, layer_axis=layer_axis)
  check_leaf_metrics(leaf_metrics)
  _layers.check_layer_axis(layer_axis, "adagc")

  def init_fn(params):
    base = init_base()
    dt = base.norm.dtype
    if layer_axis is None:
      gamma = jax.tree_util.tree_map(lambda _: jnp.zeros([], dt), params)
    else:  # (L,) zeros for a stacked leaf
      gamma = _layers.zeros(params, layer_axis, dt, "adagc")
    threshold = _cap(jnp.asarray(warmup_max_norm, dt), max_norm)
    leaves = jax.tree_util.tree_map(jnp.zeros_like, gamma) if leaf_metrics else ()
    return AdaGCState(*base, threshold, jnp.zeros([], jnp.int32), gamma, jnp.zeros([], dt),
                      leaves)

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
      stacked = float_leaves(updates, "adagc")
      dt = state.norm.dtype
      old = jax.tree_util.tree_leaves(state.gamma)
      # Stacked leaves (``layer_axis``): each layer is a leaf of its own from here to the end,
      # then stacked again, so every statistic is the unstacked model's.
      stacking = _layers.resolve(updates, layer_axis, "adagc")
      _layers.check_values(stacking, old, "gamma", "adagc")
      leaves = stacked if stacking is None else stacking.split(stacked)
      old = old if stacking is None else stacking.split_values(old)
      axes, rep = layout(updates, axis_name, None, specs, "adagc")
      norms = [n.astype(dt) for n in _leafwise(leaves, 2, axes, rep)]
      global_n = combine_norms(norms, 2).astype(dt) if norms else jnp.zeros([], dt)
      invalid = _checks.any_of(
          _checks.invalid(ratio, low=0.0, low_open=True),
          _checks.invalid(beta, low=0.0, high=1.0),
          _checks.invalid(warmup_steps, low=1),
          _checks.invalid(warmup_max_norm, low=0.0, allow_inf=True),
          _invalid_cap(max_norm),
      )
      act = action(global_n, nonfinite, invalid)
      scales, overs, threshold, gammas = _adagc_policy(
          state,
          norms,
          old,
          global_n,
          ratio=ratio,
          beta=beta,
          warmup_steps=warmup_steps,
          warmup_max=warmup_max_norm,
      )
      n = jnp.stack(norms) if norms else jnp.zeros((0,), dt)
      any_over = jnp.any(overs)
      if max_norm is not None:
        clipped_global = combine_norms([scales * n], 2) if norms else jnp.zeros([], dt)
        cap_scale, cap_over = scale_for(clipped_global.astype(dt), max_norm)
        scales = scales * cap_scale
        any_over = any_over | cap_over
      out_leaves = [act.apply(g, scales[i]) for i, g in enumerate(leaves)]
      smallest = jnp.min(scales) if norms else jnp.ones([], dt)
      ok = ~(act.bad if invalid is None else act.bad | invalid)
      new_gamma = _keep_if(ok, [gammas[i] for i in range(len(norms))], old)
      per_leaf = norms
      if stacking is not None:
        out_leaves = stacking.restack(out_leaves, stacked)
        new_gamma = stacking.stack(new_gamma, dt)
        per_leaf = stacking.stack(norms, dt)
      out = treedef.unflatten(out_leaves)
      gamma = treedef.unflatten(new_gamma)
      base = record(state, global_n, act.recorded(smallest), act.clipped(any_over), act.bad,
                    invalid)
      after = combine_norms([applied_norm(n, scales)], 2) if norms else jnp.zeros([], dt)
      after = jnp.where(base.scale == 0, 0, jnp.where(jnp.isnan(base.scale), jnp.nan, after))
      return out, AdaGCState(
          *base,
          jnp.where(ok, _cap(threshold, max_norm), state.threshold).astype(dt),
          add_count(state.observed, ok.astype(jnp.int32)),
          gamma,
          after.astype(dt),
          as_tree(updates, per_leaf, dt) if leaf_metrics else (),
      )

  return named(optax.GradientTransformation(init_fn, update_fn), "adagc", name)

