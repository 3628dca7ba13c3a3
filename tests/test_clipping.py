"""The fixed clippers against float64 numpy and optax."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _keys import field
from _refs import as64, assert_close, clip64, leaf_norm64, leaves64, norm64, rtol

import clipax

DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32]


def _grads(dtype, scale=1.0, seed=0):
  rng = np.random.default_rng(seed)
  raw = {"w": rng.normal(size=(6, 4)), "b": rng.normal(size=(4,)), "s": [rng.normal(size=(3,))]}
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x * scale, dtype), raw)


def _run(tx, grads, params=None):
  state = tx.init(params if params is not None else grads)
  return jax.jit(tx.update)(grads, state, params)


# --- clip_by_global_norm ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ord", [1, 2, math.inf])
@pytest.mark.parametrize("scale", [0.01, 10.0, 1e4])
def test_global_clip_matches_float64(dtype, ord, scale):
  grads = _grads(dtype, scale)
  out, state = _run(clipax.clip_by_global_norm(1.0, ord=ord), grads)
  want, norm, factor = clip64(grads, 1.0, ord)
  for o, w, g in zip(jax.tree_util.tree_leaves(out), want, jax.tree_util.tree_leaves(grads),
                     strict=True):
    assert o.dtype == g.dtype
    assert_close(o, w, dtype, atol=1e-7)
  assert_close(state.norm, norm, jnp.float32, rtol=2e-6)
  assert_close(state.scale, factor, jnp.float32, rtol=2e-6)
  assert bool(state.clipped) == (norm > 1.0)
  assert int(state.clipped_count) == int(norm > 1.0) and int(state.count) == 1


def test_global_clip_matches_optax_where_optax_is_right():
  grads = _grads(jnp.float32, 5.0)
  ours, _ = _run(clipax.clip_by_global_norm(2.0), grads)
  theirs, _ = optax.clip_by_global_norm(2.0).update(grads, optax.EmptyState())
  for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_under_threshold_is_bit_identical(dtype):
  grads = _grads(dtype, 0.01)
  out, state = _run(clipax.clip_by_global_norm(100.0), grads)
  for o, g in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(grads), strict=True):
    np.testing.assert_array_equal(np.asarray(o.view(jnp.uint16 if o.itemsize == 2 else jnp.uint32)),
                                  np.asarray(g.view(jnp.uint16 if g.itemsize == 2 else jnp.uint32)))
  assert float(state.scale) == 1.0 and not bool(state.clipped)


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_keeps_direction_and_is_idempotent(dtype):
  grads = _grads(dtype, 50.0)
  tx = clipax.clip_by_global_norm(1.0)
  once, _ = _run(tx, grads)
  twice, _ = _run(tx, once)
  a = np.concatenate([x.ravel() for x in leaves64(once)])
  g = np.concatenate([x.ravel() for x in leaves64(grads)])
  cos = a @ g / (np.linalg.norm(a) * np.linalg.norm(g))
  np.testing.assert_allclose(cos, 1.0, rtol=rtol(dtype) / 10)
  assert norm64(once) <= 1.0 * (1 + rtol(dtype))
  for x, y in zip(leaves64(once), leaves64(twice), strict=True):
    np.testing.assert_allclose(x, y, rtol=rtol(dtype))


def test_float16_300_gives_the_right_clipped_update():
  grads = {"w": jnp.full((4,), 300.0, jnp.float16)}
  out, state = _run(clipax.clip_by_global_norm(1.0), grads)
  np.testing.assert_allclose(as64(out["w"]), np.full(4, 0.5), rtol=1e-3)
  assert float(state.norm) == 600.0 and int(state.nonfinite_count) == 0
  # optax: the float16 norm overflows and the update silently becomes zero
  theirs, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  assert not np.any(as64(theirs["w"]))


def test_float32_1e20_gradients_are_clipped_by_their_true_norm():
  grads = {"w": jnp.full((3,), 1e20, jnp.float32), "b": jnp.full((1,), -1e20, jnp.float32)}
  out, state = _run(clipax.clip_by_global_norm(1.0), grads)
  assert_close(state.norm, 2e20, jnp.float32)
  assert_close(out["w"], np.full(3, 0.5), jnp.float32)
  assert_close(out["b"], [-0.5], jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_array_threshold_with_low_precision_gradients(dtype):
  grads = {"w": jnp.full((4,), 3.0, dtype)}
  out, _ = _run(clipax.clip_by_global_norm(jnp.asarray(1.5, jnp.float32)), grads)
  assert out["w"].dtype == dtype
  np.testing.assert_allclose(as64(out["w"]), np.full(4, 0.75), rtol=1e-2)  # 3 * 1.5 / 6


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_zero_policy_gives_zeros_and_counts(bad):
  tx = optax.chain(clipax.clip_by_global_norm(1.0), optax.adam(0.1))
  params = {"w": jnp.ones(3), "b": jnp.ones(2)}
  state = tx.init(params)
  step = jax.jit(tx.update)
  grads = {"w": jnp.array([1.0, bad, 2.0]), "b": jnp.ones(2)}
  for i in range(3):
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
    for leaf in jax.tree_util.tree_leaves(updates):
      np.testing.assert_array_equal(np.asarray(leaf), 0.0)
    assert int(field(clipax.metrics(state), "nonfinite_count")) == i + 1
  assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree_util.tree_leaves(params))
  assert float(field(clipax.metrics(state), "scale")) == 0.0


def test_nonfinite_propagate_passes_through_and_counts():
  grads = {"w": jnp.array([1.0, np.inf])}
  out, state = _run(clipax.clip_by_global_norm(1.0, nonfinite="propagate"), grads)
  assert not np.all(np.isfinite(np.asarray(out["w"])))
  assert int(state.nonfinite_count) == 1


def test_zero_threshold_gives_zeros_not_nan():
  for grads in [_grads(jnp.float32), {"w": jnp.zeros(3)}]:
    out, _ = _run(clipax.clip_by_global_norm(0.0), grads)
    for leaf in jax.tree_util.tree_leaves(out):
      np.testing.assert_array_equal(np.asarray(leaf), 0.0)


def _clip_loss(tx):
  state = tx.init({"w": jnp.zeros(3)})

  def loss(g):
    out, _ = tx.update(g, state, g)
    return jnp.sum(out["w"] * jnp.array([1.0, 2.0, 3.0]))

  return jax.grad(loss)


@pytest.mark.parametrize(
    "tx",
    [clipax.clip_by_global_norm(1.0), clipax.clip_by_leaf_norm(1.0), clipax.clip_by_block_rms(1.0),
     clipax.clip_by_value(1.0), clipax.clip_by_global_norm(0.0)],
    ids=["global", "leaf", "block_rms", "value", "zero_threshold"],
)
def test_gradient_through_clip_is_finite_at_zero_and_at_threshold(tx):
  grad = _clip_loss(tx)
  for g in [jnp.zeros(3), jnp.array([1.0, 0.0, 0.0]), jnp.array([0.6, 0.8, 0.0])]:
    d = np.asarray(grad({"w": g})["w"])
    assert np.all(np.isfinite(d)), d


def test_gradient_through_global_clip_is_right_above_threshold():
  grad = _clip_loss(clipax.clip_by_global_norm(1.0))
  g = np.array([3.0, 4.0, 0.0])
  c = np.array([1.0, 2.0, 3.0])
  # d/dg (c . g / |g|) = c / |g| - (c . g) g / |g|^3
  want = c / 5.0 - (c @ g) * g / 125.0
  np.testing.assert_allclose(np.asarray(grad({"w": jnp.asarray(g, jnp.float32)})["w"]), want,
                             rtol=1e-6, atol=1e-7)
  optax_grad = jax.grad(
      lambda x: jnp.sum(optax.clip_by_global_norm(1.0).update({"w": x}, None)[0]["w"])
  )(jnp.zeros(3))
  assert not np.all(np.isfinite(np.asarray(optax_grad)))  # what clipax fixes


def test_clip_with_norm_reuses_a_norm():
  grads = _grads(jnp.bfloat16, 10.0)
  norm = clipax.global_norm(grads)
  out = jax.jit(clipax.clip_with_norm, static_argnames="nonfinite")(grads, norm, 1.0)
  want, _, _ = clip64(grads, 1.0)
  for o, w in zip(jax.tree_util.tree_leaves(out), want, strict=True):
    assert o.dtype == jnp.bfloat16
    assert_close(o, w, jnp.bfloat16, atol=1e-3)
  zeroed = clipax.clip_with_norm(grads, jnp.asarray(np.nan, jnp.float32), 1.0)
  assert not any(np.any(as64(x)) for x in jax.tree_util.tree_leaves(zeroed))


# --- clip_by_value -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_by_value_matches_numpy(dtype):
  grads = _grads(dtype, 3.0)
  out, state = _run(clipax.clip_by_value(1.0), grads)
  for o, g in zip(jax.tree_util.tree_leaves(out), leaves64(grads), strict=True):
    assert o.dtype == dtype
    np.testing.assert_allclose(as64(o), np.clip(g, -1.0, 1.0), rtol=rtol(dtype))
  peak = max(np.max(np.abs(g)) for g in leaves64(grads))
  assert_close(state.scale, min(1.0, 1.0 / peak), jnp.float32)
  assert_close(state.norm, norm64(grads), jnp.float32, rtol=2e-6)
  ref, _ = optax.clip(1.0).update(grads, optax.EmptyState())
  for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref), strict=True):
    np.testing.assert_array_equal(as64(a), as64(b))


def test_clip_by_value_complex_keeps_phase():
  z = jnp.array([3 + 4j, 0.1 + 0j], jnp.complex64)
  out, _ = _run(clipax.clip_by_value(1.0), {"z": z})
  np.testing.assert_allclose(np.asarray(out["z"]), [0.6 + 0.8j, 0.1], rtol=1e-6)


# --- per-leaf clippers -------------------------------------------------------------------------


@pytest.mark.parametrize("ord", [1, 2, math.inf])
@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_by_leaf_norm_matches_float64(ord, dtype):
  grads = _grads(dtype, 2.0)
  out, state = _run(clipax.clip_by_leaf_norm(1.5, ord=ord), grads)
  scales = []
  for o, g in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(grads), strict=True):
    n = leaf_norm64(g, ord)
    scales.append(min(1.0, 1.5 / n))
    np.testing.assert_allclose(as64(o), as64(g) * scales[-1], rtol=rtol(dtype), atol=1e-7)
  assert_close(state.scale, min(scales), jnp.float32, rtol=2e-6)
  assert_close(state.norm, norm64(grads, ord), jnp.float32, rtol=2e-6)


def test_clip_by_leaf_norm_matches_optax_per_param_norm():
  grads = _grads(jnp.float32, 2.0)
  ours, _ = _run(clipax.clip_by_leaf_norm(1.5), grads)
  theirs, _ = optax.clip_by_block_rms(1.5).update(grads, optax.EmptyState())  # noqa: F841
  for o, g in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(grads), strict=True):
    n = np.linalg.norm(as64(g))
    np.testing.assert_allclose(as64(o), as64(g) * min(1.0, 1.5 / n), rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_by_block_rms_matches_float64_and_optax(dtype):
  grads = _grads(dtype, 2.0)
  out, _ = _run(clipax.clip_by_block_rms(0.5), grads)
  for o, g in zip(jax.tree_util.tree_leaves(out), leaves64(grads), strict=True):
    rms = np.sqrt(np.mean(g * g))
    np.testing.assert_allclose(as64(o), g * min(1.0, 0.5 / rms), rtol=rtol(dtype), atol=1e-7)
  if dtype == jnp.float32:
    ref, _ = optax.clip_by_block_rms(0.5).update(grads, optax.EmptyState())
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


# --- AGC ---------------------------------------------------------------------------------------


def _unit_axes64(shape, units):
  """The unit rules written out: optax/NFNets (squeezes to a vector: one unit; rank 2, 3: axis
  0; rank 4: 0-2; rank 5: 0-3) and clipax 0.1's last-axis rule."""
  if units == "last_axis":
    return tuple(range(len(shape))) if len(shape) <= 1 else tuple(range(len(shape) - 1))
  if sum(d != 1 for d in shape) <= 1:
    return tuple(range(len(shape)))
  return {2: (0,), 3: (0,), 4: (0, 1, 2), 5: (0, 1, 2, 3)}[len(shape)]


