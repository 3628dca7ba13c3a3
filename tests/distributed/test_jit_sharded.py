"""Plain ``jax.jit`` over gradients placed with ``NamedSharding``: GSPMD makes the norm global.

The compiled program is read back (``lower(...).compile().as_text()``) to check what the norm
costs on the wire: all-reduces of scalars only, no gather of any gradient, and a number of them
that does not grow with the number of leaves.
"""

import math

import jax
import numpy as np
import optax
import pytest
from _dist import (
    FSDP_TP,
    MEGATRON,
    all_reduces,
    data_movements,
    mesh_2x4,
    place,
    scalar_only,
    transformer_grads,
)
from _refs import assert_close, clip64, norm64

import clipax


def _clip_on(grads, max_norm):
  tx = clipax.clip_by_global_norm(max_norm)
  update = jax.jit(tx.update)
  state = tx.init(grads)
  return update, (grads, state)


def test_megatron_200_leaves_one_scalar_all_reduce_and_unsharded_result():
  tree, kinds = transformer_grads(20)
  assert len(jax.tree_util.tree_leaves(tree)) >= 200
  sharded, _ = place(tree, kinds, MEGATRON, mesh_2x4())
  max_norm = norm64(tree) / 3  # clipping is active

  update, args = _clip_on(sharded, max_norm)
  hlo = update.lower(*args).compile().as_text()
  reduces = all_reduces(hlo)
  assert len(reduces["main"]) == 1, reduces["main"]  # one norm, one all-reduce
  assert all(scalar_only(s) for s in reduces["main"] + reduces["branch"]), reduces
  assert data_movements(hlo) == dict.fromkeys(data_movements(hlo), 0), data_movements(hlo)

  out, state = update(*args)
  ref_out, ref_norm, ref_scale = clip64(tree, max_norm)
  assert_close(state.norm, ref_norm)
  assert_close(state.scale, ref_scale)
  for got, want in zip(jax.tree_util.tree_leaves(out), ref_out, strict=True):
    assert_close(got, want, atol=1e-6)

  # Same numbers as one device, and every leaf stays where it was: nothing was gathered.
  single, _ = jax.jit(clipax.clip_by_global_norm(max_norm).update)(tree, args[1])
  for got, want, x in zip(
      jax.tree_util.tree_leaves(out),
      jax.tree_util.tree_leaves(single),
      jax.tree_util.tree_leaves(sharded),
      strict=True,
  ):
    assert_close(got, want, atol=1e-6)
    assert got.sharding.is_equivalent_to(x.sharding, x.ndim)


def test_fsdp_tp_all_reduce_count_does_not_grow_with_depth():
  mesh = mesh_2x4()
  counts = []
  for layers in (2, 12):
    tree, kinds = transformer_grads(layers, seed=layers)
    sharded, specs = place(tree, kinds, FSDP_TP, mesh)
    fn = jax.jit(clipax.global_norm)
    hlo = fn.lower(sharded).compile().as_text()
    reduces = all_reduces(hlo)
    assert all(scalar_only(s) for s in reduces["main"] + reduces["branch"]), reduces
    assert sum(data_movements(hlo).values()) == 0, data_movements(hlo)
    counts.append(len(reduces["main"]))
    # At most one all-reduce per mesh axis of each distinct way the leaves are split.
    patterns = {frozenset(a for a in spec if a) for spec in jax.tree_util.tree_leaves(
        specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))}
    assert counts[-1] <= sum(len(p) for p in patterns), (counts[-1], patterns)
    assert_close(fn(sharded), norm64(tree))
  assert counts[0] == counts[1], counts


@pytest.mark.parametrize("ord", [1, math.inf])
def test_other_ords_match_unsharded(ord):
  tree, kinds = transformer_grads(2, seed=3)
  sharded, _ = place(tree, kinds, FSDP_TP, mesh_2x4())
  assert_close(jax.jit(lambda g: clipax.global_norm(g, ord=ord))(sharded), norm64(tree, ord))


def test_two_norms_two_all_reduces_at_most():
  tree, kinds = transformer_grads(2, seed=4)
  sharded, _ = place(tree, kinds, MEGATRON, mesh_2x4())
  tx = optax.chain(clipax.clip_by_global_norm(1.0), clipax.clip_by_global_norm(0.5, ord=math.inf))
  update = jax.jit(tx.update)
  state = tx.init(sharded)
  reduces = all_reduces(update.lower(sharded, state).compile().as_text())
  assert 1 <= len(reduces["main"]) <= 2, reduces["main"]
  out, _ = update(sharded, state)
  want, _ = jax.jit(tx.update)(tree, state)
  for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_explicit_mesh_axes():
  # jax.make_mesh gives Explicit axes by default: the shardings are part of the types.
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  tree, kinds = transformer_grads(2, seed=5)
  sharded, _ = place(tree, kinds, FSDP_TP, mesh)
  ref_out, ref_norm, _ = clip64(tree, 1.0)
  tx = clipax.clip_by_global_norm(1.0)
  update = jax.jit(tx.update)
  with jax.set_mesh(mesh):
    state = tx.init(sharded)
    hlo = update.lower(sharded, state).compile().as_text()
    out, state = update(sharded, state)
  assert sum(data_movements(hlo).values()) == 0, data_movements(hlo)
  assert all(scalar_only(s) for v in all_reduces(hlo).values() for s in v)
  assert_close(state.norm, ref_norm)
  for got, want, x in zip(jax.tree_util.tree_leaves(out), ref_out,
                          jax.tree_util.tree_leaves(sharded), strict=True):
    assert_close(got, want, atol=1e-6)
    assert jax.typeof(got).sharding.spec == jax.typeof(x).sharding.spec


@pytest.mark.parametrize("scale", [1.0, 1e20, 1e-25])
def test_gpu_path_on_sharded_leaves_is_exact_and_gathers_nothing(monkeypatch, scale):
  # The GPU's program, forced on the CPU: mesh-sharded leaves are reduced whole, the large ones
  # (>= _grouping.ROWS_FIRST elements) by rows first and summed as vectors of the rescue's sums.
  from clipax import _grouping, _platform

  tree, kinds = transformer_grads(2, d=128, seed=6)
  tree = jax.tree_util.tree_map(lambda x: x * scale, tree)
  assert any(x.ndim == 2 and x.size >= _grouping.ROWS_FIRST
             for x in jax.tree_util.tree_leaves(tree))
  sharded, _ = place(tree, kinds, FSDP_TP, mesh_2x4())
  monkeypatch.setattr(_platform, "_by_platform",
                      lambda cpu, accelerator, gpu=None: (gpu or accelerator)())
  fn = jax.jit(clipax.global_norm)
  hlo = fn.lower(sharded).compile().as_text()
  assert sum(data_movements(hlo).values()) == 0, data_movements(hlo)
  assert_close(fn(sharded), norm64(tree))
  leaf = jax.jit(clipax.leaf_norms)(sharded)
  for got, x in zip(jax.tree_util.tree_leaves(leaf), jax.tree_util.tree_leaves(tree), strict=True):
    assert_close(got, norm64(x))
