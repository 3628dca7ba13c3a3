"""``clipax.clip_per_example``: per-example clipping as the head of an optax chain, its state.

The clipping itself is :func:`clipax.per_example_clip` (:mod:`clipax._per_example`); this module
keeps its counts in an optimizer state for :func:`clipax.metrics`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from clipax import _checks
from clipax._norms import global_norm
from clipax._per_example import (
    AxisName,
    PerExampleInfo,
    Reduce,
    check_args,
    per_example_clip,
)
from clipax._state import (
    add_count,
    clip_state_metrics,
    init_base,
    named,
    register_state,
    stat_dtype,
)


@register_state
class PerExampleState(NamedTuple):
  """State of :func:`clipax.clip_per_example`.

  Attributes:
    count: int32, number of updates seen (saturates).
    norm: mean pre-clip per-example norm of the last update (finite counted examples).
    scale: smallest factor applied to an example of the last update (0: a non-finite one).
    clipped: bool, whether some example of the last update was clipped.
    clipped_count: int32, clipped examples over all updates (saturates).
    nonfinite_count: int32, examples with a NaN/Inf norm over all updates (saturates).
    invalid_count: int32, updates zeroed for an invalid traced hyperparameter (saturates).
    threshold: ``max_norm``.
    update_norm: global norm of the last aggregate (0 when it was zeroed).
    norm_max: largest finite pre-clip per-example norm of the last update.
    clipped_fraction: clipped / counted examples of the last update.
    examples: int32, examples counted (``mask`` true) in the last update.
    example_count: int32, examples counted over all updates (saturates).
    tag: uint8, the transformation's kind and ``name=`` (see :func:`clipax.metrics`).
  """

  count: jax.Array  # type: ignore[assignment]  # a field, shadows tuple.count
  norm: jax.Array
  scale: jax.Array
  clipped: jax.Array
  clipped_count: jax.Array
  nonfinite_count: jax.Array
  invalid_count: jax.Array
  threshold: jax.Array
  update_norm: jax.Array
  norm_max: jax.Array
  clipped_fraction: jax.Array
  examples: jax.Array
  example_count: jax.Array
  tag: Any = ()

  def clipax_metrics(self) -> dict[str, jax.Array]:
    out = clip_state_metrics(self)
    seen = jnp.asarray(self.example_count)
    # clip_rate: clipped examples / counted examples, over all updates
    out["clip_rate"] = (jnp.asarray(self.clipped_count).astype(jnp.float32)
                        / jnp.maximum(seen, 1).astype(jnp.float32))
    out["norm_max"] = jnp.asarray(self.norm_max)
    out["clipped_fraction"] = jnp.asarray(self.clipped_fraction)
    out["examples"] = jnp.asarray(self.examples)
    out["example_count"] = seen
    return out


def _init_state(max_norm: Any) -> PerExampleState:
  dt = stat_dtype()
  zero_f, zero_i = jnp.zeros([], dt), jnp.zeros([], jnp.int32)
  try:
    threshold = jnp.asarray(max_norm).astype(dt).reshape([])
  except (TypeError, ValueError):
    threshold = jnp.asarray(jnp.inf, dt)
  return PerExampleState(*init_base(), threshold=threshold, update_norm=zero_f,
                         norm_max=zero_f, clipped_fraction=zero_f, examples=zero_i,
                         example_count=zero_i)


def _record(state: PerExampleState, info: PerExampleInfo, aggregate: Any,
            max_norm: Any) -> PerExampleState:
  dt = state.norm.dtype
  ok = ~jnp.asarray(info.invalid, jnp.bool_)
  n = jnp.where(ok, info.examples, 0).astype(jnp.int32)
  clipped = jnp.where(ok, info.clipped, 0).astype(jnp.int32)
  nonfinite = jnp.where(ok, info.nonfinite, 0).astype(jnp.int32)
  fraction = clipped.astype(dt) / jnp.maximum(n, 1).astype(dt)
  return state._replace(
      count=optax.safe_increment(state.count),
      norm=jnp.asarray(info.mean_norm).astype(dt),
      scale=jnp.where(ok, info.min_scale, 0).astype(dt),
      clipped=clipped > 0,
      clipped_count=add_count(state.clipped_count, clipped),
      nonfinite_count=add_count(state.nonfinite_count, nonfinite),
      invalid_count=add_count(state.invalid_count, (~ok).astype(jnp.int32)),
      threshold=jnp.asarray(max_norm).astype(dt).reshape([]),
      update_norm=global_norm(aggregate).astype(dt),
      norm_max=jnp.asarray(info.max_norm).astype(dt),
      clipped_fraction=fraction,
      examples=n,
      example_count=add_count(state.example_count, n),
  )


def clip_per_example(
    max_norm: ArrayLike,
    *,
    normalize: bool = False,
    gamma: ArrayLike = 0.01,
    reduce: Reduce = "sum",
    axis_name: AxisName = None,
    name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Per-example clipping as the first transformation of an optax chain (DP-SGD's clip step).

  ``update`` takes *per-example* gradients (every leaf with a leading batch axis) and returns
  their clipped sum or mean (:func:`clipax.per_example_clip`), shaped like the parameters, so
  the rest of the chain (noise, an optimizer, ``optax.MultiSteps``) sees ordinary gradients.
  It cannot sit behind another transformation or inside ``optax.masked`` (those pass the
  per-example tree on unchanged). Extra arguments of ``update``: ``mask=`` (a ``[batch]`` bool
  vector, false for padding rows) and ``per_example_info=``: the ``info`` returned by
  :func:`clipax.per_example_clipped_grad` (the microbatched path), in which case ``updates``
  must be that function's aggregate and are passed through, only recorded.

  Args:
    max_norm: the per-example clip norm (> 0; may be injected with ``inject_hyperparams``).
    normalize: AUTO-S normalisation instead of clipping (see :func:`clipax.per_example_clip`).
    gamma: AUTO-S's stability constant (> 0).
    reduce: ``"sum"`` or ``"mean"`` over the counted examples.
    axis_name: the ``shard_map``/``pmap`` axis the batch is sharded over (sums and counts
      all-reduced).
    name: the name of its keys in :func:`clipax.metrics`; default ``per_example``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`clipax.PerExampleState`; :func:`clipax.metrics` reports ``norm`` (mean per-example
    norm), ``norm_max``, ``clipped_fraction`` (last update), ``clip_rate`` (all updates),
    ``nonfinite_count``, ``examples`` and the shared clipper keys.

  Raises:
    ValueError: as :func:`clipax.per_example_clip`; in ``update``, for ``mask`` given together
      with ``per_example_info``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import clipax
    >>> params = {"w": jnp.zeros(2)}
    >>> loss = lambda p, x: jnp.sum((p["w"] - x) ** 2)
    >>> xs = jnp.array([[1.0, 0.0], [0.0, 0.1], [100.0, 0.0]])
    >>> per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, xs)
    >>> tx = optax.chain(clipax.clip_per_example(1.0, reduce="mean"), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(per_example, state, params)
    >>> print([round(float(u), 3) for u in updates["w"]])
    [0.667, 0.067]
    >>> m = clipax.metrics(state)
    >>> print(f"{m['clip/per_example/clipped_fraction']:.3f}", int(m["clip/per_example/examples"]))
    0.667 3

  References:
    Abadi et al., 2016, https://arxiv.org/abs/1607.00133; Bu et al., 2023 (AUTO-S),
    https://arxiv.org/abs/2206.07136
  """
  check_args(max_norm, normalize, gamma, reduce)
  _checks.axis_name(axis_name)

  def init_fn(params):
    del params
    return _init_state(max_norm)

  def update_fn(updates, state, params=None, *, mask=None, per_example_info=None, **extra):
    del params, extra
    if per_example_info is None:
      aggregate, info = per_example_clip(updates, max_norm, mask=mask, normalize=normalize,
                                         gamma=gamma, reduce=reduce, axis_name=axis_name)
    elif mask is not None:
      raise ValueError("clip_per_example: pass `mask` to per_example_clipped_grad, not with "
                       "`per_example_info` (the aggregate is already computed)")
    else:
      aggregate, info = updates, per_example_info
    return aggregate, _record(state, info, aggregate, max_norm)

  tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
  return named(tx, "per_example", name)
