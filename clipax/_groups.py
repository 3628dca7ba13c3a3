"""Clipping by parameter group: each group by its own norm, or one subset's norm on another.

Groups are named by labels as ``optax.partition`` takes them: a pytree (or a prefix of the
updates) of strings, or a function from the updates to one. Two transformations:

* :func:`clip_by_group_norm` clips every group by its own global norm and threshold. It *is*
  ``optax.partition`` of one :func:`clipax.clip_by_global_norm` per label, named by the label,
  so every group has the whole global-norm contract (policies, counters, metrics) and groups are
  independent: a NaN in one group zeroes that group only.
* :func:`clip_by_subset_norm` measures the global norm over the leaves of some groups and scales
  the leaves of (possibly) others by it: e.g. clip only the leaves Adam updates next to Muon,
  whose orthogonalized matrices a global clip would needlessly shrink. Its state keeps each
  group's norm for the metrics (:class:`GroupClipState`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from clipax import _checks
from clipax._checks import Nonfinite
from clipax._clipping import action, clip_by_global_norm, invalid_threshold, scale_for
from clipax._measure import as_tree, check_leaf_metrics, init_leaf_norms
from clipax._norms import global_norm, leaf_norms
from clipax._sharding import check_replicated
from clipax._state import (
    applied_norm,
    clip_state_metrics,
    init_clip_state,
    named,
    record,
    register_state,
    stat_dtype,
)

AxisName = str | tuple[str, ...] | None
Replicated = Any  # None, a bool, a pytree prefix of bools, or a predicate on the key path
Labels = Any  # a pytree (prefix) of str labels, or a function from the updates to one
LabelSet = str | Collection[str] | None

_ORDS = (1, 2, math.inf)


def _check_ord(ord: Any) -> Any:
  """1, 2 or ``math.inf`` (also ``"inf"``, or a concrete scalar array holding one). A traced
  ``ord`` (``optax.inject_hyperparams`` traces every numeric argument) is passed on to the norms,
  which select the branch at run time (and give NaN, counted as non-finite, for any other)."""
  if _checks.is_traced(ord):
    return ord
  value = ord.item() if hasattr(ord, "dtype") and getattr(ord, "ndim", 1) == 0 else ord
  value = math.inf if isinstance(value, str) and value.lower() == "inf" else value
  if isinstance(value, (bool, str)) or not isinstance(value, (int, float)) or value not in _ORDS:
    raise ValueError(f"`ord` must be 1, 2 or math.inf, got {ord!r}")
  return math.inf if value == math.inf else int(value)


def _check_label(label: Any, where: str) -> str:
  """A label names a group's metrics (``clip/<label>/...``): a non-empty str without ``/``."""
  if not isinstance(label, str) or not label or "/" in label:
    raise TypeError(f"{where} must be a non-empty str without '/', got {label!r}"
                    + ("" if isinstance(label, str) else f" of type {type(label).__name__}"))
  return label


