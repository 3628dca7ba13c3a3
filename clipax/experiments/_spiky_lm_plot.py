"""The spiky-LM experiment's figure (see :mod:`clipax.experiments.spiky_lm`, which re-exports
:func:`plot` and :data:`STYLES`): matplotlib only, imported when :func:`plot` is called.
"""

from __future__ import annotations

import pathlib

import numpy as np

from clipax.experiments import _common

STYLES = {
    "none": {"color": "tab:blue", "ls": "-", "lw": 1.4, "marker": None},
    "clip_by_global_norm": {"color": "tab:orange", "ls": "-", "lw": 3.4, "alpha": 0.5,
                            "marker": "o"},
    "zclip": {"color": "tab:green", "ls": "--", "lw": 1.5, "marker": "s"},
    "autoclip": {"color": "tab:red", "ls": "-.", "lw": 1.3, "marker": "^"},
    "skip_spikes": {"color": "tab:purple", "ls": ":", "lw": 2.0, "marker": "D"},
    "clip_update_rms": {"color": "tab:brown", "ls": (0, (5, 1, 1, 1, 1, 1)), "lw": 1.6,
                        "marker": "P"},
}
"""Line style per arm: the clipped arms' curves lie on top of each other, so each has its own
dash pattern and markers at its own steps (a wide pale line for the one drawn underneath)."""


def _takeaway(result: dict) -> str:
  """The plot's one-line conclusion, from the first seed's spike counts."""
  counts = {arm: len(r["spike_excursions"]) for arm, r in result["results"].items()}
  n_bad = len(result["bad_steps"])
  none = counts.pop("none", None)
  head = (
      f"Without clipping the {n_bad} bad batches cause {none} loss spike{'' if none == 1 else 's'}"
      if none is not None else f"{n_bad} bad batches"
  )
  if counts and not any(counts.values()):
    return f"{head}; every clipper and guard absorbs them (0 spikes)"
  hit = ", ".join(f"{arm} {n}" for arm, n in counts.items() if n)
  return f"{head}; spikes with protection: {hit or 'none'}"


