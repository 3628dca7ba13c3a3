"""Update clipping (``clip_update_rms``/``stable_adamw``, ``clippy``) against float64 numpy ports
of the papers' rules: StableAdamW (Wortsman et al. 2023, arXiv 2304.13013, Algorithm 2 and the
authors' ``StableAdamWUnfused``) and ClippyAdagrad (Tang et al. 2023, arXiv 2302.09178,
Algorithm 1, as in tensorflow/recommenders ``clippy_adagrad.py``). The contract, checkpoint and
fault-injection tests of the shared table run on both too (``tests/_cases.py``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _refs import as64
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import clipax

SHAPES = {"kernel": (4, 3), "bias": (3,), "scale": ()}


def _tree(rng, scale=1.0, dtype=np.float64):
  return {k: (scale * rng.standard_normal(s)).astype(dtype) for k, s in SHAPES.items()}


def _gradients(steps, seed=0):
  """Gradients with spikes (x30 on one leaf every 5th step) so the rules clip."""
  rng = np.random.default_rng(seed)
  out = []
  for t in range(steps):
    g = _tree(rng)
    if t % 5 == 3:
      g["kernel"] = g["kernel"] * 30.0
      g["bias"][0] = 50.0
    if t == 6:
      g["bias"] = np.zeros(3)  # a tensor with a zero gradient
    out.append(g)
  return out


# ----------------------------------------------------------------------------- StableAdamW port
class StableAdamWRef:
  """Algorithm 2 of Wortsman et al. 2023 for one tensor, in float64: the bias-corrected moments
  as the ``beta_hat`` recursions, ``RMS = sqrt(mean(g^2 / max(u, eps^2)))``, the learning rate
  divided by ``max(1, RMS / d)``. ``decay_clipped``: the paper's weight decay with the clipped
  rate (True) or the reference code's with the unclipped one (False)."""

  def __init__(self, lr, b1, b2, eps, wd, d=1.0, decay_clipped=True):
    self.lr, self.b1, self.b2, self.eps, self.wd, self.d = lr, b1, b2, eps, wd, d
    self.decay_clipped = decay_clipped
    self.step = 1
    self.v = self.u = None
    self.rms = []

  def __call__(self, theta, g):
    if self.v is None:
      self.v, self.u = np.zeros_like(theta), np.zeros_like(theta)
    b1, b2, t = self.b1, self.b2, self.step
    b1hat = b1 * (1 - b1 ** (t - 1)) / (1 - b1**t)
    b2hat = b2 * (1 - b2 ** (t - 1)) / (1 - b2**t)
    self.v = b1hat * self.v + (1 - b1hat) * g
    self.u = b2hat * self.u + (1 - b2hat) * g * g
    rms = float(np.sqrt(np.mean(g * g / np.maximum(self.u, self.eps**2))))
    self.rms.append(rms)
    eta = self.lr / max(1.0, rms / self.d)
    decay = eta if self.decay_clipped else self.lr
    self.step += 1
    return theta - decay * self.wd * theta - eta * self.v / (np.sqrt(self.u) + self.eps)


def _run(tx, params, grads):
  state = tx.init(params)
  update = jax.jit(tx.update)
  states = []
  for g in grads:
    out, state = update(g, state, params)
    params = optax.apply_updates(params, out)
    states.append(state)
  return params, states


