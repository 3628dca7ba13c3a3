"""Fault injection for every transformation in the table (``tests/_cases.py``).

Generic over ``CLIPPERS``, so a transformation added to the table is covered without a new test:

* a jitted ``lax.scan`` training loop with NaN, +Inf, -Inf and 1e30 gradients (one element of
  one leaf) at random steps, forced into the first steps (warm-up) and, for a transformation
  with momentum resets (spam), right at and after each reset; run from fresh counters and from
  counters started just below 2**31 so that they saturate mid-run. Parameters and every
  statistic stay finite at every step, every event is counted exactly, non-finite steps give
  all-zero updates and a finite 1e30 step is clipped, not counted as non-finite (except where a
  transformation documents otherwise);
* a 100,000-step ``lax.scan`` soak with heavy-tailed spikes, a 10x level shift at step 50,000
  and NaN/Inf steps: everything stays finite, the counts are exact, and each adaptive threshold
  does after the shift what its documented rule implies.

The guard- and spam-specific fault tests (reference optimizers, checkpoints, bounded counts)
are in ``test_guards_faults.py`` and ``test_spam_faults.py``; counter saturation of every
field after a handful of steps is in ``test_contract.py``.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _cases import CLIPPERS, Case
from _refs import as64

import clipax
from clipax._state import INT_MAX

NONFINITE = ("nan", "+inf", "-inf")
KINDS = (*NONFINITE, "1e30")
HUGE = 1e30
STEPS = 120
SHAPES = {"dense": {"w": (4, 3), "b": (3,)}, "s": ()}
NEAR_MAX = INT_MAX - 10  # counters start here and saturate within the run
RESET_INTERVAL = 30  # for a transformation with momentum resets (``reset_interval``)
# recorded values, may be inf/NaN; everything else is a stat
MEASUREMENTS = ("norm", "threshold", "update_norm", "leaf_norms")

# Documented exceptions to "a finite 1e30 gradient is not a non-finite event": spam skips a
# gradient whose square overflows the moments while it knows no norm yet (before its first step
# taken), and counts it in ``nonfinite_count`` (clipax.spam, "Skipped steps").
OVERFLOW_SKIPPED_BEFORE_FIRST_STEP = {"spam"}

# Documented: autoclip's threshold is a percentile of the recent norms *the current one
# included*, so among its first finite norms a 1e30 one is (close to) its own threshold and
# passes (nearly) unclipped; checked for finiteness only in the first 5 steps.
HUGE_MAY_PASS_IN_WARMUP = {"autoclip"}


def _kwargs(case: Case) -> dict:
  """Overrides for the fault runs: a short momentum-reset interval where there is one."""
  if "reset_interval" in inspect.signature(case.factory).parameters:
    return {"reset_interval": RESET_INTERVAL, "warmup_steps": 5}
  return {}


def _build(case: Case):
  """``(clipper, optimizer)``: a "clip" case is followed by momentum SGD (its own output is
  checked); a guard or an optimizer is the whole step (``clipper`` None)."""
  tx = case.make(**_kwargs(case))
  if case.kind == "clip":
    return tx, optax.sgd(0.1, momentum=0.9)
  return None, tx


def _is_clipax(node) -> bool:
  return isinstance(node, tuple) and callable(getattr(node, "clipax_metrics", None))


def _start_counters_at(state, start: int):
  """``state`` with every event counter (``count`` and ``*_count``) of every clipax state set to
  ``start``; warm-up progress (``observed``, ``accepted``) and ring positions are left alone."""

  def visit(node):
    if _is_clipax(node):
      changes = {f: jnp.asarray(start, jnp.int32) for f in node._fields
                 if (f == "count" or f.endswith("_count"))
                 and not isinstance(getattr(node, f), tuple)}
      if "inner_state" in node._fields:
        changes["inner_state"] = visit(node.inner_state)
      return node._replace(**changes)
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      return type(node)(*[visit(x) for x in node])
    if isinstance(node, (tuple, list)):
      return type(node)(visit(x) for x in node)
    return node

  return visit(state)


def _field(path) -> str | None:
  """The name of the last NamedTuple field on a key path (``mu`` for ``.mu['w']``)."""
  names = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
  return names[-1] if names else None


def _health(params, state) -> jax.Array:
  """In-graph: the params and every float leaf of the state that is a statistic (everything but
  the ``MEASUREMENTS``: inner optimizer states included) are finite, and no threshold is NaN
  (``inf`` is "off", e.g. in warm-up)."""
  ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(params)]))
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
      continue
    if _field(path) == "threshold":
      ok &= ~jnp.any(jnp.isnan(x))
    elif _field(path) not in MEASUREMENTS:
      ok &= jnp.all(jnp.isfinite(x))
  return ok


def _offenders(states) -> list[str]:
  """For a failure message: each state field that is non-finite (a NaN threshold) at some step,
  with the first such step (``states`` has a leading step axis)."""
  found = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(states)[0]:
    measured = _field(path) in ("norm", "update_norm", "leaf_norms")
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) or measured:
      continue
    x = as64(leaf).reshape(leaf.shape[0], -1)
    bad = np.isnan(x) if _field(path) == "threshold" else ~np.isfinite(x)
    steps = np.flatnonzero(bad.any(axis=1))
    if steps.size:
      found.append(f"{jax.tree_util.keystr(path)} from step {steps[0]}")
  return found


def _metric(m: dict, name: str):
  """The outermost clipax state's metric ``name`` (``clip/<its name>/name``), or ``None``."""
  outer = next(iter(m)).split("/")[1] if m else None
  return m.get(f"clip/{outer}/{name}")


