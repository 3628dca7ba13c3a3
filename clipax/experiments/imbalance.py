"""A rare class yanking the weights: what norm clipping buys, and what it does not.

A tiny classifier (an embedding table of 4 tokens x 16 followed by a linear layer 16 -> 4 logits,
no hidden layer) is trained with plain SGD, batch size 1, on 1,000 samples whose input token is
uniform and *independent of the label*: the label is "A" except at a few random positions labelled
"B". Every B sample is a surprise with a large cross-entropy gradient, and without clipping it
yanks the weights; with ``clip_by_global_norm(1.0)`` the yank is capped.

What it shows (over seeds 0-9): clipping buys stability (the largest step-to-step change of the
weight norm is several times smaller, the weight norm and the embedding's effective dimension move
far less), not rare-class learning (class-B accuracy stays ~0 either way, and the loss on the rare
samples is *higher* with clipping, because the model is no longer dragged towards B by each one).

Scenarios: S1 99:1, lr 0.1, 5 epochs; S2 80:20, lr 0.1, 10 epochs; S3 99:1, lr 0.01, 10 epochs.
The whole per-sample SGD loop is one ``jax.lax.scan``, vmapped over seeds and over the two arms
(the no-clip arm is ``clip_by_global_norm(inf)``), so 10 seeds x 3 scenarios x 2 arms take seconds.

Layout: this module holds the metric names, the published numbers, :class:`Scenario`,
:class:`Config`, :func:`run`, :func:`table` and :func:`published_note`; the arms, the data, the
model, the vmapped SGD loop and the per-run metrics live in
:mod:`clipax.experiments._imbalance_train`, the figures (:func:`plot`) in
:mod:`clipax.experiments._imbalance_plot`. Both are re-exported here, so every name is still
importable from this module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from clipax.experiments import _common
from clipax.experiments._imbalance_plot import plot as plot
from clipax.experiments._imbalance_train import ARMS as ARMS
from clipax.experiments._imbalance_train import _metrics, _train
from clipax.experiments._imbalance_train import effective_dim as effective_dim
from clipax.experiments._imbalance_train import init_params as init_params
from clipax.experiments._imbalance_train import make_data as make_data

METRICS = (
    "max_weight_change",
    "weight_norm_std",
    "eff_dim_std",
    "rare_loss",
    "b_accuracy",
    "max_grad_norm",
)
"""The per-run metrics, in table order."""

LABELS = {
    "max_weight_change": "max step change of weight norm",
    "weight_norm_std": "std of weight norm",
    "eff_dim_std": "std of effective dim (embedding)",
    "rare_loss": "mean loss on rare (B) samples",
    "b_accuracy": "class-B accuracy",
    "max_grad_norm": "max gradient norm",
}

PUBLISHED = {
    "max_weight_change": (0.131, 0.022),
    "weight_norm_std": (0.64, 0.22),
    "eff_dim_std": (0.336, 0.023),
    "rare_loss": (4.67, 5.97),
    "b_accuracy": (0.0, 0.0),
}
"""The published (no clip, clip) values for the 99:1, lr 0.1 scenario (S1), one seed, from
:data:`PUBLISHED_SOURCE`."""

PUBLISHED_SOURCE = "seed page seed-003"
"""Where :data:`PUBLISHED` comes from: the project's seed page ``seed-003``, one run of the S1
setup (:data:`PUBLISHED_SETUP`) with one seed. Its initialisation, data order and definition of
the effective dimension are not recorded in this repository."""

PUBLISHED_NOTES = {
    "weight_norm_std": (
        "the std over the whole run measures the slow drift of ||w|| (the output layer and the "
        "bias grow while the model learns to predict the frequent class A, see "
        "imbalance_weight_norm.png) more than the yanks, so it depends on the initial weights "
        "and the run's length; the published run's initialisation is not recorded"
    ),
    "eff_dim_std": (
        "the published run's definition of the effective dimension is not recorded; with the one "
        "here (exp of the entropy of the covariance eigenvalues of the embedding's rows, at most "
        "n_tokens - 1 = 3) the S1 embedding's shape hardly changes"
    ),
    "rare_loss": (
        "its level depends on the data order and the initialisation, neither recorded with the "
        "published run"
    ),
}
"""Why a measured row can differ from :data:`PUBLISHED`, for the note under the table."""


@dataclasses.dataclass(frozen=True)
class Scenario:
  """One training setup.

  Attributes:
    name: short name used in tables and JSON keys.
    n_rare: how many of the samples are labelled B.
    lr: the SGD learning rate.
    epochs: passes over the data, always in the same order.
  """

  name: str
  n_rare: int
  lr: float
  epochs: int


PUBLISHED_SETUP = Scenario("S1 99:1 lr0.1", n_rare=10, lr=0.1, epochs=5)
"""The setup of the published run (the first scenario of the default :class:`Config`)."""


@dataclasses.dataclass(frozen=True)
class Config:
  """The imbalance experiment's sizes and hyperparameters.

  Attributes:
    n_samples: training samples per epoch.
    n_tokens: input vocabulary (rows of the embedding table).
    dim: embedding width.
    n_classes: logits (label A is class 0, B is class 1).
    max_norm: the clipping threshold of the ``clip`` arm.
    eff_dim_every: the embedding's effective dimension is sampled every this many steps.
    scenarios: the training setups.
  """

  n_samples: int = 1000
  n_tokens: int = 4
  dim: int = 16
  n_classes: int = 4
  max_norm: float = 1.0
  eff_dim_every: int = 100
  scenarios: tuple[Scenario, ...] = (
      Scenario("S1 99:1 lr0.1", n_rare=10, lr=0.1, epochs=5),
      Scenario("S2 80:20 lr0.1", n_rare=200, lr=0.1, epochs=10),
      Scenario("S3 99:1 lr0.01", n_rare=10, lr=0.01, epochs=10),
  )

  @classmethod
  def quick(cls) -> Config:
    """The same scenarios with fewer epochs (2, 3, 3)."""
    return cls(
        scenarios=(
            Scenario("S1 99:1 lr0.1", n_rare=10, lr=0.1, epochs=2),
            Scenario("S2 80:20 lr0.1", n_rare=200, lr=0.1, epochs=3),
            Scenario("S3 99:1 lr0.01", n_rare=10, lr=0.01, epochs=3),
        )
    )


def run(config: Config, *, seeds: int | Iterable[int] = 10, progress: bool = True) -> dict:
  """Trains every scenario x seed x arm and returns every number (JSON-serialisable).

  Args:
    config: sizes and scenarios.
    seeds: a number of seeds (``10`` means 0-9) or the seeds themselves.
    progress: show a tqdm bar over the epochs of all scenarios.

  Returns:
    ``{"experiment": "imbalance", "config", "seeds", "arms", "published" ({metric: [no clip,
    clip]}), "published_source", "published_setup", "scenarios": {name: {"n_rare", "lr",
    "epochs", "per_seed": {arm: {metric: [value per seed]}}, "median": {arm: {metric: median}},
    "ratio": {metric: median none / median clip}, "curves": {"weight_norm": {arm: [...]},
    "eff_dim": {arm: [...]}, "rare_steps": [...]}}}}``; the curves are those of the first seed.
  """
  if config.n_samples % config.eff_dim_every:
    raise ValueError(
        f"`n_samples` ({config.n_samples}) must be a multiple of `eff_dim_every` "
        f"({config.eff_dim_every})"
    )
  seed_ids = _common.seed_list(seeds)
  keys = jnp.stack([jax.random.PRNGKey(s) for s in seed_ids])
  max_norms = jnp.array([np.inf, config.max_norm], jnp.float32)
  scenarios = {}
  total = sum(sc.epochs for sc in config.scenarios)
  bar = _common.progress_bar(range(total), enabled=progress, desc="imbalance", total=total)
  ticks = iter(bar)
  next(ticks, None)  # tqdm counts an item done when the next one is asked for
  on_epoch = lambda: next(ticks, None)

  for sc in config.scenarios:
    data = [make_data(config, sc.n_rare, s) for s in seed_ids]
    tokens = jnp.asarray(np.stack([d[0] for d in data]))
    labels = np.stack([d[1] for d in data])
    losses, grad_norms, weight_norms, embeddings, preds = _train(
        config, keys, tokens, jnp.asarray(labels), max_norms, jnp.float32(sc.lr), sc.epochs,
        on_epoch,
    )
    per_seed = {arm: {m: [] for m in METRICS} for arm in ARMS}
    for a, arm in enumerate(ARMS):
      for i in range(len(seed_ids)):
        row = _metrics(
            losses[a, i], grad_norms[a, i], weight_norms[a, i], embeddings[a, i], preds[a, i],
            labels[i], sc.epochs,
        )
        for m in METRICS:
          per_seed[arm][m].append(_common.number(row[m]))
    median = {
        arm: {m: _common.number(np.nanmedian(_floats(per_seed[arm][m]))) for m in METRICS}
        for arm in ARMS
    }
    ratio = {m: _ratio(median["none"][m], median["clip"][m]) for m in METRICS}
    rare_steps = np.flatnonzero(np.tile(labels[0], sc.epochs) == 1) + 1
    scenarios[sc.name] = {
        "n_rare": sc.n_rare,
        "lr": sc.lr,
        "epochs": sc.epochs,
        "per_seed": per_seed,
        "median": median,
        "ratio": ratio,
        "curves": {
            "weight_norm": {arm: _common.numbers(weight_norms[a, 0]) for a, arm in enumerate(ARMS)},
            "eff_dim": {
                arm: [effective_dim(e) for e in embeddings[a, 0]] for a, arm in enumerate(ARMS)
            },
            "rare_steps": [int(t) for t in rare_steps],
        },
    }
  return {
      "experiment": "imbalance",
      "config": dataclasses.asdict(config),
      "seeds": seed_ids,
      "arms": list(ARMS),
      "published": {m: list(v) for m, v in PUBLISHED.items()},
      "published_source": PUBLISHED_SOURCE,
      "published_setup": dataclasses.asdict(PUBLISHED_SETUP),
      "scenarios": scenarios,
  }


def _floats(xs: list) -> np.ndarray:
  return np.array([np.nan if x is None else x for x in xs], np.float64)


def _ratio(a: float | None, b: float | None) -> float | None:
  if a is None or b is None or b == 0:
    return None
  return _common.number(a / b)


def table(result: dict) -> str:
  """A markdown table: per scenario and metric, the medians over the seeds, the ratio
  no-clip/clip and the published value (first scenario only), then a note comparing every
  published row with the range of the seeds measured here."""
  source = result.get("published_source", PUBLISHED_SOURCE)
  header = [
      "scenario", "metric", "no clip", "clip", "ratio",
      f"published, {source} (no clip / clip)",
  ]
  rows = []
  first = next(iter(result["scenarios"]), None)
  for name, sc in result["scenarios"].items():
    for m in METRICS:
      published = result["published"].get(m) if name == first else None
      rows.append([
          name,
          LABELS[m],
          _common.fmt(sc["median"]["none"][m]),
          _common.fmt(sc["median"]["clip"][m]),
          "-" if sc["ratio"][m] is None else _common.fmt(sc["ratio"][m], 2),
          "-" if published is None else f"{published[0]:g} / {published[1]:g}",
      ])
  caption = (
      f"Medians over {len(result['seeds'])} seeds; ratio = no clip / clip; effective dim = "
      "exp(entropy of the normalised covariance eigenvalues of the embedding's rows), sampled "
      f"every {result['config']['eff_dim_every']} steps."
  )
  text = _common.markdown(header, rows) + "\n\n" + caption
  if first is not None and result["published"]:
    text += "\n\n" + published_note(result)
  return text


def published_note(result: dict) -> str:
  """The note under the table: where the published numbers come from, which rows agree with
  the seeds measured here (the published value inside their min-max range, in both arms) and,
  for each row that differs, the numbers and the likely reason."""
  name, sc = next(iter(result["scenarios"].items()))
  setup = result.get("published_setup", dataclasses.asdict(PUBLISHED_SETUP))
  source = result.get("published_source", PUBLISHED_SOURCE)
  n = len(result["seeds"])
  lines = [
      f"Published: {source}, one run (one seed) of S1 ({setup['n_rare']} rare samples, lr "
      f"{setup['lr']:g}, {setup['epochs']} epochs); measured: the {n} seeds here."
  ]
  mine = {"n_rare": sc["n_rare"], "lr": sc["lr"], "epochs": sc["epochs"]}
  other = {k: setup[k] for k in mine}
  if mine != other:
    lines.append(
        f"This run's {name} ({mine['n_rare']} rare, lr {mine['lr']:g}, {mine['epochs']} epochs) "
        "is not the published setup (a --quick run?): compare with care."
    )
  agree, differ = [], []
  for m, pub in result["published"].items():
    lo_hi = [_range(sc["per_seed"][arm][m]) for arm in ARMS]
    inside = all(
        r is not None and r[0] - 0.01 * abs(p) <= p <= r[1] + 0.01 * abs(p)
        for p, r in zip(pub, lo_hi, strict=True)
    )
    if inside:
      agree.append(LABELS[m])
      continue
    ranges = " / ".join("-" if r is None else f"{r[0]:.3g}-{r[1]:.3g}" for r in lo_hi)
    med = " / ".join(_common.fmt(sc["median"][arm][m]) for arm in ARMS)
    line = (
        f"- {LABELS[m]}: published {pub[0]:g} / {pub[1]:g}, measured {med} (median; seeds "
        f"{ranges}): outside the seeds' range."
    )
    line += " " + _direction(sc, m, pub, n)
    if m in PUBLISHED_NOTES:
      line += f" Why it can differ: {PUBLISHED_NOTES[m]}."
    differ.append(line)
  if agree:
    lines.append(
        "Agree (published value inside the seeds' range, both arms): " + ", ".join(agree) + "."
    )
  if differ:
    lines.append("Differ:")
    lines += differ
  return "\n".join(lines)


def _range(values: list) -> tuple[float, float] | None:
  xs = _floats(values)
  xs = xs[np.isfinite(xs)]
  return (float(xs.min()), float(xs.max())) if xs.size else None


def _direction(sc: dict, metric: str, pub: list, n: int) -> str:
  """Whether the seeds here agree with the published run on which arm is larger."""
  none, clip = _floats(sc["per_seed"]["none"][metric]), _floats(sc["per_seed"]["clip"][metric])
  if metric == "rare_loss":
    gap, published = float(np.nanmedian(clip - none)), pub[1] - pub[0]
    same = abs(gap - published) <= 0.15 * abs(published)
    return (
        f"Clipping changes it by {gap:+.2f} here (median over seeds) and by {published:+.2f} in "
        "the published run" + (": the effect agrees, the level differs." if same else ".")
    )
  if pub[1] == pub[0]:
    same = int(np.sum(clip == none))
    return f"Published: the same with and without clipping; here in {same} of {n} seeds."
  word, here = ("smaller", clip < none) if pub[1] < pub[0] else ("larger", clip > none)
  return f"Published: {word} with clipping; here {word} in {int(np.sum(here))} of {n} seeds."