@pytest.mark.parametrize("decay_clipped", [True, False], ids=["paper", "reference_code"])
def test_stable_adamw_matches_the_float64_port_of_the_paper(decay_clipped):
  lr, b1, b2, eps, wd, steps = 0.05, 0.9, 0.99, 1e-6, 0.1, 12
  grads = _gradients(steps)
  rng = np.random.default_rng(7)
  p0 = _tree(rng)
  with jax.enable_x64(True):
    if decay_clipped:
      tx = clipax.stable_adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd)
    else:
      tx = optax.chain(clipax.clip_update_rms(optax.adam(lr, b1=b1, b2=b2, eps=eps), b2=b2,
                                              eps=eps), optax.add_decayed_weights(-lr * wd))
    params = {k: jnp.asarray(v) for k, v in p0.items()}
    got, states = _run(tx, params, [{k: jnp.asarray(v) for k, v in g.items()} for g in grads])
  refs = {k: StableAdamWRef(lr, b1, b2, eps, wd, decay_clipped=decay_clipped) for k in SHAPES}
  want = dict(p0)
  for g in grads:
    want = {k: refs[k](want[k], g[k]) for k in SHAPES}
  for k in SHAPES:
    assert got[k].dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-11, atol=1e-13, err_msg=k)
  # the rule did act: the spiky steps were clipped, and the recorded ratio is the largest RMS
  state = states[-1] if decay_clipped else states[-1][0]
  ratios = [max(refs[k].rms[t] for k in SHAPES) for t in range(steps)]
  assert max(ratios) > 1.5 and int(state.clipped_count) == sum(r > 1 for r in ratios) >= 2
  last = states[-1] if decay_clipped else states[-1][0]
  np.testing.assert_allclose(float(last.ratio), ratios[-1], rtol=1e-11)


def test_max_rms_inf_is_adamw_bit_for_bit_and_the_wrapper_finds_adam_anywhere():
  params = {k: jnp.asarray(v, jnp.float32) for k, v in _tree(np.random.default_rng(1)).items()}
  grads = [{k: jnp.asarray(v, jnp.float32) for k, v in g.items()} for g in _gradients(6)]
  plain, _ = _run(optax.adamw(0.1), params, grads)
  off, _ = _run(clipax.stable_adamw(0.1, max_rms=float("inf")), params, grads)
  for k in SHAPES:
    np.testing.assert_array_equal(np.asarray(off[k]), np.asarray(plain[k]))
  # the Adam state found through inject_hyperparams and chain (float32 hyperparameters there)
  direct, _ = _run(clipax.clip_update_rms(optax.adamw(0.1)), params, grads)
  injected = optax.chain(optax.identity(),
                         optax.inject_hyperparams(optax.adamw)(learning_rate=0.1))
  via, _ = _run(clipax.clip_update_rms(injected), params, grads)
  for k in SHAPES:
    np.testing.assert_allclose(np.asarray(via[k]), np.asarray(direct[k]), rtol=1e-4)
    assert not np.allclose(np.asarray(direct[k]), np.asarray(plain[k]))  # it did clip


def test_traced_max_rms_under_inject_hyperparams():
  params = {"w": jnp.zeros(4)}
  tx = optax.inject_hyperparams(clipax.clip_update_rms)(optax.adam(0.1), max_rms=1.0)
  state = tx.init(params)
  update = jax.jit(tx.update)
  _, state = update({"w": jnp.ones(4)}, state, params)
  g = {"w": jnp.array([100.0, 1.0, 1.0, 1.0])}
  state.hyperparams["max_rms"] = jnp.asarray(jnp.inf)
  out_off, s_off = update(g, state, params)
  state.hyperparams["max_rms"] = jnp.asarray(0.5)
  out_on, s_on = update(g, state, params)
  assert not bool(s_off.inner_state.clipped) and bool(s_on.inner_state.clipped)
  rms = float(s_on.inner_state.ratio)
  np.testing.assert_allclose(np.asarray(out_on["w"]), np.asarray(out_off["w"]) * 0.5 / rms,
                             rtol=1e-6)


# ----------------------------------------------------------------------------- Clippy port
def shrink64(delta, references, factors, absolute):
  """TFRS ``shrink_by_references`` in float64: the largest scale in [0, 1] with
  ``scale * |delta_i| <= sum_j |ref_ji| * factor_j + absolute`` for every i."""
  limit = absolute + sum(np.abs(r) * f for r, f in zip(references, factors, strict=True))
  with np.errstate(divide="ignore", invalid="ignore"):
    per = np.where(delta == 0, 1.0, np.where(np.abs(delta) > 0, limit / np.abs(delta), 0.0))
  scale = min(1.0, float(np.min(per)))
  return delta * scale, scale


