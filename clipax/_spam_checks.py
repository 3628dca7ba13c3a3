"""SPAM's input checks: real floating leaves, parameters paired with their gradients, and updates
that match the state ``init`` built, each failure a ``TypeError``/``ValueError`` naming the leaf
path (:func:`clipax.spam` calls them before tracing anything)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _path(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def _dtype(leaf: Any) -> jnp.dtype:
  dtype = getattr(leaf, "dtype", None)
  return jnp.dtype(jnp.result_type(leaf) if dtype is None else dtype)


def _check_real(tree: Any, what: str) -> None:
  """Rejects complex (and other non-real-floating) leaves with a TypeError naming the leaf."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    try:
      dtype = None if isinstance(leaf, (str, bytes)) else _dtype(leaf)
    except TypeError:
      dtype = None
    if dtype is None or np.dtype(dtype).kind in "OSU":
      raise TypeError(
          f"spam: {what} leaf {_path(path)} is {leaf!r:.60} of type {type(leaf).__name__}, "
          "not a floating array")
    if not jnp.issubdtype(dtype, jnp.floating):
      kind = "complex" if jnp.issubdtype(dtype, jnp.complexfloating) else "non-floating"
      raise TypeError(
          f"spam: {what} leaf {_path(path)} has {kind} dtype {dtype}; spam supports real "
          "floating leaves only"
      )


def _check_params(params: Any, updates: Any) -> None:
  """Weight decay pairs each parameter with its gradient: same structure and shapes, or a
  ValueError naming both (a broadcastable shape would silently decay the wrong way)."""
  treedef: Any = jax.tree_util.tree_structure(updates)
  p_def: Any = jax.tree_util.tree_structure(params)
  if treedef != p_def:
    raise ValueError(
        f"spam: `params` do not have the structure of the gradients: params {p_def} vs "
        f"gradients {treedef}")
  flat = jax.tree_util.tree_flatten_with_path(updates)[0]
  for (path, g), p in zip(flat, treedef.flatten_up_to(params), strict=True):
    if jnp.shape(g) != jnp.shape(p):
      raise ValueError(
          f"spam: parameter leaf {_path(path)} has shape {jnp.shape(p)} but its gradient has "
          f"shape {jnp.shape(g)}")


def _check_matches(updates: Any, state: Any) -> tuple[Any, list, list, list]:
  """The updates' treedef and the flat gradients, first and second moments; a ValueError naming
  both when the updates do not have the structure or shapes the state was built with."""
  treedef: Any = jax.tree_util.tree_structure(updates)
  state_def: Any = jax.tree_util.tree_structure(state.mu)
  if treedef != state_def:
    raise ValueError(
        "spam: the gradients do not have the structure of the state built by init(params): "
        f"gradients {treedef} vs state {state_def}"
    )
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(updates)[0]]
  grads, mus, nus = (treedef.flatten_up_to(t) for t in (updates, state.mu, state.nu))
  for path, g, m in zip(paths, grads, mus, strict=True):
    shape = jnp.shape(g)
    placeholder = math.prod(shape) == 0 and jnp.shape(m) == ()
    if shape != jnp.shape(m) and not placeholder:
      raise ValueError(
          f"spam: gradient leaf {_path(path)} has shape {shape} but the state built by "
          f"init(params) holds shape {jnp.shape(m)} there"
      )
  return treedef, grads, mus, nus
