"""clipax.diagnose and clipax.suggest_max_norm: verdicts from metrics, histories and states."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _keys import field

import clipax


def _run(tx: optax.GradientTransformation, grads: list[float]):
  """Runs ``tx`` (jitted) on one-leaf gradients of norm ``|g| * sqrt(3)`` for each ``g``; returns
  the final state and the per-step metrics."""
  params = {"w": jnp.zeros(3, jnp.float32)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  history = []
  for g in grads:
    _, state = update({"w": jnp.full(3, g, jnp.float32)}, state, params)
    history.append(clipax.metrics(state))
  return state, history


def _sgd(clipper: optax.GradientTransformation) -> optax.GradientTransformation:
  return optax.chain(clipper, optax.sgd(0.1))


def test_clipping_every_step_is_clipping_often_from_state_dict_and_history():
  state, history = _run(_sgd(clipax.clip_by_global_norm(1.0)), [2.0] * 5)
  for source in (state, clipax.metrics(state), history):
    verdict = clipax.diagnose(source)
    assert verdict.status == "clipping_often"
    assert verdict.clip_rate == 1.0
    assert verdict.steps == 5
    assert not verdict.healthy
    assert "learning rate" in verdict.advice
  np.testing.assert_allclose(verdict.last_norm, 2.0 * np.sqrt(3), rtol=1e-6)


def test_recent_window_of_a_history_decides():
  # 150 quiet steps then 60 clipped ones: 29% clipped overall, 60% of the last 100 steps.
  _, history = _run(_sgd(clipax.clip_by_global_norm(1.0)), [0.1] * 150 + [2.0] * 60)
  recent = clipax.diagnose(history, window=100)
  assert recent.status == "clipping_often"
  assert recent.window == 100
  np.testing.assert_allclose(recent.clip_rate, 0.6)
  overall = clipax.diagnose(history[-1])  # totals only: the whole run
  assert overall.status == "healthy"
  np.testing.assert_allclose(overall.clip_rate, 60 / 210)
  assert overall.window == overall.steps == 210


def test_history_as_dict_of_stacked_arrays():
  _, history = _run(_sgd(clipax.clip_by_global_norm(1.0)), [0.1] * 20 + [2.0] * 10)
  stacked = {k: np.stack([np.asarray(h[k]) for h in history]) for k in history[0]}
  verdict = clipax.diagnose(stacked, window=10)
  assert verdict.status == "clipping_often"
  np.testing.assert_allclose(verdict.clip_rate, 1.0)
  assert clipax.diagnose(stacked, window=30).status == "healthy"


def test_never_clipping_needs_min_steps():
  state, _ = _run(_sgd(clipax.clip_by_global_norm(10.0)), [0.1] * 120)
  verdict = clipax.diagnose(state)
  assert verdict.status == "never_clipping"
  assert verdict.clip_rate == 0.0
  assert "catches nothing" in verdict.advice
  assert clipax.diagnose(state, min_steps=121).status == "healthy"


def test_clipped_before_the_window_is_not_never_clipping():
  _, history = _run(_sgd(clipax.clip_by_global_norm(1.0)), [2.0] * 5 + [0.1] * 200)
  verdict = clipax.diagnose(history, window=100)
  assert verdict.clip_rate == 0.0
  assert verdict.status == "healthy"
  assert "earlier outliers" in verdict.advice
  assert not verdict.guard


def test_a_sizeable_share_below_the_limit_is_healthy_with_a_note():
  _, history = _run(_sgd(clipax.clip_by_global_norm(1.0)), [0.1, 0.1, 2.0] * 40)
  verdict = clipax.diagnose(history, window=90)
  np.testing.assert_allclose(verdict.clip_rate, 1 / 3)
  assert verdict.status == "healthy"
  assert "sizeable share" in verdict.advice


def test_occasional_clipping_is_healthy():
  grads = [0.1] * 99 + [5.0]
  verdict = clipax.diagnose(_run(_sgd(clipax.clip_by_global_norm(1.0)), grads)[0])
  assert verdict.status == "healthy"
  assert verdict.healthy
  np.testing.assert_allclose(verdict.clip_rate, 0.01)


def test_nonfinite_wins_over_everything():
  state, history = _run(_sgd(clipax.clip_by_global_norm(1.0)), [2.0] * 3 + [np.inf] + [2.0])
  verdict = clipax.diagnose(state)
  assert verdict.status == "nonfinite"
  assert verdict.nonfinite_count == 1
  assert clipax.diagnose(history).status == "nonfinite"


def test_several_clippers_most_severe_reported():
  # The first clipper never fires; the second clips every step.
  tx = optax.chain(clipax.clip_by_global_norm(100.0), clipax.clip_by_value(0.5), optax.sgd(0.1))
  state, _ = _run(tx, [2.0] * 4)
  verdict = clipax.diagnose(state, min_steps=1)
  assert verdict.status == "clipping_often"
  assert verdict.source == "clip/value"


def test_skip_guard_skip_rate_counts():
  tx = clipax.skip_spikes(optax.sgd(0.1), window=8, threshold=3.0, warmup=4)
  grads = [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 50.0, 1.0]
  _, history = _run(tx, grads)
  verdict = clipax.diagnose(history, clip_rate_high=0.1, min_steps=1)
  np.testing.assert_allclose(verdict.skip_rate, 1 / 8)
  assert verdict.status == "clipping_often"
  assert verdict.guard
  assert "skipped 12.5% of 8 steps" in str(verdict) and "clipped" not in str(verdict)


def test_str_reads_as_one_line_with_the_numbers():
  state, _ = _run(_sgd(clipax.clip_by_global_norm(1.0)), [2.0] * 4)
  text = str(clipax.diagnose(state))
  assert "\n" not in text
  assert text.startswith("[clipping_often] clip/global_norm:")
  assert "clipped 100.0% of 4 steps" in text
  assert "last norm 3.464" in text


def test_verdict_is_frozen():
  verdict = clipax.diagnose({"clip/count": 3, "clip/clipped_count": 0})
  with pytest.raises(dataclasses.FrozenInstanceError):
    verdict.status = "healthy"  # type: ignore[misc]


def test_adaptive_threshold_is_reported():
  state, _ = _run(_sgd(clipax.zclip(warmup_steps=2, max_norm=None)), [1.0, 1.2, 1.1, 0.9])
  verdict = clipax.diagnose(state)
  assert verdict.threshold is not None
  np.testing.assert_allclose(verdict.threshold, float(field(clipax.metrics(state), "threshold")))


@pytest.mark.parametrize(
    "kwargs", [{"window": 0}, {"clip_rate_high": 0.0}, {"clip_rate_high": 1.5}, {"min_steps": -1}]
)
def test_diagnose_rejects_bad_arguments(kwargs):
  name = next(iter(kwargs))
  with pytest.raises(ValueError, match=name):
    clipax.diagnose({"clip/count": 3}, **kwargs)


def test_diagnose_rejects_states_without_clipax():
  params = {"w": jnp.zeros(2)}
  with pytest.raises(ValueError, match="no clipax state"):
    clipax.diagnose(optax.adam(1e-3).init(params))


def test_suggest_max_norm_matches_numpy_rule():
  rng = np.random.default_rng(0)
  norms = rng.lognormal(0.0, 0.3, size=3000)
  expected = 1.2 * np.percentile(norms[-1000:], 95.0)
  np.testing.assert_allclose(clipax.suggest_max_norm(norms), expected, rtol=1e-12)
  expected = 1.5 * np.percentile(norms, 99.0)
  got = clipax.suggest_max_norm(list(norms), percentile=99.0, margin=1.5, window=None)
  np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_suggest_max_norm_clips_only_outliers_and_ignores_nonfinite():
  rng = np.random.default_rng(1)
  norms = rng.uniform(1.0, 2.0, size=500)
  norms[::50] = 40.0  # rare spikes: 2% of the steps
  with_nan = np.concatenate([norms, [np.nan, np.inf]])
  c = clipax.suggest_max_norm(with_nan, ignore_nonfinite=True)
  assert 2.0 < c < 40.0
  assert np.mean(norms > c) == pytest.approx(0.02)
  assert isinstance(c, float)


def test_suggest_max_norm_from_jax_array_of_logged_norms():
  _, history = _run(_sgd(clipax.clip_by_global_norm(1.0)), list(np.linspace(0.5, 1.5, 40)))
  norms = jnp.stack([field(h, "norm") for h in history])
  expected = 1.2 * np.percentile(np.asarray(norms, np.float64), 95.0)
  np.testing.assert_allclose(clipax.suggest_max_norm(norms), expected, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [{"percentile": 0.0}, {"percentile": 101.0}, {"margin": 0.5}, {"window": 0},
     {"margin": float("nan")}],
)
def test_suggest_max_norm_rejects_bad_arguments(kwargs):
  name = next(iter(kwargs))
  with pytest.raises(ValueError, match=name):
    clipax.suggest_max_norm([1.0, 2.0], **kwargs)


def test_suggest_max_norm_needs_a_finite_norm():
  with pytest.raises(ValueError, match="no finite"):
    clipax.suggest_max_norm([np.nan, np.inf], ignore_nonfinite=True)


# --- issue 12: spikes let through, poisoned statistics, recent non-finite, advice, bad input ---


def _history(norms, clipped=None, **extra):
  """Per-step metrics of a fixed clipper (``extra``: more per-step fields, e.g. ``threshold``)."""
  clipped = [False] * len(norms) if clipped is None else clipped
  out, total = [], 0
  for i, (n, c) in enumerate(zip(norms, clipped, strict=True)):
    total += int(c)
    m = {"clip/norm": n, "clip/clipped": c, "clip/clipped_count": total,
         "clip/nonfinite_count": 0, "clip/count": i + 1}
    m.update({f"clip/{k}": v[i] for k, v in extra.items()})
    out.append(m)
  return out


def _reference_spikes(norms, acted, window, factor):
  """The documented rule, written out in float64 numpy: a norm over ``factor`` times the median
  of the finite norms of the ``window`` entries before it (>= 3 of them) and over ``factor``
  1.4826-scaled MADs above it, that nothing clipped or skipped; checked over the last
  ``window`` entries."""
  x = np.asarray(norms, np.float64)
  found = []
  for i in range(max(0, x.size - window), x.size):
    prev = x[max(0, i - window):i]
    prev = prev[np.isfinite(prev)]
    if acted[i] or not np.isfinite(x[i]) or prev.size < 3:
      continue
    med = np.median(prev)
    mad = 1.4826 * np.median(np.abs(prev - med))
    if med > 0 and x[i] > factor * med and x[i] > med + factor * mad:
      found.append(i)
  return tuple(found)


def test_a_spike_through_a_loose_fixed_threshold_is_unclipped_spikes():
  rng = np.random.default_rng(3)
  grads = list(rng.uniform(0.9, 1.1, 150))
  grads[60] = 50.0  # 50x the typical step, under the 100 / sqrt(3) threshold
  _, history = _run(_sgd(clipax.clip_by_global_norm(100.0)), grads)
  verdict = clipax.diagnose(history, window=150)
  assert verdict.status == "unclipped_spikes"
  assert verdict.spike_steps == (60,)
  assert verdict.kind == "fixed"
  assert "lower it" in verdict.advice and "[60]" in verdict.advice
  assert "1 unclipped spikes at history steps [60]" in str(verdict)
  # A threshold that catches it: clipped, so not a spike that went through.
  _, history = _run(_sgd(clipax.clip_by_global_norm(5.0)), grads)
  caught = clipax.diagnose(history, window=150)
  assert caught.status == "healthy" and caught.spike_steps == ()
  # Outside the window: no longer recent.
  assert clipax.diagnose(history[:61] + history[61:] , window=50).spike_steps == ()


def test_unclipped_spikes_match_the_median_mad_rule():
  rng = np.random.default_rng(4)
  norms = rng.lognormal(0.0, 0.8, size=400)
  norms[[7, 50, 51, 200, 333]] *= [40.0, 30.0, 30.0, 12.0, 80.0]
  clipped = rng.uniform(size=400) < 0.05
  clipped[333] = True  # clipped: not a spike that went through
  history = _history(list(norms), list(clipped))
  for window, factor in [(400, 10.0), (100, 10.0), (400, 5.0), (30, 20.0)]:
    verdict = clipax.diagnose(history, window=window, spike_factor=factor)
    assert verdict.spike_steps == _reference_spikes(norms, clipped, window, factor)
  assert 200 in clipax.diagnose(history, window=400, spike_factor=5.0).spike_steps
  assert {50, 51} <= set(clipax.diagnose(history, window=400).spike_steps)


def test_spike_needs_both_the_ratio_and_the_spread():
  # preceding norms: median 5, 1.4826 * MAD = 5.93; 10x the median is 50, median + 10 spreads 64.3
  base = [30.0, 1.0, 5.0, 30.0, 1.0, 5.0, 30.0, 1.0, 30.0, 1.0, 1.0]
  assert clipax.diagnose(_history(base + [60.0])).spike_steps == ()
  assert clipax.diagnose(_history(base + [70.0])).spike_steps == (11,)
  # fewer than 3 norms before it: no running level yet
  assert clipax.diagnose(_history([1.0, 1.0, 500.0])).spike_steps == ()
  assert clipax.diagnose(_history([1.0, 1.0, 1.0, 500.0])).spike_steps == (3,)


def test_unclipped_spikes_rank_above_clipping_often():
  norms = [2.0] * 20 + [400.0]
  clipped = [True] * 20 + [False]
  verdict = clipax.diagnose(_history(norms, clipped, threshold=[1.0] * 21))
  assert verdict.clip_rate >= 0.5
  assert verdict.status == "unclipped_spikes" and verdict.spike_steps == (20,)
  assert verdict.kind == "adaptive" and "learned threshold" in verdict.advice


def test_a_spike_clipped_inside_a_guard_is_not_unclipped():
  grads = [1.0] * 30 + [60.0] + [1.0] * 5
  clipped = clipax.skip_nonfinite(optax.chain(clipax.clip_by_global_norm(5.0), optax.sgd(0.1)))
  _, history = _run(clipped, grads)
  assert clipax.diagnose(history, min_steps=1).spike_steps == ()
  _, history = _run(clipax.skip_nonfinite(optax.sgd(0.1)), grads)
  verdict = clipax.diagnose(history, min_steps=1)
  assert verdict.status == "unclipped_spikes" and verdict.spike_steps == (30,)
  assert verdict.kind == "guard" and "skip_nonfinite only skips" in verdict.advice


def _spiky_guard_history(steps=150):
  """The skip_spikes metrics of issue 12: norms ~1, two 200x spikes let through during warm-up
  (steps 5 and 9), then a threshold poisoned to 846 (``inf`` while warming up)."""
  rng = np.random.default_rng(0)
  norms = rng.uniform(0.9, 1.1, steps)
  norms[[5, 9]] = 200.0
  return [
      {"clip/norm": norms[i], "clip/skipped": False, "clip/skip_rate": 0.0,
       "clip/skipped_count": 0, "clip/nonfinite_count": 0, "clip/count": i + 1,
       "clip/spike_count": 0, "clip/threshold": np.inf if i < 16 else 846.0}
      for i in range(steps)
  ]


def test_skip_spikes_poisoned_by_early_spikes_is_flagged():
  history = _spiky_guard_history()
  verdict = clipax.diagnose(history, window=150)
  assert verdict.status == "poisoned_threshold"
  assert verdict.spike_steps == (5, 9)
  assert verdict.kind == "guard" and "clip before the guard" in verdict.advice
  assert "846, " in verdict.advice and "x the median norm" in verdict.advice
  assert clipax.diagnose(history[-1]).status == "poisoned_threshold"  # totals only
  # Too early to call (warm-up caps may be far above the norms): the spikes still show.
  assert clipax.diagnose(history, window=150, min_steps=200).status == "unclipped_spikes"
  loose = clipax.diagnose(history, window=150, threshold_factor=1000.0)
  assert loose.status == "unclipped_spikes"


def test_real_guard_run_reports_its_threshold_and_kind():
  rng = np.random.default_rng(0)
  grads = list(rng.uniform(0.9, 1.1, 40))
  _, history = _run(clipax.skip_spikes(optax.sgd(0.1), window=16, threshold=3.0), grads)
  verdict = clipax.diagnose(history, min_steps=1)
  assert verdict.kind == "guard" and verdict.guard
  np.testing.assert_allclose(verdict.threshold, float(field(history[-1], "threshold")))


def test_nonfinite_or_overflowed_threshold_is_poisoned():
  norms = [1.0] * 10
  nan = clipax.diagnose(_history(norms, threshold=[2.0] * 9 + [np.nan]), min_steps=1000)
  assert nan.status == "poisoned_threshold" and "nan" in nan.advice
  assert "max_norm" in nan.advice
  overflow = clipax.diagnose(_history(norms, threshold=[2.0] * 9 + [np.inf]), min_steps=1000)
  assert overflow.status == "poisoned_threshold" and "inf after having been finite" in (
      overflow.advice)
  # inf from the start is a threshold still warming up, not a poisoned one
  warming = clipax.diagnose(_history(norms, threshold=[np.inf] * 10), min_steps=5)
  assert warming.status == "never_clipping"
  fine = clipax.diagnose(_history(norms, threshold=[9.0] * 10), min_steps=5)
  assert fine.status == "never_clipping"
  far = clipax.diagnose(_history(norms, threshold=[11.0] * 10), min_steps=5)
  assert far.status == "poisoned_threshold"


def test_old_nonfinite_steps_do_not_make_a_recent_verdict():
  state, history = _run(_sgd(clipax.clip_by_global_norm(1.0)), [0.1] * 3 + [np.inf] + [0.1] * 200)
  verdict = clipax.diagnose(history, window=100)
  assert verdict.status != "nonfinite"
  assert verdict.nonfinite_count == 1 and verdict.recent_nonfinite == 0
  assert "1 non-finite steps earlier in the run" in verdict.advice
  assert "1 non-finite (0 recent)" in str(verdict)
  # a history that starts after the non-finite step
  assert clipax.diagnose(history[50:], window=100).status != "nonfinite"
  # totals only: the window is the whole run
  assert clipax.diagnose(state).status == "nonfinite"
  recent = clipax.diagnose(history[:60], window=100)
  assert recent.status == "nonfinite" and recent.recent_nonfinite == 1
  # the non-finite step is the first entry of a history that starts mid-run
  assert clipax.diagnose(history[3:30]).status == "nonfinite"
  assert clipax.diagnose(history[4:30]).status != "nonfinite"


def test_invalid_hyperparameter_counts_recently():
  history = _history([1.0] * 10, invalid_count=[0] * 8 + [1, 2])
  verdict = clipax.diagnose(history, min_steps=1)
  assert verdict.status == "invalid_hyperparameter" and verdict.invalid_count == 2
  old = _history([1.0] * 10, invalid_count=[1] * 10)
  assert clipax.diagnose(old[5:], min_steps=1).status == "never_clipping"


def test_advice_fits_the_clipper_that_was_read():
  rng = np.random.default_rng(5)
  grads = list(rng.uniform(0.5, 1.5, 120))
  _, fixed = _run(_sgd(clipax.clip_by_global_norm(2.1)), grads)
  fixed_verdict = clipax.diagnose(fixed)
  assert fixed_verdict.kind == "fixed" and "sizeable share" in fixed_verdict.advice
  assert "percentile" not in fixed_verdict.advice
  _, auto = _run(_sgd(clipax.autoclip(percentile=70.0)), grads)
  auto_verdict = clipax.diagnose(auto)
  assert auto_verdict.kind == "adaptive" and "percentile rules" in auto_verdict.advice
  _, guard = _run(clipax.skip_nonfinite(optax.sgd(0.1)), [1.0] * 120)
  guard_verdict = clipax.diagnose(guard)
  assert guard_verdict.status == "never_clipping" and guard_verdict.kind == "guard"
  assert "guard has skipped nothing" in guard_verdict.advice
  _, spam = _run(clipax.spam(1e-3), [1.0] * 120)
  spam_verdict = clipax.diagnose(spam)
  assert spam_verdict.kind == "spam" and "SpAM" in spam_verdict.advice
  # spam logs only its last step's spikes: totals cannot tell that it never clipped
  assert clipax.diagnose(spam[-1]).status == "healthy"


def test_suggest_max_norm_ignore_nonfinite_matches_numpy():
  norms = [1.0, np.nan, 3.0, np.inf, 2.0, 5.0]
  expected = 1.2 * np.percentile([3.0, 2.0, 5.0], 95.0)
  got = clipax.suggest_max_norm(norms, window=4, ignore_nonfinite=True)
  np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.parametrize(
    ("norms", "match"),
    [([1.0, -2.0], r"norms\[1\]` must be >= 0.*-2"), ([1.0, np.nan], r"norms\[1\]` is nan"),
     ([np.inf, 1.0], r"norms\[0\]` is inf"), ([], "`norms` is empty"),
     (np.ones((2, 2)) * [[1, 1], [1, -1]], r"norms\[\(1, 1\)\]"),
     ([1.0, -np.inf], r"norms\[1\]` must be >= 0")],
)
def test_suggest_max_norm_rejects_bad_norms(norms, match):
  with pytest.raises(ValueError, match=match):
    clipax.suggest_max_norm(norms)


@pytest.mark.parametrize(
    ("norms", "match"),
    [(["1.0"], r"norms\[0\]"), ([1.0, None], r"norms\[1\]` must be a number.*None"),
     ([True, False], r"norms\[0\]"), ("12", "norms"), (None, "norms"),
     ([[1.0, 2.0], [3.0]], "norms"), ({"a": 1.0}, "norms")],
)
def test_suggest_max_norm_rejects_non_numeric_norms(norms, match):
  with pytest.raises(TypeError, match=match):
    clipax.suggest_max_norm(norms)


def test_suggest_max_norm_rejects_bad_options():
  with pytest.raises(ValueError, match="window"):
    clipax.suggest_max_norm([1.0], window=2**31)
  with pytest.raises(TypeError, match="window"):
    clipax.suggest_max_norm([1.0], window=2.5)
  with pytest.raises(TypeError, match="ignore_nonfinite"):
    clipax.suggest_max_norm([1.0], ignore_nonfinite="yes")
  assert clipax.suggest_max_norm([1.0], window=2**31 - 1) == pytest.approx(1.2)


def test_diagnose_rejects_histories_with_mismatched_keys():
  history = _history([1.0] * 5)
  missing = [dict(m) for m in history]
  del missing[3]["clip/norm"]
  with pytest.raises(ValueError, match=r"metrics_or_state\[3\]` misses key 'clip/norm'"):
    clipax.diagnose(missing)
  extra = [dict(m) for m in history]
  extra[2]["clip/threshold"] = 1.0
  with pytest.raises(ValueError, match=r"\[2\]` has key 'clip/threshold'"):
    clipax.diagnose(extra)
  with pytest.raises(TypeError, match=r"\[1\]` must be a metrics dict"):
    clipax.diagnose([history[0], 3.0])
  bad_value = [dict(m) for m in history]
  bad_value[4]["clip/norm"] = "big"
  with pytest.raises(TypeError, match=r"\[4\]` key 'clip/norm'"):
    clipax.diagnose(bad_value)
  stacked = {k: np.asarray([m[k] for m in history]) for k in history[0]}
  stacked["clip/norm"] = stacked["clip/norm"][:3]
  with pytest.raises(ValueError, match="has 5 steps, key 'clip/norm' 3"):
    clipax.diagnose(stacked)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [({"spike_factor": 1.0}, ValueError), ({"spike_factor": float("nan")}, ValueError),
     ({"threshold_factor": 0.5}, ValueError), ({"window": 2**31}, ValueError),
     ({"min_steps": 2**31}, ValueError), ({"window": 1.5}, TypeError), ({"prefix": 3}, TypeError)],
)
def test_diagnose_rejects_bad_options(kwargs, error):
  with pytest.raises(error, match=next(iter(kwargs))):
    clipax.diagnose({"clip/count": 3}, **kwargs)
