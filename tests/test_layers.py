"""Stacked (scanned) layers, ``layer_axis`` (issue 14, item 1): a leaf stacked along its layer
axis counts as L layers in ``leaf_norms``, ``clip_by_leaf_norm``, ``clip_by_block_rms``,
``adaptive_grad_clip`` and ``adagc``, bit-for-bit as the same model unstacked (each stacked leaf
replaced by the list of its layers), with per-layer metric keys ``<path>/<i>``; with parameters
stacked by ``nnx.vmap``/``nnx.scan`` and by linen's ``nn.scan``."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import clipax
from clipax import _layers

L = 3


def _tree(dtype, seed=0, axis=0):
  """An embedding (not stacked) and a block of L layers stacked along ``axis``; the layers'
  scales differ by 50x, so a per-leaf clip of the stacked leaf and a per-layer one differ."""
  rng = np.random.default_rng(seed)
  layer_scale = np.array([1.0, 50.0, 0.02])
  w = rng.standard_normal((L, 4, 6)) * layer_scale[:, None, None]
  b = rng.standard_normal((L, 6)) * layer_scale[:, None]
  return {"embed": jnp.asarray(rng.standard_normal((5, 4)), dtype),
          "layers": {"w": jnp.asarray(np.moveaxis(w, 0, axis), dtype),
                     "b": jnp.asarray(np.moveaxis(b, 0, min(axis, 1)), dtype)}}


def _unstack(tree, axis=0):
  """The same model unstacked: each stacked leaf replaced by the list of its layers."""
  return {"embed": tree["embed"], "layers": {
      k: [jnp.take(v, i, axis=min(axis, v.ndim - 1)) for i in range(L)]
      for k, v in tree["layers"].items()}}


def _layers_only(path, leaf):
  del leaf
  return 0 if "layers" in jax.tree_util.keystr(path) else None


PREFIX = {"embed": None, "layers": 0}


def _bits(x):
  x = np.asarray(x)
  if x.dtype.itemsize == 1:  # bools, the uint8 tag
    return x
  return x.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


def _assert_close(a, b):
  """A strided (non-leading) layer axis: XLA may sum the fused strided read in another order."""
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    assert np.shape(x) == np.shape(y)
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=3e-7,
                               atol=0)


def _assert_bits(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb, strict=True):
    assert np.shape(x) == np.shape(y)
    np.testing.assert_array_equal(_bits(x), _bits(y))


TRANSFORMS = {
    "leaf_norm": lambda **k: clipax.clip_by_leaf_norm(1.0, leaf_metrics=True, **k),
    "block_rms": lambda **k: clipax.clip_by_block_rms(0.5, leaf_metrics=True, **k),
    "agc": lambda **k: clipax.adaptive_grad_clip(0.05, leaf_metrics=True, **k),
    "adagc": lambda **k: clipax.adagc(warmup_steps=2, warmup_max_norm=30.0, max_norm=20.0,
                                      leaf_metrics=True, **k),
}


def _steps(tx, grads, params, n=3):
  """``n`` jitted updates of growing, then spiking gradients; the outputs and the last state."""
  state, outs = tx.init(params), []
  update = jax.jit(tx.update)
  for step in range(n):
    factor = 100.0 if step == n - 1 else 1.0 + step
    g = jax.tree_util.tree_map(lambda x, f=factor: (x * f).astype(x.dtype), grads)
    out, state = update(g, state, params)
    outs.append(out)
  return outs, state


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kind", sorted(TRANSFORMS))
def test_transformations_stacked_equal_unstacked_bit_for_bit(kind, dtype):
  grads, params = _tree(dtype, 0), _tree(dtype, 1)
  stacked_outs, stacked = _steps(TRANSFORMS[kind](layer_axis=PREFIX), grads, params)
  flat_outs, flat = _steps(TRANSFORMS[kind](), _unstack(grads), _unstack(params))
  for a, b in zip(stacked_outs, flat_outs, strict=True):
    _assert_bits(_unstack(a), b)
  m_stacked, m_flat = clipax.metrics(stacked), clipax.metrics(flat)
  assert m_stacked.keys() == m_flat.keys()
  assert f"clip/{kind}/leaf_norm/layers/w/2" in m_stacked
  assert f"clip/{kind}/leaf_norm/embed" in m_stacked
  for key in m_stacked:
    np.testing.assert_array_equal(_bits(m_stacked[key]), _bits(m_flat[key]), err_msg=key)
  assert stacked.leaf_norms["layers"]["w"].shape == (L,)
  if kind == "adagc":  # the per-layer statistics, a (L,) vector per stacked leaf
    assert stacked.gamma["layers"]["b"].shape == (L,) and stacked.gamma["embed"].shape == ()
    _assert_bits(_unstack(stacked.gamma), flat.gamma)


@pytest.mark.parametrize("kind", sorted(TRANSFORMS))
def test_each_layer_is_clipped_on_its_own(kind):
  """Without ``layer_axis`` the stacked leaf is one leaf (one norm for the three layers); with
  it, the 50x layer does not drag the others down."""
  grads, params = _tree(jnp.float32, 0), _tree(jnp.float32, 1)
  per_layer = _steps(TRANSFORMS[kind](layer_axis=PREFIX), grads, params, 4)[0][-1]
  per_leaf = _steps(TRANSFORMS[kind](), grads, params, 4)[0][-1]
  assert not np.array_equal(per_layer["layers"]["w"], per_leaf["layers"]["w"])
  np.testing.assert_array_equal(per_layer["embed"], per_leaf["embed"])


def test_forms_of_layer_axis_resolve_alike():
  tree = _tree(jnp.float32)
  reference = _layers.resolve(tree, PREFIX, "t")
  assert reference.axes == (None, 0, 0) and reference.sizes == (1, L, L)  # embed, b, w
  for form in (_layers_only, {"embed": None, "layers": {"w": 0, "b": -2}},
               {"embed": None, "layers": np.int32(0)}):
    assert _layers.resolve(tree, form, "t") == reference
  assert _layers.resolve(tree["layers"], 0, "t").axes == (0, 0)  # an int: every leaf
  assert _layers.resolve(tree["layers"], -1, "t").axes == (1, 2)
  assert _layers.resolve(tree, lambda p, x: None, "t") is None  # nothing stacked: old program


@pytest.mark.parametrize("kind", sorted(TRANSFORMS))
def test_forms_of_layer_axis_agree_and_axis_need_not_lead(kind):
  grads, params = _tree(jnp.float32, 0), _tree(jnp.float32, 1)
  reference = _steps(TRANSFORMS[kind](layer_axis=PREFIX), grads, params, 1)
  _assert_bits(_steps(TRANSFORMS[kind](layer_axis=_layers_only), grads, params, 1), reference)
  # the layer axis in the middle: (4, L, 6) kernels, (6, L) biases
  g1, p1 = _tree(jnp.float32, 0, axis=1), _tree(jnp.float32, 1, axis=1)
  moved = _steps(TRANSFORMS[kind](layer_axis={"embed": None, "layers": 1}), g1, p1, 1)
  flat = _steps(TRANSFORMS[kind](), _unstack(g1, 1), _unstack(p1, 1), 1)
  _assert_close([_unstack(o, 1) for o in moved[0]], flat[0])
  _assert_close(_unstack(moved[1].leaf_norms, 0), flat[1].leaf_norms)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("ord", [1, 2, math.inf])
def test_leaf_norms_stacked(dtype, ord):
  tree = _tree(dtype)
  norms = clipax.leaf_norms(tree, ord=ord, layer_axis=PREFIX)
  assert norms["layers"]["w"].shape == (L,) and norms["embed"].shape == ()
  _assert_bits(_unstack(norms), clipax.leaf_norms(_unstack(tree), ord=ord))
  _assert_bits(clipax.leaf_norms(tree, ord=ord, layer_axis=_layers_only), norms)
  moved = _tree(dtype, axis=2)  # (4, 6, L) kernels, (6, L) biases
  norms = clipax.leaf_norms(moved["layers"], ord=ord, layer_axis=-1)
  ref = clipax.leaf_norms(_unstack(moved, 2)["layers"], ord=ord)
  assert norms["w"].shape == (L,)
  _assert_close({k: list(v) for k, v in norms.items()}, ref)


def test_leaf_norms_derivative_per_layer():
  tree = _tree(jnp.float32)["layers"]
  fn = lambda t: jnp.sum(clipax.leaf_norms(t, layer_axis=0)["w"] * jnp.arange(1.0, L + 1))
  g = jax.grad(fn)(tree)
  w = np.asarray(tree["w"])
  expected = w / np.linalg.norm(w.reshape(L, -1), axis=1)[:, None, None] * np.arange(1, L + 1)[
      :, None, None]
  np.testing.assert_allclose(g["w"], expected, rtol=1e-5)
  np.testing.assert_array_equal(g["b"], 0)


def test_without_layer_axis_the_program_is_unchanged():
  grads = _tree(jnp.float32)
  for make in (clipax.clip_by_leaf_norm, clipax.clip_by_block_rms):
    def text(tx):
      return jax.jit(tx.update).lower(grads, tx.init(grads)).as_text()
    base = text(make(1.0))
    assert text(make(1.0, layer_axis=None)) == base
    assert text(make(1.0, layer_axis=lambda p, x: None)) == base


def test_state_shapes_are_those_of_init_and_scan_carries_them():
  grads = _tree(jnp.float32)
  tx = optax.chain(clipax.adagc(layer_axis=PREFIX, leaf_metrics=True),
                   clipax.clip_by_leaf_norm(1.0, layer_axis=PREFIX, leaf_metrics=True))
  state = tx.init(grads)

  def body(s, _):
    return tx.update(grads, s, grads)[1], None

  after = jax.jit(lambda s: jax.lax.scan(body, s, None, length=3)[0])(state)
  assert jax.tree_util.tree_map(jnp.shape, after) == jax.tree_util.tree_map(jnp.shape, state)
  assert after[0].gamma["layers"]["w"].shape == (L,)


def test_zero_layers():
  tree = {"w": jnp.zeros((0, 3)), "b": jnp.ones(2)}
  assert clipax.leaf_norms(tree, layer_axis={"w": 0, "b": None})["w"].shape == (0,)
  tx = clipax.clip_by_leaf_norm(1.0, layer_axis={"w": 0, "b": None}, leaf_metrics=True)
  out, state = tx.update(tree, tx.init(tree))
  assert out["w"].shape == (0, 3) and state.leaf_norms["w"].shape == (0,)


BAD_AXES = [
    (3, ValueError, r"layer_axis` 3 is out of range for leaf \['embed'\] of shape \(5, 4\)"),
    ({"embed": None, "layers": -3}, ValueError, r"-3 is out of range for leaf \['layers'\]\['b'\]"),
    ({"embed": None}, ValueError, "not a prefix of the tree"),
    (lambda p, x: "0", TypeError, r"gave '0' for leaf \['embed'\]"),
    ({"embed": None, "layers": 0.5}, TypeError, "pytree prefix"),
    (True, TypeError, "layer_axis"),
]


@pytest.mark.parametrize(("axis", "error", "match"), BAD_AXES)
def test_bad_layer_axis_names_the_leaf_and_the_value(axis, error, match):
  grads = _tree(jnp.float32)
  makers = [lambda: clipax.leaf_norms(grads, layer_axis=axis)] + [
      lambda make=make: _steps(make(layer_axis=axis), grads, grads, 1)
      for make in TRANSFORMS.values()]
  for run in makers:
    with pytest.raises(error, match=match):
      run()


def test_inject_hyperparams_needs_layer_axis_static():
  grads = _tree(jnp.float32)["layers"]
  injected = optax.inject_hyperparams(clipax.clip_by_leaf_norm)(max_norm=1.0, layer_axis=0)
  with pytest.raises(TypeError, match="static_args"):
    jax.jit(injected.update)(grads, injected.init(grads))
  tx = optax.inject_hyperparams(clipax.clip_by_leaf_norm, static_args=("layer_axis",))(
      max_norm=1.0, layer_axis=0)
  out, _ = jax.jit(tx.update)(grads, tx.init(grads))
  _assert_bits(out, clipax.clip_by_leaf_norm(1.0, layer_axis=0).update(grads, tx.init(None)
                                                                        .inner_state)[0])


def test_adagc_state_of_other_layers_is_refused():
  grads = _tree(jnp.float32)
  state = clipax.adagc().init(grads)  # scalars where the stacked leaves need (L,)
  with pytest.raises(ValueError, match=r"`gamma` has an entry of shape \(\)"):
    clipax.adagc(layer_axis=PREFIX).update(grads, state)


# Real stacked parameters: Flax NNX (nnx.vmap of a layer constructor, nnx.scan forward) and
# linen (nn.scan).


class _Block(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.dense = nnx.Linear(4, 4, rngs=rngs)
    self.norm = nnx.LayerNorm(4, rngs=rngs)

  def __call__(self, x):
    return x + nnx.tanh(self.dense(self.norm(x)))


class _ScannedModel(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Linear(2, 4, rngs=rngs)

    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def blocks(rngs):
      return _Block(rngs)

    self.blocks = blocks(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def body(block, h):
      return block(h)

    return body(self.blocks, self.embed(x))


def _in_blocks(path, leaf):
  del leaf
  names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  return 0 if "blocks" in names or "Scan_LinenBlock_0" in names else None


def test_nnx_scanned_model_equals_its_unstacked_twin():
  model = _ScannedModel(nnx.Rngs(0))
  x = jnp.linspace(-2.0, 2.0, 10).reshape(5, 2)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert params["blocks"]["dense"]["kernel"].shape == (L, 4, 4)

  grads = nnx.to_pure_dict(nnx.grad(lambda m: jnp.sum(m(x) ** 2) * 50.0)(model))

  def unstack(t):
    return {"embed": t["embed"],
            "blocks": jax.tree_util.tree_map(lambda v: [v[i] for i in range(L)], t["blocks"])}

  for kind in ("adagc",):
    stacked = _steps(TRANSFORMS[kind](layer_axis=_in_blocks), grads, params, 2)
    flat = _steps(TRANSFORMS[kind](), unstack(grads), unstack(params), 2)
    _assert_bits([unstack(o) for o in stacked[0]], flat[0])
    m = clipax.metrics(stacked[1])
    assert m.keys() == clipax.metrics(flat[1]).keys()
    assert f"clip/{kind}/leaf_norm/blocks/dense/kernel/{L - 1}" in m


def test_nnx_optimizer_with_a_scanned_model_trains_under_jit():
  model = _ScannedModel(nnx.Rngs(1))
  tx = optax.chain(clipax.adagc(warmup_steps=3, layer_axis=_in_blocks, leaf_metrics=True),
                   optax.adamw(3e-2))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jnp.linspace(-1.0, 1.0, 16).reshape(8, 2)
  y = jnp.sin(3 * x).sum(-1, keepdims=True) * jnp.ones((1, 4))

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss, clipax.metrics(optimizer.opt_state)

  losses = [float(step(model, optimizer)[0]) for _ in range(15)]
  assert losses[-1] < 0.5 * losses[0], losses
  metrics = step(model, optimizer)[1]
  layer_keys = [k for k in metrics if k.startswith("clip/adagc/leaf_norm/blocks/dense/kernel/")]
  assert sorted(layer_keys) == [f"clip/adagc/leaf_norm/blocks/dense/kernel/{i}" for i in range(L)]
  assert optimizer.opt_state[0].gamma["blocks"]["dense"]["kernel"].shape == (L,)


class _LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return h + nn.tanh(nn.Dense(4)(h)), None


class _LinenModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    scan = nn.scan(_LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=L)
    h, _ = scan()(nn.Dense(4)(x), None)
    return nn.Dense(1)(h)


def test_linen_scan_params_train_with_adamw_and_match_unstacked():
  model = _LinenModel()
  x = jnp.linspace(-1.0, 1.0, 16).reshape(8, 2)
  y = jnp.cos(2 * x[:, :1])
  params = model.init(jax.random.key(0), x)
  assert params["params"]["Scan_LinenBlock_0"]["Dense_0"]["kernel"].shape == (L, 4, 4)
  tx = optax.chain(clipax.clip_by_leaf_norm(0.05, layer_axis=_in_blocks, leaf_metrics=True),
                   optax.adamw(3e-2))
  loss_fn = lambda p: jnp.mean((model.apply(p, x) - y) ** 2)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  state, losses = tx.init(params), []
  for _ in range(12):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], losses
  key = "clip/leaf_norm/leaf_norm/params/Scan_LinenBlock_0/Dense_0/kernel/2"
  assert key in clipax.metrics(state)
  # one clip step against the unstacked twin, bit for bit
  grads = jax.grad(loss_fn)(params)
  scan = grads["params"]["Scan_LinenBlock_0"]
  flat = {"params": {**grads["params"],
                     "Scan_LinenBlock_0": jax.tree_util.tree_map(lambda v: [v[i] for i in range(L)],
                                                           scan)}}
  stacked_tx, flat_tx = clipax.clip_by_leaf_norm(0.05, layer_axis=_in_blocks), \
      clipax.clip_by_leaf_norm(0.05)
  out = jax.jit(stacked_tx.update)(grads, stacked_tx.init(None))[0]
  ref = jax.jit(flat_tx.update)(flat, flat_tx.init(None))[0]
  out["params"]["Scan_LinenBlock_0"] = jax.tree_util.tree_map(
      lambda v: [v[i] for i in range(L)], out["params"]["Scan_LinenBlock_0"])
  _assert_bits(out, ref)
