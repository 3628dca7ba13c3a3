"""Float64 numpy references and the one place tolerances live."""

from __future__ import annotations

import math

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

RTOL = {
    jnp.dtype(jnp.float64): 1e-12,
    jnp.dtype(jnp.float32): 1e-6,
    jnp.dtype(jnp.bfloat16): 1e-2,
    jnp.dtype(jnp.float16): 1e-2,
}


def rtol(dtype) -> float:
  """Relative tolerance for results stored in ``dtype``."""
  return RTOL[jnp.dtype(dtype)]


def as64(x) -> np.ndarray:
  """An array (any dtype, bf16 included) as float64 (complex128 for complex)."""
  x = np.asarray(jnp.asarray(x))
  if np.iscomplexobj(x):
    return x.astype(np.complex128)
  return x.astype(np.float64)


def leaves64(tree) -> list[np.ndarray]:
  return [as64(x) for x in jax.tree_util.tree_leaves(tree)]


def norm64(tree, ord=2) -> float:
  """The global ``ord``-norm in float64 numpy, overflow-safe (scaled by the max magnitude)."""
  flat = [np.abs(x).ravel() for x in leaves64(tree)]
  if not flat:
    return 0.0
  a = np.concatenate(flat)
  if a.size == 0:
    return 0.0
  m = np.max(a)
  if ord == math.inf or not np.isfinite(m) or m == 0:
    return float(m) if ord == math.inf or m == 0 else float(m)
  r = a / m
  return float(m * (np.sum(r) if ord == 1 else np.sqrt(np.sum(r * r))))


def leaf_norm64(x, ord=2) -> float:
  return norm64([x], ord)


def clip64(tree, max_norm: float, ord=2):
  """optax-style global clip in float64: g * min(1, c / ||g||)."""
  n = norm64(tree, ord)
  scale = 1.0 if n <= max_norm else max_norm / n
  return [x * scale for x in leaves64(tree)], n, scale


def assert_close(actual, desired, dtype=jnp.float32, **kw):
  np.testing.assert_allclose(as64(actual), as64(desired), rtol=kw.pop("rtol", rtol(dtype)), **kw)


def spiky_norms(n, seed, *, base, sigma, spikes, nans, infs, first_bad):
  """A synthetic stream of global norms: log-normal around ``base`` (log-spread ``sigma``), a
  ``spikes`` fraction multiplied by 10-100x, and ``nans`` NaNs and ``infs`` Infs at random steps
  from ``first_bad`` on."""
  rng = np.random.default_rng(seed)
  norms = base * np.exp(sigma * rng.standard_normal(n))
  spike = rng.random(n) < spikes
  norms[spike] *= rng.uniform(10, 100, spike.sum())
  bad = rng.choice(np.arange(first_bad, n), nans + infs, replace=False)
  norms[bad[:nans]] = np.nan
  norms[bad[nans:]] = np.inf
  return norms


def run_scan(tx, grads, params=None):
  """Runs ``tx.update`` over the leading axis of ``grads`` inside one jitted ``lax.scan``;
  returns ``(final state, (updates, states))``."""

  @jax.jit
  def run(grads):
    def body(state, g):
      out, state = tx.update(g, state, params)
      return state, (out, state)

    return jax.lax.scan(body, tx.init(params), grads)

  return run(grads)


def assert_trees_equal(a, b):
  """Same structure size and bit-identical leaves."""
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_resume_is_bit_identical(tx, grads, params, steps: int):
  """Runs ``tx`` for ``steps`` updates (``grads`` has a leading step axis), and again with the
  state written out and read back with flax.serialization at ``steps // 2``: the updates after
  the resume and the final states are bit-identical."""
  update = jax.jit(tx.update)

  def step(t):
    return jax.tree_util.tree_map(lambda g: g[t], grads)

  state = tx.init(params)
  straight = []
  for t in range(steps):
    out, state = update(step(t), state, params)
    straight.append(out)
  resumed = tx.init(params)
  for t in range(steps // 2):
    _, resumed = update(step(t), resumed, params)
  resumed = flax.serialization.from_bytes(tx.init(params), flax.serialization.to_bytes(resumed))
  for t in range(steps // 2, steps):
    out, resumed = update(step(t), resumed, params)
    assert_trees_equal(out, straight[t])
  assert_trees_equal(resumed, state)
