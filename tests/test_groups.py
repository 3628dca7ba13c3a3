"""Parameter groups: ``clip_by_group_norm`` (each group by its own norm) and
``clip_by_subset_norm`` (one subset's norm applied to another), against float64 numpy, with
labels as a pytree and as a function, faults, metrics, jit/chain/inject_hyperparams,
checkpoints, and in a chain with ``optax.contrib.muon``."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _refs import as64
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import clipax
from clipax._state import INT_MAX

RTOL = 1e-6


def _params():
  rng = np.random.default_rng(0)
  raw = {"enc": {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=(3,))},
         "head": {"kernel": rng.normal(size=(3, 2)), "bias": rng.normal(size=(2,))},
         "scale": rng.normal(size=())}
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), raw)


def _grads(scale=10.0, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: jnp.asarray(scale * rng.normal(size=p.shape), jnp.float32), _params())


def kind_labels(tree):
  """Muon's default split: 2-D leaves "muon", the rest "adam"."""
  return jax.tree_util.tree_map(lambda x: "muon" if jnp.ndim(x) == 2 else "adam", tree)


# a prefix of the params: one label per top-level entry
PREFIX_LABELS = {"enc": "enc", "head": "head", "scale": "head"}


def _by_label(labels, tree):
  """``{label: [float64 leaves]}`` and the label of each leaf path, numpy side."""
  full = jax.tree_util.tree_map(lambda lab, sub: jax.tree_util.tree_map(lambda _: lab, sub),
                                labels(tree) if callable(labels) else labels, tree)
  per_leaf = jax.tree_util.tree_leaves(full)
  groups: dict[str, list[np.ndarray]] = {}
  for lab, x in zip(per_leaf, jax.tree_util.tree_leaves(tree), strict=True):
    groups.setdefault(lab, []).append(as64(x))
  return groups, per_leaf


def _norm64(leaves, ord=2):
  flat = np.concatenate([np.ravel(x) for x in leaves]) if leaves else np.zeros(0)
  if ord == math.inf:
    return float(np.max(np.abs(flat), initial=0.0))
  return float(np.sum(np.abs(flat) ** ord) ** (1 / ord))


def _check_scaled(out, grads, per_leaf, factor):
  """Leaf ``i`` of ``out`` is leaf ``i`` of ``grads`` times ``factor[label_i]``."""
  for lab, o, g in zip(per_leaf, jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(grads),
                       strict=True):
    if factor[lab] == 1.0:
      np.testing.assert_array_equal(np.asarray(o), np.asarray(g), err_msg=lab)
    else:
      np.testing.assert_allclose(as64(o), as64(g) * factor[lab], rtol=RTOL, atol=1e-7,
                                 err_msg=lab)


# ----------------------------------------------------------------------------- (a) by group
@pytest.mark.parametrize("labels", [kind_labels, PREFIX_LABELS], ids=["function", "prefix"])
@pytest.mark.parametrize("ord", [2, 1, math.inf])
def test_group_norm_matches_float64_reference(labels, ord):
  grads = _grads()
  groups, per_leaf = _by_label(labels, grads)
  names = sorted(groups)
  max_norm = {names[0]: 1.0, names[1]: None}  # the second group is not clipped
  tx = clipax.clip_by_group_norm(labels, max_norm, ord=ord)
  out, state = jax.jit(tx.update)(grads, tx.init(_params()))
  m = clipax.metrics(state)
  factor = {}
  for lab in names:
    n = _norm64(groups[lab], ord)
    c = math.inf if max_norm[lab] is None else max_norm[lab]
    factor[lab] = min(1.0, c / n)
    np.testing.assert_allclose(float(m[f"clip/{lab}/norm"]), n, rtol=RTOL)
    np.testing.assert_allclose(float(m[f"clip/{lab}/scale"]), factor[lab], rtol=RTOL)
    assert bool(m[f"clip/{lab}/clipped"]) == (n > c)
    np.testing.assert_allclose(float(m[f"clip/{lab}/update_norm"]), n * factor[lab], rtol=RTOL)
  assert factor[names[0]] < 1 and factor[names[1]] == 1
  _check_scaled(out, grads, per_leaf, factor)


