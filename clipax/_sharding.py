"""Sums over shards: the local reduction of a list of leaves and its one collective.

With ``axis_name`` (inside ``shard_map``/``pmap``) the leaves are shards along that axis and one
scalar (one vector for per-leaf norms) is all-reduced per norm, never one collective per leaf;
leaves marked ``replicated`` (the same on every shard) are counted on the first shard only.
Without it the sums are local (under plain ``jit`` GSPMD makes them global).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from clipax import _platform, _rescue
from clipax._elements import AxisName, Replicated, Specs
from clipax._grouping import gpu_blocks, gpu_row_sums, gpu_sums, rows_first


def _psum(x: jax.Array, axis_name: AxisName) -> jax.Array:
  return x if axis_name is None else lax.psum(x, axis_name)


def _pmax(x: jax.Array, axis_name: AxisName) -> jax.Array:
  return x if axis_name is None else lax.pmax(x, axis_name)


def _total(parts: list[jax.Array], dtype: jnp.dtype, combine: Callable) -> jax.Array:
  if not parts:
    return jnp.zeros([], dtype)
  return combine(jnp.stack([p.astype(dtype) for p in parts]))


def _first_shard(axis_name: AxisName) -> jax.Array:
  """True on the shard at index 0 along every axis of ``axis_name`` (a name or a tuple)."""
  names = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
  return jnp.all(jnp.stack([lax.axis_index(a) == 0 for a in names]))


def replicated_mask(tree: Any, replicated: Replicated, what: str = "global_norm") -> list[bool]:
  """One python bool per leaf of ``tree`` (``tree_leaves`` order): is that leaf replicated?

  ``replicated`` is ``None`` (no leaf), a bool (every leaf), a pytree prefix of ``tree`` with
  bool leaves, or a function from a leaf's key path (a tuple of ``jax.tree_util`` keys) to bool.

  Raises:
    ValueError: when ``replicated`` is not a prefix of ``tree`` or holds something not a bool.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  if replicated is None:
    return [False] * len(flat)
  if callable(replicated):
    return [bool(replicated(path)) for path, _ in flat]

  def expand(flag, subtree):
    if not isinstance(flag, (bool, np.bool_)):
      raise ValueError(f"{what}: `replicated` must hold python bools, got {flag!r}")
    return [bool(flag)] * len(jax.tree_util.tree_leaves(subtree))

  try:
    nested = jax.tree_util.tree_map(expand, replicated, tree)
  except (TypeError, ValueError) as e:
    if str(e).startswith(what):
      raise
    raise ValueError(
        f"{what}: `replicated` must be a bool, a pytree prefix of the gradients with bool leaves "
        f"or a predicate on the key path, got {replicated!r} ({e})"
    ) from None
  return jax.tree_util.tree_leaves(nested)  # the lists' bools, in leaf order


def check_replicated(replicated: Replicated) -> None:
  """Construction-time check: ``None``, a callable, or a pytree whose leaves are all bools."""
  if replicated is None or callable(replicated):
    return
  bad = [x for x in jax.tree_util.tree_leaves(replicated) if not isinstance(x, (bool, np.bool_))]
  if bad:
    raise ValueError(
        "`replicated` must be None, a bool, a pytree prefix of the gradients with bool leaves or "
        f"a predicate on the key path, got a leaf {bad[0]!r} of type {type(bad[0]).__name__}"
    )