class ClippyAdagradRef:
  """``ClippyAdagrad.update_step`` for one dense variable, in float64 (the accumulator read
  after adding the gradient with ``standard=True``, before it otherwise)."""

  def __init__(self, lr, init, rel, absolute, eps, standard):
    self.lr, self.init, self.rel, self.abs, self.eps = lr, init, rel, absolute, eps
    self.standard, self.acc, self.scales = standard, None, []

  def __call__(self, var, g):
    if self.acc is None:
      self.acc = np.full_like(var, self.init)
    if self.standard:
      self.acc = self.acc + g * g
    precondition = 1 / np.sqrt(self.acc + self.eps)
    delta = self.lr * g * precondition
    clipped, scale = shrink64(delta, [var, precondition], [self.rel, 0.0], self.abs)
    self.scales.append(scale)
    if not self.standard:
      self.acc = self.acc + g * g
    return var - clipped


def _delayed_adagrad(lr, init, eps):
  """Adagrad that reads its accumulator before adding the current gradient (the reference's
  default), as an optax optimizer for :func:`clipax.clippy` to wrap."""

  def init_fn(params):
    return jax.tree_util.tree_map(lambda p: jnp.full_like(p, init), params)

  def update_fn(updates, acc, params=None):
    out = jax.tree_util.tree_map(lambda g, a: -lr * g / jnp.sqrt(a + eps), updates, acc)
    return out, jax.tree_util.tree_map(lambda g, a: a + g * g, updates, acc)

  return optax.GradientTransformation(init_fn, update_fn)


@pytest.mark.parametrize("standard", [True, False], ids=["standard", "delayed"])
def test_clippy_matches_the_float64_port_of_the_reference(standard):
  lr, init, rel, absolute, eps, steps = 0.5, 0.1, 0.1, 1e-3, 1e-7, 12
  grads = _gradients(steps, seed=3)
  p0 = _tree(np.random.default_rng(5))
  p0["bias"][1] = 0.0  # a zero weight: only the absolute floor bounds its update
  with jax.enable_x64(True):
    inner = (optax.adagrad(lr, initial_accumulator_value=init, eps=eps) if standard
             else _delayed_adagrad(lr, init, eps))
    tx = clipax.clippy(inner, relative=rel, absolute=absolute)
    params = {k: jnp.asarray(v) for k, v in p0.items()}
    got, states = _run(tx, params, [{k: jnp.asarray(v) for k, v in g.items()} for g in grads])
  refs = {k: ClippyAdagradRef(lr, init, rel, absolute, eps, standard) for k in SHAPES}
  want = dict(p0)
  for g in grads:
    want = {k: refs[k](want[k], g[k]) for k in SHAPES}
  for k in SHAPES:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-11, atol=1e-14, err_msg=k)
  scales = [min(refs[k].scales[t] for k in SHAPES) for t in range(steps)]
  assert min(scales) < 0.2  # it clipped
  np.testing.assert_allclose([float(s.scale) for s in states], scales, rtol=1e-11)
  assert [int(s.clipped_count) for s in states] == list(np.cumsum(np.array(scales) < 1))


# ----------------------------------------------------------------------------- properties
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PROP_SHAPES = {"a": (3,), "b": (2, 2)}


@functools.cache
def _prop_step(which: str, dtype_name: str):
  """``(init, jitted update)`` per rule and dtype, built once."""
  # eps 1e-3: optax's 1e-8 is 0 in float16, and its Adam gives 0 / 0 for a zero gradient there
  if which == "rms":
    tx = clipax.clip_update_rms(optax.adam(0.1, eps=1e-3), eps=1e-3, max_rms=1.0)
  else:
    tx = clipax.clippy(optax.adam(0.1, eps=1e-3), relative=0.05, absolute=1e-3)
  return tx.init, jax.jit(tx.update), jax.jit(optax.adam(0.1, eps=1e-3).update)


