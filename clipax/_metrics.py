"""``clipax.metrics``: every clipax state inside an optax state, as one flat ``dict`` of scalars.

Keys are ``{prefix}/{name}/{metric}``. A state's *name* is, in this order: the ``name=`` its
transformation was built with (carried by the state's type, see :func:`clipax._state.named`), the
``optax.named_chain`` (or ``optax.partition`` label) key the state sits under, or its kind
(``global_norm``, ``zclip``, ``skip_spikes``, ...). Two states that end up with one name get
suffixes in the order they are found (``global_norm``, ``global_norm_2``); name them to make
every key independent of the other transformations in the chain.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import optax

from clipax._state import (
    _OPTIONAL,
    _STATE_TYPES,
    BaseFields,
    _rebuild,
    _value,
    clip_state_metrics,
    decode_tag,
    is_clipax_state,
)

# The kind a state reports when it lost its named type (dict forms, or built by hand).
_KIND_OF_CLASS = {
    "ClipState": "clip",
    "ZClipState": "zclip",
    "AutoClipState": "autoclip",
    "AdaGCState": "adagc",
    "SkipNonfiniteState": "skip_nonfinite",
    "SkipState": "skip_spikes",
    "SpamState": "spam",
    "UpdateClipState": "update_clip",
    "PerExampleState": "per_example",
}

# Keys of wrapper states (optax's, Flax's) in their dict forms: never a user's chain name.
_WRAPPER_KEYS = frozenset({
    "inner_state", "inner_states", "inner_opt_state", "opt_state", "value", "hyperparams",
})


class _PureState:
  """Reads the metrics of a dict that holds the shared clipper fields but matches no registered
  state exactly (a state of an older or newer clipax version)."""

  def __init__(self, fields: Mapping):
    self.fields = fields

  def clipax_metrics(self) -> dict[str, jax.Array]:
    shared = {f: self.fields[f] for f in BaseFields._fields}
    for extra in ("threshold", "update_norm"):
      if extra in self.fields:
        shared[extra] = self.fields[extra]
    out = clip_state_metrics(SimpleNamespace(**shared))
    if "skipped_count" in self.fields:
      out["skipped_count"] = _value(self.fields["skipped_count"])
    return out


def _is_pure_state(x: Any) -> bool:
  """A clipax state flattened to a ``dict`` (``nnx.to_pure_dict``, a restored checkpoint)."""
  if not isinstance(x, Mapping):
    return False
  keys = set(x)
  return any(keys <= set(c._fields) and set(c._fields) - keys <= _OPTIONAL
             for c in _STATE_TYPES) or keys >= set(BaseFields._fields)


def _is_state(x: Any) -> bool:
  return is_clipax_state(x) or _is_pure_state(x)


def _key_name(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _chain_name(path: tuple) -> str | None:
  """The innermost string dict key of ``path`` that is not a wrapper's field."""
  for entry in reversed(path):
    key = getattr(entry, "key", None)
    # digit strings are a tuple's positions in a dict form (``flax.serialization``)
    if isinstance(key, str) and key not in _WRAPPER_KEYS and not key.isdigit():
      return key
  return None


class _Found:
  """One clipax state found inside an optax state, with what names it."""

  def __init__(self, state: Any, explicit: str | None, kind: str, leaf_norms: Any):
    self.state = state
    self.explicit = explicit
    self.kind = kind
    self.leaf_norms = leaf_norms


def _identity(cls_kind: str | None, cls_name: str | None, tag: Any, fallback_kind: str,
              path: tuple) -> tuple[str, str | None]:
  """``(kind, name)``: from the state's type, else its ``tag`` field, else its class and the
  chain key it sits under."""
  decoded = None if cls_kind is not None else decode_tag(tag)
  kind, name = (cls_kind, cls_name) if decoded is None else decoded
  return kind or fallback_kind, name or _chain_name(path)


def _find(node: Any, found: list[_Found]) -> None:
  flat, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=_is_state)
  for path, leaf in flat:
    if is_clipax_state(leaf):
      cls = type(leaf)
      kind, name = _identity(getattr(cls, "clipax_kind", None), getattr(cls, "clipax_name", None),
                             getattr(leaf, "tag", ()), _KIND_OF_CLASS.get(cls.__name__, "clip"),
                             path)
      found.append(_Found(leaf, name, kind, getattr(leaf, "leaf_norms", ())))
      inner = getattr(leaf, "inner_state", None)
      if inner is not None:
        _find(inner, found)
    elif _is_pure_state(leaf):
      rebuilt = _rebuild(leaf)
      state = _PureState(leaf) if rebuilt is None else rebuilt
      tag = leaf.get("tag", ())
      tag = tag.get("value", tag) if isinstance(tag, Mapping) else tag
      kind, name = _identity(None, None, () if isinstance(tag, tuple) else _value(tag),
                             _KIND_OF_CLASS.get(type(rebuilt).__name__, "clip"), path)
      found.append(_Found(state, name, kind, leaf.get("leaf_norms", ())))
      if "inner_state" in leaf:
        _find(leaf["inner_state"], found)


def _names(found: list[_Found]) -> list[str]:
  """One distinct name per state: explicit names first claim theirs, then kinds."""
  names: list[str | None] = [f.explicit for f in found]
  taken: set[str] = set()
  out: list[str] = []
  for i, f in enumerate(found):
    base = names[i] or f.kind
    name, n = base, 1
    while name in taken or (names[i] is None and name in names[i + 1:]):
      n += 1
      name = f"{base}_{n}"
    taken.add(name)
    out.append(name)
  return out


