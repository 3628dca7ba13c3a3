"""Measuring gradients: global and per-leaf norms (unit-wise norms: :mod:`clipax._unitwise`).

Every norm in clipax is computed with the pieces here, so dtype handling and ``axis_name`` are
written once:

* squares (or absolute values) are accumulated in float32 whatever the leaf dtype, float64 when
  x64 is on and a leaf is float64, so float16/bfloat16 gradients never overflow the norm;
* when that float32 sum overflows (or underflows) although every element is finite, the norm is
  recomputed on values rescaled by an exact power of two, inside the compiled program, so a
  float32 gradient of 1e20-sized elements gives its true norm: on the CPU only on that rare path
  (``lax.cond``), on GPU/TPU branch-free (three sums, the exact one kept; a conditional there
  syncs with the host);
* on the CPU, float16/bfloat16 leaves never make XLA write a float32 copy of the gradients
  (float16 blocks are reduced in cache-sized slices, see ``_cpu_sum``);
* with ``axis_name`` the leaves are shards along a ``shard_map``/``pmap`` axis and one scalar (one
  vector for ``leaf_norms``) is all-reduced per norm, never one collective per leaf; leaves marked
  ``replicated`` (the same on every shard) are counted on the first shard only;
* under plain ``jit`` small leaves are concatenated (in groups of 128) before reducing, only when
  they are not sharded over a mesh, so GSPMD never gathers a sharded gradient to measure it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType

from clipax import _checks
from clipax._grouping import gpu_blocks, gpu_leaf_reduce, gpu_sums

AxisName = str | tuple[str, ...] | None
ReductionAxes = Callable[[jax.Array], Sequence[int]] | None
UnitRule = Literal["nfnets", "last_axis"]
# None (no leaf), a bool, a pytree prefix of bools, or a predicate on the leaf's key path.
Replicated = Any

# Leaves with at most this many elements are concatenated (per dtype) before reducing, so a tree
# of thousands of small leaves compiles to a handful of reductions instead of one per leaf.
_SMALL_LEAF = 1 << 16
# ... at most this many leaves per concatenation: XLA:CPU's compile time grows faster than
# linearly with the operands of one concatenate (15 s for 10,000 leaves in one, 2.5 s in groups
# of 128, which also run faster: benchmarks/README.md, "Compile time").
_GROUP = 128
# Experiment, off: on GPU/TPU take the branch-free rescue's three sums of a block in one variadic
# reduction instead of three reductions (benchmarks/bench_clip.py --variadic-rescue). Inside a
# train step on an H100 the three sums stayed three kernels per leaf; whether one variadic
# reduce is faster there, and as exact, is still to be measured on a GPU.
_VARIADIC_RESCUE = False

# On the CPU, float16 blocks of more than _CPU_CHUNKED elements are summed in chunks of
# _CPU_CHUNK elements (see :func:`_cpu_sum`).
_CPU_CHUNK = 1 << 15
_CPU_CHUNKED = 1 << 16

_ORDS = (1, 2, math.inf)


def canonical_ord(ord: Any) -> Any:
  """Returns ``ord`` as 1, 2 or ``math.inf``; raises ``ValueError`` for anything else.

  A traced ``ord`` (``optax.inject_hyperparams`` injects every numeric argument) is returned as
  it is and dispatched at run time by :func:`by_ord`.
  """
  if isinstance(ord, jax.core.Tracer):
    return ord
  if hasattr(ord, "shape") and hasattr(ord, "dtype") and getattr(ord, "ndim", 1) == 0:
    ord = ord.item()
  if isinstance(ord, str) and ord.lower() == "inf":
    return math.inf
  if isinstance(ord, (int, float)) and not isinstance(ord, bool) and ord in _ORDS:
    return math.inf if ord == math.inf else int(ord)
  raise ValueError(f"`ord` must be one of 1, 2 or math.inf, got {ord!r}")


def by_ord(ord: Any, fn: Callable[[float], Any]) -> Any:
  """``fn(ord)`` for a python ``ord``; for a traced one, the matching branch via ``lax.switch``.

  A traced ``ord`` that is not 1, 2 or inf selects the ``inf`` branch and gives NaN, so the
  clippers count it as non-finite instead of silently using another norm.
  """
  if not isinstance(ord, jax.core.Tracer):
    return fn(ord)
  index = jnp.where(ord == 1, 0, jnp.where(ord == 2, 1, 2))
  valid = (ord == 1) | (ord == 2) | jnp.isposinf(ord)

  def poisoned(result):
    def poison(x):
      if not jnp.issubdtype(x.dtype, jnp.inexact):
        return x
      return jnp.where(valid, x, jnp.asarray(jnp.nan, x.dtype))

    return jax.tree_util.tree_map(poison, result)

  return poisoned(lax.switch(index, [lambda: fn(1), lambda: fn(2), lambda: fn(math.inf)]))


def _accum_dtype(dtype: jnp.dtype) -> jnp.dtype:
  if dtype in (jnp.float64, jnp.complex128):
    return jnp.dtype(jnp.float64)
  return jnp.dtype(jnp.float32)


def float_leaves(tree: Any, what: str = "global_norm") -> list[jax.Array]:
  """The leaves of ``tree`` as arrays; integer and boolean leaves raise ``ValueError``."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  leaves = []
  for path, leaf in flat:
    where = jax.tree_util.keystr(path) or "<root>"
    if isinstance(leaf, (str, bytes)) or (
        hasattr(leaf, "dtype") and np.dtype(leaf.dtype).kind in "OSUV"
        and not jnp.issubdtype(leaf.dtype, jnp.floating)):
      raise TypeError(f"{what}: leaf {where} is {leaf!r:.60}, not a numeric array")
    try:
      x = jnp.asarray(leaf)
    except (TypeError, ValueError):
      raise TypeError(
          f"{what}: leaf {where} is {leaf!r:.60} of type {type(leaf).__name__}, not an array"
      ) from None
    if not jnp.issubdtype(x.dtype, jnp.inexact):
      raise ValueError(
          f"{what}: leaf {jax.tree_util.keystr(path) or '<root>'} has dtype {x.dtype}; "
          "gradient norms are defined for floating or complex leaves only"
      )
    leaves.append(x)
  return leaves