_values = st.lists(st.floats(-1.0, 1.0, width=32), min_size=7, max_size=7)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.sampled_from(["rms", "clippy"]), dtype=st.sampled_from(sorted(DTYPES)),
       g1=_values, g2=_values, w=_values, spike=st.floats(0.0, 3.0))
def test_factor_per_tensor_matches_float64_for_every_dtype(which, dtype, g1, g2, w, spike):
  dt = DTYPES[dtype]

  def tree(values, scale=1.0):
    v = np.asarray(values) * scale
    return {"a": jnp.asarray(v[:3], dt), "b": jnp.asarray(v[3:].reshape(2, 2), dt)}

  params = tree(w, 10.0)
  init, update, adam_update = _prop_step(which, dtype)
  state = init(params)
  adam_state = optax.adam(0.1, eps=1e-3).init(params)
  for g in (tree(g1), tree(g2, 10.0**spike)):
    out, state = update(g, state, params)
    inner_out, adam_state = adam_update(g, adam_state, params)
  if max(np.max(np.abs(as64(x))) for x in g.values()) > np.sqrt(float(jnp.finfo(dt).max)):
    # g * g overflows the dtype (float16 above 256): the step is skipped, never half-applied
    assert bool(state.skipped) and int(state.overflow_count) == 1
    assert all(np.all(as64(x) == 0) for x in out.values())
    return
  assert not bool(state.skipped)
  factors = []
  for k in PROP_SHAPES:
    u, o = as64(inner_out[k]), as64(out[k])
    assert out[k].dtype == g[k].dtype and np.all(np.isfinite(o)), k
    if which == "rms":
      nu = as64(adam_state[0].nu[k]) / (1 - 0.999**2)
      gg = as64(g[k])
      rms = np.sqrt(np.mean(gg * gg / np.maximum(nu, 1e-6)))
      f = min(1.0, 1.0 / rms) if rms > 0 else 1.0
    else:
      limit = 0.05 * np.abs(as64(params[k])) + 1e-3
      nz = u != 0
      f = min(1.0, float(np.min(limit[nz] / np.abs(u[nz])))) if nz.any() else 1.0
      assert np.all(np.abs(o) <= limit * (1 + 1e-2)), k  # the Clippy bound holds elementwise
    factors.append(f)
    tol = 1e-5 if dt == jnp.float32 else 1e-2
    np.testing.assert_allclose(o, as64((u * f).astype(np.float32).astype(dt)), rtol=tol,
                               atol=tol * 1e-3 * np.max(np.abs(u), initial=0), err_msg=k)
  np.testing.assert_allclose(float(state.scale), min(factors), rtol=1e-5 if dt == jnp.float32
                             else 2e-2)
  assert bool(state.clipped) == (min(factors) < 1 - 1e-6) or abs(min(factors) - 1) < 1e-2


