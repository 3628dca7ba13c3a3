"""SPAM against a float64 numpy port of TianjinYellow/SPAM-Optimizer ``galore_torch/SPAM.py``."""

from __future__ import annotations

import math

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _keys import field
from _refs import as64

import clipax
from clipax._spam import _count, warmup_scale

RTOL = 1e-5


class SpamRef:
  """The reference optimizer's step for one parameter array, in float64 (no GaLore masks)."""

  def __init__(self, lr, b1=0.9, b2=0.999, eps=1e-6, theta=5000.0, gap=500, warmup=150, wd=0.0,
               delay=20, robust=True):
    self.lr = lr if callable(lr) else (lambda _: lr)
    self.b1, self.b2, self.eps, self.theta = b1, b2, eps, theta
    self.gap, self.warmup, self.wd, self.delay = gap, warmup, wd, delay
    self.total_step, self.current_step, self.step_ = 0, warmup + 1, 0
    self.m = self.v = None
    self.clipped = 0
    # clipax's deliberate addition (not in the reference): while spike clipping is off, the
    # global norm is bounded by sqrt(theta) * median of the last 20 norms (kept post-bound).
    self.robust, self.history, self.bounded = robust, [], 0

  def death_rate(self, c):
    """``CosineDecay(0.99, warmup).get_dr(c)``: torch's closed-form cosine annealing."""
    if c >= self.warmup:
      return 0.0
    return 0.99 * (1 + math.cos(math.pi * c / (self.warmup + 1))) / 2

  def update(self, grad, p):
    grad = np.array(grad, np.float64)
    scale = 1 - self.death_rate(self.current_step)
    lr = self.lr(self.total_step)
    if self.m is None or (self.total_step + 1) % self.gap == 0:
      self.m, self.v = np.zeros_like(grad), np.zeros_like(grad)
    self.step_ += 1
    self.clipped = 0
    k = self.total_step + 1
    clip_on = self.theta != 0 and k >= self.delay and k % self.gap >= self.delay
    norm = float(np.sqrt(np.sum(grad * grad)))
    median = float(np.median(self.history)) if self.history else 0.0
    bound = math.sqrt(self.theta) * median if self.theta != 0 and median > 0 else math.inf
    if self.robust and not clip_on and norm > bound:
      grad = grad * (bound / norm)
      self.bounded += 1
    self.history = (self.history + [min(norm, bound)])[-20:]
    if clip_on:
      mask = grad**2 > self.theta * self.v
      grad[mask] = np.sign(grad[mask]) * np.sqrt(self.v[mask] * self.theta)
      self.clipped = int(mask.sum())
    self.m = self.b1 * self.m + (1 - self.b1) * grad
    self.v = self.b2 * self.v + (1 - self.b2) * grad * grad
    denom = np.sqrt(self.v) + self.eps
    step_size = lr * math.sqrt(1 - self.b2**self.step_) / (1 - self.b1**self.step_)
    new_p = p - step_size * scale * self.m / denom
    if self.wd > 0:
      new_p = new_p - lr * self.wd * new_p
    self.total_step += 1
    self.current_step += 1
    if self.total_step != 0 and (self.total_step + 1) % self.gap == 0:
      self.current_step = 0
    return new_p - p


def grad_stream(n, shape, seed):
  """Gradients with element-wise spikes (x1000 on 0.5% of elements) after a quiet start."""
  rng = np.random.default_rng(seed)
  g = 0.1 * rng.standard_normal((n, *shape))
  spikes = rng.random((n, *shape)) < 0.005
  spikes[:5] = False
  g[spikes] *= 1000.0
  return g


