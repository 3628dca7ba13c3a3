"""Per-example clipping: each example's gradient clipped (or normalised) before they are summed.

The core of DP-SGD (Abadi et al., 2016) and a robust aggregate outside DP: one outlier example
moves the sum by at most ``max_norm``. The input is a per-example gradient pytree, every leaf
with a leading batch axis (what ``jax.vmap(jax.grad(loss))`` gives); the output has the batch
axis summed away. Two entry points, because an optax transformation's output must match the
parameters while this one's *input* does not:

* :func:`per_example_clip`, a plain function ``(grads, max_norm) -> (aggregate, info)`` like
  ``optax.per_example_global_norm_clip``;
* :func:`clip_per_example`, a transformation for the *head* of a chain (``init`` takes the
  parameters, ``update`` the per-example gradients), which keeps the counts in its state for
  :func:`clipax.metrics`. It also records the result of the microbatched path
  (below) passed as ``per_example_info=``;
* :func:`per_example_clipped_grad`, from a per-example loss to the clipped aggregate, optionally
  microbatched (``optax.microbatching.microbatch`` runs the loop): it never holds more than
  ``microbatch_size`` per-example gradients at once.

Each example's global norm is accumulated in float32 (:func:`clipax.global_norm`, vmapped over
the batch) and the clipped gradients are summed in float32, whatever the leaf dtype. Non-finite
policy: an example whose norm is NaN or Inf contributes zero, is counted in ``nonfinite`` (and
in the state's ``nonfinite_count``) and never poisons the others; padding rows (``mask`` false)
are left out of the sum and every count, even if they hold NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.typing import ArrayLike

from clipax import _checks
from clipax._norms import global_norm

# The shard_map/pmap axis (or axes) the batch is sharded over.
AxisName = str | tuple[str, ...] | None
Reduce = Literal["sum", "mean"]


class PerExampleInfo(NamedTuple):
  """What one per-example clipping call measured (every field the same on every shard).

  Attributes:
    examples: int32, number of examples counted (``mask`` true).
    clipped: int32, counted finite examples whose gradient was scaled down (factor < 1).
    nonfinite: int32, counted examples whose norm was NaN or Inf (they contributed zero).
    mean_norm: float32, mean pre-clip norm of the counted finite examples (0 if none).
    max_norm: float32, largest pre-clip norm of the counted finite examples (0 if none).
    min_scale: float32, smallest factor applied to a counted example (0 for a non-finite one,
      1 when nothing was counted).
    invalid: bool, a traced ``max_norm`` or ``gamma`` was NaN or out of range: the aggregate
      is zero.
    loss: from :func:`clipax.per_example_clipped_grad`, the mean loss of the counted examples;
      ``None`` from :func:`per_example_clip`.
  """

  examples: jax.Array
  clipped: jax.Array
  nonfinite: jax.Array
  mean_norm: jax.Array
  max_norm: jax.Array
  min_scale: jax.Array
  invalid: jax.Array
  loss: Any = None


class Sums(NamedTuple):
  """Per-shard (or per-microbatch) partial results, added up before :func:`finish`."""

  grads: Any  # float32 (float64 for float64 leaves) sums of the scaled gradients
  examples: jax.Array
  clipped: jax.Array
  nonfinite: jax.Array
  norm_sum: jax.Array
  norm_max: jax.Array
  scale_min: jax.Array
  loss_sum: Any = None


def _where(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def batch_size(tree: Any, what: str, arg: str, floating: bool = False) -> int:
  """The common leading-axis size of every leaf of ``tree`` (with ``floating``, every leaf
  floating or complex); raises naming the leaf."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  if not flat:
    raise ValueError(f"{what}: `{arg}` has no leaves; per-example inputs need a batch axis")
  first = None
  for path, leaf in flat:
    shape = getattr(leaf, "shape", None)
    if shape is None:
      raise TypeError(f"{what}: `{arg}` leaf {_where(path)} is {leaf!r:.60} of type "
                      f"{type(leaf).__name__}, not an array with a leading batch axis")
    dtype = getattr(leaf, "dtype", None)
    if floating and not (dtype is not None and jnp.issubdtype(dtype, jnp.inexact)):
      raise ValueError(f"{what}: `{arg}` leaf {_where(path)} has dtype {dtype}; gradients "
                       "must be floating or complex")
    if len(shape) == 0:
      raise ValueError(f"{what}: `{arg}` leaf {_where(path)} is a scalar; every leaf needs a "
                       "leading batch axis (as jax.vmap(jax.grad(loss)) gives)")
    if first is None:
      first = (path, shape[0])
    elif shape[0] != first[1]:
      raise ValueError(
          f"{what}: every leaf of `{arg}` needs the same batch size; leaf {_where(path)} has "
          f"shape {tuple(shape)}, leaf {_where(first[0])} has batch size {first[1]}")
  assert first is not None
  return int(first[1])


