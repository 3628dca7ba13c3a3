"""What the compiled CPU programs do with half-precision gradients, read off their HLO.

Speed itself is measured in benchmarks/ (``--cases half``); these tests pin the structure that
makes it: no float32 copy of a whole float16/bfloat16 gradient is ever written to memory.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _refs import assert_close, leaf_norm64, norm64

import clipax

SHAPE = (400, 331)  # 132,400 elements: four 32K chunks and a tail


def _cpu(tree):
  return jax.device_put(tree, jax.devices("cpu")[0])


def _entry_shapes(fn, *args) -> set[str]:
  """The result shapes (``f32[400,331]``) of the instructions of the compiled entry computation:
  the buffers the program writes to memory."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  entry = text[text.index("\nENTRY") :]
  return set(re.findall(r"= (\w+\[[\d,]*\])", entry))


def _full_size_f32(shapes: set[str]) -> set[str]:
  n = SHAPE[0] * SHAPE[1]
  full = {f"f32[{SHAPE[0]},{SHAPE[1]}]", f"f32[{n}]"}
  return shapes & full


def _eqns(jaxpr):
  """Every equation of ``jaxpr`` and of the jaxprs nested in it (custom_jvp, cond, ...)."""
  for e in jaxpr.eqns:
    yield e
    for v in e.params.values():
      for sub in v if isinstance(v, (list, tuple)) else [v]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


def _grads(dtype):
  rng = np.random.default_rng(0)
  return _cpu({
      "w": jnp.asarray(rng.normal(size=SHAPE) * 100, dtype),
      "b": jnp.asarray(rng.normal(size=(7,)), dtype),
  })


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_norm_of_half_precision_leaf_writes_no_float32_copy(dtype):
  grads = _grads(dtype)
  assert not _full_size_f32(_entry_shapes(clipax.global_norm, grads))
  assert_close(jax.jit(clipax.global_norm)(grads), norm64(grads), jnp.float32, rtol=2e-6)
  norms = jax.jit(clipax.leaf_norms)(grads)
  assert not _full_size_f32(_entry_shapes(clipax.leaf_norms, grads))
  assert_close(norms["w"], leaf_norm64(grads["w"]), jnp.float32, rtol=2e-6)


_CLIPPERS = {
    "global": clipax.clip_by_global_norm,
    "zclip": lambda c: clipax.zclip(),
    "leaf": clipax.clip_by_leaf_norm,
    "value": clipax.clip_by_value,
    "global-inf": lambda c: clipax.clip_by_global_norm(c, ord=math.inf),
}
_CASES = [(dtype, k) for dtype in (jnp.float16, jnp.bfloat16) for k in _CLIPPERS]


@pytest.mark.parametrize("dtype,name", _CASES)
def test_half_precision_clip_writes_no_float32_copy(dtype, name):
  grads = _grads(dtype)
  tx = _CLIPPERS[name](1.0)
  state = tx.init(grads)
  shapes = _entry_shapes(lambda g, s: tx.update(g, s), grads, state)
  assert not _full_size_f32(shapes), shapes
  out, _ = jax.jit(tx.update)(grads, state)
  assert out["w"].dtype == dtype and np.all(np.isfinite(np.asarray(out["w"], np.float32)))


