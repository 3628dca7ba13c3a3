"""The GPU path of ``unitwise_norms`` (one variadic ``(scale, ssq)`` reduction per stack of
same-shape leaves), run on the CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipax._unitwise import _scaled_ssq
from tests._refs import as64, assert_close


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("scale", [1.0, 1e20, 1e-25, 1e37])
@pytest.mark.parametrize(
    "shape,axes", [((), ()), ((5,), (0,)), ((300, 7), (0,)), ((3, 4, 5), (0, 1)), ((2, 3), (0, 1))])
def test_scaled_ssq_matches_float64(dtype, scale, shape, axes):
  if dtype != jnp.float32:
    scale = 1.0 if dtype == jnp.float16 else min(scale, 1e30)
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape) * scale, dtype)
  got = jax.jit(_scaled_ssq, static_argnums=1)(x, axes)
  x64 = as64(x)
  assert got.dtype == jnp.float32
  assert_close(got, np.sqrt(np.sum(x64 * x64, axis=axes, keepdims=True)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_scaled_ssq_zero_inf_nan(dtype):
  x = jnp.array([[0.0, 1.0, 3e38, 2.0], [0.0, jnp.inf, 3e38, jnp.nan]], jnp.float32).astype(dtype)
  got = np.asarray(jax.jit(_scaled_ssq, static_argnums=1)(x, (0,)))
  assert got[0, 0] == 0 and np.isinf(got[0, 1]) and np.isinf(got[0, 2]) and np.isnan(got[0, 3])


def _force_gpu(monkeypatch):
  from clipax import _platform

  monkeypatch.setattr(_platform, "_by_platform",
                      lambda cpu, accelerator, gpu=None: (gpu or accelerator)())


def _same_shape_tree(dtype):
  """Leaves of repeated shapes (stacked on the GPU path), units of very different scales."""
  rng = np.random.default_rng(3)
  scales = [1.0, 1e20, 1e-25, 3.0, 1e30]
  tree = {f"w{i}": rng.normal(size=(6, 4)) * s for i, s in enumerate(scales)}
  tree.update({f"b{i}": rng.normal(size=(4,)) * s for i, s in enumerate(scales[:3])})
  tree.update({"conv0": rng.normal(size=(2, 2, 3, 4)),
               "conv1": rng.normal(size=(2, 2, 3, 4)) * 1e20, "one": np.array(2.0)})
  tree["w1"][0, 1] = 0.0
  tree["w3"][:, 2] = 0.0  # a unit of zeros
  if dtype == jnp.bfloat16:
    tree = {k: np.clip(v, -1e30, 1e30) for k, v in tree.items()}
  return {k: jnp.asarray(v, dtype) for k, v in tree.items()}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_path_stacks_same_shape_leaves_and_stays_exact(monkeypatch, dtype):
  import clipax

  tree = _same_shape_tree(dtype)
  _force_gpu(monkeypatch)
  fn = jax.jit(clipax.unitwise_norms)
  got = fn(tree)
  for k, x in tree.items():
    axes = clipax._unitwise.unit_axes(x)
    x64 = as64(x)
    assert got[k].shape == tuple(1 if i in axes else d for i, d in enumerate(x.shape)), k
    assert_close(got[k], np.sqrt(np.sum(x64 * x64, axis=axes, keepdims=True)))
  # the stacks are what the GPU path compiles: one reduction per stack of same-shape leaves
  # (5 matrices, 3 vectors, 2 convolutions, 1 scalar), not one per leaf
  text = fn.lower(tree).compile().as_text()
  assert text.count(" reduce(") < len(tree) - 4


def test_gpu_path_keeps_a_non_finite_unit_to_its_own_leaf(monkeypatch):
  import clipax

  tree = _same_shape_tree(jnp.float32)
  tree["w2"] = tree["w2"].at[1, 3].set(jnp.nan)
  tree["w4"] = tree["w4"].at[0, 0].set(jnp.inf)
  _force_gpu(monkeypatch)
  got = jax.jit(clipax.unitwise_norms)(tree)
  assert np.isnan(got["w2"][0, 3]) and np.isfinite(np.asarray(got["w2"][0, :3])).all()
  assert np.isinf(got["w4"][0, 0]) and np.isfinite(np.asarray(got["w4"][0, 1:])).all()
  for k in ("w0", "w1", "w3", "b0", "conv1"):
    assert np.isfinite(np.asarray(got[k])).all(), k


@pytest.mark.parametrize("make", [
    lambda clipax: clipax.adaptive_grad_clip(0.05),
    lambda clipax: clipax.clip_by_leaf_norm(3.0),
    lambda clipax: clipax.clip_by_block_rms(1.0),
], ids=["agc", "leaf_norm", "block_rms"])
def test_per_leaf_clip_on_the_gpu_path_equals_the_cpu_path(monkeypatch, make):
  # the GPU's program (unit norms over stacks, every scale from one vector) forced on the CPU
  import clipax

  rng = np.random.default_rng(5)
  params = {f"w{i}": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32) for i in range(4)}
  params.update({f"b{i}": jnp.asarray(rng.normal(size=(4,)), jnp.float32) for i in range(3)})
  grads = {k: v * (10.0 ** (i % 3)) for i, (k, v) in enumerate(params.items())}
  tx = make(clipax)
  # a fresh function for each path: jit's cache would keep the first path's program
  cpu_out, cpu_state = jax.jit(lambda g, s, p: tx.update(g, s, p))(grads, tx.init(params), params)
  _force_gpu(monkeypatch)
  gpu_out, gpu_state = jax.jit(lambda g, s, p: tx.update(g, s, p))(grads, tx.init(params), params)
  for k in grads:
    np.testing.assert_allclose(np.asarray(gpu_out[k]), np.asarray(cpu_out[k]), rtol=2e-6, atol=0)
  for f in ("norm", "scale", "update_norm"):
    np.testing.assert_allclose(float(getattr(gpu_state, f)), float(getattr(cpu_state, f)),
                               rtol=2e-6)
  assert bool(gpu_state.clipped) == bool(cpu_state.clipped) is True