def _params0():
  rng = np.random.default_rng(123)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(0.5 * rng.standard_normal(s), jnp.float32), SHAPES,
      is_leaf=lambda x: isinstance(x, tuple))


def _runner(case: Case, steps_out: bool = True):
  return _cached_runner(case.name, steps_out)


@functools.cache
def _cached_runner(name: str, steps_out: bool):
  """``(init, run)``: ``run`` is a jitted ``lax.scan`` over the leading axis of the gradients,
  from ``(params, state)``; it returns the final carry and, per step, ``(params, output, state,
  metrics, health, output is all zero)`` (only the last three when ``steps_out`` is False). The
  output is the clipper's for a "clip" case, the whole update otherwise."""
  clipper, opt = _build(next(c for c in CLIPPERS if c.name == name))

  def init(params):
    return (clipper.init(params) if clipper else None, opt.init(params))

  @jax.jit
  def run(grads, params, state):
    def body(carry, g):
      params, (cs, os) = carry
      if clipper:
        out, cs = clipper.update(g, cs, params)
        updates, os = opt.update(out, os, params)
      else:
        updates, os = opt.update(g, os, params)
        out = updates
      params = optax.apply_updates(params, updates)
      state = (cs, os)
      m = clipax.metrics(state)
      ok = _health(params, state)
      zero = jnp.all(jnp.stack([jnp.all(x == 0) for x in jax.tree_util.tree_leaves(out)]))
      if steps_out:
        return (params, state), (params, out, state, m, ok, zero)
      return (params, state), (m, ok, zero)

    return jax.lax.scan(body, (params, state), grads)

  return init, run


# ----------------------------------------------------------------------------- fault streams
def _skipped_by_rule(case: Case, kinds) -> np.ndarray:
  """The steps each transformation's documented policy counts in ``nonfinite_count``."""
  out, taken = [], 0
  for kind in kinds:
    bad = kind in NONFINITE or (
        kind == "1e30" and case.name in OVERFLOW_SKIPPED_BEFORE_FIRST_STEP and taken == 0)
    taken += not bad
    out.append(bad)
  return np.array(out)


def _reset_steps(case: Case, kinds) -> list[int]:
  """The steps at which a transformation with momentum resets resets: the start of its
  ``RESET_INTERVAL``-th, ``2 * RESET_INTERVAL``-th, ... step taken (skipped steps not counted)."""
  if "reset_interval" not in _kwargs(case):
    return []
  skipped = _skipped_by_rule(case, kinds)
  taken = np.cumsum(~skipped)
  return [int(t) for t in np.flatnonzero(~skipped & (taken % RESET_INTERVAL == 0) & (taken > 0))]


