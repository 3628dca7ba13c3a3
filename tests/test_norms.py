"""global_norm, leaf_norms and unitwise_norms against float64 numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _refs import as64, assert_close, leaf_norm64, norm64

import clipax
from clipax import _platform, _rescue

ORDS = [1, 2, math.inf]
DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32]


def force_platform(monkeypatch, which):
  """Compiles the norms' ``which`` path ("cpu", "accelerator": the TPU's, "gpu") on the CPU."""
  if which == "accelerator":
    monkeypatch.setattr(_platform, "_by_platform", lambda cpu, accelerator, gpu=None: accelerator())
  elif which == "gpu":
    monkeypatch.setattr(_platform, "_by_platform",
                        lambda cpu, accelerator, gpu=None: (gpu or accelerator)())


@pytest.fixture(params=["cpu", "accelerator", "gpu"])
def path(request, monkeypatch):
  """Runs a test through the three paths: the ``lax.cond`` overflow rescue compiled for the CPU,
  the branch-free one compiled for TPU, and the GPU's, with the leaves concatenated and stacked
  in groups (forced here, on the CPU)."""
  force_platform(monkeypatch, request.param)
  return request.param


def _tree(rng, dtype, scale=1.0):
  raw = {
      "dense": {"kernel": rng.normal(size=(7, 5)), "bias": rng.normal(size=(5,))},
      "blocks": [rng.normal(size=(3, 3, 2)), rng.normal(size=())],
      "big": rng.normal(size=(300, 300)),  # above the small-leaf concatenation size
  }
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x * scale, dtype), raw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ord", ORDS)
def test_global_norm_matches_float64(dtype, ord, path):
  tree = _tree(np.random.default_rng(0), dtype)
  got = jax.jit(lambda t: clipax.global_norm(t, ord=ord))(tree)
  assert got.dtype == jnp.float32
  # The reference sees the same (rounded) inputs; only accumulation error remains.
  assert_close(got, norm64(tree, ord), jnp.float32, rtol=2e-6)


@pytest.mark.parametrize("ord", ORDS)
def test_leaf_norms_match_float64(ord, path):
  tree = _tree(np.random.default_rng(1), jnp.bfloat16)
  got = jax.jit(lambda t: clipax.leaf_norms(t, ord=ord))(tree)
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(tree)
  for g, x in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(tree), strict=True):
    assert g.dtype == jnp.float32 and g.shape == ()
    assert_close(g, leaf_norm64(x, ord), jnp.float32, rtol=2e-6)


def _many_leaves(rng, scale):
  """150 leaves: more same-shape leaves than one GPU group holds (64), in two dtypes, with one-
  element and empty leaves among them, each leaf at its own magnitude."""
  tree = {}
  for i in range(150):
    shape = [(4, 3), (7,), (2, 2, 2), (1,), (0, 3)][i % 5]
    dtype = jnp.bfloat16 if i % 3 == 0 else jnp.float32
    tree[f"p{i:03d}"] = jnp.asarray(rng.normal(size=shape) * scale * (1 + i % 7), dtype)
  return tree


@pytest.mark.parametrize("alone", [False, True])
@pytest.mark.parametrize("scale", [1.0, 1e20, 1e-22])
@pytest.mark.parametrize("ord", ORDS)
def test_gpu_grouping_of_many_leaves_matches_float64(ord, scale, alone, monkeypatch):
  # The GPU path concatenates (global norm) and stacks (per-leaf norms) groups of leaves; each
  # result must be the leaf's own, through the overflow and underflow rescues. ``alone``: the
  # leaves of two or more dimensions are taken as mesh-sharded, so they are reduced alone, by
  # rows first (``_grouping.gpu_sums``).
  force_platform(monkeypatch, "gpu")
  tree = _many_leaves(np.random.default_rng(7), scale)
  if alone:
    monkeypatch.setattr(_platform, "_maybe_sharded", lambda x: x.ndim >= 2)
    # large enough to be reduced by rows first
    tree["big"] = jnp.asarray(np.random.default_rng(9).normal(size=(300, 300)) * scale)
  got = jax.jit(lambda t: clipax.global_norm(t, ord=ord))(tree)
  assert_close(got, norm64(tree, ord), jnp.float32, rtol=2e-6)
  per_leaf = jax.jit(lambda t: clipax.leaf_norms(t, ord=ord))(tree)
  for name, x in tree.items():
    assert_close(per_leaf[name], leaf_norm64(x, ord), jnp.float32, rtol=2e-6)


def test_gpu_path_groups_leaves_into_few_reductions(monkeypatch):
  # The structure itself (the deviceless H100 compile is in test_compiled_structure.py): on the
  # CPU, with the GPU path forced, 150 leaves are reduced in a handful of reductions.
  tree = _many_leaves(np.random.default_rng(8), 1.0)

  def reductions(fn):  # a fresh function each time: jit's cache would keep the other path
    return jax.jit(lambda t: fn(t)).lower(tree).as_text().count("stablehlo.reduce")

  force_platform(monkeypatch, "accelerator")
  per_leaf_tpu = reductions(clipax.leaf_norms)
  assert per_leaf_tpu == 3 * 150  # 3 sums for each leaf
  force_platform(monkeypatch, "gpu")
  # 3 sums x (80 non-empty f32 leaves in 2 groups, 40 bf16 in 1), and the 3 totals
  assert reductions(clipax.global_norm) == 3 * 3 + 3
  # 3 sums x 6 stacks (3 shapes x 2 dtypes); the 30 one-element and 30 empty leaves alone, each
  # leaf's 3 sums stacked into one reduction
  assert reductions(clipax.leaf_norms) == 3 * 6 + 60


def test_float16_300_does_not_overflow():
  grads = {"w": jnp.full((4,), 300.0, jnp.float16)}
  np.testing.assert_allclose(float(clipax.global_norm(grads)), 600.0, rtol=1e-6)
  # the sum of squares, 360000, is past float16's max (65504): optax gets inf here
  with np.errstate(over="ignore"):
    assert not np.isfinite(np.sum(np.full(4, 300.0, np.float16) ** 2))


@pytest.mark.parametrize("ord", [1, 2])
@pytest.mark.parametrize("value", [1e20, 1e30, 1e38, 3e38, 1e-20, 1e-30, 1e-37])
def test_extreme_float32_magnitudes_give_the_true_norm(value, ord, path):
  x = np.array([value, -value / 2, value / 3, 0.0], np.float32)
  with np.errstate(over="ignore"):
    want = np.float32(norm64([x], ord))  # inf where the true norm is past float32's max
  got = jax.jit(lambda t: clipax.global_norm(t, ord=ord))({"w": jnp.asarray(x)})
  assert_close(got, want, jnp.float32)
  got_leaf = jax.jit(lambda t: clipax.leaf_norms(t, ord=ord))({"w": jnp.asarray(x)})["w"]
  assert_close(got_leaf, want, jnp.float32)


@pytest.mark.parametrize("value", [3.5e19, 1e30, 1e-25, 1.0])
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_single_element_leaves_at_extreme_magnitudes(value, shape, path):
  # One element: the reduction vanishes and XLA may fold the rescue's scaling constants.
  tree = {"s": jnp.full(shape, -value, jnp.float32)}
  got = jax.jit(lambda t: clipax.global_norm(t))(tree)
  assert_close(got, value, jnp.float32, rtol=2e-6)
  leaf = jax.jit(lambda t: clipax.leaf_norms(t))(tree)["s"]
  assert_close(leaf, value, jnp.float32, rtol=2e-6)
  both = {"s": tree["s"], "w": jnp.ones((1000,), jnp.float32)}
  leaves = jax.jit(lambda t: clipax.leaf_norms(t))(both)
  assert_close(leaves["s"], value, jnp.float32, rtol=2e-6)


def test_huge_norm_that_overflows_float32_is_inf_not_nan(path):
  x = jnp.full((4,), 3e38, jnp.float32)  # the true norm 6e38 is not representable
  assert np.isposinf(float(clipax.global_norm(x)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("ord", ORDS)
def test_nonfinite_elements_give_a_nonfinite_norm(bad, ord, path):
  tree = {"a": jnp.ones(3), "b": jnp.array([1.0, bad])}
  got = float(jax.jit(lambda t: clipax.global_norm(t, ord=ord))(tree))
  if np.isnan(bad):
    assert np.isnan(got)
  else:
    assert np.isposinf(got)
  leaf = jax.jit(lambda t: clipax.leaf_norms(t, ord=ord))(tree)
  assert float(leaf["a"]) == pytest.approx(leaf_norm64(np.ones(3), ord))
  assert not np.isfinite(float(leaf["b"]))


def test_empty_none_and_zero_size_give_zero(path):
  for tree in [{}, [], None, {"a": None}, {"a": jnp.zeros((0, 3))}, (jnp.zeros((2, 0)), None)]:
    for ord in ORDS:
      n = jax.jit(lambda t, o=ord: clipax.global_norm(t, ord=o))(tree)
      assert n.dtype == jnp.float32 and float(n) == 0.0
  norms = clipax.leaf_norms({"a": jnp.zeros((0,)), "b": jnp.ones(4)})
  assert float(norms["a"]) == 0.0 and float(norms["b"]) == 2.0


def test_complex_leaves_use_modulus():
  z = jnp.array([3 + 4j, 1 - 1j], jnp.complex64)
  np.testing.assert_allclose(float(clipax.global_norm(z)), math.sqrt(25 + 2), rtol=1e-6)
  np.testing.assert_allclose(float(clipax.global_norm(z, ord=1)), 5 + math.sqrt(2), rtol=1e-6)
  np.testing.assert_allclose(float(clipax.global_norm(z, ord=math.inf)), 5.0, rtol=1e-6)


def test_integer_leaf_is_rejected_with_its_path():
  with pytest.raises(ValueError, match=r"\['params'\]\['step'\].*int32"):
    clipax.global_norm({"params": {"w": jnp.ones(2), "step": jnp.arange(3)}})
  with pytest.raises(ValueError, match="bool"):
    clipax.leaf_norms([jnp.ones(2, bool)])


@pytest.mark.parametrize("ord", [0, 3, -1, "fro", None, True, 2.5])
def test_unknown_ord_is_rejected(ord):
  with pytest.raises(ValueError, match="`ord`"):
    clipax.global_norm(jnp.ones(2), ord=ord)


def test_ord_inf_spelled_as_string():
  x = jnp.array([1.0, -7.0, 3.0])
  assert float(clipax.global_norm(x, ord="inf")) == 7.0


def test_float64_accumulates_in_float64_under_x64(path):
  with jax.enable_x64(True):
    x = jnp.asarray(np.array([1e200, 1e200]))
    assert x.dtype == jnp.float64
    n = clipax.global_norm({"x": x, "y": jnp.ones(2, jnp.float32)})
    assert n.dtype == jnp.float64
    np.testing.assert_allclose(float(n), math.sqrt(2) * 1e200, rtol=1e-12)


def test_many_small_leaves_match_reference():
  rng = np.random.default_rng(3)
  tree = [jnp.asarray(rng.normal(size=(int(rng.integers(1, 20)),)), jnp.float32) for _ in range(99)]
  tree += [jnp.asarray(rng.normal(size=(3,)), jnp.bfloat16) for _ in range(50)]
  assert_close(jax.jit(clipax.global_norm)(tree), norm64(tree), jnp.float32)


@pytest.mark.parametrize("scale", [1.0, 1e20, 1e-25])
def test_gradient_of_norm_is_finite_at_zero_and_correct_elsewhere(path, scale):
  grad = jax.jit(jax.grad(lambda t: clipax.global_norm(t)))
  g0 = grad({"w": jnp.zeros(3)})
  assert np.all(np.isfinite(np.asarray(g0["w"])))
  x = jnp.array([3.0, 4.0]) * scale
  np.testing.assert_allclose(np.asarray(grad({"w": x})["w"]), [0.6, 0.8], rtol=1e-6)
  leaf_grad = jax.jit(jax.grad(lambda t: clipax.leaf_norms(t)["w"]))
  np.testing.assert_allclose(np.asarray(leaf_grad({"w": x})["w"]), [0.6, 0.8], rtol=1e-6)


def _unit_ref(x, axes):
  x64 = as64(x)
  return np.sqrt(np.sum(x64 * x64, axis=axes, keepdims=True))


@pytest.mark.parametrize(
    "shape,axes",
    [((), ()), ((5,), (0,)), ((4, 3), (0,)), ((3, 4, 5), (0, 1)), ((2, 3, 4, 5), (0, 1, 2)),
     ((2, 2, 3, 4, 5), (0, 1, 2, 3))],
)
@pytest.mark.parametrize("scale", [1.0, 1e20, 1e-25])
def test_unitwise_norms_reduce_all_but_the_last_axis(shape, axes, scale, path):
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape) * scale, jnp.float32)
  got = jax.jit(lambda t: clipax.unitwise_norms(t, units="last_axis"))({"x": x})["x"]
  assert got.shape == (tuple(1 if i in axes else d for i, d in enumerate(shape)) if shape else ())
  assert_close(got, _unit_ref(x, axes))


@pytest.mark.parametrize(
    "shape,axes",
    [((), ()), ((5,), (0,)), ((1, 5), (0, 1)), ((4, 1), (0, 1)), ((4, 3), (0,)),
     ((3, 4, 5), (0,)), ((2, 3, 4, 5), (0, 1, 2)), ((2, 2, 3, 4, 5), (0, 1, 2, 3))],
)
@pytest.mark.parametrize("scale", [1.0, 1e20])
def test_unitwise_norms_default_is_the_nfnets_rule(shape, axes, scale, path):
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape) * scale, jnp.float32)
  got = jax.jit(clipax.unitwise_norms)({"x": x})["x"]
  assert got.shape == (tuple(1 if i in axes else d for i, d in enumerate(shape)) if shape else ())
  assert_close(got, _unit_ref(x, axes))


def test_unitwise_norms_custom_axes_and_rescue(path):
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4, 5)) * 1e20, jnp.float32)
  x = x.at[0].multiply(1e-45)  # one unit tiny (underflow rescue), the others huge (overflow)
  got = jax.jit(lambda t: clipax.unitwise_norms(t, axes=lambda leaf: (1, 2)))(x)
  assert got.shape == (3, 1, 1)
  assert_close(got, _unit_ref(x, (1, 2)))


@pytest.mark.parametrize("scale", [1.0, 1e20, 1e-25])
def test_variadic_rescue_experiment_is_exact_and_takes_fewer_reductions(monkeypatch, scale):
  # The experiment behind `bench_clip.py --variadic-rescue`, on the branch-free path it changes.
  force_platform(monkeypatch, "accelerator")
  tree = _tree(np.random.default_rng(4), jnp.float32, scale)
  tree["h"] = jnp.ones((90, 9), jnp.bfloat16)

  def compiled_reductions():
    text = jax.jit(lambda t: clipax.global_norm(t)).lower(tree).compile().as_text()
    return text.count(" reduce(")

  three = compiled_reductions()
  monkeypatch.setattr(_rescue, "_VARIADIC_RESCUE", True)
  assert compiled_reductions() < three
  # XLA:CPU adds a variadic reduction's elements one after another (not pairwise), hence 5e-5;
  # on a GPU its accuracy is part of what the experiment measures.
  assert_close(jax.jit(lambda t: clipax.global_norm(t))(tree), norm64(tree), jnp.float32, rtol=5e-5)
  norms = jax.jit(lambda t: clipax.leaf_norms(t))(tree)
  for got, x in zip(jax.tree_util.tree_leaves(norms), jax.tree_util.tree_leaves(tree), strict=True):
    assert_close(got, leaf_norm64(x), jnp.float32, rtol=5e-5)
