"""skip_nonfinite and skip_spikes: decisions against a float64 reference, frozen inner state."""

from __future__ import annotations

import math

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _keys import field
from _refs import (
  as64,
  assert_resume_is_bit_identical,
  assert_trees_equal,
  norm64,
  run_scan,
  spiky_norms,
)

import clipax

RTOL = 1e-5


class SkipSpikesRef:
  """The robust band in float64 numpy: median + k * 1.4826 * MAD of the last ``window``
  recorded finite norms (current step excluded; a spike is recorded as the band it broke),
  active once ``warmup`` norms were recorded."""

  def __init__(self, window=128, k=6.0, warmup=None):
    self.window, self.k = window, k
    self.warmup = min(16, window) if warmup is None else warmup
    self.accepted = []

  def step(self, g):
    """Returns (skipped, threshold or None)."""
    if not math.isfinite(g):
      return True, None
    threshold = math.inf
    if len(self.accepted) >= self.warmup:
      recent = np.asarray(self.accepted[-self.window :])
      median = np.median(recent)
      threshold = float(median + self.k * 1.4826 * np.median(np.abs(recent - median)))
    if g > threshold:
      self.accepted.append(threshold)  # a spike is recorded bounded to the band it broke
      return True, threshold
    self.accepted.append(g)
    return False, threshold


def norm_stream(n, seed, *, base=1.0, spikes=0.03, nans=5, infs=2):
  return spiky_norms(n, seed, base=base, sigma=0.2, spikes=spikes, nans=nans, infs=infs,
                     first_bad=3)


def grads_for(norms):
  """``{"w": [n, 3]}`` gradients with these global norms (NaN/Inf in the first element)."""
  d = np.array([2.0, -1.0, 2.0]) / 3.0
  g = np.where(np.isfinite(norms), norms, 1.0)[:, None] * d[None, :]
  g[~np.isfinite(norms), 0] = norms[~np.isfinite(norms)]
  return {"w": jnp.asarray(g, jnp.float32)}


def leaves(tree):
  return jax.tree_util.tree_leaves(tree)


PARAMS = {"w": jnp.zeros(3)}
INNER = optax.sgd(0.1, momentum=0.9)


# ----------------------------------------------------------------------------- skip_spikes
@pytest.mark.parametrize("window,k,warmup", [(128, 6.0, None), (16, 3.0, 4)])
def test_skip_spikes_matches_reference(window, k, warmup):
  norms = norm_stream(400, seed=1)
  grads = grads_for(norms)
  tx = clipax.skip_spikes(INNER, window=window, threshold=k, warmup=warmup)
  _, (out, states) = run_scan(tx, grads, PARAMS)
  ref = SkipSpikesRef(window, k, warmup)
  g64 = as64(grads["w"])
  inputs = [norm64(g64[t]) for t in range(len(norms))]
  skipped_flags, thresholds = np.asarray(states.skipped), as64(states.threshold)
  outs = as64(out["w"])
  for t, g in enumerate(inputs):
    skipped, threshold = ref.step(g)
    assert skipped_flags[t] == skipped, f"step {t}"
    if skipped:
      np.testing.assert_array_equal(outs[t], np.zeros(3))
    if threshold is not None:
      np.testing.assert_allclose(thresholds[t], threshold, rtol=RTOL, err_msg=f"step {t}")
  final = jax.tree_util.tree_map(lambda x: x[-1], states)
  assert int(final.nonfinite_count) == 7
  assert int(final.spike_count) == int(final.skipped_count) - 7 > 3
  m = clipax.metrics(final)
  assert int(field(m, "skipped_count")) == int(final.skipped_count)
  np.testing.assert_allclose(float(field(m, "skip_rate")), float(final.skipped_count) / 400)