def test_group_norm_one_threshold_for_every_group_and_zero():
  grads = _grads()
  groups, per_leaf = _by_label(kind_labels, grads)
  out, _ = clipax.clip_by_group_norm(kind_labels, 2.0).update(
      grads, clipax.clip_by_group_norm(kind_labels, 2.0).init(_params()))
  _check_scaled(out, grads, per_leaf, {k: 2.0 / _norm64(v) for k, v in groups.items()})
  tx = clipax.clip_by_group_norm(kind_labels, 0.0)
  out, _ = tx.update(grads, tx.init(_params()))
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree_util.tree_leaves(out))


@pytest.mark.parametrize("nonfinite", ["zero", "propagate"])
def test_group_norm_a_nan_in_one_group_leaves_the_others_alone(nonfinite):
  grads = _grads()
  grads["enc"]["bias"] = grads["enc"]["bias"].at[1].set(jnp.nan)  # group "adam"
  tx = clipax.clip_by_group_norm(kind_labels, 1.0, nonfinite=nonfinite)
  update = jax.jit(tx.update)
  out, state = update(grads, tx.init(_params()))
  m = clipax.metrics(state)
  assert int(m["clip/adam/nonfinite_count"]) == 1 and int(m["clip/muon/nonfinite_count"]) == 0
  for leaf in (out["enc"]["bias"], out["head"]["bias"], out["scale"]):
    assert np.all(np.asarray(leaf) == 0) if nonfinite == "zero" else np.all(np.isnan(leaf))
  muon = [grads["enc"]["kernel"], grads["head"]["kernel"]]
  s = 1.0 / _norm64([as64(x) for x in muon])
  np.testing.assert_allclose(as64(out["enc"]["kernel"]), as64(muon[0]) * s, rtol=RTOL)
  np.testing.assert_allclose(float(m["clip/muon/scale"]), s, rtol=RTOL)
  # the next clean step is clipped normally in both groups
  out, state = update(_grads(seed=2), state)
  assert int(clipax.metrics(state)["clip/adam/nonfinite_count"]) == 1
  assert all(np.all(np.isfinite(x)) and np.any(x != 0) for x in jax.tree_util.tree_leaves(out))


def test_group_norm_metric_keys_and_leaf_metrics():
  tx = optax.chain(clipax.clip_by_group_norm(PREFIX_LABELS, 1.0, leaf_metrics=True),
                   optax.sgd(0.1))
  _, state = tx.update(_grads(), tx.init(_params()), _params())
  keys = set(clipax.metrics(state))
  per_state = {"norm", "update_norm", "scale", "clipped", "clip_rate", "clipped_count",
               "nonfinite_count", "invalid_count", "count", "threshold"}
  want = {f"clip/{g}/{k}" for g in ("enc", "head") for k in per_state}
  want |= {"clip/enc/leaf_norm/enc/kernel", "clip/enc/leaf_norm/enc/bias",
           "clip/head/leaf_norm/head/kernel", "clip/head/leaf_norm/head/bias",
           "clip/head/leaf_norm/scale"}
  assert keys == want, sorted(keys ^ want)


def test_group_norm_inject_hyperparams_traced_threshold_and_invalid():
  inject = optax.inject_hyperparams(clipax.clip_by_group_norm, static_args="labels")
  tx = inject(kind_labels, max_norm=1.0)
  state = tx.init(_params())
  update = jax.jit(tx.update)
  grads = _grads()
  out, state = update(grads, state)
  direct = clipax.clip_by_group_norm(kind_labels, 1.0)
  want, _ = direct.update(grads, direct.init(_params()))
  for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL)
  state.hyperparams["max_norm"] = jnp.asarray(3.0)  # traced: same compiled step, new threshold
  out, state = update(grads, state)
  assert float(clipax.metrics(state)["clip/muon/threshold"]) == 3.0
  state.hyperparams["max_norm"] = jnp.asarray(jnp.nan)
  out, state = update(grads, state)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree_util.tree_leaves(out))
  m = clipax.metrics(state)
  assert int(m["clip/muon/invalid_count"]) == int(m["clip/adam/invalid_count"]) == 1


