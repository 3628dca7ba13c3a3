"""Clip and skip rates of the adaptive clippers and guards on a synthetic spiky norm stream.

The stream: ``--steps`` global gradient norms, log-normal around ``--base`` (``--sigma`` in log
space), with a fraction ``--spike-rate`` of them multiplied by a factor drawn uniformly from
``[--spike-min, --spike-max]`` and a fraction ``--nonfinite-rate`` replaced by NaN or Inf. Each
step's gradient is a random direction in a 64-element tree of two leaves scaled to that norm. Every
method runs over the whole stream in one jitted ``lax.scan`` with its default hyperparameters.

Columns: the fraction of steps clipped (by a clipper, or for SPAM the steps with at least one
element clipped), the fraction skipped (by a guard), the number of non-finite steps seen, and the
fraction of injected spikes that were clipped or skipped.

Usage::

  python benchmarks/adaptive_rates.py
  python benchmarks/adaptive_rates.py --steps 100000 --spike-rate 0.005 --seed 1
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import clipax

LEAVES = {"a": 32, "b": 32}


def norm_stream(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
  """The norms and a mask of the injected spikes."""
  rng = np.random.default_rng(args.seed)
  norms = args.base * np.exp(args.sigma * rng.standard_normal(args.steps))
  spikes = rng.random(args.steps) < args.spike_rate
  norms[spikes] *= rng.uniform(args.spike_min, args.spike_max, spikes.sum())
  bad = rng.random(args.steps) < args.nonfinite_rate
  norms[bad] = np.where(rng.random(bad.sum()) < 0.5, np.nan, np.inf)
  return norms, spikes & ~bad


def gradients(norms: np.ndarray, seed: int) -> dict[str, jax.Array]:
  rng = np.random.default_rng(seed + 1)
  size = sum(LEAVES.values())
  d = rng.standard_normal((len(norms), size))
  d /= np.linalg.norm(d, axis=1, keepdims=True)
  finite = np.isfinite(norms)
  g = d * np.where(finite, norms, 1.0)[:, None]
  g[~finite, 0] = norms[~finite]
  out, i = {}, 0
  for name, n in LEAVES.items():
    out[name] = jnp.asarray(g[:, i : i + n], jnp.float32)
    i += n
  return out


# Each method: (transformation, flags) where flags(state) -> (clipped, skipped, nonfinite) bools.
Flags = Callable[[object], tuple[jax.Array, jax.Array, jax.Array]]


def _clip_flags(state):
  return state.clipped, jnp.zeros([], bool), ~jnp.isfinite(state.norm)


def _chain_clip_flags(state):
  return _clip_flags(state[0])


def _guard_flags(state):
  return jnp.zeros([], bool), state.skipped, ~jnp.isfinite(state.norm)


def _guarded_spam_flags(state):
  return state.inner_state.spikes > 0, state.skipped, ~jnp.isfinite(state.norm)


def methods() -> dict[str, tuple[optax.GradientTransformation, Flags]]:
  sgd = optax.sgd(0.01)
  return {
      "clip_by_global_norm(1.0) (fixed baseline)": (
          optax.chain(clipax.clip_by_global_norm(1.0), sgd),
          _chain_clip_flags,
      ),
      "zclip()": (optax.chain(clipax.zclip(), sgd), _chain_clip_flags),
      "zclip(max_norm=None)": (optax.chain(clipax.zclip(max_norm=None), sgd), _chain_clip_flags),
      "autoclip(10.0)": (optax.chain(clipax.autoclip(10.0), sgd), _chain_clip_flags),
      "adagc()": (optax.chain(clipax.adagc(), sgd), _chain_clip_flags),
      "skip_nonfinite(sgd)": (clipax.skip_nonfinite(sgd), _guard_flags),
      "skip_spikes(sgd)": (clipax.skip_spikes(sgd), _guard_flags),
      "skip_nonfinite(spam(1e-3))": (clipax.skip_nonfinite(clipax.spam(1e-3)), _guarded_spam_flags),
  }


def run(tx: optax.GradientTransformation, flags: Flags, grads) -> tuple[np.ndarray, ...]:
  params = {name: jnp.zeros(n) for name, n in LEAVES.items()}

  @jax.jit
  def go(grads):
    def body(carry, g):
      state, p = carry
      u, state = tx.update(g, state, p)
      return (state, optax.apply_updates(p, u)), flags(state)

    return jax.lax.scan(body, (tx.init(params), params), grads)[1]

  return tuple(np.asarray(x) for x in go(grads))


def main(argv: list[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10_000)
  parser.add_argument("--base", type=float, default=0.5, help="median norm (default 0.5)")
  parser.add_argument("--sigma", type=float, default=0.2, help="log-normal spread (default 0.2)")
  parser.add_argument("--spike-rate", type=float, default=0.01)
  parser.add_argument("--spike-min", type=float, default=10.0)
  parser.add_argument("--spike-max", type=float, default=100.0)
  parser.add_argument("--nonfinite-rate", type=float, default=0.001)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  norms, spikes = norm_stream(args)
  grads = gradients(norms, args.seed)
  lines = [
      f"{args.steps} norms, median {args.base}, log-sigma {args.sigma}; "
      f"{int(spikes.sum())} spikes of {args.spike_min:g}-{args.spike_max:g}x, "
      f"{int((~np.isfinite(norms)).sum())} NaN/Inf; seed {args.seed}; jax {jax.__version__} "
      f"on {jax.devices()[0].device_kind} ({platform.machine()}), float32",
      "",
      "| method | clip rate | skip rate | nonfinite count | spikes caught |",
      "| --- | ---: | ---: | ---: | ---: |",
  ]
  for name, (tx, flags) in methods().items():
    clipped, skipped, nonfinite = run(tx, flags, grads)
    caught = (clipped | skipped)[spikes].mean() if spikes.any() else float("nan")
    lines.append(
        f"| {name} | {clipped.mean():.4f} | {skipped.mean():.4f} | {int(nonfinite.sum())} "
        f"| {caught:.3f} |"
    )
  table = "\n".join(lines)
  print(table)
  return table


if __name__ == "__main__":
  main()