def test_one_nan_does_not_poison_the_history():
  norms = np.exp(0.1 * np.random.default_rng(2).standard_normal(400))
  norms[200] = np.nan
  grads = grads_for(norms)
  tx = clipax.skip_spikes(INNER)
  _, (_, states) = run_scan(tx, grads, PARAMS)
  skipped = np.asarray(states.skipped)
  assert skipped.sum() == 1 and skipped[200]  # only the NaN step, none of the 128 after it
  assert np.all(np.isfinite(as64(states.threshold[128:])))
  assert np.all(np.isfinite(as64(states.history[-1])))


def test_no_spike_skipping_before_warmup():
  # warmup must now be <= window (it was 5 > window=4 here before: a history of 4 norms can
  # never hold 5); the first spike still sits in the history when the second comes.
  norms = np.ones(12)
  norms[3] = 1000.0
  norms[10] = 1000.0
  tx = clipax.skip_spikes(INNER, window=8, threshold=3.0, warmup=5)
  _, (_, states) = run_scan(tx, grads_for(norms), PARAMS)
  skipped = np.asarray(states.skipped)
  assert not skipped[3]  # only 3 accepted norms before it: accepted, enters the history
  assert np.isinf(as64(states.threshold[4])) and np.isfinite(as64(states.threshold[5]))
  assert as64(states.history[9])[3] > 999.0
  assert skipped[10]  # the median band ignores the spike in the history
  assert skipped.sum() == 1


def test_skipped_step_returns_zeros_and_freezes_inner_state():
  inner = optax.chain(clipax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
  tx = clipax.skip_spikes(inner, window=4, threshold=3.0, warmup=4)
  update = jax.jit(tx.update)
  state = tx.init(PARAMS)
  for n in [1.0, 1.1, 0.9, 1.0]:
    _, state = update({"w": jnp.full(3, n)}, state, PARAMS)
  out, after = update({"w": jnp.full(3, 100.0)}, state, PARAMS)
  assert bool(after.skipped)
  np.testing.assert_array_equal(np.asarray(out["w"]), np.zeros(3, np.float32))
  assert_trees_equal(after.inner_state, state.inner_state)
  # An accepted step equals the inner transformation applied on its own.
  out, after = update({"w": jnp.full(3, 1.05)}, state, PARAMS)
  want, want_state = jax.jit(inner.update)({"w": jnp.full(3, 1.05)}, state.inner_state, PARAMS)
  for a, b in zip(leaves((out, after.inner_state)), leaves((want, want_state)), strict=True):
    np.testing.assert_allclose(as64(a), as64(b), rtol=1e-6)


def test_metrics_find_the_guard_and_an_inner_clipper():
  inner = optax.chain(clipax.zclip(warmup_steps=2), optax.sgd(0.1))
  tx = clipax.skip_spikes(inner, window=4, warmup=2)
  state = tx.init(PARAMS)
  for n in [1.0, jnp.nan, 2.0]:
    _, state = jax.jit(tx.update)({"w": jnp.full(3, n)}, state, PARAMS)
  m = clipax.metrics(state)
  assert int(m["clip/skip_spikes/skipped_count"]) == 1
  assert int(m["clip/skip_spikes/nonfinite_count"]) == 1
  for k in ("threshold", "spike_count", "invalid_count"):
    assert f"clip/skip_spikes/{k}" in m
  assert int(m["clip/zclip/count"]) == 2  # the inner zclip saw only the accepted steps
  assert "clip/zclip/threshold" in m
  # skip_nonfinite has its own state (no history, so no spike_count/threshold); invalid_count
  # is new (a traced max_consecutive out of range).
  m = clipax.metrics(clipax.skip_nonfinite(optax.sgd(0.1)).init(PARAMS))
  assert set(m) == {f"clip/skip_nonfinite/{k}" for k in [
      "norm", "update_norm", "skipped", "skip_rate", "skipped_count", "nonfinite_count",
      "invalid_count", "count"]}


# ----------------------------------------------------------------------------- skip_nonfinite
def test_skip_nonfinite_skips_and_passes_finite_steps_through():
  norms = norm_stream(60, seed=3, spikes=0.1)
  grads = grads_for(norms)
  tx = clipax.skip_nonfinite(INNER)
  final, (out, states) = run_scan(tx, grads, PARAMS)
  bad = ~np.isfinite(norms)
  np.testing.assert_array_equal(np.asarray(states.skipped), bad)
  assert np.all(np.asarray(out["w"])[bad] == 0)
  # The finite steps are exactly the inner optimizer run on the finite gradients only.
  finite = {"w": grads["w"][~bad]}
  _, (want, _) = run_scan(optax.with_extra_args_support(INNER), finite, PARAMS)
  np.testing.assert_array_equal(np.asarray(out["w"])[~bad], np.asarray(want["w"]))
  assert int(final.skipped_count) == int(final.nonfinite_count) == int(bad.sum())


def test_max_consecutive_lets_the_failure_through():
  values = [1.0, np.nan, np.nan, np.nan, np.nan, 1.0, np.nan]
  grads = {"w": jnp.asarray(np.array(values)[:, None] * np.ones((1, 3)), jnp.float32)}
  tx = clipax.skip_nonfinite(INNER, max_consecutive=2)
  _, (out, states) = run_scan(tx, grads, PARAMS)
  np.testing.assert_array_equal(
      np.asarray(states.skipped), [False, True, True, False, False, False, True]
  )
  assert np.all(np.isnan(np.asarray(out["w"][3])))  # third NaN in a row goes through
  np.testing.assert_array_equal(np.asarray(states.consecutive_nonfinite), [0, 1, 2, 3, 4, 0, 1])


def test_extra_args_reach_the_inner_transformation():
  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, value):
    del params
    return jax.tree_util.tree_map(lambda u: u * value, updates), state

  inner = optax.GradientTransformationExtraArgs(init_fn, update_fn)
  for tx in [clipax.skip_nonfinite(inner), clipax.skip_spikes(inner, window=4, warmup=2)]:
    state = tx.init(PARAMS)
    out, _ = jax.jit(tx.update)({"w": jnp.ones(3)}, state, PARAMS, value=jnp.asarray(3.0))
    np.testing.assert_array_equal(np.asarray(out["w"]), np.full(3, 3.0, np.float32))