def _label_leaves(labels: Any) -> list[str]:
  """The labels of a label tree, each checked (the error names its key path)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(labels)
  return [_check_label(lab, f"`labels` at {jax.tree_util.keystr(path) or 'the root'}")
          for path, lab in flat]


def _check_labels_arg(labels: Any) -> None:
  if callable(labels):
    return
  if not _label_leaves(labels):
    raise ValueError(f"`labels` must hold at least one label, got {labels!r}")


def resolve(labels: Labels, tree: Any) -> list[str]:
  """The label of every leaf of ``tree``, in leaf order.

  Raises:
    TypeError: for a label that is not a non-empty str without ``/`` (naming its path).
    ValueError: if the labels are not a pytree prefix of ``tree``.
  """
  labs = labels(tree) if callable(labels) else labels
  _label_leaves(labs)
  try:
    full = jax.tree_util.tree_map(
        lambda lab, sub: jax.tree_util.tree_map(lambda _: lab, sub), labs, tree)
  except (ValueError, TypeError) as err:
    raise ValueError(
        f"`labels` must be a pytree prefix of the updates (as optax.partition takes them): "
        f"{err}") from None
  return jax.tree_util.tree_leaves(full)


def _check_set(value: LabelSet, what: str) -> frozenset[str] | None:
  """``measure`` / ``apply``: ``None``, one label or a collection of labels."""
  if value is None:
    return None
  items = [value] if isinstance(value, str) else value
  if isinstance(items, (Mapping, bytes)) or not isinstance(items, Collection):
    raise TypeError(f"`{what}` must be None, a label or a collection of labels, got {value!r}")
  out = frozenset(_check_label(x, f"a label in `{what}`") for x in items)
  if not out:
    raise ValueError(f"`{what}` must name at least one label, got {value!r}")
  return out


def _known(chosen: frozenset[str] | None, present: set[str], what: str) -> frozenset[str]:
  if chosen is None:
    return frozenset(present)
  unknown = sorted(chosen - present)
  if unknown:
    raise ValueError(f"`{what}` names label(s) {unknown} that no leaf has (labels: "
                     f"{sorted(present)})")
  return chosen


# ------------------------------------------------------------------ (a) each group by its own
def _thresholds(max_norm: Any) -> Any:
  """``max_norm`` checked: a threshold, or a dict ``{label: threshold or None}``."""
  if isinstance(max_norm, Mapping):
    out = {}
    for label, value in max_norm.items():
      _check_label(label, "a key of `max_norm`")
      value = math.inf if value is None else value
      _checks.threshold(f"max_norm[{label!r}]", value)
      out[label] = value
    return out
  max_norm = math.inf if max_norm is None else max_norm
  _checks.threshold("max_norm", max_norm)
  return max_norm


def _per_label(thresholds: Any, present: set[str]) -> dict[str, Any]:
  if not isinstance(thresholds, dict):
    return {label: thresholds for label in sorted(present)}
  missing = sorted(present - set(thresholds))
  if missing:
    raise ValueError(f"`max_norm` has no threshold for label(s) {missing} (give None for a group "
                     f"that is not clipped)")
  _known(frozenset(thresholds), present, "max_norm")
  return {label: thresholds[label] for label in sorted(present)}


def clip_by_group_norm(
    labels: Labels,
    max_norm: ArrayLike | Mapping[str, ArrayLike | None] | None,
    *,
    ord: int | float | str = 2,
    axis_name: AxisName = None,
    replicated: Replicated = None,
    nonfinite: Nonfinite = "zero",
    leaf_metrics: bool = False,
) -> optax.GradientTransformation:
  r"""Clips each parameter group by its own global norm and threshold.

  .. math::
    g_G \leftarrow g_G \cdot \min\Big(1, \frac{c_G}{\|g_G\|}\Big)
    \quad\text{for every group } G

  Exactly ``optax.partition({label: clipax.clip_by_global_norm(c_label, name=label), ...},
  labels)``: each group is a :func:`clipax.clip_by_global_norm` over its own leaves, with that
  transformation's float32-safe norm, non-finite policy and counters. Groups are independent: a
  NaN or Inf in group A zeroes (``nonfinite="zero"``) or propagates through group A only and is
  counted in A's ``nonfinite_count``; group B is clipped by its own, finite norm. The metrics
  name each group by its label: ``clip/<label>/norm``, ``clip/<label>/scale``, ...

  Args:
    labels: the group of every leaf, as ``optax.partition`` takes its ``param_labels``: a pytree
      of str labels with the structure of the updates or a prefix of it, or a function from the
      updates (at ``init``: the params) to one. Labels become metric names: non-empty, no
      ``/``. Under ``optax.inject_hyperparams``, a function must be named in ``static_args``
      (``inject_hyperparams(clip_by_group_norm, static_args="labels")``), or it is taken for a
      schedule.
    max_norm: one threshold for every group (a number >= 0, ``inf`` or ``None`` for no
      clipping, or an array, e.g. from ``optax.inject_hyperparams``), or a dict ``{label:
      threshold}`` naming every label (``None`` or ``inf`` leaves that group unclipped). A dict
      is fixed; for a traced threshold per group, partition ``inject_hyperparams``-ed clippers
      yourself.
    ord: 1, 2 (default) or ``math.inf``.
    axis_name: inside ``shard_map``/``pmap``, the axis (or axes) each group's norm is
      all-reduced over, as in :func:`clipax.clip_by_global_norm`.
    replicated: with ``axis_name``, the leaves that are the same on every shard (a bool or a
      function of a leaf's key path; see :func:`clipax.global_norm`).
    nonfinite: ``"zero"`` (default) or ``"propagate"``, per group.
    leaf_metrics: also keep every leaf's pre-clip norm (``clip/<label>/leaf_norm/<path>``).

  Returns:
    An ``optax.GradientTransformation``; its state is an ``optax.PartitionState`` holding one
    :class:`clipax.ClipState` per label.

  Raises:
    TypeError: for a label that is not a non-empty str without ``/`` (naming its path), a bad
      ``max_norm`` key.
    ValueError: for a negative or NaN threshold, an unknown ``ord`` or ``nonfinite``, a
      ``replicated`` with leaves that are not bools; at construction for a label tree (at
      ``init``/``update`` for a label function's tree): labels that are not a prefix of the
      updates, a label missing from a ``max_norm`` dict or a key of it that no leaf has.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import clipax
    >>> params = {"encoder": jnp.zeros(2), "head": jnp.zeros(2)}
    >>> tx = clipax.clip_by_group_norm({"encoder": "enc", "head": "head"},
    ...                                {"enc": 1.0, "head": None})
    >>> grads = {"encoder": jnp.array([3.0, 4.0]), "head": jnp.array([30.0, 40.0])}
    >>> out, state = tx.update(grads, tx.init(params))
    >>> print(out["encoder"].tolist(), out["head"].tolist())
    [0.6000000238418579, 0.800000011920929] [30.0, 40.0]
    >>> m = clipax.metrics(state)
    >>> print(float(m["clip/enc/norm"]), float(m["clip/head/norm"]), bool(m["clip/head/clipped"]))
    5.0 50.0 False

  References:
    optax.partition, https://optax.readthedocs.io/en/latest/api/combining_optimizers.html
  """
  thresholds = _thresholds(max_norm)
  _check_labels_arg(labels)
  _checks.nonfinite(nonfinite)
  _checks.axis_name(axis_name)
  check_replicated(replicated)
  ord = _check_ord(ord)
  check_leaf_metrics(leaf_metrics)
  if not callable(labels):
    _per_label(thresholds, set(_label_leaves(labels)))

  def partitioned(tree: Any) -> optax.GradientTransformationExtraArgs:
    labs = labels(tree) if callable(labels) else labels
    per_label = _per_label(thresholds, set(resolve(labs, tree)))
    return optax.partition({
        label: clip_by_global_norm(c, ord=ord, axis_name=axis_name, replicated=replicated,
                                   nonfinite=nonfinite, name=label, leaf_metrics=leaf_metrics)
        for label, c in per_label.items()
    }, labs)

  def init_fn(params):
    return partitioned(params).init(params)

  def update_fn(updates, state, params=None):
    with jax.named_scope("clipax/clip_by_group_norm"):
      return partitioned(updates).update(updates, state, params)

  return optax.GradientTransformation(init_fn, update_fn)


# ------------------------------------------------------- (b) one subset's norm on another
@register_state
class GroupClipState(NamedTuple):
  """State of :func:`clipax.clip_by_subset_norm`: the :class:`clipax.ClipState` fields and the
  norm of every group.

  Attributes:
    count, norm, scale, clipped, clipped_count, nonfinite_count, invalid_count, threshold,
      update_norm, leaf_norms, tag: as in :class:`clipax.ClipState`; ``norm`` is the norm of the
      measured groups, ``scale`` the factor applied to the leaves of the applied groups and
      ``update_norm`` the norm of the measured groups after clipping.
    group_norms: ``{label: pre-clip norm}`` for every group, measured or not (an unmeasured
      group's NaN shows here and nowhere else).
  """

  count: jax.Array  # type: ignore[assignment]  # a field, shadows tuple.count
  norm: jax.Array
  scale: jax.Array
  clipped: jax.Array
  clipped_count: jax.Array
  nonfinite_count: jax.Array
  invalid_count: jax.Array
  threshold: jax.Array
  update_norm: jax.Array
  group_norms: Any
  leaf_norms: Any = ()
  tag: Any = ()

  def clipax_metrics(self) -> dict[str, jax.Array]:
    out = clip_state_metrics(self)
    for label in sorted(self.group_norms):
      out[f"group_norm/{label}"] = jnp.asarray(self.group_norms[label])
    return out


def _combine(norms: list[jax.Array], ord: float, dtype: jnp.dtype) -> jax.Array:
  """The ``ord``-norm of a set of norms: the norm of the leaves they came from, exactly (the
  overflow rescue of :func:`clipax.global_norm`); 0 for none."""
  if not norms:
    return jnp.zeros([], dtype)
  return global_norm(list(norms), ord=ord)


def clip_by_subset_norm(
    labels: Labels,
    max_norm: ArrayLike,
    *,
    measure: LabelSet = None,
    apply: LabelSet = None,
    ord: int | float | str = 2,
    axis_name: AxisName = None,
    replicated: Replicated = None,
    nonfinite: Nonfinite = "zero",
    name: str | None = None,
    leaf_metrics: bool = False,
) -> optax.GradientTransformation:
  r"""Clips the leaves of some groups by the global norm of (possibly) other groups.

  .. math::
    g_A \leftarrow g_A \cdot \min\Big(1, \frac{c}{\|g_M\|}\Big), \qquad
    g_{\text{rest}} \leftarrow g_{\text{rest}}

  with :math:`M` the leaves of the ``measure`` groups and :math:`A` those of the ``apply``
  groups. Next to ``optax.contrib.muon``, measuring and clipping only the leaves Adam updates
  (``measure="adam"``) keeps a global clip from shrinking the steps of the matrices Muon
  orthogonalizes (which makes their scale independent of the gradient's norm anyway); measuring
  everything and scaling only the Adam leaves is ``measure=None, apply="adam"``.

  Each leaf is reduced once (as :func:`clipax.leaf_norms`), every group's norm and the measured
  norm are combined from those exactly, and the norm of every group is kept for the metrics
  (``clip/{name}/group_norm/<label>``), measured or not.

  Non-finite values: the policy acts on the measured norm. When it is NaN/Inf the applied
  leaves are zeroed (``nonfinite="zero"``) or made NaN (``"propagate"``) and the step is counted
  in ``nonfinite_count``; leaves outside the applied groups always pass through unchanged, and
  a NaN in a group that is not measured is seen only in its ``group_norm`` (guard the whole
  update with :func:`clipax.skip_nonfinite` for that). A traced ``max_norm`` that is NaN or
  negative zeroes the applied leaves and is counted in ``invalid_count``.

  Args:
    labels: the group of every leaf, as ``optax.partition`` takes its ``param_labels``: a pytree
      (or prefix) of str labels or a function from the updates (at ``init``: the params) to
      one; for Muon's default split, ``lambda p: jax.tree.map(lambda x: "muon" if x.ndim == 2
      else "adam", p)``. Under ``optax.inject_hyperparams``, a function must be named in
      ``static_args``.
    max_norm: the threshold ``c`` >= 0 (``inf``: off); a python number or an array, e.g. from
      ``optax.inject_hyperparams``.
    measure: the label, or collection of labels, whose leaves the norm is measured over;
      ``None`` (default): every group.
    apply: the label(s) whose leaves are scaled; ``None`` (default): the measured ones.
    ord: 1, 2 (default) or ``math.inf``.
    axis_name: inside ``shard_map``/``pmap``, the axis (or axes) the leaf norms are all-reduced
      over (see :func:`clipax.clip_by_global_norm`).
    replicated: with ``axis_name``, the leaves that are the same on every shard.
    nonfinite: ``"zero"`` (default) or ``"propagate"``, see above.
    name: the name of the keys in :func:`clipax.metrics`; default ``subset_norm``.
    leaf_metrics: also keep every leaf's pre-clip norm (``clip/{name}/leaf_norm/<path>``).

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`GroupClipState`.

  Raises:
    TypeError: for a label that is not a non-empty str without ``/`` (naming its path) or a bad
      ``measure``/``apply``/``name``.
    ValueError: for a negative, NaN or non-numeric ``max_norm``, an unknown ``ord`` or
      ``nonfinite``, a ``replicated`` with leaves that are not bools; and (at construction for
      a label tree, at ``init``/``update`` for a label function) for labels that are not a
      prefix of the updates or a ``measure``/``apply`` label that no leaf has; at ``update`` if
      the updates' label set differs from ``init``'s.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import optax
    >>> import clipax
    >>> params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
    >>> muon_labels = lambda p: jax.tree.map(lambda x: "muon" if x.ndim == 2 else "adam", p)
    >>> tx = optax.chain(clipax.clip_by_subset_norm(muon_labels, 1.0, measure="adam"),
    ...                  optax.contrib.muon(1e-2))
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.full((2, 2), 100.0), "b": jnp.array([3.0, 4.0])}
    >>> updates, state = jax.jit(tx.update)(grads, state, params)
    >>> m = clipax.metrics(state)
    >>> print(f"{m['clip/subset_norm/norm']:.1f} {m['clip/subset_norm/scale']:.2f}")
    5.0 0.20
    >>> print(float(m["clip/subset_norm/group_norm/muon"]))
    200.0

  References:
    Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024,
    https://kellerjordan.github.io/posts/muon/
  """
  _checks.threshold("max_norm", max_norm)
  _check_labels_arg(labels)
  measured_arg = _check_set(measure, "measure")
  applied_arg = _check_set(apply, "apply")
  _checks.nonfinite(nonfinite)
  _checks.axis_name(axis_name)
  check_replicated(replicated)
  ord = _check_ord(ord)
  check_leaf_metrics(leaf_metrics)

  def groups(tree: Any) -> tuple[list[str], list[str], frozenset[str], frozenset[str]]:
    per_leaf = resolve(labels, tree)
    present = set(per_leaf)
    measured = _known(measured_arg, present, "measure")
    applied = _known(applied_arg, present, "apply") if applied_arg is not None else measured
    return per_leaf, sorted(present), measured, applied

  if not callable(labels):
    present = set(_label_leaves(labels))
    _known(measured_arg, present, "measure")
    _known(applied_arg, present, "apply")

  def init_fn(params):
    _, present, _, _ = groups(params)
    base = init_clip_state(max_norm)
    dt = stat_dtype()
    return GroupClipState(*base[:9], group_norms={k: jnp.zeros([], dt) for k in present},
                          leaf_norms=init_leaf_norms(params, leaf_metrics, dt))

  def update_fn(updates, state, params=None):
    del params
    with jax.named_scope("clipax/clip_by_subset_norm"):
      per_leaf, present, measured, applied = groups(updates)
      if present != sorted(state.group_norms):
        raise ValueError(f"`labels` gave the updates the groups {present}, but the state was "
                         f"initialised with {sorted(state.group_norms)}")
      dt = state.norm.dtype
      treedef: Any = jax.tree_util.tree_structure(updates)
      leaves = jax.tree_util.tree_leaves(updates)
      norms = jax.tree_util.tree_leaves(
          leaf_norms(updates, ord=ord, axis_name=axis_name, replicated=replicated))
      group = {k: _combine([n for n, lab in zip(norms, per_leaf, strict=True) if lab == k], ord,
                           dt) for k in present}
      norm = _combine([group[k] for k in sorted(measured)], ord, dt)
      scale, over = scale_for(norm, max_norm)
      act = action(norm, nonfinite, invalid_threshold(max_norm))
      out = treedef.unflatten([act.apply(g, scale) if lab in applied else g
                               for g, lab in zip(leaves, per_leaf, strict=True)])
      recorded = act.recorded(scale)
      after = _combine([applied_norm(n, recorded) if lab in applied else n
                        for n, lab in zip(norms, per_leaf, strict=True) if lab in measured],
                       ord, dt)
      base = record(state, norm, recorded, act.clipped(over), act.bad, act.invalid)
      new_state = GroupClipState(
          *base,
          threshold=jnp.asarray(max_norm).astype(dt).reshape([]),
          update_norm=after.astype(dt),
          group_norms={k: v.astype(dt) for k, v in group.items()},
          leaf_norms=as_tree(updates, norms, dt) if leaf_metrics else (),
          tag=state.tag,
      )
      return out, new_state

  return named(optax.GradientTransformation(init_fn, update_fn), "subset_norm", name)


__all__ = ["GroupClipState", "clip_by_group_norm", "clip_by_subset_norm"]
