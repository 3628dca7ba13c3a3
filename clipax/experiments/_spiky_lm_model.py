"""The spiky-LM experiment's corpus and model (see :mod:`clipax.experiments.spiky_lm`).

The seeded Markov source and its batches (bad ones included), the Flax NNX transformer, and the two
jitted pieces of a training step: the forward and backward pass (:func:`_grads`, shared by every
arm) and the optax update of one arm (:func:`_updater`). Every public name here is re-exported by
:mod:`clipax.experiments.spiky_lm`, whose :class:`~clipax.experiments.spiky_lm.Config` they take.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import clipax

if TYPE_CHECKING:
  from clipax.experiments.spiky_lm import Config


# --- the synthetic corpus ----------------------------------------------------------------------


def markov_source(config: Config, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
  """A seeded Markov source of order ``config.order`` over ``config.vocab`` tokens.

  Returns:
    ``(transitions, stationary, floor)``: ``transitions[c1, ..., ck]`` is the next-token
    distribution after the context ``(c1, ..., ck)`` (a sparse Dirichlet draw), ``stationary``
    the stationary distribution over contexts (power iteration) and ``floor`` the entropy rate in
    nats per token: the lowest expected cross-entropy any model can reach on this source.
  """
  rng = np.random.default_rng([seed, 1])
  shape = (config.vocab,) * config.order
  transitions = rng.dirichlet(np.full(config.vocab, config.concentration), size=shape)
  transitions = transitions + 1e-6  # every transition possible: the source is ergodic
  transitions /= transitions.sum(axis=-1, keepdims=True)
  stationary = np.full(shape, 1.0 / config.vocab**config.order)
  for _ in range(5000):
    # p(c2, ..., ck, x) = sum_c1 p(c1, ..., ck) P(x | c1, ..., ck)
    new = np.sum(stationary[..., None] * transitions, axis=0)
    done = np.max(np.abs(new - stationary)) < 1e-13
    stationary = new
    if done:
      break
  entropy = -np.sum(transitions * np.log(transitions), axis=-1)
  floor = float(np.sum(stationary * entropy))
  return transitions, stationary, floor


def sample(
    transitions: np.ndarray, stationary: np.ndarray, n: int, length: int,
    rng: np.random.Generator,
) -> np.ndarray:
  """``n`` sequences of ``length`` tokens, each starting from a stationary context."""
  order = transitions.ndim - 1
  vocab = transitions.shape[-1]
  flat = stationary.ravel()
  start = rng.choice(flat.size, size=n, p=flat / flat.sum())
  out = np.empty((n, length), np.int32)
  out[:, :order] = np.stack(np.unravel_index(start, stationary.shape), axis=-1)
  cdf = np.cumsum(transitions.reshape(-1, vocab), axis=-1)
  strides = vocab ** np.arange(order - 1, -1, -1)
  for t in range(order, length):
    context = out[:, t - order : t] @ strides
    u = rng.random(n)[:, None]
    out[:, t] = np.minimum(np.sum(cdf[context] < u, axis=-1), vocab - 1)
  return out


def make_batches(config: Config, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
  """Every training batch of one seed: ``(tokens [steps, batch, seq_len + 1], loss_scale
  [steps], is_bad [steps], floor)``. Bad batches are uniform random tokens with their loss scaled
  by ``bad_scale``, at steps ``bad_every``, ``2 * bad_every``, ..."""
  transitions, stationary, floor = markov_source(config, seed)
  rng = np.random.default_rng([seed, 2])
  n = config.steps * config.batch_size
  tokens = sample(transitions, stationary, n, config.seq_len + 1, rng)
  tokens = tokens.reshape(config.steps, config.batch_size, config.seq_len + 1)
  steps = np.arange(config.steps)
  is_bad = (steps > 0) & (steps % config.bad_every == 0)
  tokens[is_bad] = rng.integers(0, config.vocab, size=tokens[is_bad].shape, dtype=np.int32)
  scale = np.where(is_bad, config.bad_scale, 1.0).astype(np.float32)
  return tokens, scale, is_bad, floor


# --- the model -----------------------------------------------------------------------------------


class Block(nnx.Module):
  """A pre-LayerNorm transformer block: causal self-attention, then a GELU MLP."""

  def __init__(self, config: Config, rngs: nnx.Rngs):
    d = config.d_model
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
        num_heads=config.n_heads, in_features=d, decode=False, rngs=rngs
    )
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, config.mlp_ratio * d, rngs=rngs)
    self.down = nnx.Linear(config.mlp_ratio * d, d, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x), mask=mask)
    return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class Transformer(nnx.Module):
  """The decoder-only language model: token and learned position embeddings, ``n_layers``
  blocks, a final LayerNorm and an untied output layer."""

  def __init__(self, config: Config, rngs: nnx.Rngs):
    d = config.d_model
    self.embed = nnx.Embed(config.vocab, d, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (config.seq_len, d)))
    self.blocks = nnx.List([Block(config, rngs) for _ in range(config.n_layers)])
    self.ln = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, config.vocab, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.pos[...][: tokens.shape[-1]]
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.ln(x))


def make_model(config: Config, seed: int) -> Transformer:
  """A freshly initialised :class:`Transformer` (``nnx.Rngs(seed)``)."""
  return Transformer(config, nnx.Rngs(seed))


def count_params(model: nnx.Module) -> int:
  """The number of trainable parameters."""
  return int(sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))))


@functools.partial(jax.jit, static_argnames=("graphdef", "order"))
def _grads(params, rest, tokens: jax.Array, scale: jax.Array, *, graphdef, order: int):
  """The mean next-token cross-entropy (predicting tokens ``order`` onwards, whose whole context
  is in the sequence) and the gradients of ``scale`` times it, for the model
  ``nnx.merge(graphdef, params, rest)``. Compiled once for every arm and seed of a config."""
  inputs, targets = tokens[:, :-1], tokens[:, 1:]

  def loss_fn(params):
    logits = nnx.merge(graphdef, params, rest)(inputs)[:, order - 1 :]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets[:, order - 1 :])
    ce = jnp.mean(ce)
    return ce * scale, ce

  (_, ce), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return ce, grads, clipax.global_norm(grads)


def _updater(tx: optax.GradientTransformation):
  """The jitted optimizer step of one arm: ``(params, opt_state, grads) -> (params, opt_state,
  clipax metrics of the new state)``, what ``nnx.Optimizer.update`` computes."""

  @jax.jit
  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, clipax.metrics(opt_state)

  return update