def test_group_norm_bad_arguments_name_what_is_wrong():
  params = _params()
  with pytest.raises(TypeError, match=r"`labels` at \['enc'\]"):
    clipax.clip_by_group_norm({"enc": 3, "head": "h", "scale": "h"}, 1.0)
  with pytest.raises(TypeError, match="without '/'"):
    clipax.clip_by_group_norm({"enc": "a/b", "head": "h", "scale": "h"}, 1.0)
  with pytest.raises(ValueError, match=r"no threshold for label\(s\) \['head'\]"):
    clipax.clip_by_group_norm(PREFIX_LABELS, {"enc": 1.0})
  with pytest.raises(ValueError, match=r"`max_norm` names label\(s\) \['tail'\]"):
    clipax.clip_by_group_norm(PREFIX_LABELS, {"enc": 1.0, "head": 1.0, "tail": 2.0})
  with pytest.raises(ValueError, match=r"`max_norm\['enc'\]`"):
    clipax.clip_by_group_norm(PREFIX_LABELS, {"enc": -1.0, "head": 1.0})
  with pytest.raises(ValueError, match="`max_norm`"):
    clipax.clip_by_group_norm(PREFIX_LABELS, float("nan"))
  with pytest.raises(ValueError, match="`ord`"):
    clipax.clip_by_group_norm(PREFIX_LABELS, 1.0, ord=3)
  tx = clipax.clip_by_group_norm({"enc": "a", "tail": "b"}, 1.0)  # not a prefix of the params
  with pytest.raises(ValueError, match="`labels` must be a pytree prefix"):
    tx.init(params)
  tx = clipax.clip_by_group_norm(lambda p: jax.tree_util.tree_map(lambda _: 7, p), 1.0)
  with pytest.raises(TypeError, match=r"`labels` at \['enc'\]\['bias'\]"):
    tx.init(params)
  tx = clipax.clip_by_group_norm(kind_labels, {"muon": 1.0})
  with pytest.raises(ValueError, match=r"\['adam'\]"):
    tx.init(params)


# --------------------------------------------------------------------------- (b) by subset
SUBSETS = [  # (measure, apply)
    ("adam", None),           # measure and clip only the Adam leaves
    (None, "adam"),           # measure everything, scale only the Adam leaves
    (("adam", "muon"), None),  # both: the plain global clip
    ("muon", ("adam",)),      # measure one group, apply to the other
]


@pytest.mark.parametrize("labels", [kind_labels, "tree"], ids=["function", "tree"])
@pytest.mark.parametrize(("measure", "apply"), SUBSETS)
def test_subset_norm_matches_float64_reference(labels, measure, apply):
  grads = _grads()
  labels = kind_labels(grads) if labels == "tree" else labels
  groups, per_leaf = _by_label(labels, grads)
  measured = set(groups) if measure is None else {measure} if isinstance(measure, str) else set(
      measure)
  applied = measured if apply is None else {apply} if isinstance(apply, str) else set(apply)
  c = 2.0
  tx = clipax.clip_by_subset_norm(labels, c, measure=measure, apply=apply)
  out, state = jax.jit(tx.update)(grads, tx.init(_params()))
  n = _norm64([x for g in measured for x in groups[g]])
  s = min(1.0, c / n)
  assert s < 1
  _check_scaled(out, grads, per_leaf, {g: s if g in applied else 1.0 for g in groups})
  m = clipax.metrics(state)
  np.testing.assert_allclose(float(m["clip/subset_norm/norm"]), n, rtol=RTOL)
  np.testing.assert_allclose(float(m["clip/subset_norm/scale"]), s, rtol=RTOL)
  after = _norm64([x * (s if g in applied else 1.0) for g in measured for x in groups[g]])
  np.testing.assert_allclose(float(m["clip/subset_norm/update_norm"]), after, rtol=RTOL)
  for g, leaves in groups.items():
    np.testing.assert_allclose(float(m[f"clip/subset_norm/group_norm/{g}"]), _norm64(leaves),
                               rtol=RTOL)
  assert bool(m["clip/subset_norm/clipped"]) and int(m["clip/subset_norm/clipped_count"]) == 1


@pytest.mark.parametrize("ord", [1, math.inf])
def test_subset_norm_other_ords(ord):
  grads = _grads()
  groups, per_leaf = _by_label(kind_labels, grads)
  tx = clipax.clip_by_subset_norm(kind_labels, 1.0, measure="adam", ord=ord)
  out, state = tx.update(grads, tx.init(_params()))
  n = _norm64(groups["adam"], ord)
  _check_scaled(out, grads, per_leaf, {"adam": 1.0 / n, "muon": 1.0})
  m = clipax.metrics(state)
  np.testing.assert_allclose(float(m["clip/subset_norm/norm"]), n, rtol=RTOL)
  np.testing.assert_allclose(float(m["clip/subset_norm/group_norm/muon"]),
                             _norm64(groups["muon"], ord), rtol=RTOL)