# ----------------------------------------------------------------------------- jit, scan, steps
def test_thousand_steps_inside_lax_scan():
  norms = norm_stream(1000, seed=4, spikes=0.01)
  grads = grads_for(norms)
  for tx in [clipax.skip_nonfinite(INNER), clipax.skip_spikes(INNER)]:
    with jax.transfer_guard("disallow"):
      final, (out, _) = run_scan(tx, grads, PARAMS)
    assert int(final.count) == 1000
    assert int(final.nonfinite_count) == 7
    assert np.all(np.isfinite(np.asarray(out["w"])))
    for x in leaves(final):
      assert np.all(np.isfinite(np.asarray(x)[np.asarray(x) != np.inf]))


def test_multisteps_counts_once_per_optimizer_step():
  k, steps = 3, 10
  norms = norm_stream(k * steps, seed=5, nans=0, infs=0)
  tx = optax.MultiSteps(clipax.skip_spikes(INNER, window=4, warmup=4), every_k_schedule=k)
  # optax's MultiSteps itself needs standard promotion (it multiplies bool by int32).
  with jax.numpy_dtype_promotion("standard"):
    final, _ = run_scan(tx, grads_for(norms), PARAMS)
  assert int(final.inner_opt_state.count) == steps
  guard = final.inner_opt_state
  assert int(guard.skipped_count) == int(guard.spike_count)  # no NaN in this stream
  assert int(guard.accepted) == steps  # every finite step is recorded (spikes bounded)


@pytest.mark.parametrize(
    "make", [clipax.skip_nonfinite, lambda i: clipax.skip_spikes(i, window=8, warmup=4)]
)
def test_checkpoint_resume_is_bit_identical(make):
  norms = norm_stream(50, seed=6, spikes=0.1, nans=3, infs=1)
  grads = grads_for(norms)
  tx = make(optax.chain(clipax.zclip(warmup_steps=5), optax.sgd(0.1, momentum=0.9)))
  assert_resume_is_bit_identical(tx, grads, PARAMS, 50)


