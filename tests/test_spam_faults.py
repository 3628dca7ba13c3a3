"""clipax.spam under the faults it exists for: huge and non-finite gradients (in the first steps
and right after a momentum reset), invalid traced hyperparameters, saturated counters, bad
trees, float64 norms and checkpoints."""

from __future__ import annotations

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from _keys import field
from _refs import as64, assert_trees_equal

import clipax
from clipax._checks import INT_MAX

HUGE = 1e30


def _all_finite(tree) -> bool:
  return all(np.all(np.isfinite(as64(x))) for x in jax.tree_util.tree_leaves(tree))


def _grads(n, size=6, seed=0):
  return 0.1 * np.random.default_rng(seed).standard_normal((n, size))


def _steps(tx, grads, state=None, params=None):
  """Applies ``tx`` to each row of ``grads`` (jitted, one call per step); returns the final
  state and params and the states after each step."""
  params = {"w": jnp.zeros(grads.shape[1])} if params is None else params
  state = tx.init(params) if state is None else state
  update = jax.jit(tx.update)
  states = []
  for g in grads:
    u, state = update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    params = optax.apply_updates(params, u)
    states.append(state)
  return state, params, states


@pytest.mark.parametrize("theta", [5000.0, 50.0])
@pytest.mark.parametrize("at", [4, 18, 59, 63])  # steps 5 and 19; the reset at 60, and after
def test_huge_element_while_spike_clipping_is_off_is_bounded(at, theta):
  grads = _grads(80)
  grads[at, 2] = HUGE
  tx = clipax.spam(0.01, theta=theta, reset_interval=60, warmup_steps=10)
  state, params, _ = _steps(tx, grads)
  assert _all_finite(state) and _all_finite(params)
  assert int(state.bounded_count) == 1 and int(state.nonfinite_count) == 0
  assert int(state.count) == 80


def test_huge_element_without_spike_clipping_is_skipped():
  """theta = 0: no clipping and no bound, so a square that overflows float32 skips the step."""
  grads = _grads(50)
  grads[[3, 33], 1] = HUGE  # step 4, and step 4 after the reset at 30
  tx = clipax.spam(0.01, theta=0.0, reset_interval=30)
  state, params, states = _steps(tx, grads)
  assert _all_finite(state) and _all_finite(params)
  assert int(state.nonfinite_count) == 2 and int(state.count) == 48
  assert_trees_equal(states[3].mu, states[2].mu)


def test_huge_first_gradient_is_skipped():
  """Nothing is known before the first step: a gradient whose square overflows is skipped."""
  grads = _grads(5)
  grads[0, 0] = HUGE
  tx = clipax.spam(0.01)
  state, params, states = _steps(tx, grads)
  assert int(states[0].nonfinite_count) == 1 and int(states[0].count) == 0
  assert int(states[0].filled) == 0
  np.testing.assert_array_equal(as64(states[0].mu["w"]), 0.0)
  assert _all_finite(state) and int(state.count) == 4 and int(state.filled) == 4


def test_warmup_bound_is_sqrt_theta_times_the_median():
  grads = _grads(6)
  grads[5] *= 1000.0
  tx = clipax.spam(0.01, theta=50.0)
  state, _, states = _steps(tx, grads)
  norms = np.linalg.norm(grads.astype(np.float32).astype(np.float64), axis=1)
  bound = np.sqrt(50.0) * np.median(norms[:5])
  assert norms[5] > bound and int(state.bounded_count) == 1
  np.testing.assert_allclose(as64(state.history[:6]), [*norms[:5], bound], rtol=1e-6)
  g = grads[5] * bound / norms[5]  # enters the moments bounded
  want_nu = 0.999 * as64(states[4].nu["w"]) + 0.001 * g * g
  np.testing.assert_allclose(as64(state.nu["w"]), want_nu, rtol=1e-5)


