"""Legacy ``jax.pmap``: after ``lax.pmean`` the gradients are replicated and need no
``axis_name``; gradients split across devices need it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _dist import f64
from _refs import assert_close, clip64, norm64
from jax import lax

import clipax

N = 8


def _loss(params, batch):
  x, y = batch
  pred = jnp.tanh(x @ params["w1"] + params["b1"][None]) @ params["w2"]
  return jnp.mean((pred - y) ** 2)


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {
      "w1": jnp.asarray(rng.normal(size=(6, 16)), jnp.float32),
      "b1": jnp.asarray(rng.normal(size=(16,)), jnp.float32),
      "w2": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32),
  }
  x = jnp.asarray(rng.normal(size=(N, 4, 6)) * 3, jnp.float32)
  y = jnp.asarray(rng.normal(size=(N, 4, 3)), jnp.float32)
  return params, (x, y)


def test_pmean_then_clip_matches_single_device():
  params, (x, y) = _problem()
  tx = optax.chain(clipax.clip_by_global_norm(0.1), optax.sgd(0.5))
  state = tx.init(params)

  def step(params, state, batch):
    grads = lax.pmean(jax.grad(_loss)(params, batch), "batch")  # replicated: no axis_name
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  replicate = lambda t: jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (N, *a.shape)), t)
  new_params, new_state = jax.pmap(step, axis_name="batch")(replicate(params), replicate(state),
                                                            (x, y))
  # Single device: the mean over devices of the per-device gradients is the full-batch gradient.
  full = (x.reshape(-1, 6), y.reshape(-1, 3))
  grads = jax.grad(_loss)(params, full)
  ref_updates, ref_norm, _ = clip64(grads, 0.1)
  assert_close(new_state[0].norm[0], ref_norm)
  assert np.all(f64(new_state[0].norm) == f64(new_state[0].norm[0]))  # identical on every device
  for got, p, u in zip(jax.tree_util.tree_leaves(new_params), jax.tree_util.tree_leaves(params),
                       ref_updates, strict=True):
    for d in range(N):
      assert_close(got[d], f64(p) - 0.5 * u, atol=1e-6)


def test_sharded_grads_with_axis_name_match_unsharded():
  rng = np.random.default_rng(1)
  grads = {
      "w": jnp.asarray(rng.normal(size=(N * 4, 5)) * 2, jnp.float32),
      "v": jnp.asarray(rng.normal(size=(N * 3,)), jnp.float32),
  }
  bias = jnp.asarray(rng.normal(size=(7,)), jnp.float32)  # the same on every device
  whole = {**grads, "bias": bias}
  max_norm = norm64(whole) / 5
  tx = clipax.clip_by_global_norm(max_norm, axis_name="shards",
                                  replicated={"w": False, "v": False, "bias": True})
  split = {k: v.reshape(N, -1, *v.shape[1:]) for k, v in grads.items()}
  split["bias"] = jnp.broadcast_to(bias, (N, 7))
  state = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (N, *a.shape)), tx.init(split))
  out, new_state = jax.pmap(tx.update, axis_name="shards")(split, state)

  ref_out, ref_norm, _ = clip64(whole, max_norm)
  assert np.all(f64(new_state.norm) == f64(new_state.norm[0]))
  assert_close(new_state.norm[0], ref_norm)
  ref = dict(zip(sorted(whole), ref_out, strict=True))
  assert_close(out["w"].reshape(-1, 5), ref["w"], atol=1e-6)
  assert_close(out["v"].reshape(-1), ref["v"], atol=1e-6)
  for d in range(N):
    assert_close(out["bias"][d], ref["bias"], atol=1e-6)

  # Without axis_name every device clips its own slice by that slice's norm.
  local = jax.pmap(clipax.clip_by_global_norm(max_norm).update)(split, state)[1].norm
  for d in range(N):
    piece = {k: v[d] for k, v in split.items()}
    assert_close(local[d], norm64(piece))