def test_inject_hyperparams_threshold():
  norms = norm_stream(80, seed=7)
  grads = grads_for(norms)
  plain, _ = run_scan(clipax.skip_spikes(INNER, window=8, threshold=2.0, warmup=4), grads, PARAMS)
  # run_scan traces init too, so the size must be static there
  factory = optax.inject_hyperparams(clipax.skip_spikes, static_args=("window",))
  injected, _ = run_scan(factory(INNER, window=8, threshold=2.0, warmup=4), grads, PARAMS)
  np.testing.assert_array_equal(
      np.asarray(injected.inner_state.skipped_count), np.asarray(plain.skipped_count)
  )
  np.testing.assert_allclose(as64(injected.inner_state.threshold), as64(plain.threshold), rtol=RTOL)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"window": 1}, "window"),
        ({"window": 8.5}, "window"),
        ({"window": 2**31}, "window"),
        ({"window": True}, "window"),
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": float("inf")}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"warmup": 1}, "warmup"),
        ({"warmup": 129}, "warmup"),  # more than the window (128) can hold
        ({"warmup": 4.5}, "warmup"),
        ({"warmup": 2**31}, "warmup"),
        ({"max_consecutive": -1}, "max_consecutive"),
        ({"max_consecutive": 1.5}, "max_consecutive"),
        ({"max_consecutive": 2**31}, "max_consecutive"),
    ],
)
def test_construction_rejects_bad_hyperparameters(kwargs, name):
  # A non-integer is a TypeError now (the shared `_checks.number`), a value out of range a
  # ValueError; both name the argument.
  with pytest.raises((ValueError, TypeError), match=f"`{name}`"):
    clipax.skip_spikes(INNER, **kwargs)
  if name == "max_consecutive":
    with pytest.raises((ValueError, TypeError), match=f"`{name}`"):
      clipax.skip_nonfinite(INNER, **kwargs)


@pytest.mark.parametrize("inner", [None, optax.sgd, "adam", 0.1])
def test_inner_must_be_a_transformation(inner):
  for make in [clipax.skip_nonfinite, clipax.skip_spikes]:
    with pytest.raises(TypeError, match="`inner`"):
      make(inner)


def test_axis_name_makes_decisions_global_under_vmap():
  norms = norm_stream(60, seed=8)
  grads = {"w": jnp.tile(grads_for(norms)["w"], (1, 2))}  # [60, 6]
  whole, _ = run_scan(clipax.skip_spikes(INNER, window=8, warmup=4), grads, {"w": jnp.zeros(6)})
  split = grads["w"].reshape(60, 2, 3).transpose(1, 0, 2)
  tx = clipax.skip_spikes(INNER, window=8, warmup=4, axis_name="shard")
  final, _ = jax.vmap(
      lambda g: run_scan(tx, {"w": g}, {"w": jnp.zeros(3)}), axis_name="shard"
  )(split)
  for shard in range(2):
    assert int(final.skipped_count[shard]) == int(whole.skipped_count)
    np.testing.assert_allclose(as64(final.history[shard]), as64(whole.history), rtol=RTOL)


# ----------------------------------------------------------------------------- soak
@pytest.mark.slow
def test_soak_hundred_thousand_steps_heavy_tailed_spikes():
  n = 100_000
  rng = np.random.default_rng(9)
  norms = 0.5 * np.exp(0.3 * rng.standard_normal(n))
  spike = rng.random(n) < 0.01
  norms[spike] *= 10 + 10 * rng.pareto(1.0, spike.sum())
  norms[rng.choice(n, 50, replace=False)] = np.nan
  grads = grads_for(norms)
  inner = optax.chain(clipax.zclip(), clipax.spam(1e-3))
  for name, tx in [("skip_nonfinite", clipax.skip_nonfinite(inner)),
                   ("skip_spikes", clipax.skip_spikes(inner))]:
    final, (out, _) = run_scan(tx, grads, PARAMS)
    for x in leaves(final):
      assert np.all(np.isfinite(np.asarray(x))), name
    assert np.all(np.isfinite(np.asarray(out["w"])))
    m = clipax.metrics(final)
    skip_rate = float(m[f"clip/{name}/skip_rate"])
    clip_rate = float(m["clip/zclip/clip_rate"])
    print(f"{name}: skip rate {skip_rate:.4f}, inner clip rate {clip_rate:.4f}, "
          f"nonfinite {int(m[f'clip/{name}/nonfinite_count'])}")
    assert int(m[f"clip/{name}/nonfinite_count"]) == 50
    if name == "skip_spikes":
      # Spikes are at least 10x the typical norm: nearly all are caught after warm-up.
      caught = np.asarray(final.spike_count)
      assert caught >= 0.9 * spike[128:].sum()