def test_half_precision_clip_matches_float64_through_the_chunked_sum():
  grads = _grads(jnp.float16)
  tx = clipax.clip_by_global_norm(1.0)
  out, state = jax.jit(tx.update)(grads, tx.init(grads))
  n = norm64(grads)
  assert_close(state.norm, n, jnp.float32, rtol=2e-6)
  for k in grads:
    want = np.asarray(grads[k], np.float64) / n
    np.testing.assert_allclose(np.asarray(out[k], np.float64), want, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("inner", [optax.sgd(0.1), optax.adamw(1e-3)], ids=["sgd", "adamw"])
def test_chained_with_an_optimizer_writes_no_float32_gradient_copy(dtype, inner):
  grads = _grads(dtype)
  params = jax.tree_util.tree_map(jnp.zeros_like, grads)
  tx = optax.chain(clipax.clip_by_global_norm(1.0), inner)
  state = tx.init(params)
  shapes = _entry_shapes(lambda g, s, p: tx.update(g, s, p), grads, state, params)
  assert not _full_size_f32(shapes), shapes


def test_many_small_leaves_are_concatenated_in_bounded_groups():
  # One concatenate of thousands of operands compiles in time superlinear in the leaf count.
  rng = np.random.default_rng(1)
  sizes = rng.integers(1, 50, size=300)
  tree = [jnp.asarray(rng.normal(size=(int(n),)), jnp.float32) for n in sizes]
  concats = [e for e in _eqns(jax.make_jaxpr(clipax.global_norm)(tree).jaxpr)
             if e.primitive.name == "concatenate"]
  # the leaves' groups, told from the small stacks of partial sums by their operand count; the
  # jaxpr holds every platform's branch: CPU/TPU groups of <= 128, the GPU's of <= 64
  groups = [len(e.invars) for e in concats if len(e.invars) > 3]
  assert sorted(groups) == sorted([128, 128, 44] + [64, 64, 64, 64, 44]), groups
  assert_close(jax.jit(clipax.global_norm)(tree), norm64(tree), jnp.float32, rtol=2e-6)


@pytest.mark.parametrize("n", [3 * 32768, 3 * 32768 + 1])
@pytest.mark.parametrize("ord", [1, 2, math.inf])
def test_float16_chunk_boundaries_match_float64(n, ord):
  rng = np.random.default_rng(n)
  x = rng.normal(size=(n,)) * 50
  x[-1] = 6e4  # the largest element sits in the remainder (or the last chunk)
  tree = _cpu({"x": jnp.asarray(x, jnp.float16), "y": jnp.ones((3,), jnp.float16)})
  got = jax.jit(lambda t: clipax.global_norm(t, ord=ord))(tree)
  assert_close(got, norm64(tree, ord), jnp.float32, rtol=2e-6)
  leaf = jax.jit(lambda t: clipax.leaf_norms(t, ord=ord))(tree)["x"]
  assert_close(leaf, leaf_norm64(tree["x"], ord), jnp.float32, rtol=2e-6)


@pytest.mark.parametrize("units", ["nfnets", "last_axis"])
@pytest.mark.parametrize("shape", [SHAPE, (7, 40, 331), (100_003,)])
def test_float16_unitwise_norms_match_float64_without_a_float32_copy(shape, units):
  rng = np.random.default_rng(7)
  x = rng.normal(size=shape) * 30
  x[..., 5] = 0  # an all-zero unit: its sum underflows and takes the rescue path
  x = _cpu(jnp.asarray(x, jnp.float16))
  norms = functools.partial(clipax.unitwise_norms, units=units)
  got = jax.jit(norms)(x)
  x64 = np.asarray(x, np.float64)
  if x.ndim == 1:
    axes = (0,)
  elif units == "last_axis":
    axes = tuple(range(x.ndim - 1))
  else:  # NFNets/optax: a dense or multi-head kernel reduces its input axis only
    axes = (0,)
  want = np.sqrt(np.sum(x64 * x64, axis=axes, keepdims=True))
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-6)
  full = {f"f32[{','.join(map(str, shape))}]", f"f32[{x.size}]"}
  assert not _entry_shapes(norms, x) & full


def test_float16_agc_writes_no_float32_copy():
  grads = _grads(jnp.float16)
  params = jax.tree_util.tree_map(lambda g: g * 3, grads)
  tx = clipax.adaptive_grad_clip(0.01)
  state = tx.init(params)
  shapes = _entry_shapes(lambda g, s, p: tx.update(g, s, p), grads, state, params)
  assert not _full_size_f32(shapes), shapes