def plot(result: dict, out_dir: pathlib.Path) -> list[pathlib.Path]:
  """Loss (good batches) and pre-clip gradient norm per arm (first seed), then a strip of the
  clipped and skipped steps per arm. Bad batches are grey dashed lines, counted loss spikes
  triangles; the legend sits outside the axes."""
  from matplotlib.lines import Line2D
  from matplotlib.ticker import FuncFormatter, NullFormatter

  plt = _common.pyplot()
  arms = list(result["results"])
  bad = result["bad_steps"]
  fig, axes = plt.subplots(
      3, 1, figsize=(12, 9.5), sharex=True, layout="constrained",
      gridspec_kw={"height_ratios": [3, 2.6, 1.3]},
  )
  ax_loss, ax_norm, ax_events = axes
  steps = len(next(iter(result["results"].values()))["loss"])
  every = max(steps // 12, 1)
  handles = []
  rows = [arm for arm in arms if arm != "none"]
  for i, arm in enumerate(arms):
    r = result["results"][arm]
    style = dict(STYLES.get(arm, {"color": f"C{i}", "ls": "-", "lw": 1.4, "marker": None}))
    marker = style.pop("marker")
    marks = {} if marker is None else {
        "marker": marker, "ms": 6, "markevery": ((i * every) // len(arms), every),
        "markeredgecolor": "k", "markeredgewidth": 0.5,
    }
    loss = np.array([np.nan if v is None else v for v in r["loss"]])
    norm = np.array([np.nan if v is None else v for v in r["grad_norm"]])
    good = np.setdiff1d(np.arange(loss.size), bad)
    (line,) = ax_loss.plot(good, loss[good], label=arm, **style, **marks)
    ax_loss.plot(bad, loss[bad], "o", color=style["color"], ms=7, markeredgecolor="k", zorder=5)
    ax_norm.plot(norm, **style, **marks)
    handles.append(line)
    top = np.nanmax(loss[good]) if np.isfinite(loss[good]).any() else 1.0
    for first, last in r["spike_excursions"]:
      span = good[(good >= first) & (good <= last)]
      span = span[np.isfinite(loss[span])]  # a diverged run: mark its first step, at the top
      peak, height = (span[np.argmax(loss[span])], loss[span].max()) if span.size else (first, top)
      ax_loss.plot(peak, height * 1.04, "v", color=style["color"], ms=12, markeredgecolor="k",
                   zorder=6)
    if r["skipped"]:
      ax_norm.plot(r["skipped"], norm[r["skipped"]], "X", color=style["color"], ms=12,
                   markeredgecolor="k", zorder=6)
    if arm in rows:
      row = len(rows) - 1 - rows.index(arm)
      ax_events.plot(r["clipped"], np.full(len(r["clipped"]), row), "|", color=style["color"],
                     ms=11, mew=1.6)
      ax_events.plot(r["skipped"], np.full(len(r["skipped"]), row), "X", color=style["color"],
                     ms=11, markeredgecolor="k")
  ref_arm = arms[0]
  for ax in axes:
    for t in bad:
      ax.axvline(t, color="0.5", lw=0.9, ls="--", zorder=0)
  if result["floor"] is not None:
    ax_loss.axhline(result["floor"], color="k", lw=1.0, ls=":")
  c = result["config"]
  ax_norm.axhline(c["max_norm"], color="0.3", lw=1.0, ls=(0, (6, 3)))
  handles += [
      Line2D([], [], color="0.5", lw=0.9, ls="--", label="bad batch (random tokens)"),
      Line2D([], [], color="0.55", marker="o", ls="", ms=7, markeredgecolor="k",
             label="loss on the bad batch itself\n(arm's colour; not counted)"),
      Line2D([], [], color="0.4", marker="v", ls="", ms=10, markeredgecolor="k",
             label=f"counted loss spike\n(> {c['spike_factor']:g}x running median)"),
      Line2D([], [], color="k", lw=1.0, ls=":", label="loss floor (entropy rate)"),
      Line2D([], [], color="0.3", lw=1.0, ls=(0, (6, 3)),
             label=f"max_norm = {c['max_norm']:g}\n(clip_by_global_norm)"),
      Line2D([], [], color="0.3", marker="X", ls="", ms=10, markeredgecolor="k",
             label="skipped step (guard)"),
      Line2D([], [], color="0.3", marker="|", ls="", ms=10, mew=1.6, label="clipped step"),
  ]
  fig.legend(handles=handles, loc="outside right center", fontsize=8.5, frameon=False)
  ax_loss.set_ylabel("training loss on good batches\n(nats per token)")
  ax_loss.set_title("training loss (triangles: the loss spikes the table counts)", fontsize=10)
  ax_norm.set_yscale("log")
  ax_norm.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
  ax_norm.yaxis.set_minor_formatter(NullFormatter())
  ax_norm.set_ylabel("gradient norm before clipping\n(global L2, log scale)")
  ref = np.array([np.nan if v is None else v for v in result["results"][ref_arm]["grad_norm"]])
  if bad:
    times = np.nanmedian(ref[bad]) / np.nanmedian(ref)
    ax_norm.set_title(f"gradient norm before clipping: a bad batch's is about {times:,.0f}x the "
                      f"median ({ref_arm})", fontsize=10)
  else:
    ax_norm.set_title("gradient norm before clipping", fontsize=10)
  ax_events.set_yticks(range(len(rows)), rows[::-1])
  ax_events.set_ylim(-0.6, len(rows) - 0.4)
  ax_events.set_title("clipped (|) and skipped (X) steps per arm", fontsize=10)
  ax_events.set_xlabel("training step")
  ax_events.set_xlim(-0.01 * steps, 1.01 * steps)
  fig.suptitle(_takeaway(result) + f" (seed {result['seeds'][0]}).", fontsize=11.5)
  return [_common.save(fig, out_dir, "spiky_lm.png")]
