"""Every public transformation through the same contract.

One table, ``CLIPPERS``; each row is run through init + jit(update), ``optax.chain`` with adamw,
``inject_hyperparams``, ``MultiSteps``, ``masked``, abstract (ShapeDtypeStruct) init, state
dtype stability under jit, strict dtype promotion and ``metrics()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipax


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  factory: Callable[..., optax.GradientTransformation]
  args: tuple = ()
  kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

  def make(self) -> optax.GradientTransformation:
    return self.factory(*self.args, **self.kwargs)

  def __str__(self) -> str:
    return self.name


CLIPPERS = [
    Case("clip_by_global_norm", clipax.clip_by_global_norm, (1.0,)),
    Case("clip_by_global_norm_inf", clipax.clip_by_global_norm, (1.0,), {"ord": float("inf")}),
    Case("clip_by_value", clipax.clip_by_value, (0.1,)),
    Case("clip_by_leaf_norm", clipax.clip_by_leaf_norm, (1.0,)),
    Case("clip_by_block_rms", clipax.clip_by_block_rms, (0.1,)),
    Case("adaptive_grad_clip", clipax.adaptive_grad_clip, (0.01,)),
    Case("zclip", clipax.zclip, (), {"warmup_steps": 1}),
    Case("autoclip", clipax.autoclip, (10.0,), {"history": 16}),
    Case("adagc", clipax.adagc, (), {"warmup_steps": 1}),
    Case("skip_nonfinite", clipax.skip_nonfinite, (optax.sgd(0.1, momentum=0.9),)),
    Case("skip_spikes", clipax.skip_spikes, (optax.sgd(0.1, momentum=0.9),), {"window": 4}),
    Case("spam", clipax.spam, (0.1,)),
]


def _params(dtype):
  rng = np.random.default_rng(0)
  raw = {"dense": {"kernel": rng.normal(size=(5, 3)), "bias": rng.normal(size=(3,))},
         "conv": [rng.normal(size=(3, 3, 2, 4))], "scalar": rng.normal(size=())}
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), raw)


def _grads(params, scale=10.0):
  return jax.tree_util.tree_map(lambda p: (p * scale + 1).astype(p.dtype), params)


def _avals(tree):
  return jax.tree_util.tree_map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


@pytest.fixture(params=CLIPPERS, ids=str)
def case(request) -> Case:
  return request.param


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_jit_update_keeps_structure_dtype_and_state_avals(case, dtype):
  params = _params(dtype)
  tx = case.make()
  state = tx.init(params)
  update = jax.jit(tx.update)
  grads = _grads(params)
  for _ in range(2):
    out, new_state = update(grads, state, params)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(grads)
    assert _avals(out) == _avals(grads)
    assert _avals(new_state) == _avals(state)
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
    state = new_state
  for leaf in jax.tree_util.tree_leaves(out):
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
  assert int(clipax.metrics(state)["clip/count"]) == 2


def test_strict_dtype_promotion(case):
  params = _params(jnp.bfloat16)
  with jax.numpy_dtype_promotion("strict"):
    tx = case.make()
    state = tx.init(params)
    out, _ = jax.jit(tx.update)(_grads(params), state, params)
  assert _avals(out) == _avals(params)


def test_abstract_init_matches_concrete(case):
  params = _params(jnp.float32)
  tx = case.make()
  shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  abstract = jax.eval_shape(tx.init, shapes)
  assert _avals(abstract) == _avals(tx.init(params))


def test_chain_with_adamw_trains_finite(case):
  params = _params(jnp.float32)
  tx = optax.chain(case.make(), optax.adamw(1e-2))
  state = tx.init(params)

  @jax.jit
  def step(params, state, scale):
    grads = _grads(params, scale)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for scale in [1.0, 100.0, jnp.nan, 1.0]:
    params, state = step(params, state, jnp.asarray(scale, jnp.float32))
    assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree_util.tree_leaves(params))
  m = clipax.metrics(state)
  assert int(m["clip/count"]) == 4 and int(m["clip/nonfinite_count"]) >= 1


def test_inject_hyperparams(case):
  params = _params(jnp.bfloat16)
  # float32 hyperparameters: in bfloat16 (optax's default here, the params' dtype) b2 = 0.999
  # rounds to 1.0
  inject = optax.inject_hyperparams(case.factory, hyperparam_dtype=jnp.float32)
  tx = inject(*case.args, **case.kwargs)
  state = tx.init(params)
  out, state = jax.jit(tx.update)(_grads(params), state, params)
  direct, _ = jax.jit(case.make().update)(_grads(params), case.make().init(params), params)
  for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(direct), strict=True):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2)
  assert int(clipax.metrics(state)["clip/count"]) == 1


def test_multi_steps_updates_state_once_per_optimizer_step(case):
  params = _params(jnp.float32)
  tx = optax.MultiSteps(optax.chain(case.make(), optax.sgd(0.1)), every_k_schedule=3)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(6):
    _, state = update(_grads(params), state, params)
  assert int(clipax.metrics(state)["clip/count"]) == 2


def test_masked_leaves_pass_through(case):
  params = _params(jnp.float32)
  mask = jax.tree_util.tree_map(lambda _: False, params)
  mask["dense"]["kernel"] = True
  tx = optax.masked(case.make(), mask)
  grads = _grads(params)
  out, state = jax.jit(tx.update)(grads, tx.init(params), params)
  bias = grads["dense"]["bias"]
  np.testing.assert_array_equal(np.asarray(out["dense"]["bias"]), np.asarray(bias))
  assert int(clipax.metrics(state)["clip/count"]) == 1
