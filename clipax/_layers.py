"""Stacked (scanned) layers: a leaf of shape ``(L, ...)`` along ``layer_axis`` counts as L layers.

MaxText, Levanter, AXLearn, Flax's ``nn.scan`` and ``nnx.scan``/``nnx.vmap`` keep a model's
repeated layers as one leaf per parameter with a layer axis in front (or elsewhere). A per-leaf
clipper sees that leaf as one layer. With ``layer_axis`` the per-leaf transformations split each
stacked leaf into its L slices *before* their per-leaf machinery and stack the results after:
that machinery then sees exactly the tree in which every stacked leaf is replaced by the tuple of
its layers, so each per-layer norm, threshold, statistic and clipped update is bit-for-bit what
the unstacked model gives (slicing and stacking only move data). XLA fuses each slice into the
reduction that reads it and the L rescaled slices into one output, so a gradient is still read
once for its norms and once for its rescale (on the CPU the overflow rescue's ``lax.cond`` takes
the slices as operands, one copy of a stacked leaf; GPU and TPU have no conditional there).

Bit-for-bit holds for a *leading* layer axis (``nnx.scan``, ``nn.scan``, Levanter, AXLearn),
whose layers are contiguous. A layer along another axis (MaxText's ``param_scan_axis=1``) is
strided in memory and XLA may sum its fused, strided read in another order than a contiguous
array's (the CPU does, by an ulp; an optimization barrier does not stop it): its per-layer norms
are then equal to the unstacked ones up to that rounding.

A ``layer_axis`` is ``None`` (no stacked leaf), an int (every leaf is stacked along that axis; a
leaf without it is an error), a pytree prefix of the tree with int or ``None`` leaves, or a
function ``(key_path, leaf) -> int | None``. Per-layer values kept in a state (AdaGC's ``gamma``,
``leaf_norms``) are ``(L,)`` vectors for a stacked leaf and scalars for the others;
:func:`clipax.metrics` reports such a vector as one key per layer, ``<path>/<i>``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# None, an int, a pytree prefix of ints/None, or a function (key_path, leaf) -> int | None.
LayerAxis = Any

_FORMS = ("None, an int, a pytree prefix of the tree with int/None leaves, or a function "
          "(key_path, leaf) -> int | None")


def _is_int(x: Any) -> bool:
  """A python/numpy int or a concrete integer scalar array (``inject_hyperparams`` makes one)."""
  if isinstance(x, (bool, np.bool_)):
    return False
  if isinstance(x, (int, np.integer)):
    return True
  return (hasattr(x, "dtype") and hasattr(x, "shape") and not isinstance(x, jax.core.Tracer)
          and np.shape(x) == () and np.dtype(x.dtype).kind in "iu")


def _static(x: Any, what: str) -> None:
  if isinstance(x, jax.core.Tracer):
    raise TypeError(
        f"{what}: `layer_axis` must be static (it decides the program), got a traced value; "
        "with optax.inject_hyperparams pass static_args=('layer_axis',)"
    )


def _check_function(fn: Any, what: str) -> None:
  """A function ``layer_axis`` is called as ``fn(key_path, leaf)``: refuse one that cannot be
  (a function of the leaf only, as AGC's ``axes`` is) before it fails inside the update."""
  try:
    signature = inspect.signature(fn)
  except (TypeError, ValueError):  # no signature to read (some builtins): checked when called
    return
  try:
    signature.bind(None, None)
  except TypeError:
    raise TypeError(
        f"{what}: a function `layer_axis` is called as layer_axis(key_path, leaf) -> int | None; "
        f"{getattr(fn, '__name__', fn)!r} has the signature {signature}"
    ) from None


def check_layer_axis(layer_axis: LayerAxis, what: str = "layer_axis") -> None:
  """Construction-time check of the form of ``layer_axis`` (ranges are checked per leaf)."""
  _static(layer_axis, what)
  if callable(layer_axis):
    _check_function(layer_axis, what)
    return
  if layer_axis is None or _is_int(layer_axis):
    return
  leaves = jax.tree_util.tree_leaves(layer_axis, is_leaf=lambda x: x is None)
  bad = [x for x in leaves if x is not None and not _is_int(x)]
  if bad or not leaves:
    shown = f"a leaf {bad[0]!r} of type {type(bad[0]).__name__}" if bad else repr(layer_axis)
    raise TypeError(f"{what}: `layer_axis` must be {_FORMS}; got {shown}")


class _Axis:
  """An axis (or ``None``) held as an opaque pytree leaf, so ``None`` survives ``tree_leaves``."""

  def __init__(self, axis: Any):
    self.axis = axis


def _given(tree: Any, layer_axis: LayerAxis, what: str) -> list[Any]:
  """The raw ``layer_axis`` of each leaf of ``tree`` (flatten order)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  if callable(layer_axis):
    return [layer_axis(path, leaf) for path, leaf in flat]
  if _is_int(layer_axis):
    return [layer_axis] * len(flat)

  def expand(axis, subtree):
    return [_Axis(axis)] * len(jax.tree_util.tree_leaves(subtree))

  try:
    nested = jax.tree_util.tree_map(expand, layer_axis, tree, is_leaf=lambda x: x is None)
  except (TypeError, ValueError) as e:
    raise ValueError(
        f"{what}: `layer_axis` must be {_FORMS}; {layer_axis!r} is not a prefix of the tree "
        f"({e}). For a tree whose containers differ (an nnx.State), pass a function."
    ) from None
  return [a.axis for a in jax.tree_util.tree_leaves(nested)]


class Stacking(NamedTuple):
  """Which leaves (flatten order) are stacked: ``axes[j]`` the layer axis of leaf ``j`` (``None``
  for an ordinary leaf) and ``sizes[j]`` its number of layers (1 for an ordinary leaf)."""

  axes: tuple[int | None, ...]
  sizes: tuple[int, ...]

  def split(self, leaves: Sequence[Any]) -> list[Any]:
    """The leaves with each stacked leaf replaced by its layers ``x[i]`` (along its axis)."""
    out: list[Any] = []
    for x, a, n in zip(leaves, self.axes, self.sizes, strict=True):
      if a is None:
        out.append(x)
        continue
      out.extend(lax.index_in_dim(x, i, a, keepdims=False) for i in range(n))
    return out

  def split_values(self, values: Sequence[Any]) -> list[Any]:
    """Per-leaf values (a ``(L,)`` vector for a stacked leaf) as one value per layer."""
    out: list[Any] = []
    for v, a, n in zip(values, self.axes, self.sizes, strict=True):
      out.extend([v] if a is None else [v[i] for i in range(n)])
    return out

  def repeat(self, flags: Sequence[Any]) -> list[Any]:
    """A per-leaf property (a replicated flag) for each layer."""
    out: list[Any] = []
    for f, a, n in zip(flags, self.axes, self.sizes, strict=True):
      out.extend([f] if a is None else [f] * n)
    return out

  def _groups(self, per_layer: Sequence[Any]) -> list[list[Any]]:
    counts = [1 if a is None else n for a, n in zip(self.axes, self.sizes, strict=True)]
    if len(per_layer) != sum(counts):
      raise ValueError("internal: per-layer values do not match the stacking")
    starts = np.cumsum([0, *counts])
    return [list(per_layer[int(b):int(e)]) for b, e in zip(starts[:-1], starts[1:], strict=True)]

  def stack(self, per_layer: Sequence[Any], dtype: Any = None) -> list[Any]:
    """Per-layer scalars back to one value per leaf: a ``(L,)`` vector for a stacked leaf."""
    out = []
    for group, a in zip(self._groups(per_layer), self.axes, strict=True):
      if a is None:
        out.append(group[0])
      elif group:
        out.append(jnp.stack([jnp.asarray(v) for v in group]))
      else:  # zero layers
        out.append(jnp.zeros((0,), jnp.float32 if dtype is None else dtype))
    return out

  def restack(self, per_layer: Sequence[Any], leaves: Sequence[Any]) -> list[Any]:
    """Per-layer arrays back to stacked leaves along their axes (``leaves``: the originals)."""
    out = []
    for group, a, x in zip(self._groups(per_layer), self.axes, leaves, strict=True):
      if a is None:
        out.append(group[0])
      else:
        out.append(jnp.stack(group, axis=a) if group else x)
    return out


def resolve(tree: Any, layer_axis: LayerAxis, what: str) -> Stacking | None:
  """The :class:`Stacking` of ``tree`` under ``layer_axis``; ``None`` when no leaf is stacked
  (so the program is the one without ``layer_axis``).

  Raises:
    TypeError: for a ``layer_axis`` (or a value its function returns) that is not an int/None.
    ValueError: for an axis out of range for a leaf (naming the leaf's path, the axis and the
      leaf's shape), or a prefix that does not match ``tree``.
  """
  if layer_axis is None:
    return None
  check_layer_axis(layer_axis, what)
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  axes: list[int | None] = []
  sizes: list[int] = []
  for (path, leaf), a in zip(flat, _given(tree, layer_axis, what), strict=True):
    where = jax.tree_util.keystr(path) or "<root>"
    _static(a, what)
    if a is None:
      axes.append(None)
      sizes.append(1)
      continue
    if not _is_int(a):
      raise TypeError(f"{what}: `layer_axis` gave {a!r} for leaf {where}; expected an int or None")
    shape = np.shape(leaf)
    axis = int(a)
    if not -len(shape) <= axis < len(shape):
      raise ValueError(
          f"{what}: `layer_axis` {axis} is out of range for leaf {where} of shape {shape} "
          f"(rank {len(shape)}); use None for a leaf that is not stacked"
      )
    axes.append(axis % len(shape))
    sizes.append(shape[axis % len(shape)])
  if all(a is None for a in axes):
    return None
  return Stacking(tuple(axes), tuple(sizes))


def zeros(tree: Any, layer_axis: LayerAxis, dtype: Any, what: str) -> Any:
  """A pytree shaped like ``tree`` with a zero per leaf: ``(L,)`` zeros for a stacked leaf."""
  stacking = resolve(tree, layer_axis, what)
  treedef: Any = jax.tree_util.tree_structure(tree)
  n = treedef.num_leaves
  shapes = [()] * n if stacking is None else [
      () if a is None else (s,) for a, s in zip(stacking.axes, stacking.sizes, strict=True)]
  return treedef.unflatten([jnp.zeros(s, dtype) for s in shapes])


def check_values(stacking: Stacking | None, values: Sequence[Any], field: str, what: str) -> None:
  """``values`` (a state's per-leaf entries) are shaped for ``stacking``: ``(L,)`` for a stacked
  leaf, a scalar otherwise; a ``ValueError`` otherwise (the state was built for other params)."""
  for j, v in enumerate(values):
    a = None if stacking is None else stacking.axes[j]
    want = () if a is None else (stacking.sizes[j],)  # type: ignore[union-attr]
    if np.shape(v) != want:
      raise ValueError(
          f"{what}: the state's `{field}` has an entry of shape {np.shape(v)} where these updates "
          f"and `layer_axis` need {want}; build the state with `init(params)` for these params"
      )

