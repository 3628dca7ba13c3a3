"""Clipper state and the metrics read back out of any optax state.

Every clipax state is a ``NamedTuple`` of arrays with a ``clipax_metrics()`` method; :func:`metrics`
finds them anywhere inside an optax state (``chain``, ``inject_hyperparams``, ``MultiSteps``,
``masked``, ``partition``, Flax NNX optimizer state, clipax guards) and flattens them into one
``dict`` for any logger.
"""

from __future__ import annotations

from collections.abc import Mapping
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
    threshold: the threshold in force at the last update as given (``max_norm``,
      ``max_value``, the block RMS or AGC's ``clipping`` factor); ``inf`` means off.
    update_norm: the global norm of the last update after clipping (0 when it was zeroed).
    leaf_norms: with ``leaf_metrics=True``, a pytree shaped like the updates holding each leaf's
      pre-clip norm; otherwise ``()``.
    tag: uint8, the transformation's kind and ``name=`` as UTF-8 (``b"zclip/"``), so that
      :func:`clipax.metrics` names the state also in its dict forms; set by the transformation.
  """

  count: jax.Array  # type: ignore[assignment]  # a field, shadows tuple.count
  norm: jax.Array
  scale: jax.Array
  clipped: jax.Array
  clipped_count: jax.Array
  nonfinite_count: jax.Array
  invalid_count: jax.Array
  threshold: jax.Array
  update_norm: jax.Array
  leaf_norms: Any
  tag: Any = ()

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


class BaseFields(NamedTuple):
  """The fields every clipper state starts with, in this order (see :class:`ClipState`)."""

  count: jax.Array  # type: ignore[assignment]  # a field, shadows tuple.count
  norm: jax.Array
  scale: jax.Array
  clipped: jax.Array
  clipped_count: jax.Array
  nonfinite_count: jax.Array
  invalid_count: jax.Array


def init_base() -> BaseFields:
  """The shared fields of a fresh state: zero counts, norm 0, scale 1."""
  zero = jnp.zeros([], jnp.int32)
  return BaseFields(
      count=zero,
      norm=jnp.zeros([], stat_dtype()),
      scale=jnp.ones([], stat_dtype()),
      clipped=jnp.zeros([], jnp.bool_),
      clipped_count=zero,
      nonfinite_count=zero,
      invalid_count=zero,
  )


def init_clip_state(threshold: Any = jnp.inf, leaf_norms: Any = ()) -> ClipState:
  """A fresh :class:`ClipState` (``threshold`` a python number or a concrete array)."""
  base = init_base()
  dt = stat_dtype()
  try:
    t = jnp.asarray(threshold).astype(dt).reshape([])
  except (TypeError, ValueError):
    t = jnp.asarray(jnp.inf, dt)
  return ClipState(*base, threshold=t, update_norm=jnp.zeros([], dt), leaf_norms=leaf_norms)


def record(
    state: ClipState,
    norm: jax.Array,
    scale: jax.Array,
    clipped: jax.Array,
    nonfinite: jax.Array,
    invalid: jax.Array | None = None,
) -> BaseFields:
  """The shared fields after one update with this pre-clip norm, applied scale and flags.

  Every counter saturates (:func:`add_count`); ``invalid`` (a traced hyperparameter out of its
  range, or ``None`` when none can be) is counted in ``invalid_count``.
  """
  dtype = state.norm.dtype
  return BaseFields(
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


def clip_state(base: BaseFields, threshold: Any, update_norm: Any, leaf_norms: Any) -> ClipState:
  """A :class:`ClipState` from the shared fields :func:`record` gave and the three others."""
  dt = base.norm.dtype
  return ClipState(
      *base,
      threshold=jnp.asarray(threshold).astype(dt).reshape([]),
      update_norm=jnp.asarray(update_norm).astype(dt),
      leaf_norms=leaf_norms,
  )


def applied_norm(norm: jax.Array, scale: jax.Array) -> jax.Array:
  """The norm after scaling by ``scale`` (0 where the update was zeroed, whatever ``norm``)."""
  return jnp.where(scale == 0, jnp.zeros_like(norm), norm * scale.astype(norm.dtype))


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
_STATE_TYPES: list[Any] = []


def register_state(cls: type) -> type:
  """Class decorator: makes :func:`metrics` read ``cls`` also in its dict forms."""
  _STATE_TYPES.append(cls)
  return cls


register_state(ClipState)


# Fields a dict form may drop when they hold nothing (``()``).
_OPTIONAL = frozenset({"leaf_norms", "tag", "loss", "loss_threshold", "loss_history",
                       "loss_cursor", "loss_accepted", "loss_spike_count"})


def _rebuild(fields: Mapping) -> Any:
  """The clipax state whose field names are exactly the keys of ``fields``, or ``None``."""
  keys = set(fields)
  for cls in _STATE_TYPES:
    # an empty ``leaf_norms`` (no leaf metrics) may be dropped by a dict form
    if keys <= set(cls._fields) and set(cls._fields) - keys <= _OPTIONAL:
      values: dict[str, Any] = {}
      for f in cls._fields:
        if f == "inner_state":  # searched separately, whatever its form
          values[f] = None
        elif f not in fields:
          values[f] = ()
        else:
          values[f] = jax.tree_util.tree_map(_value, fields[f], is_leaf=_is_wrapped)
      return cls(**values)
  return None


def clip_state_metrics(state: Any) -> dict[str, jax.Array]:
  """The metrics shared by every state with the :class:`ClipState` fields (and, where the state
  has them, ``threshold`` and ``update_norm``; a global clipper's post-clip norm is
  ``norm * scale``)."""
  count = _value(state.count)
  clipped_count = _value(state.clipped_count)
  rate = clipped_count.astype(jnp.float32) / jnp.maximum(count, 1).astype(jnp.float32)
  norm = _value(state.norm)
  scale = _value(state.scale)
  out = {
      "norm": norm,
      "scale": scale,
      "clipped": _value(state.clipped),
      "clip_rate": rate,
      "clipped_count": clipped_count,
      "nonfinite_count": _value(state.nonfinite_count),
      "invalid_count": _value(state.invalid_count),
      "count": count,
  }
  update_norm = getattr(state, "update_norm", None)
  out["update_norm"] = (
      jnp.where(scale == 0, jnp.zeros_like(norm), norm * scale) if update_norm is None
      else _value(update_norm))
  threshold = getattr(state, "threshold", None)
  if threshold is not None:
    out["threshold"] = _value(threshold)
  return out


# ----------------------------------------------------------------------------- names
# A transformation's kind and ``name=`` travel with its state as the state's *type*: a cached
# subclass of the registered state class carrying two class attributes. The type is part of the
# pytree structure, so it survives ``jit``, ``lax.scan``, ``tree_map``, Flax NNX variables and an
# orbax or ``flax.serialization`` restore into a target; only the dict forms lose it (then
# :func:`clipax.metrics` falls back to the ``named_chain`` key or the state's class).
_NAMED_TYPES: dict[tuple[type, str, str | None], type] = {}


def _base_type(cls: type) -> type:
  for c in cls.__mro__:
    if c in _STATE_TYPES:
      return c
  raise TypeError(f"{cls.__name__} is not a registered clipax state")


def _unpickle(base: type, kind: str, name: str | None, values: tuple) -> Any:
  return named_type(base, kind, name)(*values)


def named_type(base: type, kind: str, name: str | None) -> type:
  """The subclass of state class ``base`` that records a transformation's kind and name."""
  key = (base, kind, name)
  cls = _NAMED_TYPES.get(key)
  if cls is None:
    def __reduce__(self):  # noqa: N807 - pickles by the base class, which is importable
      return _unpickle, (base, kind, name, tuple(self))

    cls = type(base.__name__, (base,), {
        "__slots__": (),
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__reduce__": __reduce__,
        "clipax_kind": kind,
        "clipax_name": name,
    })
    _NAMED_TYPES[key] = cls
  return cls


def encode_tag(kind: str, name: str | None) -> jax.Array:
  """The ``tag`` field: ``"{kind}/{name}"`` as UTF-8 bytes (never empty)."""
  return jnp.asarray(np.frombuffer(f"{kind}/{name or ''}".encode(), np.uint8))


def decode_tag(value: Any) -> tuple[str, str | None] | None:
  """``(kind, name)`` from a concrete ``tag`` field, ``None`` when it is absent or traced."""
  try:
    raw = np.asarray(value, np.uint8).tobytes().decode()
  except (TypeError, ValueError, jax.errors.TracerArrayConversionError):
    return None
  kind, sep, name = raw.partition("/")
  return (kind, name or None) if sep and kind else None


def tag(state: Any, kind: str, name: str | None) -> Any:
  """``state`` as an instance of its named type, its ``tag`` field set."""
  cls = named_type(_base_type(type(state)), kind, name)
  values = state._asdict()
  if "tag" in values:
    values["tag"] = encode_tag(kind, name)
  return cls(**values)


def check_name(name: Any) -> str | None:
  """``name=``: ``None`` or a non-empty string without ``/`` (it becomes one part of a key)."""
  if name is None:
    return None
  if not isinstance(name, str) or not name or "/" in name:
    raise TypeError(
        f"`name` must be None or a non-empty str without '/', got {name!r}"
        + ("" if isinstance(name, str) else f" of type {type(name).__name__}"))
  return name


def named(tx: Any, kind: str, name: str | None) -> Any:
  """``tx`` whose states carry ``kind`` and ``name`` (see :func:`tag`); the same class of
  transformation as ``tx``, extra arguments passed through."""
  name = check_name(name)

  def init_fn(params):
    return tag(tx.init(params), kind, name)

  if isinstance(tx, optax.GradientTransformationExtraArgs):
    def update_fn(updates, state, params=None, **extra_args):
      out, new_state = tx.update(updates, state, params, **extra_args)
      return out, tag(new_state, kind, name)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

  def plain_update_fn(updates, state, params=None):
    out, new_state = tx.update(updates, state, params)
    return out, tag(new_state, kind, name)

  return optax.GradientTransformation(init_fn, plain_update_fn)


def is_clipax_state(x: Any) -> bool:
  return isinstance(x, tuple) and callable(getattr(x, "clipax_metrics", None))


