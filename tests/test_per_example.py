"""Per-example clipping: ``per_example_clip``, ``clip_per_example``, ``per_example_clipped_grad``.

References are float64 numpy (each example's global norm, its clip factor, the sum) and
``optax.per_example_global_norm_clip`` where the two overlap. ``clip_per_example`` is not a row
of ``tests/_cases.py``: the contract feeds every row gradients shaped like the parameters, but
this transformation's input carries a leading batch axis its output does not, so ``masked``
(passes unselected per-example leaves through unchanged) and ``MultiSteps`` *around* it
(accumulates the per-example tree into parameter-shaped buffers) do not apply. Its equivalents
are here: ``chain`` with an optimizer under ``jit``, ``inject_hyperparams`` (traced threshold,
invalid value counted), ``MultiSteps`` after it, state saved and read back as a dict.
"""

from __future__ import annotations

import math

import flax.serialization
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _refs import as64, rtol
from hypothesis import given, settings
from hypothesis import strategies as st

import clipax

# ----------------------------------------------------------------------------- references


def ref(grads, max_norm, mask=None, normalize=False, gamma=0.01, reduce="sum"):
  """Float64 per-example clipping: (aggregate leaves, norms, factors, clipped, nonfinite)."""
  leaves = [as64(x) for x in jax.tree_util.tree_leaves(grads)]
  b = leaves[0].shape[0]
  keep = np.ones(b, bool) if mask is None else np.asarray(mask).astype(bool)
  norms = np.sqrt(sum(np.sum(x.reshape(b, -1) ** 2, axis=1) for x in leaves))
  finite = np.isfinite(norms)
  use = keep & finite
  with np.errstate(divide="ignore", invalid="ignore"):
    factor = max_norm / (norms + gamma) if normalize else np.minimum(1.0, max_norm / norms)
  factor = np.where(use, factor, 0.0)
  total = [np.sum(np.where(use.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0)
                  * factor.reshape((-1,) + (1,) * (x.ndim - 1)), axis=0) for x in leaves]
  if reduce == "mean":
    total = [t / max(keep.sum(), 1) for t in total]
  return total, norms, factor, int(np.sum(use & (factor < 1))), int(np.sum(keep & ~finite))


def per_example_tree(b, seed=0, dtype=jnp.float32, scale=3.0):
  rng = np.random.default_rng(seed)
  mult = rng.lognormal(0.0, 1.5, size=(b, 1))  # norms spread around max_norm
  return {
      "w": jnp.asarray(rng.normal(size=(b, 3, 4)) * mult[:, :, None] * scale, dtype),
      "b": jnp.asarray(rng.normal(size=(b, 4)) * mult * scale, dtype),
  }


def assert_tree_close(out, expected, dtype, factor=1.0):
  for o, e in zip(jax.tree_util.tree_leaves(out), expected, strict=True):
    assert o.dtype == jnp.dtype(dtype)
    bound = factor * rtol(dtype) * max(1.0, float(np.max(np.abs(e)))) * 4
    np.testing.assert_allclose(as64(o), e, rtol=rtol(dtype) * 4, atol=bound)


CLIP = jax.jit(clipax.per_example_clip, static_argnames=("normalize", "reduce"))

# ----------------------------------------------------------------------------- per_example_clip


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 1e3, math.inf])
def test_equals_optax_per_example_global_norm_clip(max_norm):
  grads = per_example_tree(16)
  ours, info = CLIP(grads, max_norm)
  theirs, num_clipped = optax.per_example_global_norm_clip(grads, max_norm)
  for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-6 * float(jnp.max(jnp.abs(b))))
  assert int(info.clipped) == int(num_clipped)
  assert int(info.examples) == 16 and int(info.nonfinite) == 0


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_matches_float64_reference_norms_factors_and_counts(reduce):
  grads = per_example_tree(12, seed=1)
  out, info = CLIP(grads, 2.0, reduce=reduce)
  total, norms, factor, clipped, _ = ref(grads, 2.0, reduce=reduce)
  assert 0 < clipped < 12  # some examples clipped, some not
  assert_tree_close(out, total, jnp.float32)
  assert int(info.clipped) == clipped and int(info.examples) == 12
  np.testing.assert_allclose(float(info.mean_norm), norms.mean(), rtol=1e-6)
  np.testing.assert_allclose(float(info.max_norm), norms.max(), rtol=1e-6)
  np.testing.assert_allclose(float(info.min_scale), factor.min(), rtol=1e-6)
  assert info.loss is None


