"""The exact, overflow-safe root of a sum of powers.

When the float32 sum of squares (or absolute values) overflows, or is too small to be exact,
although every element is finite, the sum is taken again on the elements rescaled by an exact
power of two, inside the compiled program, so a float32 gradient of 1e20-sized elements gives
its true norm: on the CPU only on that rare path (``lax.cond``), on GPU/TPU branch-free (three
sums, the exact one kept; a conditional there syncs with the host). :func:`_exact_root` takes the
sums as a function, so the global, per-leaf and unit-wise norms share it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from clipax import _platform
from clipax._elements import _magnitude, _power, _root

# Experiment, off: on GPU/TPU take the branch-free rescue's three sums of a block in one variadic
# reduction instead of three reductions (benchmarks/bench_clip.py --variadic-rescue). Inside a
# train step on an H100 the three sums stayed three kernels per leaf; whether one variadic
# reduce is faster there, and as exact, is still to be measured on a GPU.
_VARIADIC_RESCUE = False

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


def _variadic_sums(b: jax.Array, fns: Sequence[Callable], dtype: jnp.dtype) -> tuple:
  """``sum(f(b))`` for each ``f`` of ``fns``, as one variadic reduction (see _VARIADIC_RESCUE)."""
  operands = tuple(f(b).astype(dtype) for f in fns)
  zeros = tuple(jnp.zeros([], dtype) for _ in fns)
  add = lambda xs, ys: tuple(x + y for x, y in zip(xs, ys, strict=True))
  return lax.reduce(operands, zeros, add, tuple(range(b.ndim)))


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

  return _platform._by_platform(with_cond, branch_free, lambda: branch_free(True))