def _agc64(g, p, lam, eps, units="nfnets"):
  g, p = as64(g), as64(p)
  axes = _unit_axes64(g.shape, units)
  gn = np.sqrt(np.sum(g * g, axis=axes, keepdims=True))
  pn = np.maximum(np.sqrt(np.sum(p * p, axis=axes, keepdims=True)), eps)
  limit = lam * pn
  return np.where(gn > limit, g * limit / np.where(gn > 0, gn, 1), g)


@pytest.mark.parametrize(
    "shape", [(), (5,), (4, 3), (3, 4, 5), (2, 3, 4, 5), (2, 2, 3, 4, 3), (1, 6), (4, 1, 1)]
)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("units", ["nfnets", "last_axis"])
def test_agc_matches_float64_for_ranks_0_to_5(shape, dtype, units):
  rng = np.random.default_rng(len(shape))
  params = {"w": jnp.asarray(rng.normal(size=shape), dtype)}
  grads = {"w": jnp.asarray(rng.normal(size=shape) * 3, dtype)}
  out, state = _run(clipax.adaptive_grad_clip(0.1, units=units), grads, params)
  assert out["w"].dtype == dtype and out["w"].shape == shape
  np.testing.assert_allclose(as64(out["w"]), _agc64(grads["w"], params["w"], 0.1, 1e-3, units),
                             rtol=rtol(dtype), atol=1e-6)
  assert bool(state.clipped)