_DTYPES = st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16])


# A few tree shapes (one example's leaves) and batch sizes, so the jitted function is reused.
_SHAPES = [((),), ((3,), (2, 2)), ((4,), (), (1, 3))]


@st.composite
def _cases(draw):
  b = draw(st.sampled_from([1, 5]))
  dtype = draw(_DTYPES)
  shapes = draw(st.sampled_from(_SHAPES))
  tree = {}
  for i, s in enumerate(shapes):
    values = draw(hnp.arrays(np.float32, (b, *s), elements=st.floats(-200, 200, width=32)))
    tree[f"l{i}"] = jnp.asarray(values, dtype)
  mask = draw(hnp.arrays(np.bool_, (b,)))
  max_norm = draw(st.sampled_from([0.1, 1.0, 50.0]))
  normalize = draw(st.booleans())
  return tree, mask, max_norm, normalize


@settings(max_examples=20, deadline=None)
@given(_cases())
def test_property_float64_reference_any_tree_batch_and_dtype(case):
  """Small pytrees, batch sizes 1 and 5, float32/bfloat16/float16, random masks, clip or
  AUTO-S; squares of 200 overflow float16, the float32-accumulated norm does not."""
  tree, mask, max_norm, normalize = case
  dtype = jax.tree_util.tree_leaves(tree)[0].dtype
  out, info = CLIP(tree, max_norm, mask=mask, normalize=normalize)
  total, norms, factor, clipped, nonfinite = ref(tree, max_norm, mask, normalize)
  assert nonfinite == 0 and int(info.nonfinite) == 0
  assert int(info.examples) == int(mask.sum())
  # each example contributes at most max_norm: the sum is bounded by the count
  assert np.sqrt(sum(np.sum(t ** 2) for t in total)) <= max_norm * max(mask.sum(), 1) * 1.001
  assert_tree_close(out, total, dtype, factor=max(1, mask.sum()))
  if dtype == jnp.float32:
    assert int(info.clipped) == clipped
  else:  # a factor within rounding of 1 may count either way
    assert abs(int(info.clipped) - clipped) <= int(np.sum(np.abs(factor - 1) < 1e-2))


def test_padding_mask_excludes_rows_even_nan_ones():
  grads = per_example_tree(8, seed=2)
  padded = jax.tree_util.tree_map(
      lambda x: jnp.concatenate([x, jnp.full((3, *x.shape[1:]), jnp.nan, x.dtype)]), grads)
  mask = jnp.arange(11) < 8
  out, info = CLIP(padded, 1.5, mask=mask, reduce="mean")
  expected, expected_info = CLIP(grads, 1.5, reduce="mean")
  jax.tree_util.tree_map(np.testing.assert_array_equal, out, expected)
  assert int(info.examples) == 8 and int(info.nonfinite) == 0
  assert int(info.clipped) == int(expected_info.clipped)
  # 0/1 numbers are a mask too; all-padding gives zero, not NaN
  out01, _ = CLIP(padded, 1.5, mask=mask.astype(jnp.float32), reduce="mean")
  jax.tree_util.tree_map(np.testing.assert_array_equal, out01, expected)
  zero, info0 = CLIP(padded, 1.5, mask=jnp.zeros(11, bool), reduce="mean")
  assert all(float(jnp.max(jnp.abs(z))) == 0 for z in jax.tree_util.tree_leaves(zero))
  assert int(info0.examples) == 0 and float(info0.min_scale) == 1


