"""How the norms group leaves on a GPU, so that a whole tree is reduced in a few kernels.

A GPU step over a tree of many leaves is bound by kernel launches, not bandwidth: one reduction
per leaf is one (small leaves) or two (large leaves: a row pass, then a scalar pass) kernels, 260
for the 200-leaf benchmark tree. XLA's GPU backend fuses a concatenation (or a stack) into the
reduction that reads it, so the concatenated buffer is never written, *as long as the fusion
stays under its operand limit*: seen on the H100 target (jaxlib 0.10.2), concatenations of up
to 80 leaves fuse and those of 96 or more are materialised first (a 480 MB temporary buffer for
the 100M-parameter tree). Groups of at most :data:`GPU_GROUP` = 64 leaves keep a margin for the
three sums of the overflow rescue; the benchmark tree's norm then takes 15 kernels, its
per-leaf norms 16 and AGC's unit-wise norms of gradients and parameters 21 together (against 412
one leaf at a time; ``benchmarks/compiled.py``), each gradient still read once.

The TPU is different: it writes a concatenated buffer first, so there the leaves are reduced one
by one (``_platform._blocks``) and nothing here is used. Leaves that a mesh may shard (GSPMD) are
never concatenated or stacked: that would gather them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

GPU_GROUP = 64
"""At most this many leaves per concatenation or stack on the GPU (see the module docstring)."""
ROWS_FIRST = 1 << 16
"""Leaves kept whole of at least this many elements are reduced by rows first (:func:`gpu_sums`)."""


def gpu_blocks(leaves: Sequence[jax.Array], sharded: Callable[[jax.Array], bool]) -> list:
  """The blocks a global norm reduces on a GPU: local leaves raveled and concatenated per dtype
  in groups of at most :data:`GPU_GROUP`; leaves for which ``sharded(x)`` alone."""
  blocks: list[jax.Array] = []
  local: dict[jnp.dtype, list[jax.Array]] = {}
  for x in leaves:
    if x.size == 0:
      continue
    if sharded(x):
      blocks.append(x)
    else:
      local.setdefault(x.dtype, []).append(x.ravel())
  for group in local.values():
    for i in range(0, len(group), GPU_GROUP):
      part = group[i : i + GPU_GROUP]
      blocks.append(part[0] if len(part) == 1 else jnp.concatenate(part))
  return blocks


def gpu_leaf_reduce(
    leaves: Sequence[jax.Array],
    reduce: Callable[[jax.Array, tuple[int, ...]], jax.Array],
    sharded: Callable[[jax.Array], bool],
) -> list[jax.Array]:
  """``[reduce(x, all axes of x) for x in leaves]``, computed on a GPU over stacks of same-shape,
  same-dtype local leaves (at most :data:`GPU_GROUP` per stack): one reduction per stack
  instead of one per leaf. ``reduce(block, axes)`` reduces ``block`` over ``axes`` (for a stack,
  every axis but the leading one). Leaves for which ``sharded(x)``, and one-element leaves, are
  reduced alone (:func:`gpu_unit_reduce` with every axis of each leaf)."""
  return gpu_unit_reduce(leaves, [tuple(range(x.ndim)) for x in leaves], reduce, sharded)


def gpu_unit_reduce(
    leaves: Sequence[jax.Array],
    axes: Sequence[tuple[int, ...]],
    reduce: Callable[[jax.Array, tuple[int, ...]], jax.Array],
    sharded: Callable[[jax.Array], bool],
) -> list[jax.Array]:
  """``[reduce(x, a) for x, a in zip(leaves, axes)]`` (``reduce`` may keep the reduced axes, as
  the per-unit norms do), computed on a GPU over stacks of local leaves of one shape, dtype and
  ``axes`` (at most :data:`GPU_GROUP` per stack), so that XLA fuses each stack into one reduction
  instead of one per leaf. Leaves for which ``sharded(x)``, and one-element leaves, alone."""
  out: list[jax.Array | None] = [None] * len(leaves)
  groups: dict[tuple, list[int]] = {}
  for i, (x, a) in enumerate(zip(leaves, axes, strict=True)):
    # One-element leaves alone: stacked, their sum disappears and XLA may rewrite the rescue's
    # scaled squares (see ``_rescue._scaled_powers``).
    if sharded(x) or x.size <= 1:
      out[i] = reduce(x, a)
    else:
      groups.setdefault((x.shape, x.dtype, a), []).append(i)
  for ids in groups.values():
    for start in range(0, len(ids), GPU_GROUP):
      part = ids[start : start + GPU_GROUP]
      if len(part) == 1:
        out[part[0]] = reduce(leaves[part[0]], axes[part[0]])
        continue
      stacked = reduce(jnp.stack([leaves[i] for i in part]), tuple(d + 1 for d in axes[part[0]]))
      for k, i in enumerate(part):
        out[i] = stacked[k]
  return out  # type: ignore[return-value]


def gpu_sums(b: jax.Array, fns: Sequence[Callable], dtype) -> list[jax.Array]:
  """``[sum(f(b)) for f in fns]`` for a GPU. A leaf kept whole (a sharded one) of two or more
  dimensions and at least :data:`ROWS_FIRST` elements is reduced over its last axis first,
  every ``f`` in one multi-output kernel, and the row results of all ``f`` then in one more:
  left to itself XLA:GPU splits each of the sums of a large leaf into a row kernel and a scalar
  kernel of its own (three sums: four kernels more per leaf). Stacking the row results of one
  leaf moves no data between devices: they share the leaf's sharding."""
  if not rows_first(b):
    return [jnp.sum(f(b)).astype(dtype) for f in fns]
  totals = gpu_row_sums(b, fns, dtype)
  return [totals[i] for i in range(len(fns))]


def rows_first(b: jax.Array) -> bool:
  """Whether :func:`gpu_sums` reduces ``b`` (a leaf kept whole) over its last axis first."""
  return b.ndim >= 2 and b.size >= ROWS_FIRST


def gpu_row_sums(b: jax.Array, fns: Sequence[Callable], dtype) -> jax.Array:
  """The sums of :func:`gpu_sums` for a ``b`` reduced by rows first, as one ``(len(fns),)``
  vector: a caller that adds the sums of many leaves adds these vectors, rather than slicing
  each into scalars (on the sharded benchmark tree that slicing cost 11 kernels of its own)."""
  rows = jnp.stack([jnp.sum(f(b).astype(dtype), axis=-1) for f in fns])
  return jnp.sum(rows, axis=tuple(range(1, rows.ndim)))