def _leaf_metrics(leaf_norms: Any) -> dict[str, jax.Array]:
  flat, _ = jax.tree_util.tree_flatten_with_path(leaf_norms)
  out = {}
  for path, value in flat:
    keys = [_key_name(e) for e in path]
    if keys and keys[-1] == "value":  # a Flax NNX variable's value, as a dict form gives it
      keys = keys[:-1]
    key = "leaf_norm/" + "/".join(keys)
    v = _value(value)
    if v.ndim == 0:
      out[key] = v
    else:  # a stacked leaf (``layer_axis``): one norm per layer, keyed as its unstacked twin's
      for i in range(v.shape[0]):
        out[f"{key}/{i}"] = v[i]
  return out


def _finite_threshold(m: dict[str, jax.Array]) -> None:
  """A threshold that is not in force (``inf``: off, or a rule still warming up) is reported as
  the step's own norm, so no metric is infinite in normal operation."""
  t = m.get("threshold")
  if t is not None and "norm" in m:
    norm = jnp.asarray(m["norm"]).astype(t.dtype)
    m["threshold"] = jnp.where(jnp.isposinf(t), norm, t)


def metrics(opt_state: Any, *, prefix: str = "clip") -> dict[str, jax.Array]:
  """A flat ``dict`` of every clipax metric found inside an optax state.

  Finds clipax states anywhere inside ``opt_state``: ``optax.chain`` and ``named_chain``,
  ``inject_hyperparams``, ``MultiSteps``, ``masked``/``partition``, a Flax ``nnx.Optimizer``'s
  ``opt_state``, a ``TrainState`` and clipax guards around other optimizers; and in every dict
  form of those states (``nnx.State``, ``nnx.to_pure_dict``, ``flax.serialization``, an orbax
  checkpoint restored with or without a target), recognised by their field names.

  Keys are ``"{prefix}/{name}/{metric}"``. The name is the transformation's ``name=``, else
  the ``optax.named_chain`` key (or ``optax.partition`` label) its state sits under, else its
  kind: ``global_norm``, ``value``, ``leaf_norm``, ``block_rms``, ``agc``, ``zclip``,
  ``autoclip``, ``adagc``, ``skip_nonfinite``, ``skip_spikes``, ``spam``, ``monitor``. Only
  when two states end up with one name does the later one get a suffix (``global_norm_2``), so
  a named clipper's keys never change when another clipper is added or removed. A state that
  lost its type on the way through a dict keeps its chain key, but its kind is then read from
  its fields (``clip`` for the fixed clippers, which share :class:`clipax.ClipState`).

  Every clipper reports ``norm`` (pre-clip), ``update_norm`` (post-clip), ``scale``,
  ``clipped``, ``clip_rate`` (clipped updates / all updates), ``clipped_count``,
  ``nonfinite_count``, ``invalid_count`` and ``count``, and ``threshold``, the one in force
  (fixed or learned); where none is in force (``inf``: off, or a rule still warming up without
  a cap) ``threshold`` is the step's own norm, so nothing was over it and no metric is
  infinite. zclip adds ``mean`` and ``std``, guards ``skipped``, ``skip_rate`` and
  ``skipped_count``. With ``leaf_metrics=True`` the pre-clip norm of every leaf is
  ``"{prefix}/{name}/leaf_norm/<key path>"``, the path joined by ``/``
  (``clip/global_norm/leaf_norm/params/Dense_0/kernel``); a leaf stacked along ``layer_axis``
  gives one key per layer, ``.../leaf_norm/<key path>/<i>``, the key of layer ``i`` of the
  unstacked model held as a list. Under ``optax.MultiSteps`` the
  clipax states are updated once per optimizer step, so their metrics describe the last real
  update; ``"{prefix}/updated"`` says whether the call that produced ``opt_state`` applied one
  (``False`` while gradients are being accumulated).

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
    >>> print(f"{m['clip/global_norm/norm']:.3f} {m['clip/global_norm/update_norm']:.1f}")
    3.464 1.0
  """
  if not isinstance(prefix, str) or not prefix:
    raise TypeError(f"`prefix` must be a non-empty str, got {prefix!r}")
  found: list[_Found] = []
  _find(opt_state, found)
  out: dict[str, jax.Array] = {}
  for name, f in zip(_names(found), found, strict=True):
    m = dict(f.state.clipax_metrics())
    _finite_threshold(m)
    m.update(_leaf_metrics(f.leaf_norms))
    for key, value in m.items():
      out[f"{prefix}/{name}/{key}"] = value
  multi = _multi_steps(opt_state)
  if found and multi is not None:
    out[f"{prefix}/updated"] = _updated(multi)
  return out


# The fields a dict form of ``optax.MultiStepsState`` always keeps (an empty ``skip_state`` has
# no arrays and is dropped by ``nnx.to_pure_dict`` and orbax restores without a target).
_MULTI_STEPS_FIELDS = frozenset({"mini_step", "gradient_step", "inner_opt_state", "acc_grads"})


def _is_multi_steps(x: Any) -> bool:
  return isinstance(x, optax.MultiStepsState) or (
      isinstance(x, Mapping) and _MULTI_STEPS_FIELDS <= set(x)
      and set(x) <= set(optax.MultiStepsState._fields))


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
