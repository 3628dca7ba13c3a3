"""Update clipping: wrappers that clip what an optimizer is about to apply, per tensor.

* :func:`clip_update_rms` (and :func:`stable_adamw`, AdamW behind it): StableAdamW's rule, the
  update of each tensor scaled by ``1 / max(1, RMS)`` where ``RMS`` is the root mean square of
  ``g**2 / v_hat``, read from the inner Adam's own second moment (Wortsman et al. 2023, from
  Adafactor's update clipping);
* :func:`clippy`: Clippy's rule, each tensor's update scaled so that no element moves its
  parameter by more than ``relative * |w| + absolute`` (Tang et al. 2023).

Both wrap an optimizer (their output is added to the parameters) and share one step: measure the
gradient's global norm, run the inner optimizer, compute one factor per tensor, scale, record.
Policy: a gradient with a NaN/Inf element, with a finite element whose square overflows its
dtype (it would make the inner second moment infinite for good), or a traced hyperparameter
that is NaN or out of range skips the step: all-zero update, inner state unchanged, flagged
``skipped`` and counted in ``nonfinite_count``, ``overflow_count`` or ``invalid_count``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from clipax import _checks
from clipax._norms import global_norm
from clipax._state import (
    _value,
    add_count,
    clip_state_metrics,
    init_base,
    named,
    record,
    register_state,
    stat_dtype,
)

_F32 = jnp.dtype(jnp.float32)


@register_state
class UpdateClipState(NamedTuple):
  """State of :func:`clipax.clip_update_rms` and :func:`clipax.clippy`.

  Attributes:
    count: int32, updates seen, skipped ones included (saturates at 2**31 - 1).
    norm: the global norm of the last incoming gradient, in ``stat_dtype()`` (may be inf/NaN:
      what was measured).
    scale: the smallest factor applied to any tensor's update at the last step (1: none
      clipped; 0: the step was skipped).
    clipped: bool, whether some tensor's update was scaled down at the last step.
    clipped_count: int32, steps with a clipped tensor (saturates).
    nonfinite_count: int32, steps skipped for a NaN/Inf gradient (saturates).
    invalid_count: int32, steps skipped for a traced hyperparameter that was NaN or out of its
      range (saturates).
    ratio: the largest per-tensor ratio measured at the last step (0 on a skipped step): the
      update RMS of :func:`clip_update_rms`, ``max |u| / (relative |w| + absolute)`` of
      :func:`clippy`; a tensor is clipped when its ratio exceeds ``max_ratio``.
    max_ratio: the ratio's limit in force (``max_rms``; 1 for :func:`clippy`).
    update_norm: the global norm of the last update after clipping (0 on a skipped step).
    skipped: bool, whether the last step was skipped (all-zero update, inner state unchanged).
    skipped_count: int32, skipped steps, for any of the three reasons (saturates).
    overflow_count: int32, steps skipped because a finite gradient element's square overflows
      its dtype (float32: an element above 1.8e19; saturates).
    inner_state: the wrapped optimizer's state.
    tag: uint8, the kind and ``name=`` as UTF-8, so :func:`clipax.metrics` names the state also
      in its dict forms.
  """

  count: jax.Array  # type: ignore[assignment]  # a field, shadows tuple.count
  norm: jax.Array
  scale: jax.Array
  clipped: jax.Array
  clipped_count: jax.Array
  nonfinite_count: jax.Array
  invalid_count: jax.Array
  ratio: jax.Array
  max_ratio: jax.Array
  update_norm: jax.Array
  skipped: jax.Array
  skipped_count: jax.Array
  overflow_count: jax.Array
  inner_state: Any
  tag: Any = ()

  def clipax_metrics(self) -> dict[str, jax.Array]:
    out = clip_state_metrics(self)
    out["ratio"] = _value(self.ratio)
    out["max_ratio"] = _value(self.max_ratio)
    skipped_count = _value(self.skipped_count)
    out["skipped"] = _value(self.skipped)
    out["skipped_count"] = skipped_count
    out["skip_rate"] = (skipped_count.astype(jnp.float32)
                        / jnp.maximum(out["count"], 1).astype(jnp.float32))
    out["overflow_count"] = _value(self.overflow_count)
    return out


# A rule maps (gradients, inner updates, new inner state, params, treedef) to one
# (factor, ratio) pair of float scalars per leaf.
Rule = Callable[[list, list, Any, list, Any], list]


def _path(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def _acc(*xs: Any) -> jnp.dtype:
  """float64 when any of ``xs`` is float64 (x64), else float32: the accumulation dtype."""
  wide = any(jnp.dtype(getattr(x, "dtype", _F32)) == jnp.float64 for x in xs)
  return jnp.dtype(jnp.float64) if wide else _F32


def _check_float(tree: Any, what: str, fn: str) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"{fn}: {what} leaf {_path(path)} is {leaf!r:.60} of dtype {dtype}; "
                      "real floating arrays only")


def _check_numeric(tree: Any, what: str, fn: str) -> None:
  """Every leaf a number or a numeric array (the inner optimizer's ``init`` needs one)."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = getattr(leaf, "dtype", None)
    number = isinstance(leaf, (int, float, complex)) and dtype is None
    if not number and (dtype is None or np.dtype(dtype).kind not in "biufcV"):
      raise TypeError(f"{fn}: {what} leaf {_path(path)} is {leaf!r:.60} of type "
                      f"{type(leaf).__name__}; numeric arrays only")


def _flat(tree: Any, treedef: Any, what: str, fn: str) -> list:
  """``tree`` flattened up to the gradients' structure, or a ValueError naming both."""
  try:
    return treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{fn}: {what} do not have the structure of the gradients: "
                     f"{jax.tree_util.tree_structure(tree)} vs gradients {treedef}") from e


