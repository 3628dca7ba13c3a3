"""Clipper state and the metrics read back out of any optax state.

Every clipax state is a ``NamedTuple`` of arrays with a ``clipax_metrics()`` method; :func:`metrics`
finds them anywhere inside an optax state (``chain``, ``inject_hyperparams``, ``MultiSteps``,
``masked``, ``partition``, Flax NNX optimizer state, clipax guards) and flattens them into one
``dict`` for any logger.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class ClipState(NamedTuple):
  """State of every clipax clipper.

  Attributes:
    count: int32, number of updates seen (saturates instead of overflowing).
    norm: float32, the pre-clip norm of the last update.
    scale: float32, the factor applied to the last update (1 when it was not clipped, 0 when it
      was zeroed for being non-finite; for element-wise and per-leaf clippers, the smallest
      factor applied to any element).
    clipped: bool, whether the last update was clipped.
    clipped_count: int32, number of clipped updates (saturates).
    nonfinite_count: int32, number of updates whose norm was NaN or Inf (saturates).
    invalid_count: int32, number of updates zeroed because a traced hyperparameter was NaN or
      out of its range (saturates); see :mod:`clipax._checks`.
  """

  count: jax.Array
  norm: jax.Array
  scale: jax.Array
  clipped: jax.Array
  clipped_count: jax.Array
  nonfinite_count: jax.Array
  invalid_count: jax.Array

  def clipax_metrics(self) -> dict[str, jax.Array]:
    return clip_state_metrics(self)


INT_MAX = 2**31 - 1


def stat_dtype() -> jnp.dtype:
  """The dtype of every norm and statistic kept in a state: float32, or float64 when JAX runs
  with x64 enabled (so a finite float64 norm of 1e40 stays finite)."""
  return jnp.dtype(jnp.result_type(float))


def add_count(counter: jax.Array, amount: Any) -> jax.Array:
  """``counter + amount`` for an int32 counter and an ``amount >= 0``, saturating at 2**31 - 1
  instead of wrapping to a negative number."""
  amount = jnp.asarray(amount).astype(counter.dtype)
  return jnp.minimum(counter, INT_MAX - amount) + amount


def init_clip_state() -> ClipState:
  """A fresh :class:`ClipState`: zero counts, norm 0, scale 1."""
  zero = jnp.zeros([], jnp.int32)
  return ClipState(
      count=zero,
      norm=jnp.zeros([], stat_dtype()),
      scale=jnp.ones([], stat_dtype()),
      clipped=jnp.zeros([], jnp.bool_),
      clipped_count=zero,
      nonfinite_count=zero,
      invalid_count=zero,
  )


def record(
    state: ClipState,
    norm: jax.Array,
    scale: jax.Array,
    clipped: jax.Array,
    nonfinite: jax.Array,
    invalid: jax.Array | None = None,
) -> ClipState:
  """The state after one update with this pre-clip norm, applied scale and flags.

  Every counter saturates (:func:`add_count`); ``invalid`` (a traced hyperparameter out of its
  range, or ``None`` when none can be) is counted in ``invalid_count``.
  """
  dtype = state.norm.dtype
  return ClipState(
      count=optax.safe_increment(state.count),
      norm=jnp.asarray(norm).astype(dtype),
      scale=jnp.asarray(scale).astype(dtype),
      clipped=jnp.asarray(clipped, jnp.bool_),
      clipped_count=add_count(state.clipped_count, jnp.asarray(clipped, jnp.int32)),
      nonfinite_count=add_count(state.nonfinite_count, jnp.asarray(nonfinite, jnp.int32)),
      invalid_count=(
          state.invalid_count if invalid is None
          else add_count(state.invalid_count, jnp.asarray(invalid, jnp.int32))
      ),
  )


def _is_wrapped(x: Any) -> bool:
  """A Flax NNX variable as an orbax checkpoint restored without a target gives it back."""
  return isinstance(x, Mapping) and set(x) == {"value"}


def _value(x: Any) -> jax.Array:
  """Unwraps Flax NNX variables (``get_value()`` since Flax 0.12, ``.value`` before, or
  ``{"value": x}`` from a checkpoint restored without a target)."""
  if isinstance(x, (jax.Array, np.ndarray, np.generic)):
    return jnp.asarray(x)
  if _is_wrapped(x):
    return _value(x["value"])
  get_value = getattr(x, "get_value", None)
  inner = get_value() if callable(get_value) else getattr(x, "value", x)
  return jnp.asarray(inner)


# Every clipax state class, so that a state that lost its NamedTuple type on the way through a
# dict (``nnx.to_pure_dict``, ``flax.serialization.to_state_dict``, an orbax restore without a
# target) is recognised by its field names and rebuilt.
_STATE_TYPES: list[type] = []


def register_state(cls: type) -> type:
  """Class decorator: makes :func:`metrics` read ``cls`` also in its dict forms."""
  _STATE_TYPES.append(cls)
  return cls


register_state(ClipState)


def _rebuild(fields: Mapping) -> Any:
  """The clipax state whose field names are exactly the keys of ``fields``, or ``None``."""
  keys = set(fields)
  for cls in _STATE_TYPES:
    if keys == set(cls._fields):
      values = {}
      for f in cls._fields:
        if f == "inner_state":  # searched separately, whatever its form
          values[f] = None
        else:
          values[f] = jax.tree_util.tree_map(_value, fields[f], is_leaf=_is_wrapped)
      return cls(**values)
  return None


def clip_state_metrics(state: Any) -> dict[str, jax.Array]:
  """The metrics shared by every state with the :class:`ClipState` fields."""
  count = _value(state.count)
  clipped_count = _value(state.clipped_count)
  rate = clipped_count.astype(jnp.float32) / jnp.maximum(count, 1).astype(jnp.float32)
  return {
      "norm": _value(state.norm),
      "scale": _value(state.scale),
      "clipped": _value(state.clipped),
      "clip_rate": rate,
      "clipped_count": clipped_count,
      "nonfinite_count": _value(state.nonfinite_count),
      "invalid_count": _value(state.invalid_count),
      "count": count,
  }


def is_clipax_state(x: Any) -> bool:
  return isinstance(x, tuple) and callable(getattr(x, "clipax_metrics", None))


def _is_pure_state(x: Any) -> bool:
  """A clipax state flattened to a ``dict`` (``nnx.to_pure_dict``, a restored checkpoint)."""
  if not isinstance(x, Mapping):
    return False
  keys = set(x)
  return any(keys == set(c._fields) for c in _STATE_TYPES) or keys >= set(ClipState._fields)


class _PureState:
  """Reads the metrics of a state that lost its NamedTuple type on the way through a dict."""

  def __init__(self, fields: Mapping):
    self.fields = fields

  def clipax_metrics(self) -> dict[str, jax.Array]:
    out = clip_state_metrics(SimpleNamespace(**{f: self.fields[f] for f in ClipState._fields}))
    for extra in ("threshold", "skipped_count"):
      if extra in self.fields:
        out[extra] = _value(self.fields[extra])
    return out


def _is_state(x: Any) -> bool:
  return is_clipax_state(x) or _is_pure_state(x)


def _find(node: Any, found: list) -> None:
  for leaf in jax.tree_util.tree_leaves(node, is_leaf=_is_state):
    if is_clipax_state(leaf):
      found.append(leaf)
      inner = getattr(leaf, "inner_state", None)
      if inner is not None:
        _find(inner, found)
    elif _is_pure_state(leaf):
      rebuilt = _rebuild(leaf)
      found.append(_PureState(leaf) if rebuilt is None else rebuilt)
      if "inner_state" in leaf:
        _find(leaf["inner_state"], found)


def metrics(opt_state: Any, *, prefix: str = "clip") -> dict[str, jax.Array]:
  """A flat ``dict`` of every clipax metric found inside an optax state.

  Finds clipax states anywhere inside ``opt_state``: ``optax.chain``, ``inject_hyperparams``,
  ``MultiSteps``, ``masked``/``partition``, a Flax ``nnx.Optimizer``'s ``opt_state`` and clipax
  guards around other optimizers; and in every dict form of those states (``nnx.State``,
  ``nnx.to_pure_dict``, ``flax.serialization.to_state_dict``, an orbax checkpoint restored with
  or without a target), recognised by their field names. With one clipper the keys are
  ``"{prefix}/norm"``,
  ``"{prefix}/scale"``, ``"{prefix}/clipped"``, ``"{prefix}/clip_rate"`` (clipped updates / all
  updates), ``"{prefix}/clipped_count"``, ``"{prefix}/nonfinite_count"`` and ``"{prefix}/count"``;
  adaptive clippers add ``threshold`` and guards ``skipped_count``. With several clippers
  each gets its position in the state: ``"{prefix}/0/norm"``, ``"{prefix}/1/norm"``, ...
  Under ``optax.MultiSteps`` the clipax states are updated once per optimizer step, so their
  metrics describe the last real update; ``"{prefix}/updated"`` says whether the call that
  produced ``opt_state`` applied one (``False`` while gradients are being accumulated).

  Args:
    opt_state: any optax state (or a pytree holding one).
    prefix: the first part of every key.

  Returns:
    ``dict[str, jax.Array]`` of scalars; empty if no clipax state is found. Works under ``jit``.

  Raises:
    TypeError: if ``prefix`` is not a non-empty string.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import clipax
    >>> tx = optax.chain(clipax.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> params = {"w": jnp.ones(3)}
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.full(3, 2.0)}, state, params)
    >>> m = clipax.metrics(state)
    >>> print(f"{m['clip/norm']:.3f} {m['clip/clip_rate']:.1f} {bool(m['clip/clipped'])}")
    3.464 1.0 True
  """
  if not isinstance(prefix, str) or not prefix:
    raise TypeError(f"`prefix` must be a non-empty str, got {prefix!r}")
  found: list = []
  _find(opt_state, found)
  out: dict[str, jax.Array] = {}
  for i, state in enumerate(found):
    head = prefix if len(found) == 1 else f"{prefix}/{i}"
    for key, value in state.clipax_metrics().items():
      out[f"{head}/{key}"] = value
  multi = _multi_steps(opt_state)
  if found and multi is not None:
    out[f"{prefix}/updated"] = _updated(multi)
  return out


_MULTI_STEPS_FIELDS = frozenset(optax.MultiStepsState._fields)


def _is_multi_steps(x: Any) -> bool:
  return isinstance(x, optax.MultiStepsState) or (
      isinstance(x, Mapping) and set(x) == _MULTI_STEPS_FIELDS)


def _multi_steps(opt_state: Any) -> Any:
  """The outermost ``optax.MultiSteps`` state inside ``opt_state`` (any form), or ``None``."""
  for leaf in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_multi_steps):
    if _is_multi_steps(leaf):
      return leaf
  return None


def _updated(multi: Any) -> jax.Array:
  """Whether the call that produced this ``MultiSteps`` state applied an optimizer update: the
  mini-step counter is back at 0 and at least one update was made. Until then the clipax
  metrics inside keep describing the last real update."""
  field = (lambda f: multi[f]) if isinstance(multi, Mapping) else (lambda f: getattr(multi, f))
  return (_value(field("mini_step")) == 0) & (_value(field("gradient_step")) > 0)
