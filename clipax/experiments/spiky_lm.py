"""A small language model hit by bad batches: AdamW with no clipping, fixed and adaptive clippers.

A decoder-only transformer in Flax NNX (about 1M parameters at the default size) learns a seeded
synthetic corpus: a Markov source of order ``order`` (1 by default: a bigram source) over ``vocab``
tokens whose transition rows are sparse Dirichlet draws, so the best achievable loss (the source's
entropy rate, the *floor*) is known exactly. Every ``bad_every`` steps the batch is replaced by a
bad one (random tokens, loss multiplied by ``bad_scale``): a deterministic gradient spike.

Arms: no clipping, ``clip_by_global_norm(1.0)``, and whichever of ``zclip``, ``autoclip``,
``skip_spikes`` and ``clip_update_rms`` (update clipping: StableAdamW's per-tensor update-RMS
rule around the same AdamW, reading AdamW's own second moment) this version of clipax provides.
As measured, update clipping does not absorb these bad batches: it clips the bad step, but the
first moment carries the bad gradient into the next steps, whose RMS the inflated second moment
keeps below 1 (the quick and default runs keep every spike of the unclipped arm). Per arm:
final loss, loss spikes (see
:func:`excursions`: runs of good-batch losses above ``spike_factor`` times their running median,
counted once each), divergence, clip and skip rates (from :func:`clipax.metrics`) and the
:func:`clipax.diagnose` verdict.

The model is trained through the functional NNX API: ``nnx.split`` once, then one ``jax.jit`` of
the forward and backward pass shared by every arm and one per arm for the optax update. It computes
what ``nnx.Optimizer.update`` does, without ``nnx.jit``'s per-call cost (most of the run time of a
model this small).

Layout: this module holds the arms, :class:`Config`, the loss-spike rule, the training loop,
:func:`run` and :func:`table`; the corpus, the model and its jitted steps live in
:mod:`clipax.experiments._spiky_lm_model`, the figure (:func:`plot`, :data:`STYLES`) in
:mod:`clipax.experiments._spiky_lm_plot`. Both are re-exported here, so every name is still
importable from this module.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import jax
import numpy as np
import optax
from flax import nnx

import clipax
from clipax.experiments import _common
from clipax.experiments._spiky_lm_model import Block as Block
from clipax.experiments._spiky_lm_model import Transformer as Transformer
from clipax.experiments._spiky_lm_model import _grads, _updater
from clipax.experiments._spiky_lm_model import count_params as count_params
from clipax.experiments._spiky_lm_model import make_batches as make_batches
from clipax.experiments._spiky_lm_model import make_model as make_model
from clipax.experiments._spiky_lm_model import markov_source as markov_source
from clipax.experiments._spiky_lm_model import sample as sample
from clipax.experiments._spiky_lm_plot import STYLES as STYLES
from clipax.experiments._spiky_lm_plot import plot as plot

ARMS = ("none", "clip_by_global_norm", "zclip", "autoclip", "skip_spikes", "clip_update_rms")
"""Every arm; those whose clipax function does not exist in this version are left out."""


@dataclasses.dataclass(frozen=True)
class Config:
  """Model, corpus and training sizes.

  Attributes:
    vocab: tokens of the synthetic source.
    order: Markov order of the source (its context length).
    concentration: Dirichlet concentration of each transition row (smaller is sparser, lower
      floor).
    seq_len: tokens per training sequence.
    batch_size: sequences per batch.
    d_model: transformer width.
    n_layers: transformer blocks.
    n_heads: attention heads.
    mlp_ratio: MLP hidden width / ``d_model``.
    steps: optimizer steps per arm.
    lr: AdamW peak learning rate (linear warm-up, then constant).
    b2: AdamW's second-moment decay (0.95, as in many language-model recipes).
    warmup: warm-up steps.
    weight_decay: AdamW weight decay.
    bad_every: a bad batch every this many steps (at steps ``bad_every``, ``2 * bad_every``, ...).
    bad_scale: the bad batch's loss multiplier.
    max_norm: the fixed clipping threshold.
    spike_factor: a good batch's loss above this times the median of the previous
      ``median_window`` good batches' losses starts or continues a loss spike (see
      :func:`excursions`). 1.25, a 25% rise: the batch-to-batch noise of the loss of a model that
      is learning normally stays well below it (the clipped arms reach at most 1.07x at the
      default size, 1.13x in the quick one), while the setback after an unclipped bad batch, the
      rise the plot shows, reaches 1.4x-1.6x. At 2x none of the setbacks would count, at 1.5x at
      most one per run.
    median_window: the running median's window, in good steps; flagged steps closer than this
      belong to one spike.
  """

  vocab: int = 64
  order: int = 1
  concentration: float = 0.1
  seq_len: int = 64
  batch_size: int = 8
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  mlp_ratio: int = 4
  steps: int = 500
  lr: float = 3e-3
  b2: float = 0.95
  warmup: int = 30
  weight_decay: float = 0.01
  bad_every: int = 125
  bad_scale: float = 1e3
  max_norm: float = 1.0
  spike_factor: float = 1.25
  median_window: int = 25

  @classmethod
  def quick(cls) -> Config:
    """A tiny model and a short run (well under a minute on 2 CPU cores)."""
    return cls(
        vocab=32, seq_len=32, batch_size=8, d_model=32, n_layers=1, n_heads=2, steps=300,
        lr=1e-2, warmup=20, bad_every=100,
    )


def available_arms() -> list[str]:
  """The arms this version of clipax can run (the adaptive ones are looked up by name)."""
  return [arm for arm in ARMS if arm == "none" or getattr(clipax, arm, None) is not None]


def make_tx(config: Config, arm: str) -> optax.GradientTransformation:
  """AdamW (linear warm-up, constant learning rate) behind the arm's clipper or guard, each with
  its default settings (``clip_by_global_norm`` at ``config.max_norm``); ``clip_update_rms``
  wraps the AdamW instead (its ``b2``, ``max_rms`` 1: StableAdamW)."""
  schedule = optax.linear_schedule(0.0, config.lr, config.warmup)
  adamw = optax.adamw(schedule, b2=config.b2, weight_decay=config.weight_decay)
  if arm == "none":
    return adamw
  if arm == "clip_by_global_norm":
    return optax.chain(clipax.clip_by_global_norm(config.max_norm), adamw)
  if arm == "skip_spikes":
    return clipax.skip_spikes(adamw)
  if arm == "clip_update_rms":
    return clipax.clip_update_rms(adamw, b2=config.b2)
  return optax.chain(getattr(clipax, arm)(), adamw)


# --- the experiment ------------------------------------------------------------------------------


def median_ratios(losses: np.ndarray, is_bad: np.ndarray, window: int) -> dict[int, float]:
  """``{step: loss / median of the previous window good steps' losses}`` for every good step
  after the first ``window`` ones (bad batches are neither scored nor used in the median)."""
  good = np.flatnonzero(~is_bad)
  out = {}
  for i in range(window, good.size):
    median = np.median(losses[good[i - window : i]])
    out[int(good[i])] = float(losses[good[i]] / median) if median > 0 else math.inf
  return out


def spikes(losses: np.ndarray, is_bad: np.ndarray, factor: float, window: int) -> np.ndarray:
  """Steps whose loss is above ``factor`` times the median of the previous ``window`` good
  steps' losses, or not finite (bad batches themselves are not counted, nor used in the median).

  Every flagged step, a long setback flags many: :func:`excursions` groups them into spikes."""
  ratios = median_ratios(losses, is_bad, window)
  return np.array(
      [t for t, r in ratios.items() if not (np.isfinite(losses[t]) and r <= factor)], np.int64
  )


def excursions(
    losses: np.ndarray, is_bad: np.ndarray, factor: float, window: int
) -> list[tuple[int, int]]:
  """The loss spikes: the steps of :func:`spikes` grouped into excursions, ``(first, last)``
  flagged step of each.

  A flagged step at most ``window`` steps after the previous flagged one continues that one's
  excursion, so a setback that lasts (or dips under the line for a few steps) counts once.

  Examples:
    >>> import numpy as np
    >>> losses = np.array([1.0] * 30 + [3.0, 3.0, 1.0, 3.0] + [1.0] * 40 + [3.0])
    >>> excursions(losses, np.zeros(losses.size, bool), 1.25, 25)
    [(30, 33), (74, 74)]
  """
  out: list[list[int]] = []
  for t in spikes(losses, is_bad, factor, window).tolist():
    if out and t - out[-1][1] <= window:
      out[-1][1] = t
    else:
      out.append([t, t])
  return [(first, last) for first, last in out]


def spike_definition(config: Config | dict) -> str:
  """The loss-spike rule in words, for tables and captions."""
  c = dataclasses.asdict(config) if isinstance(config, Config) else config
  return (
      f"a loss spike is a run of good batches whose loss is above {c['spike_factor']:g}x the "
      f"median of the previous {c['median_window']} good batches' losses (or not finite), "
      f"counted once however long it lasts (flagged steps at most {c['median_window']} steps "
      "apart are one spike); the bad batches' own losses are neither counted nor in the median"
  )


def _train_arm(config: Config, arm: str, seed: int, batches, progress: bool, desc: str) -> dict:
  tokens, scale, is_bad, _ = batches
  graphdef, params, rest = nnx.split(make_model(config, seed), nnx.Param, ...)
  tx = make_tx(config, arm)
  opt_state = tx.init(params)
  update = _updater(tx)
  # tokens and scale stay numpy (make_batches): a step's batch is sliced on the host and moved
  # into the jitted step, not cut from a device array by an eager slice per step
  losses, norms, history = [], [], []
  for t in _common.progress_bar(range(config.steps), enabled=progress, desc=desc):
    ce, grads, norm = _grads(
        params, rest, tokens[t], scale[t], graphdef=graphdef, order=config.order
    )
    params, opt_state, m = update(params, opt_state, grads)
    history.append(m)
    losses.append(ce)
    norms.append(norm)
  losses = np.asarray(jax.device_get(losses), np.float64)
  norms = np.asarray(jax.device_get(norms), np.float64)
  history = jax.device_get(history)
  final = clipax.metrics(opt_state)
  return {"loss": losses, "grad_norm": norms, "history": history, "final_metrics": final}


def _flag(history: list[dict], name: str) -> np.ndarray:
  for key in history[0] if history else ():
    if key.rsplit("/", 1)[-1] == name:
      return np.array([bool(h[key]) for h in history])
  return np.zeros(len(history), bool)


def _rate(final: dict, name: str) -> float:
  for key, value in final.items():
    if key.rsplit("/", 1)[-1] == name:
      return float(value)
  return 0.0


def run(config: Config, *, seeds: int | Iterable[int] = 1, progress: bool = True) -> dict:
  """Trains one model per arm and seed and returns every number (JSON-serialisable).

  Args:
    config: model, corpus and training sizes.
    seeds: a number of seeds (``1`` means seed 0) or the seeds themselves; each seed draws its own
      source, corpus and initialisation.
    progress: show tqdm bars over the training steps.

  Returns:
    ``{"experiment": "spiky_lm", "config", "seeds", "arms", "missing_arms", "n_params", "floor",
    "floors", "start_loss", "bad_steps", "spike_definition", "results": {arm: {"final_loss",
    "gap_to_floor", "spikes", "peak_ratio", "diverged", "clip_rate", "skip_rate",
    "max_grad_norm", "loss", "grad_norm", "clipped", "skipped", "spike_steps",
    "spike_excursions", "verdict", "status", "per_seed": {metric: [value per seed]}}}}``; the
    curves, the spike steps and excursions (``[first, last]`` step of each loss spike, see
    :func:`excursions`) and the verdict are those of the first seed, the summary numbers are
    medians over the seeds (``spikes``: the number of excursions; ``diverged``: any seed).
  """
  seed_ids = _common.seed_list(seeds)
  arms = available_arms()
  per_seed: dict[str, dict[str, list]] = {arm: {} for arm in arms}
  curves: dict[str, dict] = {}
  floors, starts = [], []
  tail = max(10, config.steps // 20)
  with _common.relaxed_promotion():
    for seed in seed_ids:
      batches = make_batches(config, seed)
      is_bad = batches[2]
      floors.append(batches[3])
      n_params = count_params(nnx.eval_shape(lambda s=seed: make_model(config, s)))
      for arm in arms:
        out = _train_arm(config, arm, seed, batches, progress, f"spiky-lm {arm} seed {seed}")
        loss = out["loss"]
        good = loss[~is_bad]
        spike_steps = spikes(loss, is_bad, config.spike_factor, config.median_window)
        spike_runs = excursions(loss, is_bad, config.spike_factor, config.median_window)
        ratios = list(median_ratios(loss, is_bad, config.median_window).values())
        final_loss = float(np.mean(good[-tail:]))
        diverged = bool(not np.all(np.isfinite(loss)) or not final_loss <= loss[0])
        clipped = _flag(out["history"], "clipped")
        skipped = _flag(out["history"], "skipped")
        verdict = (
            clipax.diagnose(out["history"], window=min(100, config.steps))
            if out["history"] and out["history"][0] else None
        )
        row = {
            "final_loss": final_loss,
            "gap_to_floor": final_loss - batches[3],
            "spikes": len(spike_runs),
            "peak_ratio": max(ratios, default=float("nan")),
            "diverged": diverged,
            "clip_rate": _rate(out["final_metrics"], "clip_rate"),
            "skip_rate": _rate(out["final_metrics"], "skip_rate"),
            "max_grad_norm": float(np.nanmax(out["grad_norm"])),
        }
        for key, value in row.items():
          per_seed[arm].setdefault(key, []).append(_common.number(value))
        if seed == seed_ids[0]:
          starts.append(float(loss[0]))
          curves[arm] = {
              "loss": _common.numbers(loss),
              "grad_norm": _common.numbers(out["grad_norm"]),
              "clipped": [int(t) for t in np.flatnonzero(clipped)],
              "skipped": [int(t) for t in np.flatnonzero(skipped)],
              "spike_steps": [int(t) for t in spike_steps],
              "spike_excursions": [[int(a), int(b)] for a, b in spike_runs],
              "verdict": None if verdict is None else str(verdict),
              "status": None if verdict is None else verdict.status,
          }
  results = {}
  for arm in arms:
    ps = per_seed[arm]
    summary = {
        key: _common.number(np.nanmedian(np.array([np.nan if v is None else v for v in ps[key]])))
        for key in ("final_loss", "gap_to_floor", "spikes", "peak_ratio", "clip_rate",
                    "skip_rate", "max_grad_norm")
    }
    summary["diverged"] = any(ps["diverged"])
    results[arm] = {**summary, **curves[arm], "per_seed": ps}
  return {
      "experiment": "spiky_lm",
      "config": dataclasses.asdict(config),
      "seeds": seed_ids,
      "arms": arms,
      "missing_arms": [arm for arm in ARMS if arm not in arms],
      "n_params": n_params,
      "floor": _common.number(float(np.median(floors))),
      "floors": _common.numbers(floors),
      "start_loss": _common.number(starts[0]) if starts else None,
      "bad_steps": [int(t) for t in np.flatnonzero(is_bad)],
      "spike_definition": spike_definition(config),
      "results": results,
  }


def table(result: dict) -> str:
  """A markdown table, one row per arm, with the source's loss floor and the loss-spike rule in
  the caption, then the :func:`clipax.diagnose` verdict of each arm that has a clipax state."""
  c = result["config"]
  header = [
      "arm", "final loss", "gap to floor", f"loss spikes (> {c['spike_factor']:g}x running median)",
      "spikes start at step (first seed)", "worst loss / running median", "diverged",
      "clip rate", "skip rate", "verdict",
  ]
  rows = []
  for arm, r in result["results"].items():
    starts = ", ".join(str(first) for first, _ in r["spike_excursions"])
    rows.append([
        arm,
        _common.fmt(r["final_loss"]),
        _common.fmt(r["gap_to_floor"]),
        _common.fmt(r["spikes"], 0),
        starts or "-",
        _common.fmt(r["peak_ratio"], 2),
        "yes" if r["diverged"] else "no",
        _common.fmt(r["clip_rate"]),
        _common.fmt(r["skip_rate"]),
        r["status"] or "-",
    ])
  caption = (
      f"{result['n_params']:,} parameters, {c['steps']} AdamW steps (lr {c['lr']:g}), batch "
      f"{c['batch_size']} x {c['seq_len']} tokens, bad batch (loss x {c['bad_scale']:g}) every "
      f"{c['bad_every']} steps; loss floor (entropy rate of the source) "
      f"{_common.fmt(result['floor'])} nats, start loss {_common.fmt(result['start_loss'])}; "
      f"final loss = mean of the last {max(10, c['steps'] // 20)} good steps; medians over "
      f"{len(result['seeds'])} seed(s). Loss spikes: {result['spike_definition']} (the "
      "triangles in the plot)."
  )
  if result["missing_arms"]:
    caption += f" Not in this version of clipax: {', '.join(result['missing_arms'])}."
  verdicts = [
      f"- {arm}: {r['verdict']}" for arm, r in result["results"].items() if r["verdict"]
  ]
  text = _common.markdown(header, rows) + "\n\n" + caption
  if verdicts:
    text += "\n\n`clipax.diagnose` on the last 100 steps (first seed):\n" + "\n".join(verdicts)
  return text