@pytest.mark.parametrize("nonfinite", ["zero", "propagate"])
def test_subset_norm_nonfinite_policy(nonfinite):
  tx = clipax.clip_by_subset_norm(kind_labels, 1.0, measure="adam", nonfinite=nonfinite)
  update = jax.jit(tx.update)
  state = tx.init(_params())
  # a NaN in a measured (and applied) leaf: the applied leaves are zeroed/NaN, Muon's pass
  grads = _grads()
  grads["scale"] = jnp.asarray(jnp.inf, jnp.float32)
  out, state = update(grads, state)
  for leaf in (out["enc"]["bias"], out["head"]["bias"], out["scale"]):
    assert np.all(np.asarray(leaf) == 0) if nonfinite == "zero" else np.all(np.isnan(leaf))
  np.testing.assert_array_equal(np.asarray(out["enc"]["kernel"]), grads["enc"]["kernel"])
  m = clipax.metrics(state)
  assert int(m["clip/subset_norm/nonfinite_count"]) == 1
  assert not bool(m["clip/subset_norm/clipped"])
  # a NaN in a group that is not measured: passes through, seen only in its group norm
  grads = _grads()
  grads["head"]["kernel"] = grads["head"]["kernel"].at[0, 0].set(jnp.nan)
  out, state = update(grads, state)
  m = clipax.metrics(state)
  assert int(m["clip/subset_norm/nonfinite_count"]) == 1
  assert np.isnan(float(m["clip/subset_norm/group_norm/muon"]))
  assert np.isfinite(float(m["clip/subset_norm/norm"]))
  assert np.isnan(np.asarray(out["head"]["kernel"])[0, 0])
  groups, _ = _by_label(kind_labels, grads)
  s = 1.0 / _norm64(groups["adam"])
  np.testing.assert_allclose(as64(out["enc"]["bias"]), as64(grads["enc"]["bias"]) * s, rtol=RTOL)


def test_subset_norm_traced_threshold_and_invalid_value():
  tx = optax.inject_hyperparams(clipax.clip_by_subset_norm, static_args="labels")(
      kind_labels, 1.0, measure="adam")
  state = tx.init(_params())
  update = jax.jit(tx.update)
  grads = _grads()
  state.hyperparams["max_norm"] = jnp.asarray(-1.0)
  out, state = update(grads, state)
  assert np.all(np.asarray(out["scale"]) == 0) and np.all(np.asarray(out["enc"]["bias"]) == 0)
  np.testing.assert_array_equal(np.asarray(out["enc"]["kernel"]), grads["enc"]["kernel"])
  assert int(clipax.metrics(state)["clip/subset_norm/invalid_count"]) == 1
  state.hyperparams["max_norm"] = jnp.asarray(jnp.inf)
  out, state = update(grads, state)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(out),
                                                  jax.tree_util.tree_leaves(grads), strict=True))
  m = clipax.metrics(state)
  assert int(m["clip/subset_norm/invalid_count"]) == 1 and not bool(m["clip/subset_norm/clipped"])