def test_auto_s_normalizes_every_example_below_max_norm():
  grads = per_example_tree(10, seed=3)
  out, info = CLIP(grads, 2.0, normalize=True, gamma=0.01)
  total, norms, factor, clipped, _ = ref(grads, 2.0, normalize=True, gamma=0.01)
  np.testing.assert_allclose(factor, 2.0 / (norms + 0.01))
  assert_tree_close(out, total, jnp.float32)
  assert int(info.clipped) == clipped == int(np.sum(norms + 0.01 > 2.0))
  # one example alone comes out with norm C * n / (n + gamma), small ones scaled *up*
  single = jax.tree_util.tree_map(lambda x: x[:1] * 1e-3, grads)
  one, _ = CLIP(single, 2.0, normalize=True)
  n = float(clipax.global_norm(jax.tree_util.tree_map(lambda x: x[0], single)))
  np.testing.assert_allclose(float(clipax.global_norm(one)), 2.0 * n / (n + 0.01), rtol=1e-5)
  # without normalize the same example passes unchanged
  plain, _ = CLIP(single, 2.0)
  np.testing.assert_allclose(float(clipax.global_norm(plain)), n, rtol=1e-6)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_nonfinite_example_contributes_zero_and_is_counted(bad):
  grads = per_example_tree(6, seed=4)
  broken = jax.tree_util.tree_map(lambda x: x, grads)
  broken["w"] = broken["w"].at[2, 1, 1].set(bad)
  out, info = CLIP(broken, 1.0)
  keep = jnp.arange(6) != 2
  expected, _ = CLIP(grads, 1.0, mask=keep)
  jax.tree_util.tree_map(np.testing.assert_array_equal, out, expected)
  assert int(info.nonfinite) == 1 and int(info.examples) == 6
  assert float(info.min_scale) == 0.0 and np.isfinite(float(info.max_norm))
  # optax's lets the one example turn the sum into NaN
  theirs, _ = optax.per_example_global_norm_clip(broken, 1.0)
  assert not np.isfinite(np.asarray(theirs["w"])).all()


def test_half_precision_norms_accumulate_in_float32():
  grads = {"w": jnp.full((3, 4), 300.0, jnp.float16)}  # squares overflow float16
  out, info = CLIP(grads, 1000.0)
  assert int(info.nonfinite) == 0 and int(info.clipped) == 0
  np.testing.assert_allclose(float(info.max_norm), 600.0)
  np.testing.assert_array_equal(np.asarray(out["w"], np.float32), np.full(4, 900.0))
  out, _ = CLIP({"w": grads["w"].astype(jnp.bfloat16)}, 60.0)
  np.testing.assert_allclose(np.asarray(out["w"], np.float32), np.full(4, 90.0), rtol=1e-2)


def test_traced_invalid_max_norm_zeroes_the_aggregate():
  grads = per_example_tree(4)
  for bad in [0.0, -1.0, jnp.nan]:
    out, info = CLIP(grads, jnp.float32(bad))
    assert bool(info.invalid)
    assert all(float(jnp.max(jnp.abs(o))) == 0 for o in jax.tree_util.tree_leaves(out))
  _, info = CLIP(grads, jnp.float32(1.0))
  assert not bool(info.invalid)


def test_bad_inputs_name_the_argument_or_leaf():
  grads = per_example_tree(4)
  with pytest.raises(ValueError, match=r"\['w'\] has shape \(4, 3, 4\).*\['b'\] has batch size 3"):
    clipax.per_example_clip({"w": grads["w"], "b": grads["b"][:3]}, 1.0)
  with pytest.raises(ValueError, match=r"\['s'\] is a scalar"):
    clipax.per_example_clip({"s": jnp.float32(1.0)}, 1.0)
  with pytest.raises(ValueError, match=r"`mask` must have shape \(4,\).*\(5,\)"):
    clipax.per_example_clip(grads, 1.0, mask=jnp.ones(5, bool))
  with pytest.raises(TypeError, match="`mask`"):
    clipax.per_example_clip(grads, 1.0, mask=np.array(["a"] * 4))
  for bad in [0.0, -1.0, math.nan]:
    with pytest.raises(ValueError, match=f"`max_norm`.*got {bad}"):
      clipax.per_example_clip(grads, bad)
  with pytest.raises(ValueError, match="`max_norm`"):
    clipax.per_example_clip(grads, math.inf, normalize=True)
  with pytest.raises(ValueError, match="`gamma`.*got 0.0"):
    clipax.clip_per_example(1.0, normalize=True, gamma=0.0)
  with pytest.raises(ValueError, match="`reduce`.*'max'"):
    clipax.clip_per_example(1.0, reduce="max")
  with pytest.raises(TypeError, match="`normalize`"):
    clipax.clip_per_example(1.0, normalize="yes")
  with pytest.raises(ValueError, match=r"\['i'\] has dtype int32"):
    clipax.per_example_clip({"i": jnp.ones((4, 2), jnp.int32)}, 1.0)
  with pytest.raises(TypeError, match=r"\['s'\] is 'text'"):
    clipax.per_example_clip({"s": "text"}, 1.0)
  with pytest.raises(ValueError, match="no leaves"):
    clipax.per_example_clip({}, 1.0)
  with pytest.raises(ValueError, match=r"`microbatch_size`.*got 0"):
    clipax.per_example_clipped_grad(_loss, 1.0, microbatch_size=0)
  with pytest.raises(TypeError, match="`loss_fn`"):
    clipax.per_example_clipped_grad(None, 1.0)
  fn = clipax.per_example_clipped_grad(_loss, 1.0, microbatch_size=3)
  with pytest.raises(ValueError, match=r"`microbatch_size` \(3\) must divide the batch size "
                                       r"\(8\)"):
    fn(PARAMS, *_data(8))
  with pytest.raises(ValueError, match=r"\[1\] has shape \(7,\)"):
    fn(PARAMS, _data(8)[0], _data(7)[1])


