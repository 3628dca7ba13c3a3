"""skip_spikes(on="loss" | "both"): the loss rule against a float64 reference, its warm-up
robustness, level shifts, non-finite losses, saturation, checkpoints and errors.

The reference below is the rule as documented in ``clipax.skip_spikes`` (median + k * 1.4826 *
MAD of the recorded losses; a spike recorded bounded to its band; NaN/Inf never recorded),
written in float64 numpy.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _refs import as64

import clipax

PARAMS = {"w": jnp.zeros(2)}
GRAD = {"w": jnp.full(2, 0.5)}


def reference(losses, *, window, k, warmup):
  """Float64 port of the documented loss rule: which steps are skipped as loss spikes."""
  history: list[float] = []
  skipped = []
  for x in losses:
    if not math.isfinite(x):
      skipped.append(True)
      continue
    recent = np.asarray(history[-window:], np.float64)
    limit = math.inf
    if len(recent) >= warmup:
      med = np.median(recent)
      limit = med + k * 1.4826 * np.median(np.abs(recent - med))
    spike = x > limit
    history.append(limit if spike else x)
    skipped.append(bool(spike))
  return np.asarray(skipped)


def run(tx, losses, grads=None, state=None, guard=lambda s: s):
  state = tx.init(PARAMS) if state is None else state
  update = jax.jit(lambda g, s, loss: tx.update(g, s, PARAMS, loss=loss))
  outs, skips = [], []
  for i, loss in enumerate(losses):
    g = GRAD if grads is None else grads[i]
    out, state = update(g, state, jnp.float32(loss))
    outs.append(np.asarray(out["w"]))
    skips.append(bool(guard(state).skipped))
  return state, np.asarray(skips), outs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_rule_matches_the_float64_reference(seed):
  rng = np.random.default_rng(seed)
  losses = 2.0 + 0.1 * rng.standard_normal(120)
  spikes = rng.choice(np.arange(20, 120), 8, replace=False)
  losses[spikes] *= rng.uniform(2, 50, 8)
  tx = clipax.skip_spikes(optax.sgd(0.1), on="loss", window=32, threshold=4.0, warmup=8)
  state, skipped, outs = run(tx, losses)
  want = reference(losses.astype(np.float32).astype(np.float64), window=32, k=4.0, warmup=8)
  np.testing.assert_array_equal(skipped, want)
  assert set(np.flatnonzero(want)) >= set(spikes)  # every injected spike caught
  assert int(state.loss_spike_count) == want.sum() == int(state.skipped_count)
  for s, out in zip(skipped, outs, strict=True):
    assert (not np.any(out)) if s else np.all(out != 0)
  # the norm is recorded but not used to skip with on="loss"
  assert int(state.spike_count) == 0


def test_a_huge_loss_during_warm_up_does_not_let_later_spikes_through():
  losses = [2.0, 1e30, 2.1, 1.9, 2.0, 2.05, 1.95, 2.0] + [2.0] * 10 + [20.0, 2.0]
  tx = clipax.skip_spikes(optax.sgd(0.1), on="loss", window=16, threshold=4.0, warmup=8)
  state, skipped, _ = run(tx, losses)
  assert skipped[-2] and not skipped[-1]
  m = clipax.metrics(state)
  assert 2.0 <= float(m["clip/skip_spikes/loss_threshold"]) < 3.0


def test_a_lasting_rise_of_the_loss_level_is_followed():
  window = 32
  losses = [1.0 + 0.01 * (i % 5) for i in range(40)] + [3.0 + 0.01 * (i % 5) for i in range(60)]
  tx = clipax.skip_spikes(optax.sgd(0.1), on="loss", window=window, threshold=4.0)
  _, skipped, _ = run(tx, losses)
  after = skipped[40:]
  assert after[:3].all()  # the jump is skipped at first
  assert not after[window + 4:].any()  # then followed within about a window
  np.testing.assert_array_equal(skipped, reference(
      np.float32(losses).astype(np.float64), window=window, k=4.0, warmup=16))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_loss_is_skipped_counted_and_never_recorded(bad):
  losses = [2.0, 2.1, 1.9, 2.0, bad, 2.0]
  tx = clipax.skip_spikes(optax.sgd(0.1), on="loss", window=8, warmup=2)
  state, skipped, _ = run(tx, losses)
  np.testing.assert_array_equal(skipped, [False] * 4 + [True, False])
  assert int(state.nonfinite_count) == 1 and int(state.loss_spike_count) == 0
  assert int(state.loss_accepted) == 5
  assert np.all(np.isfinite(as64(state.loss_history)))
  assert all(np.all(np.isfinite(as64(v))) for v in clipax.metrics(state).values())


def test_a_drop_of_the_loss_is_not_a_spike():
  # one-sided: a loss far *below* the band is accepted and recorded as it is
  losses = [2.0, 2.1, 1.9, 2.0, 2.05, 1.95, 0.01, 2.0, 50.0]
  tx = clipax.skip_spikes(optax.sgd(0.1), on="loss", window=8, warmup=4, threshold=3.0)
  state, skipped, _ = run(tx, losses)
  np.testing.assert_array_equal(skipped, [False] * 8 + [True])
  assert int(state.loss_spike_count) == 1
  np.testing.assert_allclose(as64(state.loss_history)[6], 0.01, rtol=1e-6)


def test_warm_up_metrics_are_the_steps_own_values_and_finite():
  tx = clipax.skip_spikes(optax.sgd(0.1), on="both", window=8, warmup=4)
  state = tx.init(PARAMS)
  update = jax.jit(lambda s, loss: tx.update(GRAD, s, PARAMS, loss=loss))
  for t, loss in enumerate([2.0, 3.0, 2.5, 2.2, 2.1]):
    state = update(state, jnp.float32(loss))[1]
    m = {k.split("/")[-1]: float(v) for k, v in clipax.metrics(state).items()}
    assert all(math.isfinite(v) for v in m.values()), m
    if t < 4:  # no band in force yet: the step's own loss and norm
      assert np.isposinf(float(state.loss_threshold)) and np.isposinf(float(state.threshold))
      assert m["loss_threshold"] == np.float32(loss)
      assert m["threshold"] == m["norm"] == float(state.norm)
    else:
      assert m["loss_threshold"] == float(state.loss_threshold) > 3.0
  assert m["loss"] == np.float32(2.1)


def test_the_loss_reaches_the_inner_transformation_and_passes_through_chains():
  def update_fn(updates, state, params=None, *, loss):
    del params
    return jax.tree_util.tree_map(lambda u: u * loss, updates), state

  scale_by_loss = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update_fn)
  tx = clipax.skip_spikes(scale_by_loss, on="loss", window=4, warmup=2)
  out, _ = jax.jit(lambda s, loss: tx.update(GRAD, s, PARAMS, loss=loss))(tx.init(PARAMS), 3.0)
  np.testing.assert_array_equal(np.asarray(out["w"]), np.full(2, 1.5, np.float32))
  # the guard inside an outer chain / named_chain gets the loss the chain was given
  def guard():
    return clipax.skip_spikes(optax.sgd(1.0), on="loss", window=8, warmup=4, threshold=3.0)

  clip = clipax.clip_by_global_norm(10.0)
  named = optax.named_chain(("clip", clip), ("guard", guard()))
  for outer, pick in [(optax.chain(clip, guard()), lambda s: s[1]),
                      (named, lambda s: s["guard"])]:
    state, skipped, outs = run(outer, [2.0, 2.1, 1.9, 2.0, 2.05, 40.0, 2.0], guard=pick)
    np.testing.assert_array_equal(skipped, [False] * 5 + [True, False])
    np.testing.assert_array_equal(outs[5], np.zeros(2, np.float32))
    m = clipax.metrics(state)
    assert int(next(v for k, v in m.items() if k.endswith("loss_spike_count"))) == 1


def test_traced_invalid_loss_threshold_skips_and_keeps_the_loss_history():
  tx = optax.inject_hyperparams(clipax.skip_spikes, static_args=("on", "window"))(
      inner=optax.sgd(0.1, momentum=0.9), on="loss", window=8, warmup=2, threshold=4.0,
      loss_threshold=4.0)
  update = jax.jit(lambda s, loss: tx.update(GRAD, s, PARAMS, loss=loss))
  state = tx.init(PARAMS)
  for loss in [2.0, 2.1, 1.9]:
    state = update(state, jnp.float32(loss))[1]
  for bad in [jnp.nan, 0.0, -1.0, jnp.inf]:
    hp = {**state.hyperparams, "loss_threshold": jnp.asarray(bad, jnp.float32)}
    out, after = update(state._replace(hyperparams=hp), jnp.float32(2.0))
    g, a = state.inner_state, after.inner_state
    np.testing.assert_array_equal(np.asarray(out["w"]), np.zeros(2, np.float32))
    assert bool(a.skipped) and int(a.invalid_count) == 1 and int(a.loss_spike_count) == 0
    for f in ("loss_history", "loss_cursor", "loss_accepted", "loss_threshold", "history"):
      np.testing.assert_array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(g, f)), f)
    for x, y in zip(jax.tree_util.tree_leaves(a.inner_state),
                    jax.tree_util.tree_leaves(g.inner_state), strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  out, after = update(state, jnp.float32(2.0))  # valid again: acts normally
  assert not bool(after.inner_state.skipped) and np.all(np.asarray(out["w"]) != 0)


def test_both_skips_on_either_spike():
  tx = clipax.skip_spikes(optax.sgd(0.1), on="both", window=8, warmup=4, threshold=4.0)
  grads = [GRAD] * 6 + [{"w": jnp.full(2, 50.0)}] + [GRAD] * 2
  losses = [2.0, 2.1, 1.9, 2.0, 2.05, 2.0, 2.0, 30.0, 2.0]
  state, skipped, _ = run(tx, losses, grads)
  np.testing.assert_array_equal(skipped, [False] * 6 + [True, True, False])
  assert int(state.spike_count) == 1 and int(state.loss_spike_count) == 1
  # with on="norm" the loss is not watched (and not needed)
  tx = clipax.skip_spikes(optax.sgd(0.1), window=8, warmup=4, threshold=4.0)
  _, skipped, _ = run(tx, losses, grads)
  np.testing.assert_array_equal(skipped, [False] * 6 + [True, False, False])


def test_loss_threshold_defaults_to_threshold_and_can_differ():
  losses = [2.0, 2.1, 1.9, 2.0, 2.05, 1.95, 2.6]
  loose = clipax.skip_spikes(optax.sgd(0.1), on="loss", window=8, warmup=4, threshold=20.0)
  tight = clipax.skip_spikes(optax.sgd(0.1), on="loss", window=8, warmup=4, threshold=20.0,
                             loss_threshold=2.0)
  assert not run(loose, losses)[1][-1]
  assert run(tight, losses)[1][-1]


def test_counters_saturate_and_the_loss_ring_keeps_rotating():
  tx = clipax.skip_spikes(optax.sgd(0.1), on="loss", window=4, warmup=2, threshold=3.0)
  state, _, _ = run(tx, [2.0, 2.01, 1.99, 2.0])
  near = jnp.asarray(2**31 - 2, jnp.int32)
  state = state._replace(count=near, skipped_count=near, loss_spike_count=near,
                         loss_accepted=near, nonfinite_count=near)
  stream = [2.02, 40.0, math.nan, 2.03, 2.04, 2.05]
  state, _, _ = run(tx, stream, state=state)
  for c in (state.count, state.skipped_count, state.loss_spike_count, state.loss_accepted,
            state.nonfinite_count):
    assert int(c) == 2**31 - 1
  hist = as64(state.loss_history)
  assert set(np.round(hist, 2)) >= {2.03, 2.04, 2.05}


def test_checkpoint_round_trip_is_bit_identical(tmp_path):
  import orbax.checkpoint as ocp

  tx = clipax.skip_spikes(optax.adam(1e-2), on="both", window=8, warmup=2, name="guard")
  state, _, _ = run(tx, [2.0, 2.1, 30.0, 1.9])
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "s", state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "s", jax.tree_util.tree_map(
        ocp.utils.to_shape_dtype_struct, tx.init(PARAMS)))
    raw = ckpt.restore(tmp_path / "s")
  for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored),
                  strict=True):
    assert np.asarray(a).dtype == np.asarray(b).dtype and np.size(a) > 0  # orbax: no 0-size
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  assert type(restored) is type(state)
  assert all(getattr(state, f).dtype == jnp.int32 for f in (
      "loss_cursor", "loss_accepted", "loss_spike_count", "count", "skipped_count"))
  assert clipax.metrics(raw).keys() == clipax.metrics(state).keys()
  more = [2.0, 50.0, 2.1]
  a = run(tx, more, state=state)
  b = run(tx, more, state=restored)
  np.testing.assert_array_equal(a[1], b[1])


def test_inside_chain_inject_hyperparams_and_named_chain():
  inner = optax.named_chain(("clip", clipax.clip_by_global_norm(1.0)), ("opt", optax.sgd(0.1)))
  tx = optax.inject_hyperparams(clipax.skip_spikes, static_args=("on", "window", "warmup"))(
      inner=inner, on="loss", window=8, warmup=2, threshold=4.0)
  state = tx.init(PARAMS)
  update = jax.jit(lambda s, loss: tx.update(GRAD, s, PARAMS, loss=loss))
  for loss in [2.0, 2.1, 1.9, 40.0]:
    _, state = update(state, loss)
  m = clipax.metrics(state)
  assert int(m["clip/skip_spikes/loss_spike_count"]) == 1
  assert int(m["clip/clip/count"]) == 3  # the inner clipper saw only the accepted steps
  # an invalid traced loss threshold skips and is counted, never disables the guard
  state.hyperparams["threshold"] = jnp.asarray(jnp.nan)
  _, state = update(state, 2.0)
  assert int(clipax.metrics(state)["clip/skip_spikes/invalid_count"]) == 1


def test_errors_name_the_argument():
  for on in ["losses", "Loss", None, True]:
    with pytest.raises(ValueError, match=f"`on`.*got {on!r}"):
      clipax.skip_spikes(optax.sgd(0.1), on=on)
  with pytest.raises(ValueError, match="`loss_threshold`"):
    clipax.skip_spikes(optax.sgd(0.1), on="loss", loss_threshold=-1.0)
  tx = clipax.skip_spikes(optax.sgd(0.1), on="loss")
  state = tx.init(PARAMS)
  for call in [lambda: tx.update(GRAD, state, PARAMS),
               lambda: tx.update(GRAD, state, PARAMS, loss=None),
               lambda: jax.jit(tx.update)(GRAD, state, PARAMS)]:  # at trace time
    with pytest.raises(TypeError, match="`loss`.*loss=loss"):
      call()
  both = clipax.skip_spikes(optax.sgd(0.1), on="both")
  with pytest.raises(TypeError, match="`loss`"):
    both.update(GRAD, both.init(PARAMS), PARAMS, value=1.0)
  for bad in [jnp.ones(3), jnp.ones(1), True, jnp.asarray(1 + 2j), np.ones((1, 1))]:
    with pytest.raises(TypeError, match="`loss` must be a real scalar"):
      tx.update(GRAD, state, PARAMS, loss=bad)
  with pytest.raises(TypeError, match="`loss` must be a real scalar"):
    jax.jit(lambda s, loss: tx.update(GRAD, s, PARAMS, loss=loss))(state, jnp.ones(2))
  with pytest.raises(TypeError, match="`loss` must be a real scalar"):
    tx.update(GRAD, state, PARAMS, loss="high")
