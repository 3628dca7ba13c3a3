"""Bad batches in a real training run: the defaults of ``skip_spikes`` and ``zclip`` absorb them.

The scenario of the issue: a small Flax CNN learns a 10-class problem with AdamW, and two bad
batches arrive at steps 60 and 180: their inputs are multiplied by 200 and their labels shuffled,
so their gradient norm is ~1000x the usual one and points nowhere useful. Measured before the fix,
``skip_spikes(adamw)`` with its defaults let both through (its warm-up was the whole 128-step
window, so the step-60 norm entered the history, and its mean + 6 std band then let the step-180
one through as well) and ended at 0.84 test accuracy, against 0.94 with
``clip_by_global_norm(1.0)``.

Here the problem is synthetic (numpy, fixed seed): 8x8 single-channel images, one random template
per class plus Gaussian noise, 250 steps of 32 images, 4000 test images. Every arm is AdamW at the
same learning rate from the same initial weights on the same batches, each a ``lax.scan`` over all
steps, all arms in one compiled program:

* ``reference``: ``chain(clip_by_global_norm(1.0), adamw)``; ordinary norms are ~1.5-2 here, so
  it clips about three steps in four;
* ``skip_spikes``: ``skip_spikes(adamw)``, defaults;
* ``zclip``: ``chain(zclip(), adamw)``, defaults; its ``max_norm=1.0`` cap then does what the
  reference does on most steps, so
* ``zclip_no_cap``: ``chain(zclip(max_norm=None), adamw)`` checks the learned threshold alone;
* ``no_clipping``: plain AdamW, which shows that the bad batches do real damage;
* ``skip_spikes_old_warmup``: ``skip_spikes(adamw, warmup=128)``, the old warm-up, which lets the
  step-60 batch through (the step-180 one is caught now: the band is median + MAD, which one
  huge norm cannot widen) and ends clearly below the reference.

The defaults must end within one accuracy point of the reference, and the per-step states must
show why: both bad steps skipped, or both clipped with ZClip's statistics left as they were.

Seed 0 passes with at least a point to spare (skip_spikes +0.4, zclip +0.0, zclip_no_cap +0.6
against the reference's 0.974). Of seeds 0-15, 15 pass; on seed 7 skip_spikes and zclip_no_cap
end 1.4 points below the reference, but so does plain AdamW trained without any bad batch (0.954
against 0.967): there clipping most ordinary steps is simply the better optimizer. Over those
seeds no clipping costs 10-20 points and the old warm-up 1.9-5.3.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _compile import OPTIMIZED

import clipax

SIZE, CLASSES, NOISE = 8, 10, 1.75
STEPS, BATCH, TEST = 250, 32, 4000
BAD_STEPS = (60, 180)
BAD = list(BAD_STEPS)  # for indexing
BAD_INPUT_SCALE = 200.0
LR = 3e-3
SEED = 0

ARMS = {
    "reference": lambda: optax.chain(clipax.clip_by_global_norm(1.0), optax.adamw(LR)),
    "skip_spikes": lambda: clipax.skip_spikes(optax.adamw(LR)),
    "zclip": lambda: optax.chain(clipax.zclip(), optax.adamw(LR)),
    "zclip_no_cap": lambda: optax.chain(clipax.zclip(max_norm=None), optax.adamw(LR)),
    "no_clipping": lambda: optax.adamw(LR),
    "skip_spikes_old_warmup": lambda: clipax.skip_spikes(optax.adamw(LR), warmup=128),
}


class CNN(nn.Module):
  """Two 3x3 convolutions (the second with stride 2) and a linear read-out."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
    return nn.Dense(CLASSES)(x.reshape(x.shape[0], -1))


MODEL = CNN()