def test_subset_norm_bad_arguments_name_what_is_wrong():
  with pytest.raises(ValueError, match=r"`measure` names label\(s\) \['adma'\]"):
    clipax.clip_by_subset_norm(kind_labels(_params()), 1.0, measure="adma")
  tx = clipax.clip_by_subset_norm(kind_labels, 1.0, apply=("adam", "mu0n"))
  with pytest.raises(ValueError, match=r"`apply` names label\(s\) \['mu0n'\]"):
    tx.init(_params())
  with pytest.raises(TypeError, match="a label in `measure`"):
    clipax.clip_by_subset_norm(kind_labels, 1.0, measure=[1])
  with pytest.raises(TypeError, match="`apply`"):
    clipax.clip_by_subset_norm(kind_labels, 1.0, apply={"adam": 1})
  with pytest.raises(ValueError, match="`max_norm`"):
    clipax.clip_by_subset_norm(kind_labels, -2.0)
  with pytest.raises(TypeError, match="`name`"):
    clipax.clip_by_subset_norm(kind_labels, 1.0, name="a/b")
  tx = clipax.clip_by_subset_norm(kind_labels, 1.0)
  state = tx.init({"w": jnp.zeros((2, 2))})  # only "muon"
  with pytest.raises(ValueError, match="initialised with"):
    tx.update({"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}, state)


def test_subset_norm_metric_keys_named_and_leaf_metrics():
  tx = optax.chain(clipax.clip_by_subset_norm(PREFIX_LABELS, 1.0, measure="enc", name="enc_cap",
                                              leaf_metrics=True), optax.sgd(0.1))
  _, state = tx.update(_grads(), tx.init(_params()), _params())
  keys = set(clipax.metrics(state))
  want = {f"clip/enc_cap/{k}" for k in (
      "norm", "update_norm", "scale", "clipped", "clip_rate", "clipped_count", "nonfinite_count",
      "invalid_count", "count", "threshold", "group_norm/enc", "group_norm/head",
      "leaf_norm/enc/kernel", "leaf_norm/enc/bias", "leaf_norm/head/kernel",
      "leaf_norm/head/bias", "leaf_norm/scale")}
  assert keys == want, sorted(keys ^ want)


def test_subset_norm_under_masked_and_x64():
  params = _params()
  mask = jax.tree_util.tree_map(lambda _: True, params)
  mask["head"] = {"kernel": False, "bias": False}
  tx = optax.masked(clipax.clip_by_subset_norm(kind_labels, 1.0), mask)
  grads = _grads()
  out, state = jax.jit(tx.update)(grads, tx.init(params))
  np.testing.assert_array_equal(np.asarray(out["head"]["kernel"]), grads["head"]["kernel"])
  inside = [grads["enc"]["kernel"], grads["enc"]["bias"], grads["scale"]]
  np.testing.assert_allclose(float(clipax.metrics(state)["clip/subset_norm/norm"]),
                             _norm64([as64(x) for x in inside]), rtol=RTOL)
  with jax.enable_x64(True):
    big = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64) * 1e200, grads)
    tx = clipax.clip_by_subset_norm(kind_labels, 1.0, measure="adam")
    out, state = jax.jit(tx.update)(big, tx.init(big))
    m = clipax.metrics(state)
    assert m["clip/subset_norm/norm"].dtype == jnp.float64
    assert float(m["clip/subset_norm/norm"]) > 1e200
    assert int(m["clip/subset_norm/nonfinite_count"]) == 0
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(out))


def test_subset_norm_all_reduced_over_an_axis():
  """Under ``vmap`` with an axis name (as under ``pmap``/``shard_map``), each shard holds a
  piece of every leaf; the measured norm is the norm of the whole leaves."""
  grads = _grads()
  shards = jax.tree_util.tree_map(lambda x: jnp.stack([x, 2 * x]), grads)  # 2 shards
  tx = clipax.clip_by_subset_norm(kind_labels, 1.0, measure="adam", axis_name="d")
  state = tx.init(_params())
  _, states = jax.jit(jax.vmap(tx.update, in_axes=(0, None), out_axes=(0, 0), axis_name="d"))(
      shards, state)
  groups, _ = _by_label(kind_labels, grads)
  want = _norm64(groups["adam"]) * math.sqrt(5.0)
  np.testing.assert_allclose(np.asarray(states.norm), [want, want], rtol=RTOL)