def test_agc_default_units_follow_optax_for_multihead_and_squeezable_kernels():
  rng = np.random.default_rng(3)
  params = {"qkv": jnp.asarray(rng.normal(size=(6, 2, 4)), jnp.float32),   # (in, heads, dim)
            "row": jnp.asarray(rng.normal(size=(1, 5)), jnp.float32),      # squeezes to a vector
            "conv": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)}
  grads = jax.tree_util.tree_map(lambda x: x * 0.9 + 0.2, params)
  ours, _ = _run(clipax.adaptive_grad_clip(0.05), grads, params)
  theirs, _ = optax.adaptive_grad_clip(0.05).update(grads, optax.EmptyState(), params)
  for key in params:
    np.testing.assert_allclose(np.asarray(ours[key]), np.asarray(theirs[key]), rtol=1e-5,
                               atol=1e-7, err_msg=key)
  old, _ = _run(clipax.adaptive_grad_clip(0.05, units="last_axis"), grads, params)
  assert not np.allclose(np.asarray(old["qkv"]), np.asarray(theirs["qkv"]))


def test_agc_pairs_params_by_structure_not_by_order():
  tx = clipax.adaptive_grad_clip(0.1)
  params = {"b": jnp.ones(3), "w": jnp.ones((2, 3))}
  with pytest.raises(ValueError, match="structure"):
    tx.update([jnp.ones((2, 3)), jnp.ones(3)], tx.init(params), params)
  with pytest.raises(ValueError, match=r"\['w'\].*\(3, 2\)"):
    tx.update({"b": jnp.ones(3), "w": jnp.ones((3, 2))}, tx.init(params), params)