def keep_mask(mask: Any, size: int, what: str) -> jax.Array:
  """``mask`` (bool or 0/1 of shape ``[size]``, ``None`` for all) as a bool vector."""
  if mask is None:
    return jnp.ones([size], jnp.bool_)
  shape = tuple(getattr(mask, "shape", np.shape(mask)))
  if shape != (size,):
    shown = f" ({mask!r:.60})" if not hasattr(mask, "shape") else ""
    raise ValueError(f"{what}: `mask` must have shape ({size},) (one entry per example), got "
                     f"shape {shape}{shown}")
  dtype = getattr(mask, "dtype", None)
  dtype = np.asarray(mask).dtype if dtype is None else dtype
  if not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.number)):
    raise TypeError(f"{what}: `mask` must be bool or 0/1 numbers, got dtype {dtype}")
  if dtype != jnp.bool_ and not _checks.is_traced(mask):
    values = np.asarray(mask)
    if not np.isin(values, (0, 1)).all():
      raise ValueError(f"{what}: `mask` must hold only 0 and 1 (or bools), got "
                       f"{values.tolist()!r:.60}")
  m = jnp.asarray(mask)
  return m if m.dtype == jnp.bool_ else m != 0


def check_args(max_norm: Any, normalize: Any, gamma: Any, reduce: Any) -> None:
  """Construction-time checks shared by every per-example entry point."""
  if not isinstance(normalize, (bool, np.bool_)):
    raise TypeError(f"`normalize` must be a bool, got {normalize!r}")
  _checks.number("max_norm", max_norm, low=0.0, low_open=True, allow_inf=not normalize)
  _checks.number("gamma", gamma, low=0.0, low_open=True)
  _checks.choice("reduce", reduce, ("sum", "mean"))


def invalid_flag(max_norm: Any, normalize: bool, gamma: Any) -> jax.Array:
  """In the compiled step: a traced ``max_norm`` or ``gamma`` NaN or out of range."""
  flag = _checks.any_of(
      _checks.invalid(max_norm, low=0.0, low_open=True, allow_inf=not normalize),
      _checks.invalid(gamma, low=0.0, low_open=True) if normalize else None)
  return jnp.zeros([], jnp.bool_) if flag is None else flag


def _acc(dtype) -> jnp.dtype:
  return jnp.promote_types(dtype, jnp.float32)


def local_sums(grads: Any, max_norm: Any, keep: jax.Array, normalize: bool,
               gamma: Any) -> Sums:
  """The clipped sums of this shard's (or microbatch's) examples; no collective."""
  leaves, treedef = jax.tree_util.tree_flatten(grads)
  norms = jax.vmap(lambda *xs: global_norm(list(xs)))(*leaves)
  dt = norms.dtype
  finite = jnp.isfinite(norms)
  use = keep & finite
  c = jnp.asarray(max_norm).astype(dt)
  if normalize:  # AUTO-S: every example to norm < max_norm, smoothly
    scale = c / (norms + jnp.asarray(gamma).astype(dt))
  else:
    scale = jnp.where(norms > c, c / jnp.where(norms > c, norms, 1), jnp.ones_like(norms))
  scale = jnp.where(use, scale, jnp.zeros_like(scale))
  sums = []
  for x in leaves:
    bshape = (-1,) + (1,) * (x.ndim - 1)
    y = jnp.where(use.reshape(bshape), x, jnp.zeros([], x.dtype)).astype(_acc(x.dtype))
    sums.append(jnp.sum(y * scale.reshape(bshape).astype(y.dtype), axis=0))
  counted = keep.astype(jnp.int32)
  fnorm = jnp.where(use, norms, jnp.zeros_like(norms))
  return Sums(
      grads=jax.tree_util.tree_unflatten(treedef, sums),
      examples=jnp.sum(counted),
      clipped=jnp.sum((use & (scale < 1)).astype(jnp.int32)),
      nonfinite=jnp.sum((keep & ~finite).astype(jnp.int32)),
      norm_sum=jnp.sum(fnorm),
      norm_max=jnp.max(fnorm, initial=0.0),
      scale_min=jnp.min(jnp.where(keep, scale, jnp.ones_like(scale)), initial=1.0),
  )