# ----------------------------------------------------------------------------- properties
@st.composite
def labelled_trees(draw):
  n = draw(st.integers(1, 4))
  # a few shapes only, so that the eager ops' compilations are shared between examples
  shapes = [draw(st.sampled_from([(), (3,), (2, 3)])) for _ in range(n)]
  labels = [draw(st.sampled_from(["a", "b", "c"])) for _ in range(n)]
  seed = draw(st.integers(0, 2**16))
  rng = np.random.default_rng(seed)
  tree = {f"p{i}": jnp.asarray(rng.normal(size=s) * 10 ** rng.uniform(-3, 3), jnp.float32)
          for i, s in enumerate(shapes)}
  return tree, {f"p{i}": lab for i, lab in enumerate(labels)}


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(labelled_trees(), st.floats(0.01, 100.0), st.data())
def test_property_groups_match_numpy(tree_labels, c, data):
  tree, labels = tree_labels
  groups, per_leaf = _by_label(labels, tree)
  present = sorted(groups)
  # (a) each group by its own threshold
  thresholds = {g: data.draw(st.one_of(st.none(), st.floats(0.01, 100.0))) for g in present}
  tx = clipax.clip_by_group_norm(labels, thresholds)
  out, _ = tx.update(tree, tx.init(tree))
  factor = {g: 1.0 if t is None else min(1.0, t / max(_norm64(groups[g]), 1e-300))
            for g, t in thresholds.items()}
  _check_scaled(out, tree, per_leaf, factor)
  # (b) a random measured subset, applied to a random subset
  measure = data.draw(st.lists(st.sampled_from(present), min_size=1, unique=True))
  apply = data.draw(st.lists(st.sampled_from(present), min_size=1, unique=True))
  tx = clipax.clip_by_subset_norm(labels, c, measure=measure, apply=apply)
  out, state = tx.update(tree, tx.init(tree))
  n = _norm64([x for g in measure for x in groups[g]])
  s = min(1.0, c / n) if n > 0 else 1.0
  _check_scaled(out, tree, per_leaf, {g: s if g in apply else 1.0 for g in present})
  np.testing.assert_allclose(float(state.norm), n, rtol=RTOL)


# ----------------------------------------------------------------------------- checkpoints
def _both():
  return {
      "group": optax.chain(clipax.clip_by_group_norm(kind_labels, {"muon": 1.0, "adam": 0.5}),
                           optax.sgd(0.1)),
      "subset": optax.chain(clipax.clip_by_subset_norm(kind_labels, 1.0, measure="adam"),
                            optax.sgd(0.1)),
  }


def _steps(tx, state, scales):
  update = jax.jit(tx.update)
  outs = []
  for i, scale in enumerate(scales):
    out, state = update(_grads(scale, seed=i), state, _params())
    outs.append(out)
  return outs, state


def _bits(tree):
  return [np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(tree)]


@pytest.mark.parametrize("which", ["group", "subset"])
def test_state_saves_and_resumes_bit_identically(which, tmp_path):
  import orbax.checkpoint as ocp
  from flax import serialization

  tx = _both()[which]
  _, state = _steps(tx, tx.init(_params()), [1.0, 100.0, float("nan"), 3.0])
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "state", state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "state", jax.eval_shape(tx.init, _params()))
    untyped = ckpt.restore(tmp_path / "state")  # no target: nested dicts
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
  assert _bits(restored) == _bits(state)
  want = {k: np.asarray(v) for k, v in clipax.metrics(state).items()}
  assert int(want[next(k for k in want if k.endswith("nonfinite_count"))]) == 1
  forms = {"orbax without target": untyped,
           "flax state dict": serialization.to_state_dict(state)}
  for form, s in forms.items():
    got = clipax.metrics(s)
    assert set(got) == set(want), (form, sorted(set(got) ^ set(want)))
    for key, value in want.items():
      np.testing.assert_array_equal(np.asarray(got[key]), value, err_msg=f"{form}: {key}")
  out_a, state_a = _steps(tx, state, [2.0, 50.0])
  out_b, state_b = _steps(tx, restored, [2.0, 50.0])
  assert _bits(out_a) == _bits(out_b) and _bits(state_a) == _bits(state_b)


def test_counters_saturate():
  tx = clipax.clip_by_subset_norm(kind_labels, 1.0, measure="adam")
  start = INT_MAX - 1
  state = tx.init(_params())
  state = state._replace(count=jnp.asarray(start, jnp.int32),
                         clipped_count=jnp.asarray(start, jnp.int32),
                         nonfinite_count=jnp.asarray(start, jnp.int32))
  bad = _grads()
  bad["scale"] = jnp.asarray(jnp.nan, jnp.float32)
  update = jax.jit(tx.update)
  for g in (_grads(100.0), bad, _grads(100.0), bad):
    _, state = update(g, state)
  assert int(state.count) == int(state.clipped_count) == int(state.nonfinite_count) == INT_MAX


# ----------------------------------------------------------------------------- with Muon
def _mlp_loss(params, x, y):
  h = jnp.tanh(x @ params["l1"]["kernel"] + params["l1"]["bias"][None, :])
  return jnp.mean((h @ params["l2"]["kernel"] + params["l2"]["bias"][None, :] - y) ** 2)