def run(tx, grads, params):
  """Runs ``tx`` over the leading axis in one ``lax.scan``, applying the updates."""

  @jax.jit
  def go(grads, params):
    def body(carry, g):
      state, p = carry
      u, state = tx.update({"w": g}, state, p)
      spikes = getattr(state, "inner_state", state).spikes
      return (state, optax.apply_updates(p, u)), (u["w"], p["w"], spikes)

    return jax.lax.scan(body, (tx.init(params), params), grads)

  return go(grads, params)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(theta=50.0, gap=100, warmup=30, wd=0.0),
        dict(theta=50.0, gap=64, warmup=0, wd=0.1),
        dict(theta=0.0, gap=100, warmup=150, wd=0.0),
        dict(theta=5000.0, gap=500, warmup=150, wd=0.0),
    ],
)
def test_spam_matches_reference(kwargs):
  n, shape = 330, (5, 4)
  grads = grad_stream(n, shape, seed=1)
  lr = 0.01
  params = {"w": jnp.asarray(np.random.default_rng(2).standard_normal(shape), jnp.float32)}
  tx = clipax.spam(
      lr,
      theta=kwargs["theta"],
      reset_interval=kwargs["gap"],
      warmup_steps=kwargs["warmup"],
      weight_decay=kwargs["wd"],
  )
  _, (updates, ps, spikes) = run(tx, jnp.asarray(grads, jnp.float32), params)
  ref = SpamRef(lr, **kwargs)
  total_clipped = 0
  g32, ps, updates, spikes = as64(grads.astype(np.float32)), as64(ps), as64(updates), as64(spikes)
  for t in range(n):
    want = ref.update(g32[t], ps[t])
    atol = RTOL * np.max(np.abs(want))  # elements where m cancels to ~0 are relative to the rest
    np.testing.assert_allclose(updates[t], want, rtol=RTOL, atol=atol, err_msg=f"step {t}")
    assert int(spikes[t]) == ref.clipped, f"step {t}"
    total_clipped += ref.clipped
  if kwargs["theta"] == 50.0:
    assert total_clipped > 10  # the stream does exercise the spike clipping
    assert ref.bounded > 0  # ... and the warm-up bound (clipax's addition to the reference)
  if kwargs["theta"] == 0.0:
    assert total_clipped == 0


def test_learning_rate_schedule():
  n, shape = 120, (3,)
  grads = grad_stream(n, shape, seed=3)
  schedule = optax.linear_schedule(0.02, 0.001, 100)
  params = {"w": jnp.zeros(shape)}
  tx = clipax.spam(schedule, theta=50.0, reset_interval=50, warmup_steps=10)
  _, (updates, ps, _) = run(tx, jnp.asarray(grads, jnp.float32), params)
  lrs = as64(jax.vmap(schedule)(jnp.arange(n)))
  ref = SpamRef(lambda t: lrs[t], theta=50.0, gap=50, warmup=10)
  g32, ps, updates = as64(grads.astype(np.float32)), as64(ps), as64(updates)
  for t in range(n):
    want = ref.update(g32[t], ps[t])
    atol = RTOL * np.max(np.abs(want))  # elements where m cancels to ~0 are relative to the rest
    np.testing.assert_allclose(updates[t], want, rtol=RTOL, atol=atol, err_msg=f"step {t}")


def test_warmup_scale_is_the_reference_cosine():
  ref = SpamRef(0.1, gap=40, warmup=12)
  steps = jnp.arange(1, 130)
  got = as64(jax.jit(lambda s: warmup_scale(s, 40, 12))(steps))
  want = []
  for _ in range(129):
    want.append(1 - ref.death_rate(ref.current_step))
    ref.update(np.zeros(1), np.zeros(1))
  np.testing.assert_allclose(got, want, rtol=RTOL)
  assert got[39] == pytest.approx(0.01)  # step 40: the first reset starts from 1%
  assert np.all(got[:39] == 1) and got[52] == 1


def test_momentum_reset_zeroes_the_moments():
  tx = clipax.spam(0.1, reset_interval=5)
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(4):
    _, state = update({"w": jnp.asarray([1.0, -2.0])}, state, params)
  assert float(state.mu["w"][0]) > 0.3
  _, state = update({"w": jnp.asarray([0.5, 0.5])}, state, params)  # step 5: reset first
  np.testing.assert_allclose(as64(state.mu["w"]), [0.05, 0.05], rtol=RTOL)
  np.testing.assert_allclose(as64(state.nu["w"]), [0.00025, 0.00025], rtol=RTOL)


