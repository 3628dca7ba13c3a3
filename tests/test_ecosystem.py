"""clipax in the stacks users already have: orbax CheckpointManager with Flax NNX and
optax.MultiSteps (saved mid-accumulation, resumed bit-identically, for every transformation of
the contract table), metrics through a real logger (tensorboardX) and read back, and the
copyable example ``examples/flax_nnx_train.py`` run and resumed."""

from __future__ import annotations

import importlib.util
import pathlib
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from _cases import CLIPPERS, Case
from flax import nnx

import clipax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _optimizer(case: Case):
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  tx = case.make()
  if case.kind == "clip":
    tx = optax.chain(tx, optax.adam(1e-2))
  return model, nnx.Optimizer(model, optax.MultiSteps(tx, every_k_schedule=3), wrt=nnx.Param)


def _grads(model, step):
  rng = np.random.default_rng(step)
  scale = 50.0 if step == 5 else (np.nan if step == 6 else 1.0)  # a spike, then a NaN
  return jax.tree_util.tree_map(
      lambda p: jnp.asarray(scale * rng.standard_normal(p.shape), p.dtype),
      nnx.state(model, nnx.Param))


@nnx.jit
def _step(model, optimizer, grads):
  optimizer.update(model, grads)


def _run(model, optimizer, steps):
  for step in steps:
    _step(model, optimizer, _grads(model, step))


def _leaves(*objs):
  return [np.asarray(x) for o in objs for x in jax.tree_util.tree_leaves(nnx.state(o))]


@pytest.mark.parametrize("case", CLIPPERS, ids=str)
def test_checkpoint_manager_mid_accumulation_resumes_bit_identically(case, tmp_path):
  model, optimizer = _optimizer(case)
  _run(model, optimizer, range(4))  # 4 micro-steps of 3: mid-accumulation
  assert int(optimizer.opt_state.mini_step) == 1
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(4, args=ocp.args.StandardSave(
        {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}))
    manager.wait_until_finished()
    # a "new process": fresh objects, restored by structure
    model2, optimizer2 = _optimizer(case)
    target = {"model": nnx.state(model2), "optimizer": nnx.state(optimizer2)}
    restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(
        jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)))
  nnx.update(model2, restored["model"])
  nnx.update(optimizer2, restored["optimizer"])
  _run(model, optimizer, range(4, 10))
  _run(model2, optimizer2, range(4, 10))
  for a, b in zip(_leaves(model, optimizer), _leaves(model2, optimizer2), strict=True):
    np.testing.assert_array_equal(a, b)
  m1, m2 = clipax.metrics(optimizer.opt_state), clipax.metrics(optimizer2.opt_state)
  assert m1.keys() == m2.keys() and m1
  for key in m1:
    np.testing.assert_array_equal(np.asarray(m1[key]), np.asarray(m2[key]), err_msg=key)


def _read_events(logdir: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
  """Scalars from TensorBoard event files (TFRecord framing: length, crc, data, crc), parsed
  with tensorboardX's own protobuf definitions."""
  from tensorboardX.proto import event_pb2

  out: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def test_metrics_through_tensorboardx_read_back(tmp_path):
  from tensorboardX import SummaryWriter

  tx = optax.chain(clipax.zclip(warmup_steps=3, name="z"),
                   clipax.clip_by_global_norm(5.0, name="cap", leaf_metrics=True),
                   optax.adamw(1e-3))
  params = {"enc": {"kernel": jnp.zeros((4, 3))}, "head": {"kernel": jnp.zeros((3, 2))}}
  state = tx.init(params)
  update = jax.jit(tx.update)
  writer = SummaryWriter(str(tmp_path))
  logged: dict[str, list[float]] = {}
  rng = np.random.default_rng(0)
  for step in range(8):
    scale = 30.0 if step == 6 else 1.0
    grads = jax.tree_util.tree_map(lambda p, s=scale: s * jnp.asarray(
        rng.standard_normal(p.shape), jnp.float32), params)
    _, state = update(grads, state, params)
    for key, value in jax.device_get(clipax.metrics(state)).items():
      value = float(value)
      assert np.isfinite(value), (step, key)  # nothing for TensorBoard to warn about
      writer.add_scalar(key, value, step)
      logged.setdefault(key, []).append(value)
  writer.close()
  read = _read_events(tmp_path)
  assert set(read) == set(logged)
  assert "clip/cap/leaf_norm/enc/kernel" in read and "clip/z/threshold" in read
  for key, values in logged.items():
    assert [s for s, _ in read[key]] == list(range(8)), key
    np.testing.assert_allclose([v for _, v in read[key]], values, rtol=1e-6, err_msg=key)


def _example():
  spec = importlib.util.spec_from_file_location("flax_nnx_train",
                                                ROOT / "examples" / "flax_nnx_train.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_example_runs_and_resumes_where_it_stopped(tmp_path, capsys):
  example = _example()
  common = ["--small", "--steps", "16", "--every", "5", "--logdir", str(tmp_path / "logs")]
  straight = example.main([*common, "--ckpt-dir", str(tmp_path / "a")])
  # killed after 7 steps: the last checkpoint is at step 5, in the middle of an accumulation
  first = example.main([*common, "--ckpt-dir", str(tmp_path / "b"), "--stop-after", "7"])
  resumed = example.main([*common, "--ckpt-dir", str(tmp_path / "b")])
  out = capsys.readouterr().out
  assert first["start"] == 0 and resumed["start"] == 5 and "resumed from step 5" in out
  assert "done: 16 of 16 steps, started at 5" in out
  for a, b in zip(jax.tree_util.tree_leaves(straight["params"]),
                  jax.tree_util.tree_leaves(resumed["params"]), strict=True):
    np.testing.assert_array_equal(a, b)
  assert straight["metrics"] == resumed["metrics"]
  assert "clip/clip/leaf_norm/hidden/kernel" in resumed["metrics"]
  assert list((tmp_path / "logs").glob("events.out.tfevents.*"))
