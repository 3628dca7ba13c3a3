"""Sums over shards: the local reduction of a list of leaves and its one collective.

With ``axis_name`` (inside ``shard_map``/``pmap``) the leaves are shards along that axis and one
scalar (one vector for per-leaf norms) is all-reduced per norm, never one collective per leaf;
leaves marked ``replicated`` (the same on every shard) are counted on the first shard only.
Without it the sums are local (under plain ``jit`` GSPMD makes them global).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from clipax import _platform, _rescue
from clipax._elements import AxisName, Replicated
from clipax._grouping import gpu_blocks, gpu_sums


def _psum(x: jax.Array, axis_name: AxisName) -> jax.Array:
  return x if axis_name is None else lax.psum(x, axis_name)


def _pmax(x: jax.Array, axis_name: AxisName) -> jax.Array:
  return x if axis_name is None else lax.pmax(x, axis_name)


def _total(parts: list[jax.Array], dtype: jnp.dtype, combine: Callable) -> jax.Array:
  if not parts:
    return jnp.zeros([], dtype)
  return combine(jnp.stack([p.astype(dtype) for p in parts]))


def _first_shard(axis_name: AxisName) -> jax.Array:
  """True on the shard at index 0 along every axis of ``axis_name``."""
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
      per_block = [gpu_sums(b, fns, dtype) for b in blocks]
      return jnp.stack([_total([p[i] for p in per_block], dtype, jnp.sum) for i in range(len(fns))])
    return jnp.stack([_total([block_sum(b, f) for b in blocks], dtype, jnp.sum) for f in fns])

  if axis_name is None or not replicated or not any(replicated):
    return _psum(local(leaves), axis_name)
  sharded = [x for x, r in zip(leaves, replicated, strict=True) if not r]
  copies = [x for x, r in zip(leaves, replicated, strict=True) if r]
  once = jnp.where(_first_shard(axis_name), local(copies), 0)
  return _psum(local(sharded) + once, axis_name)


def _count_once(
    sums: jax.Array, axis_name: AxisName, replicated: Sequence[bool] | None
) -> jax.Array:
  """Per-leaf partial sums with the replicated leaves zeroed on all shards but the first."""
  if axis_name is None or not replicated or not any(replicated):
    return sums
  elsewhere = np.asarray(replicated, bool) & ~_first_shard(axis_name)
  return jnp.where(elsewhere, jnp.zeros([], sums.dtype), sums)
