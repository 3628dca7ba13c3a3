"""Reading what :func:`clipax.diagnose` is given: one metrics dict, a list of them (a history), or
an optax state, turned into ``{key: float64 array over steps}`` and grouped by transformation,
with every malformed input a ``TypeError``/``ValueError`` naming the key or entry."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from clipax._metrics import metrics as _metrics


def _is_metrics(x: Any) -> bool:
  return isinstance(x, Mapping) and any(
      isinstance(k, str) and (k.endswith("/count") or k.endswith("/clip_rate")) for k in x
  )


def _floats(value: Any) -> np.ndarray | None:
  """``value`` as a float64 array, or ``None`` if it is not numeric (bool counts, for flags)."""
  try:
    a = np.asarray(value)
  except (TypeError, ValueError):
    return None
  numeric = a.dtype.kind in "biuf" or jnp.issubdtype(a.dtype, jnp.floating)
  return a.astype(np.float64) if numeric else None


def _column(values: list, key: str) -> np.ndarray:
  """One key of a list of metric dicts as a float64 array; each value must be a number."""
  out = []
  for i, v in enumerate(values):
    a = _floats(v)
    if a is None or a.size != 1:
      raise TypeError(f"`metrics_or_state[{i}]` key {key!r} must be a scalar number, got {v!r}")
    out.append(a.reshape(()))
  return np.asarray(out)


def _as_history(x: Any, prefix: str) -> dict[str, np.ndarray]:
  """Metrics as ``{key: float64 array of shape [steps]}`` (one step when only totals are known)."""
  if isinstance(x, Sequence) and not isinstance(x, (str, bytes)) and x and _is_metrics(x[0]):
    for i, m in enumerate(x):
      if not isinstance(m, Mapping):
        raise TypeError(f"`metrics_or_state[{i}]` must be a metrics dict, got {type(m).__name__}")
      missing = [k for k in x[0] if k not in m]
      extra = [k for k in m if k not in x[0]]
      if missing or extra:
        what = f"misses key {missing[0]!r}" if missing else f"has key {extra[0]!r} not in entry 0"
        raise ValueError(f"`metrics_or_state[{i}]` {what}: every entry of a history needs the "
                         "same keys")
    return {k: _column([m[k] for m in x], k) for k in x[0]}
  if not _is_metrics(x):
    x = _metrics(x, prefix=prefix)
    if not x:
      raise ValueError(
          "`metrics_or_state` holds no clipax state: pass the dict from clipax.metrics(...), a "
          "list of them, or an optax state containing a clipax clipper"
      )
  out: dict[str, np.ndarray] = {}
  for k, v in x.items():
    a = _floats(v)
    if a is None:
      raise TypeError(f"`metrics_or_state` key {k!r} must be numeric, got {x[k]!r}")
    out[k] = np.atleast_1d(a).ravel()
    if out[k].size != next(iter(out.values())).size or out[k].size == 0:
      first = next(iter(out))
      raise ValueError(f"`metrics_or_state` key {k!r} has {out[k].size} steps, key {first!r} "
                       f"{out[first].size}: a history needs equal, non-zero lengths")
  return out


def _groups(history: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  groups: dict[str, dict[str, np.ndarray]] = {}
  for key, value in history.items():
    head, _, field = key.rpartition("/")
    groups.setdefault(head, {})[field] = value
  out = {head: g for head, g in groups.items() if "count" in g}
  for head, g in out.items():
    _check_group(head, g)
  return out


_ACTED = ("clipped_count", "skipped_count", "clip_rate", "clipped", "skipped", "spikes")


def _check_group(head: str, g: dict[str, np.ndarray]) -> None:
  """Counters are finite integers >= 0, no event counter exceeds the step count, and a group
  says what its transformation did; otherwise a ValueError naming the key."""
  for field, values in g.items():
    if field == "count" or field.endswith("_count"):
      bad = ~np.isfinite(values) | (values < 0) | (values != np.round(values))
      if bad.any():
        raise ValueError(f"`metrics_or_state` key '{head}/{field}' must hold integers >= 0, got "
                         f"{values[bad][0]!r}")
  for field in ("clipped_count", "skipped_count", "nonfinite_count", "invalid_count"):
    if field in g and (g[field] > g["count"]).any():
      raise ValueError(f"`metrics_or_state` key '{head}/{field}' ({g[field].max():g}) exceeds "
                       f"'{head}/count' ({g['count'].max():g})")
  if not any(f in g for f in _ACTED):
    raise ValueError(f"`metrics_or_state` group '{head}' has a count but none of "
                     f"{', '.join(_ACTED)}: pass the whole dict from clipax.metrics(...)")
