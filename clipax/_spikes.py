"""``skip_spikes``: skip a step whose gradient norm (or loss) is a spike against recent ones.

The rule, shared by the norm and the loss: a robust band ``median + k * 1.4826 * MAD`` over a
ring buffer of recent recorded values; a value above the band is a spike and the step is
skipped (zero update, inner state unchanged); a spike enters the buffer bounded to the band it
broke, NaN/Inf never enter it, and detection starts after ``warmup`` recorded values. See
``docs/ARCHITECTURE.md`` for the rules every guard keeps.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from clipax import _checks
from clipax._adaptive import _known_size, static_int
from clipax._elements import AxisName, Specs
from clipax._guards import (
    DEFAULT_WARMUP,
    _check_inner_and_max_consecutive,
    _flag,
    _invalid_max_consecutive,
    _nonfinite_rule,
    _skip_select,
    guard_metrics,
    robust_band,
)
from clipax._measure import check_leaf_metrics, init_leaf_norms, measure
from clipax._sharding import check_specs
from clipax._state import add_count, named, register_state, stat_dtype

Watch = Literal["norm", "loss", "both"]


@register_state
class SkipState(NamedTuple):
  """State of :func:`clipax.skip_spikes`.

  Attributes:
    count: int32, number of steps seen, skipped ones included (saturates at 2**31 - 1).
    norm: global norm of the last step's gradients, in ``_state.stat_dtype()``.
    skipped: bool, whether the last step was skipped.
    skipped_count: int32, number of skipped steps: non-finite, spike or invalid (saturates).
    nonfinite_count: int32, number of steps whose norm was NaN or Inf (saturates).
    spike_count: int32, number of steps skipped as spikes (saturates).
    consecutive_nonfinite: int32, non-finite steps in a row up to the last one (saturates).
    invalid_count: int32, number of steps skipped because a traced hyperparameter
      (``threshold``, ``warmup``, ``max_consecutive``) was NaN or out of its range (saturates).
    threshold: the band in force at the last step, ``median + k * 1.4826 * MAD`` of the
      history (a norm above it is a spike); ``inf`` while spikes are not detected (warm-up);
      left as it was on an invalid step. In ``_state.stat_dtype()``.
    history: ``[window]`` ring buffer of the last recorded finite norms (accepted norms as
      they were, spikes bounded to the band they broke), in ``_state.stat_dtype()``.
    cursor: int32, the slot the next norm is written to (modulo ``window``).
    accepted: int32, number of norms written to ``history`` (saturates); the number of filled
      slots is ``min(accepted, window)``.
    inner_state: the wrapped optimizer's state. Under ``shard_map``/``pmap`` every field above
      is computed from the all-reduced global norm and is identical on every device;
      ``inner_state`` is laid out as the inner optimizer lays it out (e.g. sharded moments).
    loss, loss_threshold, loss_history, loss_cursor, loss_accepted, loss_spike_count: with
      ``on="loss"`` or ``"both"``, the same rule's fields for the loss (the last loss, its band,
      the ring buffer of recorded finite losses, its write position and fill count, the number
      of steps skipped as loss spikes); ``()`` with ``on="norm"``.
    leaf_norms: with ``leaf_metrics=True``, each leaf's norm; otherwise ``()``.
    tag: uint8, the kind and ``name=`` as UTF-8 (for the dict forms, see :func:`clipax.metrics`).
  """

  count: jax.Array  # type: ignore[assignment]  # a field, shadows tuple.count
  norm: jax.Array
  skipped: jax.Array
  skipped_count: jax.Array
  nonfinite_count: jax.Array
  spike_count: jax.Array
  consecutive_nonfinite: jax.Array
  invalid_count: jax.Array
  threshold: jax.Array
  history: jax.Array
  cursor: jax.Array
  accepted: jax.Array
  inner_state: Any
  loss: Any = ()
  loss_threshold: Any = ()
  loss_history: Any = ()
  loss_cursor: Any = ()
  loss_accepted: Any = ()
  loss_spike_count: Any = ()
  leaf_norms: Any = ()
  tag: Any = ()

  def clipax_metrics(self) -> dict[str, jax.Array]:
    return guard_metrics(self)


def _check_warmup(warmup: Any, window: int | None) -> None:
  """``2 <= warmup <= window`` for a python integer or a concrete array (``window`` known)."""
  if hasattr(warmup, "shape") and hasattr(warmup, "dtype"):
    _checks.scalar_array("warmup", warmup)
  value = static_int("warmup", warmup, low=2)
  if value is not None and window is not None and value > window:
    raise ValueError(
        f"`warmup` must be an integer in [2, window={window}] (the history holds `window` norms), "
        f"got {warmup!r}"
    )


def skip_spikes(
    inner: optax.GradientTransformation,
    *,
    window: int = 128,
    threshold: ArrayLike = 6.0,
    warmup: int | None = None,
    max_consecutive: int | None = None,
    axis_name: AxisName = None,
    specs: Specs = None,
    on: Watch = "norm",
    loss_threshold: ArrayLike | None = None,
    name: str | None = None,
    leaf_metrics: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Skips steps whose gradient norm (or loss) is a spike against the recent ones.

  With :math:`\operatorname{med}_t` and :math:`\operatorname{MAD}_t` the median and the median
  absolute deviation of the last ``window`` recorded norms (the current step excluded),

  .. math::
    \text{skip}_t = \|g_t\| > \operatorname{med}_t + k \cdot 1.4826\,\operatorname{MAD}_t
    \quad\text{or}\quad \|g_t\| \text{ is NaN/Inf}

  (1.4826 MAD is the standard deviation of a normal distribution). A skipped step returns
  all-zero updates and leaves the inner state untouched.

  **Warm-up and robustness.** Spikes are detected once ``warmup`` norms have been accepted
  (16 by default); until then every finite norm is accepted into the history. The band is
  built from the median and the MAD, never the mean and standard deviation, so one huge norm
  that got in during warm-up (or a few, fewer than half the history) moves the band by at most
  one rank: it cannot widen it and let the next spikes through. After warm-up a spike enters
  the history bounded to the band it broke (the shared rule: a statistic absorbs the clipped
  value), so an isolated spike moves the band by at most one rank, while a lasting rise of the
  norm level (a new data mix, the end of a learning-rate warm-up) is followed after half a
  window to a window of skipped steps (the bounded values must first reach the median) instead
  of stopping training for good. NaN/Inf norms never enter the history. The history is a ring
  buffer with its own
  write position (``cursor``), so it keeps rotating after the counters saturate at 2**31 - 1.
  The non-finite rule is that of :func:`skip_nonfinite`.

  **The loss.** ``on="loss"`` applies the same rule to the training loss instead of the norm,
  ``on="both"`` to both (a step is skipped when either is a spike), as Levanter and OLMo-core
  do. The loss comes through optax's extra arguments:
  ``tx.update(grads, state, params, loss=loss)`` (a real scalar; inside ``optax.chain`` wrap the
  chain as ``optax.with_extra_args_support`` does for you here, or pass ``loss=`` to the guard
  at the outside of the chain). Only a loss *above* its band is a spike (a sudden drop is not
  a reason to skip). Its band uses ``loss_threshold`` standard deviations (default: the same
  ``threshold``), its own ``window``-long history and the same ``warmup``; a NaN/Inf loss skips
  the step and is counted in ``nonfinite_count`` (never in the history) and in
  ``consecutive_nonfinite``; ``max_consecutive`` lets non-finite *gradients* through, never a
  non-finite loss. The norm is still measured and recorded with ``on="loss"``, only not used
  to skip. A ``loss=`` passed with ``on="norm"`` is not needed, only passed on to ``inner``.

  **Invalid hyperparameters.** Python numbers are checked here, concrete arrays (what
  ``optax.inject_hyperparams`` makes of numbers) at ``init``, the same way. A *traced*
  ``threshold`` that is NaN, ``inf`` or <= 0, a ``warmup`` outside ``[2, window]`` or a
  negative ``max_consecutive`` never disables the guard: the step is skipped (zero update,
  inner state and history unchanged) and counted in ``invalid_count`` and ``skipped_count``.

  Args:
    inner: any optax transformation (extra arguments are passed on).
    window: number of recorded norms the statistics are taken over (integer in
      ``[2, 2**31 - 1]``; it sets an array shape, so it must be concrete at ``init``).
    threshold: ``k`` > 0 (finite), in standard deviations (1.4826 MAD).
    warmup: accepted norms needed before spikes are skipped, an integer in ``[2, window]``;
      ``None`` (default) means 16, or ``window`` if it is smaller.
    max_consecutive: as in :func:`skip_nonfinite` (``None``: always skip non-finite steps).
    axis_name: inside ``shard_map``/``pmap`` with sharded gradients, the axis to all-reduce the
      norm over.
    specs: inside ``shard_map``, instead of ``axis_name``: the updates' ``PartitionSpec`` s (the
      ``in_specs`` pytree) or ``"varying"`` (read from the arrays' types); each leaf is summed
      over exactly the mesh axes it is split over (see :func:`clipax.global_norm`).
    on: what is watched for spikes: ``"norm"`` (default), ``"loss"`` or ``"both"``.
    loss_threshold: ``k`` > 0 for the loss band; ``None`` (default): ``threshold``.
    name: the name of its keys in :func:`clipax.metrics`; default: its ``named_chain`` key,
      else ``skip_spikes``.
    leaf_metrics: also keep every leaf's norm (``clip/{name}/leaf_norm/<path>``), in the same
      pass as the global norm.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`clipax.SkipState`
    (``metrics`` adds ``skipped_count``, ``spike_count``, ``invalid_count`` and
    ``threshold``; watching the loss, ``loss``, ``loss_threshold`` and ``loss_spike_count``).
    Where no band is in force yet (warm-up) the ``threshold`` metric is the step's own norm,
    and ``loss_threshold`` the step's own loss, so nothing was over it and no metric is
    ``inf`` (the state fields keep ``inf``).

  Raises:
    TypeError: if ``inner`` is not an optax transformation, or ``window``, ``warmup`` or
      ``max_consecutive`` is not an integer.
    ValueError: for a ``window``, ``threshold``, ``loss_threshold``, ``warmup`` or
      ``max_consecutive`` out of its range (integers above 2**31 - 1 included), or an unknown
      ``on``.
    TypeError: at ``update``, watching the loss, when no ``loss=`` is passed or it is not a real
      scalar.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import clipax
    >>> tx = clipax.skip_spikes(optax.sgd(1.0), window=4, threshold=3.0, warmup=4)
    >>> state = tx.init({"w": jnp.zeros(1)})
    >>> for n in [1.0, 1.1, 0.9, 1.0, 50.0, 1.05]:
    ...   out, state = jax.jit(tx.update)({"w": jnp.array([n])}, state)
    >>> m = clipax.metrics(state)  # 50 was recorded as its band 1.222: median 1.05, MAD 0.1
    >>> print(int(m["clip/skip_spikes/skipped_count"]), f"{m['clip/skip_spikes/threshold']:.3f}")
    1 1.495

    Watching the loss, passed as an extra argument:

    >>> tx = clipax.skip_spikes(optax.sgd(1.0), on="loss", window=8, warmup=4, name="guard")
    >>> state = tx.init({"w": jnp.zeros(1)})
    >>> for loss in [2.0, 2.1, 1.9, 2.0, 9.0, 1.95]:
    ...   out, state = jax.jit(tx.update)({"w": jnp.array([1.0])}, state, loss=loss)
    >>> m = clipax.metrics(state)
    >>> print(int(m["clip/guard/loss_spike_count"]), int(m["clip/guard/skipped_count"]))
    1 1

  References:
    Levanter ``SkipStepConfig``; OLMo-core ``SkipStepOptimizer``; Chowdhery et al., "PaLM",
    2022, https://arxiv.org/abs/2204.02311 (skipping batches around spikes); Hampel, "The
    influence curve and its role in robust estimation", JASA 1974 (median and MAD).
  """
  _check_inner_and_max_consecutive(inner, max_consecutive)
  _checks.axis_name(axis_name)
  check_specs(specs, axis_name)
  size_known = static_int("window", window, low=2)
  _checks.number("threshold", threshold, low=0.0, low_open=True)
  if loss_threshold is not None:
    _checks.number("loss_threshold", loss_threshold, low=0.0, low_open=True)
  if warmup is not None:
    _check_warmup(warmup, size_known)
  _checks.choice("on", on, get_args(Watch))
  check_leaf_metrics(leaf_metrics)
  watch_norm, watch_loss = on in ("norm", "both"), on in ("loss", "both")
  loss_k = threshold if loss_threshold is None else loss_threshold
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    zero = jnp.zeros([], jnp.int32)
    dtype = stat_dtype()
    size = _known_size("window", size_known)
    loss_fields: dict[str, Any] = {}
    if watch_loss:
      loss_fields = dict(
          loss=jnp.zeros([], dtype), loss_threshold=jnp.asarray(jnp.inf, dtype),
          loss_history=jnp.zeros([size], dtype), loss_cursor=zero, loss_accepted=zero,
          loss_spike_count=zero)
    return SkipState(
        count=zero,
        norm=jnp.zeros([], dtype),
        skipped=jnp.zeros([], jnp.bool_),
        skipped_count=zero,
        nonfinite_count=zero,
        spike_count=zero,
        consecutive_nonfinite=zero,
        invalid_count=zero,
        threshold=jnp.asarray(jnp.inf, dtype),
        history=jnp.zeros([size], dtype),
        cursor=zero,
        accepted=zero,
        inner_state=inner.init(params),
        leaf_norms=init_leaf_norms(params, leaf_metrics, dtype),
        **loss_fields,
    )

  def update_fn(updates, state, params=None, **extra_args):
    with jax.named_scope("clipax/skip_spikes"):
      dtype = state.history.dtype
      size = state.history.shape[0]  # `window`, also when inject_hyperparams traced it
      loss = _loss(extra_args, dtype) if watch_loss else None
      norm, leaves = measure(updates, axis_name=axis_name, specs=specs,
                             leaf_metrics=leaf_metrics, dtype=dtype)
      norm = norm.astype(dtype)
      invalid = _flag(_checks.any_of(
          _checks.invalid(threshold, low=0.0, low_open=True),
          _checks.invalid(loss_k, low=0.0, low_open=True) if watch_loss else None,
          None if warmup is None else _checks.invalid(warmup, low=2.0, high=size, high_open=False),
          _invalid_max_consecutive(max_consecutive),
      ))
      loss_ok = jnp.ones([], jnp.bool_) if loss is None else jnp.isfinite(loss)
      # a non-finite loss is a non-finite step (never let through by max_consecutive)
      finite, consecutive, let_through = _nonfinite_rule(
          state, jnp.where(loss_ok, norm, jnp.nan), max_consecutive)
      let_through = let_through & loss_ok
      need = jnp.asarray(min(DEFAULT_WARMUP, size) if warmup is None else warmup)
      need = jnp.ceil(need) if jnp.issubdtype(need.dtype, jnp.floating) else need
      valid = finite & ~invalid

      n_band = _band(state.history, state.cursor, state.accepted, norm, valid, threshold, need)
      spike = n_band.spike if watch_norm else jnp.zeros([], jnp.bool_)
      skip = invalid | spike | (~finite & ~let_through)
      loss_fields: dict[str, Any] = {}
      if loss is not None:
        l_band = _band(state.loss_history, state.loss_cursor, state.loss_accepted, loss,
                       valid, loss_k, need)
        skip = skip | l_band.spike
        loss_fields = dict(
            loss=loss,
            loss_threshold=jnp.where(invalid, state.loss_threshold, l_band.limit),
            loss_history=l_band.history, loss_cursor=l_band.cursor,
            loss_accepted=l_band.accepted,
            loss_spike_count=add_count(state.loss_spike_count, l_band.spike))

      new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
      out, inner_state = _skip_select(skip, new_updates, new_inner, state.inner_state)
      return out, SkipState(
          count=optax.safe_increment(state.count),
          norm=norm,
          skipped=skip,
          skipped_count=add_count(state.skipped_count, skip),
          nonfinite_count=add_count(state.nonfinite_count, ~finite),
          spike_count=add_count(state.spike_count, spike),
          consecutive_nonfinite=jnp.where(invalid, state.consecutive_nonfinite, consecutive),
          invalid_count=add_count(state.invalid_count, invalid),
          threshold=jnp.where(invalid, state.threshold, n_band.limit),
          history=n_band.history,
          cursor=n_band.cursor,
          accepted=n_band.accepted,
          inner_state=inner_state,
          leaf_norms=leaves,
          **loss_fields,
      )

  return named(optax.GradientTransformationExtraArgs(init_fn, update_fn), "skip_spikes", name)