def fault_kinds(case: Case, seed: int, steps: int = STEPS) -> list[str | None]:
  """Which fault each step gets (None: clean): 3 of the first 5 steps (warm-up: a 1e30 and a
  non-finite among them), 20 random later steps, and for a transformation with resets a 1e30 on
  each reset step and random faults on the two steps after it."""
  rng = np.random.default_rng(seed)
  kinds: list[str | None] = [None] * steps
  early = rng.choice(5, 3, replace=False)
  for t, kind in zip(early, ["1e30", NONFINITE[rng.integers(3)], KINDS[rng.integers(4)]],
                     strict=True):
    kinds[t] = kind
  for t in rng.choice(np.arange(5, steps), 20, replace=False):
    kinds[t] = KINDS[rng.integers(4)]
  done: set[int] = set()
  while True:  # each fault placed after a reset can move the later resets: recompute
    todo = [t for t in _reset_steps(case, kinds) if t not in done and t + 2 < steps]
    if not todo:
      return kinds
    t = todo[0]
    kinds[t] = "1e30"
    kinds[t + 1], kinds[t + 2] = KINDS[rng.integers(4)], KINDS[rng.integers(4)]
    done.add(t)


def fault_grads(kinds, seed: int):
  """N(0, 1) gradients with the shapes of ``SHAPES`` and each fault in one element of one leaf
  (1e30 with a random sign)."""
  rng = np.random.default_rng(1000 + seed)
  flat_shapes = jax.tree_util.tree_leaves(SHAPES, is_leaf=lambda x: isinstance(x, tuple))
  treedef = jax.tree_util.tree_structure(SHAPES, is_leaf=lambda x: isinstance(x, tuple))
  leaves = [rng.standard_normal((len(kinds), *s)) for s in flat_shapes]
  values = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}
  for t, kind in enumerate(kinds):
    if kind is None:
      continue
    leaf = leaves[rng.integers(len(leaves))]
    index = (t, *(int(rng.integers(n)) for n in leaf.shape[1:]))
    leaf[index] = values[kind] if kind in values else HUGE * rng.choice([-1.0, 1.0])
  return treedef.unflatten([jnp.asarray(x, jnp.float32) for x in leaves])


def _saturating(start: int, increments) -> np.ndarray:
  """A saturating int32 counter started at ``start`` after each step's increment."""
  return np.minimum(start + np.cumsum(np.asarray(increments, np.int64)), INT_MAX)


def _global_norms(tree) -> np.ndarray:
  """Per-step global L2 norms (float64) of a tree with a leading step axis."""
  leaves = [as64(x).reshape(x.shape[0], -1) for x in jax.tree_util.tree_leaves(tree)]
  flat = np.concatenate(leaves, axis=1)
  with np.errstate(over="ignore", invalid="ignore"):
    return np.linalg.norm(flat, axis=1)


# ----------------------------------------------------------------------------- fault loop
SEEDS = (0, 1, 2)  # looped inside one test per case: one compile per transformation


@pytest.mark.parametrize("case", CLIPPERS, ids=str)
def test_faults_in_a_jitted_scan(case):
  init, run = _runner(case)
  params0 = _params0()
  for seed in SEEDS:
    kinds = fault_kinds(case, seed)
    grads = fault_grads(kinds, seed)
    for start in (0, NEAR_MAX):
      state0 = _start_counters_at(init(params0), start)
      params, out, states, m, ok, zero = run(grads, params0, state0)[1]
      _check_fault_run(case, kinds, grads, start, f"{case} seed {seed} start {start}",
                       params, out, states, m, np.asarray(ok), np.asarray(zero))