@functools.cache
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """``(xs [STEPS, BATCH, 8, 8, 1], ys [STEPS, BATCH], x_test, y_test)``, bad batches included."""
  rng = np.random.default_rng(SEED)
  templates = rng.standard_normal((CLASSES, SIZE, SIZE))

  def sample(n):
    y = rng.integers(0, CLASSES, n)
    x = templates[y] + NOISE * rng.standard_normal((n, SIZE, SIZE))
    return x[..., None].astype(np.float32), y.astype(np.int32)

  xs, ys = sample(STEPS * BATCH)
  xs, ys = xs.reshape(STEPS, BATCH, SIZE, SIZE, 1), ys.reshape(STEPS, BATCH)
  x_test, y_test = sample(TEST)
  for step in BAD_STEPS:
    xs[step] *= BAD_INPUT_SCALE
    ys[step] = rng.permutation(ys[step])
  return xs, ys, x_test, y_test


def loss_fn(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(MODEL.apply(params, x), y).mean()


@functools.cache
def initial_params():
  """LeCun-normal kernels and zero biases drawn with numpy: ``MODEL.init`` would compile the
  threefry PRNG, which takes about as long on the CPU as compiling and running every arm."""
  shapes = jax.eval_shape(MODEL.init, jax.random.key(SEED), jnp.zeros((1, SIZE, SIZE, 1)))
  rng = np.random.default_rng(SEED + 1)

  def draw(path, leaf):
    if path[-1].key != "kernel":
      return np.zeros(leaf.shape, np.float32)
    fan_in = np.prod(leaf.shape[:-1])
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def train(tx, params, xs, ys, x_test, y_test):
  """Test accuracy after training on ``xs, ys``, the per-step gradient norms, the per-step
  ``clipax.metrics`` of the optimizer state, and ZClip's statistics (empty for other arms)."""

  def step(carry, batch):
    params, state = carry
    grads = jax.grad(loss_fn)(params, *batch)
    updates, state = tx.update(grads, state, params)
    stats = {}
    if isinstance(state, tuple) and isinstance(state[0], clipax.ZClipState):
      stats = {"mu": state[0].mu, "var": state[0].var}
    out = (clipax.global_norm(grads), clipax.metrics(state), stats)
    return (optax.apply_updates(params, updates), state), out

  (params, _), per_step = jax.lax.scan(step, (params, tx.init(params)), (xs, ys))
  accuracy = jnp.mean(jnp.argmax(MODEL.apply(params, x_test), axis=-1) == y_test)
  return accuracy, per_step


class Run(NamedTuple):
  accuracy: float
  norms: np.ndarray  # [STEPS] global norm of the raw gradients
  metrics: dict[str, np.ndarray]  # the outermost clipax state's metrics per step, by name
  stats: dict[str, np.ndarray]  # ZClip's mu and var per step (zclip arms only)


@functools.cache
def runs() -> dict[str, Run]:
  """Every arm, trained in one compiled program: one compilation of all arms takes about half
  the time of one compilation per arm."""
  txs = {arm: make() for arm, make in ARMS.items()}
  train_all = jax.jit(lambda *args: {arm: train(tx, *args) for arm, tx in txs.items()},
                      compiler_options=OPTIMIZED)
  out = train_all(initial_params(), *data())
  def outer(d):  # "clip/<outermost name>/<metric>" -> "<metric>"
    name = next(iter(d)).split("/")[1] if d else None
    return {k.split("/", 2)[2]: np.asarray(v) for k, v in d.items()
            if k.startswith(f"clip/{name}/")}

  as_np = lambda d: {k: np.asarray(v) for k, v in d.items()}
  return {
      arm: Run(float(acc), np.asarray(norms), outer(metrics), as_np(stats))
      for arm, (acc, (norms, metrics, stats)) in out.items()
  }


def check_the_scenario(results: dict[str, Run]) -> None:
  """The bad batches are spikes, the reference learns, and without clipping they cost accuracy:
  the comparison can fail."""
  ref = results["reference"]
  good = np.delete(ref.norms, BAD_STEPS)
  assert np.all(ref.norms[BAD] > 100 * np.median(good)), ref.norms[BAD]
  assert ref.metrics["clipped"][BAD].all()
  assert ref.accuracy >= 0.9  # high enough for a one-point comparison to mean something
  assert results["no_clipping"].accuracy <= ref.accuracy - 0.03


def check_skip_spikes(results: dict[str, Run]) -> None:
  arm = results["skip_spikes"]
  skipped = np.flatnonzero(arm.metrics["skipped"])
  assert set(BAD_STEPS) <= set(skipped), skipped
  # Ordinary norms have a heavy right tail (median ~2, MAD ~0.1 early on), so a few ordinary
  # steps at twice the median are over the band and skipped too (here steps 34 and 44, norms 3.9
  # and 4.2 against a band of 3.0 and 3.5), which costs nothing. Many more would mean the guard
  # stalls training.
  assert len(skipped) <= len(BAD_STEPS) + 5, skipped
  assert int(arm.metrics["spike_count"][-1]) == len(skipped)  # no NaN or invalid step
  assert int(arm.metrics["skipped_count"][-1]) == len(skipped)
  # The band was in force (finite) at both bad steps and far below their norms.
  threshold = arm.metrics["threshold"][BAD]
  assert np.all(np.isfinite(threshold)) and np.all(threshold < arm.norms[BAD] / 100), threshold
  assert arm.accuracy >= results["reference"].accuracy - 0.01


def zclip_absorbed_the_bad_batches(arm: Run) -> None:
  """Both bad norms are z-score spikes against the statistics before them, both were clipped to
  below the z-score boundary, and the EMAs saw the clipped norm, not the bad one: the mean and
  the variance hardly move at the bad steps."""
  before = [s - 1 for s in BAD_STEPS]
  mu, var = arm.stats["mu"], arm.stats["var"]
  sigma = np.sqrt(var[before])
  z = (arm.norms[BAD] - mu[before]) / (sigma + 1e-6)
  assert np.all(z > 2.5), z
  assert arm.metrics["clipped"][BAD].all()
  clipped_norm = arm.metrics["scale"][BAD] * arm.norms[BAD]
  assert np.all(clipped_norm <= mu[before] + 2.5 * sigma), (clipped_norm, mu[before], sigma)
  assert np.all(mu[BAD] <= 1.05 * mu[before]), (mu[before], mu[BAD])
  assert np.all(var[BAD] <= 1.05 * var[before]), (var[before], var[BAD])


def check_zclip(results: dict[str, Run]) -> None:
  arm = results["zclip"]
  zclip_absorbed_the_bad_batches(arm)
  assert np.all(arm.metrics["scale"][BAD] * arm.norms[BAD] <= 1.0 + 1e-5)  # max_norm
  assert arm.accuracy >= results["reference"].accuracy - 0.01


def check_zclip_learned_threshold_alone(results: dict[str, Run]) -> None:
  arm = results["zclip_no_cap"]
  zclip_absorbed_the_bad_batches(arm)
  # Without the cap zclip clips only the spikes, not most steps as the reference does.
  assert arm.metrics["clipped"].sum() < 0.1 * STEPS, np.flatnonzero(arm.metrics["clipped"])
  assert arm.accuracy >= results["reference"].accuracy - 0.01


def check_the_old_warmup_is_worse(results: dict[str, Run]) -> None:
  # Before the fix the warm-up was the whole window (128 steps): the step-60 batch went through,
  # and that one full-size bad AdamW step costs more than a point of accuracy.
  arm = results["skip_spikes_old_warmup"]
  assert not arm.metrics["skipped"][BAD_STEPS[0]]
  assert arm.metrics["skipped"][BAD_STEPS[1]]
  assert arm.accuracy < results["reference"].accuracy - 0.01


def test_defaults_absorb_two_bad_batches_as_well_as_clip_by_global_norm():
  # One test, not one per check: pytest-xdist would train every arm again in each worker.
  results = runs()
  checks = [
      check_the_scenario,
      check_skip_spikes,
      check_zclip,
      check_zclip_learned_threshold_alone,
      check_the_old_warmup_is_worse,
  ]
  failed = []
  for check in checks:
    try:
      check(results)
    except AssertionError as err:
      failed.append(f"{check.__name__}: {err}")
  if failed:
    accuracies = ", ".join(f"{arm} {run.accuracy:.4f}" for arm, run in results.items())
    pytest.fail("\n".join([f"test accuracy: {accuracies}", *failed]))