# ----------------------------------------------------------------------------- faults, metrics
@pytest.mark.parametrize("which", ["rms", "clippy"])
def test_nan_inf_and_overflowing_gradients_skip_the_step_and_are_counted(which):
  tx = (clipax.clip_update_rms(optax.adam(0.1), name="u") if which == "rms"
        else clipax.clippy(optax.adagrad(0.1), name="u"))
  params = {"w": jnp.ones(3), "b": jnp.ones(2)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  ok = {"w": jnp.ones(3), "b": jnp.ones(2)}
  _, state = update(ok, state, params)
  kinds = [("nan", jnp.nan), ("inf", jnp.inf), ("-inf", -jnp.inf), ("huge", 1e30)]
  for _kind, value in kinds:
    bad = {"w": jnp.array([1.0, value, 1.0]), "b": jnp.ones(2)}
    before = state.inner_state
    out, state = update(bad, state, params)
    for leaf in jax.tree_util.tree_leaves(out):
      np.testing.assert_array_equal(np.asarray(leaf), 0.0)
    for a, b in zip(jax.tree_util.tree_leaves(state.inner_state), jax.tree_util.tree_leaves(before),
                    strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert bool(state.skipped) and not bool(state.clipped)
  m = clipax.metrics(state)
  assert int(m["clip/u/nonfinite_count"]) == 3 and int(m["clip/u/overflow_count"]) == 1
  assert int(m["clip/u/skipped_count"]) == 4 and int(m["clip/u/count"]) == 5
  assert float(m["clip/u/skip_rate"]) == pytest.approx(0.8)
  out, state = update(ok, state, params)  # a finite step after: taken, finite inner state
  assert not bool(state.skipped) and any(np.any(np.asarray(x) != 0)
                                         for x in jax.tree_util.tree_leaves(out))
  for leaf in jax.tree_util.tree_leaves(state.inner_state):
    assert np.all(np.isfinite(np.asarray(leaf)))


def test_metrics_keys_names_and_dict_forms():
  from flax import serialization

  tx = optax.named_chain(("stable", clipax.stable_adamw(0.1)),
                         ("clippy", clipax.clippy(optax.sgd(1.0), relative=0.01, absolute=1e-3)))
  params = {"w": jnp.ones(4)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in ([1.0, 1.0, 1.0, 1.0], [100.0, 1.0, 1.0, 1.0]):
    _, state = update({"w": jnp.array(g)}, state, params)
  m = clipax.metrics(state)
  for name in ("stable", "clippy"):
    for key in ("norm", "ratio", "max_ratio", "scale", "clipped", "clip_rate", "update_norm",
                "skipped", "skip_rate", "nonfinite_count", "overflow_count", "invalid_count",
                "count"):
      assert f"clip/{name}/{key}" in m, (name, key)
  np.testing.assert_allclose(float(m["clip/stable/norm"]), np.sqrt(100.0**2 + 3), rtol=1e-6)
  np.testing.assert_allclose(float(m["clip/stable/ratio"]), 1.1179, rtol=1e-4)
  assert bool(m["clip/stable/clipped"]) and float(m["clip/stable/clip_rate"]) == 0.5
  assert float(m["clip/clippy/ratio"]) > 1 and float(m["clip/clippy/max_ratio"]) == 1.0
  as_dict = clipax.metrics(serialization.to_state_dict(state))
  assert set(as_dict) == set(m)
  for key, value in m.items():
    np.testing.assert_array_equal(np.asarray(as_dict[key]), np.asarray(value), err_msg=key)


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_argument():
  params = {"w": jnp.ones(3)}
  with pytest.raises(TypeError, match="`inner`.*ScaleByAdamState"):
    clipax.clip_update_rms(optax.sgd(0.1)).init(params)
  labels = {"w": "a", "v": "b"}
  two = optax.partition({"a": optax.adam(0.1), "b": optax.adam(0.2)}, labels)
  with pytest.raises(TypeError, match="found 2"):
    clipax.clip_update_rms(two).init({"w": jnp.ones(3), "v": jnp.ones(2)})
  with pytest.raises(TypeError, match="`inner`"):
    clipax.clippy("adam")  # type: ignore[arg-type]
  for fn, kwargs, arg in [
      (clipax.clip_update_rms, {"b2": 1.0}, "b2"),
      (clipax.clip_update_rms, {"eps": 0.0}, "eps"),
      (clipax.clip_update_rms, {"max_rms": -1.0}, "max_rms"),
      (clipax.clippy, {"relative": -0.1}, "relative"),
      (clipax.clippy, {"absolute": float("inf")}, "absolute"),
  ]:
    with pytest.raises(ValueError, match=f"`{arg}`"):
      fn(optax.adam(0.1), **kwargs)
  with pytest.raises(ValueError, match="`b1`"):
    clipax.stable_adamw(0.1, b1=1.5)
  tx = clipax.clippy(optax.sgd(0.1))
  state = tx.init(params)
  with pytest.raises(ValueError, match="needs `params`"):
    tx.update(params, state)
  with pytest.raises(ValueError, match=r"\['w'\] has shape \(2,\)"):
    tx.update(params, state, {"w": jnp.ones(2)})
  with pytest.raises(TypeError, match="gradient leaf"):
    tx.update({"w": jnp.ones(3, jnp.int32)}, state, params)
