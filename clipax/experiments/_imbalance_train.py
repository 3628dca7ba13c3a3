"""The imbalance experiment's training (see :mod:`clipax.experiments.imbalance`).

The data, the model (an embedding table and a linear layer), the per-sample SGD loop as one
``jax.lax.scan`` vmapped over seeds and arms, and the per-run metrics, with the effective dimension
of the embedding. Every public name here is re-exported by :mod:`clipax.experiments.imbalance`,
whose :class:`~clipax.experiments.imbalance.Config` they take.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import optax

import clipax

if TYPE_CHECKING:
  from clipax.experiments.imbalance import Config

ARMS = ("none", "clip")
"""The two arms: plain SGD, and SGD after ``clip_by_global_norm(max_norm)``."""


def make_data(config: Config, n_rare: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``(tokens, labels)`` for one seed: uniform tokens, label 1 (B) at ``n_rare`` positions.

  Uses ``numpy.random.default_rng(seed)``: tokens first, then the rare positions.
  """
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, config.n_tokens, size=config.n_samples)
  labels = np.zeros(config.n_samples, np.int32)
  labels[rng.choice(config.n_samples, size=n_rare, replace=False)] = 1
  return tokens.astype(np.int32), labels


def init_params(config: Config, key: jax.Array) -> dict[str, jax.Array]:
  """PyTorch-default init: embedding N(0, 1); linear weight and bias U(+-1/sqrt(dim))."""
  k_emb, k_w, k_b = jax.random.split(key, 3)
  bound = 1.0 / float(np.sqrt(config.dim))
  return {
      "embedding": jax.random.normal(k_emb, (config.n_tokens, config.dim), jnp.float32),
      "kernel": jax.random.uniform(
          k_w, (config.dim, config.n_classes), jnp.float32, -bound, bound
      ),
      "bias": jax.random.uniform(k_b, (config.n_classes,), jnp.float32, -bound, bound),
  }


def _loss(params: dict[str, jax.Array], token: jax.Array, label: jax.Array) -> jax.Array:
  logits = params["embedding"][token] @ params["kernel"] + params["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, label)


def _weight_norm(params: dict[str, jax.Array]) -> jax.Array:
  """The global L2 norm of the parameters (small float32 values: a plain sum of squares)."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(p)) for p in jax.tree_util.tree_leaves(params)))


@functools.partial(jax.jit, static_argnames="config")
def _init_all(keys: jax.Array, *, config: Config) -> dict[str, jax.Array]:
  """``init_params`` vmapped over seeds, then over the two arms (same init in both)."""
  params = jax.vmap(functools.partial(init_params, config))(keys)
  return jax.tree_util.tree_map(lambda p: jnp.stack([p] * len(ARMS)), params)


def _epoch(params, opt_state, tokens, labels, max_norm, lr, *, every: int):
  """One pass of per-sample SGD over the data in its fixed order, as one ``lax.scan``."""
  tx = optax.chain(clipax.clip_by_global_norm(max_norm), optax.sgd(lr))

  def step(carry, sample):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(_loss)(params, *sample)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    # The clipper's state holds the pre-clip gradient norm: no second norm computation.
    out = (loss, opt_state[0].norm, _weight_norm(params), params["embedding"])
    return (params, opt_state), out

  (params, opt_state), (losses, grad_norms, weight_norms, embeddings) = jax.lax.scan(
      step, (params, opt_state), (tokens, labels)
  )
  return params, opt_state, losses, grad_norms, weight_norms, embeddings[every - 1 :: every]


@functools.partial(jax.jit, static_argnames="every")
def _epoch_all(params, opt_state, tokens, labels, max_norms, lr, *, every: int):
  """``_epoch`` vmapped over seeds (params, state, data) and then over arms (params, state,
  max_norm). Its shapes do not depend on the scenario, so it compiles once."""
  epoch = functools.partial(_epoch, every=every)
  over_seeds = jax.vmap(epoch, in_axes=(0, 0, 0, 0, None, None))
  return jax.vmap(over_seeds, in_axes=(0, 0, None, None, 0, None))(
      params, opt_state, tokens, labels, max_norms, lr
  )


def _opt_state(params: dict[str, jax.Array]):
  tx = optax.chain(clipax.clip_by_global_norm(1.0), optax.sgd(0.1))
  return jax.vmap(jax.vmap(tx.init))(params)


def _train(config: Config, keys, tokens, labels, max_norms, lr, epochs: int, on_epoch) -> tuple:
  """Every arm and seed of one scenario; arrays shaped ``[arm, seed, ...]`` (numpy)."""
  params = _init_all(keys, config=config)
  opt_state = _opt_state(params)
  every = config.eff_dim_every
  n_seeds = keys.shape[0]
  weight_norms = [np.asarray(jax.vmap(jax.vmap(_weight_norm))(params))[..., None]]
  embeddings = [np.asarray(params["embedding"])[:, :, None]]
  losses, grad_norms = [], []
  for _ in range(epochs):
    params, opt_state, loss, grad_norm, weight_norm, emb = _epoch_all(
        params, opt_state, tokens, labels, max_norms, lr, every=every
    )
    on_epoch()
    losses.append(np.asarray(loss))
    grad_norms.append(np.asarray(grad_norm))
    weight_norms.append(np.asarray(weight_norm))
    embeddings.append(np.asarray(emb))
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  tok = np.asarray(tokens)
  seeds = np.arange(n_seeds)[:, None]
  logits = np.einsum("asnd,asdc->asnc", p["embedding"][:, seeds, tok], p["kernel"])
  preds = np.argmax(logits + p["bias"][:, :, None, :], axis=-1)
  cat = lambda xs: np.concatenate(xs, axis=2)
  return cat(losses), cat(grad_norms), cat(weight_norms), cat(embeddings), preds


def effective_dim(embedding: np.ndarray) -> float:
  """``exp(entropy)`` of the covariance eigenvalues of the embedding rows, normalised to sum 1.

  The covariance is over the tokens (rows) as samples; its non-zero eigenvalues are those of the
  centred Gram matrix, computed here in float64.

  Examples:
    >>> import numpy as np
    >>> print(f"{effective_dim(np.eye(4)):.3f}")  # 4 orthogonal rows, centred: 3 equal directions
    3.000
  """
  e = np.asarray(embedding, np.float64)
  c = e - e.mean(axis=0, keepdims=True)
  eig = np.clip(np.linalg.eigvalsh(c @ c.T / max(e.shape[0] - 1, 1)), 0.0, None)
  total = eig.sum()
  if total <= 0:
    return 0.0
  p = eig[eig > total * 1e-12] / total
  return float(np.exp(-np.sum(p * np.log(p))))


def _metrics(losses, grad_norms, weight_norms, embeddings, preds, labels, epochs) -> dict:
  """The per-run metrics (float64 numpy) of one seed and arm."""
  rare = np.tile(labels, epochs) == 1
  eff = np.array([effective_dim(e) for e in embeddings])
  b = labels == 1
  return {
      "max_weight_change": float(np.max(np.abs(np.diff(weight_norms)))),
      "weight_norm_std": float(np.std(weight_norms)),
      "eff_dim_std": float(np.std(eff)),
      "rare_loss": float(np.mean(losses[rare])) if rare.any() else float("nan"),
      "b_accuracy": float(np.mean(preds[b] == 1)) if b.any() else float("nan"),
      "max_grad_norm": float(np.max(grad_norms)),
  }