# ----------------------------------------------------------------------------- robust detection
def normal_norms(n, seed):
  return 1.0 + 0.1 * np.random.default_rng(seed).standard_normal(n)


def test_defaults_skip_a_repeated_200x_spike():
  # Before: warm-up was the whole window (128 steps), so the step-60 spike was accepted, entered
  # the history and pushed mean + 6 std to ~850: the step-180 spike went through as well.
  norms = normal_norms(300, seed=10)
  norms[[60, 180]] *= 200.0
  _, (out, states) = run_scan(clipax.skip_spikes(INNER), grads_for(norms), PARAMS)
  skipped = np.asarray(states.skipped)
  np.testing.assert_array_equal(np.flatnonzero(skipped), [60, 180])
  assert np.all(np.asarray(out["w"])[[60, 180]] == 0)
  assert np.all(as64(states.threshold[16:]) < 2.0)  # median + 6 * 1.4826 MAD of N(1, 0.1)
  assert np.all(np.isinf(as64(states.threshold[:16])))  # warm-up: 16 accepted norms


def test_a_huge_norm_accepted_in_warmup_does_not_disable_detection():
  norms = normal_norms(100, seed=11)
  norms[3] = 1e30  # finite, during warm-up: accepted into the history
  norms[50] *= 50.0
  _, (_, states) = run_scan(clipax.skip_spikes(INNER), grads_for(norms), PARAMS)
  skipped = np.asarray(states.skipped)
  assert not skipped[3] and as64(states.history[3])[3] > 9e29
  np.testing.assert_array_equal(np.flatnonzero(skipped), [50])
  assert as64(states.threshold[50]) < 2.0
  assert int(states.spike_count[-1]) == 1


def test_nonfinite_norms_never_enter_the_history():
  norms = normal_norms(60, seed=12)
  norms[[1, 5, 30]] = np.nan
  norms[[2, 40]] = np.inf
  grads = grads_for(norms)
  grads["w"] = grads["w"].at[[8, 45], 1].set(-jnp.inf)  # -Inf element: an infinite norm
  _, (_, states) = run_scan(clipax.skip_spikes(INNER, window=32), grads, PARAMS)
  bad = [1, 2, 5, 8, 30, 40, 45]
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(states.skipped)), bad)
  assert np.all(np.isfinite(as64(states.history)))
  np.testing.assert_array_equal(np.asarray(states.accepted)[-1], 60 - len(bad))
  np.testing.assert_array_equal(np.asarray(states.nonfinite_count)[-1], len(bad))


# ----------------------------------------------------------------------------- state
def test_skip_nonfinite_has_its_own_state_without_zero_size_arrays():
  from clipax._guards import SkipNonfiniteState

  state = clipax.skip_nonfinite(INNER).init(PARAMS)
  assert isinstance(state, SkipNonfiniteState)
  assert state._fields == ("count", "norm", "skipped", "skipped_count", "nonfinite_count",
                           "consecutive_nonfinite", "invalid_count", "inner_state", "leaf_norms",
                           "tag")
  spikes = clipax.skip_spikes(INNER).init(PARAMS)
  assert isinstance(spikes, clipax.SkipState)
  assert {"cursor", "invalid_count", "accepted", "history"} <= set(spikes._fields)
  for s in (state, spikes):
    assert all(np.size(x) > 0 for x in leaves(s))
    assert all(x.dtype == jnp.int32 for x in (s.count, s.skipped_count, s.invalid_count))
    assert s.norm.dtype == jnp.float32


