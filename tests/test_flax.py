"""Every clipax transformation inside Flax: ``nnx.Optimizer`` and ``train_state.TrainState``.

Each case trains a small MLP for four jitted steps (a large gradient, a normal one, a NaN one, a
normal one) through the Flax API, and checks the result against the same ``tx`` run by hand on the
parameter pytree, the first step against a float64 numpy reference (clip, then AdamW or SPAM), and
the metrics read back from the Flax-held optimizer state.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _keys import field
from _refs import as64, leaves64, norm64
from flax import nnx
from flax.training import train_state

import clipax

LR, B1, B2, EPS, WD = 0.05, 0.9, 0.99, 0.1, 0.01  # eps large: AdamW's step depends on the clip
IN, HIDDEN, OUT, BATCH = 4, 8, 3, 16
RTOL, ATOL = 1e-6, 1e-7  # float32, same program traced twice
REF_RTOL, REF_ATOL = 1e-5, 1e-6  # float32 against a float64 reference, one AdamW step

Leaves = list[np.ndarray]


def _adamw() -> optax.GradientTransformation:
  """``optax.adamw`` run under standard dtype promotion.

  optax 0.2.8's bias correction computes ``b1 ** count`` with a python float and an int32 count,
  which the strict promotion of ``conftest.py`` rejects. Only the optax half of each chain is
  relaxed: the clipax half is traced under strict promotion.
  """
  inner = optax.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD)

  def update_fn(updates, state, params=None):
    with jax.numpy_dtype_promotion("standard"):
      return inner.update(updates, state, params)

  return optax.GradientTransformation(inner.init, update_fn)


# float64 numpy references of the first step's clip: (grads, params) -> clipped grads.


def _ref_global(c: float) -> Callable[[Leaves, Leaves], Leaves]:
  def ref(g, p):
    del p
    return [x * min(1.0, c / norm64(g)) for x in g]

  return ref


def _ref_value(c: float) -> Callable[[Leaves, Leaves], Leaves]:
  return lambda g, p: [np.clip(x, -c, c) for x in g]


def _ref_leaf(c: float) -> Callable[[Leaves, Leaves], Leaves]:
  return lambda g, p: [x * min(1.0, c / norm64([x])) for x in g]


def _ref_block_rms(c: float) -> Callable[[Leaves, Leaves], Leaves]:
  return lambda g, p: [x * min(1.0, c * np.sqrt(x.size) / norm64([x])) for x in g]


def _unit_norms(x: np.ndarray) -> np.ndarray:
  if x.ndim < 2:
    return np.full_like(x, np.sqrt(np.sum(x * x)))
  return np.sqrt(np.sum(x * x, axis=tuple(range(x.ndim - 1)), keepdims=True))


def _ref_agc(lam: float, eps: float = 1e-3) -> Callable[[Leaves, Leaves], Leaves]:
  def ref(g, p):
    out = []
    for x, w in zip(g, p, strict=True):
      limit = lam * np.maximum(_unit_norms(w), eps)
      out.append(x * np.minimum(1.0, limit / _unit_norms(x)))
    return out

  return ref


def _identity(g: Leaves, p: Leaves) -> Leaves:
  del p
  return g


def _adamw_step64(g: Leaves, p: Leaves) -> Leaves:
  """optax.adamw's first step in float64: m = (1-b1) g, v = (1-b2) g^2, bias-corrected."""
  out = []
  for x, w in zip(g, p, strict=True):
    m_hat = (1 - B1) * x / (1 - B1)
    v_hat = (1 - B2) * x * x / (1 - B2)
    out.append(w - LR * (m_hat / (np.sqrt(v_hat) + EPS) + WD * w))
  return out


def _spam_step64(g: Leaves, p: Leaves) -> Leaves:
  """clipax.spam's first step in float64: no spike clip yet, no ramp, decoupled weight decay."""
  step_size = LR * np.sqrt(1 - B2) / (1 - B1)
  out = []
  for x, w in zip(g, p, strict=True):
    u = -step_size * (1 - B1) * x / (np.sqrt((1 - B2) * x * x) + EPS)
    out.append(w + u - LR * WD * (w + u))
  return out


@dataclasses.dataclass(frozen=True)
class Case:
  """One transformation and what its first (large) step must do.

  Attributes:
    make: builds the whole optimizer, e.g. ``optax.chain(clipper, adamw)``.
    clip64: the float64 clip of the first step: (grads, params) -> clipped grads.
    step64: the float64 optimizer step after the clip: (clipped grads, params) -> params.
    flag: the boolean metric the first, large step is read from ("clipped", "skipped", or None
      for SPAM, which has neither).
    flag_large: its expected value after the first step.
    skips_nonfinite: the NaN step leaves the parameters exactly as they were.
  """

  make: Callable[[], optax.GradientTransformation]
  clip64: Callable[[Leaves, Leaves], Leaves]
  step64: Callable[[Leaves, Leaves], Leaves] = _adamw_step64
  flag: str | None = "clipped"
  flag_large: bool = True
  skips_nonfinite: bool = False


