"""clipax in the stacks users already have: orbax CheckpointManager with Flax NNX and
optax.MultiSteps (saved mid-accumulation, resumed bit-identically, for every transformation of
the contract table), metrics through a real logger (tensorboardX) and read back, and the
copyable example ``examples/flax_nnx_train.py`` run and resumed."""

from __future__ import annotations

import os
import pathlib
import shutil
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
      tx = optax.chain(tx, optax.sgd(1e-2, momentum=0.9))  # as the guard rows wrap
    _TX[case.name] = optax.MultiSteps(tx, every_k_schedule=3)
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, _TX[case.name], wrt=nnx.Param)
  # committed to the device, as an orbax restore gives arrays back: jit keys its compiled code
  # on that too, and one compiled step then serves both optimizers of a row
  device = jax.devices()[0]
  for obj in (model, optimizer):
    nnx.update(obj, jax.device_put(nnx.state(obj), device))
  return model, optimizer


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


def _run_example(args: list[str], cache: pathlib.Path) -> str:
  """``python examples/flax_nnx_train.py ARGS`` in a new process (as a user runs it); its
  stdout. Same environment as this process, so it runs the same programs on the same backend,
  plus XLA's persistent compilation cache (the test command's, else ``cache``) so that the
  second process does not compile again what the first did."""
  env = dict(os.environ)
  if not env.get("JAX_COMPILATION_CACHE_DIR"):
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  proc = subprocess.run([sys.executable, str(ROOT / "examples" / "flax_nnx_train.py"), *args],
                        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
                        check=False)
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
  common = ["--small", "--steps", "16", "--every", "9", "--ckpt-dir", str(tmp_path / "ckpt")]
  cache = tmp_path / "xla-cache"
  # first process, uninterrupted: checkpoints at micro-steps 9 and 16 (the last two are kept)
  out = _run_example([*common, "--logdir", str(tmp_path / "logs_a")], cache)
  assert "resumed" not in out and "done: 16 of 16 steps, started at 0" in out
  step, straight = _restore_latest(tmp_path / "ckpt")
  assert step == 16
  # as if it had been killed after step 9 (mid-accumulation: 9 micro-steps, 2 per update)
  shutil.rmtree(tmp_path / "ckpt" / "16")
  out = _run_example([*common, "--logdir", str(tmp_path / "logs_b")], cache)
  assert "resumed from step 9" in out and "done: 16 of 16 steps, started at 9" in out
  step, resumed = _restore_latest(tmp_path / "ckpt")
  assert step == 16
  # parameters, optimizer state and metrics of the two final checkpoints bit-identical
  assert jax.tree_util.tree_structure(resumed) == jax.tree_util.tree_structure(straight)
  for x, y in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(straight),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  m_a, m_b = clipax.metrics(straight["optimizer"]), clipax.metrics(resumed["optimizer"])
  assert m_a.keys() == m_b.keys() and "clip/clip/leaf_norm/hidden/kernel" in m_a
  for key in m_a:
    np.testing.assert_array_equal(np.asarray(m_b[key]), np.asarray(m_a[key]), err_msg=key)
  # TensorBoard: the first process logged every optimizer update (at the 0-based micro-steps
  # 1, 3, ..., 15), the resumed one those from step 9 on, with the same values, all finite
  logs_a, logs_b = _read_events(tmp_path / "logs_a"), _read_events(tmp_path / "logs_b")
  assert set(logs_a) == set(logs_b) and "clip/clip/leaf_norm/out/kernel" in logs_a
  for tag, points in logs_a.items():
    assert [s for s, _ in points] == list(range(1, 16, 2)), tag
    assert all(np.isfinite(v) for _, v in points), tag
    assert logs_b[tag] == [(s, v) for s, v in points if s >= 9], tag
