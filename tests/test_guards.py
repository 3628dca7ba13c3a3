"""skip_nonfinite and skip_spikes: decisions against a float64 reference, frozen inner state."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
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
  """Rolling mean/std of the last ``window`` accepted finite norms (current step excluded)."""

  def __init__(self, window=128, k=6.0, warmup=None):
    self.window, self.k = window, k
    self.warmup = window if warmup is None else warmup
    self.accepted = []

  def step(self, g):
    """Returns (skipped, threshold or None)."""
    if not math.isfinite(g):
      return True, None
    threshold = math.inf
    if len(self.accepted) >= self.warmup:
      recent = np.asarray(self.accepted[-self.window :])
      threshold = float(recent.mean() + self.k * recent.std())
    if g > threshold:
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
  assert int(m["clip/skipped_count"]) == int(final.skipped_count)
  np.testing.assert_allclose(float(m["clip/skip_rate"]), float(final.skipped_count) / 400)


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
  norms = np.ones(12)
  norms[3] = 1000.0
  norms[10] = 1000.0
  tx = clipax.skip_spikes(INNER, window=4, threshold=3.0, warmup=5)
  _, (_, states) = run_scan(tx, grads_for(norms), PARAMS)
  skipped = np.asarray(states.skipped)
  assert not skipped[3]  # only 3 accepted norms before it: accepted, enters the history
  assert np.isinf(as64(states.threshold[3])) and np.isfinite(as64(states.threshold[5]))
  assert skipped[10]  # the history (steps 6-9) no longer holds the first spike
  assert skipped.sum() == 1


def test_skipped_step_returns_zeros_and_freezes_inner_state():
  inner = optax.chain(clipax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
  tx = clipax.skip_spikes(inner, window=4, threshold=3.0)
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
  tx = clipax.skip_spikes(inner, window=4)
  state = tx.init(PARAMS)
  for n in [1.0, jnp.nan, 2.0]:
    _, state = jax.jit(tx.update)({"w": jnp.full(3, n)}, state, PARAMS)
  m = clipax.metrics(state)
  assert int(m["clip/0/skipped_count"]) == 1
  assert int(m["clip/0/nonfinite_count"]) == 1
  assert "clip/0/threshold" in m and "clip/0/spike_count" in m
  assert int(m["clip/1/count"]) == 2  # the inner zclip saw only the accepted steps
  assert "clip/1/threshold" in m
  m = clipax.metrics(clipax.skip_nonfinite(optax.sgd(0.1)).init(PARAMS))
  assert set(m) == {f"clip/{k}" for k in
                    ["norm", "skipped", "skip_rate", "skipped_count", "nonfinite_count", "count"]}


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
  for tx in [clipax.skip_nonfinite(inner), clipax.skip_spikes(inner, window=4)]:
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
  tx = optax.MultiSteps(clipax.skip_spikes(INNER, window=4), every_k_schedule=k)
  # optax's MultiSteps itself needs standard promotion (it multiplies bool by int32).
  with jax.numpy_dtype_promotion("standard"):
    final, _ = run_scan(tx, grads_for(norms), PARAMS)
  assert int(final.inner_opt_state.count) == steps
  assert int(final.inner_opt_state.accepted) + int(final.inner_opt_state.skipped_count) == steps


@pytest.mark.parametrize("make", [clipax.skip_nonfinite, lambda i: clipax.skip_spikes(i, window=8)])
def test_checkpoint_resume_is_bit_identical(make):
  norms = norm_stream(50, seed=6, spikes=0.1, nans=3, infs=1)
  grads = grads_for(norms)
  tx = make(optax.chain(clipax.zclip(warmup_steps=5), optax.sgd(0.1, momentum=0.9)))
  assert_resume_is_bit_identical(tx, grads, PARAMS, 50)


def test_inject_hyperparams_threshold():
  norms = norm_stream(80, seed=7)
  grads = grads_for(norms)
  plain, _ = run_scan(clipax.skip_spikes(INNER, window=8, threshold=2.0), grads, PARAMS)
  # run_scan traces init too, so the size must be static there
  factory = optax.inject_hyperparams(clipax.skip_spikes, static_args=("window",))
  injected, _ = run_scan(factory(INNER, window=8, threshold=2.0), grads, PARAMS)
  np.testing.assert_array_equal(
      np.asarray(injected.inner_state.skipped_count), np.asarray(plain.skipped_count)
  )
  np.testing.assert_allclose(as64(injected.inner_state.threshold), as64(plain.threshold), rtol=RTOL)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"window": 1}, "window"),
        ({"window": 8.5}, "window"),
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": float("inf")}, "threshold"),
        ({"warmup": 1}, "warmup"),
        ({"max_consecutive": -1}, "max_consecutive"),
        ({"max_consecutive": 1.5}, "max_consecutive"),
    ],
)
def test_construction_rejects_bad_hyperparameters(kwargs, name):
  with pytest.raises(ValueError, match=f"`{name}`"):
    clipax.skip_spikes(INNER, **kwargs)
  if name == "max_consecutive":
    with pytest.raises(ValueError, match=f"`{name}`"):
      clipax.skip_nonfinite(INNER, **kwargs)


def test_axis_name_makes_decisions_global_under_vmap():
  norms = norm_stream(60, seed=8)
  grads = {"w": jnp.tile(grads_for(norms)["w"], (1, 2))}  # [60, 6]
  whole, _ = run_scan(clipax.skip_spikes(INNER, window=8), grads, {"w": jnp.zeros(6)})
  split = grads["w"].reshape(60, 2, 3).transpose(1, 0, 2)
  tx = clipax.skip_spikes(INNER, window=8, axis_name="shard")
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
    checked = final if name == "skip_spikes" else final._replace(threshold=0.0)  # inf: no rule
    for x in leaves(checked):
      assert np.all(np.isfinite(np.asarray(x))), name
    assert np.all(np.isfinite(np.asarray(out["w"])))
    m = clipax.metrics(final)
    skip_rate = float(m["clip/0/skip_rate"])
    clip_rate = float(m["clip/1/clip_rate"])
    print(f"{name}: skip rate {skip_rate:.4f}, inner clip rate {clip_rate:.4f}, "
          f"nonfinite {int(m['clip/0/nonfinite_count'])}")
    assert int(m["clip/0/nonfinite_count"]) == 50
    if name == "skip_spikes":
      # Spikes are at least 10x the typical norm: nearly all are caught after warm-up.
      caught = np.asarray(final.spike_count)
      assert caught >= 0.9 * spike[128:].sum()
