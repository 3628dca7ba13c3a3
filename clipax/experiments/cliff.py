"""Gradient descent meets a cliff: no clipping, norm clipping and value clipping on a 2-D surface.

The loss is a gently sloping valley that ends in a near-vertical wall, in the spirit of Pascanu,
Mikolov & Bengio (2013), "On the difficulty of training recurrent neural networks", Fig. 6. From
the same start, plain gradient descent walks down the valley, hits the wall, and the huge gradient
there catapults the point far away (the loss jumps); norm clipping caps every step at
``lr * max_norm``, so it bounces off the wall gently and keeps going down the valley; value clipping
caps each coordinate separately, which bends the direction of the step (the angle between the
clipped and the raw gradient is reported).

References:
  Pascanu, Mikolov, Bengio, "On the difficulty of training recurrent neural networks", ICML 2013,
  https://arxiv.org/abs/1211.5063
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

ARMS = ("none", "norm", "value")
"""Plain gradient descent, ``clip_by_global_norm(max_norm)``, ``clip_by_value(max_value)``."""

NAMES = {
    "none": "no clipping",
    "norm": "clip_by_global_norm",
    "value": "clip_by_value",
}


@dataclasses.dataclass(frozen=True)
class Config:
  r"""The cliff surface and the descent.

  The loss is

  .. math::
    L(x, y) = A\,\big(1 - e^{-y^2 / 2w^2}\big) + b\, (x - x^*)^2
      + H\, \sigma\big(-k\, (x + t\, y)\big)

  a valley along ``y = 0`` (depth ``A``, half-width ``w``, flat sides far from its floor)
  descending towards ``x*``, cut by a cliff of height ``H`` along the oblique line ``x + t y = 0``
  (``sigma`` is the logistic function; the larger ``k``, the closer to vertical the wall; it faces
  the way of the descent, so it is a drop). A point thrown far up the valley's side lands where
  the gradient nearly vanishes and stays there.

  Attributes:
    steps: gradient-descent steps per arm.
    lr: the learning rate.
    start: the common starting point ``(x, y)``.
    max_norm: the threshold of the norm-clipping arm.
    max_value: the threshold of the value-clipping arm.
    valley_depth: ``A``, the height of the valley's sides.
    valley_width: ``w``, the valley's half-width.
    valley_slope: ``b``, the curvature along the valley.
    target: ``x*``, where the valley bottoms out.
    wall_height: ``H``.
    wall_steepness: ``k``.
    wall_tilt: ``t``, how oblique the wall is to the valley.
    grid: points per side of the contour plot.
  """

  steps: int = 200
  lr: float = 0.1
  start: tuple[float, float] = (-3.0, 1.5)
  max_norm: float = 1.0
  max_value: float = 0.5
  valley_depth: float = 4.0
  valley_width: float = 0.7
  valley_slope: float = 0.15
  target: float = 6.0
  wall_height: float = 20.0
  wall_steepness: float = 50.0
  wall_tilt: float = 0.8
  grid: int = 200

  @classmethod
  def quick(cls) -> Config:
    """Fewer steps and a coarser contour grid."""
    return cls(steps=120, grid=80)


def loss_fn(config: Config, p: jax.Array) -> jax.Array:
  """The loss at ``p = [x, y]`` (float32; also works on a grid ``[..., 2]``)."""
  x, y = p[..., 0], p[..., 1]
  across = config.valley_depth * (1 - jnp.exp(-(y**2) / (2 * config.valley_width**2)))
  valley = across + config.valley_slope * (x - config.target) ** 2
  cliff = config.wall_height * jax.nn.sigmoid(-config.wall_steepness * (x + config.wall_tilt * y))
  return valley + cliff


def _clipper(config: Config, arm: str) -> optax.GradientTransformation:
  if arm == "norm":
    return clipax.clip_by_global_norm(config.max_norm)
  if arm == "value":
    return clipax.clip_by_value(config.max_value)
  return optax.identity()


def _descend(config: Config, arm: str):
  """``steps`` of gradient descent from ``start``; per step the point, loss, raw gradient and the
  clipped gradient (all before the update)."""
  clip = _clipper(config, arm)
  p0 = jnp.asarray(config.start, jnp.float32)

  def step(carry, _):
    p, state = carry
    loss, g = jax.value_and_grad(functools.partial(loss_fn, config))(p)
    c, state = clip.update(g, state, p)
    return (p - config.lr * c, state), (p, loss, g, c)

  (p_end, _), (points, losses, grads, clipped) = jax.lax.scan(
      step, (p0, clip.init(p0)), None, length=config.steps
  )
  points = jnp.concatenate([points, p_end[None]])
  losses = jnp.concatenate([losses, loss_fn(config, p_end)[None]])
  return points, losses, grads, clipped


def _angles(g: np.ndarray, c: np.ndarray) -> np.ndarray:
  """Degrees between each raw gradient and its clipped version (0 where either is zero)."""
  dot = np.sum(g * c, axis=-1)
  norms = np.linalg.norm(g, axis=-1) * np.linalg.norm(c, axis=-1)
  cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 1.0)
  return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def run(config: Config, *, seeds: int | Iterable[int] = 1, progress: bool = True) -> dict:
  """Runs the three arms from the same start and returns every number (JSON-serialisable).

  The problem is deterministic: ``seeds`` is accepted for a uniform interface and only recorded.

  Returns:
    ``{"experiment": "cliff", "config", "seeds", "minimum", "arms": {arm: {"x", "y", "loss",
    "grad_norm", "step_length", "angle_deg", "final_loss", "final_point",
    "final_distance_to_minimum", "max_step",
    "max_loss_jump", "max_distance_from_start", "max_grad_norm", "mean_angle_deg",
    "max_angle_deg", "clipped_steps"}}}``.
  """
  seed_ids = _common.seed_list(seeds)
  arms = {}
  for arm in _common.progress_bar(ARMS, enabled=progress, desc="cliff"):
    points, losses, grads, clipped = (
        np.asarray(a, np.float64) for a in jax.jit(_descend, static_argnums=(0, 1))(config, arm)
    )
    steps = np.linalg.norm(np.diff(points, axis=0), axis=-1)
    angles = _angles(grads, clipped)
    changed = np.any(grads != clipped, axis=-1)
    start = np.asarray(config.start, np.float64)
    arms[arm] = {
        "name": NAMES[arm],
        "x": _common.numbers(points[:, 0]),
        "y": _common.numbers(points[:, 1]),
        "loss": _common.numbers(losses),
        "grad_norm": _common.numbers(np.linalg.norm(grads, axis=-1)),
        "step_length": _common.numbers(steps),
        "angle_deg": _common.numbers(angles),
        "final_loss": _common.number(losses[-1]),
        "final_point": _common.numbers(points[-1]),
        "max_step": _common.number(steps.max()),
        "max_loss_jump": _common.number(np.max(np.diff(losses))),
        "final_distance_to_minimum": _common.number(
            np.linalg.norm(points[-1] - np.array([config.target, 0.0]))
        ),
        "max_distance_from_start": _common.number(np.max(np.linalg.norm(points - start, axis=-1))),
        "max_grad_norm": _common.number(np.max(np.linalg.norm(grads, axis=-1))),
        "clipped_steps": int(changed.sum()),
        "mean_angle_deg": _common.number(angles[changed].mean() if changed.any() else 0.0),
        "max_angle_deg": _common.number(angles.max()),
    }
  minimum = [config.target, 0.0]
  return {
      "experiment": "cliff",
      "config": dataclasses.asdict(config),
      "seeds": seed_ids,
      "minimum": minimum,
      "minimum_loss": _common.number(loss_fn(config, jnp.asarray(minimum, jnp.float32))),
      "arms": arms,
  }


def table(result: dict) -> str:
  """A markdown table, one row per arm."""
  header = [
      "arm", "final loss", "final distance to minimum", "max step", "max distance from start",
      "max grad norm", "clipped steps", "mean / max angle to raw gradient (deg)",
  ]
  rows = []
  for r in result["arms"].values():
    rows.append([
        r["name"],
        _common.fmt(r["final_loss"]),
        _common.fmt(r["final_distance_to_minimum"]),
        _common.fmt(r["max_step"]),
        _common.fmt(r["max_distance_from_start"]),
        _common.fmt(r["max_grad_norm"], 1),
        str(r["clipped_steps"]),
        f"{_common.fmt(r['mean_angle_deg'], 1)} / {_common.fmt(r['max_angle_deg'], 1)}",
    ])
  c = result["config"]
  caption = (
      f"{c['steps']} steps of gradient descent, lr {c['lr']:g}, from {tuple(c['start'])}; "
      f"minimum loss {_common.fmt(result['minimum_loss'])} at {tuple(result['minimum'])}. "
      "Norm clipping keeps the direction exactly (angle 0); value clipping bends it."
  )
  return _common.markdown(header, rows) + "\n\n" + caption


def plot(result: dict, out_dir: pathlib.Path) -> list[pathlib.Path]:
  """A contour plot of the surface with the three trajectories, and the loss curves."""
  plt = _common.pyplot()
  config = Config(**{**result["config"], "start": tuple(result["config"]["start"])})
  xs = np.concatenate([np.asarray(r["x"], np.float64) for r in result["arms"].values()])
  ys = np.concatenate([np.asarray(r["y"], np.float64) for r in result["arms"].values()])
  xs, ys = xs[np.isfinite(xs)], ys[np.isfinite(ys)]
  pad_x, pad_y = 0.1 * (np.ptp(xs) + 1), 0.1 * (np.ptp(ys) + 1)
  gx = np.linspace(xs.min() - pad_x, max(xs.max(), config.target) + pad_x, config.grid)
  gy = np.linspace(ys.min() - pad_y, ys.max() + pad_y, config.grid)
  grid = np.stack(np.meshgrid(gx, gy), axis=-1).astype(np.float32)
  z = np.asarray(loss_fn(config, jnp.asarray(grid)), np.float64)
  colors = {"none": "tab:red", "norm": "tab:blue", "value": "tab:green"}
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
  ax.contourf(gx, gy, np.log1p(z), levels=30, cmap="Greys")
  for arm, r in result["arms"].items():
    ax.plot(r["x"], r["y"], ".-", ms=2.5, lw=0.8, color=colors[arm], label=r["name"])
  ax.plot(*config.start, "ko", ms=6)
  ax.plot(config.target, 0.0, "k*", ms=10)
  ax.set_title("log(1 + loss): valley, cliff, and three descents", fontsize=10)
  ax.set_xlabel("x")
  ax.set_ylabel("y")
  ax.legend(fontsize=8)
  for arm, r in result["arms"].items():
    ax2.plot(r["loss"], color=colors[arm], label=r["name"])
  ax2.set_yscale("log")
  ax2.set_xlabel("step")
  ax2.set_ylabel("loss")
  ax2.set_title("loss", fontsize=10)
  ax2.legend(fontsize=8)
  return [_common.save(fig, out_dir, "cliff.png")]
