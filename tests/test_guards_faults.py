"""Guards under injected faults: NaN/+Inf/-Inf/1e30 gradients inside a jitted training loop,
and checkpoint round trips (flax.serialization, orbax) that resume bit-identically."""

from __future__ import annotations

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from _refs import as64, assert_trees_equal

import clipax
from clipax._guards import SkipNonfiniteState

STEPS = 300
SHAPES = {"w": (4, 2), "b": (2,)}
LR, MOMENTUM = 0.1, 0.9
KINDS = ("nan", "+inf", "-inf", "1e30")


def faulty_stream(seed, *, steps=STEPS, faults=40):
  """Gradients with global norm ~N(1, 0.05) and a fault at ``faults`` random steps, plus a fixed
  set inside the first 16 steps (the spike guard's warm-up): NaN/+Inf/-Inf in one element, or
  every element 1e30 (a finite norm). Returns ``(grads, kinds)``, ``kinds[t]`` None when clean."""
  rng = np.random.default_rng(seed)
  size = sum(int(np.prod(s)) for s in SHAPES.values())
  flat = rng.standard_normal((steps, size))
  flat *= ((1.0 + 0.05 * rng.standard_normal(steps)) / np.linalg.norm(flat, axis=1))[:, None]
  kinds = [None] * steps
  for t, kind in [(2, "nan"), (4, "1e30"), (7, "-inf"), (9, "+inf"), (11, "1e30")]:
    kinds[t] = kind
  for t in rng.choice(np.arange(16, steps), faults, replace=False):
    kinds[t] = KINDS[rng.integers(len(KINDS))]
  for t, kind in enumerate(kinds):
    if kind == "1e30":
      flat[t] = 1e30 * np.sign(flat[t])
    elif kind is not None:
      flat[t, rng.integers(size)] = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}[kind]
  grads, start = {}, 0
  for name, shape in SHAPES.items():
    n = int(np.prod(shape))
    grads[name] = jnp.asarray(flat[:, start:start + n].reshape((steps, *shape)), jnp.float32)
    start += n
  return grads, kinds


def params0():
  return {name: jnp.zeros(shape, jnp.float32) for name, shape in SHAPES.items()}


def train(tx, grads):
  """A jitted ``lax.scan`` training loop: params updated by ``tx`` at every step."""

  @jax.jit
  def run(grads):
    def body(carry, g):
      params, state = carry
      updates, state = tx.update(g, state, params)
      return (optax.apply_updates(params, updates), state), state

    return jax.lax.scan(body, (params0(), tx.init(params0())), grads)

  return run(grads)


def momentum_sgd64(grads, skipped):
  """Float64 heavy-ball SGD (optax's rule: m = g + mu m; p -= lr m) over the accepted steps."""
  params = {k: np.zeros(s) for k, s in SHAPES.items()}
  trace = {k: np.zeros(s) for k, s in SHAPES.items()}
  for t in range(len(skipped)):
    if skipped[t]:
      continue
    for k in SHAPES:
      trace[k] = as64(grads[k][t]) + MOMENTUM * trace[k]
      params[k] = params[k] - LR * trace[k]
  return params


def expected_skips(kinds, warmup=16):
  """Non-finite steps are always skipped; a 1e30 step once ``warmup`` norms were accepted."""
  skipped, accepted = [], 0
  for kind in kinds:
    skip = kind in ("nan", "+inf", "-inf") or (kind == "1e30" and accepted >= warmup)
    accepted += not skip
    skipped.append(skip)
  return np.array(skipped)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("guard", ["skip_nonfinite", "skip_spikes"])