def _sum_shards(
    leaves: list[jax.Array],
    fn: Callable[[jax.Array], jax.Array] | Sequence[Callable[[jax.Array], jax.Array]],
    dtype: jnp.dtype,
    axis_name: AxisName,
    replicated: Sequence[bool] | None,
    cpu: bool = False,
    gpu: bool = False,
) -> jax.Array:
  """``sum(fn(block))`` over all shards, one ``psum``; replicated leaves counted once.

  ``fn`` may be a list of functions: the result is then the vector of their sums, each reducing
  the same blocks (sibling reductions that XLA fuses into one pass), all-reduced in one ``psum``.
  ``cpu``: the caller compiles for the CPU only; float16 blocks are summed by :func:`_cpu_sum`.
  ``gpu``: for a GPU only; the leaves are grouped by :func:`clipax._grouping.gpu_blocks`.
  """
  fns = list(fn) if isinstance(fn, (list, tuple)) else None
  block_sum = _platform._cpu_sum if cpu else (lambda b, f: jnp.sum(f(b)))

  def local(xs):
    blocks = gpu_blocks(xs, _platform._maybe_sharded) if gpu else _platform._blocks(xs)
    if fns is None:
      return _total([block_sum(b, fn) for b in blocks], dtype, jnp.sum)
    if _rescue._VARIADIC_RESCUE and not cpu:
      per_block = [_rescue._variadic_sums(b, fns, dtype) for b in blocks]
      return jnp.stack([_total([p[i] for p in per_block], dtype, jnp.sum) for i in range(len(fns))])
    if gpu:
      # the leaves reduced by rows first add up as vectors of their sums (see gpu_row_sums)
      large = [gpu_row_sums(b, fns, dtype) for b in blocks if rows_first(b)]
      small = [gpu_sums(b, fns, dtype) for b in blocks if not rows_first(b)]
      total = jnp.stack([_total([p[i] for p in small], dtype, jnp.sum) for i in range(len(fns))])
      return total + jnp.sum(jnp.stack(large), axis=0) if large else total
    return jnp.stack([_total([block_sum(b, f) for b in blocks], dtype, jnp.sum) for f in fns])

  if axis_name is None or not replicated or not any(replicated):
    return _psum(local(leaves), axis_name)
  sharded = [x for x, r in zip(leaves, replicated, strict=True) if not r]
  total = local(sharded)
  for axes in _replica_sets(replicated, axis_name):
    copies = [x for x, r in zip(leaves, replicated, strict=True) if _replicas(r, axis_name) == axes]
    total = total + jnp.where(_first_shard(axes), local(copies), 0)
  return _psum(total, axis_name)


def _replicas(r: bool | tuple[str, ...], axis_name: AxisName) -> tuple[str, ...]:
  """The axes a leaf is replicated over: all of ``axis_name`` for ``True``, none for ``False``,
  or the tuple given (from ``specs``, see :func:`layout`)."""
  if isinstance(r, tuple):
    return r
  if not r:
    return ()
  return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (str(axis_name),)


def _replica_sets(replicated: Sequence, axis_name: AxisName) -> list[tuple[str, ...]]:
  """The distinct non-empty replica axes of the leaves, in the order they first appear."""
  out: list[tuple[str, ...]] = []
  for r in replicated:
    axes = _replicas(r, axis_name)
    if axes and axes not in out:
      out.append(axes)
  return out


def _count_once(sums: jax.Array, axis_name: AxisName, replicated: Sequence | None) -> jax.Array:
  """Per-leaf partial sums with each replicated leaf zeroed on all shards but the first along
  the axes it is replicated over."""
  if axis_name is None or not replicated or not any(replicated):
    return sums
  elsewhere: Any
  if all(isinstance(r, (bool, np.bool_)) for r in replicated):
    elsewhere = np.asarray(replicated, bool) & ~_first_shard(axis_name)
  else:
    first = {axes: _first_shard(axes) for axes in _replica_sets(replicated, axis_name)}
    false = jnp.zeros([], jnp.bool_)
    elsewhere = jnp.stack([~first[a] if (a := _replicas(r, axis_name)) else false
                           for r in replicated])
  return jnp.where(elsewhere, jnp.zeros([], sums.dtype), sums)


# ----------------------------------------------------------------------------- specs

_VARYING = "varying"


def check_specs(
    specs: Specs, axis_name: AxisName = None, replicated: Replicated = None,
    layer_axis: Any = None,
) -> None:
  """Construction-time check of ``specs``: ``None``, ``"varying"`` or a pytree of
  ``PartitionSpec``; never together with ``axis_name``, ``replicated`` or ``layer_axis``."""
  if specs is None:
    return
  if layer_axis is not None:
    raise ValueError("`specs` with `layer_axis` is not supported (the specs describe the stacked "
                     "leaves, not their layers); under plain `jit` sharded stacked leaves need "
                     f"neither (got layer_axis={layer_axis!r})")
  if axis_name is not None or replicated is not None:
    raise ValueError(
        "`specs` gives the mesh axes of every leaf; pass it instead of `axis_name` and "
        f"`replicated`, not with them (got axis_name={axis_name!r}, replicated={replicated!r})")
  if isinstance(specs, str):
    if specs != _VARYING:
      raise ValueError(f'`specs` must be a pytree of PartitionSpec or "varying", got {specs!r}')
    return
  for spec in jax.tree_util.tree_leaves(specs, is_leaf=_is_spec):
    if not isinstance(spec, PartitionSpec):
      raise TypeError(f"`specs` must hold PartitionSpec leaves, got {spec!r} of type "
                      f"{type(spec).__name__}")