def finish(s: Sums, like: Any, reduce: str, axis_name: AxisName,
           invalid: jax.Array) -> tuple[Any, PerExampleInfo]:
  """All-reduces the partial sums over ``axis_name`` and casts to the dtypes of ``like``."""
  if axis_name is not None:
    s = s._replace(
        grads=lax.psum(s.grads, axis_name), examples=lax.psum(s.examples, axis_name),
        clipped=lax.psum(s.clipped, axis_name), nonfinite=lax.psum(s.nonfinite, axis_name),
        norm_sum=lax.psum(s.norm_sum, axis_name), norm_max=lax.pmax(s.norm_max, axis_name),
        scale_min=lax.pmin(s.scale_min, axis_name),
        loss_sum=None if s.loss_sum is None else lax.psum(s.loss_sum, axis_name))
  n = jnp.maximum(s.examples, 1)
  denom = n if reduce == "mean" else jnp.ones([], jnp.int32)

  def out(g, x):
    v = g / denom.astype(g.dtype)
    return jnp.where(invalid, jnp.zeros_like(v), v).astype(x.dtype)

  aggregate = jax.tree_util.tree_map(out, s.grads, like)
  finite = jnp.maximum(s.examples - s.nonfinite, 1).astype(s.norm_sum.dtype)
  info = PerExampleInfo(
      examples=s.examples, clipped=s.clipped, nonfinite=s.nonfinite,
      mean_norm=s.norm_sum / finite, max_norm=s.norm_max, min_scale=s.scale_min,
      invalid=invalid,
      loss=None if s.loss_sum is None else s.loss_sum / n.astype(s.loss_sum.dtype))
  return aggregate, info


def per_example_clip(
    grads: Any,
    max_norm: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    normalize: bool = False,
    gamma: ArrayLike = 0.01,
    reduce: Reduce = "sum",
    axis_name: AxisName = None,
) -> tuple[Any, PerExampleInfo]:
  r"""Clips every example's gradient to a global norm of ``max_norm``, then sums (or averages).

  .. math::
    \bar g = \sum_{i:\,m_i} g_i \min\Big(1, \frac{C}{\|g_i\|}\Big)
    \quad\text{or, with } \texttt{normalize}\text{ (AUTO-S),}\quad
    \bar g = \sum_{i:\,m_i} g_i \frac{C}{\|g_i\| + \gamma}

  Each :math:`\|g_i\|` is the global L2 norm of example ``i``'s gradient across all leaves,
  accumulated in float32 whatever the dtype; the sum is taken in float32 and cast back to each
  leaf's dtype. Where both are defined (finite gradients, no mask, ``reduce="sum"``) the result
  equals ``optax.per_example_global_norm_clip(grads, max_norm)``. Every example's contribution
  has norm at most ``max_norm`` (strictly below with ``normalize``), the sensitivity DP-SGD adds
  noise for. An example with a NaN/Inf norm contributes zero and is counted in
  ``info.nonfinite`` (optax's lets it turn the whole sum into NaN); a row with ``mask`` false is
  left out of the sum and every count.

  Args:
    grads: per-example gradients: a pytree whose leaves all have the same leading batch axis.
    max_norm: the clip norm ``C`` (> 0; ``inf`` clips nothing, not with ``normalize``). May be
      traced; a traced value that is NaN or <= 0 gives a zero aggregate and ``info.invalid``.
    mask: optional ``[batch]`` bool (or 0/1) vector, false for padding rows.
    normalize: AUTO-S (Bu et al., 2023): scale every example by ``C / (||g_i|| + gamma)``
      instead of clipping; ``info.clipped`` then counts the examples scaled by less than 1.
    gamma: AUTO-S's stability constant (> 0), 0.01 as in the paper.
    reduce: ``"sum"`` (DP-SGD adds the noise to the sum) or ``"mean"`` (divided by the number
      of counted examples, at least 1).
    axis_name: inside ``shard_map``/``pmap`` with the *batch* sharded over this axis, the sums
      and counts are all-reduced (``psum``), so every shard gets the global aggregate.

  Returns:
    ``(aggregate, info)``: a pytree like one example of ``grads`` (batch axis removed, leaf
    dtypes kept) and a :class:`PerExampleInfo` of counts and norms.

  Raises:
    ValueError: for a leaf without a batch axis or with another batch size (naming its path), a
      ``mask`` of the wrong shape or (when concrete) holding numbers other than 0 and 1,
      ``max_norm <= 0``, ``gamma <= 0`` or an unknown ``reduce``.
    TypeError: for a non-array leaf, a non-bool ``normalize`` or a non-numeric ``mask``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import clipax
    >>> grads = {"w": jnp.array([[0.0, 0.0], [3.0, 4.0], [30.0, 40.0]])}  # 3 examples
    >>> total, info = clipax.per_example_clip(grads, 1.0)
    >>> print([round(float(g), 4) for g in total["w"]], int(info.clipped), float(info.max_norm))
    [1.2, 1.6] 2 50.0
    >>> total, info = clipax.per_example_clip(grads, 1.0, mask=jnp.array([1, 1, 0]))
    >>> print([round(float(g), 4) for g in total["w"]], int(info.examples))
    [0.6, 0.8] 2

  References:
    Abadi et al., "Deep Learning with Differential Privacy", CCS 2016,
    https://arxiv.org/abs/1607.00133;
    Bu, Wang, Zha, Karypis, "Automatic Clipping: Differentially Private Deep Learning Made
    Easier and Stronger", NeurIPS 2023, https://arxiv.org/abs/2206.07136
  """
  check_args(max_norm, normalize, gamma, reduce)
  _checks.axis_name(axis_name)
  size = batch_size(grads, "per_example_clip", "grads", floating=True)
  keep = keep_mask(mask, size, "per_example_clip")
  invalid = invalid_flag(max_norm, bool(normalize), gamma)
  with jax.named_scope("clipax/per_example_clip"):
    sums = local_sums(grads, max_norm, keep, bool(normalize), gamma)
    return finish(sums, grads, reduce, axis_name, invalid)  # (only the leaves' dtypes are read)