def _magnitude(x: jax.Array) -> jax.Array:
  """|x| in the accumulation dtype."""
  acc = _accum_dtype(x.dtype)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    return jnp.abs(x).astype(acc)
  return jnp.abs(x.astype(acc))


def _power(x: jax.Array, ord: float) -> jax.Array:
  """|x|^ord in the accumulation dtype (ord 1 or 2)."""
  if ord == 1:
    return _magnitude(x)
  acc = _accum_dtype(x.dtype)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    re, im = jnp.real(x).astype(acc), jnp.imag(x).astype(acc)
    return re * re + im * im
  y = x.astype(acc)
  return y * y


def _root(s: jax.Array, ord: float) -> jax.Array:
  """s^(1/ord) with a finite gradient at s == 0."""
  if ord == 1:
    return s
  positive = s > 0
  # s == 0 gives 0 with a finite gradient; NaN stays NaN (never reported as a zero norm).
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, s, 1)), s)


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


def _result_dtype(leaves: list[jax.Array]) -> jnp.dtype:
  wide = any(_accum_dtype(x.dtype) == jnp.float64 for x in leaves)
  return jnp.dtype(jnp.float64 if wide else jnp.float32)


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
  block_sum = _cpu_sum if cpu else (lambda b, f: jnp.sum(f(b)))

  def local(xs):
    blocks = gpu_blocks(xs, _maybe_sharded) if gpu else _blocks(xs)
    if fns is None:
      return _total([block_sum(b, fn) for b in blocks], dtype, jnp.sum)
    if _VARIADIC_RESCUE and not cpu:
      per_block = [_variadic_sums(b, fns, dtype) for b in blocks]
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


def _variadic_sums(b: jax.Array, fns: Sequence[Callable], dtype: jnp.dtype) -> tuple:
  """``sum(f(b))`` for each ``f`` of ``fns``, as one variadic reduction (see _VARIADIC_RESCUE)."""
  operands = tuple(f(b).astype(dtype) for f in fns)
  zeros = tuple(jnp.zeros([], dtype) for _ in fns)
  add = lambda xs, ys: tuple(x + y for x, y in zip(xs, ys, strict=True))
  return lax.reduce(operands, zeros, add, tuple(range(b.ndim)))


def _count_once(
    sums: jax.Array, axis_name: AxisName, replicated: Sequence[bool] | None
) -> jax.Array:
  """Per-leaf partial sums with the replicated leaves zeroed on all shards but the first."""
  if axis_name is None or not replicated or not any(replicated):
    return sums
  elsewhere = np.asarray(replicated, bool) & ~_first_shard(axis_name)
  return jnp.where(elsewhere, jnp.zeros([], sums.dtype), sums)


