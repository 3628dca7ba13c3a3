"""A Flax NNX training script with clipax, the way a user would write one.

NNX model, ``clipax.clip_by_global_norm`` + AdamW with a warm-up/cosine schedule, gradient
accumulation with ``optax.MultiSteps``, ``clipax.metrics`` (per-layer norms included) logged to
TensorBoard with tensorboardX, orbax checkpoints every few steps, and resume from the latest
checkpoint when the script is run again with the same ``--ckpt-dir``.

    python examples/flax_nnx_train.py --steps 200 --logdir runs/demo --ckpt-dir /tmp/ckpt
    python examples/flax_nnx_train.py --small   # a few seconds (what the tests run)
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

import clipax

IN, HIDDEN, OUT = 16, 32, 4
ACCUMULATE = 2  # micro-batches per optimizer update (optax.MultiSteps)


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(IN, HIDDEN, rngs=rngs)
    self.out = nnx.Linear(HIDDEN, OUT, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def batch(step: int, size: int = 32):
  """Synthetic classification data, the same for a given step (so a resumed run sees the same
  batches); every 50th batch is corrupted (inputs x100) to give the clipper something to do."""
  rng = np.random.default_rng(step)
  x = rng.standard_normal((size, IN)).astype(np.float32)
  y = (x[:, :OUT] + 0.1 * rng.standard_normal((size, OUT))).argmax(-1)
  if step % 50 == 49:
    x *= 100.0
  return jnp.asarray(x), jnp.asarray(y)


def make(steps: int):
  """The model and its optimizer, freshly initialised."""
  model = MLP(nnx.Rngs(0))
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, max(1, steps // 10), steps)
  tx = optax.chain(
      clipax.clip_by_global_norm(1.0, name="clip", leaf_metrics=True),
      optax.adamw(schedule, weight_decay=1e-4),
  )
  optimizer = nnx.Optimizer(model, optax.MultiSteps(tx, every_k_schedule=ACCUMULATE),
                            wrt=nnx.Param)
  return model, optimizer


@nnx.jit
def train_step(model, optimizer, x, y):
  def loss_fn(m):
    return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss, clipax.metrics(optimizer.opt_state)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=400, help="micro-steps to train in total")
  parser.add_argument("--logdir", default="runs/flax_nnx_train", help="TensorBoard directory")
  parser.add_argument("--ckpt-dir", default="/tmp/clipax_flax_nnx_ckpt", help="orbax directory")
  parser.add_argument("--every", type=int, default=50, help="checkpoint every this many steps")
  parser.add_argument("--small", action="store_true", help="a few seconds (CI)")
  parser.add_argument("--stop-after", type=int, default=None,
                      help="stop after this many steps of this run (as if killed)")
  args = parser.parse_args(argv)
  if args.small:
    args.steps, args.every = min(args.steps, 24), min(args.every, 10)

  # built under jit: one compiled program instead of one per initialiser op
  model, optimizer = nnx.jit(make, static_argnums=0)(args.steps)
  ckpt_dir = pathlib.Path(args.ckpt_dir).resolve()
  manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2))
  start = 0
  if manager.latest_step() is not None:  # resume: restore into the fresh objects' structure
    start = manager.latest_step()
    target = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    restored = manager.restore(start, args=ocp.args.StandardRestore(abstract))
    nnx.update(model, restored["model"])
    nnx.update(optimizer, restored["optimizer"])
    print(f"resumed from step {start}")

  try:
    from tensorboardX import SummaryWriter
    writer = SummaryWriter(args.logdir)
  except ImportError:  # logging is optional; the metrics are printed either way
    writer = None

  loss, m = None, {}
  stop = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
  for step in range(start, stop):
    loss, m = train_step(model, optimizer, *batch(step))
    if bool(m["clip/updated"]):  # log what the optimizer update did, once per update
      scalars = {k: float(v) for k, v in jax.device_get(m).items()}
      if writer is not None:
        writer.add_scalar("loss", float(loss), step)
        for key, value in scalars.items():
          writer.add_scalar(key, value, step)
      if step % 10 == 9 or step == args.steps - 1:
        print(f"step {step + 1:4d} loss {float(loss):.4f} norm {scalars['clip/clip/norm']:.3f} "
              f"clipped {scalars['clip/clip/clipped_count']:.0f} "
              f"hidden {scalars['clip/clip/leaf_norm/hidden/kernel']:.3f}")
    # every `--every` steps and at the end (a run stopped early, as if killed, does not save)
    if (step + 1) % args.every == 0 or step + 1 == args.steps:
      manager.save(step + 1, args=ocp.args.StandardSave(
          {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}))
  manager.wait_until_finished()
  manager.close()
  if writer is not None:
    writer.close()
  print(f"done: {stop} of {args.steps} steps, started at {start}")
  return {"start": start, "loss": None if loss is None else float(loss),
          "metrics": {k: float(v) for k, v in m.items()},
          "params": jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))}


if __name__ == "__main__":
  main()