def _extreme(op, start: float) -> Any:
  """An ``optax.microbatching.Accumulator`` keeping the running ``op`` (max or min)."""
  return optax.microbatching.Accumulator(
      init=lambda v: jnp.full(v.shape, start, v.dtype),
      update=lambda carry, value, _: op(carry, value),
      finalize=lambda carry: carry,
      aggregate=lambda values: op.reduce(values, axis=0),
  )


_SUM = optax.microbatching.AccumulationType.SUM
# How the microbatches' partial results combine: sums and counts add up, the extremes don't.
_ACCUMULATOR = Sums(grads=_SUM, examples=_SUM, clipped=_SUM, nonfinite=_SUM, norm_sum=_SUM,
                    norm_max=_extreme(jnp.maximum, 0.0), scale_min=_extreme(jnp.minimum, 1.0),
                    loss_sum=_SUM)


def per_example_clipped_grad(
    loss_fn: Callable[..., Any],
    max_norm: ArrayLike,
    *,
    microbatch_size: int | None = None,
    normalize: bool = False,
    gamma: ArrayLike = 0.01,
    reduce: Reduce = "sum",
    axis_name: AxisName = None,
) -> Callable[..., tuple[Any, PerExampleInfo]]:
  """The clipped sum of per-example gradients of ``loss_fn``, computed microbatch by microbatch.

  ``loss_fn(params, *example)`` is the loss of *one* example (no batch axis). The returned
  function ``fn(params, *batch, mask=None)`` takes arguments whose leaves all have a leading
  batch axis and returns what :func:`per_example_clip` returns for
  ``jax.vmap(jax.grad(loss_fn), in_axes=(None, 0, ...))(params, *batch)``, with ``info.loss``
  the mean loss of the counted examples. With ``microbatch_size`` the batch is cut into
  microbatches of that many examples, taken one after the other by
  ``optax.microbatching.microbatch`` (a ``fori_loop``), each one's per-example gradients
  clipped and added to float32 running sums: peak memory holds ``microbatch_size`` per-example
  gradients instead of ``batch`` of them (the sum is the same up to float32 rounding order).

  Args:
    loss_fn: ``loss_fn(params, *example) -> scalar loss`` of one example.
    max_norm: the per-example clip norm (> 0).
    microbatch_size: examples per microbatch; must divide the batch size (pad the batch and
      pass ``mask``). ``None`` (default): the whole batch at once.
    normalize: AUTO-S normalisation instead of clipping (see :func:`per_example_clip`).
    gamma: AUTO-S's stability constant (> 0).
    reduce: ``"sum"`` or ``"mean"`` over the counted examples.
    axis_name: inside ``shard_map`` with the batch sharded over this axis: each shard runs its
      own microbatches, then sums and counts are all-reduced once.

  Returns:
    ``fn(params, *batch, mask=None) -> (aggregate, info)``: ``aggregate`` shaped like
    ``params`` (their dtypes), ``info`` a :class:`PerExampleInfo`. Works under ``jit``.

  Raises:
    ValueError: as :func:`per_example_clip`; for a ``microbatch_size`` < 1 or, when ``fn`` is
      called, one that does not divide the batch size.
    TypeError: for a ``loss_fn`` that is not callable, or ``fn`` called without a batch; when
      ``fn`` is called, for a ``loss_fn`` whose value is not a real floating scalar.

  Examples:
    >>> import jax.numpy as jnp
    >>> import clipax
    >>> loss = lambda w, x, y: (jnp.dot(w, x) - y) ** 2
    >>> xs, ys = jnp.eye(4, 2) * 10.0, jnp.array([1.0, 0.0, 0.0, 0.0])
    >>> fn = clipax.per_example_clipped_grad(loss, 1.0, microbatch_size=2)
    >>> total, info = fn(jnp.ones(2), xs, ys)
    >>> print(total, int(info.clipped), float(info.loss))
    [1. 1.] 2 45.25
  """
  check_args(max_norm, normalize, gamma, reduce)
  _checks.axis_name(axis_name)
  if not callable(loss_fn):
    raise TypeError(f"`loss_fn` must be callable, got {loss_fn!r:.60}")
  if microbatch_size is not None:
    _checks.number("microbatch_size", microbatch_size, low=1, integer=True, allow_array=False)
  norm_flag = bool(normalize)

  def one_loss(params, *example):
    loss = loss_fn(params, *example)
    dtype = getattr(loss, "dtype", None)
    if (jnp.ndim(loss) if hasattr(loss, "shape") else -1) != 0 or dtype is None or not (
        jnp.issubdtype(dtype, jnp.floating)):
      shown = (f"shape {tuple(loss.shape)}, dtype {dtype}" if hasattr(loss, "shape")
               else f"{loss!r:.60} of type {type(loss).__name__}")
      raise TypeError(f"per_example_clipped_grad: `loss_fn` must return one example's loss, a "
                      f"real floating scalar array, got {shown}")
    return loss

  def clipped(params, *args):
    *batch, keep = args
    in_axes = (None,) + (0,) * len(batch)
    losses, grads = jax.vmap(jax.value_and_grad(one_loss), in_axes=in_axes)(params, *batch)
    sums = local_sums(grads, max_norm, keep, norm_flag, gamma)
    losses = jnp.asarray(losses).astype(_acc(jnp.asarray(losses).dtype))
    return sums._replace(loss_sum=jnp.sum(jnp.where(keep, losses, jnp.zeros_like(losses))))

  def fn(params, *batch, mask=None):
    if not batch:
      raise TypeError("per_example_clipped_grad: call fn(params, *batch) with at least one "
                      "batch argument")
    size = batch_size(batch, "per_example_clipped_grad", "batch")
    keep = keep_mask(mask, size, "per_example_clipped_grad")
    invalid = invalid_flag(max_norm, norm_flag, gamma)
    with jax.named_scope("clipax/per_example_clipped_grad"):
      if microbatch_size is None or microbatch_size == size:
        sums = clipped(params, *batch, keep)
      else:
        if size % microbatch_size:
          raise ValueError(
              f"per_example_clipped_grad: `microbatch_size` ({microbatch_size}) must divide the "
              f"batch size ({size}); pad the batch and pass `mask`")
        run = optax.microbatching.microbatch(
            clipped, argnums=tuple(range(1, len(batch) + 2)), microbatch_size=microbatch_size,
            accumulator=_ACCUMULATOR)
        sums = run(params, *batch, keep)
      return finish(sums, params, reduce, axis_name, invalid)

  return fn
