"""The public norms: :func:`global_norm` and :func:`leaf_norms` (unit-wise norms:
:mod:`clipax._unitwise`).

Every norm in clipax is computed with the pieces these two put together, each in its own module:

* :mod:`clipax._elements`: the ``ord`` dispatch, float32 accumulation, the checked leaves;
* :mod:`clipax._platform`: one program per platform, the CPU's and TPU's grouping of small leaves
  and the CPU's half-precision workarounds (the GPU's grouping: :mod:`clipax._grouping`);
* :mod:`clipax._rescue`: the exact root of a sum that overflowed or underflowed in float32;
* :mod:`clipax._sharding`: the local sums and their one collective over ``axis_name``,
  replicated leaves counted once.

This module adds the derivatives (custom JVPs that stay finite where the rescued sums would not)
and the public functions' argument handling.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from clipax import _checks, _layers, _platform, _rescue
from clipax._elements import (
    AxisName,
    Replicated,
    Specs,
    _magnitude,
    _result_dtype,
    by_ord,
    canonical_ord,
    float_leaves,
)
from clipax._grouping import gpu_blocks, gpu_leaf_reduce, gpu_row_sums, rows_first
from clipax._platform import _cpu_sum, _peak
from clipax._rescue import _exact_root, _variadic_sums
from clipax._sharding import (
    _count_once,
    _pmax,
    _psum,
    _sum_shards,
    _total,
    layout,
)


def _global_value(
    leaves: list[jax.Array],
    ord: float,
    axis_name: AxisName,
    replicated: Sequence[bool] | None = None,
) -> jax.Array:
  """The global norm; ``replicated[i]``: leaf ``i`` is the same on every shard of ``axis_name``."""
  dtype = _result_dtype(leaves)
  raw, raw_replicated = leaves, replicated  # the GPU groups the leaves its own way
  if axis_name is None or not replicated or not any(replicated):
    # Concatenate the small leaves once, outside the lax.cond below, so that its rescue branch
    # closes over a few blocks rather than every leaf: on trees of thousands of leaves that cuts
    # compile time by a third (benchmarks/README.md). ``_blocks`` of blocks is the same blocks.
    # (Compiled for one platform, the blocks that platform does not use are dead code.)
    leaves, replicated = _platform._blocks(leaves), None
  if ord == math.inf:
    def peak(cpu, gpu=False):
      blocks = gpu_blocks(raw, _platform._maybe_sharded) if gpu else _platform._blocks(leaves)
      return _total([_peak(b, cpu) for b in blocks], dtype, jnp.max)

    peak_of = _platform._by_platform(lambda: peak(True), lambda: peak(False),
                                     lambda: peak(False, True))
    return _pmax(peak_of, axis_name)

  def sums(fns, factor, cpu, gpu=False):
    xs, rep = (raw, raw_replicated) if gpu else (leaves, replicated)
    if callable(fns):
      return _sum_shards(xs, lambda b: fns(b, factor), dtype, axis_name, rep, cpu=cpu, gpu=gpu)
    powers = [lambda b, fn=fn: fn(b, factor) for fn in fns]
    return _sum_shards(xs, powers, dtype, axis_name, rep, cpu=cpu, gpu=gpu)

  return _exact_root(sums, ord, dtype)


# Derivatives. Differentiating through the rescued sums directly overflows: the reverse pass of
# ``sqrt(s_down) * 2**100`` has a cotangent ``2**199 / norm`` for ``s_down``, inf for norms below
# 2e21. The norm's derivative is simply ``Re(conj(x) dx) / norm`` (ord 2) or ``Re(sign(x) dx)``
# (ord 1), so that is what the JVP rules below compute, on top of whichever way the value was
# measured. At a zero norm the (sub)gradient is 0, never NaN.


def _unit(x: jax.Array, n: jax.Array, ord: float) -> jax.Array:
  """The derivative of the norm with respect to ``x``, as the coefficient of ``Re(c * dx)``."""
  acc = n.dtype
  if ord == 1:
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
      mag = jnp.abs(x).astype(acc)
      return jnp.where(mag > 0, jnp.conj(x) / jnp.where(mag > 0, mag, 1).astype(x.dtype), 0)
    return jnp.sign(x).astype(acc)
  safe = jnp.where(n > 0, n, 1)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    return jnp.where(n > 0, jnp.conj(x) / safe.astype(x.dtype), 0)
  return jnp.where(n > 0, x.astype(acc) / safe, 0)


def _pair(c: jax.Array, dx: jax.Array, acc: jnp.dtype) -> jax.Array:
  """``Re(c * dx)`` in the accumulation dtype."""
  if jnp.issubdtype(c.dtype, jnp.complexfloating) or jnp.issubdtype(dx.dtype, jnp.complexfloating):
    return jnp.real(c * dx.astype(c.dtype)).astype(acc)
  return c.astype(acc) * dx.astype(acc)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _global_smooth(ord, axis_name, replicated, leaves):
  return _global_value(list(leaves), ord, axis_name, replicated)


@_global_smooth.defjvp
def _global_smooth_jvp(ord, axis_name, replicated, primals, tangents):
  (leaves,), (dleaves,) = primals, tangents
  n = _global_smooth(ord, axis_name, replicated, leaves)
  products = [_pair(_unit(x, n, ord), dx, n.dtype) for x, dx in zip(leaves, dleaves, strict=True)]
  return n, _sum_shards(products, lambda p: p, n.dtype, axis_name, replicated)


def _global(
    leaves: list[jax.Array],
    ord: float,
    axis_name: AxisName,
    replicated: Sequence[bool] | None = None,
) -> jax.Array:
  """The global norm, with an overflow-safe derivative (ord 1 and 2)."""
  if ord == math.inf or not leaves:
    return _global_value(leaves, ord, axis_name, replicated)
  rep = _hashable_mask(replicated)
  return _global_smooth(ord, _hashable(axis_name), rep, tuple(leaves))


def _hashable_mask(replicated: Sequence | None) -> tuple | None:
  """The replicated mask as a custom_jvp static argument: bools, or tuples of axes (specs)."""
  if replicated is None:
    return None
  return tuple(r if isinstance(r, tuple) else bool(r) for r in replicated)


def _hashable(axis_name: AxisName) -> AxisName:
  return tuple(axis_name) if isinstance(axis_name, list) else axis_name


def global_norm(
    tree: Any,
    *,
    ord: int | float | str = 2,
    axis_name: AxisName = None,
    replicated: Replicated = None,
    specs: Specs = None,
) -> jax.Array:
  r"""The norm of all the leaves of a pytree taken together, accumulated in float32.

  .. math::
    \|g\|_p = \Big(\sum_{\text{leaves } l} \sum_i |g_{l,i}|^p\Big)^{1/p},
    \qquad \|g\|_\infty = \max_{l,i} |g_{l,i}|

  Squares are summed in float32 whatever the leaf dtype (float64 when x64 is on and a leaf is
  float64). If that sum overflows although every element is finite, or is too small to be
  exact, the norm is recomputed inside the compiled program on the elements rescaled by an exact
  power of two, so the result is right from 1e-30 to 1e30 and beyond. (Subnormal elements,
  below 1.2e-38 in float32, are flushed to zero by XLA on CPU and GPU.)

  Args:
    tree: a pytree of floating or complex arrays. ``None`` leaves and zero-size arrays count as
      zero; complex leaves use :math:`|x|^2`.
    ord: 1, 2 or ``math.inf`` (also ``"inf"``).
    axis_name: inside ``shard_map`` or ``pmap``, the mesh axis (or tuple of axes) the leaves are
      sharded over; the per-shard partial sum is all-reduced as one scalar (``lax.psum``,
      ``lax.pmax`` for ``ord=inf``). Leave it ``None`` under plain ``jit`` with sharded arrays
      (the norm is already global) and for replicated gradients (after ``lax.pmean``). Without
      it, inside ``shard_map`` each shard gets the norm of its own piece only.
    replicated: with ``axis_name``, the leaves that are the same on every shard (a bias kept
      whole under tensor parallelism), counted once instead of once per shard: ``None`` (no
      leaf), a bool, a pytree prefix of ``tree`` with bool leaves (``{"w": False, "b": True}``)
      or a function from a leaf's key path to a bool. Ignored when ``axis_name`` is ``None``.
      Replicated means replicated over every axis in ``axis_name``; still one scalar psum.
    specs: inside ``shard_map``, instead of ``axis_name`` and ``replicated``: the gradients'
      ``PartitionSpec`` s (a pytree prefix of ``tree``, as given to ``in_specs``), or
      ``"varying"`` to read each leaf's varying mesh axes from its type (``jax.typeof``). Each
      leaf is summed over exactly the mesh axes it is split over and counted once along the
      others, for any layout (data x model, expert-parallel, FSDP); one all-reduce, over every
      axis some leaf is split over.

  Returns:
    A float32 scalar (float64 if a leaf is float64), the same on every shard.

  Raises:
    ValueError: for an unknown ``ord``, an integer/boolean leaf (the message names its path), a
      ``replicated`` that is not a prefix of ``tree`` with bool leaves, ``specs`` given with
      ``axis_name`` or ``replicated``, or a spec longer than its leaf's rank.
    TypeError: for ``specs`` holding something other than ``PartitionSpec``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import clipax
    >>> grads = {"w": jnp.full((4,), 300.0, jnp.float16), "b": jnp.zeros((2,), jnp.bfloat16)}
    >>> print(f"{clipax.global_norm(grads):.1f}")  # optax gives inf here
    600.0
    >>> print(f"{clipax.global_norm({'w': jnp.full((3,), 1e20)}):.4e}")
    1.7321e+20

    Inside ``shard_map``, a kernel split over ``"model"`` and a bias every device holds whole:

    >>> import jax
    >>> from jax.sharding import AxisType, PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("model",), axis_types=(AxisType.Auto,))
    >>> grads = {"w": jnp.full((4, 2), 0.5), "b": jnp.ones(3)}
    >>> norm_fn = lambda g: clipax.global_norm(
    ...     g, axis_name="model", replicated={"w": False, "b": True})
    >>> specs = {"w": P(None, "model"), "b": P()}
    >>> norm = jax.shard_map(norm_fn, mesh=mesh, in_specs=(specs,), out_specs=P())(grads)
    >>> print(f"{norm:.4f}")
    2.2361
  """
  ord = canonical_ord(ord)
  _checks.axis_name(axis_name)
  leaves = float_leaves(tree)
  axis_name, rep = layout(tree, axis_name, replicated, specs)
  with jax.named_scope("clipax/global_norm"):
    return by_ord(ord, lambda o: _global(leaves, o, axis_name, rep))


def _leafwise_value(
    leaves: list[jax.Array],
    ord: float,
    axis_name: AxisName,
    replicated: Sequence[bool] | None = None,
) -> list[jax.Array]:
  """One norm per leaf, with a single collective for all of them."""
  if not leaves:
    return []
  dtype = _result_dtype(leaves)

  if ord == math.inf:
    def peaks(cpu):
      return jnp.stack([_peak(x, cpu).astype(dtype) for x in leaves])

    def gpu_peaks():
      peak = lambda b, axes: jnp.max(_magnitude(b), axis=axes, initial=0).astype(dtype)
      return jnp.stack(gpu_leaf_reduce(leaves, peak, _platform._maybe_sharded))

    return list(_pmax(_platform._by_platform(lambda: peaks(True), lambda: peaks(False), gpu_peaks),
                      axis_name))

  def sums(fns, factor, cpu, gpu=False):
    def one(x, fn, i):
      power = lambda b: fn(b, None if factor is None else factor[i])
      return (_cpu_sum(x, power) if cpu else jnp.sum(power(x))).astype(dtype)

    def row(fn):
      return _count_once(jnp.stack([one(x, fn, i) for i, x in enumerate(leaves)]), axis_name,
                         replicated)

    if callable(fns):
      return _psum(row(fns), axis_name)
    if gpu:  # the factor is None on this (branch-free) path
      powers = [lambda b, fn=fn: fn(b, None) for fn in fns]

      def reduce(b, axes):  # (len(fns),) for a leaf alone, (k, len(fns)) for a stack of k
        if len(axes) == b.ndim and rows_first(b):
          return gpu_row_sums(b, powers, dtype)
        if len(axes) == b.ndim:  # the sums as one vector: stacked, reduced together
          return jnp.sum(jnp.stack([f(b).astype(dtype) for f in powers]),
                         axis=tuple(range(1, b.ndim + 1)))
        return jnp.stack([jnp.sum(f(b), axis=axes).astype(dtype) for f in powers], axis=-1)

      # (leaves, fns)
      per_leaf = jnp.stack(gpu_leaf_reduce(leaves, reduce, _platform._maybe_sharded))
      rows = [_count_once(per_leaf[:, k], axis_name, replicated) for k in range(len(fns))]
      return _psum(jnp.stack(rows), axis_name)
    if _rescue._VARIADIC_RESCUE and not cpu:
      # the factor is None on this (branch-free) path
      per_leaf = [_variadic_sums(x, [lambda b, fn=fn: fn(b, None) for fn in fns], dtype)
                  for x in leaves]
      rows = [jnp.stack([p[k] for p in per_leaf]) for k in range(len(fns))]
      rows = [_count_once(r, axis_name, replicated) for r in rows]
      return _psum(jnp.stack(rows), axis_name)
    return _psum(jnp.stack([row(fn) for fn in fns]), axis_name)

  return list(_exact_root(sums, ord, dtype))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _leafwise_smooth(ord, axis_name, replicated, leaves):
  return jnp.stack(_leafwise_value(list(leaves), ord, axis_name, replicated))


@_leafwise_smooth.defjvp
def _leafwise_smooth_jvp(ord, axis_name, replicated, primals, tangents):
  (leaves,), (dleaves,) = primals, tangents
  n = _leafwise_smooth(ord, axis_name, replicated, leaves)
  t = jnp.stack([
      jnp.sum(_pair(_unit(x, n[i], ord), dx, n.dtype))
      for i, (x, dx) in enumerate(zip(leaves, dleaves, strict=True))
  ])
  return n, _psum(_count_once(t, axis_name, replicated), axis_name)


def _leafwise(
    leaves: list[jax.Array],
    ord: float,
    axis_name: AxisName,
    replicated: Sequence[bool] | None = None,
) -> list[jax.Array]:
  """One norm per leaf (one collective for all), with an overflow-safe derivative."""
  if ord == math.inf or not leaves:
    return _leafwise_value(leaves, ord, axis_name, replicated)
  rep = _hashable_mask(replicated)
  return list(_leafwise_smooth(ord, _hashable(axis_name), rep, tuple(leaves)))


def leaf_norms(
    tree: Any,
    *,
    ord: int | float | str = 2,
    axis_name: AxisName = None,
    replicated: Replicated = None,
    specs: Specs = None,
    layer_axis: _layers.LayerAxis = None,
) -> Any:
  """The norm of each leaf on its own, accumulated in float32 like :func:`global_norm`.

  Args:
    tree: a pytree of floating or complex arrays.
    ord: 1, 2 or ``math.inf``.
    axis_name: mesh/pmap axis the leaves are sharded over; all the per-leaf partial sums travel
      in one vector all-reduce.
    replicated: with ``axis_name``, the leaves that are the same on every shard (counted once),
      as in :func:`global_norm`.
    specs: inside ``shard_map``, the gradients' ``PartitionSpec`` s or ``"varying"``, instead of
      ``axis_name`` and ``replicated`` (see :func:`global_norm`); one vector all-reduce.
    layer_axis: stacked (scanned) layers: a leaf stacked along its layer axis counts as L
      separate layers, one norm each (of the slice ``x[i]`` along that axis), bit-for-bit the
      norms of the unstacked leaves for a leading layer axis (a strided one: up to the order
      XLA sums it in, an ulp). ``None`` (default): no stacked leaf; an int: every leaf is
      stacked along that axis; a pytree prefix of ``tree`` with int/``None`` leaves
      (``{"layers": 0, "embed": None}``); or a function ``(key_path, leaf) -> int | None``.
      Inside ``shard_map`` the layer axis must not be one the leaf is split over.

  Returns:
    A pytree of the same structure as ``tree`` with a float32 scalar per leaf, and a float32
    ``(L,)`` vector of per-layer norms for each stacked leaf.

  Raises:
    ValueError: for an unknown ``ord``, an integer/boolean leaf, a bad ``replicated``, or a
      ``layer_axis`` out of range for a leaf (the message names its path).
    TypeError: for a ``layer_axis`` that is none of the forms above.

  Examples:
    >>> import jax.numpy as jnp
    >>> import clipax
    >>> norms = clipax.leaf_norms({"a": jnp.array([3.0, 4.0]), "b": jnp.ones((4,), jnp.bfloat16)})
    >>> print(f"{norms['a']:.1f} {norms['b']:.1f}")
    5.0 2.0

    Three layers stacked along axis 0 (as ``nnx.scan`` and ``nn.scan`` keep them), a norm each:

    >>> stacked = {"w": jnp.array([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]]), "b": jnp.ones(2)}
    >>> norms = clipax.leaf_norms(stacked, layer_axis={"w": 0, "b": None})
    >>> print(norms["w"].tolist(), f"{norms['b']:.4f}")
    [5.0, 1.0, 10.0] 1.4142
  """
  ord = canonical_ord(ord)
  _checks.axis_name(axis_name)
  _layers.check_layer_axis(layer_axis, "leaf_norms")
  treedef: Any = jax.tree_util.tree_structure(tree)
  with jax.named_scope("clipax/leaf_norms"):
    leaves = float_leaves(tree, "leaf_norms")
    axes, rep = layout(tree, axis_name, replicated, specs, "leaf_norms")
    stacking = _layers.resolve(tree, layer_axis, "leaf_norms")
    if stacking is not None:  # each layer of a stacked leaf is a leaf of its own
      layers, rep = stacking.split(leaves), stacking.repeat(rep)
      norms = by_ord(ord, lambda o: _leafwise(layers, o, axes, rep))
      return treedef.unflatten(stacking.stack(norms, _result_dtype(leaves)))
    return treedef.unflatten(by_ord(ord, lambda o: _leafwise(leaves, o, axes, rep)))