def _chain(clipper: Callable[[], optax.GradientTransformation]):
  return lambda: optax.chain(clipper(), _adamw())


CASES: dict[str, Case] = {
    "clip_by_global_norm": Case(_chain(lambda: clipax.clip_by_global_norm(1.0)), _ref_global(1.0)),
    "clip_by_value": Case(_chain(lambda: clipax.clip_by_value(0.05)), _ref_value(0.05)),
    "clip_by_leaf_norm": Case(_chain(lambda: clipax.clip_by_leaf_norm(0.5)), _ref_leaf(0.5)),
    "clip_by_block_rms": Case(_chain(lambda: clipax.clip_by_block_rms(0.1)), _ref_block_rms(0.1)),
    "adaptive_grad_clip": Case(_chain(lambda: clipax.adaptive_grad_clip(0.01)), _ref_agc(0.01)),
    # Adaptive clippers on their first step: zclip and adagc warm up with a fixed global clip,
    # autoclip's percentile of a one-norm history is that norm (no clip).
    "zclip": Case(_chain(lambda: clipax.zclip(max_norm=1.0)), _ref_global(1.0)),
    "autoclip": Case(_chain(lambda: clipax.autoclip(10.0)), _identity, flag_large=False),
    "adagc": Case(_chain(lambda: clipax.adagc(warmup_max_norm=1.0)), _ref_global(1.0)),
    # Guards around AdamW: the first step is accepted, the NaN step skipped.
    "skip_nonfinite": Case(
        lambda: clipax.skip_nonfinite(_adamw()),
        _identity,
        flag="skipped",
        flag_large=False,
        skips_nonfinite=True,
    ),
    "skip_spikes": Case(
        lambda: clipax.skip_spikes(_adamw(), window=8),
        _identity,
        flag="skipped",
        flag_large=False,
        skips_nonfinite=True,
    ),
    # SPAM is an optimizer (no spike clipping in its first 20 steps); it skips non-finite steps.
    "spam": Case(
        lambda: clipax.spam(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD),
        _identity,
        step64=_spam_step64,
        flag=None,
        skips_nonfinite=True,
    ),
}
NAMES = sorted(CASES)
INTEGRATIONS = ("nnx", "train_state")


# The same MLP twice: Flax NNX and Flax Linen (for TrainState).


class NNXMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(IN, HIDDEN, rngs=rngs)
    self.out = nnx.Linear(HIDDEN, OUT, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(OUT, name="out")(jnp.tanh(nn.Dense(HIDDEN, name="hidden")(x)))


def _batches() -> list[tuple[jax.Array, jax.Array]]:
  """Large gradient, normal, NaN, normal."""
  keys = jax.random.split(jax.random.key(1), 8)
  xs = [jax.random.normal(keys[i], (BATCH, IN)) for i in range(4)]
  ys = [jax.random.normal(keys[4 + i], (BATCH, OUT)) for i in range(4)]
  ys[0] = ys[0] * 300.0
  xs[2] = xs[2].at[0, 0].set(jnp.nan)
  return list(zip(xs, ys, strict=True))


NAN_STEP = 2


def _mse(pred, y):
  return jnp.mean((pred - y) ** 2)


@dataclasses.dataclass
class Run:
  """What one training run through a Flax API produced, as plain pytrees.

  Attributes:
    params: the parameters before the first step and after each step.
    grads: the gradient of each step.
    metrics: ``clipax.metrics`` of the Flax-held optimizer state after each step.
    raw_metrics: NNX only, ``clipax.metrics`` of ``optimizer.opt_state`` (variables, not pure);
      empty for TrainState.
    opt_states: the optimizer state after each step, as a pure pytree.
  """

  params: list[Any]
  grads: list[Any]
  metrics: list[dict[str, jax.Array]]
  raw_metrics: list[dict[str, jax.Array]]
  opt_states: list[Any]


def _run_nnx(tx: optax.GradientTransformation) -> Run:
  model = NNXMLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    grads = nnx.grad(lambda m: _mse(m(x), y))(model)
    optimizer.update(model, grads)
    return grads

  run = Run([nnx.to_pure_dict(nnx.state(model, nnx.Param))], [], [], [], [])
  for x, y in _batches():
    run.grads.append(nnx.to_pure_dict(train_step(model, optimizer, x, y)))
    run.params.append(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    pure_state = nnx.as_pure(optimizer.opt_state)
    run.opt_states.append(pure_state)
    run.metrics.append(clipax.metrics(pure_state))
    run.raw_metrics.append(clipax.metrics(optimizer.opt_state))
  return run


def _run_train_state(tx: optax.GradientTransformation) -> Run:
  model = LinenMLP()
  params = model.init(jax.random.key(0), jnp.zeros((1, IN)))["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  @jax.jit
  def train_step(state, x, y):
    loss = lambda p: _mse(state.apply_fn({"params": p}, x), y)
    grads = jax.grad(loss)(state.params)
    return state.apply_gradients(grads=grads), grads

  run = Run([state.params], [], [], [], [])
  for x, y in _batches():
    state, grads = train_step(state, x, y)
    run.grads.append(grads)
    run.params.append(state.params)
    run.opt_states.append(state.opt_state)
    run.metrics.append(clipax.metrics(state.opt_state))
  return run


@functools.cache
def _jitted(name: str) -> tuple[optax.GradientTransformation, Callable]:
  """One ``tx`` per case, its ``update`` jitted once for both integrations (same param dicts)."""
  tx = CASES[name].make()
  return tx, jax.jit(tx.update)


def _by_hand(name: str, params: Any, grads: Sequence[Any]):
  """The case's ``tx`` on the parameter dict, without Flax: params and states after each step."""
  tx, update = _jitted(name)
  state = tx.init(params)
  out_params, out_states = [], []
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    out_params.append(params)
    out_states.append(state)
  return out_params, out_states



def _assert_trees_close(actual, desired, rtol=RTOL, atol=ATOL, err_msg=""):
  a, d = leaves64(actual), leaves64(desired)
  assert len(a) == len(d), err_msg
  for i, (x, y) in enumerate(zip(a, d, strict=True)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=f"{err_msg} leaf {i}")


PARAMS = [
    pytest.param(integration, name, id=f"{integration}-{name}")
    for integration in INTEGRATIONS
    for name in NAMES
]


def _check_first_step(case: Case, run: Run) -> None:
  """The first (large) step lands where the float64 clip-then-optimizer reference does."""
  p0, g0 = leaves64(run.params[0]), leaves64(run.grads[0])
  expected = case.step64(case.clip64(g0, p0), p0)
  _assert_trees_close(run.params[1], expected, REF_RTOL, REF_ATOL, "first step vs float64")
  if case.flag == "clipped" and case.flag_large:  # the clip matters: unclipped lands elsewhere
    unclipped = case.step64(g0, p0)
    assert max(np.max(np.abs(a - b)) for a, b in zip(unclipped, expected, strict=True)) > 1e-3


def _check_by_hand(name: str, run: Run) -> None:
  """Every step's params and optimizer state equal the same ``tx`` run by hand."""
  params, states = _by_hand(name, run.params[0], run.grads)
  for step, (p, s) in enumerate(zip(params, states, strict=True)):
    _assert_trees_close(run.params[step + 1], p, err_msg=f"params after step {step}")
    _assert_trees_close(run.opt_states[step], s, err_msg=f"opt_state after step {step}")
    assert run.metrics[step].keys() == clipax.metrics(s).keys()


def _check_metrics(case: Case, run: Run) -> None:
  """``clipax.metrics`` of the Flax-held state: the numpy norm, the flag, the count."""
  m = run.metrics[0]
  assert float(field(m, "norm")) > 100.0
  if case.flag is not None:
    assert bool(field(m, case.flag)) is case.flag_large
  for step, grads in enumerate(run.grads):
    if step != NAN_STEP:
      np.testing.assert_allclose(as64(field(run.metrics[step], "norm")), norm64(grads), rtol=1e-6)
    assert int(field(run.metrics[step], "count")) == step + 1
  for pure, raw in zip(run.metrics, run.raw_metrics, strict=False):  # NNX only: variables
    assert pure.keys() == raw.keys()
    for key in pure:
      np.testing.assert_array_equal(np.asarray(pure[key]), np.asarray(raw[key]), err_msg=key)


def _check_nan_step(case: Case, run: Run) -> None:
  """A NaN gradient leaves the parameters finite and is counted once."""
  assert any(np.isnan(g).any() for g in leaves64(run.grads[NAN_STEP]))
  for step in range(NAN_STEP, len(run.grads)):
    for leaf in leaves64(run.params[step + 1]):
      assert np.all(np.isfinite(leaf)), f"non-finite params after step {step}"
  assert int(field(run.metrics[NAN_STEP - 1], "nonfinite_count")) == 0
  assert int(field(run.metrics[NAN_STEP], "nonfinite_count")) == 1
  assert int(field(run.metrics[-1], "nonfinite_count")) == 1
  if case.skips_nonfinite:
    _assert_trees_close(run.params[NAN_STEP + 1], run.params[NAN_STEP], rtol=0, atol=0)
  if case.flag == "skipped":
    assert bool(field(run.metrics[NAN_STEP], "skipped"))


# One test per (integration, case), so that under pytest-xdist each training run happens once.
@pytest.mark.parametrize(("integration", "name"), PARAMS)
def test_training_through_flax(integration, name):
  case = CASES[name]
  run = _run_nnx(case.make()) if integration == "nnx" else _run_train_state(case.make())
  assert len(run.raw_metrics) == (len(run.metrics) if integration == "nnx" else 0)
  _check_first_step(case, run)
  _check_by_hand(name, run)
  _check_metrics(case, run)
  _check_nan_step(case, run)
