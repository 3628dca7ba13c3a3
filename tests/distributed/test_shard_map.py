"""``jax.shard_map``: each device holds a shard; ``axis_name`` makes the norm global.

Without ``axis_name`` a norm inside ``shard_map`` is the norm of the local shard (optax's only
behaviour there): each device clips its piece by its own norm. With it, the per-shard partial sum
is all-reduced once as a scalar and every device applies the same, global, scale. Leaves that are
the same on every device (``replicated=``) are counted once, not once per device.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _dist import (
    MEGATRON,
    all_reduces,
    f64,
    is_spec,
    local_piece,
    mesh_2x4,
    replicated_of,
    scalar_only,
    specs_of,
    transformer_grads,
)
from _refs import assert_close, norm64
from jax.sharding import PartitionSpec as P

import clipax

MESH = mesh_2x4()
SIZES = dict(zip(MESH.axis_names, MESH.axis_sizes, strict=True))

# Every leaf split over "model" (the tensor-parallel kinds of MEGATRON only).
SHARDED_KINDS = ("qkv", "qkv_bias", "out", "up", "up_bias", "down")
# Every leaf split over both axes.
BOTH = {
    "qkv": P("data", "model"),
    "qkv_bias": P(("data", "model")),
    "out": P("model", "data"),
    "out_bias": P(("data", "model")),
    "ln1": P(("model", "data")),
    "up": P(None, ("data", "model")),
    "up_bias": P(("data", "model")),
    "down": P(("model", "data")),
    "down_bias": P(("data", "model")),
    "ln2": P(("data", "model")),
}


def smap(fn, in_specs, out_specs):
  return jax.jit(jax.shard_map(fn, mesh=MESH, in_specs=in_specs, out_specs=out_specs))


def only_sharded(tree, kinds):
  keep = lambda t: {
      k: ({n: v for n, v in sub.items() if n in SHARDED_KINDS} if isinstance(sub, dict) else sub)
      for k, sub in t.items()
  }
  return keep(tree), keep(kinds)


def clip_in_shard_map(tree, specs, max_norm, **kw):
  tx = clipax.clip_by_global_norm(max_norm, **kw)
  state = tx.init(tree)
  state_specs = jax.tree_util.tree_map(lambda _: P(), state)

  def step(g, s):
    return tx.update(g, s)

  return smap(step, (specs, state_specs), (specs, state_specs))(tree, state)


@pytest.mark.parametrize("ord", [1, 2, math.inf])
def test_axis_name_gives_unsharded_result(ord):
  tree, kinds = only_sharded(*transformer_grads(3, seed=1))
  specs = specs_of(kinds, MEGATRON)
  ref_norm = norm64(tree, ord)
  max_norm = ref_norm / 4
  out, state = clip_in_shard_map(tree, specs, max_norm, ord=ord, axis_name="model")
  assert_close(state.norm, ref_norm)
  scale = max_norm / ref_norm
  for got, x in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(tree), strict=True):
    assert_close(got, f64(x) * scale, atol=1e-6)
  # Same result as the plain single-device clipper.
  single, _ = jax.jit(clipax.clip_by_global_norm(max_norm, ord=ord).update)(tree, state)
  for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(single), strict=True):
    assert_close(a, b, atol=1e-6)


def test_without_axis_name_each_shard_uses_its_own_norm():
  tree, kinds = only_sharded(*transformer_grads(3, seed=2))
  specs = specs_of(kinds, MEGATRON)
  max_norm = norm64(tree) / 8

  def step(g):
    norm = clipax.global_norm(g)
    return norm[None], clipax.clip_with_norm(g, norm, max_norm)

  norms, out = smap(step, (specs,), (P("model"), specs))(tree)
  leaves = jax.tree_util.tree_leaves(tree)
  spec_leaves = jax.tree_util.tree_leaves(specs, is_leaf=is_spec)
  for m in range(SIZES["model"]):
    index = {"data": 0, "model": m}
    pieces = [local_piece(x, s, index, SIZES) for x, s in zip(leaves, spec_leaves, strict=True)]
    local = norm64(pieces)
    assert_close(norms[m], local)  # the shard's own norm, not the global one
    scale = min(1.0, max_norm / local)
    for got, s, piece in zip(jax.tree_util.tree_leaves(out), spec_leaves, pieces, strict=True):
      assert_close(local_piece(got, s, index, SIZES), piece * scale, atol=1e-6)
  assert np.all(f64(norms) < norm64(tree))


def test_tuple_axis_name_over_both_mesh_axes():
  tree, kinds = transformer_grads(3, seed=3)
  specs = specs_of(kinds, BOTH)
  ref_norm = norm64(tree)
  out, state = clip_in_shard_map(tree, specs, ref_norm / 2, axis_name=("data", "model"))
  assert_close(state.norm, ref_norm)
  for got, x in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(tree), strict=True):
    assert_close(got, f64(x) / 2, atol=1e-6)


def _megatron_case(seed):
  tree, kinds = transformer_grads(3, seed=seed)
  specs = specs_of(kinds, MEGATRON)
  return tree, specs, replicated_of(specs)


def test_replicated_leaves_counted_once():
  tree, specs, rep = _megatron_case(4)
  assert any(jax.tree_util.tree_leaves(rep)) and not all(jax.tree_util.tree_leaves(rep))
  names = {"out_bias", "ln1", "down_bias", "ln2"}
  by_path = lambda path: getattr(path[-1], "key", None) in names

  def norms(g):
    return (
        clipax.global_norm(g, axis_name="model", replicated=rep),
        clipax.global_norm(g, axis_name="model", replicated=by_path),
        clipax.global_norm(g, axis_name="model"),
        clipax.global_norm(g, ord=math.inf, axis_name="model", replicated=rep),
    )

  with_prefix, with_predicate, without, peak = smap(norms, (specs,), (P(),) * 4)(tree)
  assert_close(with_prefix, norm64(tree))
  assert_close(with_predicate, norm64(tree))
  assert_close(peak, norm64(tree, math.inf))
  # Without `replicated`, psum adds each whole leaf once per device of the axis.
  rep_leaves = [x for x, r in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(rep),
                                  strict=True) if r]
  overcounted = math.sqrt(norm64(tree) ** 2 + (SIZES["model"] - 1) * norm64(rep_leaves) ** 2)
  assert_close(without, overcounted)


def test_replicated_with_clip_and_leaf_norms():
  tree, specs, rep = _megatron_case(5)
  ref_norm = norm64(tree)
  out, state = clip_in_shard_map(tree, specs, ref_norm / 3, axis_name="model", replicated=rep)
  assert_close(state.norm, ref_norm)
  for got, x in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(tree), strict=True):
    assert_close(got, f64(x) / 3, atol=1e-6)

  leaf_specs = jax.tree_util.tree_map(lambda _: P(), specs, is_leaf=is_spec)
  per_leaf = smap(
      lambda g: clipax.leaf_norms(g, axis_name="model", replicated=rep), (specs,), leaf_specs
  )(tree)
  for got, x in zip(jax.tree_util.tree_leaves(per_leaf), jax.tree_util.tree_leaves(tree),
                    strict=True):
    assert_close(got, norm64([x]))


def test_replicated_on_a_larger_axis_tuple_and_bad_prefix():
  tree, kinds = transformer_grads(2, seed=6)
  specs = specs_of(kinds, {**BOTH, "ln1": P(), "ln2": P()})
  rep = replicated_of(specs)
  got = smap(
      lambda g: clipax.global_norm(g, axis_name=("data", "model"), replicated=rep), (specs,), P()
  )(tree)
  assert_close(got, norm64(tree))
  with pytest.raises(ValueError, match="replicated"):
    clipax.global_norm(tree, replicated={"embed": True})
  with pytest.raises(ValueError, match="replicated"):
    clipax.clip_by_global_norm(1.0, replicated={"w": "yes"})


def test_one_scalar_all_reduce_per_norm_for_200_leaves():
  tree, kinds = transformer_grads(20, seed=7)
  specs = specs_of(kinds, MEGATRON)
  rep = replicated_of(specs)
  assert len(jax.tree_util.tree_leaves(tree)) >= 200
  fn = smap(lambda g: clipax.global_norm(g, axis_name="model", replicated=rep), (specs,), P())
  reduces = all_reduces(fn.lower(tree).compile().as_text())
  assert reduces["main"] == ["f32[]"], reduces["main"]
  assert all(scalar_only(s) for s in reduces["branch"]), reduces["branch"]
  assert_close(fn(tree), norm64(tree))



def test_leaf_norms_one_vector_all_reduce():
  tree, kinds = transformer_grads(3, seed=8)
  specs = specs_of(kinds, MEGATRON)
  rep = replicated_of(specs)
  leaf_specs = jax.tree_util.tree_map(lambda _: P(), specs, is_leaf=is_spec)
  per_leaf = smap(lambda g: clipax.leaf_norms(g, axis_name="model", replicated=rep), (specs,),
                  leaf_specs)
  reduces = all_reduces(per_leaf.lower(tree).compile().as_text())
  n = len(jax.tree_util.tree_leaves(tree))
  assert reduces["main"] == [f"f32[{n}]"], reduces["main"]  # one vector for all the leaves


def test_float16_shards_accumulate_in_float32():
  x = jnp.full((8, 64), 300.0, jnp.float16)  # squares overflow float16
  got = smap(lambda g: clipax.global_norm(g, axis_name=("data", "model")),
             (P("data", "model"),), P())(x)
  assert_close(got, 300.0 * math.sqrt(x.size))
