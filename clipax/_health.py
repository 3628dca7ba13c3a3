"""Diagnostics: turn clipping metrics into a verdict a person can act on.

:func:`diagnose` reads the metrics of every clipax state (from :func:`clipax.metrics`, a history of
them, or an optax state directly) and returns a :class:`Verdict`; :func:`suggest_max_norm` proposes
a threshold from logged pre-clip norms.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from clipax import _checks
from clipax._state import metrics as _metrics

Status = Literal["healthy", "clipping_often", "never_clipping", "nonfinite"]
"""What :func:`diagnose` found, from most to least severe: ``"nonfinite"`` (NaN/Inf gradient norms
were seen), ``"clipping_often"`` (most recent steps were clipped or skipped), ``"never_clipping"``
(the threshold has caught nothing), ``"healthy"``."""

_SEVERITY: dict[str, int] = {"nonfinite": 3, "clipping_often": 2, "never_clipping": 1, "healthy": 0}


@dataclasses.dataclass(frozen=True)
class Verdict:
  """The result of :func:`diagnose`: a status, what to do about it, and the numbers behind it.

  Attributes:
    status: ``"healthy"``, ``"clipping_often"``, ``"never_clipping"`` or ``"nonfinite"``.
    advice: one sentence on what to do.
    source: the metrics prefix of the clipper the verdict is about (the most severe one when there
      are several), e.g. ``"clip"`` or ``"clip/1"``.
    steps: optimizer steps the clipper has seen.
    window: the steps the rates were computed over (all ``steps`` when only totals were given,
      else the most recent ``window`` steps of the history).
    clip_rate: fraction of those steps that were clipped.
    skip_rate: fraction of those steps that were skipped by a guard (0 without a guard).
    guard: whether the state is a guard's (it skips steps rather than clipping them).
    nonfinite_count: steps whose gradient norm was NaN or Inf (over the whole run).
    last_norm: the last pre-clip gradient norm (``None`` if not recorded).
    threshold: the last threshold of an adaptive clipper (``None`` for fixed thresholds).

  Examples:
    >>> import clipax
    >>> m = {"clip/count": 500, "clip/clipped_count": 0, "clip/nonfinite_count": 0}
    >>> verdict = clipax.diagnose(m)
    >>> print(verdict.status, verdict.healthy)
    never_clipping False
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
      parts.append(f"{self.nonfinite_count} non-finite")
    if self.last_norm is not None:
      parts.append(f"last norm {self.last_norm:.4g}")
    if self.threshold is not None:
      parts.append(f"threshold {self.threshold:.4g}")
    return f"[{self.status}] {self.source}: {', '.join(parts)}. {self.advice}"


def _is_metrics(x: Any) -> bool:
  return isinstance(x, Mapping) and any(
      isinstance(k, str) and (k.endswith("/count") or k.endswith("/clip_rate")) for k in x
  )


def _as_history(x: Any, prefix: str) -> dict[str, np.ndarray]:
  """Metrics as ``{key: float64 array of shape [steps]}`` (one step when only totals are known)."""
  if isinstance(x, Sequence) and not isinstance(x, (str, bytes)) and x and _is_metrics(x[0]):
    keys = list(x[0])
    return {k: np.asarray([np.asarray(m[k], np.float64) for m in x]).reshape(len(x)) for k in keys}
  if not _is_metrics(x):
    x = _metrics(x, prefix=prefix)
    if not x:
      raise ValueError(
          "`metrics_or_state` holds no clipax state: pass the dict from clipax.metrics(...), a "
          "list of them, or an optax state containing a clipax clipper"
      )
  return {k: np.atleast_1d(np.asarray(v, np.float64)).ravel() for k, v in x.items()}


