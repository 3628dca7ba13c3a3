"""The imbalance experiment's figures (see :mod:`clipax.experiments.imbalance`, which re-exports
:func:`plot`): matplotlib only, imported when :func:`plot` is called.
"""

from __future__ import annotations

import pathlib

import numpy as np

from clipax.experiments import _common
from clipax.experiments._imbalance_train import ARMS


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
