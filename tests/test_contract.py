"""Every public transformation through the same contract.

One table, ``CLIPPERS``; each row is run through init + jit(update), ``optax.chain`` with adamw,
``inject_hyperparams``, ``MultiSteps``, ``masked``, abstract (ShapeDtypeStruct) init, state
dtype stability under jit, strict dtype promotion and ``metrics()``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _cases import CLIPPERS, Case
from _keys import field, has

import clipax


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
  assert int(field(clipax.metrics(state), "count")) == 2


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
  assert int(field(m, "count")) == 4 and int(field(m, "nonfinite_count")) >= 1


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
  assert int(field(clipax.metrics(state), "count")) == 1


def test_multi_steps_updates_state_once_per_optimizer_step(case):
  params = _params(jnp.float32)
  tx = optax.MultiSteps(optax.chain(case.make(), optax.sgd(0.1)), every_k_schedule=3)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(6):
    _, state = update(_grads(params), state, params)
  assert int(field(clipax.metrics(state), "count")) == 2


def test_masked_leaves_pass_through(case):
  params = _params(jnp.float32)
  mask = jax.tree_util.tree_map(lambda _: False, params)
  mask["dense"]["kernel"] = True
  tx = optax.masked(case.make(), mask)
  grads = _grads(params)
  out, state = jax.jit(tx.update)(grads, tx.init(params), params)
  bias = grads["dense"]["bias"]
  np.testing.assert_array_equal(np.asarray(out["dense"]["bias"]), np.asarray(bias))
  assert int(field(clipax.metrics(state), "count")) == 1


# ----------------------------------------------------------------------------- checkpoints
def _run_steps(tx, state, params, scales):
  update = jax.jit(tx.update)
  outs = []
  for scale in scales:
    out, state = update(_grads(params, scale), state, params)
    outs.append(out)
  return outs, state


def _bits(tree):
  return [np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(tree)]


def test_state_has_no_zero_size_array(case):
  tx = case.make()
  state = tx.init(_params(jnp.float32))
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    assert np.size(leaf) > 0, jax.tree_util.keystr(path)


def test_state_saves_and_resumes_bit_identically_with_orbax(case, tmp_path):
  import orbax.checkpoint as ocp

  params = _params(jnp.float32)
  tx = case.make()
  _, state = _run_steps(tx, tx.init(params), params, [1.0, 100.0, jnp.nan, 1.0, 3.0])
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "state", state)
    ckpt.wait_until_finished()
    target = jax.eval_shape(tx.init, params)
    restored = ckpt.restore(tmp_path / "state", target)
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
  assert _bits(restored) == _bits(state)
  assert _avals(restored) == _avals(state)
  more = [2.0, 50.0, 0.5]
  out_a, state_a = _run_steps(tx, state, params, more)
  out_b, state_b = _run_steps(tx, restored, params, more)
  assert _bits(out_a) == _bits(out_b) and _bits(state_a) == _bits(state_b)


def test_state_saves_and_resumes_bit_identically_with_flax_serialization(case):
  from flax import serialization

  params = _params(jnp.float32)
  tx = case.make()
  _, state = _run_steps(tx, tx.init(params), params, [1.0, 100.0, jnp.inf, 1.0])
  blob = serialization.to_bytes(state)
  restored = serialization.from_bytes(tx.init(params), blob)
  assert _bits(restored) == _bits(state)
  as_dict = serialization.from_state_dict(tx.init(params), serialization.to_state_dict(state))
  assert _bits(as_dict) == _bits(state)
  out_a, state_a = _run_steps(tx, state, params, [2.0, 50.0])
  out_b, state_b = _run_steps(tx, restored, params, [2.0, 50.0])
  assert _bits(out_a) == _bits(out_b) and _bits(state_a) == _bits(state_b)


# ----------------------------------------------------------------------------- safety rules
_TRACED = [c for c in CLIPPERS if c.hparam is not None]


def _counters(state):
  """Every int32 counter of every clipax state inside ``state``, by field name."""
  found = {}

  def visit(node, where):
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      for field in node._fields:
        value = getattr(node, field)
        if isinstance(value, jax.Array) and value.dtype == jnp.int32 and value.shape == ():
          found[f"{where}{type(node).__name__}.{field}"] = value
        else:
          visit(value, f"{where}{type(node).__name__}.{field}/")
    elif isinstance(node, (tuple, list)):
      for i, x in enumerate(node):
        visit(x, f"{where}{i}/")

  visit(state, "")
  return found


def _saturate(state, start):
  """``state`` with every clipax counter (not ring positions or flags) set to ``start``."""

  def visit(node):
    if isinstance(node, tuple) and hasattr(node, "_fields") and callable(
        getattr(node, "clipax_metrics", None)):
      changes = {f: jnp.asarray(start, jnp.int32) for f in node._fields
                 if f in ("count", "observed", "accepted") or f.endswith("_count")}
      if "inner_state" in node._fields:
        changes["inner_state"] = visit(node.inner_state)
      return node._replace(**changes)
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      return type(node)(*[visit(x) for x in node])
    if isinstance(node, (tuple, list)):
      return type(node)(visit(x) for x in node)
    return node

  return visit(state)


@pytest.mark.parametrize("case", _TRACED, ids=str)
def test_invalid_traced_hyperparameter_is_counted_never_a_silent_disable(case):
  params = _params(jnp.float32)
  inject = optax.inject_hyperparams(case.factory, hyperparam_dtype=jnp.float32)
  tx = inject(*case.args, **case.kwargs)
  state = tx.init(params)
  update = jax.jit(tx.update)
  _, state = update(_grads(params), state, params)
  before = clipax.metrics(state)
  for bad in [jnp.nan, -1.0, jnp.nan if case.inf_is_off else jnp.inf]:
    good = state.hyperparams[case.hparam]
    state.hyperparams[case.hparam] = jnp.asarray(bad, jnp.float32)
    out, state = update(_grads(params, 100.0), state, params)
    state.hyperparams[case.hparam] = good
    for leaf in jax.tree_util.tree_leaves(out):
      np.testing.assert_array_equal(np.asarray(leaf), 0.0)
  m = clipax.metrics(state)
  assert int(field(m, "invalid_count")) == 3
  assert int(field(m, "nonfinite_count")) == int(field(before, "nonfinite_count"))
  out, state = update(_grads(params), state, params)  # valid again: acts normally
  assert any(np.any(np.asarray(x) != 0) for x in jax.tree_util.tree_leaves(out))
  assert int(field(clipax.metrics(state), "invalid_count")) == 3


@pytest.mark.parametrize("case", [c for c in _TRACED if c.inf_is_off], ids=str)
def test_traced_inf_threshold_means_off(case):
  params = _params(jnp.float32)
  tx = optax.inject_hyperparams(case.factory)(*case.args, **case.kwargs)
  state = tx.init(params)
  state.hyperparams[case.hparam] = jnp.asarray(jnp.inf, jnp.float32)
  grads = _grads(params, 100.0)
  out, state = jax.jit(tx.update)(grads, state, params)
  assert _bits(out) == _bits(grads)
  m = clipax.metrics(state)
  assert int(field(m, "invalid_count")) == 0 and not bool(field(m, "clipped"))


@pytest.mark.parametrize("case", _TRACED, ids=str)
def test_python_numbers_through_inject_hyperparams_are_validated_in_init(case):
  tx = optax.inject_hyperparams(case.factory)(*case.args, **{**case.kwargs, case.hparam: -1.0})
  with pytest.raises(ValueError, match=f"`{case.hparam}`"):
    tx.init(_params(jnp.float32))


def test_counters_saturate_instead_of_wrapping(case):
  params = _params(jnp.float32)
  tx = case.make()
  start = 2**31 - 3
  state = _saturate(tx.init(params), start)
  _, state = _run_steps(tx, state, params, [100.0, jnp.nan, 100.0, jnp.inf, 100.0, 1.0])
  counters = _counters(state)
  assert counters
  for name, value in counters.items():
    assert int(value) >= 0, name
  for name in counters:
    if name.endswith((".count", "_count")) and "cursor" not in name:
      assert int(counters[name]) >= start or int(counters[name]) <= 6, name
  m = clipax.metrics(state)
  assert int(field(m, "count")) >= start
  for key in ("clip_rate", "skip_rate"):
    if has(m, key):
      assert 0.0 <= float(field(m, key)) <= 1.0, key


def test_float64_statistics_under_x64(case):
  with jax.enable_x64(True):
    params = jax.tree_util.tree_map(lambda x: x * 1e40, _params(jnp.float64))
    tx = case.make()
    state = tx.init(params)
    out, state = jax.jit(tx.update)(_grads(params), state, params)
    m = clipax.metrics(state)
    assert int(field(m, "nonfinite_count")) == 0
    assert np.isfinite(float(field(m, "norm"))) and float(field(m, "norm")) > 1e40
    for leaf in jax.tree_util.tree_leaves(out):
      assert leaf.dtype == jnp.float64 and np.all(np.isfinite(np.asarray(leaf)))


# ------------------------------------------------------------------------ metrics in every form
def test_metrics_read_every_form_of_the_state(case, tmp_path):
  import orbax.checkpoint as ocp
  from flax import nnx, serialization

  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  tx = case.make()
  if case.kind == "clip":
    tx = optax.chain(tx, optax.sgd(0.1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit  # one program for the three steps (eager, each of its ops compiles on its own)
  def step(model, optimizer, scale):
    grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, scale), nnx.state(model, nnx.Param))
    optimizer.update(model, grads)

  for scale in (1.0, 50.0, float("nan")):
    step(model, optimizer, jnp.float32(scale))
  want = {k: np.asarray(v) for k, v in clipax.metrics(optimizer.opt_state).items()}
  assert want and int(want[next(k for k in want if k.endswith("nonfinite_count"))]) == 1
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "opt", nnx.state(optimizer))
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "opt")  # no target: nested dicts, {"value": x} variables
  forms = {
      "nnx.to_pure_dict": nnx.to_pure_dict(nnx.state(optimizer)),
      "nnx.State": nnx.state(optimizer),
      "flax state dict": serialization.to_state_dict(optimizer.opt_state),
      "orbax without target": restored,
  }
  for form, state in forms.items():
    got = clipax.metrics(state)
    assert set(got) == set(want), (form, sorted(set(got) ^ set(want)))
    for key, value in want.items():
      np.testing.assert_array_equal(np.asarray(got[key]), value, err_msg=f"{form}: {key}")