def _simulate(events, n, interval, count=0, since=0):
  """The expected outcome of each injected event, by SPAM's rules (python ints)."""
  filled, taken = 0, 0
  out = {"nonfinite": 0, "spikes": 0, "bounded": 0, "first": 0, "post_reset": 0}
  for i in range(n):
    kind = events.get(i)
    if kind == "nonfinite":
      out["nonfinite"] += 1
      continue
    step, s = min(count + 1, INT_MAX), (since + 1) % interval
    if kind == "huge":
      if step >= 20 and s >= 20:
        out["spikes"] += 1
      elif filled == 0:  # nothing known: the square overflows, the step is skipped
        out["nonfinite"] += 1
        continue
      else:
        out["bounded"] += 1
        out["first" if taken < 20 else "post_reset"] += 1
    count, since, filled, taken = step, s, min(filled + 1, 20), taken + 1
  return out


def _inject(n, seed):
  """A gradient stream with NaN, +Inf, -Inf and +-1e30 elements at random steps (seeded), some
  forced into the first 20 steps and right after the resets."""
  rng = np.random.default_rng(seed)
  grads = _grads(n, seed=seed)
  at = set(rng.choice(n, 30, replace=False).tolist()) | {0, 2, 7, 13, 19, 101, 103, 205, 208}
  events = {}
  for i in sorted(at):
    value = HUGE if i == 0 else rng.choice([np.nan, np.inf, -np.inf, HUGE, -HUGE])
    grads[i, rng.integers(grads.shape[1])] = value
    events[i] = "huge" if np.isfinite(value) else "nonfinite"
  return grads, events


def _scan(tx, grads, state):
  @jax.jit
  def go(grads, state):
    def body(carry, g):
      state, p = carry
      u, state = tx.update({"w": g}, state, p)
      p = optax.apply_updates(p, u)
      ok = jnp.all(jnp.isfinite(p["w"]) & jnp.isfinite(state.mu["w"]))
      ok &= jnp.all(jnp.isfinite(state.nu["w"]))
      return (state, p), ok

    return jax.lax.scan(body, (state, {"w": jnp.zeros(grads.shape[1])}), grads)

  return go(jnp.asarray(grads, jnp.float32), state)


@pytest.mark.parametrize("start", [0, INT_MAX - 2])  # a start with the count at 2**31 - 3
@pytest.mark.parametrize("seed", [0, 1])
def test_fault_injection_in_a_scan(seed, start):
  n, interval = 300, 100
  grads, events = _inject(n, seed)
  tx = clipax.spam(1e-3, reset_interval=interval, warmup_steps=20, weight_decay=0.01)
  state0 = tx.init({"w": jnp.zeros(grads.shape[1])})._replace(count=jnp.asarray(start, jnp.int32))
  (state, params), ok = _scan(tx, grads, state0)
  want = _simulate(events, n, interval, count=start)
  assert want["first"] > 0 and want["post_reset"] > 0 and want["spikes"] > 0
  assert np.all(np.asarray(ok)) and _all_finite(state) and _all_finite(params)
  assert int(state.nonfinite_count) == want["nonfinite"]
  assert int(state.spike_count) == want["spikes"]
  assert int(state.bounded_count) == want["bounded"]
  taken = n - want["nonfinite"]
  assert int(state.count) == min(start + taken, INT_MAX)
  assert int(state.since_reset) == taken % interval
  assert int(field(clipax.metrics(state), "count")) == min(start + n, INT_MAX)


def test_resets_go_on_after_the_count_saturates():
  interval, n = 10, 45
  grads = _grads(n)
  grads[[5, 17], 0] = np.nan
  tx = clipax.spam(0.01, reset_interval=interval)
  near = jnp.asarray(INT_MAX - 3, jnp.int32)
  state0 = tx.init({"w": jnp.zeros(6)})._replace(
      count=near, nonfinite_count=near + 2
  )
  state, _, states = _steps(tx, grads, state0)
  assert int(state.count) == INT_MAX and int(state.nonfinite_count) == INT_MAX
  assert int(field(clipax.metrics(state), "count")) == INT_MAX
  resets = [t for t, s in enumerate(states) if int(s.since_reset) == 0 and t not in (5, 17)]
  assert resets == [10, 21, 31, 41]  # every 10 steps taken (the NaN steps 5 and 17 skipped)
  for t in resets:  # the moments start again from zero: m = (1 - b1) g
    np.testing.assert_allclose(as64(states[t].mu["w"]), 0.1 * grads[t], rtol=1e-6)


