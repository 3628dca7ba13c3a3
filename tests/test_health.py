"""clipax.diagnose and clipax.suggest_max_norm: verdicts from metrics, histories and states."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

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
  assert verdict.source == "clip/1"


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
  assert text.startswith("[clipping_often] clip:")
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
  np.testing.assert_allclose(verdict.threshold, float(clipax.metrics(state)["clip/threshold"]))


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
  c = clipax.suggest_max_norm(with_nan)
  assert 2.0 < c < 40.0
  assert np.mean(norms > c) == pytest.approx(0.02)
  assert isinstance(c, float)


def test_suggest_max_norm_from_jax_array_of_logged_norms():
  _, history = _run(_sgd(clipax.clip_by_global_norm(1.0)), list(np.linspace(0.5, 1.5, 40)))
  norms = jnp.stack([h["clip/norm"] for h in history])
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
    clipax.suggest_max_norm([np.nan, np.inf])
