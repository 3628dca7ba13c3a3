"""Gradient descent meets a cliff: no clipping, norm clipping and value clipping on a 2-D surface.

The loss is a gently sloping valley that ends in a near-vertical wall, in the spirit of Pascanu,
Mikolov & Bengio (2013), "On the difficulty of training recurrent neural networks", Fig. 6. From
the same start, plain gradient descent walks down the valley, hits the wall, and the huge gradient
there catapults the point far away (the loss jumps); norm clipping caps every step at
``lr * max_norm``, so it bounces off the wall gently and keeps going down the valley; value clipping
caps each coordinate separately, which bends the direction of the step (the angle between the
clipped and the raw gradient is reported). :func:`value_vs_norm` applies both clippers to one of the
descent's real gradients, the one value clipping bends most, for a picture of the difference.

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


def value_vs_norm(config: Config, grad: np.ndarray) -> dict:
  """One 2-D gradient through ``clipax.clip_by_global_norm(max_norm)`` and
  ``clipax.clip_by_value(max_value)`` (float32, as in the descent).

  Returns:
    ``{"grad", "norm_clipped", "value_clipped"}`` (each ``[x, y]``), ``"grad_norm"``, the
    norms of the two clipped vectors, ``"angle_deg"`` (between the two clipped vectors, float64
    numpy; norm clipping keeps the direction, so it is also the angle to the raw gradient),
    ``"max_norm"`` and ``"max_value"``.
  """
  g = jnp.asarray(grad, jnp.float32)
  by_norm = clipax.clip_by_global_norm(config.max_norm)
  by_value = clipax.clip_by_value(config.max_value)
  n = np.asarray(by_norm.update(g, by_norm.init(g))[0], np.float64)
  v = np.asarray(by_value.update(g, by_value.init(g))[0], np.float64)
  g64 = np.asarray(g, np.float64)
  return {
      "grad": _common.numbers(g64),
      "norm_clipped": _common.numbers(n),
      "value_clipped": _common.numbers(v),
      "grad_norm": _common.number(np.linalg.norm(g64)),
      "norm_clipped_norm": _common.number(np.linalg.norm(n)),
      "value_clipped_norm": _common.number(np.linalg.norm(v)),
      "angle_deg": _common.number(_angles(n[None], v[None])[0]),
      "max_norm": config.max_norm,
      "max_value": config.max_value,
  }


def run(config: Config, *, seeds: int | Iterable[int] = 1, progress: bool = True) -> dict:
  """Runs the three arms from the same start and returns every number (JSON-serialisable).

  The problem is deterministic: ``seeds`` is accepted for a uniform interface and only recorded.

  Returns:
    ``{"experiment": "cliff", "config", "seeds", "minimum", "arms": {arm: {"x", "y", "loss",
    "grad_norm", "step_length", "angle_deg", "final_loss", "final_point",
    "final_distance_to_minimum", "max_step",
    "max_loss_jump", "max_distance_from_start", "max_grad_norm", "mean_angle_deg",
    "max_angle_deg", "clipped_steps"}}, "value_vs_norm": {"arm", "step", ...}}``:
    ``value_vs_norm`` is :func:`value_vs_norm` of the raw gradient at the step where value
    clipping bent the direction most (``step`` of the ``arm`` ``"value"``).
  """
  seed_ids = _common.seed_list(seeds)
  arms = {}
  example = None
  for arm in _common.progress_bar(ARMS, enabled=progress, desc="cliff"):
    points, losses, grads, clipped = (
        np.asarray(a, np.float64) for a in jax.jit(_descend, static_argnums=(0, 1))(config, arm)
    )
    steps = np.linalg.norm(np.diff(points, axis=0), axis=-1)
    angles = _angles(grads, clipped)
    changed = np.any(grads != clipped, axis=-1)
    start = np.asarray(config.start, np.float64)
    if arm == "value":
      step = int(np.argmax(angles))
      example = {"arm": arm, "step": step, **value_vs_norm(config, grads[step])}
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
      "value_vs_norm": example,
  }


def table(result: dict) -> str:
  """A markdown table, one row per arm, and a caption with the value-vs-norm example."""
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
  ex = result.get("value_vs_norm")
  if ex:
    caption += (
        f" On the gradient of step {ex['step']} of the value-clipping descent, "
        f"{_vector(ex['grad'])} (norm {_common.fmt(ex['grad_norm'], 2)}): "
        f"clip_by_global_norm({ex['max_norm']:g}) gives {_vector(ex['norm_clipped'])}, "
        f"clip_by_value({ex['max_value']:g}) gives {_vector(ex['value_clipped'])}, "
        f"{_common.fmt(ex['angle_deg'], 1)} degrees apart (value_vs_norm.png)."
    )
  return _common.markdown(header, rows) + "\n\n" + caption


def _vector(v: list) -> str:
  return "(" + ", ".join(_common.fmt(x, 2) for x in v) + ")"


STYLES = {
    "none": {"color": "tab:red", "ls": "-", "marker": "o", "ms": 4.5},
    "norm": {"color": "tab:blue", "ls": "--", "marker": "s", "ms": 4},
    "value": {"color": "tab:green", "ls": ":", "marker": "^", "ms": 4.5},
}
"""Colour, dash pattern and step marker per arm (the first steps of two arms coincide)."""


def _plain_log_ticks(axis) -> None:
  """Plain numbers (0.1, 1, 10) on a log axis instead of powers of ten."""
  from matplotlib.ticker import FuncFormatter, NullFormatter

  axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
  axis.set_minor_formatter(NullFormatter())


def _takeaway(result: dict) -> str:
  none, norm, value = (result["arms"].get(arm) for arm in ARMS)
  return (
      f"Unclipped, one step {_common.fmt(none['max_step'], 1)} long throws the point off the "
      f"valley (final loss {_common.fmt(none['final_loss'], 2)}); norm clipping ends at loss "
      f"{_common.fmt(norm['final_loss'], 3)}, value clipping at "
      f"{_common.fmt(value['final_loss'], 2)}."
  )


def plot(result: dict, out_dir: pathlib.Path) -> list[pathlib.Path]:
  """``cliff.png``: a contour plot of the surface (colour bar in loss units) with the three
  trajectories, and the loss curves; ``value_vs_norm.png``: one gradient, its norm-clipped and
  value-clipped versions, the clip regions and the angle between them. Returns both paths."""
  from matplotlib.lines import Line2D

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
  fig, (ax, ax2) = plt.subplots(
      1, 2, figsize=(13, 5), layout="constrained", gridspec_kw={"width_ratios": [1.25, 1]}
  )
  surface = ax.contourf(gx, gy, np.log1p(z), levels=30, cmap="Greys")
  bar = fig.colorbar(surface, ax=ax, pad=0.01)
  ticks = [v for v in (0, 0.5, 1, 2, 5, 10, 20, 50, 100) if v <= z.max()]
  bar.set_ticks(np.log1p(ticks), labels=[f"{v:g}" for v in ticks])
  bar.set_label("loss (colour scale: log(1 + loss))")
  handles = []
  for arm, r in result["arms"].items():
    style = STYLES[arm]
    (line,) = ax.plot(r["x"], r["y"], lw=1.3, markeredgecolor="k", markeredgewidth=0.3,
                      label=r["name"], **style)
    ax2.plot(r["loss"], lw=2, label=r["name"], color=style["color"], ls=style["ls"])
    handles.append(line)
  none = result["arms"]["none"]
  jump = int(np.argmax(none["step_length"]))
  mid = (np.mean(none["x"][jump : jump + 2]), np.mean(none["y"][jump : jump + 2]))
  ax.annotate(
      f"one unclipped step\nof length {_common.fmt(none['max_step'], 1)}", mid, xytext=(-60, 30),
      textcoords="offset points", fontsize=9, arrowprops={"arrowstyle": "->", "color": "k"},
      bbox={"boxstyle": "round", "fc": "white", "ec": "0.5"},
  )
  (start,) = ax.plot(*config.start, "o", ms=14, mfc="yellow", mec="k", mew=1.5, zorder=6,
                     ls="", label=f"start {config.start}")
  ax.annotate("start", config.start, xytext=(10, 10), textcoords="offset points", fontsize=10,
              fontweight="bold", bbox={"boxstyle": "round", "fc": "yellow", "ec": "k"})
  (best,) = ax.plot(config.target, 0.0, "*", ms=18, mfc="white", mec="k", mew=1.2, zorder=6,
                    ls="", label=f"minimum ({config.target:g}, 0)")
  handles += [start, best]
  ax.set_title("the loss surface: a valley cut by a cliff (dark = high loss)", fontsize=10)
  ax.set_xlabel("parameter x")
  ax.set_ylabel("parameter y")
  ax2.set_yscale("log")
  _plain_log_ticks(ax2.yaxis)
  ax2.set_xlabel("gradient-descent step")
  ax2.set_ylabel("loss (log scale)")
  ax2.set_title("loss per step", fontsize=10)
  ax2.grid(True, which="major", alpha=0.3)
  handles.append(Line2D([], [], color="none", label=f"(lr {config.lr:g}, max_norm "
                                                     f"{config.max_norm:g}, max_value "
                                                     f"{config.max_value:g})"))
  fig.legend(handles=handles, loc="outside lower center", ncol=6, fontsize=9, frameon=False)
  fig.suptitle(_takeaway(result), fontsize=11.5)
  paths = [_common.save(fig, out_dir, "cliff.png")]
  if result.get("value_vs_norm"):
    paths.append(_plot_value_vs_norm(result["value_vs_norm"], out_dir))
  return paths


def _plot_value_vs_norm(ex: dict, out_dir: pathlib.Path) -> pathlib.Path:
  """``value_vs_norm.png``: the raw gradient and its two clipped versions as arrows from the
  origin, with the circle of radius ``max_norm`` and the box ``[-max_value, max_value]^2``: to
  scale on the left, zoomed on the clip regions (with the angle between the clipped vectors) on
  the right; equal axes in both."""
  from matplotlib.patches import Arc, Circle, Rectangle

  plt = _common.pyplot()
  g, n, v = (np.asarray(ex[k], np.float64) for k in ("grad", "norm_clipped", "value_clipped"))
  r, m = ex["max_norm"], ex["max_value"]
  reach = max(r, m * np.sqrt(2))
  fig, (full, zoom) = plt.subplots(1, 2, figsize=(12, 5.6), layout="constrained")
  labels = {
      "circle": f"norm clip region: ||g|| <= max_norm = {r:g}",
      "box": f"value clip region: |g_x|, |g_y| <= max_value = {m:g}",
      "raw": f"raw gradient g = {_vector(ex['grad'])}, norm {ex['grad_norm']:.2f}",
      "norm": f"clip_by_global_norm({r:g}) -> {_vector(ex['norm_clipped'])}: same direction",
      "value": f"clip_by_value({m:g}) -> {_vector(ex['value_clipped'])}: turned "
               f"{ex['angle_deg']:.1f}\N{DEGREE SIGN}",
  }
  for ax in (full, zoom):
    ax.add_patch(Circle((0, 0), r, fc=(0.12, 0.47, 0.71, 0.12), ec="tab:blue", lw=1.6, ls="--",
                        label=labels["circle"]))
    ax.add_patch(Rectangle((-m, -m), 2 * m, 2 * m, fc=(0.17, 0.63, 0.17, 0.15), ec="tab:green",
                           lw=1.6, ls=":", label=labels["box"]))
    # The raw gradient as a line too: in the zoom its tip is off the axes and only the line shows.
    ax.plot([0, g[0]], [0, g[1]], color="k", lw=1.8, label=labels["raw"])
    for vec, color, lw in ((g, "k", 1.8), (n, "tab:blue", 3.4), (v, "tab:green", 3.4)):
      ax.annotate("", xy=vec, xytext=(0, 0),
                  arrowprops={"arrowstyle": "-|>", "color": color, "lw": lw,
                              "mutation_scale": 20, "shrinkA": 0, "shrinkB": 0})
    ax.plot([], [], color="tab:blue", lw=3.4, label=labels["norm"])
    ax.plot([], [], color="tab:green", lw=3.4, label=labels["value"])
    ax.axhline(0, color="0.75", lw=0.8, zorder=0)
    ax.axvline(0, color="0.75", lw=0.8, zorder=0)
    ax.set_aspect("equal")
    ax.set_xlabel("gradient component dL/dx")
    ax.set_ylabel("gradient component dL/dy")
  pts = np.stack([g, n, v, [reach, reach], [-reach, -reach]])
  pad = 0.1 * np.ptp(pts, axis=0).max()
  full.set_xlim(pts[:, 0].min() - pad, pts[:, 0].max() + pad)
  full.set_ylim(pts[:, 1].min() - pad, pts[:, 1].max() + pad)
  full.set_title("to scale", fontsize=10)
  side = 1.3 * reach
  zoom.set_xlim(-side, side)
  zoom.set_ylim(-side, side)
  zoom.set_title("zoom on the clip regions (the raw gradient runs on past the edge)",
                 fontsize=10)
  a_n, a_v = (np.degrees(np.arctan2(u[1], u[0])) for u in (n, v))
  lo, hi = min(a_n, a_v), max(a_n, a_v)
  if hi - lo > 180:  # the short way round
    lo, hi = hi, lo + 360
  radius = 0.6 * min(np.linalg.norm(n), np.linalg.norm(v)) if ex["angle_deg"] else 0.0
  if radius > 0:
    zoom.add_patch(Arc((0, 0), 2 * radius, 2 * radius, theta1=lo, theta2=hi, color="tab:red",
                       lw=2.5, zorder=5))
  mid = np.radians((lo + hi) / 2)
  zoom.annotate(
      f"{ex['angle_deg']:.1f}\N{DEGREE SIGN}", (radius * np.cos(mid), radius * np.sin(mid)),
      xytext=(1.05 * reach * np.cos(mid), 1.05 * reach * np.sin(mid)),
      fontsize=13, fontweight="bold", color="tab:red", ha="center", va="center",
      bbox={"boxstyle": "round", "fc": "white", "ec": "tab:red"},
      arrowprops={"arrowstyle": "->", "color": "tab:red", "lw": 1.2},
  )
  handles, names = zoom.get_legend_handles_labels()
  fig.legend(handles, names, loc="outside lower center", ncol=2, fontsize=9, frameon=False)
  fig.suptitle(
      f"One gradient (step {ex['step']} of the value-clipping descent): norm clipping shortens "
      f"it and keeps its direction; value clipping turns it by {ex['angle_deg']:.1f} degrees",
      fontsize=11.5,
  )
  return _common.save(fig, out_dir, "value_vs_norm.png")
