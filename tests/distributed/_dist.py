"""Shared pieces of the distributed tests: meshes, a transformer-shaped tree, HLO counts."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

# Megatron-style tensor parallelism over "model"; gradients replicated over "data" (as they are
# after the data-parallel reduction). Column-parallel kernels split their outputs, row-parallel
# kernels their inputs; row-parallel biases and layer norms stay whole on every device.
MEGATRON = {
    "qkv": P(None, "model"),
    "qkv_bias": P("model"),
    "out": P("model", None),
    "out_bias": P(),
    "ln1": P(),
    "up": P(None, "model"),
    "up_bias": P("model"),
    "down": P("model", None),
    "down_bias": P(),
    "ln2": P(),
}

# Fully sharded (FSDP over "data") plus tensor parallelism over "model".
FSDP_TP = {
    "qkv": P("data", "model"),
    "qkv_bias": P("model"),
    "out": P("model", "data"),
    "out_bias": P(),
    "ln1": P(),
    "up": P("data", "model"),
    "up_bias": P("model"),
    "down": P("model", "data"),
    "down_bias": P(),
    "ln2": P(),
}


def mesh_2x4() -> jax.sharding.Mesh:
  """A (data=2, model=4) mesh with Auto axes, so plain ``jit`` partitions with GSPMD."""
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))


def transformer_grads(layers: int, *, d: int = 32, vocab: int = 64, seed: int = 0):
  """A gradient pytree shaped like a small transformer: embedding, ``layers`` blocks, head.

  Returns ``(tree, leaf_names)`` where ``leaf_names`` maps each leaf to a key of the layouts
  above (for the embedding and head, the kernel they are sharded like).
  """
  rng = np.random.default_rng(seed)
  shapes = {
      "qkv": (d, 3 * d),
      "qkv_bias": (3 * d,),
      "out": (d, d),
      "out_bias": (d,),
      "ln1": (d,),
      "up": (d, 4 * d),
      "up_bias": (4 * d,),
      "down": (4 * d, d),
      "down_bias": (d,),
      "ln2": (d,),
  }

  def draw(shape):
    return jnp.asarray(rng.normal(size=shape) * rng.uniform(0.1, 3.0), jnp.float32)

  tree = {"embed": draw((vocab, d)), "head": draw((d, vocab))}
  kinds = {"embed": "down", "head": "up"}
  for i in range(layers):
    tree[f"block{i:03d}"] = {name: draw(shape) for name, shape in shapes.items()}
    kinds[f"block{i:03d}"] = {name: name for name in shapes}
  return tree, kinds


def place(tree, kinds, layout, mesh):
  """``tree`` on ``mesh`` with each leaf's ``NamedSharding`` taken from ``layout``."""
  specs = jax.tree_util.tree_map(lambda kind: layout[kind], kinds)
  return jax.tree_util.tree_map(
      lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)), tree, specs
  ), specs


def _computations(hlo: str) -> dict[str, list[str]]:
  comps, name = {}, None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if head:
      name = head.group(1)
      comps[name] = []
    elif name is not None:
      comps[name].append(line)
  return comps


def _called_from_conditionals(comps: dict[str, list[str]]) -> set[str]:
  """Names of the branch computations of every ``conditional`` (the rare rescue path)."""
  branches = set()
  for lines in comps.values():
    for line in lines:
      if " conditional(" not in line:
        continue
      for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
        branches.update(n.strip().lstrip("%") for n in group.split(","))
      branches.update(re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", line))
  return branches


def all_reduces(hlo: str) -> dict[str, list[str]]:
  """The all-reduce instructions of a compiled module, split by where they run.

  Returns ``{"main": [...], "branch": [...]}``: ``branch`` holds those inside the branches of a
  ``conditional`` (clipax's overflow rescue, executed only when a sum overflows), ``main`` the
  rest. Each entry is the instruction's result shape, e.g. ``"f32[]"`` or ``"(f32[], f32[])"``.
  """
  comps = _computations(hlo)
  branches = _called_from_conditionals(comps)
  out = {"main": [], "branch": []}
  for name, lines in comps.items():
    for line in lines:
      found = re.search(r"=\s*(.*?)\s+all-reduce(?:-start)?\(", line)
      if found:
        shape = re.sub(r"\{[^{}]*\}", "", found.group(1))  # drop layouts: f32[8]{0} -> f32[8]
        out["branch" if name in branches else "main"].append(shape)
  return out


def scalar_only(shape: str) -> bool:
  """Whether an HLO result shape is a scalar or a tuple of scalars."""
  parts = re.findall(r"[a-z]+\d*\[[^\]]*\]", shape)
  return bool(parts) and all(p.endswith("[]") for p in parts)


MOVES = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def data_movements(hlo: str) -> dict[str, int]:
  """How many collectives that move tensor data (not scalars) the module contains, by kind."""
  return {k: len(re.findall(rf"\s{k}(?:-start)?\(", hlo)) for k in MOVES}


def local_piece(x, spec, index: dict[str, int], sizes: dict[str, int]) -> np.ndarray:
  """The block of ``x`` that the device at mesh position ``index`` holds under ``spec``."""
  x = np.asarray(x)
  for dim, entry in enumerate(tuple(spec)):
    if entry is None:
      continue
    names = entry if isinstance(entry, tuple) else (entry,)
    block, count = 0, 1
    for name in names:
      block, count = block * sizes[name] + index[name], count * sizes[name]
    size = x.shape[dim] // count
    x = np.take(x, np.arange(block * size, (block + 1) * size), axis=dim)
  return x


def specs_of(kinds, layout):
  """The ``PartitionSpec`` tree for a tree whose leaves are named by ``kinds``."""
  return jax.tree_util.tree_map(lambda kind: layout[kind], kinds)


def is_spec(x) -> bool:
  return isinstance(x, P)


def replicated_of(specs):
  """``True`` for the leaves whose spec splits nothing (the same on every device)."""
  return jax.tree_util.tree_map(lambda s: all(a is None for a in s), specs, is_leaf=is_spec)


def f64(x) -> np.ndarray:
  return np.asarray(jnp.asarray(x), np.float64)
