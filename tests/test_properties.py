"""Property tests over random pytrees, shapes, dtypes and magnitudes (hypothesis)."""

import jax
import jax.numpy as jnp
import numpy as np
from _refs import as64, leaves64, norm64, rtol
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import clipax

DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32]
# Magnitude ranges each dtype can hold without its elements themselves overflowing.
EXPONENTS = {jnp.float16: (-3, 3), jnp.bfloat16: (-30, 30), jnp.float32: (-30, 30)}

shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


@st.composite
def pytrees(draw):
  dtype = draw(st.sampled_from(DTYPES))
  lo, hi = EXPONENTS[dtype]
  exponent = draw(st.integers(lo, hi))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)

  def leaf(shape):
    return jnp.asarray(rng.normal(size=shape) * 10.0**exponent, dtype)

  leaf_st = shapes.map(leaf)
  tree = draw(st.recursive(
      leaf_st,
      lambda kids: st.one_of(st.lists(kids, max_size=3), st.tuples(kids, kids),
                             st.dictionaries(st.sampled_from("abcd"), kids, max_size=3)),
      max_leaves=6,
  ))
  return tree, dtype, 10.0**exponent


SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _flat(tree):
  leaves = leaves64(tree)
  return np.concatenate([x.ravel() for x in leaves]) if leaves else np.zeros(0)


@SETTINGS
@given(pytrees(), st.floats(0.1, 10.0))
def test_global_clip_properties(data, fraction):
  tree, dtype, magnitude = data
  norm = norm64(tree)
  max_norm = float(np.float32(fraction * magnitude))
  tx = clipax.clip_by_global_norm(max_norm)
  out, state = tx.update(tree, tx.init(tree))
  # structure and dtypes kept
  assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(tree)
  for o, g in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(tree), strict=True):
    assert o.dtype == g.dtype and o.shape == g.shape
  tol = rtol(dtype)
  np.testing.assert_allclose(float(state.norm), norm, rtol=2e-6)
  # norm <= threshold
  assert norm64(out) <= max_norm * (1 + tol) + 1e-30
  if norm <= max_norm:
    # no-op below the threshold: bit-identical
    for o, g in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(tree), strict=True):
      np.testing.assert_array_equal(as64(o), as64(g))
  else:
    # direction kept: cosine 1
    a, g = _flat(out), _flat(tree)
    if np.linalg.norm(a) > 0:
      cos = a @ g / (np.linalg.norm(a) * np.linalg.norm(g))
      np.testing.assert_allclose(cos, 1.0, rtol=tol)
  # idempotent
  again, _ = tx.update(out, tx.init(tree))
  np.testing.assert_allclose(_flat(again), _flat(out), rtol=tol, atol=1e-30)


@SETTINGS
@given(pytrees())
def test_norms_match_float64(data):
  tree, _, _ = data
  np.testing.assert_allclose(float(clipax.global_norm(tree)), norm64(tree), rtol=2e-6)
  np.testing.assert_allclose(float(clipax.global_norm(tree, ord=1)), norm64(tree, 1), rtol=2e-6)
  np.testing.assert_allclose(float(clipax.global_norm(tree, ord="inf")), norm64(tree, np.inf))
  leaf = clipax.leaf_norms(tree)
  for n, g in zip(jax.tree_util.tree_leaves(leaf), leaves64(tree), strict=True):
    np.testing.assert_allclose(float(n), norm64([g]), rtol=2e-6)


@SETTINGS
@given(pytrees(), st.floats(0.01, 2.0))
def test_leaf_and_value_clip_bounds(data, fraction):
  tree, dtype, magnitude = data
  c = float(np.float32(fraction * magnitude))
  tol = rtol(dtype)
  out, _ = clipax.clip_by_leaf_norm(c).update(tree, clipax.clip_by_leaf_norm(c).init(tree))
  for o, g in zip(leaves64(out), leaves64(tree), strict=True):
    assert norm64([o]) <= c * (1 + tol) + 1e-30
    if norm64([g]) <= c:
      np.testing.assert_array_equal(o, g)
  out, _ = clipax.clip_by_value(c).update(tree, clipax.clip_by_value(c).init(tree))
  for o, g in zip(leaves64(out), leaves64(tree), strict=True):
    np.testing.assert_allclose(o, np.clip(g, -c, c), rtol=tol)