def _groups(history: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  groups: dict[str, dict[str, np.ndarray]] = {}
  for key, value in history.items():
    head, _, field = key.rpartition("/")
    groups.setdefault(head, {})[field] = value
  return {head: g for head, g in groups.items() if "count" in g}


def _recent(total: np.ndarray, window: int) -> float:
  """How much a cumulative counter grew over the last ``window`` entries of its history."""
  if total.size <= window:
    return float(total[-1])
  return float(total[-1] - total[-window - 1])


def _verdict(
    source: str, g: dict[str, np.ndarray], window: int, clip_rate_high: float, min_steps: int
) -> Verdict:
  count = g["count"]
  steps = int(count[-1])
  history = count.size > 1
  if history:
    # Entries of a history are one step apart; the steps before the history began are not known.
    span = int(min(window, steps, count.size))
    clipped = g.get("clipped")
    clip_events = (
        float(np.sum(clipped[-span:])) if clipped is not None
        else _recent(g.get("clipped_count", np.zeros_like(count)), span)
    )
  else:
    span = steps
    clip_events = float(g.get("clipped_count", np.zeros(1))[-1])
  skipped = g.get("skipped_count")
  skip_events = 0.0 if skipped is None else (_recent(skipped, span) if history else skipped[-1])
  denom = max(span, 1)
  clip_rate, skip_rate = clip_events / denom, float(skip_events) / denom
  nonfinite = int(g.get("nonfinite_count", np.zeros(1))[-1])
  # Over the whole run: a history's first entry may not be step 1, the counters know.
  ever_clipped = (
      float(g["clipped_count"][-1]) if "clipped_count" in g
      else float(np.sum(g.get("clipped", np.zeros(1))))
  )
  ever_skipped = 0.0 if skipped is None else float(skipped[-1])
  norm = g.get("norm")
  last_norm = None if norm is None else float(norm[-1])
  threshold = None if "threshold" not in g else float(g["threshold"][-1])

  if nonfinite > 0:
    status: Status = "nonfinite"
    advice = (
        "Non-finite gradient norms were seen (those steps were zeroed or skipped): look for an "
        "overflow (learning rate, loss scale, bf16/fp16 range) or a bad batch."
    )
  elif steps > 0 and clip_rate + skip_rate >= clip_rate_high:
    status = "clipping_often"
    advice = (
        "Most recent steps hit the threshold, so it is acting as the learning rate: lower the "
        "learning rate or check the data (or raise the threshold, see clipax.suggest_max_norm)."
    )
  elif steps >= min_steps and ever_clipped == 0 and ever_skipped == 0:
    status = "never_clipping"
    advice = (
        "The threshold catches nothing: it only guards against future spikes; to clip the tail of "
        "the norm distribution use clipax.suggest_max_norm on logged norms."
    )
  else:
    status = "healthy"
    verb = "skipping" if skipped is not None and "clipped_count" not in g else "clipping"
    busy = clip_rate + skip_rate
    if busy == 0:
      advice = "Nothing hit the threshold recently; earlier outliers were caught."
    elif busy < 0.2:
      advice = f"{verb.capitalize()} only the occasional outlier step."
    else:
      advice = (
          f"{verb.capitalize()} a sizeable share of steps, below `clip_rate_high`: expected of "
          "percentile rules such as autoclip; watch the trend."
      )
  if last_norm is not None and not math.isfinite(last_norm):
    last_norm = None if math.isnan(last_norm) else last_norm
  return Verdict(
      status=status, advice=advice, source=source, steps=steps, window=span,
      clip_rate=clip_rate, skip_rate=skip_rate, nonfinite_count=nonfinite, last_norm=last_norm,
      threshold=threshold, guard=skipped is not None and "clipped_count" not in g,
  )


def diagnose(
    metrics_or_state: Any,
    *,
    window: int = 100,
    clip_rate_high: float = 0.5,
    min_steps: int = 100,
    prefix: str = "clip",
) -> Verdict:
  """A verdict on how clipping is going, from metrics or an optax state.

  The rules, checked in this order (for each clipax state found; the most severe verdict wins):

  1. ``"nonfinite"``: some gradient norm was NaN or Inf (``nonfinite_count > 0``).
  2. ``"clipping_often"``: at least ``clip_rate_high`` of the recent steps were clipped or skipped.
     The threshold is then doing the work of the learning rate.
  3. ``"never_clipping"``: after at least ``min_steps`` steps nothing was ever clipped or skipped
     (over the whole run, from the counters, whatever ``window``).
  4. ``"healthy"`` otherwise: only occasional outliers are clipped.

  "Recent" is the last ``window`` steps when a history is given (a list of per-step metric dicts,
  or a dict of per-step arrays, e.g. stacked by ``jax.lax.scan``), and the whole run when only
  totals are given (one ``clipax.metrics(...)`` dict or an optax state).

  Args:
    metrics_or_state: the dict from :func:`clipax.metrics`, a list of them (one per step), a dict
      of per-step arrays with the same keys, or any optax state containing clipax states.
    window: how many recent steps the rates use when a history is given.
    clip_rate_high: the clip-plus-skip rate at or above which the verdict is ``"clipping_often"``.
    min_steps: steps needed before ``"never_clipping"`` is reported.
    prefix: the prefix the metrics were written with (used when a state is passed).

  Returns:
    A :class:`Verdict`; ``str(verdict)`` reads as one line.

  Raises:
    ValueError: if no clipax metrics or state are found, or for invalid ``window``,
      ``clip_rate_high`` or ``min_steps``.

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
  """
  _checks.number("window", window, low=1, integer=True, allow_array=False)
  _checks.number("clip_rate_high", clip_rate_high, low=0.0, low_open=True, high=1.0,
                 high_open=False, allow_array=False)
  _checks.number("min_steps", min_steps, low=0, integer=True, allow_array=False)
  groups = _groups(_as_history(metrics_or_state, prefix))
  if not groups:
    raise ValueError("`metrics_or_state` has no clipax metrics with a `count` entry")
  verdicts = [_verdict(s, g, window, clip_rate_high, min_steps) for s, g in groups.items()]
  return max(verdicts, key=lambda v: _SEVERITY[v.status])


def suggest_max_norm(
    norms: Any, *, percentile: float = 95.0, margin: float = 1.2, window: int | None = 1000
) -> float:
  """A clipping threshold just above the typical range of the pre-clip gradient norms.

  The rule: ``margin * percentile(norms[-window:], percentile)``, ignoring NaN and Inf norms
  (numpy's default linear interpolation). With the defaults, the 95th percentile of the last 1,000
  norms times 1.2: ordinary steps pass untouched and only the outliers are clipped. Log the norms
  with ``clipax.metrics(state)["clip/norm"]`` (or :func:`clipax.global_norm` of the gradients)
  during a run without clipping, or with a loose threshold.

  Args:
    norms: a sequence or array of pre-clip gradient norms, oldest first.
    percentile: in (0, 100].
    margin: a factor >= 1 above that percentile.
    window: use only the most recent ``window`` norms (``None``: all of them).

  Returns:
    The suggested ``max_norm`` as a python float.

  Raises:
    ValueError: if there is no finite norm, or for invalid ``percentile``, ``margin``, ``window``.

  Examples:
    >>> import numpy as np
    >>> import clipax
    >>> norms = np.linspace(1.0, 2.0, 101)  # typical norms between 1 and 2
    >>> print(f"{clipax.suggest_max_norm(norms):.3f}")
    2.340
  """
  _checks.number("percentile", percentile, low=0.0, low_open=True, high=100.0, high_open=False,
                 allow_array=False)
  _checks.number("margin", margin, low=1.0, allow_array=False)
  if window is not None:
    _checks.number("window", window, low=1, integer=True, allow_array=False)
  x = np.asarray(norms, np.float64).ravel()
  if window is not None:
    x = x[-window:]
  x = x[np.isfinite(x)]
  if x.size == 0:
    raise ValueError("`norms` has no finite value to suggest a threshold from")
  return float(margin * np.percentile(x, percentile))
