"""Clipping with fixed thresholds: global norm, per-leaf norm and block RMS (value: ``_value.py``).

Each clipper is ``measure -> threshold -> act -> record``: the norm comes from ``_norms``, the
scale ``min(1, threshold / norm)`` is computed in float32 and applied once per leaf, and the
pre-clip norm, scale and counters go into a :class:`~clipax.ClipState`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.typing import ArrayLike

from clipax import _checks, _platform
from clipax._checks import Nonfinite
from clipax._elements import AxisName, Replicated, Specs, canonical_ord, float_leaves
from clipax._measure import check_leaf_metrics, init_leaf_norms, measure
from clipax._norms import _global
from clipax._sharding import check_replicated, check_specs
from clipax._state import applied_norm, clip_state, init_clip_state, named, record, stat_dtype


def scale_for(norm: jax.Array, max_norm: Any) -> tuple[jax.Array, jax.Array]:
  """``(min(1, max_norm / norm), norm > max_norm)`` in ``norm``'s dtype, finite everywhere.

  Both ``where``s keep the gradient finite at ``norm == 0`` and ``norm == max_norm``. A negative
  (traced) threshold acts as 0.
  """
  c = jnp.maximum(jnp.asarray(max_norm).astype(norm.dtype), 0)
  over = norm > c
  return jnp.where(over, c / jnp.where(over, norm, 1), 1), over


def _apart_on_cpu(g: jax.Array, tag: jax.Array) -> jax.Array:
  """``g``, behind an optimization barrier (together with ``tag``) when compiling for the CPU.

  The norm and the rescale of a float16/bfloat16 leaf both start with ``g.astype(float32)``.
  XLA:CPU merges the two converts (CSE) and then writes the whole float32 copy to memory, a
  fresh buffer every step, because its fused reductions cannot take the shared convert: 4x
  slower clipping on a bfloat16 transformer tree (optax is hit the same way). The barrier keeps
  the two converts apart, so each fuses into its own pass. ``tag`` (the scale, the threshold)
  makes this barrier differ from the one on the same leaf in ``_platform._peak``, which CSE would
  otherwise merge with it. GPU and TPU fuse a shared convert into both consumers, and their
  programs are left as they were.
  """
  def apart(x, t):
    return lax.optimization_barrier((x, t))[0]

  return lax.platform_dependent(g, tag, cpu=apart, default=lambda x, t: x)


def rescale(
    g: jax.Array,
    scale: jax.Array,
    zero: jax.Array | None = None,
    nan: jax.Array | None = None,
) -> jax.Array:
  """``g * scale`` in ``g``'s dtype; zeros where ``zero`` is true, NaN where ``nan`` is.

  Float16/bfloat16 leaves are multiplied in float32 and rounded once, so a small scale loses no
  precision; wider leaves are multiplied by the scale cast to their dtype. A scale of exactly 1
  returns ``g`` bit-identical.
  """
  if jnp.issubdtype(g.dtype, jnp.floating) and g.dtype.itemsize < 4:
    out = _apart_on_cpu(g, scale).astype(jnp.float32) * scale.astype(jnp.float32)
    out = out.astype(g.dtype)
  else:
    out = g * scale.astype(jnp.finfo(g.dtype).dtype)
  if nan is not None:
    out = jnp.where(nan, jnp.full([], jnp.nan, out.dtype), out)
  if zero is not None:
    out = jnp.where(zero, jnp.zeros([], out.dtype), out)
  return out


class Action(NamedTuple):
  """What the shared non-finite and invalid-hyperparameter rules do to one step.

  Attributes:
    bad: the step's norm is NaN or Inf (counted in ``nonfinite_count``).
    invalid: a traced hyperparameter is NaN or out of range (``invalid_count``); ``None`` when
      every hyperparameter is a python number.
    zero: where the update is zeroed: ``bad`` under ``nonfinite="zero"``, and ``invalid``
      always; ``None`` for never.
    nan: where every element becomes NaN: ``bad`` under ``nonfinite="propagate"``.
  """

  bad: jax.Array
  invalid: jax.Array | None
  zero: jax.Array | None
  nan: jax.Array | None

  def apply(self, g: jax.Array, scale: jax.Array) -> jax.Array:
    return rescale(g, scale, self.zero, self.nan)

  def recorded(self, scale: jax.Array) -> jax.Array:
    """The scale to record: 0 where zeroed, NaN where propagated."""
    if self.nan is not None:
      scale = jnp.where(self.nan, jnp.nan, scale)
    if self.zero is not None:
      scale = jnp.where(self.zero, 0, scale)
    return scale

  def clipped(self, over: jax.Array) -> jax.Array:
    """``over``, for a step that was acted on normally (finite norm, valid hyperparameters)."""
    ok = ~self.bad if self.invalid is None else ~(self.bad | self.invalid)
    return over & ok


def action(norm: jax.Array, nonfinite: Nonfinite, invalid: jax.Array | None = None) -> Action:
  """The :class:`Action` for a step with this norm, policy and invalid-hyperparameter flag."""
  bad = ~jnp.isfinite(norm)
  if nonfinite == "zero":
    return Action(bad, invalid, _checks.any_of(bad, invalid), None)
  nan = bad if invalid is None else bad & ~invalid
  return Action(bad, invalid, invalid, nan)


def invalid_threshold(value: Any) -> jax.Array | None:
  """A traced threshold that is NaN or negative (``+inf`` is valid: clipping off)."""
  return _checks.invalid(value, low=0.0, allow_inf=True)


def combine_norms(norms: list[jax.Array], ord: float) -> jax.Array:
  """The ``ord``-norm of a set of norms (or norm arrays): the global norm of the tree they came
  from, measured by :mod:`clipax._norms` with its exact overflow rescue."""
  if not norms:
    return jnp.zeros([], jnp.float32)
  # One vector: norms are replicated results, so concatenating them gathers nothing; left as
  # separate leaves on a mesh each would be a block of its own (``_maybe_sharded``), its rescue
  # sums kernels of their own on a GPU (188 for the sharded benchmark tree).
  return _global([jnp.concatenate([jnp.ravel(n) for n in norms])], ord, None)


def _clip(
    tree: Any, norm: jax.Array, max_norm: Any, nonfinite: Nonfinite, what: str
) -> tuple[Any, jax.Array, jax.Array, Action]:
  treedef: Any = jax.tree_util.tree_structure(tree)
  leaves = float_leaves(tree, what)
  scale, over = scale_for(norm, max_norm)
  act = action(norm, nonfinite, invalid_threshold(max_norm))
  out = treedef.unflatten([act.apply(g, s) for g, s in zip(leaves, _shared(scale, len(leaves)),
                                                             strict=True)])
  return out, act.recorded(scale), act.clipped(over), act


def _shared(scale: jax.Array, n: int) -> list[jax.Array]:
  """``n`` copies of the global ``scale``, one per leaf. On a GPU each is a slice of one vector
  (kept as a vector by an optimization barrier): XLA:GPU then merges the leaves' update kernels
  into a few multi-output ones (sibling fusion over the shared vector), which it does not do over
  a shared scalar: the H100 train step of the benchmark tree, 220 -> 39 kernels. The CPU and
  the TPU take the scalar itself."""
  if n == 0:
    return []

  def gpu():
    vec = lax.optimization_barrier(jnp.broadcast_to(scale, (n,)))
    return [vec[i] for i in range(n)]

  return _platform._by_platform(lambda: [scale] * n, lambda: [scale] * n, gpu)


def clip_with_norm(
    tree: Any, norm: ArrayLike, max_norm: ArrayLike, *, nonfinite: Nonfinite = "zero"
) -> Any:
  """Scales ``tree`` by ``min(1, max_norm / norm)`` using a norm you already have.

  The second half of the two-phase pair :func:`global_norm` then :func:`clip_with_norm`: compute
  the norm once, log or all-reduce it, then clip with it.

  Args:
    tree: a pytree of floating arrays (gradients).
    norm: its norm, e.g. from :func:`clipax.global_norm`.
    max_norm: the threshold (number or array).
    nonfinite: ``"zero"`` (default) returns all zeros when ``norm`` is NaN or Inf;
      ``"propagate"`` passes the non-finite values through.

  Returns:
    The clipped tree, same structure and dtypes.

  Raises:
    ValueError: for a negative concrete ``norm``; for a negative, non-finite or non-numeric
      python ``max_norm``, or an unknown ``nonfinite``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import clipax
    >>> grads = {"w": jnp.array([3.0, 4.0])}
    >>> norm = clipax.global_norm(grads)
    >>> print(clipax.clip_with_norm(grads, norm, 1.0)["w"].tolist())
    [0.6000000238418579, 0.800000011920929]
  """
  _checks.threshold("max_norm", max_norm)
  _checks.nonfinite(nonfinite)
  given = norm
  if given is None or isinstance(given, (str, bytes, bool, np.bool_)):
    raise TypeError(f"`norm` must be a number or a scalar array, got {given!r}")
  try:
    norm = jnp.asarray(norm)
  except (TypeError, ValueError) as err:
    raise TypeError(f"`norm` must be a number or a scalar array, got {given!r}") from err
  if norm.shape != () or not jnp.issubdtype(norm.dtype, jnp.number):
    raise TypeError(
        f"`norm` must be a real scalar (e.g. from clipax.global_norm), got shape {norm.shape} "
        f"and dtype {norm.dtype}"
    )
  if jnp.issubdtype(norm.dtype, jnp.complexfloating):
    raise TypeError(f"`norm` must be real, got dtype {norm.dtype}")
  if not jnp.issubdtype(norm.dtype, jnp.floating):
    norm = norm.astype(jnp.float32)
  concrete = given if isinstance(given, (int, float, np.number)) else (
      None if _checks.is_traced(norm) else norm)
  if concrete is not None and float(concrete) < 0:
    raise ValueError(f"`norm` must be >= 0 (a norm), got {given!r}")
  return _clip(tree, norm, max_norm, nonfinite, "clip_with_norm")[0]


def clip_by_global_norm(
    max_norm: ArrayLike,
    *,
    ord: int | float | str = 2,
    axis_name: AxisName = None,
    replicated: Replicated = None,
    nonfinite: Nonfinite = "zero",
    name: str | None = None,
    leaf_metrics: bool = False,
    specs: Specs = None,
) -> optax.GradientTransformation:
  r"""Scales all updates together so that their global norm is at most ``max_norm``.

  .. math::
    g \leftarrow g \cdot \min\Big(1, \frac{c}{\|g\|}\Big)

  The norm is accumulated in float32 (see :func:`clipax.global_norm`), the scale is computed in
  float32 and applied once per leaf, so float16/bfloat16 gradients never overflow the norm and a
  float32 array ``max_norm`` works with bfloat16 gradients. Updates under the threshold pass
  through bit-identical and every leaf gets the same scale, so the direction is kept exactly.

  Args:
    max_norm: the threshold ``c`` >= 0; a python number (validated now) or an array (e.g. from
      ``optax.inject_hyperparams``). 0 gives all-zero updates.
    ord: 1, 2 (default) or ``math.inf``.
    axis_name: inside ``shard_map``/``pmap`` with sharded gradients, the axis (or tuple of axes)
      to all-reduce the norm over (one scalar per step), so every shard gets the same scale. Not
      needed under plain ``jit`` nor after ``lax.pmean``. Without it, inside ``shard_map`` each
      shard clips its own piece by that piece's norm (optax's behaviour there).
    replicated: with ``axis_name``, the leaves that are the same on every shard (biases kept
      whole under tensor parallelism), counted once in the norm: a bool, a pytree prefix of the
      updates with bool leaves, or a function from a leaf's key path to a bool (see
      :func:`clipax.global_norm`).
    specs: inside ``shard_map``, instead of ``axis_name`` and ``replicated``: the updates'
      ``PartitionSpec`` s (the ``in_specs`` pytree) or ``"varying"`` (read from the arrays'
      types); each leaf is summed over exactly the mesh axes it is split over, for any layout
      (see :func:`clipax.global_norm`).
    nonfinite: ``"zero"`` (default): a NaN/Inf norm gives all-zero updates and is counted in
      ``nonfinite_count``; ``"propagate"``: passed through (as optax and PyTorch do), still
      counted.
    name: the name of this clipper's keys in :func:`clipax.metrics`
      (``clip/{name}/norm``); default: its ``optax.named_chain`` key, else ``global_norm``.
    leaf_metrics: also keep every leaf's pre-clip norm (``clip/{name}/leaf_norm/<path>``),
      computed in the same pass over the gradients as the global norm.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`clipax.ClipState`.

  Raises:
    ValueError: for a negative, non-finite or non-numeric ``max_norm``, an unknown ``ord`` or
      ``nonfinite``, a ``replicated`` with leaves that are not bools, or ``specs`` together
      with ``axis_name`` or ``replicated``.
    TypeError: for ``specs`` holding something other than ``PartitionSpec``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import clipax
    >>> tx = optax.chain(clipax.clip_by_global_norm(1.0), optax.sgd(1.0))
    >>> params = {"w": jnp.zeros(2, jnp.float16)}
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.full(2, 300.0, jnp.float16)}  # optax: inf norm, zero update
    >>> updates, state = jax.jit(tx.update)(grads, state, params)
    >>> print([f"{u:.4f}" for u in updates["w"].tolist()])
    ['-0.7070', '-0.7070']
    >>> print(f"{clipax.metrics(state)['clip/global_norm/norm']:.2f}")
    424.26

  References:
    Pascanu, Mikolov, Bengio, "On the difficulty of training recurrent neural networks", 2013,
    https://arxiv.org/abs/1211.5063
  """
  _checks.threshold("max_norm", max_norm)
  _checks.nonfinite(nonfinite)
  check_replicated(replicated)
  _checks.axis_name(axis_name)
  check_specs(specs, axis_name, replicated)
  ord = canonical_ord(ord)
  check_leaf_metrics(leaf_metrics)

  def init_fn(params):
    return init_clip_state(max_norm, init_leaf_norms(params, leaf_metrics, stat_dtype()))

  def update_fn(updates, state, params=None):
    del params
    with jax.named_scope("clipax/clip_by_global_norm"):
      norm, leaves = measure(updates, ord=ord, axis_name=axis_name, replicated=replicated,
                             specs=specs, leaf_metrics=leaf_metrics, dtype=state.norm.dtype)
      out, scale, clipped, act = _clip(updates, norm, max_norm, nonfinite, "clip_by_global_norm")
      base = record(state, norm, scale, clipped, act.bad, act.invalid)
      return out, clip_state(base, max_norm, applied_norm(base.norm, base.scale), leaves)

  return named(optax.GradientTransformation(init_fn, update_fn), "global_norm", name)
