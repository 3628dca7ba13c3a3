"""One program per platform: the choice between the CPU's, the GPU's and the TPU's reduction, and
the CPU's and TPU's way of grouping leaves (the GPU's: :mod:`clipax._grouping`).

* :func:`_by_platform` compiles one of two or three functions, chosen by the platform the program
  is compiled for (``lax.platform_dependent``); the tests force each path on the CPU by patching
  this module's ``_by_platform``;
* under plain ``jit`` small leaves are concatenated (per dtype, in groups of 128) before reducing
  (:func:`_blocks`), only when they are not sharded over a mesh (:func:`_maybe_sharded`), so GSPMD
  never gathers a sharded gradient to measure it;
* on the CPU, float16/bfloat16 leaves never make XLA write a float32 copy of the gradients
  (float16 blocks are reduced in cache-sized slices, :func:`_cpu_sum`, :func:`_peak`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType

from clipax._elements import _magnitude

# Leaves with at most this many elements are concatenated (per dtype) before reducing, so a tree
# of thousands of small leaves compiles to a handful of reductions instead of one per leaf.
_SMALL_LEAF = 1 << 16
# ... at most this many leaves per concatenation: XLA:CPU's compile time grows faster than
# linearly with the operands of one concatenate (15 s for 10,000 leaves in one, 2.5 s in groups
# of 128, which also run faster: benchmarks/README.md, "Compile time").
_GROUP = 128

# On the CPU, float16 blocks of more than _CPU_CHUNKED elements are summed in chunks of
# _CPU_CHUNK elements (see :func:`_cpu_sum`).
_CPU_CHUNK = 1 << 15
_CPU_CHUNKED = 1 << 16


def _maybe_sharded(x: jax.Array) -> bool:
  """True when GSPMD may split ``x`` over devices (a mesh axis of size > 1 that is not Manual).

  Concatenating such leaves would make the partitioner gather them; inside ``shard_map``/``pmap``
  (Manual axes) and on a single device the leaves are local and concatenating them is free.
  """
  mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
  sizes = getattr(mesh, "axis_sizes", ())
  types = getattr(mesh, "axis_types", ())
  return any(n > 1 and t != AxisType.Manual for n, t in zip(sizes, types, strict=False))


def _blocks(leaves: list[jax.Array]) -> list[jax.Array]:
  """Large or mesh-sharded leaves as they are; small local leaves concatenated per dtype, in
  groups of at most ``_GROUP`` leaves."""
  blocks: list[jax.Array] = []
  small: dict[Any, list[jax.Array]] = {}
  for x in leaves:
    if x.size == 0:
      continue
    if x.size <= _SMALL_LEAF and not _maybe_sharded(x):
      small.setdefault(x.dtype, []).append(x.ravel())
    else:
      blocks.append(x)
  for group in small.values():
    for i in range(0, len(group), _GROUP):
      part = group[i : i + _GROUP]
      blocks.append(part[0] if len(part) == 1 else jnp.concatenate(part))
  return blocks


def _cpu_sum(b: jax.Array, fn: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """``jnp.sum(fn(b))``, for the CPU-only paths: float16 blocks are summed chunk by chunk.

  ``fn`` is elementwise and starts by converting to float32. XLA:CPU's fused reductions take a
  bfloat16-to-float32 convert inside the kernel but not a float16 one: for float16 it writes the
  whole float32 copy to a fresh buffer first, 9x slower than the sum itself (27 ms against 3 ms
  for 16M elements on the 2-core CI machine, jax 0.10). Reducing 32K-element slices in a loop
  keeps that copy in the cache; the per-chunk sums are then added pairwise, so the result is as
  exact as one ``jnp.sum``.
  """
  return _chunked(b, lambda x: jnp.sum(fn(x)), jnp.sum)


def _chunked(
    b: jax.Array, reduce: Callable[[jax.Array], jax.Array], total: Callable[[jax.Array], jax.Array]
) -> jax.Array:
  """``reduce(b)``, computed on 32K-element slices of a large float16 ``b`` (see :func:`_cpu_sum`);
  ``total`` (``jnp.sum``, ``jnp.max``) then reduces the per-slice results."""
  n = b.size
  if b.dtype != jnp.float16 or n <= max(_CPU_CHUNKED, _CPU_CHUNK):
    return reduce(b)
  flat, k = b.ravel(), n // _CPU_CHUNK
  parts = lax.map(lambda i: reduce(lax.dynamic_slice(flat, (i * _CPU_CHUNK,), (_CPU_CHUNK,))),
                  jnp.arange(k))
  if n > k * _CPU_CHUNK:
    parts = jnp.concatenate([parts, reduce(flat[k * _CPU_CHUNK :])[None]])
  return total(parts)


def _peak(b: jax.Array, cpu: bool) -> jax.Array:
  """``max |b|`` in the accumulation dtype; ``cpu``: compiled for the CPU only.

  On the CPU a large float16 ``b`` is reduced in its own dtype (exact) and in slices, for the
  reason given in :func:`_cpu_sum` (19 -> 3 ms for 16M elements). Other dtypes are converted
  first: XLA:CPU fuses that convert into the max for bfloat16 (a max taken in bfloat16 itself
  loses that fusion and writes a float32 copy).
  """
  if cpu and b.dtype == jnp.float16:
    return _chunked(b, lambda x: jnp.max(jnp.abs(x), initial=0), jnp.max).astype(jnp.float32)
  if cpu and b.dtype.itemsize < 4:
    # its own barrier: the max's float32 convert is then not the sum of squares' (clip_by_value
    # takes both norms), and XLA:CPU fuses each into its reduction
    b = lax.optimization_barrier(b)
  return jnp.max(_magnitude(b), initial=0)


def _by_platform(
    cpu: Callable[[], Any], accelerator: Callable[[], Any], gpu: Callable[[], Any] | None = None
) -> Any:
  """``cpu()`` when compiling for the CPU, ``accelerator()`` for GPU and TPU (``gpu()``, when
  given, for CUDA and ROCm GPUs: the leaves grouped as :mod:`clipax._grouping` says).

  The overflow rescue is a ``lax.cond`` on the CPU, where it costs nothing until it is taken. On
  GPU a conditional copies its predicate to the host (a sync in the middle of the train step)
  and measured one extra read of every gradient on an H100, so there the three sums (plain,
  scaled down, scaled up) are always computed and the exact one is selected: standalone that
  runs at optax's speed on an H100. Inside a train step XLA kept them as three reduction
  kernels per large leaf; the GPU path groups the leaves (:mod:`clipax._grouping`) so that the
  three sums of a group share their kernels (benchmarks/README.md, "Compiled structure").
  """
  if gpu is None:
    return lax.platform_dependent(cpu=cpu, default=accelerator)
  return lax.platform_dependent(cpu=cpu, cuda=gpu, rocm=gpu, default=accelerator)
