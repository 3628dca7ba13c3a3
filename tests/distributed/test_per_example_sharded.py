"""Per-example clipping with the *batch* sharded over a mesh axis under ``shard_map``.

Each device clips its own examples; ``axis_name`` all-reduces the clipped sums and the counts
(one ``psum`` each, ``pmax``/``pmin`` for the extremes), so every device holds the aggregate and
the counts of the whole batch, equal to the single-device result. Without ``axis_name`` each
device gets only its own examples' sum.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import clipax

MESH = jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Auto,))
B, D, H = 32, 8, 16  # 4 examples per device


def _loss(p, x, y):
  return (jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] - y) ** 2


def _setup():
  rng = np.random.default_rng(0)
  params = {"w1": jnp.asarray(rng.normal(size=(D, H)), jnp.float32), "b1": jnp.zeros(H),
            "w2": jnp.ones(H)}
  x = rng.normal(size=(B, D)) * rng.lognormal(0, 1, size=(B, 1))
  x[9, 0] = np.nan  # one non-finite example on device 2
  y = rng.normal(size=B)
  mask = np.arange(B) % 7 != 3  # padding rows on several devices
  return params, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), jnp.asarray(mask)


def _smap(fn, in_specs):
  return jax.jit(jax.shard_map(fn, mesh=MESH, in_specs=in_specs, out_specs=P(),
                               check_vma=False))


def _assert_info_equal(got, want):
  for field in ("examples", "clipped", "nonfinite"):
    assert int(getattr(got, field)) == int(getattr(want, field)), field
  for field in ("mean_norm", "max_norm", "min_scale", "loss"):
    if getattr(want, field) is not None:
      np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-5,
                                 err_msg=field)


def test_microbatched_grad_with_sharded_batch_equals_single_device():
  params, x, y, mask = _setup()
  single = clipax.per_example_clipped_grad(_loss, 5.0, reduce="mean")
  want, want_info = jax.jit(single)(params, x, y, mask=mask)
  assert int(want_info.nonfinite) == 1 and 0 < int(want_info.clipped) < int(want_info.examples)
  for mb in (None, 2):
    fn = clipax.per_example_clipped_grad(_loss, 5.0, microbatch_size=mb, reduce="mean",
                                         axis_name="batch")
    sharded = _smap(lambda p, a, b, m: fn(p, a, b, mask=m),  # noqa: B023
                    (P(), P("batch"), P("batch"), P("batch")))
    got, info = sharded(params, x, y, mask)
    jax.tree_util.tree_map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5,
                                                                   atol=1e-6), got, want)
    _assert_info_equal(info, want_info)


def test_transformation_with_sharded_per_example_grads_equals_single_device():
  params, x, y, mask = _setup()
  per_example = jax.vmap(jax.grad(_loss), in_axes=(None, 0, 0))(params, x, y)
  tx = optax.chain(clipax.clip_per_example(5.0, reduce="mean"), optax.sgd(0.1))
  want, want_state = jax.jit(tx.update)(per_example, tx.init(params), params, mask=mask)

  tx_sharded = optax.chain(clipax.clip_per_example(5.0, reduce="mean", axis_name="batch"),
                           optax.sgd(0.1))
  state = tx_sharded.init(params)
  step = _smap(lambda g, s, p, m: tx_sharded.update(g, s, p, mask=m),
               (P("batch"), P(), P(), P("batch")))
  got, got_state = step(per_example, state, params, mask)
  jax.tree_util.tree_map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-7),
                         got, want)
  m_got, m_want = clipax.metrics(got_state), clipax.metrics(want_state)
  assert set(m_got) == set(m_want)
  for key in m_want:
    np.testing.assert_allclose(m_got[key], m_want[key], rtol=1e-5, err_msg=key)
  assert int(m_got["clip/per_example/nonfinite_count"]) == 1
  # without axis_name each device sums its own examples only: not the global result
  local = optax.chain(clipax.clip_per_example(5.0, reduce="mean"), optax.sgd(0.1))
  step = jax.jit(jax.shard_map(lambda g, s, p, m: local.update(g, s, p, mask=m)[0], mesh=MESH,
                               in_specs=(P("batch"), P(), P(), P("batch")),
                               out_specs=P("batch"), check_vma=False))
  pieces = step(per_example, local.init(params), params, mask)
  assert not np.allclose(np.asarray(pieces["w2"]).reshape(8, H)[0], np.asarray(want["w2"]))