def _is_spec(x: Any) -> bool:
  return x is None or isinstance(x, PartitionSpec)


def _spec_names(spec: PartitionSpec | None) -> tuple[str, ...]:
  names: list[str] = []
  for entry in spec or ():
    for name in entry if isinstance(entry, tuple) else (entry,):
      if isinstance(name, str) and name not in names:
        names.append(name)
  return tuple(names)


def _varying(x: Any) -> tuple[str, ...]:
  """The manual mesh axes a value inside ``shard_map`` varies over (sorted), from its type."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)
  names = getattr(manual, "varying", None)
  if names is None:
    names = getattr(aval, "vma", None)
  return tuple(sorted(names or ()))


def sharded_axes(tree: Any, specs: Specs, what: str = "global_norm") -> list[tuple[str, ...]]:
  """One tuple per leaf of ``tree`` (``tree_leaves`` order): the mesh axes that leaf is split
  over, from ``specs`` (a pytree prefix of ``PartitionSpec``, as given to ``shard_map``'s
  ``in_specs``) or, for ``specs="varying"``, from each leaf's type (its varying manual axes)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  if isinstance(specs, str):
    check_specs(specs)
    return [_varying(x) for _, x in flat]

  def expand(spec, subtree):
    if not _is_spec(spec):
      raise TypeError(f"{what}: `specs` must hold PartitionSpec leaves, got {spec!r:.60} of type "
                      f"{type(spec).__name__}")
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(subtree)[0]:
      if spec is not None and len(spec) > jnp.ndim(x):
        raise ValueError(f"{what}: `specs` gives {spec} for a leaf of shape {jnp.shape(x)} "
                         f"({jax.tree_util.keystr(path) or '<root>'} of the subtree)")
      out.append(_spec_names(spec))
    return out

  try:
    nested = jax.tree_util.tree_map(expand, specs, tree, is_leaf=_is_spec)
  except (TypeError, ValueError) as e:
    if str(e).startswith(what):
      raise
    raise ValueError(f"{what}: `specs` must be a pytree prefix of the gradients with "
                     f"PartitionSpec leaves ({e})") from None
  return [axes for group in jax.tree_util.tree_leaves(nested, is_leaf=lambda x: isinstance(
      x, list)) for axes in group]


def layout(
    tree: Any, axis_name: AxisName, replicated: Replicated, specs: Specs,
    what: str = "global_norm",
) -> tuple[AxisName, list]:
  """``(axis_name, replicated)`` for the norms: as given, or derived from ``specs``.

  From ``specs``: the all-reduce runs over every mesh axis some leaf is split over (one
  collective, whatever the layout), and each leaf is counted on the first shard only along the
  axes of that set it is *not* split over (it holds the same values there). A leaf split over
  ``expert`` and ``model`` is summed over both; a dense weight split over ``model`` only is summed
  over ``model`` and counted once along ``expert``; a leaf split over nothing is counted once.
  """
  if specs is None:
    return axis_name, replicated_mask(tree, replicated, what)
  check_specs(specs, axis_name, replicated)
  axes = sharded_axes(tree, specs, what)
  names = tuple(sorted({a for leaf in axes for a in leaf}))
  if not names:
    return None, [False] * len(axes)
  return names, [tuple(a for a in names if a not in leaf) for leaf in axes]


def global_sizes(tree: Any, specs: Specs, what: str) -> list[int]:
  """Each leaf's number of elements over the whole mesh: its local size times the sizes of the
  mesh axes ``specs`` splits it over (inside ``shard_map``; without ``specs``, its size)."""
  leaves = jax.tree_util.tree_leaves(tree)
  if specs is None:
    return [int(jnp.size(x)) for x in leaves]
  return [int(jnp.size(x)) * math.prod(lax.axis_size(a) for a in axes)
          for x, axes in zip(leaves, sharded_axes(tree, specs, what), strict=True)]
