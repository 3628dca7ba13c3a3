"""The GPU path of ``unitwise_norms`` (one variadic ``(scale, ssq)`` reduction), run on the CPU."""

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