def _overflows(g: jax.Array) -> jax.Array:
  """Whether an element of ``g`` is above sqrt(max) of its dtype: its square is inf."""
  if jnp.size(g) == 0:
    return jnp.zeros([], jnp.bool_)
  b = jnp.asarray(math.sqrt(float(jnp.finfo(g.dtype).max)), g.dtype)
  return jnp.any(jnp.abs(g) > b)


def _wrap(kind: str, fn: str, inner: Any, rule: Rule, invalid: Callable[[], Any],
          max_ratio: Any, needs_params: bool, check_init: Callable[[Any], None],
          name: str | None) -> optax.GradientTransformationExtraArgs:
  """The shared step: measure, inner update, per-tensor factors, scale, record."""
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    _check_numeric(params, "parameter", fn)
    inner_state = inner.init(params)
    check_init(inner_state)
    zero, dt = jnp.zeros([], jnp.int32), stat_dtype()
    try:
      limit = jnp.asarray(max_ratio).astype(dt).reshape([])
    except (TypeError, ValueError):
      limit = jnp.asarray(jnp.inf, dt)
    return UpdateClipState(*init_base(), ratio=jnp.zeros([], dt), max_ratio=limit,
                           update_norm=jnp.zeros([], dt), skipped=jnp.zeros([], jnp.bool_),
                           skipped_count=zero, overflow_count=zero, inner_state=inner_state)

  def update_fn(updates, state, params=None, **extra_args):
    if needs_params and params is None:
      raise ValueError(f"{fn} needs `params`: update(updates, state, params)")
    _check_float(updates, "gradient", fn)
    treedef: Any = jax.tree_util.tree_structure(updates)
    p_flat = [None] * treedef.num_leaves
    if params is not None and needs_params:
      p_flat = _flat(params, treedef, "`params`", fn)
      for (path, g), p in zip(jax.tree_util.tree_flatten_with_path(updates)[0], p_flat,
                              strict=True):
        if jnp.shape(p) != jnp.shape(g):
          raise ValueError(f"{fn}: parameter leaf {_path(path)} has shape {jnp.shape(p)} but "
                           f"its gradient has shape {jnp.shape(g)}")
    with jax.named_scope(f"clipax/{kind}"):
      dt = state.norm.dtype
      norm = global_norm(updates).astype(dt)
      finite = jnp.isfinite(norm)
      grads = treedef.flatten_up_to(updates)
      overflow = finite & _checks.any_of(jnp.zeros([], jnp.bool_),
                                         *[_overflows(jnp.asarray(g)) for g in grads])
      bad_hp = invalid()
      bad_hp = jnp.zeros([], jnp.bool_) if bad_hp is None else bad_hp
      skip = ~finite | overflow | bad_hp
      new_u, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
      u_flat = _flat(new_u, treedef, "the inner optimizer's updates", fn)
      factors = rule(grads, u_flat, new_inner, p_flat, treedef)
      out = []
      for u, (f, _) in zip(u_flat, factors, strict=True):
        scaled = (u.astype(f.dtype) * f).astype(u.dtype)
        out.append(jnp.where(skip, jnp.zeros([], u.dtype), scaled))
      one = jnp.ones([], dt)
      scale = jnp.min(jnp.stack([f.astype(dt) for f, _ in factors] or [one]))
      ratio = jnp.max(jnp.stack([r.astype(dt) for _, r in factors] or [jnp.zeros([], dt)]))
      scale = jnp.where(skip, jnp.zeros([], dt), jnp.minimum(scale, one))
      clipped = ~skip & (scale < 1)
      inner_state = jax.tree_util.tree_map(
          lambda new, old: jnp.where(skip, old, new).astype(jnp.asarray(old).dtype),
          new_inner, state.inner_state)
      result = treedef.unflatten(out)
      base = record(state, norm, scale, clipped, ~finite, bad_hp)
      return result, UpdateClipState(
          *base,
          ratio=jnp.where(skip, jnp.zeros([], dt), ratio),
          max_ratio=jnp.asarray(max_ratio).astype(dt).reshape([]),
          update_norm=global_norm(result).astype(dt),
          skipped=skip,
          skipped_count=add_count(state.skipped_count, skip),
          overflow_count=add_count(state.overflow_count, overflow),
          inner_state=inner_state,
      )

  return named(optax.GradientTransformationExtraArgs(init_fn, update_fn), kind, name)


