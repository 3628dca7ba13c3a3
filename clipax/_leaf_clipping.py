"""The per-leaf clippers: :func:`clip_by_leaf_norm` and :func:`clip_by_block_rms`, and the pieces
every per-leaf clipper shares (``_per_leaf_clip``: scale each leaf by its own norm against its own
threshold, and the records; ``_transformation``: the stateful wrapper; ``_by_layer``: stacked
layers, see :mod:`clipax._layers`). AGC (:mod:`clipax._agc`) is built on them.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from clipax import _checks, _layers, _platform
from clipax._checks import Nonfinite
from clipax._clipping import Action, action, combine_norms, invalid_threshold, scale_for
from clipax._elements import Specs, by_ord, canonical_ord, float_leaves
from clipax._measure import as_tree, check_leaf_metrics, init_leaf_norms
from clipax._norms import _leafwise
from clipax._sharding import check_specs, global_sizes, layout
from clipax._state import applied_norm, clip_state, init_clip_state, named, record, stat_dtype


def _min_or_one(scales: list[jax.Array]) -> jax.Array:
  if not scales:
    return jnp.ones([], jnp.float32)
  return jnp.min(jnp.concatenate([jnp.ravel(s).astype(jnp.float32) for s in scales]))


def _per_leaf_clip(
    updates: Any,
    norms: list[jax.Array],
    thresholds: list[Any],
    nonfinite: Nonfinite,
    ord: float,
    invalid: jax.Array | None,
) -> tuple[Any, jax.Array, jax.Array, jax.Array, Action, jax.Array, list[jax.Array]]:
  """Scales leaf ``i`` by ``min(1, t_i / n_i)`` (``n_i`` may be a keepdims array of units).

  Returns ``(clipped updates, global norm, recorded scale, any clipped, action, post-clip
  global norm, per-leaf norms)``.
  """
  treedef: Any = jax.tree_util.tree_structure(updates)
  leaves = float_leaves(updates, "clip")
  norm = by_ord(ord, lambda o: combine_norms(list(norms), o))
  act = action(norm, nonfinite, invalid)
  def per_leaf_scales():
    pairs = [scale_for(n, t) for n, t in zip(norms, thresholds, strict=True)]
    scales = [s for s, _ in pairs]
    any_over = jnp.any(jnp.stack([jnp.any(o) for _, o in pairs])) if pairs else jnp.zeros([], bool)
    after = by_ord(ord, lambda o: combine_norms(
        [applied_norm(n, s) for n, s in zip(norms, scales, strict=True)], o))
    return scales, any_over, after, _min_or_one(list(scales))

  def vector_scales():
    # Every unit's scale from one vector of all the norms, each leaf taking its slice: one
    # kernel instead of a few per leaf, and XLA:GPU then merges the leaves' update kernels
    # (sibling fusion over the shared vector): 223 -> 41 kernels for the benchmark tree.
    flat = jnp.concatenate([jnp.ravel(n) for n in norms])
    limit = jnp.concatenate([
        jnp.ravel(jnp.broadcast_to(jnp.asarray(t).astype(flat.dtype), jnp.shape(n)))
        for n, t in zip(norms, thresholds, strict=True)])
    flat_scale, over = scale_for(flat, limit)
    ends = list(itertools.accumulate(math.prod(jnp.shape(n)) for n in norms))
    scales = [flat_scale[e - math.prod(jnp.shape(n)):e].reshape(jnp.shape(n))
              for n, e in zip(norms, ends, strict=True)]
    after = by_ord(ord, lambda o: combine_norms([applied_norm(flat, flat_scale)], o))
    return scales, jnp.any(over), after, jnp.min(flat_scale).astype(jnp.float32)

  # the GPU's way where the norms share a dtype; the CPU and the TPU per leaf (on the TPU the
  # vector form cost AGC 12 kernels)
  gpu = vector_scales if norms and len({jnp.result_type(n) for n in norms}) == 1 else None
  scales, any_over, after, smallest = _platform._by_platform(per_leaf_scales, per_leaf_scales, gpu)
  out = treedef.unflatten([act.apply(g, s) for g, s in zip(leaves, scales, strict=True)])
  per_leaf = [n if jnp.ndim(n) == 0 else combine_norms([n], ord) for n in norms]
  recorded = act.recorded(smallest)
  after = jnp.where(recorded == 0, 0, jnp.where(jnp.isnan(recorded), jnp.nan, after))
  return out, norm, recorded, act.clipped(any_over), act, after, per_leaf


def _transformation(
    kind: str,
    clip_fn,
    threshold: ArrayLike,
    name: str | None,
    leaf_metrics: bool,
) -> optax.GradientTransformation:
  """A stateful clipper from ``clip_fn(updates, params)``, which returns what
  :func:`_per_leaf_clip` does."""
  check_leaf_metrics(leaf_metrics)

  def init_fn(params):
    return init_clip_state(threshold, init_leaf_norms(params, leaf_metrics, stat_dtype()))

  def update_fn(updates, state, params=None):
    with jax.named_scope(f"clipax/{kind}"):
      out, norm, scale, clipped, act, after, per_leaf = clip_fn(updates, params)
      base = record(state, norm, scale, clipped, act.bad, act.invalid)
      leaves = as_tree(updates, per_leaf, base.norm.dtype) if leaf_metrics else ()
      return out, clip_state(base, threshold, after, leaves)

  return named(optax.GradientTransformation(init_fn, update_fn), kind, name)


def _by_layer(clip_fn, layer_axis: _layers.LayerAxis, what: str, with_params: bool = False):
  """``clip_fn(updates, params)`` (returning what :func:`_per_leaf_clip` does) applied to the
  tree in which every stacked leaf (``layer_axis``) is replaced by its layers, restacked after:
  clipped leaves along their layer axes, per-leaf norms as ``(L,)`` vectors. ``with_params``:
  ``params`` are split the same way (AGC); otherwise they are passed on as they are."""
  if layer_axis is None:
    return clip_fn

  def layered(updates, params):
    stacking = _layers.resolve(updates, layer_axis, what)
    if stacking is None:
      return clip_fn(updates, params)
    leaves = float_leaves(updates, what)
    if with_params and params is not None:
      params = stacking.split(float_leaves(params, what))
    out, norm, scale, clipped, act, after, per_leaf = clip_fn(stacking.split(leaves), params)
    treedef: Any = jax.tree_util.tree_structure(updates)
    out = treedef.unflatten(stacking.restack(jax.tree_util.tree_leaves(out), leaves))
    return out, norm, scale, clipped, act, after, stacking.stack(per_leaf, norm.dtype)

  return layered


def _with_layer_init(tx, layer_axis: _layers.LayerAxis, leaf_metrics: bool, what: str):
  """``tx`` whose fresh state holds ``(L,)`` zeros in ``leaf_norms`` for each stacked leaf, the
  shape its updates record (so the state's shapes never change from one step to the next)."""
  if layer_axis is None or not leaf_metrics:
    return tx

  def init_fn(params):
    state = tx.init(params)
    return state._replace(leaf_norms=_layers.zeros(params, layer_axis, state.norm.dtype, what))

  return optax.GradientTransformation(init_fn, tx.update)


def clip_by_leaf_norm(
    max_norm: ArrayLike,
    *,
    ord: int | float | str = 2,
    nonfinite: Nonfinite = "zero",
    name: str | None = None,
    leaf_metrics: bool = False,
    layer_axis: _layers.LayerAxis = None,
    specs: Specs = None,
) -> optax.GradientTransformation:
  r"""Scales each leaf on its own so that its norm is at most ``max_norm``.

  .. math::
    g_l \leftarrow g_l \cdot \min\Big(1, \frac{c}{\|g_l\|}\Big) \quad \text{for every leaf } l

  Args:
    max_norm: the per-leaf threshold ``c`` >= 0 (python number or array).
    ord: 1, 2 (default) or ``math.inf``.
    nonfinite: ``"zero"`` (default): when the global norm is NaN or Inf every leaf is zeroed and
      the step counted; ``"propagate"``: passed through, counted.
    name: the name of its keys in :func:`clipax.metrics`; default: its ``named_chain`` key,
      else ``leaf_norm``.
    leaf_metrics: also keep every leaf's pre-clip norm (``clip/{name}/leaf_norm/<path>``),
      from the per-leaf norms it computes anyway.
    layer_axis: stacked (scanned) layers: each leaf stacked along its layer axis counts as L
      separate layers, each clipped by its own norm (of the slice ``x[i]``), bit-for-bit as the
      unstacked model for a leading layer axis (another axis: up to an ulp of the norms, the order
      XLA sums a strided layer in). ``None`` (default): no stacked leaf; an int: every leaf is
      stacked along that axis (a leaf without it is an error); a pytree prefix of the updates with
      int/``None`` leaves (``{"layers": 0, "embed": None}``); or a function ``(key_path, leaf) ->
      int | None``. With ``leaf_metrics`` a stacked leaf's ``leaf_norms`` entry is a ``(L,)``
      vector, reported as ``leaf_norm/<path>/<i>``; ``init`` then needs the parameters' shapes.
    specs: inside ``shard_map``, the updates' ``PartitionSpec`` s (the ``in_specs`` pytree) or
      ``"varying"``: each leaf's norm is summed over exactly the mesh axes it is split over (one
      vector all-reduce), so a sharded leaf is clipped by its whole norm (see
      :func:`clipax.global_norm`). Not with ``layer_axis``.

  Returns:
    An ``optax.GradientTransformation`` with a :class:`clipax.ClipState`: ``norm`` is the global
    pre-clip norm, ``scale`` the smallest leaf (layer) scale, ``clipped`` whether any leaf was
    clipped.

  Raises:
    ValueError: for a bad ``max_norm``, ``ord`` or ``nonfinite``; at ``update``, for a
      ``layer_axis`` out of range for a leaf (naming its path).
    TypeError: for a ``layer_axis`` of none of the forms above.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import clipax
    >>> tx = clipax.clip_by_leaf_norm(1.0)
    >>> grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.1, 0.0])}
    >>> out, _ = jax.jit(tx.update)(grads, tx.init(None))
    >>> print(f"{out['a'][0]:.2f} {out['a'][1]:.2f} {out['b'][0]:.2f}")
    0.60 0.80 0.10

    Two stacked layers (``nnx.scan``'s layout), each clipped on its own:

    >>> tx = clipax.clip_by_leaf_norm(1.0, layer_axis=0)
    >>> out, _ = jax.jit(tx.update)({"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}, tx.init(None))
    >>> print([[f"{v:.2f}" for v in row] for row in out["w"].tolist()])
    [['0.60', '0.80'], ['0.30', '0.40']]
  """
  _checks.threshold("max_norm", max_norm)
  _checks.nonfinite(nonfinite)
  _layers.check_layer_axis(layer_axis, "clip_by_leaf_norm")
  check_specs(specs, layer_axis=layer_axis)
  ord = canonical_ord(ord)

  def clip_fn(updates, params):
    del params
    leaves = float_leaves(updates, "clip_by_leaf_norm")
    axes, rep = layout(updates, None, None, specs, "clip_by_leaf_norm")
    norms = by_ord(ord, lambda o: _leafwise(leaves, o, axes, rep))
    return _per_leaf_clip(
        updates, norms, [max_norm] * len(norms), nonfinite, ord, invalid_threshold(max_norm)
    )

  clip_fn = _by_layer(clip_fn, layer_axis, "clip_by_leaf_norm")
  tx = _transformation("leaf_norm", clip_fn, max_norm, name, leaf_metrics)
  return _with_layer_init(tx, layer_axis, leaf_metrics, "clip_by_leaf_norm")


def clip_by_block_rms(
    threshold: ArrayLike,
    *,
    nonfinite: Nonfinite = "zero",
    name: str | None = None,
    leaf_metrics: bool = False,
    layer_axis: _layers.LayerAxis = None,
    specs: Specs = None,
) -> optax.GradientTransformation:
  r"""Scales each leaf so that its root-mean-square is at most ``threshold``.

  .. math::
    g_l \leftarrow g_l \cdot \min\Big(1, \frac{c}{\operatorname{rms}(g_l)}\Big),
    \qquad \operatorname{rms}(g_l) = \frac{\|g_l\|_2}{\sqrt{n_l}}

  Args:
    threshold: the RMS bound ``c`` >= 0 (python number or array).
    nonfinite: ``"zero"`` (default) or ``"propagate"``, as in :func:`clip_by_leaf_norm`.
    name: the name of its keys in :func:`clipax.metrics`; default: its ``named_chain`` key,
      else ``block_rms``.
    leaf_metrics: also keep every leaf's pre-clip norm (``clip/{name}/leaf_norm/<path>``),
      from the per-leaf norms it computes anyway.
    layer_axis: stacked (scanned) layers, as in :func:`clip_by_leaf_norm`: each layer ``x[i]`` of a
      stacked leaf is a block of its own, bounded by its own RMS (over its ``n / L`` elements),
      bit-for-bit as the unstacked model (leading layer axis); ``None`` (default), an int, a pytree
      prefix of ints/``None`` or a function ``(key_path, leaf) -> int | None``.
    specs: inside ``shard_map``, the updates' ``PartitionSpec`` s or ``"varying"``, as in
      :func:`clip_by_leaf_norm`; the RMS is over the whole leaf (its elements on every shard).

  Returns:
    An ``optax.GradientTransformation`` with a :class:`clipax.ClipState` (global L2 ``norm``,
    smallest leaf ``scale``).

  Raises:
    ValueError: for a bad ``threshold`` or ``nonfinite``; at ``update``, for a ``layer_axis``
      out of range for a leaf (naming its path).
    TypeError: for a ``layer_axis`` of none of the accepted forms.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import clipax
    >>> tx = clipax.clip_by_block_rms(1.0)
    >>> out, _ = jax.jit(tx.update)({"w": jnp.array([2.0, -2.0, 2.0, -2.0])}, tx.init(None))
    >>> print(out["w"].tolist())
    [1.0, -1.0, 1.0, -1.0]
  """
  _checks.threshold("threshold", threshold)
  _checks.nonfinite(nonfinite)
  _layers.check_layer_axis(layer_axis, "clip_by_block_rms")
  check_specs(specs, layer_axis=layer_axis)

  def clip_fn(updates, params):
    del params
    leaves = float_leaves(updates, "clip_by_block_rms")
    axes, rep = layout(updates, None, None, specs, "clip_by_block_rms")
    norms = _leafwise(leaves, 2, axes, rep)
    limits = [jnp.asarray(threshold, jnp.float32) * math.sqrt(n)
              for n in global_sizes(updates, specs, "clip_by_block_rms")]
    return _per_leaf_clip(updates, norms, limits, nonfinite, 2, invalid_threshold(threshold))

  clip_fn = _by_layer(clip_fn, layer_axis, "clip_by_block_rms")
  tx = _transformation("block_rms", clip_fn, threshold, name, leaf_metrics)
  return _with_layer_init(tx, layer_axis, leaf_metrics, "clip_by_block_rms")