@pytest.mark.parametrize("axes,match", [(lambda x: (2,), "out of range"),
                                        (lambda x: (-3,), "out of range"),
                                        (lambda x: (0, -2), "repeated"),
                                        (lambda x: ("a",), "ints")])
def test_agc_axes_out_of_range_is_a_clear_error(axes, match):
  params = {"w": jnp.ones((3, 4))}
  tx = clipax.adaptive_grad_clip(0.1, axes=axes)
  with pytest.raises((ValueError, TypeError), match=match):
    tx.update(params, tx.init(params), params)


def test_agc_rank_6_needs_explicit_units():
  params = {"w": jnp.ones((2, 2, 2, 2, 2, 2))}
  tx = clipax.adaptive_grad_clip(0.1)
  with pytest.raises(ValueError, match=r"\['w'\].*axes"):
    tx.update(params, tx.init(params), params)
  tx = clipax.adaptive_grad_clip(0.1, units="last_axis")
  out, _ = tx.update(params, tx.init(params), params)
  assert out["w"].shape == (2,) * 6


def test_agc_matches_optax():
  rng = np.random.default_rng(0)
  params = {"k": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
            "c": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  grads = jax.tree_util.tree_map(lambda x: x * 0.7 + 0.3, params)
  ours, _ = _run(clipax.adaptive_grad_clip(0.05), grads, params)
  theirs, _ = optax.adaptive_grad_clip(0.05).update(grads, optax.EmptyState(), params)
  for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_agc_axes_override_and_zero_params():
  params = {"w": jnp.zeros((3, 4))}
  grads = {"w": jnp.ones((3, 4))}
  out, _ = _run(clipax.adaptive_grad_clip(0.5, eps=1e-2, axes=lambda x: (1,)), grads, params)
  # units are rows (reduce over axis 1): each row norm 2 is clipped to 0.5 * eps
  np.testing.assert_allclose(np.asarray(out["w"]), np.full((3, 4), 0.5 * 1e-2 / 2.0), rtol=1e-6)


def test_agc_needs_params():
  tx = clipax.adaptive_grad_clip(0.1)
  with pytest.raises(ValueError, match="params"):
    tx.update({"w": jnp.ones(2)}, tx.init(None))


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,arg",
    [
        (lambda v: clipax.clip_by_global_norm(v), "max_norm"),
        (lambda v: clipax.clip_by_value(v), "max_value"),
        (lambda v: clipax.clip_by_leaf_norm(v), "max_norm"),
        (lambda v: clipax.clip_by_block_rms(v), "threshold"),
        (lambda v: clipax.adaptive_grad_clip(v), "clipping"),
        (lambda v: clipax.adaptive_grad_clip(0.1, eps=v), "eps"),
    ],
)
@pytest.mark.parametrize("value", [-1.0, math.nan, "1.0", None, True, [1.0], 2**40 * -1])
def test_bad_hyperparameters_raise_at_construction(make, arg, value):
  pattern = rf"`{arg}`.*{value!r}"[:40].replace("[", r"\[")
  with pytest.raises((ValueError, TypeError), match=pattern):
    make(value)
  # the same value arriving as a concrete array (optax.inject_hyperparams' init) is checked too
  if isinstance(value, float):
    with pytest.raises(ValueError, match=f"`{arg}`"):
      make(jnp.asarray(value))