class _Band(NamedTuple):
  limit: jax.Array
  spike: jax.Array
  history: jax.Array
  cursor: jax.Array
  accepted: jax.Array


def _band(history, cursor, accepted, value, valid, k, need) -> _Band:
  """One step of the spike rule for ``value`` against its ring buffer.

  Every valid finite value is recorded: as it is when it is inside the band, bounded to the band
  when it is a spike (so one spike moves the band by at most one rank, while a lasting rise of
  the level is followed within about ``window`` steps instead of being skipped forever).
  """
  dtype = history.dtype
  size = history.shape[0]
  n = jnp.minimum(accepted, size)
  active = n.astype(need.dtype) >= need
  band = robust_band(history, n, jnp.asarray(k).astype(dtype))
  limit = jnp.where(active, band, jnp.inf).astype(dtype)
  ok = valid & jnp.isfinite(value)
  spike = ok & (value > limit)
  slot = cursor % size
  new_history = jnp.where(ok, history.at[slot].set(jnp.where(spike, limit, value)), history)
  new_cursor = jnp.where(ok, (slot + 1) % size, cursor).astype(jnp.int32)
  new_accepted = jnp.where(ok, optax.safe_increment(accepted), accepted)
  return _Band(limit, spike, new_history, new_cursor, new_accepted)


def _loss(extra_args: dict, dtype: jnp.dtype) -> jax.Array:
  """The ``loss=`` extra argument as a real scalar in ``dtype``, or a clear error."""
  if "loss" not in extra_args or extra_args["loss"] is None:
    raise TypeError(
        "skip_spikes watching the loss (on='loss' or 'both') needs the `loss`: call "
        f"update(grads, state, params, loss=loss) (got extra arguments {sorted(extra_args)})")
  loss = extra_args["loss"]
  try:
    arr = jnp.asarray(loss)
  except TypeError as e:
    raise TypeError(f"`loss` must be a real scalar, got {loss!r}") from e
  if arr.ndim != 0 or not (jnp.issubdtype(arr.dtype, jnp.floating)
                           or jnp.issubdtype(arr.dtype, jnp.integer)):
    raise TypeError(
        f"`loss` must be a real scalar, got {arr.dtype} of shape {tuple(arr.shape)}")
  return arr.astype(dtype)
