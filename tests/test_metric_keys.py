"""Issue 13: named metric keys, per-layer norms by path, update_norm/threshold, monitor, inf = off.

References: float64 numpy (``_refs.norm64``) for every norm reported; the key rules are the ones
``clipax.metrics`` documents.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _refs import as64, norm64

import clipax

PARAMS = {"params": {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
                     "Dense_1": {"kernel": jnp.ones((2, 1))}}}


def _grads(seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: jnp.asarray(scale * rng.normal(size=p.shape), jnp.float32), PARAMS)


def _run(tx, steps=2, scale=3.0, params=PARAMS):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for i in range(steps):
    out, state = update(_grads(i, scale), state, params)
  return out, state


def _names(m, prefix="clip"):
  return {k.split("/")[1] for k in m if k.startswith(prefix + "/") and k.count("/") >= 2}


# ----------------------------------------------------------------------------------- names
CLIPPERS = {
    "global_norm": lambda **kw: clipax.clip_by_global_norm(1.0, **kw),
    "value": lambda **kw: clipax.clip_by_value(0.5, **kw),
    "leaf_norm": lambda **kw: clipax.clip_by_leaf_norm(1.0, **kw),
    "block_rms": lambda **kw: clipax.clip_by_block_rms(0.5, **kw),
    "agc": lambda **kw: clipax.adaptive_grad_clip(0.1, **kw),
    "zclip": lambda **kw: clipax.zclip(warmup_steps=1, **kw),
    "autoclip": lambda **kw: clipax.autoclip(history=4, **kw),
    "adagc": lambda **kw: clipax.adagc(warmup_steps=1, **kw),
    "monitor": lambda **kw: clipax.monitor(**kw),
}


@pytest.mark.parametrize("kind", sorted(CLIPPERS))
def test_default_name_is_the_kind_and_name_argument_wins(kind):
  _, state = _run(optax.chain(CLIPPERS[kind](), optax.sgd(0.1)))
  assert _names(clipax.metrics(state)) == {kind}
  _, state = _run(optax.chain(CLIPPERS[kind](name="mine"), optax.sgd(0.1)))
  m = clipax.metrics(state)
  assert _names(m) == {"mine"}
  for metric in ("norm", "update_norm", "threshold", "count", "clip_rate", "nonfinite_count"):
    assert f"clip/mine/{metric}" in m, metric
  assert all(np.all(np.isfinite(as64(v))) for v in m.values())


def test_named_chain_key_names_the_state_and_name_argument_beats_it():
  tx = optax.named_chain(("pre", clipax.clip_by_value(0.5)),
                         ("post", clipax.clip_by_global_norm(1.0, name="gn")),
                         ("opt", optax.adam(1e-3)))
  _, state = _run(tx)
  assert _names(clipax.metrics(state)) == {"pre", "gn"}


def test_adding_or_removing_another_clipper_never_changes_a_named_clippers_keys():
  def keys(*extra):
    tx = optax.chain(*extra, clipax.zclip(warmup_steps=1, name="z"), optax.sgd(0.1))
    _, state = _run(tx)
    return {k: float(v) for k, v in clipax.metrics(state).items() if k.startswith("clip/z/")}

  alone = keys()
  with_others = keys(clipax.monitor(), clipax.clip_by_global_norm(100.0))
  assert set(alone) == set(with_others) and alone
  # an unnamed clipper of another kind also keeps its keys when a second kind is added
  _, one = _run(optax.chain(clipax.clip_by_global_norm(1.0), optax.sgd(0.1)))
  _, two = _run(optax.chain(clipax.clip_by_global_norm(1.0), clipax.monitor(), optax.sgd(0.1)))
  k1 = {k for k in clipax.metrics(one)}
  assert k1 <= set(clipax.metrics(two))


def test_two_unnamed_states_of_one_kind_get_a_suffix_only_then():
  tx = optax.chain(clipax.clip_by_global_norm(10.0), clipax.clip_by_global_norm(1.0),
                   optax.sgd(0.1))
  _, state = _run(tx)
  m = clipax.metrics(state)
  assert _names(m) == {"global_norm", "global_norm_2"}
  # the first measured the raw gradient, the second the output of the first (10 > norm)
  want = norm64(_grads(1, 3.0))
  assert float(m["clip/global_norm/norm"]) == pytest.approx(want, rel=1e-6)
  assert float(m["clip/global_norm_2/update_norm"]) == pytest.approx(1.0, rel=1e-6)
  # an explicit name keeps its key; the unnamed state of that kind moves out of its way
  tx = optax.chain(clipax.monitor(), clipax.monitor(name="monitor"), optax.sgd(0.1))
  _, state = _run(tx)
  assert _names(clipax.metrics(state)) == {"monitor", "monitor_2"}
  assert "clip/monitor/norm" in clipax.metrics(state)


def test_guard_and_clipper_inside_get_their_own_names():
  tx = clipax.skip_nonfinite(optax.chain(clipax.clip_by_global_norm(1.0), optax.sgd(0.1)))
  _, state = _run(tx)
  assert _names(clipax.metrics(state)) == {"skip_nonfinite", "global_norm"}


@pytest.mark.parametrize("bad", ["", "a/b", 3, b"x", ["x"]])
def test_bad_name_is_a_clear_error(bad):
  with pytest.raises(TypeError, match="`name`"):
    clipax.clip_by_global_norm(1.0, name=bad)


def test_named_state_survives_jit_scan_pickle_and_flax_serialization():
  import pickle

  from flax import serialization

  tx = optax.chain(clipax.zclip(warmup_steps=1, name="z"), optax.sgd(0.1))
  state = tx.init(PARAMS)

  def body(s, g):
    return tx.update(g, s, PARAMS)[1], None

  grads = jax.tree_util.tree_map(lambda *x: jnp.stack(x), _grads(0), _grads(1))
  state, _ = jax.jit(lambda s: jax.lax.scan(body, s, grads))(state)
  for form in (state, pickle.loads(pickle.dumps(state)),
               serialization.from_state_dict(tx.init(PARAMS),
                                             serialization.to_state_dict(state))):
    assert _names(clipax.metrics(form)) == {"z"}
    assert isinstance(form[0], clipax.ZClipState)
  # a dict form keeps the name through the tag field
  as_dict = serialization.to_state_dict(state)
  assert _names(clipax.metrics(as_dict)) == {"z"}


# ------------------------------------------------------------------------- per-leaf norms
LEAF_KINDS = ["global_norm", "value", "leaf_norm", "block_rms", "agc", "zclip", "autoclip",
              "adagc", "monitor"]


@pytest.mark.parametrize("kind", LEAF_KINDS)
def test_leaf_metrics_are_each_leafs_pre_clip_norm_by_path(kind):
  tx = optax.chain(clipax.monitor(name="raw"), CLIPPERS[kind](leaf_metrics=True, name="c"),
                   optax.sgd(0.1))
  _, state = _run(tx, steps=2)
  m = clipax.metrics(state)
  grads = _grads(1, 3.0)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  got = {k.removeprefix("clip/c/leaf_norm/"): float(v) for k, v in m.items()
         if k.startswith("clip/c/leaf_norm/")}
  want = {"/".join(str(e.key) for e in path): norm64(leaf) for path, leaf in flat}
  assert set(got) == set(want) == {"params/Dense_0/kernel", "params/Dense_0/bias",
                                   "params/Dense_1/kernel"}
  for key in want:
    assert got[key] == pytest.approx(want[key], rel=1e-6), key
  # the global norm combined from the leaf norms equals the plain global norm
  assert float(m["clip/c/norm"]) == pytest.approx(norm64(grads), rel=1e-6)
  # without the option there is none
  _, state = _run(optax.chain(CLIPPERS[kind](name="c"), optax.sgd(0.1)))
  assert not any("leaf_norm/" in k for k in clipax.metrics(state))


@pytest.mark.parametrize("kind", LEAF_KINDS)
def test_update_norm_is_the_norm_of_what_the_clipper_returned(kind):
  tx = CLIPPERS[kind](name="c")
  params = PARAMS
  state = tx.init(params)
  for i in range(3):
    out, state = jax.jit(tx.update)(_grads(i, 3.0), state, params)
  m = clipax.metrics(state)
  assert float(m["clip/c/update_norm"]) == pytest.approx(norm64(out), rel=1e-5, abs=1e-7)


def test_leaf_metrics_reads_no_gradient_a_second_time():
  """The compiled step with per-leaf norms reads each gradient as often as without them."""
  big = {"a": jnp.ones((512, 512)), "b": jnp.ones((256, 1024)), "c": jnp.ones(4096)}

  def reads(leaf_metrics):
    tx = clipax.clip_by_global_norm(1.0, leaf_metrics=leaf_metrics)
    state = tx.init(big)
    text = jax.jit(tx.update).lower(big, state).compile().as_text()
    entry = text[text.index("ENTRY"):]
    params = re.findall(r"(%\S+) = f32\[(?:512,512|256,1024|4096)\]\{[^}]*\} parameter\(", entry)
    assert len(params) == 3, params
    return sorted(len(re.findall(re.escape(p) + r"\b", entry)) - 1 for p in params)

  without, with_leaves = reads(False), reads(True)
  assert with_leaves == without, (without, with_leaves)


def test_leaf_metrics_must_be_a_bool():
  with pytest.raises(TypeError, match="`leaf_metrics`"):
    clipax.zclip(leaf_metrics=1)


# ------------------------------------------------------------------------------- thresholds
def test_threshold_is_the_one_in_force_and_never_infinite():
  tx = optax.chain(clipax.clip_by_global_norm(2.5), optax.sgd(0.1))
  _, state = _run(tx)
  assert float(clipax.metrics(state)["clip/global_norm/threshold"]) == 2.5
  # off (python inf): nothing clipped, the threshold metric is the step's own norm
  for off in (math.inf, jnp.inf):
    tx = optax.chain(clipax.clip_by_global_norm(off), optax.sgd(0.1))
    out, state = _run(tx, scale=1e3)
    m = clipax.metrics(state)
    assert not bool(m["clip/global_norm/clipped"])
    assert float(m["clip/global_norm/threshold"]) == float(m["clip/global_norm/norm"])
    assert float(m["clip/global_norm/update_norm"]) == float(m["clip/global_norm/norm"])
  # injected inf: off as well
  tx = optax.inject_hyperparams(clipax.clip_by_global_norm)(max_norm=math.inf)
  state = tx.init(PARAMS)
  out, state = jax.jit(tx.update)(_grads(0, 1e3), state)
  np.testing.assert_array_equal(as64(out["params"]["Dense_0"]["kernel"]),
                                as64(_grads(0, 1e3)["params"]["Dense_0"]["kernel"]))
  # a guard and zclip without a cap in warm-up: finite
  for tx in (clipax.skip_spikes(optax.sgd(0.1)), clipax.zclip(max_norm=None, warmup_steps=5)):
    _, state = _run(tx)
    for key, value in clipax.metrics(state).items():
      assert np.all(np.isfinite(as64(value))), key


def test_zclip_reports_its_learned_mean_and_std():
  tx = clipax.zclip(warmup_steps=3, max_norm=None, name="z")
  state = tx.init(None)
  norms = [1.0, 2.0, 3.0, 2.5, 2.2]
  for n in norms:
    _, state = jax.jit(tx.update)({"w": jnp.array([n])}, state)
  m = clipax.metrics(state)
  assert float(m["clip/z/mean"]) == pytest.approx(float(state.mu), rel=1e-7)
  assert float(m["clip/z/std"]) == pytest.approx(math.sqrt(float(state.var)), rel=1e-6)
  assert float(m["clip/z/std"]) > 0 and 1.0 < float(m["clip/z/mean"]) < 3.0


# ---------------------------------------------------------------------------------- monitor
def test_monitor_passes_updates_through_bit_identically_and_records():
  grads = _grads(0, 5.0)
  grads["params"]["Dense_1"]["kernel"] = grads["params"]["Dense_1"]["kernel"].at[0, 0].set(
      jnp.nan)
  tx = clipax.monitor(leaf_metrics=True)
  out, state = jax.jit(tx.update)(grads, tx.init(PARAMS))
  for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(grads), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  m = clipax.metrics(state)
  assert int(m["clip/monitor/nonfinite_count"]) == 1 and not bool(m["clip/monitor/clipped"])
  assert float(m["clip/monitor/leaf_norm/params/Dense_0/kernel"]) == pytest.approx(
      norm64(grads["params"]["Dense_0"]["kernel"]), rel=1e-6)
  assert int(m["clip/monitor/clipped_count"]) == 0
