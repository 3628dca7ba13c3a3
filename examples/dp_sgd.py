"""DP-SGD with clipax: per-example clipping plus Gaussian noise, in a plain JAX training loop.

Each example's gradient is clipped to ``--max-norm`` C (``clipax.per_example_clipped_grad``,
microbatched so that only ``--microbatch-size`` per-example gradients are ever held at once),
the clipped gradients are summed, Gaussian noise of standard deviation ``--noise-multiplier``
x C is added to the sum (``optax.add_noise``), and the noisy sum is divided by the batch size
before the optimizer (Abadi et al., 2016). ``clipax.clip_per_example`` heads the chain only to
record the per-example counts (``per_example_info=``) for ``clipax.metrics``.

This script does no privacy accounting: the (epsilon, delta) these settings give depends on the
sampling and the number of steps and must be computed with an accountant (for example
``dp_accounting``); fixed-size shuffled batches, as here, are not the Poisson sampling most
accountants assume.

    python examples/dp_sgd.py                 # 300 steps
    python examples/dp_sgd.py --quick         # a few seconds (what the tests run)
    python examples/dp_sgd.py --microbatch-size 0   # every per-example gradient at once
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import clipax

IN, HIDDEN, CLASSES = 10, 32, 3


def make_data(n: int, seed: int = 0):
  """Synthetic classification: three Gaussian blobs, plus a few outliers (inputs x50) whose
  gradients per-example clipping keeps from dominating a batch."""
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(CLASSES, IN)) * 0.6
  y = rng.integers(0, CLASSES, size=n)
  x = centers[y] + rng.normal(size=(n, IN))
  outliers = rng.random(n) < 0.02
  x[outliers] *= 50.0
  return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)


def init_params(key):
  k1, k2 = jax.random.split(key)
  return {
      "w1": jax.random.normal(k1, (IN, HIDDEN)) / np.sqrt(IN), "b1": jnp.zeros(HIDDEN),
      "w2": jax.random.normal(k2, (HIDDEN, CLASSES)) / np.sqrt(HIDDEN), "b2": jnp.zeros(CLASSES),
  }


def logits(params, x):
  return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def example_loss(params, x, y):
  """The loss of one example (no batch axis): what per-example clipping differentiates."""
  return optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y)


def make_optimizer(args) -> optax.GradientTransformationExtraArgs:
  std = args.noise_multiplier * args.max_norm  # the noise is calibrated to the sum's sensitivity
  return optax.chain(
      clipax.clip_per_example(args.max_norm, name="dp"),  # records the per-example counts
      optax.add_noise(eta=std**2, gamma=0.0, key=args.seed),  # N(0, std^2) on the clipped sum
      optax.scale(1.0 / args.batch_size),  # the noisy sum -> the noisy mean
      optax.sgd(args.learning_rate, momentum=0.9),
  )


def train(args) -> dict[str, float]:
  x, y = make_data(args.examples, args.seed)
  params = init_params(jax.random.key(args.seed))
  tx = make_optimizer(args)
  opt_state = tx.init(params)
  clipped_grad = clipax.per_example_clipped_grad(
      example_loss, args.max_norm, microbatch_size=args.microbatch_size or None)

  @jax.jit
  def step(params, opt_state, xb, yb):
    grads, info = clipped_grad(params, xb, yb)  # the sum of the clipped per-example gradients
    updates, opt_state = tx.update(grads, opt_state, params, per_example_info=info)
    return optax.apply_updates(params, updates), opt_state, info.loss

  rng = np.random.default_rng(args.seed)
  for i in range(args.steps):
    idx = rng.choice(args.examples, size=args.batch_size, replace=False)
    params, opt_state, loss = step(params, opt_state, x[idx], y[idx])
    if i % args.log_every == 0 or i == args.steps - 1:
      m = clipax.metrics(opt_state)
      print(f"step {i:4d} loss {float(loss):.4f} "
            f"clipped {float(m['clip/dp/clipped_fraction']):.2f} "
            f"mean example norm {float(m['clip/dp/norm']):.3f}", flush=True)
  accuracy = float(jnp.mean(jnp.argmax(logits(params, x), -1) == y))
  m = clipax.metrics(opt_state)
  print(f"final accuracy {accuracy:.3f} (chance {1 / CLASSES:.3f}); "
        f"clip rate {float(m['clip/dp/clip_rate']):.3f} over "
        f"{int(m['clip/dp/example_count'])} examples; "
        f"noise std {args.noise_multiplier * args.max_norm:.3f} on each sum of "
        f"{args.batch_size}", flush=True)
  return {"accuracy": accuracy, "clip_rate": float(m["clip/dp/clip_rate"])}


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--examples", type=int, default=2048)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--microbatch-size", type=int, default=16,
                 help="per-example gradients held at once (0: the whole batch)")
  p.add_argument("--max-norm", type=float, default=1.0)
  p.add_argument("--noise-multiplier", type=float, default=1.0)
  p.add_argument("--learning-rate", type=float, default=0.5)
  p.add_argument("--log-every", type=int, default=50)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quick", action="store_true", help="a small run of a few seconds")
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.examples, args.batch_size, args.log_every = 60, 512, 64, 20
    args.microbatch_size = min(args.microbatch_size, 16)
  return args


if __name__ == "__main__":
  train(parse())
