"""ClipState, metrics() through every optax wrapper, and checkpoint round trips."""

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _keys import field
from _refs import norm64

import clipax

PARAMS = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}


def _grads(scale):
  return jax.tree_util.tree_map(lambda p: p * scale, PARAMS)


def _step(tx, state, grads, params=PARAMS):
  return jax.jit(tx.update)(grads, state, params)


def test_clip_state_fields_and_dtypes():
  state = clipax.clip_by_global_norm(1.0).init(PARAMS)
  assert isinstance(state, clipax.ClipState)
  assert state._fields == ("count", "norm", "scale", "clipped", "clipped_count", "nonfinite_count",
                           "invalid_count", "threshold", "update_norm", "leaf_norms", "tag")
  assert state.leaf_norms == ()
  assert bytes(np.asarray(state.tag)) == b"global_norm/"
  dtypes = [x.dtype for x in state[:-2]]
  assert dtypes == [jnp.int32, jnp.float32, jnp.float32, jnp.bool_, jnp.int32, jnp.int32, jnp.int32,
                    jnp.float32, jnp.float32]
  assert all(x.shape == () for x in state[:-2])


def test_metrics_values_and_clip_rate():
  tx = optax.chain(clipax.clip_by_global_norm(1.0), optax.sgd(0.1))
  state = tx.init(PARAMS)
  for scale in [10.0, 0.01, 5.0, 0.1]:
    _, state = _step(tx, state, _grads(scale))
  m = clipax.metrics(state)
  keys = ("norm", "update_norm", "threshold", "scale", "clipped", "clip_rate", "clipped_count",
          "nonfinite_count", "invalid_count", "count")
  assert set(m) == {f"clip/global_norm/{k}" for k in keys}
  m = {k.removeprefix("clip/global_norm/"): v for k, v in m.items()}
  np.testing.assert_allclose(float(m["norm"]), norm64(_grads(0.1)), rtol=1e-6)
  np.testing.assert_allclose(float(m["update_norm"]), norm64(_grads(0.1)), rtol=1e-6)
  assert float(m["threshold"]) == 1.0
  assert float(m["clip_rate"]) == 0.5 and int(m["clipped_count"]) == 2
  assert int(m["count"]) == 4 and not bool(m["clipped"])
  assert float(m["scale"]) == 1.0


def test_metrics_prefix_and_several_clippers_get_distinct_keys():
  tx = optax.chain(clipax.clip_by_value(0.5), clipax.clip_by_global_norm(1.0), optax.adam(1e-3))
  state = tx.init(PARAMS)
  _, state = _step(tx, state, _grads(2.0))
  m = clipax.metrics(state, prefix="train/clip")
  assert float(m["train/clip/value/norm"]) == pytest.approx(norm64(_grads(2.0)), rel=1e-6)
  # the second clipper sees the value-clipped gradient (every element 0.5)
  assert float(m["train/clip/global_norm/norm"]) == pytest.approx(norm64(_grads(0.5)), rel=1e-6)
  assert not any(k.startswith("train/clip/norm") for k in m)


def test_metrics_is_empty_without_clipax_state():
  assert clipax.metrics(optax.adam(0.1).init(PARAMS)) == {}


WRAPPERS = {
    "chain": lambda c: optax.chain(c, optax.adamw(1e-3)),
    "inject_hyperparams": lambda c: optax.inject_hyperparams(clipax.clip_by_global_norm)(
        max_norm=1.0),
    "multi_steps": lambda c: optax.MultiSteps(optax.chain(c, optax.sgd(0.1)), every_k_schedule=2),
    "masked": lambda c: optax.masked(c, {"w": True, "b": False}),
    "partition": lambda c: optax.partition({"clip": c, "plain": optax.sgd(0.1)},
                                           {"w": "clip", "b": "plain"}),
    "named_chain": lambda c: optax.named_chain(("clip", c), ("opt", optax.lion(1e-4))),
    "apply_if_finite": lambda c: optax.apply_if_finite(optax.chain(c, optax.sgd(0.1)), 3),
}


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_metrics_found_inside_every_wrapper(name):
  tx = WRAPPERS[name](clipax.clip_by_global_norm(1.0))
  state = tx.init(PARAMS)
  steps = 2 if name == "multi_steps" else 1
  for _ in range(steps):
    _, state = _step(tx, state, _grads(3.0))
  m = jax.jit(clipax.metrics)(state)
  seen = _grads(3.0) if name not in ("masked", "partition") else {"w": _grads(3.0)["w"]}
  name = {"named_chain": "clip", "partition": "clip"}.get(name, "global_norm")
  assert float(m[f"clip/{name}/norm"]) == pytest.approx(norm64(seen), rel=1e-6)
  assert int(m[f"clip/{name}/count"]) == 1 and bool(m[f"clip/{name}/clipped"])