INT_MAX = 2**31 - 1


def test_counters_saturate_and_the_ring_keeps_rotating():
  tx = clipax.skip_spikes(INNER, window=4, warmup=2, threshold=3.0)
  update = jax.jit(tx.update)
  state = tx.init(PARAMS)
  for n in [1.0, 1.01, 0.99, 1.0]:
    _, state = update({"w": grads_for(np.array([n]))["w"][0]}, state, PARAMS)
  near = jnp.asarray(INT_MAX - 1, jnp.int32)
  state = state._replace(count=near, skipped_count=near, nonfinite_count=near, spike_count=near,
                         consecutive_nonfinite=near, accepted=near - 1)
  stream = [1.02, np.nan, 1.03, 50.0, 1.04, np.inf, 1.05, 1.06, 0.98]
  for n in stream:
    _, state = update({"w": grads_for(np.array([n]))["w"][0]}, state, PARAMS)
  for counter in (state.count, state.skipped_count, state.nonfinite_count, state.spike_count,
                  state.accepted):
    assert int(counter) == INT_MAX  # saturated, never wrapped to a negative number
  # Seven more recorded norms after the saturation (the spike bounded to its band): the ring
  # holds the last four, in order.
  recorded = [n for n in stream if np.isfinite(n)]
  cursor = int(state.cursor)
  ring = np.roll(as64(state.history), -cursor)
  np.testing.assert_allclose(ring, recorded[-4:], rtol=1e-6)
  assert cursor == (4 + len(recorded)) % 4
  assert float(state.threshold) < 1.2


def test_skip_nonfinite_counters_saturate():
  tx = clipax.skip_nonfinite(INNER)
  state = tx.init(PARAMS)
  near = jnp.asarray(INT_MAX - 1, jnp.int32)
  state = state._replace(count=near, skipped_count=near, nonfinite_count=near,
                         consecutive_nonfinite=near)
  for n in [np.nan, np.inf, np.nan]:
    _, state = jax.jit(tx.update)({"w": jnp.full(3, n, jnp.float32)}, state, PARAMS)
  for counter in (state.count, state.skipped_count, state.nonfinite_count,
                  state.consecutive_nonfinite):
    assert int(counter) == INT_MAX
  assert bool(state.skipped)


# ----------------------------------------------------------------------------- hyperparameters
def _with(state, **hyperparams):
  return state._replace(hyperparams={**state.hyperparams,
                                     **{k: jnp.asarray(v) for k, v in hyperparams.items()}})


@pytest.mark.parametrize("bad", [{"threshold": np.nan}, {"threshold": np.inf},
                                 {"threshold": 0.0}, {"threshold": -1.0}, {"warmup": 9},
                                 {"warmup": 1}, {"max_consecutive": -1}])
def test_traced_invalid_hyperparameter_skips_the_step_and_is_counted(bad):
  tx = optax.inject_hyperparams(clipax.skip_spikes)(INNER, window=8, warmup=2, threshold=3.0,
                                                    max_consecutive=3)
  update = jax.jit(tx.update)
  state = tx.init(PARAMS)
  for n in [1.0, 1.1, 0.9, 1.0]:
    _, state = update({"w": jnp.full(3, n, jnp.float32)}, state, PARAMS)
  g = {"w": jnp.full(3, 1.05, jnp.float32)}  # accepted under valid hyperparameters
  ok, after_ok = update(g, _with(state, threshold=4.0), PARAMS)
  assert not bool(after_ok.inner_state.skipped) and np.any(np.asarray(ok["w"]) != 0)
  out, after = update(g, _with(state, **bad), PARAMS)
  before, after = state.inner_state, after.inner_state
  np.testing.assert_array_equal(np.asarray(out["w"]), np.zeros(3, np.float32))
  assert bool(after.skipped)
  assert int(after.invalid_count) == int(before.invalid_count) + 1 == 1
  assert int(after.skipped_count) == int(before.skipped_count) + 1
  assert int(after.spike_count) == int(before.spike_count)
  assert_trees_equal(after.inner_state, before.inner_state)
  for name in ("history", "cursor", "accepted", "threshold", "consecutive_nonfinite"):
    np.testing.assert_array_equal(np.asarray(getattr(after, name)),
                                  np.asarray(getattr(before, name)), err_msg=name)
  # The counter saturates like every other one.
  inner = before._replace(invalid_count=jnp.asarray(INT_MAX, jnp.int32))
  _, after = update(g, _with(state._replace(inner_state=inner), **bad), PARAMS)
  assert int(after.inner_state.invalid_count) == INT_MAX