# ----------------------------------------------------------------------------- transformation


def _examples_and_params(b=8, seed=5):
  grads = per_example_tree(b, seed=seed)
  params = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape[1:], x.dtype), grads)
  return grads, params


def test_transformation_chain_jit_mask_and_metrics():
  grads, params = _examples_and_params()
  tx = optax.chain(clipax.clip_per_example(1.0, reduce="mean", name="dp"),
                   optax.adamw(1e-2))
  state = tx.init(params)
  step = jax.jit(tx.update)
  mask = jnp.arange(8) < 6
  updates, state = step(grads, state, params, mask=mask)
  _, expected = CLIP(grads, 1.0, mask=mask, reduce="mean")
  assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(params)
  broken = dict(grads, b=grads["b"].at[0, 0].set(jnp.nan))
  updates, state = step(broken, state, params, mask=mask)
  assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree_util.tree_leaves(updates))
  m = clipax.metrics(state)
  assert int(m["clip/dp/count"]) == 2 and int(m["clip/dp/nonfinite_count"]) == 1
  assert int(m["clip/dp/examples"]) == 6 and int(m["clip/dp/example_count"]) == 12
  _, info = CLIP(broken, 1.0, mask=mask)
  np.testing.assert_allclose(float(m["clip/dp/clipped_fraction"]), int(info.clipped) / 6)
  assert int(m["clip/dp/clipped_count"]) == int(expected.clipped) + int(info.clipped)
  np.testing.assert_allclose(float(m["clip/dp/clip_rate"]),
                             (int(expected.clipped) + int(info.clipped)) / 12, rtol=1e-6)
  np.testing.assert_allclose(float(m["clip/dp/norm"]), float(info.mean_norm), rtol=1e-6)
  np.testing.assert_allclose(float(m["clip/dp/norm_max"]), float(info.max_norm), rtol=1e-6)
  assert float(m["clip/dp/threshold"]) == 1.0 and float(m["clip/dp/scale"]) == 0.0
  # the dict form (a checkpoint restored without a target) reads the same metrics
  pure = flax.serialization.to_state_dict(state)
  m2 = clipax.metrics(pure)
  assert set(m2) == set(m)
  for key in m:
    np.testing.assert_array_equal(m2[key], m[key], err_msg=key)
  assert "clip/per_example/norm" in clipax.metrics(clipax.clip_per_example(1.0).init(params))


