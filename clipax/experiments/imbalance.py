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
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import clipax
from clipax.experiments import _common

ARMS = ("none", "clip")
"""The two arms: plain SGD, and SGD after ``clip_by_global_norm(max_norm)``."""

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


def make_data(config: Config, n_rare: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``(tokens, labels)`` for one seed: uniform tokens, label 1 (B) at ``n_rare`` positions.

  Uses ``numpy.random.default_rng(seed)``: tokens first, then the rare positions.
  """
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, config.n_tokens, size=config.n_samples)
  labels = np.zeros(config.n_samples, np.int32)
  labels[rng.choice(config.n_samples, size=n_rare, replace=False)] = 1
  return tokens.astype(np.int32), labels


def init_params(config: Config, key: jax.Array) -> dict[str, jax.Array]:
  """PyTorch-default init: embedding N(0, 1); linear weight and bias U(+-1/sqrt(dim))."""
  k_emb, k_w, k_b = jax.random.split(key, 3)
  bound = 1.0 / float(np.sqrt(config.dim))
  return {
      "embedding": jax.random.normal(k_emb, (config.n_tokens, config.dim), jnp.float32),
      "kernel": jax.random.uniform(
          k_w, (config.dim, config.n_classes), jnp.float32, -bound, bound
      ),
      "bias": jax.random.uniform(k_b, (config.n_classes,), jnp.float32, -bound, bound),
  }


def _loss(params: dict[str, jax.Array], token: jax.Array, label: jax.Array) -> jax.Array:
  logits = params["embedding"][token] @ params["kernel"] + params["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, label)


def _weight_norm(params: dict[str, jax.Array]) -> jax.Array:
  """The global L2 norm of the parameters (small float32 values: a plain sum of squares)."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(p)) for p in jax.tree_util.tree_leaves(params)))


@functools.partial(jax.jit, static_argnames="config")
def _init_all(keys: jax.Array, *, config: Config) -> dict[str, jax.Array]:
  """``init_params`` vmapped over seeds, then over the two arms (same init in both)."""
  params = jax.vmap(functools.partial(init_params, config))(keys)
  return jax.tree_util.tree_map(lambda p: jnp.stack([p] * len(ARMS)), params)


def _epoch(params, opt_state, tokens, labels, max_norm, lr, *, every: int):
  """One pass of per-sample SGD over the data in its fixed order, as one ``lax.scan``."""
  tx = optax.chain(clipax.clip_by_global_norm(max_norm), optax.sgd(lr))

  def step(carry, sample):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(_loss)(params, *sample)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    # The clipper's state holds the pre-clip gradient norm: no second norm computation.
    out = (loss, opt_state[0].norm, _weight_norm(params), params["embedding"])
    return (params, opt_state), out

  (params, opt_state), (losses, grad_norms, weight_norms, embeddings) = jax.lax.scan(
      step, (params, opt_state), (tokens, labels)
  )
  return params, opt_state, losses, grad_norms, weight_norms, embeddings[every - 1 :: every]


@functools.partial(jax.jit, static_argnames="every")
def _epoch_all(params, opt_state, tokens, labels, max_norms, lr, *, every: int):
  """``_epoch`` vmapped over seeds (params, state, data) and then over arms (params, state,
  max_norm). Its shapes do not depend on the scenario, so it compiles once."""
  epoch = functools.partial(_epoch, every=every)
  over_seeds = jax.vmap(epoch, in_axes=(0, 0, 0, 0, None, None))
  return jax.vmap(over_seeds, in_axes=(0, 0, None, None, 0, None))(
      params, opt_state, tokens, labels, max_norms, lr
  )


def _opt_state(params: dict[str, jax.Array]):
  tx = optax.chain(clipax.clip_by_global_norm(1.0), optax.sgd(0.1))
  return jax.vmap(jax.vmap(tx.init))(params)


def _train(config: Config, keys, tokens, labels, max_norms, lr, epochs: int, on_epoch) -> tuple:
  """Every arm and seed of one scenario; arrays shaped ``[arm, seed, ...]`` (numpy)."""
  params = _init_all(keys, config=config)
  opt_state = _opt_state(params)
  every = config.eff_dim_every
  n_seeds = keys.shape[0]
  weight_norms = [np.asarray(jax.vmap(jax.vmap(_weight_norm))(params))[..., None]]
  embeddings = [np.asarray(params["embedding"])[:, :, None]]
  losses, grad_norms = [], []
  for _ in range(epochs):
    params, opt_state, loss, grad_norm, weight_norm, emb = _epoch_all(
        params, opt_state, tokens, labels, max_norms, lr, every=every
    )
    on_epoch()
    losses.append(np.asarray(loss))
    grad_norms.append(np.asarray(grad_norm))
    weight_norms.append(np.asarray(weight_norm))
    embeddings.append(np.asarray(emb))
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  tok = np.asarray(tokens)
  seeds = np.arange(n_seeds)[:, None]
  logits = np.einsum("asnd,asdc->asnc", p["embedding"][:, seeds, tok], p["kernel"])
  preds = np.argmax(logits + p["bias"][:, :, None, :], axis=-1)
  cat = lambda xs: np.concatenate(xs, axis=2)
  return cat(losses), cat(grad_norms), cat(weight_norms), cat(embeddings), preds


def effective_dim(embedding: np.ndarray) -> float:
  """``exp(entropy)`` of the covariance eigenvalues of the embedding rows, normalised to sum 1.

  The covariance is over the tokens (rows) as samples; its non-zero eigenvalues are those of the
  centred Gram matrix, computed here in float64.

  Examples:
    >>> import numpy as np
    >>> print(f"{effective_dim(np.eye(4)):.3f}")  # 4 orthogonal rows, centred: 3 equal directions
    3.000
  """
  e = np.asarray(embedding, np.float64)
  c = e - e.mean(axis=0, keepdims=True)
  eig = np.clip(np.linalg.eigvalsh(c @ c.T / max(e.shape[0] - 1, 1)), 0.0, None)
  total = eig.sum()
  if total <= 0:
    return 0.0
  p = eig[eig > total * 1e-12] / total
  return float(np.exp(-np.sum(p * np.log(p))))


def _metrics(losses, grad_norms, weight_norms, embeddings, preds, labels, epochs) -> dict:
  """The per-run metrics (float64 numpy) of one seed and arm."""
  rare = np.tile(labels, epochs) == 1
  eff = np.array([effective_dim(e) for e in embeddings])
  b = labels == 1
  return {
      "max_weight_change": float(np.max(np.abs(np.diff(weight_norms)))),
      "weight_norm_std": float(np.std(weight_norms)),
      "eff_dim_std": float(np.std(eff)),
      "rare_loss": float(np.mean(losses[rare])) if rare.any() else float("nan"),
      "b_accuracy": float(np.mean(preds[b] == 1)) if b.any() else float("nan"),
      "max_grad_norm": float(np.max(grad_norms)),
  }


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


def _max_eff_dim(config: dict) -> int:
  """The largest possible effective dimension: the rank of the centred embedding."""
  return min(config["n_tokens"] - 1, config["dim"])


def plot(result: dict, out_dir: pathlib.Path) -> list[pathlib.Path]:
  """The weight norm over training (first seed, rare samples marked) and the embedding's
  effective dimension, one panel per scenario for each. Returns the two PNG paths."""
  from matplotlib.lines import Line2D

  plt = _common.pyplot()
  scenarios = result["scenarios"]
  n = len(scenarios)
  seed = result["seeds"][0]
  styles = {
      "none": {"color": "tab:red", "ls": "-", "lw": 1.1},
      "clip": {"color": "tab:blue", "ls": "--", "lw": 1.3},
  }
  names = {"none": "no clipping", "clip": f"clip_by_global_norm({result['config']['max_norm']:g})"}
  fig, axes = plt.subplots(n, 1, figsize=(10, 2.7 * n + 0.8), squeeze=False,
                           layout="constrained")
  marked = False
  for ax, (name, sc) in zip(axes[:, 0], scenarios.items(), strict=True):
    for arm in ARMS:
      ax.plot(sc["curves"]["weight_norm"][arm], label=names[arm], **styles[arm])
    rare = sc["curves"]["rare_steps"]
    med = sc["median"]
    title = (
        f"{name}: largest one-step change of ||w|| {_common.fmt(med['none']['max_weight_change'])}"
        f" without clipping, {_common.fmt(med['clip']['max_weight_change'])} with (median over "
        "seeds)"
    )
    if len(rare) <= 100:  # beyond that the marks hide the curves
      marked = True
      for t in rare:
        ax.axvline(t, color="0.55", lw=0.7, alpha=0.6, zorder=0)
    else:
      title += f"; {len(rare)} rare samples, not marked"
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("||w|| (global L2\nnorm of all weights)")
  axes[-1, 0].set_xlabel(f"SGD step (one sample per step; seed {seed})")
  handles = [Line2D([], [], label=names[arm], **styles[arm]) for arm in ARMS]
  if marked:
    handles.append(Line2D([], [], color="0.55", lw=0.7, label="a rare B sample"))
  fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=9, frameon=False)
  ratios = [sc["ratio"]["max_weight_change"] for sc in scenarios.values()]
  ratios = [r for r in ratios if r is not None]
  span = f"{min(ratios):.1f}-{max(ratios):.1f}x" if ratios else "?"
  fig.suptitle(
      "Without clipping each rare sample yanks the weights (the drops at the grey lines); "
      f"clipping makes the largest one-step change {span} smaller",
      fontsize=10.5,
  )
  paths = [_common.save(fig, out_dir, "imbalance_weight_norm.png")]

  fig, axes = plt.subplots(1, n, figsize=(4.3 * n, 3.9), squeeze=False, sharey=True,
                           layout="constrained")
  every = result["config"]["eff_dim_every"]
  top = _max_eff_dim(result["config"])
  values = [v for sc in scenarios.values() for arm in ARMS for v in sc["curves"]["eff_dim"][arm]]
  moves = {arm: (0.0, "") for arm in ARMS}
  for ax, (name, sc) in zip(axes[0], scenarios.items(), strict=True):
    for k, (arm, marker) in enumerate(zip(ARMS, ("o", "s"), strict=True)):
      eff = np.asarray(sc["curves"]["eff_dim"][arm], np.float64)
      move = float(np.max(np.abs(eff - eff[0])))
      moves[arm] = max(moves[arm], (move, name))
      # Markers at alternating samples, the dashed line on top: both show where they coincide.
      gap = max(len(eff) // 10, 1)
      ax.plot(np.arange(len(eff)) * every, eff, marker=marker, ms=4, zorder=2 + k,
              markevery=((k * gap) // 2, gap), **styles[arm])
    ax.axhline(top, color="k", lw=1, ls=":")
    ax.set_title(name, fontsize=9.5)
    ax.set_xlabel(f"SGD step (seed {seed})")
  # A fixed relative span, the top fifth of the possible range, so that a change of a few
  # thousandths does not fill the panel; wider if the data needs it.
  low = min(0.8 * top, min(values, default=top) - 0.05 * top)
  axes[0, 0].set_ylim(low, 1.04 * top)
  axes[0, 0].set_ylabel(
      "effective dimension of the embedding\n= exp(entropy of its normalised\n"
      f"covariance eigenvalues); max {top}"
  )
  handles = [Line2D([], [], marker=mk, ms=3.5, label=names[arm], **styles[arm])
             for arm, mk in zip(ARMS, ("o", "s"), strict=True)]
  handles.append(Line2D([], [], color="k", lw=1, ls=":",
                        label=f"maximum: {top} directions ({result['config']['n_tokens']} "
                              "centred rows)"))
  fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=9, frameon=False)
  (clip, _), (none, worst) = moves["clip"], moves["none"]
  fig.suptitle(
      f"With clipping the embedding's effective dimension stays within {clip:.3f} of its start; "
      f"without, it moves by up to {none:.3f} ({worst}), out of a maximum of {top}",
      fontsize=10.5,
  )
  paths.append(_common.save(fig, out_dir, "imbalance_effective_dim.png"))
  return paths
