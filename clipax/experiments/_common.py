"""Helpers shared by the experiments: progress bars, plotting backend, seeds, JSON numbers."""

from __future__ import annotations

import contextlib
import math
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np


def progress_bar(iterable: Iterable, *, enabled: bool, desc: str, total: int | None = None):
  """``tqdm(iterable)`` when ``enabled`` (and tqdm is installed), else the iterable itself."""
  if not enabled:
    return iterable
  try:
    from tqdm import tqdm
  except ImportError:  # pragma: no cover - tqdm is in the demo extra
    return iterable
  return tqdm(iterable, desc=desc, total=total, leave=False)


def pyplot():
  """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def save(fig: Any, out_dir: pathlib.Path, name: str) -> pathlib.Path:
  """Saves ``fig`` as ``out_dir/name`` (PNG), closes it and returns the path."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / name
  fig.savefig(path, dpi=110, bbox_inches="tight")
  pyplot().close(fig)
  return path


def seed_list(seeds: int | Iterable[int]) -> list[int]:
  """``seeds`` as a list of python ints: an int ``n`` means ``range(n)``."""
  if isinstance(seeds, (int, np.integer)):
    if seeds < 1:
      raise ValueError(f"`seeds` must be a positive number of seeds, got {seeds!r}")
    return list(range(int(seeds)))
  out = [int(s) for s in seeds]
  if not out:
    raise ValueError("`seeds` must name at least one seed, got an empty sequence")
  return out


def number(x: Any) -> float | int | bool | None:
  """A JSON-safe python number: NaN and Inf become ``None``."""
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  v = float(x)
  return v if math.isfinite(v) else None


def numbers(xs: Sequence | np.ndarray) -> list:
  """A list of JSON-safe numbers (see :func:`number`)."""
  return [number(x) for x in np.asarray(xs).ravel()]


def fmt(x: float | None, digits: int = 3) -> str:
  """A number for a markdown table; ``None`` (NaN/Inf in the JSON) prints as ``nan``."""
  if x is None:
    return "nan"
  if isinstance(x, bool):
    return "yes" if x else "no"
  if isinstance(x, int):
    return str(x)
  return f"{x:.{digits}f}"


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A markdown table."""
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


@contextlib.contextmanager
def relaxed_promotion():
  """JAX's default dtype and rank promotion, whatever the caller configured.

  The experiments call optax optimizers and Flax layers that rely on standard promotion (optax
  0.2.8's Adam bias correction mixes a python float with an int32 count), so they must run the
  same under a strict test configuration as in a user's session.
  """
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    yield