# ----------------------------------------------------------------------------- StableAdamW


def _adam_states(state: Any) -> list[optax.ScaleByAdamState]:
  def is_adam(x):
    return isinstance(x, optax.ScaleByAdamState)

  return [x for x in jax.tree_util.tree_leaves(state, is_leaf=is_adam) if is_adam(x)]


def _one_adam(state: Any, inner: Any) -> optax.ScaleByAdamState:
  found = _adam_states(state)
  if len(found) != 1:
    what = "none" if not found else f"{len(found)}"
    raise TypeError(
        f"clip_update_rms: `inner` must be an Adam-family optimizer whose state holds exactly "
        f"one optax.ScaleByAdamState (its second moment nu), found {what} in the state of "
        f"`inner`={inner!r:.80}; wrap each optax.partition group's Adam separately")
  return found[0]


def _one_minus(b: Any, dtype: jnp.dtype) -> jax.Array:
  """``1 - b`` in ``dtype``, from python float64 for a python ``b`` (float32 cannot hold 0.999
  exactly)."""
  if isinstance(b, (int, float)):
    return jnp.asarray(1.0 - b, dtype)
  return 1 - jnp.asarray(b, dtype)


def clip_update_rms(
    inner: optax.GradientTransformation,
    *,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    max_rms: ArrayLike = 1.0,
    name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""StableAdamW's update clipping around an Adam-family optimizer, per tensor.

  For each tensor (leaf) with current gradient :math:`g` and the inner Adam's bias-corrected
  second moment after this step :math:`\hat v = \nu_t / (1 - \beta_2^t)`, read from its
  ``optax.ScaleByAdamState`` (no second copy is kept):

  .. math::
    \mathrm{RMS} = \sqrt{\operatorname{mean}_i\; g_i^2 / \max(\hat v_i, \epsilon^2)},\qquad
    u \leftarrow u \cdot \frac{1}{\max(1, \mathrm{RMS} / \text{max\_rms})}

  Scaling the whole inner update of a tensor is the paper's per-tensor learning-rate scaling
  :math:`\eta_t = \alpha_t / \max(1, \mathrm{RMS}_t)`, decoupled weight decay included (the
  paper scales the decay term with the same :math:`\eta_t`): ``clip_update_rms(optax.adamw(...))``
  is StableAdamW exactly. (The authors' reference code decays with the unclipped learning rate;
  that variant is ``optax.chain(clip_update_rms(optax.adam(lr)),
  optax.add_decayed_weights(-lr * weight_decay))``.) Everything else ``inner`` does after Adam
  (a schedule, a trust ratio) is scaled too. ``b2`` and ``eps`` must be the inner Adam's (the
  state holds neither); :func:`stable_adamw` builds both sides from one set. The ratio is
  accumulated in float32 (float64 for float64 leaves) whatever the gradient dtype.

  **Skipped steps.** A gradient with a NaN or Inf element skips the step: all-zero update,
  inner state unchanged, counted in ``nonfinite_count``. So does a finite gradient with an
  element whose square overflows its dtype (float32: above 1.8e19; it would make the second
  moment infinite for good), counted in ``overflow_count``. **Traced hyperparameters** that
  are NaN or out of range (``b2`` outside [0, 1), ``eps`` not > 0, ``max_rms`` not > 0) skip
  the step the same way, counted in ``invalid_count``. Every skip is flagged ``skipped``.

  Args:
    inner: the optimizer to wrap; its state must hold exactly one ``optax.ScaleByAdamState``
      (``optax.adam``, ``adamw``, ``nadam``, ``lamb``, inside ``chain``/``inject_hyperparams``).
    b2: the inner Adam's second-moment decay, in [0, 1).
    eps: the inner Adam's epsilon (> 0); the denominator's floor is ``eps**2``.
    max_rms: the RMS above which a tensor's update is scaled down (> 0; the paper's 1;
      ``inf``: off).
    name: the name of its keys in :func:`clipax.metrics`; default: its ``named_chain`` key,
      else ``update_rms``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (an optimizer) whose state is a
    :class:`clipax.UpdateClipState`; :func:`clipax.metrics` reports the gradient's ``norm``,
    the largest tensor RMS as ``ratio``, ``max_ratio``, the smallest ``scale``, ``clipped``,
    ``clip_rate``, ``update_norm``, ``skipped``, ``skip_rate`` and the counters.

  Raises:
    TypeError: if ``inner`` is not an optax transformation, at ``init`` if its state holds no
      (or more than one) ``optax.ScaleByAdamState`` or for a non-numeric parameter leaf, for a
      non-floating gradient leaf.
    ValueError: for an out-of-range number; at ``update`` when the second moment does not have
      the gradients' structure.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import clipax
    >>> tx = clipax.clip_update_rms(optax.adam(0.1))
    >>> params = {"w": jnp.zeros(4)}
    >>> state = tx.init(params)
    >>> update = jax.jit(tx.update)
    >>> for g in ([1.0, 1.0, 1.0, 1.0], [100.0, 1.0, 1.0, 1.0]):
    ...   out, state = update({"w": jnp.array(g)}, state, params)
    >>> print(f"rms {float(state.ratio):.3f}, scale {float(state.scale):.3f}")
    rms 1.118, scale 0.895

  References:
    Wortsman, Dettmers, Zettlemoyer, Morcos, Farhadi, Schmidt, "Stable and low-precision
    training for large-scale vision-language models", NeurIPS 2023,
    https://arxiv.org/abs/2304.13013, Algorithm 2 (StableAdamW; reference code: the authors'
    ``StableAdamWUnfused``, mitchellnw's gist, used by mlfoundations/open_clip). Shazeer, Stern,
    "Adafactor", ICML 2018, https://arxiv.org/abs/1804.04235 (update clipping). Wortsman et al.,
    "Small-scale proxies for large-scale Transformer training instabilities", ICLR 2024,
    https://arxiv.org/abs/2309.14322 (the loss-spike study).
  """
  fn = "clip_update_rms"
  _checks.transformation("inner", inner)
  _checks.number("b2", b2, low=0.0, high=1.0)
  _checks.number("eps", eps, low=0.0, low_open=True)
  _checks.number("max_rms", max_rms, low=0.0, low_open=True, allow_inf=True)

  def invalid():
    return _checks.any_of(
        _checks.invalid(b2, low=0.0, high=1.0),
        _checks.invalid(eps, low=0.0, low_open=True),
        _checks.invalid(max_rms, low=0.0, low_open=True, allow_inf=True),
    )

  def rule(grads, u_flat, new_inner, p_flat, treedef):
    adam = _one_adam(new_inner, inner)
    nus = _flat(adam.nu, treedef, "the inner Adam's second moment (nu)", fn)
    out = []
    for g, nu in zip(grads, nus, strict=True):
      if isinstance(nu, optax.MaskedNode) or jnp.size(g) == 0:
        out.append((jnp.ones([], _F32), jnp.zeros([], _F32)))
        continue
      acc = _acc(g, nu)
      t = jnp.asarray(adam.count).astype(acc)
      bc = -jnp.expm1(t * jnp.log1p(-_one_minus(b2, acc)))  # 1 - b2**t, no cancellation
      e = jnp.asarray(eps, acc)
      v_hat = jnp.asarray(nu).astype(acc) / bc
      g = g.astype(acc)
      rms = jnp.sqrt(jnp.mean(g * g / jnp.maximum(v_hat, e * e)))
      limit = jnp.asarray(max_rms, acc)
      out.append((jnp.where(rms > limit, limit / rms, jnp.ones([], acc)), rms))
    return out

  return _wrap("update_rms", fn, inner, rule, invalid, max_rms, False,
               lambda state: _one_adam(state, inner), name)


def stable_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    max_rms: float = 1.0,
    name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""StableAdamW: ``optax.adamw`` behind :func:`clip_update_rms` with the same ``b2``/``eps``.

  Defaults are ``optax.adamw``'s, so it is a drop-in replacement; the paper trains with
  ``b2 = 0.99`` (or 0.95) and ``eps = 1e-6``.

  Args:
    learning_rate: a number >= 0 or an ``optax`` schedule.
    b1: first-moment decay in [0, 1).
    b2: second-moment decay in [0, 1).
    eps: Adam's epsilon (> 0).
    weight_decay: decoupled weight decay >= 0, scaled with the update (as in the paper).
    max_rms: see :func:`clip_update_rms`.
    name: see :func:`clip_update_rms`.

  Returns:
    The optimizer of :func:`clip_update_rms`.

  Raises:
    ValueError: for an out-of-range number.

  Examples:
    >>> import jax.numpy as jnp
    >>> import clipax
    >>> tx = clipax.stable_adamw(1e-3)
    >>> params = {"w": jnp.ones(3)}
    >>> out, state = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    >>> print(f"{float(out['w'][0]):.6f}", bool(state.clipped))
    -0.001000 False

  References:
    Wortsman et al. 2023, https://arxiv.org/abs/2304.13013, Algorithm 2.
  """
  if not callable(learning_rate):
    _checks.number("learning_rate", learning_rate, low=0.0)
  _checks.number("b1", b1, low=0.0, high=1.0)
  _checks.number("weight_decay", weight_decay, low=0.0)
  inner = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  return clip_update_rms(inner, b2=b2, eps=eps, max_rms=max_rms, name=name)
