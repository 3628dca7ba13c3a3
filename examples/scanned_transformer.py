"""A scanned transformer (Flax NNX) clipped per layer with clipax's ``layer_axis``.

The blocks are created once per layer with ``nnx.vmap`` (so every parameter of the block is one
leaf stacked along a leading layer axis, as ``nnx.scan``, linen's ``nn.scan``, MaxText and
Levanter keep them) and run with ``nnx.scan``. ``clipax.adagc(layer_axis=...)`` then keeps one
EMA per *layer* and clips each layer by its own, and ``clipax.metrics`` reports each layer's
norm under ``.../leaf_norm/blocks/<param>/<i>``. Without ``layer_axis`` the L layers of a
stacked leaf would be clipped as one.

    python examples/scanned_transformer.py              # 300 steps
    python examples/scanned_transformer.py --quick      # a few seconds (what the tests run)
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import clipax

VOCAB, DIM, HEADS, SEQ = 16, 32, 4, 12


class Block(nnx.Module):
  """Pre-norm attention and MLP, one layer."""

  def __init__(self, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(DIM, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(HEADS, DIM, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(DIM, rngs=rngs)
    self.up = nnx.Linear(DIM, 4 * DIM, rngs=rngs)
    self.down = nnx.Linear(4 * DIM, DIM, rngs=rngs)

  def __call__(self, x, mask):
    h = self.norm1(x)
    x = x + self.attn(h, h, h, mask=mask)
    return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class Transformer(nnx.Module):
  def __init__(self, layers: int, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (SEQ, DIM)))

    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def blocks(rngs):
      return Block(rngs)

    self.blocks = blocks(rngs)  # every parameter: shape (layers, ...)
    self.norm = nnx.LayerNorm(DIM, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos[...][: tokens.shape[1]]
    mask = nnx.make_causal_mask(tokens)

    @nnx.scan(in_axes=(0, nnx.Carry, None), out_axes=nnx.Carry)
    def run(block, h, mask):
      return block(h, mask)

    x = run(self.blocks, x, mask)
    return self.embed.attend(self.norm(x))


def in_blocks(path, leaf) -> int | None:
  """The ``layer_axis`` of a parameter: 0 inside the scanned blocks, ``None`` elsewhere."""
  del leaf
  return 0 if any(getattr(k, "key", None) == "blocks" for k in path) else None


def batch(step: int, size: int = 16):
  """Sequences that count up by a per-sequence stride (mod VOCAB): predict the next token.
  Batch 40 is corrupted (random tokens, a loss spike) so the clipper has something to do."""
  rng = np.random.default_rng(step)
  start = rng.integers(0, VOCAB, (size, 1))
  stride = rng.integers(1, 4, (size, 1))
  seq = (start + stride * np.arange(SEQ + 1)) % VOCAB
  if step == 40:
    seq = rng.integers(0, VOCAB, seq.shape)
  return jnp.asarray(seq[:, :-1]), jnp.asarray(seq[:, 1:])


def make(layers: int, learning_rate: float):
  model = Transformer(layers, nnx.Rngs(0))
  tx = optax.chain(
      clipax.adagc(warmup_steps=10, warmup_max_norm=5.0, layer_axis=in_blocks,
                   leaf_metrics=True, name="adagc"),
      optax.adamw(learning_rate, weight_decay=1e-4),
  )
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def train_step(model, optimizer, tokens, targets):
  def loss_fn(model):
    logits = model(tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss, clipax.metrics(optimizer.opt_state)


def layer_norms(metrics: dict, param: str) -> list[float]:
  """The per-layer pre-clip norms of one stacked parameter, layer 0 first."""
  prefix = f"clip/adagc/leaf_norm/blocks/{param}/"
  keys = sorted((k for k in metrics if k.startswith(prefix)), key=lambda k: int(k.rsplit("/")[-1]))
  return [float(metrics[k]) for k in keys]


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--learning-rate", type=float, default=3e-3)
  p.add_argument("--quick", action="store_true", help="a small run of a few seconds")
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.layers = 60, 3
  model, optimizer = make(args.layers, args.learning_rate)
  losses = []
  for step in range(args.steps):
    loss, metrics = train_step(model, optimizer, *batch(step))
    losses.append(float(loss))
    if step % 20 == 0 or step == args.steps - 1:
      norms = " ".join(f"{n:.3f}" for n in layer_norms(metrics, "up/kernel"))
      print(f"step {step:4d} loss {loss:.3f} clip rate {float(metrics['clip/adagc/clip_rate']):.2f}"
            f" per-layer norm of up/kernel: {norms}")
  gamma = optimizer.opt_state[0].gamma["blocks"]["up"]["kernel"]
  print(f"final loss {np.mean(losses[-5:]):.3f} (first {np.mean(losses[:5]):.3f}); "
        f"{len(gamma)} layers, per-layer EMA of up/kernel's norm: "
        + " ".join(f"{float(g):.3f}" for g in gamma[...]))


if __name__ == "__main__":
  main()