def _mlp():
  rng = np.random.default_rng(7)
  params = {"l1": {"kernel": rng.normal(size=(4, 16)) * 0.5, "bias": np.zeros(16)},
            "l2": {"kernel": rng.normal(size=(16, 1)) * 0.25, "bias": np.zeros(1)}}
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
  x = jnp.asarray(rng.normal(size=(64, 4)), jnp.float32)
  y = jnp.asarray(np.sin(np.asarray(x) @ rng.normal(size=(4, 1))), jnp.float32)
  return params, x, y


def test_in_a_chain_with_muon_clips_only_the_adam_leaves():
  muon = optax.contrib.muon
  params, x, y = _mlp()
  max_norm = 0.01  # below the bias gradients' norm: the Adam leaves are clipped every step
  clip = clipax.clip_by_subset_norm(kind_labels, max_norm, measure="adam")
  tx = optax.chain(clip, muon(0.02))
  state = tx.init(params)
  reference = muon(0.02)
  ref_state = reference.init(params)

  @jax.jit
  def step(params, state, ref_state):
    loss, g = jax.value_and_grad(_mlp_loss)(params, x, y)
    clipped, _ = clip.update(g, state[0])
    updates, state = tx.update(g, state, params)
    # Muon alone, fed the float64-reference clip of the same gradients, from its own state
    ref_updates, ref_state = reference.update(g_ref(g), ref_state, params)
    return optax.apply_updates(params, updates), state, ref_state, loss, g, clipped, updates, \
        ref_updates

  def g_ref(g):
    adam = [g["l1"]["bias"], g["l2"]["bias"]]
    n = jnp.sqrt(sum(jnp.sum(b ** 2) for b in adam))
    s = jnp.minimum(1.0, max_norm / n)
    return {"l1": {"kernel": g["l1"]["kernel"], "bias": g["l1"]["bias"] * s},
            "l2": {"kernel": g["l2"]["kernel"], "bias": g["l2"]["bias"] * s}}

  losses = []
  for _ in range(40):
    params, state, ref_state, loss, g, clipped, updates, ref_updates = step(params, state,
                                                                            ref_state)
    losses.append(float(loss))
    m = clipax.metrics(state)
    adam64 = [as64(g["l1"]["bias"]), as64(g["l2"]["bias"])]
    n64 = _norm64(adam64)
    np.testing.assert_allclose(float(m["clip/subset_norm/norm"]), n64, rtol=RTOL)
    np.testing.assert_allclose(float(m["clip/subset_norm/group_norm/muon"]),
                               _norm64([as64(g["l1"]["kernel"]), as64(g["l2"]["kernel"])]),
                               rtol=RTOL)
    s = min(1.0, max_norm / n64)
    assert s < 1
    for layer in ("l1", "l2"):  # Muon's matrices pass unscaled, bit for bit
      np.testing.assert_array_equal(np.asarray(clipped[layer]["kernel"]),
                                    np.asarray(g[layer]["kernel"]))
      np.testing.assert_allclose(as64(clipped[layer]["bias"]), as64(g[layer]["bias"]) * s,
                                 rtol=RTOL)
    for a, b in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(ref_updates),
                    strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
  assert int(m["clip/subset_norm/clipped_count"]) == 40
  assert losses[-1] < 0.5 * losses[0], losses[::8]
  assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree_util.tree_leaves(params))


def test_group_norm_with_the_muon_group_unclipped_equals_the_subset_clip():
  """Per-group clipping with the Muon group left unclipped is the subset clip on the Adam
  leaves (so either goes in front of ``optax.contrib.muon``)."""
  params, x, y = _mlp()
  g = jax.grad(_mlp_loss)(params, x, y)
  by_group = clipax.clip_by_group_norm(kind_labels, {"muon": None, "adam": 0.05})
  by_subset = clipax.clip_by_subset_norm(kind_labels, 0.05, measure="adam")
  a, sa = jax.jit(by_group.update)(g, by_group.init(params))
  b, _ = jax.jit(by_subset.update)(g, by_subset.init(params))
  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6)
  assert _bits(a["l1"]["kernel"]) == _bits(g["l1"]["kernel"])
  m = clipax.metrics(sa)
  assert float(m["clip/muon/scale"]) == 1.0 and float(m["clip/adam/scale"]) < 1.0
