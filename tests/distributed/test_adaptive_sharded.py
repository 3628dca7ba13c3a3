"""Adaptive clippers and guards under ``shard_map``: 200 steps, step by step as on one device.

Their statistics come from the all-reduced global norm (per-leaf norms for AdaGC), so the state
is replicated: every device holds the same state, equal to the single-device run's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _dist import mesh_2x4
from jax import lax
from jax.sharding import PartitionSpec as P

import clipax

STEPS = 200
AXES = ("data", "model")
DEVICES = 8

CLIPPERS = {
    "zclip": lambda ax: clipax.zclip(warmup_steps=20, max_norm=50.0, axis_name=ax),
    "autoclip": lambda ax: clipax.autoclip(25.0, history=64, axis_name=ax),
    "adagc": lambda ax: clipax.adagc(warmup_steps=20, axis_name=ax),
    "skip_spikes": lambda ax: clipax.skip_spikes(
        optax.sgd(0.1), window=32, threshold=3.0, warmup=10, axis_name=ax
    ),
}


def _gradient_stream():
  """200 steps of a three-leaf gradient: a drifting scale, spikes, and one Inf step."""
  rng = np.random.default_rng(0)
  scale = np.exp(np.linspace(0.0, -1.0, STEPS)) * rng.uniform(0.8, 1.2, STEPS)
  scale[[40, 41, 90, 130, 170]] *= [30.0, 8.0, 50.0, 12.0, 25.0]
  stream = {
      "w": rng.normal(size=(STEPS, 16, 6)) * scale[:, None, None],
      "b": rng.normal(size=(STEPS, 24)) * scale[:, None] * 0.3,
      "v": rng.normal(size=(STEPS, 40)) * scale[:, None] * 2.0,
  }
  stream["v"][150, 3] = np.inf  # lives on a single shard; every device must still see it
  return {k: jnp.asarray(v, jnp.float32) for k, v in stream.items()}


def _run(tx, stream, init_like):
  """``(updates, states)`` of every step, by ``lax.scan``."""

  def body(state, g):
    out, state = tx.update(g, state, None)
    return state, (out, state)

  return lax.scan(body, tx.init(init_like), stream)[1]


@pytest.mark.parametrize("name", sorted(CLIPPERS))
def test_200_steps_under_shard_map_match_single_device(name):
  stream = _gradient_stream()
  first = jax.tree_util.tree_map(lambda s: s[0], stream)
  want_out, want_states = jax.jit(lambda s: _run(CLIPPERS[name](None), s, first))(stream)

  mesh = mesh_2x4()
  tx = CLIPPERS[name](AXES)
  stream_specs = jax.tree_util.tree_map(lambda _: P(None, AXES), stream)

  def sharded(s):
    local_first = jax.tree_util.tree_map(lambda x: x[0], s)
    out, states = _run(tx, s, local_first)
    return out, jax.tree_util.tree_map(lambda x: x[None], states)  # one copy per device

  state_specs = jax.tree_util.tree_map(lambda _: P(AXES), want_states)
  run = jax.jit(jax.shard_map(sharded, mesh=mesh, in_specs=(stream_specs,),
                              out_specs=(stream_specs, state_specs)))
  got_out, got_states = jax.block_until_ready(run(stream))

  for path, got, want in zip(
      [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(want_states)[0]],
      jax.tree_util.tree_leaves(got_states),
      jax.tree_util.tree_leaves(want_states),
      strict=True,
  ):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == (DEVICES, *want.shape), path
    for d in range(1, DEVICES):  # replicated: bit-identical on every device
      np.testing.assert_array_equal(got[d], got[0], err_msg=f"{path} differs on device {d}")
    if np.issubdtype(want.dtype, np.floating):
      np.testing.assert_allclose(got[0], want, rtol=2e-5, atol=1e-6, err_msg=path)
    else:
      np.testing.assert_array_equal(got[0], want, err_msg=path)
  for got, want in zip(jax.tree_util.tree_leaves(got_out), jax.tree_util.tree_leaves(want_out),
                       strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=1e-6)

  # The stream exercised the policy: some steps were clipped or skipped, step 150 was non-finite.
  events = got_states.skipped_count if name == "skip_spikes" else got_states.clipped_count
  assert 0 < int(events[0, -1]) < STEPS
  assert int(got_states.nonfinite_count[0, -1]) == 1