INVALID = [
    ("learning_rate", np.nan),
    ("learning_rate", -1.0),
    ("b1", 1.5),
    ("b2", np.nan),
    ("eps", 0.0),
    ("eps", np.inf),
    ("theta", -1.0),
    ("theta", np.inf),
    ("weight_decay", np.nan),
    ("reset_interval", 0),
]


@pytest.mark.parametrize("name,value", INVALID)
def test_invalid_traced_hyperparameter_zeroes_the_update(name, value):
  tx = optax.inject_hyperparams(clipax.spam, hyperparam_dtype=jnp.float32)(
      learning_rate=0.01, weight_decay=0.01, reset_interval=50
  )
  params = {"w": jnp.ones(6)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  grads = _grads(4)
  for g in grads[:3]:
    _, state = update({"w": jnp.asarray(g, jnp.float32)}, state, params)
  good = state.hyperparams[name]
  hyper = {**state.hyperparams, name: jnp.asarray(value, good.dtype)}
  out, bad = update({"w": jnp.asarray(grads[3], jnp.float32)}, state._replace(hyperparams=hyper),
                    params)
  np.testing.assert_array_equal(as64(out["w"]), 0.0)
  assert int(bad.inner_state.invalid_count) == 1
  assert_trees_equal(bad.inner_state._replace(invalid_count=0, norm=0),
                     state.inner_state._replace(norm=0))
  assert int(field(clipax.metrics(bad), "invalid_count")) == 1
  assert int(field(clipax.metrics(bad), "count")) == 4


def test_nan_learning_rate_schedule_is_invalid_not_applied():
  schedule = lambda c: jnp.where(c >= 2, jnp.nan, 0.01)  # noqa: E731
  tx = clipax.spam(schedule)
  params = {"w": jnp.ones(6)}
  state, p, _ = _steps(tx, _grads(5), params=params)
  assert int(state.count) == 2 and int(state.invalid_count) == 3
  assert int(state.nonfinite_count) == 0 and _all_finite(p)


def test_complex_leaves_are_a_type_error_naming_the_leaf():
  tx = clipax.spam(0.1)
  with pytest.raises(TypeError, match=r"\['a'\]\['b'\].*complex"):
    tx.init({"a": {"b": jnp.ones(2, jnp.complex64)}})
  params = {"w": jnp.ones(2)}
  state = tx.init(params)
  with pytest.raises(TypeError, match=r"gradient leaf \['w'\].*complex"):
    tx.update({"w": jnp.ones(2, jnp.complex64)}, state, params)
  with pytest.raises(TypeError, match=r"parameter leaf \['w'\].*complex"):
    tx.update({"w": jnp.ones(2)}, state, {"w": jnp.ones(2, jnp.complex64)})


def test_gradients_that_do_not_match_the_state_are_a_value_error():
  tx = clipax.spam(0.1)
  state = tx.init({"w": jnp.zeros(3)})
  with pytest.raises(ValueError, match=r"structure.*'v'.*state.*'w'"):
    tx.update({"v": jnp.ones(3)}, state)
  with pytest.raises(ValueError, match=r"\['w'\] has shape \(2, 3\).*shape \(3,\)"):
    tx.update({"w": jnp.ones((2, 3))}, state)  # would broadcast against the (3,) moments
  with pytest.raises(ValueError, match=r"\['w'\] has shape \(1,\).*shape \(3,\)"):
    jax.jit(tx.update)({"w": jnp.ones(1)}, state)


def test_float64_gradient_of_1e40_is_finite_under_x64():
  with jax.enable_x64(True):
    tx = clipax.spam(0.01)
    params = {"w": jnp.zeros(4, jnp.float64)}
    state = tx.init(params)
    assert state.norm.dtype == jnp.float64 and state.history.dtype == jnp.float64
    update = jax.jit(tx.update)
    for _ in range(3):
      out, state = update({"w": jnp.full(4, 1e40, jnp.float64)}, state, params)
    assert int(state.nonfinite_count) == 0 and int(state.count) == 3
    assert float(state.norm) == pytest.approx(2e40, rel=1e-12)
    assert _all_finite(state) and _all_finite(out)


def test_no_zero_size_array_in_the_state():
  tx = clipax.spam(0.1, weight_decay=0.1)
  params = {"empty": jnp.zeros((0, 3)), "w": jnp.ones(2)}
  state = tx.init(params)
  assert all(np.size(x) > 0 for x in jax.tree_util.tree_leaves(state))
  out, state = jax.jit(tx.update)({"empty": jnp.zeros((0, 3)), "w": jnp.ones(2)}, state, params)
  assert out["empty"].shape == (0, 3) and int(state.count) == 1
  assert float(out["w"][0]) < 0
  empty = tx.init({})
  assert all(np.size(x) > 0 for x in jax.tree_util.tree_leaves(empty))
  out, empty = tx.update({}, empty, {})
  assert out == {} and int(empty.count) == 1


def _checkpoint_run(tmp_path, save, restore):
  """40 steps with faults, saved and restored at step 20: restored bit-identically, and the
  resumed run continues bit-identically."""
  grads = _grads(40, seed=3)
  grads[[2, 25], 1] = np.nan
  grads[[8, 30], 4] = HUGE
  tx = clipax.spam(0.01, reset_interval=15, warmup_steps=5, weight_decay=0.1)
  params = {"w": jnp.ones(6), "empty": jnp.zeros((0,))}
  update = jax.jit(tx.update)

  def step(state, t):
    return update({"w": jnp.asarray(grads[t], jnp.float32), "empty": jnp.zeros((0,))}, state,
                  params)

  state, outs = tx.init(params), []
  for t in range(40):
    out, state = step(state, t)
    outs.append(out)
    if t == 19:
      middle = state
  restored = restore(save(middle), tx, params)
  assert type(restored) is type(middle)
  assert_trees_equal(restored, middle)
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(middle),
                  strict=True):
    assert a.dtype == b.dtype and a.shape == b.shape
  for t in range(20, 40):
    out, restored = step(restored, t)
    assert_trees_equal(out, outs[t])
  assert_trees_equal(restored, state)


