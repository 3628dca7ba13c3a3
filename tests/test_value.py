"""clip_by_value: the ``nonfinite="elementwise"`` policy and the fused GPU/TPU measuring pass.

Float64 numpy references for the output and every recorded metric under each policy, fault
injection (NaN, +-Inf, 1e30) inside a jitted ``lax.scan``, and the accelerator pass itself
(``_value._fused``, what GPU and TPU compile) run on the CPU against the same references,
overflow and underflow included. The compiled structure on an H100 and a TPU is measured by
``benchmarks/compiled.py``.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _refs import as64, assert_close, leaf_norm64, leaves64, norm64, run_scan

import clipax
from clipax import _value

C = 1.0
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def _grads(dtype=jnp.float32, scale=3.0, seed=0):
  rng = np.random.default_rng(seed)
  raw = {"w": rng.normal(size=(6, 300)), "b": rng.normal(size=(4,)), "s": [rng.normal(size=(3,))],
         "k": rng.normal(size=(2, 3, 100))}
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x * scale, dtype), raw)


def _ref(tree, c=C):
  """(clipped leaves, pre-clip norm, max |g|, post-clip norm), float64, NaN/Inf as numpy does."""
  leaves = leaves64(tree)
  clipped = [np.clip(x, -c, c) for x in leaves]
  flat = np.concatenate([np.abs(x).ravel() for x in leaves])
  peak = float(np.max(flat)) if flat.size else 0.0
  return clipped, norm64(tree), peak, norm64(clipped)


def _run(tx, grads):
  return jax.jit(tx.update)(grads, tx.init(grads))


def _check_metrics(state, norm, peak, post, c=C):
  assert_close(state.norm, norm, jnp.float32, rtol=2e-6)
  assert_close(state.scale, min(1.0, c / peak), jnp.float32)
  assert_close(state.update_norm, post, jnp.float32, rtol=2e-6)
  assert bool(state.clipped) == (peak > c)


# --- the elementwise policy, finite gradients ----------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nonfinite", ["zero", "propagate", "elementwise"])
def test_policies_match_float64_on_finite_gradients(dtype, nonfinite):
  grads = _grads(dtype)
  out, state = _run(clipax.clip_by_value(C, nonfinite=nonfinite, leaf_metrics=True), grads)
  want, norm, peak, _ = _ref(grads)
  for o, w in zip(jax.tree_util.tree_leaves(out), want, strict=True):
    assert o.dtype == dtype
    np.testing.assert_array_equal(as64(o), w)  # clipping to +-1 is exact in every dtype
  _check_metrics(state, norm, peak, norm64(jax.tree_util.tree_leaves(out)))
  for k in ("w", "b", "k"):
    assert_close(state.leaf_norms[k], leaf_norm64(grads[k]), jnp.float32, rtol=2e-6)
  assert int(state.nonfinite_count) == 0 and int(state.clipped_count) == 1
  ref, _ = optax.clip(C).update(grads, optax.EmptyState())
  for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref), strict=True):
    np.testing.assert_array_equal(as64(a), as64(b))


def test_elementwise_unclipped_is_bit_identical():
  grads = _grads(scale=0.1)
  out, state = _run(clipax.clip_by_value(C, nonfinite="elementwise"), grads)
  for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(grads), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(state.scale) == 1.0 and not bool(state.clipped)


# --- fault injection ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_elementwise_fault_clips_elements_and_counts(dtype, bad):
  grads = _grads(dtype)
  grads["w"] = grads["w"].at[2, 7].set(bad)
  out, state = _run(clipax.clip_by_value(C, nonfinite="elementwise"), grads)
  want, _, _, _ = _ref(grads)
  for o, w in zip(jax.tree_util.tree_leaves(out), want, strict=True):
    np.testing.assert_array_equal(as64(o), w)  # NaN stays NaN at its place only; +-inf -> +-c
  assert int(state.nonfinite_count) == 1 and int(state.clipped_count) == 0
  assert not bool(state.clipped)
  if math.isnan(bad):
    assert np.isnan(float(state.norm)) and np.isnan(float(state.scale))
    assert np.isnan(float(state.update_norm))
  else:
    assert float(state.norm) == math.inf and float(state.scale) == 0.0
    # the update as returned, +-inf clipped to +-c: finite, measured exactly
    assert_close(state.update_norm, norm64(jax.tree_util.tree_leaves(out)), jnp.float32,
                 rtol=2e-6)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_zero_and_propagate_keep_their_rule(bad):
  grads = _grads()
  grads["b"] = grads["b"].at[1].set(bad)
  out, state = _run(clipax.clip_by_value(C), grads)
  assert all(not np.any(as64(x)) for x in jax.tree_util.tree_leaves(out))
  assert float(state.update_norm) == 0.0 and float(state.scale) == 0.0
  assert int(state.nonfinite_count) == 1
  out, state = _run(clipax.clip_by_value(C, nonfinite="propagate"), grads)
  assert all(np.all(np.isnan(as64(x))) for x in jax.tree_util.tree_leaves(out))
  assert np.isnan(float(state.update_norm)) and int(state.nonfinite_count) == 1


def test_elementwise_in_a_jitted_scan_counts_every_fault():
  steps = 12
  rng = np.random.default_rng(3)
  base = rng.normal(size=(steps, 50)) * 2
  events = {2: math.nan, 5: math.inf, 6: -math.inf, 9: 1e30}
  for t, v in events.items():
    base[t, 13] = v
  grads = {"w": jnp.asarray(base, jnp.float32), "b": jnp.ones((steps, 3), jnp.float32)}
  tx = clipax.clip_by_value(C, nonfinite="elementwise")
  final, (outs, states) = run_scan(tx, grads)
  assert int(final.count) == steps
  assert int(final.nonfinite_count) == 3  # NaN and +-Inf; 1e30 is finite and clipped
  assert int(final.clipped_count) == steps - 3
  for t in range(steps):
    row = {"w": grads["w"][t], "b": grads["b"][t]}
    want, norm, peak, post = _ref(row)
    got = [as64(outs["b"][t]), as64(outs["w"][t])]
    for o, w in zip(got, want, strict=True):
      np.testing.assert_array_equal(o, w)
    norms = np.asarray(states.norm)[t]
    if t in (2, 5, 6):
      assert not np.isfinite(norms) and not bool(states.clipped[t])
    else:
      assert_close(norms, norm, jnp.float32, rtol=2e-6)
      assert_close(np.asarray(states.update_norm)[t], post, jnp.float32, rtol=2e-6)
      assert_close(np.asarray(states.scale)[t], min(1.0, C / peak), jnp.float32)
  m = clipax.metrics(final)
  assert int(m["clip/value/nonfinite_count"]) == 3


def test_elementwise_traced_invalid_threshold_zeroes_and_counts():
  grads = _grads()
  tx = optax.inject_hyperparams(clipax.clip_by_value, static_args=("nonfinite",))(
      max_value=1.0, nonfinite="elementwise")
  state = tx.init(grads)
  state.hyperparams["max_value"] = jnp.asarray(math.nan)
  out, state = jax.jit(tx.update)(grads, state)
  assert all(not np.any(as64(x)) for x in jax.tree_util.tree_leaves(out))
  inner = state.inner_state
  assert int(inner.invalid_count) == 1 and float(inner.update_norm) == 0.0


# --- validation --------------------------------------------------------------------------------


def test_elementwise_is_accepted_by_clip_by_value_only():
  clipax.clip_by_value(1.0, nonfinite="elementwise")
  with pytest.raises(ValueError, match="nonfinite"):
    clipax.clip_by_value(1.0, nonfinite="clip")
  with pytest.raises(ValueError, match="nonfinite"):
    clipax.clip_by_global_norm(1.0, nonfinite="elementwise")  # type: ignore[arg-type]


# --- the GPU/TPU pass, run on the CPU ----------------------------------------------------------


def _fused(tree, c=C, per_leaf=False, concat=True):
  leaves = jax.tree_util.tree_leaves(tree)
  fn = jax.jit(lambda xs, c: _value._fused(list(xs), c, per_leaf, concat))
  return fn(tuple(leaves), jnp.asarray(c, jnp.float32))


def _trees():
  rng = np.random.default_rng(7)
  yield "mixed", {**_grads(), "vecs": [jnp.asarray(rng.normal(size=(40,)), jnp.float32)
                                       for _ in range(5)]}, C
  yield "bf16", _grads(jnp.bfloat16), C
  yield "f16", _grads(jnp.float16), C
  yield "huge", {"a": jnp.full((300, 2), 1e20, jnp.float32), "b": jnp.ones((7,))}, 1e25
  yield "tiny", {"a": jnp.full((2, 300), 1e-30, jnp.float32), "b": jnp.full((7,), 3e-25)}, 1e-27
  yield "clip-huge", {"a": jnp.full((300,), 3e37, jnp.float32)}, 2e37
  yield "complex", {"z": jnp.asarray(rng.normal(size=(4, 80)) + 1j * rng.normal(size=(4, 80)),
                                     jnp.complex64), "r": jnp.ones((3,))}, C
  yield "empty", {"a": jnp.zeros((0, 3)), "b": jnp.full((5,), 2.0)}, C


@pytest.mark.parametrize("concat", [True, False])
@pytest.mark.parametrize("per_leaf", [False, True])
@pytest.mark.parametrize("label,tree,c", list(_trees()), ids=[t[0] for t in _trees()])
def test_fused_pass_matches_float64(label, tree, c, per_leaf, concat):
  norm, peak, post, norms = _fused(tree, c, per_leaf, concat)
  leaves = jax.tree_util.tree_leaves(tree)
  clipped = [_value._clip(x, jnp.asarray(c, jnp.float32)) for x in leaves]
  assert_close(norm, norm64(tree), jnp.float32, rtol=2e-6)
  assert_close(peak, norm64(tree, math.inf), jnp.float32)
  assert_close(post, norm64(clipped), jnp.float32, rtol=2e-6)
  if per_leaf:
    assert len(norms) == len(leaves)
    for n, x in zip(norms, leaves, strict=True):
      assert_close(n, leaf_norm64(x), jnp.float32, rtol=2e-6)
  else:
    assert norms == []


@pytest.mark.parametrize("label,tree,c", list(_trees()), ids=[t[0] for t in _trees()])
def test_tpu_one_pass_statistics_match_float64(label, tree, c):
  # The TPU's statistics for nonfinite="elementwise" on half-precision trees: per-leaf
  # reductions only
  leaves = jax.tree_util.tree_leaves(tree)
  fn = jax.jit(lambda xs, c: _value._per_leaf_plain(list(xs), c, True))
  norm, peak, post, norms = fn(tuple(leaves), jnp.asarray(c, jnp.float32))
  clipped = [_value._clip(x, jnp.asarray(c, jnp.float32)) for x in leaves]
  assert_close(norm, norm64(tree), jnp.float32, rtol=2e-6)
  assert_close(peak, norm64(tree, math.inf), jnp.float32)
  assert_close(post, norm64(clipped), jnp.float32, rtol=2e-6)
  assert len(norms) == len(leaves)
  for n, x in zip(norms, leaves, strict=True):
    assert_close(n, leaf_norm64(x), jnp.float32, rtol=2e-6)


@pytest.mark.parametrize("dtype,per_leaf", [(jnp.bfloat16, True), (jnp.float32, False)])
def test_tpu_one_pass_concatenates_no_half_precision_leaf(dtype, per_leaf):
  # XLA:TPU reads a concatenated small bfloat16 leaf a second time, so the one-pass policy
  # reduces such leaves one by one; a float32 tree keeps the concatenation (less memory)
  leaves = tuple(jnp.ones((40,), dtype) * (i + 1) for i in range(6))
  c = jnp.asarray(C, jnp.float32)
  fn = jax.jit(lambda xs, c: _value._plain(list(xs), c, False, False, concat=False))
  text = fn.lower(leaves, c).as_text()
  sizes = [int(m) for m in re.findall(r"stablehlo\.concatenate.*-> tensor<(\d+)x", text)]
  assert (max(sizes, default=0) <= len(leaves)) == per_leaf, sizes
  assert_close(fn(leaves, c)[0], norm64(list(leaves)), jnp.float32, rtol=2e-6)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_fused_pass_reports_nonfinite(bad):
  tree = _grads()
  tree["w"] = tree["w"].at[0, 0].set(bad)
  norm, peak, post, _ = _fused(tree, concat=False)
  if math.isnan(bad):
    assert np.isnan(float(norm)) and np.isnan(float(peak)) and np.isnan(float(post))
  else:
    assert float(norm) == math.inf and float(peak) == math.inf
    assert_close(post, norm64([np.clip(x, -C, C) for x in leaves64(tree)]), jnp.float32,
                 rtol=2e-6)


def test_fused_pass_derivative_is_the_norms():
  tree = _grads()
  leaves = tuple(jax.tree_util.tree_leaves(tree))
  c = jnp.asarray(C, jnp.float32)

  def fused_norm(xs):
    return _value._stats(list(xs), c, False, True)[0]

  grad = jax.jit(jax.grad(fused_norm))(leaves)
  n = norm64(tree)
  for g, x in zip(grad, leaves, strict=True):
    np.testing.assert_allclose(np.asarray(g), as64(x) / n, rtol=1e-5, atol=1e-7)
  # and the derivative of the accelerator pass itself (its custom JVP)
  tangents = (jnp.ones_like(leaves[0]),) + tuple(jnp.zeros_like(x) for x in leaves[1:])
  for per_leaf, concat in [(False, True), (True, False)]:
    def acc(xs, per_leaf=per_leaf, concat=concat):
      return _value._accelerated(xs, c, per_leaf, concat)[0]

    _, t = jax.jit(lambda xs, ts, f=acc: jax.jvp(f, (xs,), (ts,)))(leaves, tangents)
    assert_close(t, float(np.sum(as64(leaves[0]))) / n, jnp.float32, rtol=1e-5)