def test_metrics_from_nnx_optimizer_state():
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
      return self.linear(x)

  model = Model(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.chain(clipax.clip_by_global_norm(0.5), optax.sgd(0.1)),
                            wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x):
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    optimizer.update(model, grads)
    return grads

  grads = step(model, optimizer, jnp.ones((4, 3)))
  want = norm64(jax.tree_util.tree_leaves(nnx.state(grads)))
  for state in [optimizer.opt_state, nnx.to_pure_dict(nnx.state(optimizer, nnx.OptState))]:
    m = clipax.metrics(state)
    assert float(field(m, "norm")) == pytest.approx(want, rel=1e-5)
    assert int(field(m, "count")) == 1


def test_checkpoint_round_trip_continues_bit_identically():
  tx = optax.chain(clipax.clip_by_global_norm(1.0), optax.adamw(1e-2))
  rng = np.random.default_rng(0)
  grads = [jax.tree_util.tree_map(lambda p, r=r: p * r, PARAMS) for r in rng.uniform(0, 5, 6)]
  update = jax.jit(tx.update)

  def run(params, state, seq):
    for g in seq:
      u, state = update(g, state, params)
      params = optax.apply_updates(params, u)
    return params, state

  full_params, full_state = run(PARAMS, tx.init(PARAMS), grads)
  half_params, half_state = run(PARAMS, tx.init(PARAMS), grads[:3])
  blob = flax.serialization.to_bytes(half_state)
  restored = flax.serialization.from_bytes(tx.init(PARAMS), blob)
  resumed_params, resumed_state = run(half_params, restored, grads[3:])
  for a, b in zip(jax.tree_util.tree_leaves((full_params, full_state)),
                  jax.tree_util.tree_leaves((resumed_params, resumed_state)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(field(clipax.metrics(restored), "count")) == 3


def test_counts_saturate_instead_of_overflowing():
  tx = clipax.clip_by_global_norm(1.0)
  state = tx.init(PARAMS)._replace(count=jnp.asarray(np.iinfo(np.int32).max, jnp.int32))
  _, state = _step(tx, state, _grads(1.0))
  assert int(state.count) == np.iinfo(np.int32).max


def test_multisteps_metrics_say_whether_this_call_updated():
  k = 3
  tx = optax.MultiSteps(optax.chain(clipax.clip_by_global_norm(1.0), optax.sgd(0.1)), k)
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  assert not bool(clipax.metrics(state)["clip/updated"])
  update = jax.jit(tx.update)
  flags, counts = [], []
  for step in range(2 * k):
    _, state = update({"w": jnp.full(2, float(step + 1))}, state, params)
    m = clipax.metrics(state)
    flags.append(bool(m["clip/updated"]))
    counts.append(int(field(m, "count")))
  assert flags == [False, False, True] * 2
  assert counts == [0, 0, 1, 1, 1, 2]  # the clipper runs once per optimizer step
  from flax import serialization

  as_dict = serialization.to_state_dict(state)
  assert bool(clipax.metrics(as_dict)["clip/updated"])


def test_metrics_without_multisteps_has_no_updated_key_and_checks_prefix():
  tx = clipax.clip_by_global_norm(1.0)
  state = tx.init({"w": jnp.zeros(2)})
  assert "clip/updated" not in clipax.metrics(state)
  with pytest.raises(TypeError, match="`prefix`"):
    clipax.metrics(state, prefix=3)


def test_updated_is_read_from_the_dict_forms_that_drop_an_empty_skip_state():
  from flax import nnx

  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  tx = optax.MultiSteps(optax.chain(clipax.clip_by_global_norm(1.0), optax.sgd(0.1)), 2)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grads = jax.tree_util.tree_map(jnp.ones_like, nnx.state(model, nnx.Param))
  for want in (False, True):
    optimizer.update(model, grads)
    pure = nnx.to_pure_dict(nnx.state(optimizer))
    assert "skip_state" not in pure["opt_state"]  # the form that lost the empty field
    assert bool(clipax.metrics(pure)["clip/updated"]) is want