def test_thousand_steps_inside_lax_scan_and_dtypes():
  grads = grad_stream(1000, (8,), seed=4)
  params = {"w": jnp.zeros(8, jnp.bfloat16)}
  tx = clipax.spam(1e-3, theta=50.0, reset_interval=200, warmup_steps=50, weight_decay=0.01)
  grads = jnp.asarray(grads, jnp.bfloat16)
  with jax.transfer_guard("disallow"):
    (state, p), (updates, _, spikes) = run(tx, grads, params)
  assert updates.dtype == jnp.bfloat16 and p["w"].dtype == jnp.bfloat16
  assert state.mu["w"].dtype == jnp.float32 and state.nu["w"].dtype == jnp.float32
  assert int(state.count) == 1000
  assert int(np.sum(np.asarray(spikes))) > 0
  for x in jax.tree_util.tree_leaves(state):
    assert np.all(np.isfinite(as64(x)))


def test_checkpoint_resume_is_bit_identical():
  grads = grad_stream(60, (4,), seed=5)
  tx = clipax.spam(0.01, theta=50.0, reset_interval=25, warmup_steps=5, weight_decay=0.1)
  update = jax.jit(tx.update)
  params = {"w": jnp.ones(4)}
  state = tx.init(params)
  straight = []
  for t in range(60):
    u, state = update({"w": jnp.asarray(grads[t], jnp.float32)}, state, params)
    straight.append(u["w"])
  resumed = tx.init(params)
  for t in range(30):
    _, resumed = update({"w": jnp.asarray(grads[t], jnp.float32)}, resumed, params)
  resumed = flax.serialization.from_bytes(tx.init(params), flax.serialization.to_bytes(resumed))
  for t in range(30, 60):
    u, resumed = update({"w": jnp.asarray(grads[t], jnp.float32)}, resumed, params)
    np.testing.assert_array_equal(np.asarray(u["w"]), np.asarray(straight[t]))
  leaves = jax.tree_util.tree_leaves
  for a, b in zip(leaves(resumed), leaves(state), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_inject_hyperparams_matches_plain():
  grads = jnp.asarray(grad_stream(80, (4,), seed=6), jnp.float32)
  params = {"w": jnp.zeros(4)}
  kwargs = dict(learning_rate=0.01, theta=50.0, reset_interval=30, warmup_steps=8)
  (plain, _), _ = run(clipax.spam(**kwargs), grads, params)
  (injected, _), _ = run(optax.inject_hyperparams(clipax.spam)(**kwargs), grads, params)
  # Injected hyperparameters are float32 arrays: 1 - float32(0.999) is off by 1.3e-5 relative,
  # which the python-number path avoids, hence the looser tolerance.
  leaves = jax.tree_util.tree_leaves
  for a, b in zip(leaves(plain), leaves(injected.inner_state), strict=True):
    np.testing.assert_allclose(as64(a), as64(b), rtol=1e-4)


def test_weight_decay_needs_params():
  tx = clipax.spam(0.1, weight_decay=0.1)
  with pytest.raises(ValueError, match="params"):
    tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.zeros(2)}))
  tx = clipax.spam(0.1)
  u, _ = tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.zeros(2)}))  # no decay: no params needed
  assert u["w"].shape == (2,)


BAD_HYPERPARAMETERS = [
    ({"learning_rate": -0.1}, "learning_rate"),
    ({"b1": 1.0}, "b1"),
    ({"b2": -0.1}, "b2"),
    ({"eps": -1e-8}, "eps"),
    ({"eps": 0.0}, "eps"),
    ({"theta": -1.0}, "theta"),
    ({"reset_interval": 0}, "reset_interval"),
    ({"reset_interval": 2**31}, "reset_interval"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"warmup_steps": 2**31}, "warmup_steps"),
    ({"weight_decay": float("nan")}, "weight_decay"),
]


@pytest.mark.parametrize("kwargs,name", BAD_HYPERPARAMETERS)
def test_construction_rejects_bad_hyperparameters(kwargs, name):
  kwargs = {"learning_rate": 0.1, **kwargs}
  with pytest.raises(ValueError, match=f"`{name}`"):
    clipax.spam(**kwargs)


def test_construction_rejects_a_non_integer_step_count():
  with pytest.raises(TypeError, match="`reset_interval`"):
    clipax.spam(0.1, reset_interval=10.5)


# (2**31 does not fit the int32 array inject_hyperparams makes of it: optax fails first.)
FITS_INT32 = [c for c in BAD_HYPERPARAMETERS if 2**31 not in c[0].values()]