def test_traced_invalid_max_consecutive_in_skip_nonfinite():
  tx = optax.inject_hyperparams(clipax.skip_nonfinite)(INNER, max_consecutive=2)
  update = jax.jit(tx.update)
  state = tx.init(PARAMS)
  _, state = update({"w": jnp.ones(3)}, state, PARAMS)
  out, after = update({"w": jnp.ones(3)}, _with(state, max_consecutive=np.nan), PARAMS)
  np.testing.assert_array_equal(np.asarray(out["w"]), np.zeros(3, np.float32))
  assert int(after.inner_state.invalid_count) == 1 and int(after.inner_state.skipped_count) == 1
  assert_trees_equal(after.inner_state.inner_state, state.inner_state.inner_state)


@pytest.mark.parametrize("kwargs,name", [({"threshold": -1.0}, "threshold"),
                                         ({"threshold": np.nan}, "threshold"),
                                         ({"warmup": 9}, "warmup"),
                                         ({"window": 1}, "window"),
                                         ({"max_consecutive": -2}, "max_consecutive")])
def test_concrete_injected_hyperparameters_are_checked_at_init(kwargs, name):
  tx = optax.inject_hyperparams(clipax.skip_spikes)(INNER, **{"window": 8, **kwargs})
  with pytest.raises(ValueError, match=f"`{name}`"):
    tx.init(PARAMS)


def test_a_finite_float64_norm_of_1e40_is_finite_under_x64():
  with jax.enable_x64(True):
    params = {"w": jnp.zeros(3, jnp.float64)}
    g = {"w": jnp.full(3, 1e40, jnp.float64)}
    for tx in [clipax.skip_nonfinite(optax.sgd(1.0)),
               clipax.skip_spikes(optax.sgd(1.0), window=4, warmup=2)]:
      state = tx.init(params)
      out, state = jax.jit(tx.update)(g, state, params)
      assert state.norm.dtype == jnp.float64
      np.testing.assert_allclose(float(state.norm), 1e40 * np.sqrt(3), rtol=1e-12)
      assert not bool(state.skipped) and int(state.nonfinite_count) == 0
      np.testing.assert_array_equal(np.asarray(out["w"]), np.full(3, -1e40))
      if isinstance(state, clipax.SkipState):
        assert state.history.dtype == state.threshold.dtype == jnp.float64
        np.testing.assert_allclose(float(state.history[0]), 1e40 * np.sqrt(3), rtol=1e-12)


def test_metrics_read_dict_forms_of_the_guard_states():
  from clipax._guards import guard_metrics

  for tx in [clipax.skip_nonfinite(INNER), clipax.skip_spikes(INNER, window=4, warmup=2)]:
    state = tx.init(PARAMS)
    for n in [1.0, np.nan, 1.1, 0.9]:
      _, state = jax.jit(tx.update)({"w": jnp.full(3, n, jnp.float32)}, state, PARAMS)
    want = state.clipax_metrics()
    as_dict = flax.serialization.to_state_dict(state)
    assert isinstance(as_dict, dict)
    got = guard_metrics(as_dict)
    assert got.keys() == want.keys()
    assert_trees_equal(got, want)
    assert int(got["nonfinite_count"]) == 1
