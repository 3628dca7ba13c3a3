"""The demo experiments (small mode), the imbalance bands over seeds 0-9, and the command line.

The whole demo runs once, in quick mode, through ``clipax.__main__.main`` (the module-scoped
``demo`` fixture); the tests below read its JSON files and what its figures were drawn with
(recorded as each PNG is saved). The imbalance bands run the full-size experiment, vmapped over
seeds and arms (seconds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clipax import __main__ as cli
from clipax.experiments import _common, cliff, imbalance, spiky_lm

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
  """``clipax demo --quick`` (no experiment named: all of them) into a temporary folder; the
  matplotlib figure behind each PNG is kept (closed, after it was drawn) under ``figures``."""
  out = tmp_path_factory.mktemp("demo")
  stdout = io.StringIO()
  figures = {}
  save = _common.save

  def recording_save(fig, out_dir, name):
    path = save(fig, out_dir, name)
    figures[name] = fig
    return path

  with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
    mp.setattr(_common, "save", recording_save)
    status = cli.main(["--quick", "--out", str(out), "--no-progress"])
  results = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
  return {"status": status, "out": out, "stdout": stdout.getvalue(), "results": results,
          "figures": figures}


# --- command line ---------------------------------------------------------------------------------


def test_demo_writes_tables_plots_and_json(demo):
  assert demo["status"] == 0
  assert set(demo["results"]) == {"imbalance", "cliff", "spiky_lm"}
  for name in ("imbalance", "cliff", "spiky-lm"):
    assert f"## {name}" in demo["stdout"]
  separators = [line for line in demo["stdout"].splitlines() if line.startswith("|---")]
  assert len(separators) == 3  # one markdown table per experiment
  pngs = sorted(p.name for p in demo["out"].glob("*.png"))
  assert pngs == [
      "cliff.png", "imbalance_effective_dim.png", "imbalance_weight_norm.png", "spiky_lm.png",
      "value_vs_norm.png",
  ]
  assert sorted(demo["figures"]) == pngs
  for png in demo["out"].glob("*.png"):
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  for path in demo["out"].glob("*.json"):  # strict JSON: no NaN or Infinity
    json.loads(path.read_text(), parse_constant=_reject_constant)


def _reject_constant(name: str):
  pytest.fail(f"non-finite number {name} in the JSON")


def _is_number(text: str) -> bool:
  try:
    float(text.replace("\N{MINUS SIGN}", "-"))
  except ValueError:
    return False
  return True


def test_every_demo_figure_reads_at_a_glance(demo):
  for name, fig in demo["figures"].items():
    assert len(fig.get_suptitle()) > 40, (name, "a one-line takeaway as the title")
    assert fig.legends, (name, "a figure legend")
    for ax in fig.axes:
      assert ax.get_legend() is None, (name, "legends sit outside the axes, off the data")
      if ax.get_label() == "<colorbar>":
        assert "loss" in ax.get_ylabel(), name
        continue
      spec = ax.get_subplotspec()
      ticks = [t.get_text() for t in ax.get_yticklabels() + ax.get_xticklabels()]
      assert not any("$" in t or "^" in t for t in ticks), (name, "plain tick labels", ticks)
      if spec.is_last_row():
        assert ax.get_xlabel(), (name, "x label")
      numeric = all(_is_number(t.get_text()) for t in ax.get_yticklabels() if t.get_text())
      if spec.is_first_col() and numeric:
        assert ax.get_ylabel(), (name, "y label")


def test_spiky_lm_figure_shows_every_arm_and_its_events(demo):
  fig = demo["figures"]["spiky_lm.png"]
  result = demo["results"]["spiky_lm"]
  loss_ax, _, events_ax = fig.axes
  lines = {line.get_label(): line for line in loss_ax.get_lines()}
  styles = {(lines[arm].get_linestyle(), lines[arm].get_marker()) for arm in result["arms"]}
  assert len(styles) == len(result["arms"]), "a distinct dash pattern or marker per arm"
  triangles = [line for line in loss_ax.get_lines() if line.get_marker() == "v"]
  assert len(triangles) == sum(r["spikes"] for r in result["results"].values()) > 0
  ticks = [mark for mark in events_ax.get_lines() if mark.get_marker() == "|"]
  assert ticks and all(mark.get_markersize() >= 8 for mark in ticks)
  assert [t.get_text() for t in events_ax.get_yticklabels()] == result["arms"][:0:-1]


def test_imbalance_effective_dim_figure_is_defined_and_not_zoomed(demo):
  fig = demo["figures"]["imbalance_effective_dim.png"]
  top = min(imbalance.Config().n_tokens - 1, imbalance.Config().dim)
  assert "exp(entropy" in fig.axes[0].get_ylabel()
  limits = {ax.get_ylim() for ax in fig.axes}
  assert len(limits) == 1, "one shared y axis"
  low, high = limits.pop()
  assert high - low >= 0.2 * top and high >= top


def test_cliff_figures(demo):
  config = cliff.Config.quick()
  fig = demo["figures"]["cliff.png"]
  assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)
  surface = fig.axes[0]
  starts = [line for line in surface.get_lines()
            if line.get_markersize() >= 10 and tuple(line.get_xydata()[0]) == config.start]
  assert starts, "a large start marker"
  ex = demo["results"]["cliff"]["value_vs_norm"]
  fig = demo["figures"]["value_vs_norm.png"]
  assert f"{ex['angle_deg']:.1f} degrees" in fig.get_suptitle()
  for ax in fig.axes:
    assert ax.get_aspect() == 1.0
    kinds = {type(patch).__name__: patch for patch in ax.patches}
    assert kinds["Circle"].get_radius() == config.max_norm
    assert kinds["Rectangle"].get_width() == 2 * config.max_value


def test_demo_quick_uses_quick_configs(demo):
  for module in (imbalance, cliff, spiky_lm):
    result = demo["results"][module.__name__.rsplit(".", 1)[-1]]
    assert result["config"] == json.loads(json.dumps(dataclasses.asdict(module.Config.quick())))


def test_module_entry_point_runs_one_experiment(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, "-m", "clipax", "demo", "cliff", "--quick", "--out", str(tmp_path)],
      capture_output=True, text=True, timeout=300, cwd=ROOT, env=env, check=False,
  )
  assert proc.returncode == 0, proc.stderr
  assert "## cliff" in proc.stdout
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "cliff.json", "cliff.png", "value_vs_norm.png"
  ]


def test_no_argument_runs_the_whole_demo(monkeypatch):
  calls = []
  monkeypatch.setattr(cli, "run_demo", lambda names, **kw: calls.append((names, kw)))
  assert cli.main([]) == 0
  names, kw = calls[0]
  assert names == ["imbalance", "cliff", "spiky-lm"]
  assert kw["quick"] is False and kw["seeds"] is None
  assert kw["out"] == pathlib.Path("clipax-demo")


def test_demo_rejects_unknown_experiment(capsys):
  with pytest.raises(SystemExit):
    cli.main(["demo", "nope"])
  assert "invalid choice" in capsys.readouterr().err


def test_bench_forwards_arguments(tmp_path, monkeypatch):
  script = tmp_path / "bench_clip.py"
  record = tmp_path / "argv.json"
  script.write_text(
      "import json, pathlib\n"
      "def main(argv):\n"
      f"  pathlib.Path({str(record)!r}).write_text(json.dumps(argv))\n"
      "  return {}\n"
  )
  monkeypatch.setattr(cli, "BENCH_SCRIPT", script)
  assert cli.main(["bench", "--sizes", "10", "--quick"]) == 0
  assert json.loads(record.read_text()) == ["--sizes", "10", "--quick"]


def test_bench_without_source_tree_fails_clearly(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(cli, "BENCH_SCRIPT", tmp_path / "missing" / "bench_clip.py")
  assert cli.main(["bench"]) == 2
  err = capsys.readouterr().err
  assert "source checkout" in err and "bench_clip.py" in err


def test_bench_script_is_found_in_this_checkout():
  assert cli.BENCH_SCRIPT == ROOT / "benchmarks" / "bench_clip.py"
  assert cli.BENCH_SCRIPT.is_file()


# --- imbalance ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imbalance_full() -> dict:
  return imbalance.run(imbalance.Config(), seeds=10, progress=False)


def _per_seed(result, scenario, arm, metric):
  return np.array(result["scenarios"][scenario]["per_seed"][arm][metric], np.float64)


def test_imbalance_bands_over_seeds_0_to_9(imbalance_full):
  assert imbalance_full["seeds"] == list(range(10))
  s1, s2, s3 = (s.name for s in imbalance.Config().scenarios)
  for name in (s1, s2, s3):
    ratio = _per_seed(imbalance_full, name, "none", "max_weight_change") / _per_seed(
        imbalance_full, name, "clip", "max_weight_change"
    )
    assert np.all(ratio >= 3), (name, ratio)
    gap = _per_seed(imbalance_full, name, "clip", "rare_loss") - _per_seed(
        imbalance_full, name, "none", "rare_loss"
    )
    assert np.all(gap >= 0.5), (name, gap)
  for name in (s1, s3):
    for arm in imbalance.ARMS:
      np.testing.assert_array_equal(_per_seed(imbalance_full, name, arm, "b_accuracy"), 0.0)


def test_imbalance_clipped_steps_respect_the_threshold(imbalance_full):
  # One SGD step moves the weights by lr * ||clipped grad|| <= lr * max_norm, so the weight norm
  # changes by at most that much; without clipping the largest gradient is several times larger.
  config = imbalance.Config()
  for sc in config.scenarios:
    change = _per_seed(imbalance_full, sc.name, "clip", "max_weight_change")
    assert np.all(change <= sc.lr * config.max_norm * (1 + 1e-5))
    assert np.all(_per_seed(imbalance_full, sc.name, "none", "max_grad_norm") > 3 * config.max_norm)


def test_imbalance_table_has_medians_ratios_and_published(imbalance_full):
  text = imbalance.table(imbalance_full)
  first = imbalance.Config().scenarios[0].name
  median = imbalance_full["scenarios"][first]["median"]
  row = next(line for line in text.splitlines() if line.startswith(f"| {first} | max step"))
  assert f"{median['none']['max_weight_change']:.3f}" in row
  assert f"{median['clip']['max_weight_change']:.3f}" in row
  assert "0.131 / 0.022" in row
  cells = [c.strip() for c in row.strip("|").split("|")]
  ratio = median["none"]["max_weight_change"] / median["clip"]["max_weight_change"]
  assert float(cells[4]) == pytest.approx(ratio, abs=0.006)


def test_imbalance_table_names_its_source_and_explains_every_difference(imbalance_full):
  text = imbalance.table(imbalance_full)
  lines = text.splitlines()
  assert lines[0].endswith("| published, seed page seed-003 (no clip / clip) |")
  assert imbalance_full["published_source"] == imbalance.PUBLISHED_SOURCE == "seed page seed-003"
  first = imbalance.Config().scenarios[0]
  assert imbalance_full["published_setup"] == dataclasses.asdict(first)
  assert "not the published setup" not in text
  for m, (pub_none, pub_clip) in imbalance.PUBLISHED.items():
    start = f"| {first.name} | {imbalance.LABELS[m]} |"
    row = next(line for line in lines if line.startswith(start))
    assert row.endswith(f"| {pub_none:g} / {pub_clip:g} |"), row
    inside = all(
        _per_seed(imbalance_full, first.name, arm, m).min() <= pub
        <= _per_seed(imbalance_full, first.name, arm, m).max()
        for arm, pub in zip(imbalance.ARMS, (pub_none, pub_clip), strict=True)
    )
    note = [line for line in lines if line.startswith(f"- {imbalance.LABELS[m]}: published")]
    assert len(note) == (0 if inside else 1), (m, inside)
    if note:
      median = imbalance_full["scenarios"][first.name]["median"]
      assert f"published {pub_none:g} / {pub_clip:g}" in note[0]
      assert f"measured {median['none'][m]:.3f} / {median['clip'][m]:.3f}" in note[0]
      assert "Why it can differ: " in note[0], m
  weight = next(line for line in lines if line.startswith("- std of weight norm:"))
  assert "published 0.64 / 0.22" in weight


def _reference_sgd(params, tokens, labels, lr, max_norm):
  """float64 numpy per-sample SGD with global-norm clipping; the weight norm after each step."""
  emb, w, b = (np.asarray(params[k], np.float64).copy() for k in ("embedding", "kernel", "bias"))
  norms = [math.sqrt(np.sum(emb**2) + np.sum(w**2) + np.sum(b**2))]
  losses = []
  for tok, lab in zip(tokens, labels, strict=True):
    h = emb[tok]
    z = h @ w + b
    p = np.exp(z - z.max())
    p /= p.sum()
    losses.append(-math.log(p[lab]))
    dz = p.copy()
    dz[lab] -= 1
    gw, gb, gh = np.outer(h, dz), dz, w @ dz
    g_norm = math.sqrt(np.sum(gw**2) + np.sum(gb**2) + np.sum(gh**2))
    s = min(1.0, max_norm / g_norm)
    w -= lr * s * gw
    b -= lr * s * gb
    emb[tok] -= lr * s * gh
    norms.append(math.sqrt(np.sum(emb**2) + np.sum(w**2) + np.sum(b**2)))
  return np.array(norms), np.array(losses)


@pytest.mark.parametrize("max_norm", [1.0, math.inf])
def test_imbalance_training_matches_float64_reference(max_norm):
  config = imbalance.Config(
      n_samples=200, eff_dim_every=100, max_norm=1.0,
      scenarios=(imbalance.Scenario("t", n_rare=5, lr=0.1, epochs=1),),
  )
  result = imbalance.run(config, seeds=[7], progress=False)
  arm = "clip" if math.isfinite(max_norm) else "none"
  got = np.array(result["scenarios"]["t"]["curves"]["weight_norm"][arm])
  tokens, labels = imbalance.make_data(config, 5, 7)
  params = imbalance.init_params(config, jax.random.PRNGKey(7))
  want, losses = _reference_sgd(params, tokens, labels, 0.1, max_norm)
  np.testing.assert_allclose(got, want, rtol=1e-4)
  rare = _per_seed(result, "t", arm, "rare_loss")[0]
  np.testing.assert_allclose(rare, losses[labels == 1].mean(), rtol=1e-4)


def test_imbalance_data_and_init():
  config = imbalance.Config()
  tokens, labels = imbalance.make_data(config, 10, 0)
  assert tokens.shape == labels.shape == (1000,)
  assert labels.sum() == 10 and set(np.unique(labels)) == {0, 1}
  assert set(np.unique(tokens)) == {0, 1, 2, 3}
  params = imbalance.init_params(config, jax.random.PRNGKey(0))
  assert params["embedding"].shape == (4, 16)
  assert params["kernel"].shape == (16, 4) and params["bias"].shape == (4,)
  assert float(jnp.max(jnp.abs(params["kernel"]))) <= 0.25
  assert float(jnp.max(jnp.abs(params["bias"]))) <= 0.25


def test_effective_dim_matches_covariance_eigenvalues():
  rng = np.random.default_rng(0)
  e = rng.normal(size=(4, 16))
  eig = np.clip(np.linalg.eigvalsh(np.cov(e, rowvar=False)), 0, None)
  p = eig[eig > 1e-12] / eig.sum()
  np.testing.assert_allclose(imbalance.effective_dim(e), np.exp(-np.sum(p * np.log(p))), rtol=1e-9)
  assert imbalance.effective_dim(np.ones((4, 16))) == 0.0


def test_imbalance_quick_story(demo):
  result = demo["results"]["imbalance"]
  assert "not the published setup" in imbalance.table(result)  # 2 epochs, the published 5
  for sc in result["scenarios"].values():
    assert sc["ratio"]["max_weight_change"] >= 3
    assert sc["median"]["clip"]["rare_loss"] > sc["median"]["none"]["rare_loss"]


# --- cliff ----------------------------------------------------------------------------------------


def test_cliff_three_arms(demo):
  result = demo["results"]["cliff"]
  config = cliff.Config.quick()
  none, norm, value = (result["arms"][arm] for arm in cliff.ARMS)
  cap = config.lr * config.max_norm
  # No clipping: catapulted by a step tens of times the capped one, stuck on the valley's side.
  assert none["max_step"] > 20 * cap
  assert none["final_loss"] > 10 * norm["final_loss"] + 1.0
  # Norm clipping: every step capped, the direction kept exactly, down the valley.
  assert norm["max_step"] <= cap * (1 + 1e-5)
  assert norm["clipped_steps"] > 0
  assert norm["max_angle_deg"] < 0.01
  assert norm["final_distance_to_minimum"] < none["final_distance_to_minimum"]
  # Value clipping: coordinates capped, the direction bent.
  assert value["max_step"] <= config.lr * config.max_value * math.sqrt(2) * (1 + 1e-5)
  assert value["max_angle_deg"] > 10
  assert none["max_angle_deg"] < 1e-3


def test_cliff_angles_match_numpy():
  g = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]])
  c = np.array([[0.5, 0.5], [1.0, 0.0], [0.0, 0.0]])
  want = [math.degrees(math.acos(3.5 / (5 * math.sqrt(0.5)))), 0.0, 0.0]
  np.testing.assert_allclose(cliff._angles(g, c), want, atol=1e-9)


def test_value_vs_norm_clips_one_gradient_both_ways(demo):
  result = demo["results"]["cliff"]
  config = cliff.Config.quick()
  ex = result["value_vs_norm"]
  g, n, v = (np.array(ex[k], np.float64) for k in ("grad", "norm_clipped", "value_clipped"))
  # float64 numpy references of the two clippers
  np.testing.assert_allclose(n, g * min(1.0, config.max_norm / np.linalg.norm(g)), rtol=1e-6)
  np.testing.assert_array_equal(v, np.clip(g, -config.max_value, config.max_value))
  cos = n @ v / (np.linalg.norm(n) * np.linalg.norm(v))
  assert ex["angle_deg"] == pytest.approx(math.degrees(math.acos(cos)), abs=1e-9)
  # The gradient of the value-clipping descent's most bent step; both clippers act on it.
  value = result["arms"]["value"]
  assert ex["arm"] == "value" and value["angle_deg"][ex["step"]] == value["max_angle_deg"]
  assert np.linalg.norm(g) == pytest.approx(value["grad_norm"][ex["step"]], rel=1e-6)
  assert ex["angle_deg"] == pytest.approx(value["max_angle_deg"], abs=1e-3)
  assert np.linalg.norm(g) > config.max_norm and np.max(np.abs(g)) > config.max_value
  assert ex["angle_deg"] > 10
  assert f"{ex['angle_deg']:.1f} degrees apart (value_vs_norm.png)" in cliff.table(result)


def test_cliff_loss_surface_is_a_valley_with_a_drop():
  config = cliff.Config()
  loss = lambda x, y: float(cliff.loss_fn(config, jnp.array([x, y], jnp.float32)))
  assert loss(config.target, 0.0) < 1e-3
  assert loss(-0.2, 0.0) - loss(0.2, 0.0) > 0.9 * config.wall_height  # the cliff
  assert loss(3.0, 5.0) == pytest.approx(config.valley_depth + 0.15 * 9, rel=1e-3)  # flat side


# --- spiky LM -------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, 2])
def test_markov_source_floor_is_its_entropy_rate(order):
  config = dataclasses.replace(spiky_lm.Config.quick(), order=order, vocab=12)
  transitions, stationary, floor = spiky_lm.markov_source(config, 3)
  assert transitions.shape == (12,) * (order + 1)
  np.testing.assert_allclose(transitions.sum(-1), 1.0, rtol=1e-12)
  np.testing.assert_allclose(np.sum(stationary[..., None] * transitions, axis=0), stationary,
                             atol=1e-12)
  seqs = spiky_lm.sample(transitions, stationary, 2000, 40, np.random.default_rng(0))
  contexts = tuple(seqs[:, i : 40 - order + i].ravel() for i in range(order + 1))
  nll = -np.log(transitions[contexts])
  stderr = nll.std() / math.sqrt(nll.size)
  assert abs(nll.mean() - floor) < 5 * stderr
  assert 0 < floor < math.log(config.vocab)


def test_bad_batches_are_deterministic():
  config = spiky_lm.Config.quick()
  tokens, scale, is_bad, _ = spiky_lm.make_batches(config, 0)
  assert tokens.shape == (config.steps, config.batch_size, config.seq_len + 1)
  np.testing.assert_array_equal(np.flatnonzero(is_bad), [100, 200])
  np.testing.assert_array_equal(scale[is_bad], config.bad_scale)
  np.testing.assert_array_equal(scale[~is_bad], 1.0)
  np.testing.assert_array_equal(tokens, spiky_lm.make_batches(config, 0)[0])


def test_default_model_has_about_a_million_parameters():
  model = nnx.eval_shape(lambda: spiky_lm.make_model(spiky_lm.Config(), 0))
  assert 0.7e6 < spiky_lm.count_params(model) < 1.3e6


def _reference_excursions(loss, is_bad, factor, window) -> list[list[int]]:
  """Loss spikes in vectorised float64 numpy: good steps above ``factor`` x the median of the
  previous ``window`` good losses (or not finite), merged when at most ``window`` steps apart."""
  idx = np.flatnonzero(~is_bad)
  good = np.asarray(loss, np.float64)[idx]
  median = np.median(np.lib.stride_tricks.sliding_window_view(good, window)[:-1], axis=1)
  scored = good[window:]
  with np.errstate(invalid="ignore"):
    ok = np.isfinite(scored) & (scored <= factor * median)
  flagged = idx[window:][~ok]
  if flagged.size == 0:
    return []
  cut = np.flatnonzero(np.diff(flagged) > window)
  firsts, lasts = np.r_[flagged[0], flagged[cut + 1]], np.r_[flagged[cut], flagged[-1]]
  return [[int(a), int(b)] for a, b in zip(firsts, lasts, strict=True)]


def test_spike_counting():
  losses = np.array([1.0] * 30 + [2.5, 1.0, 50.0, 1.0, 1.9, np.nan])
  is_bad = np.zeros(losses.size, bool)
  is_bad[32] = True  # a bad batch is not a spike
  np.testing.assert_array_equal(spiky_lm.spikes(losses, is_bad, 2.0, 25), [30, 35])
  assert spiky_lm.excursions(losses, is_bad, 2.0, 25) == [(30, 35)]  # 5 steps apart: one spike
  ratios = spiky_lm.median_ratios(losses, is_bad, 25)
  assert 32 not in ratios and ratios[30] == 2.5 and ratios[34] == 1.9
  # A long setback is one spike; two setbacks further apart than the window are two.
  setbacks = np.array([1.0] * 30 + [2.0] * 10 + [1.0] * 60 + [3.0, 1.0, 3.0])
  clean = np.zeros(setbacks.size, bool)
  assert spiky_lm.excursions(setbacks, clean, 1.25, 25) == [(30, 39), (100, 102)]
  rng = np.random.default_rng(0)
  for _ in range(20):
    noisy = np.exp(rng.normal(0.0, 0.15, 400)) * (1 + (rng.random(400) < 0.02) * 2)
    bad = rng.random(400) < 0.05
    got = [list(e) for e in spiky_lm.excursions(noisy, bad, 1.25, 25)]
    assert got == _reference_excursions(noisy, bad, 1.25, 25)


def test_spike_count_agrees_with_the_plot_and_numpy(demo):
  result = demo["results"]["spiky_lm"]
  c = result["config"]
  is_bad = np.zeros(c["steps"], bool)
  is_bad[result["bad_steps"]] = True
  for arm, r in result["results"].items():
    loss = np.array([np.nan if v is None else v for v in r["loss"]])
    want = _reference_excursions(loss, is_bad, c["spike_factor"], c["median_window"])
    assert r["spike_excursions"] == want, arm
    assert r["spikes"] == len(want) == r["per_seed"]["spikes"][0], arm
  none = result["results"]["none"]
  # What the plot shows: without clipping every bad batch is followed by a setback, one spike
  # each, starting within a window of it; the clipped and guarded arms have none.
  assert none["spikes"] == len(result["bad_steps"]) > 0
  for (first, _), t in zip(none["spike_excursions"], result["bad_steps"], strict=True):
    assert t < first <= t + c["median_window"]
  # Gradient clippers and guards absorb the bad batches. Update clipping (StableAdamW's rule,
  # issue 15) does not, as measured: it clips the bad step's update, but the first moment keeps
  # pushing the bad direction afterwards while the inflated second moment keeps the RMS below 1.
  update_arm = result["results"]["clip_update_rms"]
  assert set(result["bad_steps"]) <= set(update_arm["clipped"])
  assert all(r["spikes"] == 0 for arm, r in result["results"].items()
             if arm not in ("none", "clip_update_rms"))
  text = spiky_lm.table(result)
  assert f"loss spikes (> {c['spike_factor']:g}x running median)" in text
  assert result["spike_definition"] in text
  row = next(line for line in text.splitlines() if line.startswith("| none |"))
  cells = [cell.strip() for cell in row.strip("|").split("|")]
  assert float(cells[3]) == none["spikes"]
  assert cells[4] == ", ".join(str(first) for first, _ in none["spike_excursions"])


def test_spiky_lm_arms(demo):
  result = demo["results"]["spiky_lm"]
  assert result["arms"] == list(spiky_lm.ARMS)  # every clipper exists in this version
  assert result["missing_arms"] == []
  assert result["floor"] < result["start_loss"]
  bad = result["bad_steps"]
  r = result["results"]
  none_norm = np.array(r["none"]["grad_norm"])
  assert np.all(none_norm[bad] > 100 * np.median(none_norm))  # the spikes are injected
  assert r["none"]["clip_rate"] == 0 and r["none"]["status"] is None
  clip = r["clip_by_global_norm"]
  assert set(bad) <= set(clip["clipped"])
  assert 0 < clip["clip_rate"] < 1
  # AdamW normalises the spike's size but not its aftermath: clipping ends lower.
  assert clip["final_loss"] < r["none"]["final_loss"]
  # skip_spikes skips the bad batch once its window is warm (step 200 of the quick run).
  assert 200 in r["skip_spikes"]["skipped"]
  for arm, row in r.items():
    assert row["final_loss"] > result["floor"]
    busy = row["clip_rate"] + row["skip_rate"]
    if row["status"] is not None and (busy > 0.7 or busy < 0.3):
      assert (row["status"] == "clipping_often") == (busy > 0.7), arm
  text = spiky_lm.table(result)
  assert f"{result['floor']:.3f}" in text
  table_rows = [line for line in text.splitlines() if line.startswith("| ")]
  assert len(table_rows) == 1 + len(r)
  verdicts = [line for line in text.splitlines() if line.startswith("- ")]
  assert len(verdicts) == len(r) - 1  # every arm but "none" has a clipax state
  assert f"- autoclip: [{r['autoclip']['status']}]" in text