# Rescue factors: exact powers of two, so scaling loses nothing. After an overflow the elements
# are multiplied by 2**-100 (|x| <= 2.7e8, so even 1e12 squares sum to < 1e29); after an
# underflow (sum of squares < 1e-19, so |x| < 3.3e-10) by 2**64. Dividing by the largest
# element instead would need 1 / max, which is subnormal (flushed to zero) above ~8.5e37.
# float64 sums (x64 on) use 2**-600 and 2**500 by the same reasoning.
_FACTORS = {
    jnp.dtype(jnp.float32): (2.0**-100, 2.0**64),
    jnp.dtype(jnp.float64): (2.0**-600, 2.0**500),
}
# The branch-free path computes the scaled-up sum on every call; clamping |x| there keeps it (and
# its gradient) finite for large elements: (0.5 * 2**64)**2 = 2**126 < float32's max. The clamp
# never bites when that sum is the one used (every |x| < 3.3e-10 then).
_UP_CLAMP = {jnp.dtype(jnp.float32): 0.5, jnp.dtype(jnp.float64): 2.0**11}


def _rescue_factor(s: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(factor, 1 / factor)``: down for a sum that overflowed, up for one that underflowed, 1
  for the sums (of other leaves or units) that needed no rescue."""
  inf, small = jnp.isinf(s), _needs_rescue(s) & ~jnp.isinf(s)

  def pick(down, up):
    one = jnp.ones([], s.dtype)
    up = jnp.where(small, jnp.asarray(up, s.dtype), one)
    return jnp.where(inf, jnp.asarray(down, s.dtype), up)

  down, up = _FACTORS[jnp.dtype(s.dtype)]
  return pick(down, up), pick(1 / down, 1 / up)


def _needs_rescue(s: jax.Array) -> jax.Array:
  """True where a sum of powers overflowed or is too small to be exact."""
  lo = math.sqrt(jnp.finfo(s.dtype).tiny)
  return jnp.isinf(s) | (s < lo)


def _scaled_powers(dtype: jnp.dtype, ord: float) -> list[Callable[[jax.Array], jax.Array]]:
  """|x|^ord as is, scaled down and scaled (clamped) up: the three sums of the branch-free path."""
  down, up = _FACTORS[jnp.dtype(dtype)]
  clamp = _UP_CLAMP[jnp.dtype(dtype)]

  def kept(y):
    # With one element the sum disappears and XLA's simplifier rewrites (|x| c)^2 into
    # x^2 c^2: inf * 0 = NaN for |x| > 1.8e19 (c = 2**-100), inf for tiny x (c = 2**64).
    # The barrier keeps the scaled value as it is; larger blocks are not rewritten.
    return lax.optimization_barrier(y) if y.size == 1 else y

  return [
      lambda b: _power(b, ord),
      lambda b: _power(kept(_magnitude(b).astype(dtype) * down), ord),
      lambda b: _power(kept(jnp.minimum(_magnitude(b).astype(dtype), clamp) * up), ord),
  ]


def _pick_sum(s: jax.Array, s_down: jax.Array, s_up: jax.Array, ord: float) -> jax.Array:
  """The root of whichever of the three sums is exact (see :func:`_scaled_powers`)."""
  down, up = _FACTORS[jnp.dtype(s.dtype)]
  lo = math.sqrt(jnp.finfo(s.dtype).tiny)
  rescued_up = _root(s_up, ord) * jnp.asarray(1 / up, s.dtype)
  rescued_down = _root(s_down, ord) * jnp.asarray(1 / down, s.dtype)
  small = jnp.where(s < lo, rescued_up, _root(s, ord))
  return jnp.where(jnp.isinf(s), rescued_down, small)


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
    leaves, replicated = _blocks(leaves), None
  if ord == math.inf:
    def peak(cpu, gpu=False):
      blocks = gpu_blocks(raw, _maybe_sharded) if gpu else _blocks(leaves)
      return _total([_peak(b, cpu) for b in blocks], dtype, jnp.max)

    return _pmax(_by_platform(lambda: peak(True), lambda: peak(False), lambda: peak(False, True)),
                 axis_name)

  def sums(fns, factor, cpu, gpu=False):
    xs, rep = (raw, raw_replicated) if gpu else (leaves, replicated)
    if callable(fns):
      return _sum_shards(xs, lambda b: fns(b, factor), dtype, axis_name, rep, cpu=cpu, gpu=gpu)
    powers = [lambda b, fn=fn: fn(b, factor) for fn in fns]
    return _sum_shards(xs, powers, dtype, axis_name, rep, cpu=cpu, gpu=gpu)

  return _exact_root(sums, ord, dtype)


def _exact_root(sums: Callable, ord: float, dtype: jnp.dtype) -> jax.Array:
  """The root of a sum of ``|x|^ord`` (a scalar, or one per leaf), exact even where the plain
  float32 sum overflows or underflows.

  ``sums(fns, factor, cpu, gpu=False)`` returns the sum of ``fn(block, f)`` for one function
  ``fns``, or for a list of them the sums stacked on a leading axis; one collective either way.
  ``f`` is ``factor`` (or its entry for that leaf; ``None`` when no factor is used); ``cpu``:
  compiled for the CPU only; ``gpu``: for a GPU only. On the CPU the rescue is a ``lax.cond`` on
  the plain sum; elsewhere three sums are taken and the exact one is kept (:func:`_by_platform`).
  """
  def with_cond():
    s = sums(lambda b, f: _power(b, ord), None, True)

    def rescued(_):
      factor, inverse = _rescue_factor(s)
      scaled = lambda b, f: _power(_magnitude(b).astype(dtype) * f, ord)
      return _root(sums(scaled, factor, True), ord) * inverse

    return lax.cond(jnp.any(_needs_rescue(s)), rescued, lambda _: _root(s, ord), None)

  def branch_free(gpu=False):
    s = sums([lambda b, f, fn=fn: fn(b) for fn in _scaled_powers(dtype, ord)], None, False,
             gpu=gpu)
    return _pick_sum(s[0], s[1], s[2], ord)

  return _by_platform(with_cond, branch_free, lambda: branch_free(True))


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
  rep = None if replicated is None else tuple(bool(r) for r in replicated)
  return _global_smooth(ord, _hashable(axis_name), rep, tuple(leaves))


def _hashable(axis_name: AxisName) -> AxisName:
  return tuple(axis_name) if isinstance(axis_name, list) else axis_name


def global_norm(
    tree: Any,
    *,
    ord: int | float | str = 2,
    axis_name: AxisName = None,
    replicated: Replicated = None,
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

  Returns:
    A float32 scalar (float64 if a leaf is float64), the same on every shard.

  Raises:
    ValueError: for an unknown ``ord``, an integer/boolean leaf (the message names its path) or
      a ``replicated`` that is not a prefix of ``tree`` with bool leaves.

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
  rep = replicated_mask(tree, replicated)
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
      return jnp.stack(gpu_leaf_reduce(leaves, peak, _maybe_sharded))

    return list(_pmax(_by_platform(lambda: peaks(True), lambda: peaks(False), gpu_peaks),
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
        if len(axes) == b.ndim:
          return jnp.stack(gpu_sums(b, powers, dtype))
        return jnp.stack([jnp.sum(f(b), axis=axes).astype(dtype) for f in powers], axis=-1)

      per_leaf = jnp.stack(gpu_leaf_reduce(leaves, reduce, _maybe_sharded))  # (leaves, fns)
      rows = [_count_once(per_leaf[:, k], axis_name, replicated) for k in range(len(fns))]
      return _psum(jnp.stack(rows), axis_name)
    if _VARIADIC_RESCUE and not cpu:
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
  rep = None if replicated is None else tuple(bool(r) for r in replicated)
  return list(_leafwise_smooth(ord, _hashable(axis_name), rep, tuple(leaves)))


def leaf_norms(
    tree: Any,
    *,
    ord: int | float | str = 2,
    axis_name: AxisName = None,
    replicated: Replicated = None,
) -> Any:
  """The norm of each leaf on its own, accumulated in float32 like :func:`global_norm`.

  Args:
    tree: a pytree of floating or complex arrays.
    ord: 1, 2 or ``math.inf``.
    axis_name: mesh/pmap axis the leaves are sharded over; all the per-leaf partial sums travel
      in one vector all-reduce.
    replicated: with ``axis_name``, the leaves that are the same on every shard (counted once),
      as in :func:`global_norm`.

  Returns:
    A pytree of the same structure as ``tree`` with a float32 scalar per leaf.

  Raises:
    ValueError: for an unknown ``ord``, an integer/boolean leaf or a bad ``replicated``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import clipax
    >>> norms = clipax.leaf_norms({"a": jnp.array([3.0, 4.0]), "b": jnp.ones((4,), jnp.bfloat16)})
    >>> print(f"{norms['a']:.1f} {norms['b']:.1f}")
    5.0 2.0
  """
  ord = canonical_ord(ord)
  _checks.axis_name(axis_name)
  treedef: Any = jax.tree_util.tree_structure(tree)
  with jax.named_scope("clipax/leaf_norms"):
    leaves = float_leaves(tree, "leaf_norms")
    rep = replicated_mask(tree, replicated, "leaf_norms")
    return treedef.unflatten(by_ord(ord, lambda o: _leafwise(leaves, o, axis_name, rep)))