def test_faults_in_a_jitted_training_loop(guard, seed):
  grads, kinds = faulty_stream(seed)
  inner = optax.sgd(LR, momentum=MOMENTUM)
  tx = clipax.skip_nonfinite(inner) if guard == "skip_nonfinite" else clipax.skip_spikes(inner)
  (params, final), states = train(tx, grads)
  nonfinite = np.array([k in ("nan", "+inf", "-inf") for k in kinds])
  huge = np.array([k == "1e30" for k in kinds])
  if guard == "skip_nonfinite":
    want = nonfinite
  else:
    want = expected_skips(kinds)
    assert not want[4] and not want[11] and want[huge].sum() >= huge.sum() - 4
  skipped = np.asarray(states.skipped)
  np.testing.assert_array_equal(skipped, want)
  assert int(final.nonfinite_count) == nonfinite.sum()
  assert int(final.skipped_count) == want.sum()
  assert int(final.count) == STEPS
  for leaf in jax.tree_util.tree_leaves(params):
    assert np.all(np.isfinite(np.asarray(leaf)))
  # The wrapped optimizer is exactly momentum SGD run on the steps the guard let through.
  # (float32 cannot resolve what is left where accepted 1e30 steps cancel: atol at their scale)
  ref = momentum_sgd64(grads, want)
  scale = max(np.max(np.abs(ref[k])) for k in SHAPES)
  for k in SHAPES:
    np.testing.assert_allclose(as64(params[k]), ref[k], rtol=1e-5, atol=1e-6 * scale)
  if guard == "skip_spikes":
    # The 1e30 norms accepted in warm-up stay in the history, yet the band stays tight.
    assert int(final.spike_count) == want[huge].sum()
    assert np.all(np.isfinite(as64(states.history)))
    assert np.all(as64(states.threshold[20:]) < 2.0)


# ----------------------------------------------------------------------------- checkpoints
def _flax_roundtrip(tx, state, tmp_path):
  del tmp_path
  target = tx.init(params0())
  return flax.serialization.from_state_dict(target, flax.serialization.to_state_dict(state))


def _orbax_roundtrip(tx, state, tmp_path):
  path = tmp_path / "ckpt"
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, state)
    ckpt.wait_until_finished()
    return ckpt.restore(path, jax.eval_shape(tx.init, params0()))


GUARDS = {
    "skip_nonfinite": lambda inner: clipax.skip_nonfinite(inner),
    "skip_spikes": lambda inner: clipax.skip_spikes(inner, window=8, warmup=4),
}


@pytest.mark.parametrize("roundtrip", [_flax_roundtrip, _orbax_roundtrip], ids=["flax", "orbax"])
@pytest.mark.parametrize("guard", sorted(GUARDS))
def test_checkpoint_roundtrip_resumes_bit_identically(guard, roundtrip, tmp_path):
  steps = 40
  grads, _ = faulty_stream(2, steps=steps, faults=6)
  tx = GUARDS[guard](optax.chain(clipax.zclip(warmup_steps=5), optax.adamw(1e-2)))
  update = jax.jit(tx.update)

  def step(t, state, params):
    g = jax.tree_util.tree_map(lambda x: x[t], grads)
    updates, state = update(g, state, params)
    return optax.apply_updates(params, updates), state

  params, state = params0(), tx.init(params0())
  straight = []
  for t in range(steps):
    params, state = step(t, state, params)
    straight.append((params, state))
  half = steps // 2
  resumed_params, saved = straight[half - 1]
  resumed = roundtrip(tx, saved, tmp_path)
  assert type(resumed) is type(saved)
  assert jax.tree_util.tree_structure(resumed) == jax.tree_util.tree_structure(saved)
  for a, b in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(saved),
                  strict=True):
    assert np.asarray(a).dtype == np.asarray(b).dtype
  assert_trees_equal(resumed, saved)
  for t in range(half, steps):
    resumed_params, resumed = step(t, resumed, resumed_params)
    assert_trees_equal((resumed_params, resumed), straight[t])
  if guard == "skip_nonfinite":
    assert isinstance(resumed, SkipNonfiniteState)
  assert int(resumed.nonfinite_count) > 0
