"""``specs=``: norms from the gradients' own sharding inside ``shard_map``, no hand-written mask.

Given the ``PartitionSpec`` tree of the gradients (what ``shard_map`` got as ``in_specs``), or
``"varying"`` (each leaf's varying mesh axes, read from its type), every leaf is summed over
exactly the mesh axes it is split over and counted once along the others. Checked on three
layouts against the float64 norm of the whole (unsharded) tree, with ord 1, 2 and inf, and by
the number of all-reduces in the compiled program (one per norm, whatever the layout).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _dist import FSDP_TP, MEGATRON, all_reduces, is_spec, mesh_2x4, specs_of, transformer_grads
from _refs import assert_close, leaf_norm64, norm64
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import clipax

ORDS = [1, 2, math.inf]


def expert_layout():
  """Expert parallelism over "expert" (2) and tensor parallelism over "model" (4): expert weights
  split over both, dense weights split over "model" and replicated over "expert", the router and
  layer norms whole everywhere."""
  mesh = jax.make_mesh((2, 4), ("expert", "model"), axis_types=(AxisType.Auto,) * 2)
  rng = np.random.default_rng(3)
  draw = lambda *s: jnp.asarray(rng.normal(size=s) * rng.uniform(0.1, 3.0), jnp.float32)
  tree = {
      "experts": {"up": draw(4, 16, 64), "up_bias": draw(4, 64), "down": draw(4, 64, 16)},
      "attn": {"qkv": draw(16, 48), "out": draw(16, 16)},
      "router": draw(16, 4),
      "ln": draw(16),
  }
  specs = {
      "experts": {"up": P("expert", None, "model"), "up_bias": P("expert", "model"),
                  "down": P("expert", "model", None)},
      "attn": {"qkv": P(None, "model"), "out": P("model", None)},
      "router": P(),
      "ln": P(),
  }
  return mesh, tree, specs


def fsdp_layout():
  """Pure FSDP: every matrix split over all 8 devices along its first axis, vectors whole."""
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
  tree, _ = transformer_grads(2, d=32)
  specs = jax.tree_util.tree_map(lambda x: P("fsdp") if x.ndim == 2 else P(), tree)
  return mesh, tree, specs


def megatron_layout(layout):
  tree, kinds = transformer_grads(2, d=32)
  return mesh_2x4(), tree, specs_of(kinds, layout)


LAYOUTS = {
    "data_x_model": lambda: megatron_layout(MEGATRON),
    "expert_parallel": expert_layout,
    "fsdp_tp": lambda: megatron_layout(FSDP_TP),
    "fsdp": fsdp_layout,
}


@functools.cache
def _built(name):
  mesh, tree, specs = LAYOUTS[name]()
  placed = jax.tree_util.tree_map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree,
                                  specs, is_leaf=is_spec)
  return mesh, tree, placed, specs


@pytest.fixture(params=list(LAYOUTS), scope="module")
def layout(request):
  return _built(request.param)


# The transformations are checked on the two layouts that differ most (every leaf split over
# its own axes; a leaf split over two axes); the norms themselves on all four.
@pytest.fixture(params=["expert_parallel", "fsdp_tp"], scope="module")
def two_layouts(request):
  return _built(request.param)


def _smap(mesh, fn, specs, out_specs, check_vma=True):
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(specs,), out_specs=out_specs,
                               check_vma=check_vma))


@pytest.mark.parametrize("how", ["specs", "varying"])
@pytest.mark.parametrize("ord", ORDS)
def test_global_norm_equals_the_unsharded_norm(layout, ord, how):
  mesh, tree, placed, specs = layout
  given = specs if how == "specs" else "varying"
  fn = _smap(mesh, lambda g: clipax.global_norm(g, ord=ord, specs=given), specs, P())
  assert_close(fn(placed), norm64(tree, ord), jnp.float32, rtol=2e-6)
  # one all-reduce (a max for inf), whatever the layout: never one per leaf or per axis set
  reduces = all_reduces(fn.lower(placed).compile().as_text())
  assert len(reduces["main"]) == 1, reduces


@pytest.mark.parametrize("ord", ORDS)
def test_leaf_norms_equal_each_unsharded_leaf(layout, ord):
  mesh, tree, placed, specs = layout
  out = jax.tree_util.tree_map(lambda _: P(), tree)
  fn = _smap(mesh, lambda g: clipax.leaf_norms(g, ord=ord, specs=specs), specs, out)
  got = fn(placed)
  for n, x in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(tree), strict=True):
    assert_close(n, leaf_norm64(x, ord), jnp.float32, rtol=2e-6)
  assert len(all_reduces(fn.lower(placed).compile().as_text())["main"]) == 1


def test_without_specs_each_device_sees_a_different_partial_norm(layout):
  # what `specs` fixes: inside shard_map a plain norm is the local shard's
  mesh, tree, placed, specs = layout
  out = P(mesh.axis_names)
  fn = _smap(mesh, lambda g: clipax.global_norm(g)[None], specs, out)
  local = np.asarray(fn(placed))
  assert local.shape == (mesh.size,) and np.all(local < norm64(tree) * (1 - 1e-3))


@pytest.mark.parametrize("name", ["clip_by_global_norm", "zclip", "autoclip", "skip_nonfinite",
                                  "skip_spikes", "monitor"])
def test_clippers_take_specs(two_layouts, name):
  mesh, tree, placed, specs = two_layouts
  full = float(norm64(tree))
  make = {
      "clip_by_global_norm": lambda **k: clipax.clip_by_global_norm(full / 2, **k),
      "zclip": lambda **k: clipax.zclip(**k),
      "autoclip": lambda **k: clipax.autoclip(**k),
      "skip_nonfinite": lambda **k: clipax.skip_nonfinite(optax_sgd(), **k),
      "skip_spikes": lambda **k: clipax.skip_spikes(optax_sgd(), **k),
      "monitor": lambda **k: clipax.monitor(**k),
  }[name]
  tx = make(specs=specs)

  def step(g):
    state = tx.init(g)
    updates, state = tx.update(g, state, g)
    return updates, clipax.metrics(state)

  out_specs = (specs, P())
  updates, metrics = _smap(mesh, step, specs, out_specs)(placed)
  norms = [v for k, v in metrics.items() if k.endswith("/norm")]
  assert norms, metrics
  assert_close(norms[0], full, jnp.float32, rtol=2e-6)
  if name == "clip_by_global_norm":
    got = jax.tree_util.tree_map(np.asarray, updates)
    for g, x in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(tree), strict=True):
      np.testing.assert_allclose(g, np.asarray(x) * 0.5, rtol=2e-6)


def optax_sgd():
  import optax

  return optax.sgd(0.1)


def test_specs_with_axis_name_or_replicated_is_refused():
  with pytest.raises(ValueError, match="specs"):
    clipax.clip_by_global_norm(1.0, axis_name="model", specs={"w": P()})
  with pytest.raises(ValueError, match="specs"):
    clipax.global_norm({"w": jnp.ones(3)}, replicated=True, specs={"w": P()})
  with pytest.raises(ValueError, match="varying"):
    clipax.global_norm({"w": jnp.ones(3)}, specs="auto")
  with pytest.raises(TypeError, match="PartitionSpec"):
    clipax.global_norm({"w": jnp.ones(3)}, specs={"w": ("model",)})
  with pytest.raises(ValueError, match="shape"):
    clipax.global_norm({"w": jnp.ones(3)}, specs={"w": P("model", None)})


@pytest.mark.parametrize("name", ["clip_by_leaf_norm", "clip_by_block_rms", "adagc"])
def test_per_leaf_clippers_take_specs(two_layouts, name):
  # each leaf clipped by its whole norm (and, for the RMS, its whole size), as on one device
  mesh, tree, placed, specs = two_layouts
  norms = {id(x): float(leaf_norm64(x)) for x in jax.tree_util.tree_leaves(tree)}
  median = float(np.median(list(norms.values())))
  make = {"clip_by_leaf_norm": lambda **k: clipax.clip_by_leaf_norm(median, **k),
          "clip_by_block_rms": lambda **k: clipax.clip_by_block_rms(0.5, **k),
          "adagc": lambda **k: clipax.adagc(warmup_steps=1, warmup_max_norm=median, **k)}[name]

  def run(tx, fn):
    return fn(lambda g: tx.update(g, tx.init(g), g)[0])

  sharded = run(make(specs=specs), lambda f: _smap(mesh, f, specs, specs)(placed))
  whole = run(make(), lambda f: jax.jit(f)(tree))
  got, want = jax.tree_util.tree_leaves(sharded), jax.tree_util.tree_leaves(whole)
  assert any(not np.allclose(np.asarray(w), np.asarray(x)) for w, x in
             zip(want, jax.tree_util.tree_leaves(tree), strict=True))  # something was clipped
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=3e-6, atol=1e-7)
  # without specs, a split leaf is clipped by the norm of its local piece: another result
  # (check_vma off: the local norms make every output vary over the mesh)
  local = run(make(), lambda f: _smap(mesh, f, specs, specs, check_vma=False)(placed))
  assert any(not np.allclose(np.asarray(a), np.asarray(b), rtol=1e-4)
             for a, b in zip(jax.tree_util.tree_leaves(local), want, strict=True))


def test_per_leaf_specs_with_layer_axis_is_refused():
  for make in (clipax.clip_by_leaf_norm, clipax.clip_by_block_rms):
    with pytest.raises(ValueError, match="layer_axis"):
      make(1.0, layer_axis=0, specs={"w": P()})
  with pytest.raises(ValueError, match="layer_axis"):
    clipax.adagc(layer_axis=0, specs={"w": P()})