def _check_fault_run(case, kinds, grads, start, where, params, out, states, m, ok, zero):
  nonfinite = np.array([k in NONFINITE for k in kinds])
  huge = np.array([k == "1e30" for k in kinds])
  counted = _skipped_by_rule(case, kinds)
  assert nonfinite[:5].any() and huge[:5].any()

  # Parameters and every statistic finite at every step; no NaN threshold.
  assert ok.all(), f"{where}: from step {np.flatnonzero(~ok)[0]}: {_offenders(states)}"
  for leaf in jax.tree_util.tree_leaves(params):
    assert np.all(np.isfinite(as64(leaf))), where

  # Every event counted exactly (and saturating from NEAR_MAX).
  np.testing.assert_array_equal(
      np.asarray(_metric(m, "nonfinite_count")), _saturating(start, counted), err_msg=where)
  np.testing.assert_array_equal(
      np.asarray(_metric(m, "invalid_count")), np.full(STEPS, start), err_msg=where)
  seen = _saturating(start, np.ones(STEPS))
  count = np.asarray(_metric(m, "count"))
  if start == 0:
    np.testing.assert_array_equal(count, seen, err_msg=where)
  else:  # spam's count adds the skipped steps to Adam's step count (itself started at start)
    assert np.all(count >= seen) and count[-1] == INT_MAX, where
  for flag, counter in [("clipped", "clipped_count"), ("skipped", "skipped_count")]:
    if _metric(m, flag) is not None:
      flags = np.asarray(_metric(m, flag))
      np.testing.assert_array_equal(
          np.asarray(_metric(m, counter)), _saturating(start, flags), err_msg=f"{where} {flag}")
      if flag == "skipped":
        assert flags[counted].all(), f"{where}: a non-finite step was not skipped"
      else:
        assert not flags[counted].any(), f"{where}: a non-finite step counted as clipped"

  # Non-finite steps give all-zero updates; other steps are never zeroed unless skipped.
  assert zero[counted].all(), f"{where}: non-zero update at {np.flatnonzero(counted & ~zero)}"
  skipped = _metric(m, "skipped")
  skipped = np.zeros(STEPS, bool) if skipped is None else np.asarray(skipped)
  clean = ~counted
  np.testing.assert_array_equal(zero[clean], skipped[clean], err_msg=where)
  for leaf in jax.tree_util.tree_leaves(out):
    finite = np.isfinite(as64(leaf)).reshape(STEPS, -1).all(axis=1)
    assert finite[clean].all(), f"{where}: non-finite output at {np.flatnonzero(clean & ~finite)}"

  # A clipper never enlarges an update, and a finite 1e30 step is clipped to no more than the
  # largest ordinary gradient (except where the statistic has nothing to compare it with yet).
  if case.kind == "clip":
    in_norms, out_norms = _global_norms(grads), _global_norms(out)
    assert np.all(out_norms[clean] <= in_norms[clean] * (1 + 1e-6)), where
    checked = huge.copy()
    if case.name in HUGE_MAY_PASS_IN_WARMUP:
      checked[:5] = False
    assert np.asarray(_metric(m, "clipped"))[checked].all(), where
    ordinary = np.max(in_norms[~huge & ~nonfinite])
    assert np.all(out_norms[checked] <= ordinary), f"{where}: {out_norms[checked]}"

  # The faults placed at and after each momentum reset did land there.
  resets = _reset_steps(case, kinds)
  if "reset_interval" in _kwargs(case):
    assert len(resets) >= 2, where
  for t in resets:
    since_reset = np.asarray(states[1].since_reset)
    assert since_reset[t] == 0 and since_reset[t - 1] != 0, f"{where}: no reset at step {t}"


# ----------------------------------------------------------------------------- soak
SOAK = 100_000
SHIFT = SOAK // 2
LEVEL = 10.0

# What each adaptive threshold does after a permanent 10x rise of the norms, by its documented
# rule. The default (any case not listed that reports a threshold) is to follow the new level.
AFTER_SHIFT = {
    # the EMAs only ever see the clipped norm (mu + z_thr^2 sigma / z in the default
    # "reciprocal" mode): every step above the old band is clipped back into it, sigma shrinks,
    # the threshold stays at the old level and every later update is clipped to about the old
    # mean norm
    "zclip": "stays",
    "zclip_leaf_metrics": "stays",
}


