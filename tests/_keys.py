"""Reading one metric out of ``clipax.metrics`` without spelling the clipper's name."""

from __future__ import annotations

from typing import Any


def field(m: dict[str, Any], metric: str, prefix: str = "clip") -> Any:
  """The metric ``metric`` of the first (outermost) clipax state in ``m``: the value of the
  first key ``{prefix}/{name}/{metric}``."""
  for key, value in m.items():
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == prefix and parts[2] == metric:
      return value
  raise KeyError(f"no {prefix}/<name>/{metric} in {sorted(m)}")


def has(m: dict[str, Any], metric: str, prefix: str = "clip") -> bool:
  try:
    field(m, metric, prefix)
  except KeyError:
    return False
  return True
