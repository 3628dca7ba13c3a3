"""Diagnostics: turn clipping metrics into a verdict a person can act on.

:func:`diagnose` reads the metrics of every clipax state (from :func:`clipax.metrics`, a history of
them, or an optax state directly) and returns a :class:`Verdict`; :func:`clipax.suggest_max_norm`
(in :mod:`clipax._suggest`) proposes a threshold from logged pre-clip norms.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import numpy as np

from clipax import _checks
from clipax._history import _as_history, _groups

Status = Literal[
    "healthy", "never_clipping", "clipping_often", "unclipped_spikes", "poisoned_threshold",
    "nonfinite", "invalid_hyperparameter",
]
"""What :func:`diagnose` found, from most to least severe: ``"invalid_hyperparameter"`` (recent
updates were zeroed for a NaN or out-of-range traced hyperparameter), ``"nonfinite"`` (recent
gradient norms were NaN or Inf; older ones only appear in the advice), ``"poisoned_threshold"`` (a
learned threshold is NaN, overflowed to Inf, or sits far above the norms, so it stopped catching
spikes), ``"unclipped_spikes"`` (recent norms far above the running median went through neither
clipped nor skipped), ``"clipping_often"`` (most recent steps were clipped or skipped),
``"never_clipping"`` (the threshold has caught nothing), ``"healthy"``. :func:`diagnose` gives
the exact rules."""

Kind = Literal["fixed", "adaptive", "guard", "spam"]
"""Which transformation a verdict read: a fixed-threshold clipper, an adaptive clipper (one that
reports a ``threshold``), a guard (``skip_nonfinite``/``skip_spikes``, it reports
``skipped_count``) or ``spam`` (it reports ``spikes``)."""

_SEVERITY: dict[str, int] = {
    "invalid_hyperparameter": 6, "nonfinite": 5, "poisoned_threshold": 4, "unclipped_spikes": 3,
    "clipping_often": 2, "never_clipping": 1, "healthy": 0,
}
_MIN_LEVEL = 3  # finite preceding norms needed before a running median is trusted
_MAD_TO_STD = 1.4826  # scales a median absolute deviation to a normal standard deviation


@dataclasses.dataclass(frozen=True)
class Verdict:
  """The result of :func:`diagnose`: a status, what to do about it, and the numbers behind it.

  Attributes:
    status: one of :data:`Status`.
    advice: what to do, written for the kind of transformation read (``kind``).
    source: the metrics prefix of the clipper the verdict is about (the most severe one when there
      are several), e.g. ``"clip/global_norm"``.
    steps: optimizer steps the clipper has seen.
    window: the steps the rates were computed over (all ``steps`` when only totals were given,
      else the most recent ``window`` steps of the history).
    clip_rate: fraction of those steps that were clipped (for ``spam``: that clipped an element).
    skip_rate: fraction of those steps that were skipped by a guard (0 without a guard).
    nonfinite_count: steps whose gradient norm was NaN or Inf (over the whole run).
    last_norm: the last pre-clip gradient norm (``None`` if not recorded or NaN).
    threshold: the last threshold reported (fixed or learned; ``None`` without one).
    guard: whether the state is a guard's (it skips steps rather than clipping them).
    kind: ``"fixed"``, ``"adaptive"``, ``"guard"`` or ``"spam"`` (see :data:`Kind`).
    recent_nonfinite: non-finite steps within ``window``.
    invalid_count: updates zeroed for an invalid traced hyperparameter (over the whole run).
    spike_steps: indices in the history (0 = its first entry) of the recent steps whose norm was
      far above the running median and that no clipax transformation clipped or skipped.

  Examples:
    >>> import clipax
    >>> m = {"clip/count": 500, "clip/clipped_count": 0, "clip/nonfinite_count": 0}
    >>> verdict = clipax.diagnose(m)
    >>> print(verdict.status, verdict.kind, verdict.healthy)
    never_clipping fixed False
  """

  status: Status
  advice: str
  source: str
  steps: int
  window: int
  clip_rate: float
  skip_rate: float
  nonfinite_count: int
  last_norm: float | None
  threshold: float | None
  guard: bool = False
  kind: Kind = "fixed"
  recent_nonfinite: int = 0
  invalid_count: int = 0
  spike_steps: tuple[int, ...] = ()

  @property
  def healthy(self) -> bool:
    """Whether the status is ``"healthy"``."""
    return self.status == "healthy"

  def __str__(self) -> str:
    span = f"last {self.window} steps" if self.window < self.steps else f"{self.steps} steps"
    if self.guard:
      parts = [f"skipped {100 * self.skip_rate:.1f}% of {span}"]
    else:
      parts = [f"clipped {100 * self.clip_rate:.1f}% of {span}"]
      if self.skip_rate > 0:
        parts.append(f"skipped {100 * self.skip_rate:.1f}%")
    if self.nonfinite_count:
      recent = "" if self.recent_nonfinite == self.nonfinite_count else (
          f" ({self.recent_nonfinite} recent)")
      parts.append(f"{self.nonfinite_count} non-finite{recent}")
    if self.invalid_count:
      parts.append(f"{self.invalid_count} invalid-hyperparameter")
    if self.spike_steps:
      parts.append(f"{len(self.spike_steps)} unclipped spikes at {_steps_text(self.spike_steps)}")
    if self.last_norm is not None:
      parts.append(f"last norm {self.last_norm:.4g}")
    if self.threshold is not None:
      parts.append(f"threshold {self.threshold:.4g}")
    return f"[{self.status}] {self.source}: {', '.join(parts)}. {self.advice}"


def _steps_text(steps: tuple[int, ...]) -> str:
  shown = ", ".join(map(str, steps[:8]))
  return f"history steps [{shown}{', ...' if len(steps) > 8 else ''}]"


def _kind(g: dict[str, np.ndarray]) -> Kind:
  if "spikes" in g:
    return "spam"
  if "skipped_count" in g and "clipped_count" not in g:
    return "guard"
  # adaptive clippers report how many norms their statistics absorbed; every clipper reports its
  # threshold (in clipax 0.1 logs, only the adaptive ones did, and none reported update_norm)
  if "observed" in g or ("threshold" in g and "update_norm" not in g):
    return "adaptive"
  return "fixed"


def _acted(g: dict[str, np.ndarray]) -> np.ndarray:
  """Per history entry: whether this transformation clipped or skipped the step."""
  acted = np.zeros(g["count"].size, bool)
  for field in ("clipped", "skipped", "spikes"):
    if field in g:
      acted |= g[field] > 0
  return acted


def _growth(g: dict[str, np.ndarray], counter: str, flag: np.ndarray | None, span: int) -> float:
  """How much a cumulative counter grew over the last ``span`` entries of a history.

  When the history is no longer than ``span``, the counter's value before the first entry is 0 if
  the history starts at step 1, else its first value less that entry's own ``flag`` (0 if the
  flag is not logged).
  """
  total = g.get(counter)
  if total is None:
    return 0.0
  if total.size > span:
    return float(total[-1] - total[-span - 1])
  if g["count"][0] <= 1:
    return float(total[-1])
  first = 0.0 if flag is None else float(flag[0])
  return float(total[-1] - total[0] + first)


def _unclipped_spikes(
    norm: np.ndarray, acted: np.ndarray, span: int, window: int, factor: float
) -> tuple[int, ...]:
  """Indices among the last ``span`` entries whose finite norm is more than ``factor`` times the
  median of the finite norms of the ``window`` entries before it, and more than ``factor``
  robust standard deviations (1.4826 * MAD) above that median, and which nothing acted on."""
  x = np.where(np.isfinite(norm), norm, np.nan)
  n = x.size
  region = x[max(0, n - span - window):]
  if np.all(np.isnan(region)):
    return ()
  floor = np.nanmin(region)  # a lower bound of every running median: a cheap first filter
  found = []
  for i in range(n - span, n):
    if acted[i] or np.isnan(x[i]) or not x[i] > factor * floor:
      continue
    prev = x[max(0, i - window):i]
    prev = prev[~np.isnan(prev)]
    if prev.size < _MIN_LEVEL:
      continue
    level = float(np.median(prev))
    spread = _MAD_TO_STD * float(np.median(np.abs(prev - level)))
    if level > 0 and x[i] > factor * level and x[i] > level + factor * spread:
      found.append(i)
  return tuple(found)


def _poisoned(
    g: dict[str, np.ndarray], span: int, steps: int, min_steps: int, factor: float
) -> str | None:
  """Why the last threshold is poisoned, or ``None`` if it is not (see :func:`diagnose`)."""
  thr = g.get("threshold")
  if thr is None:
    return None
  t = float(thr[-1])
  if math.isnan(t) or t < 0:
    return f"{t}"
  if math.isinf(t):
    # inf means "not detecting yet" (warm-up); once it has been finite, it means overflow.
    return "inf after having been finite" if np.any(np.isfinite(thr[:-1])) else None
  norm = g.get("norm")
  if norm is None or steps < min_steps:
    return None
  recent = norm[-span:]
  recent = recent[np.isfinite(recent)]
  if recent.size == 0:
    return None
  level = float(np.median(recent))
  if level > 0 and t > factor * level:
    return f"{t:.4g}, {t / level:.0f}x the median norm {level:.4g}"
  return None


# Advice per (status, kind); "spike_guard" is a guard with a spike rule (skip_spikes). Fields:
# {span} recent steps, {why} the poisoned threshold, {head} the unclipped spikes, {act} the verb.
_ADVICE: dict[tuple[str, str], str] = {
    ("invalid_hyperparameter", ""): "Recent updates were zeroed because a traced hyperparameter "
    "(a schedule, an inject_hyperparams value) was NaN or out of its range: check it.",
    ("nonfinite", ""): "Non-finite gradient norms in the last {span} steps (those steps were "
    "{act}): look for an overflow (learning rate, loss scale, bf16/fp16 range) or a bad batch.",
    ("poisoned_threshold", ""): "The threshold is {why}: its statistics were inflated (a spike or "
    "an overflow got in, or a warm-up cap far above the norms), so it no longer catches spikes; "
    "cap it with `max_norm` or re-initialise the clipper's state.",
    ("poisoned_threshold", "spike_guard"): "The threshold is {why}: huge norms accepted while the "
    "guard was warming up fill more than half of its window, so its median and MAD are "
    "inflated and further spikes go through until they leave it; clip before the guard "
    "(clip_by_global_norm) to bound what it accepts.",
    ("unclipped_spikes", "fixed"): "{head} unclipped: the threshold is above them; lower it "
    "(clipax.suggest_max_norm).",
    ("unclipped_spikes", "adaptive"): "{head} unclipped: the learned threshold was warming up or "
    "inflated; cap it with `max_norm`, or make the rule stricter.",
    ("unclipped_spikes", "spike_guard"): "{head} unskipped: the guard was warming up or its "
    "statistics were inflated; clip before the guard, or lower `warmup`.",
    ("unclipped_spikes", "guard"): "{head}: skip_nonfinite only skips non-finite steps; add a "
    "clipper or use clipax.skip_spikes.",
    ("unclipped_spikes", "spam"): "{head} with no element clipped: lower `theta`, or clip the "
    "global norm before SpAM.",
    ("clipping_often", "fixed"): "Most recent steps hit the fixed threshold, so it is acting as "
    "the learning rate: lower the learning rate or check the data (or raise the threshold, see "
    "clipax.suggest_max_norm).",
    ("clipping_often", "adaptive"): "The learned threshold clips most recent steps, so it is "
    "acting as the learning rate: by design for a low autoclip percentile; else loosen the rule "
    "(z_threshold, percentile, ratio) or lower the learning rate.",
    ("clipping_often", "guard"): "The guard skipped most recent steps, so training has nearly "
    "stopped: check the data and the learning rate, or raise the guard's `threshold`.",
    ("clipping_often", "spam"): "SpAM clipped spike elements on most recent steps: raise `theta` "
    "or lower the learning rate.",
    ("never_clipping", "fixed"): "The threshold catches nothing: it only guards against future "
    "spikes; to clip the tail of the norm distribution use clipax.suggest_max_norm on logged "
    "norms.",
    ("never_clipping", "adaptive"): "The learned threshold catches nothing: the norms are "
    "steady; make the rule stricter (z_threshold, percentile, ratio) to clip their tail.",
    ("never_clipping", "guard"): "The guard has skipped nothing: no step was non-finite or "
    "flagged as a spike; it is insurance.",
    ("never_clipping", "spam"): "SpAM catches nothing: no gradient element was a spike; lower "
    "`theta` to clip more.",
    ("quiet", ""): "Nothing was {act} recently; earlier outliers were caught.",
    ("occasional", ""): "{Act} only the occasional outlier step.",
    ("sizeable", ""): "{Act} a sizeable share of steps, below `clip_rate_high`: the threshold is "
    "close to the typical norm; watch the trend (clipax.suggest_max_norm).",
    ("sizeable", "adaptive"): "{Act} a sizeable share of steps, below `clip_rate_high`: expected "
    "of percentile rules such as autoclip; watch the trend.",
}


def _advice(status: str, kind: Kind, g: dict[str, np.ndarray], info: dict[str, Any]) -> str:
  if status == "healthy":
    busy = info["busy"]
    status = "quiet" if busy == 0 else "occasional" if busy < 0.2 else "sizeable"
  key = "spike_guard" if kind == "guard" and "spike_count" in g else kind
  act = "skipped" if kind == "guard" else "clipped"
  if status == "nonfinite" and kind not in ("guard", "spam"):
    act = "zeroed (or NaN with nonfinite='propagate')"
  elif status == "nonfinite":
    act = "skipped"
  n = len(info["spikes"])
  head = (f"{n} recent step{'s' if n > 1 else ''} ({_steps_text(info['spikes'])}) had a norm "
          f"over {info['factor']:g}x the running median and went through")
  text = next(_ADVICE[k] for k in ((status, key), (status, kind), (status, "")) if k in _ADVICE)
  return text.format(span=info["span"], why=info["poisoned"], head=head, act=act,
                     Act=act.capitalize())


def _verdict(
    source: str, g: dict[str, np.ndarray], acted_any: np.ndarray, opts: dict[str, Any]
) -> Verdict:
  window, min_steps = opts["window"], opts["min_steps"]
  kind = _kind(g)
  count = g["count"]
  steps = int(count[-1])
  history = count.size > 1
  norm = g.get("norm")
  # Entries of a history are one step apart; the steps before the history began are not known.
  span = int(min(window, steps, count.size)) if history else steps
  if kind == "spam" and not history:
    span = 1  # spam logs the last step's spikes only
  if history:
    flags = {f: g[f] > 0 for f in ("clipped", "skipped", "spikes") if f in g}
    clip_flag = flags.get("spikes", flags.get("clipped"))
    clip_events = (float(np.sum(clip_flag[-span:])) if clip_flag is not None
                   else _growth(g, "clipped_count", None, span))
    skip_events = _growth(g, "skipped_count", flags.get("skipped"), span)
    nonfinite_flag = None if norm is None else ~np.isfinite(norm)
    recent_nonfinite = _growth(g, "nonfinite_count", nonfinite_flag, span)
    recent_invalid = _growth(g, "invalid_count", None, span)
  else:
    clip_events = float(g["spikes"][-1] > 0) if kind == "spam" else float(
        g.get("clipped_count", np.zeros(1))[-1])
    skip_events = float(g.get("skipped_count", np.zeros(1))[-1])
    recent_nonfinite = float(g.get("nonfinite_count", np.zeros(1))[-1])
    recent_invalid = float(g.get("invalid_count", np.zeros(1))[-1])
  denom = max(span, 1)
  clip_rate, skip_rate = clip_events / denom, skip_events / denom
  nonfinite = int(g.get("nonfinite_count", np.zeros(1))[-1])
  invalid = int(g.get("invalid_count", np.zeros(1))[-1])
  # Over the whole run: a history's first entry may not be step 1, the counters know.
  if "clipped_count" in g:
    ever = float(g["clipped_count"][-1])
  elif kind == "spam":  # spam has no counter: what the history shows, if it starts at step 1
    ever = float(np.sum(g["spikes"] > 0)) if history and count[0] <= 1 else math.nan
  else:
    ever = float(np.sum(g.get("clipped", np.zeros(1))))
  ever += float(g.get("skipped_count", np.zeros(1))[-1])
  spikes: tuple[int, ...] = ()
  if history and norm is not None:
    acted = acted_any | ~np.isfinite(norm)
    spikes = _unclipped_spikes(norm, acted, span, window, opts["spike_factor"])
  poisoned = (None if kind == "fixed"
              else _poisoned(g, span, steps, min_steps, opts["threshold_factor"]))

  if recent_invalid > 0:
    status: Status = "invalid_hyperparameter"
  elif recent_nonfinite > 0:
    status = "nonfinite"
  elif poisoned is not None:
    status = "poisoned_threshold"
  elif spikes:
    status = "unclipped_spikes"
  elif steps > 0 and clip_rate + skip_rate >= opts["clip_rate_high"]:
    status = "clipping_often"
  elif steps >= min_steps and ever == 0:
    status = "never_clipping"
  else:
    status = "healthy"
  info = {"span": span, "poisoned": poisoned, "spikes": spikes, "busy": clip_rate + skip_rate,
          "factor": opts["spike_factor"]}
  advice = _advice(status, kind, g, info)
  if nonfinite and recent_nonfinite == 0:
    advice += f" ({nonfinite} non-finite steps earlier in the run, none in the last {span}.)"
  if invalid and recent_invalid == 0:
    advice += f" ({invalid} steps zeroed for an invalid hyperparameter earlier in the run.)"
  last_norm = None if norm is None or math.isnan(norm[-1]) else float(norm[-1])
  threshold = None if "threshold" not in g else float(g["threshold"][-1])
  return Verdict(
      status=status, advice=advice, source=source, steps=steps, window=span,
      clip_rate=clip_rate, skip_rate=skip_rate, nonfinite_count=nonfinite, last_norm=last_norm,
      threshold=threshold, guard=kind == "guard", kind=kind,
      recent_nonfinite=int(recent_nonfinite), invalid_count=invalid, spike_steps=spikes,
  )


def diagnose(
    metrics_or_state: Any,
    *,
    window: int = 100,
    clip_rate_high: float = 0.5,
    min_steps: int = 100,
    spike_factor: float = 10.0,
    threshold_factor: float = 10.0,
    prefix: str = "clip",
) -> Verdict:
  """A verdict on how clipping is going, from metrics or an optax state.

  The rules, checked in this order (for each clipax state found; the most severe verdict wins):

  1. ``"invalid_hyperparameter"``: ``invalid_count`` grew within the recent steps.
  2. ``"nonfinite"``: ``nonfinite_count`` grew within the recent steps. Non-finite steps before
     them are reported in ``nonfinite_count`` and the advice, not in the status.
  3. ``"poisoned_threshold"``: the last ``threshold`` of an adaptive clipper or spike guard is NaN
     or negative; or ``inf`` after an earlier entry of the history had a finite one (``inf``
     otherwise means "still warming up"); or, once ``min_steps`` steps were seen, above
     ``threshold_factor`` times the median finite norm of the recent steps.
  4. ``"unclipped_spikes"`` (histories only): a recent step whose norm is finite, more than
     ``spike_factor`` times the *running median* (the median of the finite norms of the
     ``window`` entries before it, at least 3 of them) and more than ``spike_factor`` robust
     standard deviations (1.4826 times their median absolute deviation) above it, and that no
     clipax transformation in the metrics clipped or skipped. ``Verdict.spike_steps`` lists them.
  5. ``"clipping_often"``: at least ``clip_rate_high`` of the recent steps were clipped or skipped.
     The threshold is then doing the work of the learning rate.
  6. ``"never_clipping"``: after at least ``min_steps`` steps nothing was ever clipped or skipped
     (over the whole run, from the counters, whatever ``window``).
  7. ``"healthy"`` otherwise: only occasional outliers are clipped.

  "Recent" is the last ``window`` steps when a history is given (a list of per-step metric dicts,
  or a dict of per-step arrays, e.g. stacked by ``jax.lax.scan``), and the whole run when only
  totals are given (one ``clipax.metrics(...)`` dict or an optax state; ``spam`` logs only its
  last step's spikes, so its rate is then that step's). The advice is written for the kind of
  transformation read (``Verdict.kind``).

  Args:
    metrics_or_state: the dict from :func:`clipax.metrics`, a list of them (one per step, all with
      the same keys), a dict of per-step arrays with the same keys and length, or any optax state
      containing clipax states.
    window: how many recent steps the rates, the non-finite check and the spike check use when a
      history is given (integer in [1, 2**31 - 1]).
    clip_rate_high: the clip-plus-skip rate in (0, 1] at or above which the verdict is
      ``"clipping_often"``.
    min_steps: steps needed before ``"never_clipping"`` or a threshold far above the norms is
      reported (integer in [0, 2**31 - 1]).
    spike_factor: how far (> 1) above the running median a norm must be to be a spike.
    threshold_factor: how far (> 1) above the median norm a threshold must be to be poisoned.
    prefix: the prefix the metrics were written with (used when a state is passed).

  Returns:
    A :class:`Verdict`; ``str(verdict)`` reads as one line.

  Raises:
    ValueError: if no clipax metrics or state are found, if a history's entries do not all have
      the same keys (naming the key and the entry) or its arrays the same length, or for invalid
      ``window``, ``clip_rate_high``, ``min_steps``, ``spike_factor`` or ``threshold_factor``.
    TypeError: if an entry is not a dict or a metric not a scalar number (naming the key and the
      entry), or for an argument of the wrong type.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import clipax
    >>> tx = optax.chain(clipax.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> params = {"w": jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> for _ in range(4):
    ...   _, state = tx.update({"w": jnp.full(3, 2.0)}, state, params)
    >>> verdict = clipax.diagnose(state)
    >>> print(verdict.status, f"{verdict.clip_rate:.2f}")
    clipping_often 1.00

    A spike that a loose fixed threshold let through:

    >>> history = [{"clip/norm": n, "clip/clipped": False, "clip/clipped_count": 0,
    ...             "clip/nonfinite_count": 0, "clip/count": i + 1}
    ...            for i, n in enumerate([1.0, 1.1, 0.9, 1.0, 50.0, 1.0])]
    >>> verdict = clipax.diagnose(history)
    >>> print(verdict.status, verdict.spike_steps)
    unclipped_spikes (4,)
  """
  _checks.number("window", window, low=1, integer=True, allow_array=False)
  _checks.number("clip_rate_high", clip_rate_high, low=0.0, low_open=True, high=1.0,
                 high_open=False, allow_array=False)
  _checks.number("min_steps", min_steps, low=0, integer=True, allow_array=False)
  _checks.number("spike_factor", spike_factor, low=1.0, low_open=True, allow_array=False)
  _checks.number("threshold_factor", threshold_factor, low=1.0, low_open=True, allow_array=False)
  if not isinstance(prefix, str):
    raise TypeError(f"`prefix` must be a str, got {prefix!r} of type {type(prefix).__name__}")
  groups = _groups(_as_history(metrics_or_state, prefix))
  if not groups:
    raise ValueError("`metrics_or_state` has no clipax metrics with a `count` entry")
  acted_any = np.zeros(next(iter(groups.values()))["count"].size, bool)
  for g in groups.values():
    acted_any |= _acted(g)
  opts = {"window": int(window), "clip_rate_high": float(clip_rate_high),
          "min_steps": int(min_steps), "spike_factor": float(spike_factor),
          "threshold_factor": float(threshold_factor)}
  verdicts = [_verdict(s, g, acted_any, opts) for s, g in groups.items()]
  return max(verdicts, key=lambda v: _SEVERITY[v.status])
