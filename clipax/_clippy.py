"""Clippy (Tang et al. 2023): update clipping relative to the parameter, built on the update
clipping wrapper of :mod:`clipax._update_clip` (same state, :class:`UpdateClipState`, and the
same non-finite and overflow policy)."""

from __future__ import annotations

import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from clipax import _checks
from clipax._update_clip import _F32, _acc, _wrap


def clippy(
    inner: optax.GradientTransformation,
    *,
    relative: ArrayLike = 0.5,
    absolute: ArrayLike = 1e-2,
    name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Clippy: each tensor's update scaled so that no element moves its parameter too far.

  With :math:`u` the inner optimizer's update (what it is about to add, learning rate
  included) and :math:`w` the parameter, per tensor:

  .. math::
    \sigma = \min\Big(1,\; \min_{i:\,u_i \ne 0}
      \frac{\lambda_{rel}\,|w_i| + \lambda_{abs}}{|u_i|}\Big),\qquad u \leftarrow \sigma u

  so that :math:`|\sigma u_i| \le \lambda_{rel}|w_i| + \lambda_{abs}` for every element: an
  L-infinity rule on the update, relative to the parameter with an absolute floor, and
  learning-rate aware (the bound is on the step, so a larger learning rate clips sooner).
  ``clippy(optax.adagrad(lr))`` is the reference's ``ClippyAdagrad`` with
  ``use_standard_accumulator_update=True``; its default (the accumulator read before adding the
  current gradient) is the same rule around an Adagrad that updates its accumulator after the
  step. The reference's ``accumulator_relative_threshold`` (0 by default) and
  ``clip_accumulator_update`` reach into Adagrad's accumulator and are not offered by this
  wrapper. Skipped steps (non-finite, overflowing or invalid): as :func:`clip_update_rms`.

  Args:
    inner: any optax optimizer.
    relative: :math:`\lambda_{rel}` >= 0 (finite).
    absolute: :math:`\lambda_{abs}` >= 0 (finite); with 0, a zero weight's update clips the
      whole tensor to zero.
    name: the name of its keys in :func:`clipax.metrics`; default: its ``named_chain`` key,
      else ``clippy``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (an optimizer, its ``update`` needs
    ``params``) whose state is a :class:`clipax.UpdateClipState`; ``ratio`` is the largest
    :math:`\max_i |u_i| / (\lambda_{rel}|w_i| + \lambda_{abs})` (``max_ratio`` 1).

  Raises:
    TypeError: if ``inner`` is not an optax transformation, for a non-floating leaf (at
      ``init``: a non-numeric parameter leaf).
    ValueError: for an out-of-range number; at ``update`` without ``params`` or with params
      whose structure or shapes differ from the gradients'.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import clipax
    >>> tx = clipax.clippy(optax.sgd(1.0), relative=0.1, absolute=0.01)
    >>> params = {"w": jnp.array([1.0, 10.0])}
    >>> out, state = tx.update({"w": jnp.array([1.0, 0.5])}, tx.init(params), params)
    >>> print([round(x, 4) for x in out["w"].tolist()], f"{float(state.scale):.2f}")
    [-0.11, -0.055] 0.11

  References:
    Tang, Drori, Chang, Sathiamoorthy, Gilmer, Wei, Yi, Hong, Chi, "Improving Training Stability
    for Multitask Ranking Models in Recommender Systems", KDD 2023,
    https://arxiv.org/abs/2302.09178, Algorithm 1 (reference code: tensorflow/recommenders,
    ``tensorflow_recommenders/experimental/optimizers/clippy_adagrad.py``,
    ``shrink_by_references``). Defaults: 0.5 and 1e-2, the paper's recommender-model values
    as used by the PyTorch port; the TFRS defaults are 0.1 and 1e-7.
  """
  fn = "clippy"
  _checks.transformation("inner", inner)
  _checks.number("relative", relative, low=0.0)
  _checks.number("absolute", absolute, low=0.0)

  def invalid():
    return _checks.any_of(_checks.invalid(relative, low=0.0), _checks.invalid(absolute, low=0.0))

  def rule(grads, u_flat, new_inner, p_flat, treedef):
    out = []
    for u, w in zip(u_flat, p_flat, strict=True):
      if jnp.size(u) == 0:
        out.append((jnp.ones([], _F32), jnp.zeros([], _F32)))
        continue
      acc = _acc(u, w)
      au = jnp.abs(u.astype(acc))
      limit = (jnp.asarray(relative, acc) * jnp.abs(jnp.asarray(w).astype(acc))
               + jnp.asarray(absolute, acc))
      inf = jnp.asarray(jnp.inf, acc)
      sigma = jnp.min(jnp.where(au == 0, inf, limit / jnp.where(au == 0, jnp.ones([], acc), au)))
      one = jnp.ones([], acc)
      out.append((jnp.minimum(one, sigma), one / sigma))
    return out

  return _wrap("clippy", fn, inner, rule, invalid, 1.0, True, lambda state: None, name)
