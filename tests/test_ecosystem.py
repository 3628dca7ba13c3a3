"""clipax in the stacks users already have: orbax CheckpointManager with Flax NNX and
optax.MultiSteps (saved mid-accumulation, resumed bit-identically, for every transformation of
the contract table), metrics through a real logger (tensorboardX) and read back, and the
copyable example ``examples/flax_nnx_train.py`` run and resumed."""

from __future__ import annotations

import importlib.util
import pathlib
import struct
import subprocess
import sys

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


_TX: dict[str, optax.GradientTransformation] = {}


def _optimizer(case: Case):
  """A fresh model and ``nnx.Optimizer`` for this row. The transformation object is built once
  per row and shared by the two optimizers: it is static in ``nnx.jit``'s cache key, so a new
  one would compile the step again (a resumed process builds its own; nothing of it is state)."""
  if case.name not in _TX:
    tx = case.make()
    if case.kind == "clip":
      tx = optax.chain(tx, optax.adam(1e-2))
    _TX[case.name] = optax.MultiSteps(tx, every_k_schedule=3)
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  return model, nnx.Optimizer(model, _TX[case.name], wrt=nnx.Param)


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
  assert int(optimizer2.opt_state.mini_step) == 1  # the accumulation restored, not restarted
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
    # TensorBoard stores float32: every value logged here is a float32 (or a small int)
    np.testing.assert_array_equal(np.float32([v for _, v in read[key]]), np.float32(values),
                                  err_msg=key)


def _example():
  spec = importlib.util.spec_from_file_location("flax_nnx_train",
                                                ROOT / "examples" / "flax_nnx_train.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _run_example(args: list[str]) -> str:
  """``python examples/flax_nnx_train.py ARGS`` in a new process (as a user runs it); its
  stdout. Same environment as this process, so it runs the same programs on the same backend."""
  proc = subprocess.run([sys.executable, str(ROOT / "examples" / "flax_nnx_train.py"), *args],
                        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  return proc.stdout


def _restore_latest(directory: pathlib.Path):
  """The latest checkpoint of ``directory`` restored without a target (nested dicts), and its
  step."""
  with ocp.CheckpointManager(directory) as manager:
    step = manager.latest_step()
    return step, manager.restore(step, args=ocp.args.StandardRestore())


def test_example_killed_and_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path):
  common = ["--small", "--steps", "16", "--every", "5"]
  resumed = [*common, "--logdir", str(tmp_path / "logs"), "--ckpt-dir", str(tmp_path / "ckpt")]
  # first process stopped after 7 steps, as if killed: its last checkpoint is at step 5, in the
  # middle of an accumulation of 2
  out = _run_example([*resumed, "--stop-after", "7"])
  assert "resumed" not in out and "done: 7 of 16 steps, started at 0" in out
  out = _run_example(resumed)
  assert "resumed from step 5" in out and "done: 16 of 16 steps, started at 5" in out
  # the same script uninterrupted, in this process
  straight = _example().main([*common, "--logdir", str(tmp_path / "logs_straight"),
                              "--ckpt-dir", str(tmp_path / "straight")])
  assert straight["start"] == 0
  # final checkpoints: parameters, optimizer state and metrics bit-identical
  step_a, a = _restore_latest(tmp_path / "ckpt")
  step_b, b = _restore_latest(tmp_path / "straight")
  assert step_a == step_b == 16
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  m_a, m_b = clipax.metrics(a["optimizer"]), clipax.metrics(b["optimizer"])
  assert m_a.keys() == m_b.keys() and "clip/clip/leaf_norm/hidden/kernel" in m_a
  for key in m_a:
    np.testing.assert_array_equal(np.asarray(m_a[key]), np.asarray(m_b[key]), err_msg=key)
  assert {k: float(v) for k, v in m_b.items()} == straight["metrics"]
  # TensorBoard: the two processes together logged every optimizer update (at the 0-based
  # micro-steps 1, 3, ..., 15; step 5 twice, before the kill and after the resume) with the
  # uninterrupted run's values, all finite
  logs, logs_straight = _read_events(tmp_path / "logs"), _read_events(tmp_path / "logs_straight")
  assert set(logs) == set(logs_straight) and "clip/clip/leaf_norm/out/kernel" in logs
  for tag, points in logs.items():
    want = dict(logs_straight[tag])
    assert sorted(want) == list(range(1, 16, 2)), tag
    assert sorted({s for s, _ in points}) == sorted(want), tag
    for s, v in points:
      assert np.isfinite(v) and v == want[s], (tag, s)