@functools.cache
def soak_stream():
  """Log-normal norms around 0.02 (below every fixed cap in the table), 1% heavy-tailed
  (Pareto) spikes of 10x and more, x10 from step ``SHIFT`` on, 40 NaN and 20 +-Inf steps.
  Returns ``(grads {"w": [SOAK, 4]}, kinds)``."""
  rng = np.random.default_rng(2024)
  norms = 0.02 * np.exp(0.3 * rng.standard_normal(SOAK))
  spike = rng.random(SOAK) < 0.01
  norms[spike] *= 10 + 10 * rng.pareto(1.0, spike.sum())
  norms[SHIFT:] *= LEVEL
  u = rng.standard_normal((SOAK, 4))
  g = norms[:, None] * u / np.linalg.norm(u, axis=1, keepdims=True)
  bad = rng.choice(SOAK, 60, replace=False)
  kinds: list[str | None] = [None] * SOAK
  for i, t in enumerate(bad):
    kinds[t] = "nan" if i < 40 else ("+inf" if i % 2 else "-inf")
    g[t, rng.integers(4)] = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}[kinds[t]]
  return {"w": jnp.asarray(g, jnp.float32)}, kinds


@pytest.mark.parametrize("case", CLIPPERS, ids=str)
def test_soak_hundred_thousand_steps_with_spikes_and_a_level_shift(case):
  grads, kinds = soak_stream()
  counted = _skipped_by_rule(case, kinds)
  params0 = {"w": jnp.asarray([0.5, -0.3, 0.2, 0.1], jnp.float32)}
  init, run = _runner(case, steps_out=False)
  (params, _), (m, ok, zero) = run(grads, params0, init(params0))
  ok, zero = np.asarray(ok), np.asarray(zero)
  assert ok.all(), f"{case}: non-finite params/statistic from step {np.flatnonzero(~ok)[:1]}"
  assert np.all(np.isfinite(as64(params["w"])))
  assert int(np.asarray(_metric(m, "nonfinite_count"))[-1]) == counted.sum() == 60
  assert int(np.asarray(_metric(m, "count"))[-1]) == SOAK
  assert int(np.asarray(_metric(m, "invalid_count"))[-1]) == 0
  assert zero[counted].all()
  skipped = _metric(m, "skipped")
  skipped = np.zeros(SOAK, bool) if skipped is None else np.asarray(skipped)
  np.testing.assert_array_equal(zero[~counted], skipped[~counted], err_msg=str(case))
  for flag, counter in [("clipped", "clipped_count"), ("skipped", "skipped_count")]:
    if _metric(m, flag) is not None:
      assert int(np.asarray(_metric(m, counter))[-1]) == int(np.asarray(_metric(m, flag)).sum())

  threshold = _metric(m, "threshold")
  learned = _metric(m, "observed") is not None or _metric(m, "spike_count") is not None
  if threshold is None or not learned:  # a fixed clipper's threshold has no trend to follow
    return
  threshold = as64(threshold)
  before = np.median(threshold[SHIFT - 10_000:SHIFT])
  after = np.median(threshold[-10_000:])
  assert np.isfinite(before) and np.isfinite(after), case
  expected = AFTER_SHIFT.get(case.name, "follows")
  if expected == "follows":
    assert LEVEL / 3 < after / before < LEVEL * 3, (case.name, before, after)
  elif expected == "stays":
    assert after / before < 2, (case.name, before, after)
    assert np.asarray(_metric(m, "clipped"))[-10_000:].mean() > 0.99
  if case.name == "skip_spikes":
    # a spike is recorded bounded to the band it broke: the rise is followed within about
    # window / 2 steps, it does not stop training
    rate_before = skipped[1_000:SHIFT].mean()
    assert skipped[SHIFT + 1_000:].mean() < 2 * rate_before + 0.01, (case.name, rate_before)