@pytest.mark.parametrize("kwargs,name", FITS_INT32)
def test_inject_hyperparams_init_rejects_bad_numbers(kwargs, name):
  """inject_hyperparams turns the numbers into concrete arrays in init: checked all the same."""
  kwargs = {"learning_rate": 0.1, **kwargs}
  tx = optax.inject_hyperparams(clipax.spam, hyperparam_dtype=jnp.float32)(**kwargs)
  with pytest.raises(ValueError, match=f"`{name}`"):
    tx.init({"w": jnp.zeros(2)})


def test_default_eps_is_the_reference_codes():
  """eps = 1e-6 as in galore_torch/SPAM.py: visible on a gradient of the size of eps."""
  g = np.full((3,), 1e-5)
  params = {"w": jnp.zeros(3)}
  tx = clipax.spam(1.0)
  out, _ = tx.update({"w": jnp.asarray(g, jnp.float32)}, tx.init(params), params)
  want = SpamRef(1.0).update(g.astype(np.float32), np.zeros(3))
  np.testing.assert_allclose(as64(out["w"]), want, rtol=RTOL)
  s = math.sqrt(1e-3) * 1e-5  # sqrt(v) after one step, bias-corrected below
  np.testing.assert_allclose(want, -s / (s + 1e-6), rtol=1e-6)  # about 0.24, 0.97 with 1e-8


def test_nonfinite_gradient_skips_the_step_and_is_counted():
  tx = clipax.spam(0.1)
  params = {"w": jnp.array([1.0, -2.0])}
  state = tx.init(params)
  update = jax.jit(tx.update)
  _, state = update({"w": jnp.array([0.5, -3.0])}, state, params)
  before = state
  out, state = update({"w": jnp.array([np.nan, 1.0])}, state, params)
  np.testing.assert_array_equal(np.asarray(out["w"]), 0.0)
  for a, b in zip(jax.tree_util.tree_leaves((before.count, before.mu, before.nu)),
                  jax.tree_util.tree_leaves((state.count, state.mu, state.nu)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  m = clipax.metrics(state)
  assert int(field(m, "nonfinite_count")) == 1 and int(field(m, "count")) == 2
  assert np.isnan(float(field(m, "norm")))
  out, state = update({"w": jnp.array([0.5, -3.0])}, state, params)
  assert np.all(np.isfinite(np.asarray(out["w"]))) and int(state.count) == 2


@pytest.mark.parametrize(
    "shape,off", [((1000, 7), 3), ((4097, 4096), 4095), (((1 << 24) + 1,), 0)])
def test_spike_count_is_exact_past_float32_integers(shape, off):
  # float32 counts fuse into the moment update on the TPU; past 2**24 elements a float32 total
  # would round (2**24 + 1 is not a float32), so large leaves are counted by rows or in int32
  mask = np.ones(shape, bool)
  mask.reshape(-1)[:off] = False
  got = jax.jit(_count)(jnp.asarray(mask))
  assert got.dtype == jnp.int32
  assert int(got) == mask.size - off


def test_spike_count_on_the_tpu_path_equals_the_cpu_path(monkeypatch):
  # The TPU's program counts each leaf's spikes in float32 (_count); forced here on the CPU.
  from clipax import _platform

  rng = np.random.default_rng(7)
  grads = jnp.asarray(rng.normal(size=(30, 2, 64)), jnp.float32)
  grads = grads.at[25, :, :5].multiply(1e4)  # spikes once spike clipping is on (step >= 20)
  params = {"a": jnp.zeros((64,)), "b": jnp.zeros((64,))}

  def run():
    tx = clipax.spam(1e-3)

    def step(state, g):
      _, state = tx.update({"a": g[0], "b": g[1]}, state, params)
      return state, state.spikes

    return jax.jit(lambda s: jax.lax.scan(step, s, grads))(tx.init(params))

  cpu_state, cpu_spikes = run()
  monkeypatch.setattr(_platform, "_by_platform", lambda cpu, accelerator, gpu=None: accelerator())
  tpu_state, tpu_spikes = run()
  assert int(cpu_state.spike_count) >= 10
  np.testing.assert_array_equal(np.asarray(tpu_spikes), np.asarray(cpu_spikes))