def test_transformation_inject_hyperparams_and_multi_steps_after_it():
  grads, params = _examples_and_params()
  tx = optax.inject_hyperparams(clipax.clip_per_example)(max_norm=1.0)
  state = tx.init(params)
  step = jax.jit(tx.update)
  out, state = step(grads, state, params)
  expected, _ = CLIP(grads, 1.0)
  jax.tree_util.tree_map(np.testing.assert_array_equal, out, expected)
  state.hyperparams["max_norm"] = jnp.float32(2.5)
  out, state = step(grads, state, params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, out, CLIP(grads, 2.5)[0])
  state.hyperparams["max_norm"] = jnp.float32(-1.0)  # invalid: zero, counted, never a disable
  out, state = step(grads, state, params)
  assert all(float(jnp.max(jnp.abs(o))) == 0 for o in jax.tree_util.tree_leaves(out))
  assert int(state.inner_state.invalid_count) == 1 and int(state.inner_state.count) == 3
  # accumulation after the clip: MultiSteps sees parameter-shaped gradients
  tx = optax.chain(clipax.clip_per_example(1.0), optax.MultiSteps(optax.sgd(1.0), 2))
  state = tx.init(params)
  p = params
  for _ in range(2):
    u, state = jax.jit(tx.update)(grads, state, p)
    p = optax.apply_updates(p, u)
  jax.tree_util.tree_map(lambda a, e: np.testing.assert_allclose(a, -e, rtol=1e-6), p,
                         expected)


# ----------------------------------------------------------------------------- microbatched

D, H = 16, 32


def _loss(p, x, y):
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  return (h @ p["w2"] - y) ** 2


PARAMS = {"w1": jnp.asarray(np.random.default_rng(0).normal(size=(D, H)), jnp.float32),
          "b1": jnp.zeros(H), "w2": jnp.ones(H)}
N_PARAMS = D * H + 2 * H


def _data(b, seed=6):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, D)) * rng.lognormal(0, 1, size=(b, 1))
  return jnp.asarray(x, jnp.float32), jnp.asarray(rng.normal(size=b), jnp.float32)


def test_microbatched_equals_per_example_clip_of_vmapped_grads():
  x, y = _data(16)
  mask = jnp.arange(16) % 5 != 0
  x = x.at[5].set(jnp.nan)  # a NaN in a padding row
  per_example = jax.vmap(jax.grad(_loss), in_axes=(None, 0, 0))(PARAMS, x, y)
  expected, expected_info = CLIP(per_example, 50.0, mask=mask, reduce="mean")
  losses = jax.vmap(_loss, in_axes=(None, 0, 0))(PARAMS, x, y)
  for mb in [None, 4]:
    fn = jax.jit(clipax.per_example_clipped_grad(_loss, 50.0, microbatch_size=mb,
                                                 reduce="mean"))
    out, info = fn(PARAMS, x, y, mask=mask)
    # another summation order (microbatches, one fused program): terms of size ~1 cancel to
    # ~1e-2 elements, so a few float32 ulps of the terms
    jax.tree_util.tree_map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5,
                                                                   atol=1e-5), out, expected)
    for field in ("examples", "clipped", "nonfinite"):
      assert int(getattr(info, field)) == int(getattr(expected_info, field)), (mb, field)
    for field in ("mean_norm", "max_norm", "min_scale"):
      np.testing.assert_allclose(getattr(info, field), getattr(expected_info, field),
                                 rtol=1e-5, err_msg=f"{mb} {field}")
    np.testing.assert_allclose(float(info.loss), float(jnp.mean(losses[mask])), rtol=1e-5)
    assert 0 < int(info.clipped) < int(info.examples)
  # recorded by the transformation through per_example_info
  tx = clipax.clip_per_example(50.0)
  state = tx.init(PARAMS)
  passed, state = tx.update(out, state, PARAMS, per_example_info=info)
  assert passed is out and int(state.clipped_count) == int(info.clipped)
  with pytest.raises(ValueError, match="`mask`"):
    tx.update(out, state, PARAMS, per_example_info=info, mask=mask)


def test_microbatched_peak_memory_holds_microbatch_size_per_example_gradients():
  """``memory_analysis()`` of the compiled programs: the naive path's temporaries grow with the
  batch (per-example gradients of every example), the microbatched one's with
  ``microbatch_size`` only."""
  b, mb = 128, 4
  x, y = _data(b)
  temps = {}
  for size in (None, mb):
    fn = clipax.per_example_clipped_grad(_loss, 1.0, microbatch_size=size)
    compiled = jax.jit(fn).lower(PARAMS, x, y).compile()
    temps[size] = compiled.memory_analysis().temp_size_in_bytes
  one = N_PARAMS * 4  # bytes of one example's float32 gradient
  assert temps[None] >= b * one  # the naive program holds all of them
  assert temps[mb] <= 3 * mb * one + 64 * 1024, temps
  assert temps[mb] * 8 < temps[None], temps
