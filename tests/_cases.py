"""The table of every public transformation, shared by the contract and fault-injection tests.

Each row builds one transformation with small, fast settings; ``hparam`` names a numeric
hyperparameter that ``optax.inject_hyperparams`` can trace (``None`` when there is none), and
``stats`` the float fields of its state that are statistics (they must stay finite under any
fault; ``norm``, ``threshold``, ``update_norm`` and ``leaf_norms`` record what was measured and
may be inf). ``clipax.monitor`` is not here: it is not a safety net (it passes non-finite
updates through by design) and has its own tests in ``test_metric_keys.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import optax

import clipax


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  factory: Callable[..., optax.GradientTransformation]
  args: tuple = ()
  kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  hparam: str | None = None
  kind: str = "clip"  # "clip" (chain it), "guard" (wraps an optimizer), "optimizer"
  inf_is_off: bool = False  # ``hparam`` is a threshold for which +inf means "no clipping"

  def make(self, **overrides) -> optax.GradientTransformation:
    return self.factory(*self.args, **{**self.kwargs, **overrides})

  def __str__(self) -> str:
    return self.name


def _sgd():
  return optax.sgd(0.1, momentum=0.9)


def _adam(lr=0.1, b1=0.9, b2=0.999, eps=1e-8):
  """Adam as ``optax.adam`` computes it, its state an ``optax.ScaleByAdamState``, but clean under
  strict dtype promotion (optax's own bias correction raises on ``float ** int32`` there): the
  inner optimizer of ``clip_update_rms`` (``tests/test_update_clip.py`` wraps optax's)."""
  import jax
  import jax.numpy as jnp

  def init(params):
    zeros = lambda p: jnp.zeros_like(p)  # noqa: E731
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                  mu=jax.tree_util.tree_map(zeros, params),
                                  nu=jax.tree_util.tree_map(zeros, params))

  def update(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    bc1 = 1 - jnp.asarray(b1, jnp.float32) ** t
    bc2 = 1 - jnp.asarray(b2, jnp.float32) ** t
    mu = jax.tree_util.tree_map(lambda g, m: b1 * m + (1 - b1) * g, updates, state.mu)
    nu = jax.tree_util.tree_map(lambda g, v: b2 * v + (1 - b2) * g * g, updates, state.nu)
    out = jax.tree_util.tree_map(
        lambda m, v: -lr * (m / bc1.astype(m.dtype))
        / (jnp.sqrt(v / bc2.astype(v.dtype)) + eps), mu, nu)
    return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init, update)


CLIPPERS = [
    Case("clip_by_global_norm", clipax.clip_by_global_norm, (), {"max_norm": 1.0}, "max_norm",
         inf_is_off=True),
    Case("clip_by_global_norm_inf", clipax.clip_by_global_norm, (), {"max_norm": 1.0,
                                                                      "ord": float("inf")},
         "max_norm", inf_is_off=True),
    Case("clip_by_value", clipax.clip_by_value, (), {"max_value": 0.1}, "max_value",
         inf_is_off=True),
    Case("clip_by_leaf_norm", clipax.clip_by_leaf_norm, (), {"max_norm": 1.0}, "max_norm",
         inf_is_off=True),
    Case("clip_by_block_rms", clipax.clip_by_block_rms, (), {"threshold": 0.1}, "threshold",
         inf_is_off=True),
    Case("adaptive_grad_clip", clipax.adaptive_grad_clip, (), {"clipping": 0.01}, "clipping",
         inf_is_off=True),
    Case("zclip", clipax.zclip, (), {"warmup_steps": 1}, "z_threshold"),
    # per-leaf norms kept in the state: a pytree shaped like the parameters
    Case("zclip_leaf_metrics", clipax.zclip, (), {"warmup_steps": 1, "leaf_metrics": True},
         "z_threshold"),
    Case("autoclip", clipax.autoclip, (), {"percentile": 10.0, "history": 16}, "percentile"),
    Case("adagc", clipax.adagc, (), {"warmup_steps": 1}, "ratio"),
    Case("skip_nonfinite", clipax.skip_nonfinite, (_sgd(),), {}, None, "guard"),
    Case("skip_spikes", clipax.skip_spikes, (_sgd(),), {"window": 4, "warmup": 2}, "threshold",
         "guard"),
    Case("spam", clipax.spam, (), {"learning_rate": 0.1}, "learning_rate", "optimizer"),
    # update clipping: wrappers around an optimizer (issue 15)
    Case("clip_update_rms", clipax.clip_update_rms, (_adam(),), {}, "b2", "optimizer"),
    Case("clippy", clipax.clippy, (optax.adagrad(0.1),), {"relative": 0.1}, "relative",
         "optimizer"),
]