def test_inf_threshold_means_off_and_inf_eps_is_rejected():
  grads = {"w": jnp.array([3.0, -4.0])}
  for tx in [clipax.clip_by_global_norm(math.inf), clipax.clip_by_value(math.inf),
             clipax.clip_by_leaf_norm(jnp.inf), clipax.clip_by_block_rms(math.inf)]:
    out, state = jax.jit(tx.update)(grads, tx.init(grads))
    np.testing.assert_array_equal(np.asarray(out["w"]), [3.0, -4.0])
    assert not bool(state.clipped) and int(state.invalid_count) == 0
  with pytest.raises(ValueError, match="`eps`"):
    clipax.adaptive_grad_clip(0.1, eps=math.inf)


@pytest.mark.parametrize("make", [clipax.clip_by_global_norm, clipax.clip_by_value,
                                  clipax.clip_by_leaf_norm, clipax.clip_by_block_rms])
def test_unknown_nonfinite_policy_raises(make):
  with pytest.raises(ValueError, match="`nonfinite`.*'skip'"):
    make(1.0, nonfinite="skip")


def test_eps_zero_is_rejected_and_ord_checked():
  with pytest.raises(ValueError, match="`eps`"):
    clipax.adaptive_grad_clip(0.1, eps=0.0)
  with pytest.raises(ValueError, match="`ord`"):
    clipax.clip_by_global_norm(1.0, ord=3)
  with pytest.raises(ValueError, match="`ord`"):
    clipax.clip_by_leaf_norm(1.0, ord="fro")


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_per_leaf_clippers_record_the_true_global_norm_near_float32_max(jit):
  # The recorded global norm combines the per-leaf norms; 1 / max is subnormal above 8.5e37,
  # so combining by dividing by the largest norm gave 0 here.
  grads = {"a": jnp.full((2,), 1.5e38, jnp.float32), "b": jnp.full((2,), 7e37, jnp.float32)}
  tx = clipax.clip_by_leaf_norm(1.0)
  update = jax.jit(tx.update) if jit else tx.update
  _, state = update(grads, tx.init(grads))
  assert_close(state.norm, norm64(grads), jnp.float32)
  assert bool(state.clipped) and int(state.nonfinite_count) == 0


@pytest.mark.parametrize("nonfinite", ["zero", "propagate"])
def test_global_clip_on_the_gpu_path_equals_the_cpu_path(monkeypatch, nonfinite):
  # The GPU's program (every leaf's scale a slice of one shared vector), forced on the CPU; a
  # fresh function per path, as jit's cache would keep the first path's program.
  from clipax import _platform

  rng = np.random.default_rng(11)
  grads = {f"w{i}": jnp.asarray(rng.normal(size=(5, 3)) * (i + 1), jnp.float32) for i in range(5)}
  tx = clipax.clip_by_global_norm(2.0, nonfinite=nonfinite)
  cpu_out, cpu_state = jax.jit(lambda g, s: tx.update(g, s))(grads, tx.init(grads))
  monkeypatch.setattr(_platform, "_by_platform",
                      lambda cpu, accelerator, gpu=None: (gpu or accelerator)())
  gpu_out, gpu_state = jax.jit(lambda g, s: tx.update(g, s))(grads, tx.init(grads))
  for k in grads:
    np.testing.assert_allclose(np.asarray(gpu_out[k]), np.asarray(cpu_out[k]), rtol=2e-6)
  assert float(cpu_state.scale) < 1
  np.testing.assert_allclose(float(gpu_state.scale), float(cpu_state.scale), rtol=2e-6)