def test_flax_state_dict_roundtrip_and_resume(tmp_path):
  _checkpoint_run(
      tmp_path,
      lambda s: flax.serialization.to_state_dict(s),
      lambda d, tx, p: flax.serialization.from_state_dict(tx.init(p), d),
  )


def test_orbax_roundtrip_and_resume(tmp_path):
  path = tmp_path / "spam"

  def save(state):
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(path, state)
      ckptr.wait_until_finished()
    return path

  def restore(path, tx, params):
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(path, jax.eval_shape(tx.init, params))

  _checkpoint_run(tmp_path, save, restore)


def test_spike_bound_is_capped_so_clipping_never_overflows():
  """While spike clipping is on, theta * v is capped at float32's max / 4: with v so large that
  theta * v overflows, a huge element is clipped to sqrt(cap) (a spike) and the step is taken."""
  tx = clipax.spam(0.01, theta=5000.0)
  params = {"w": jnp.zeros(3)}
  state = tx.init(params)._replace(count=jnp.asarray(40, jnp.int32),
                                   since_reset=jnp.asarray(40, jnp.int32))
  state = state._replace(nu={"w": jnp.asarray([1e36, 1e-4, 1e-4], jnp.float32)})
  g = {"w": jnp.asarray([1e30, 1e-3, -1e-3], jnp.float32)}
  _, new = jax.jit(tx.update)(g, state, params)
  assert int(new.nonfinite_count) == 0 and int(new.count) == 41 and int(new.spikes) == 1
  cap = float(np.finfo(np.float32).max) / 4
  np.testing.assert_allclose(as64(new.mu["w"])[0], 0.1 * np.sqrt(cap), rtol=1e-6)
  assert _all_finite(new)
