"""A generated sweep of bad inputs to every public function and transformation of clipax.

The project rule: bad input gets a clear error (``ValueError``/``TypeError`` naming the argument
in backticks and its value, or the leaf path) in every public function and transformation, never
a crash deep inside JAX nor a silent wrong result.

The sweep is generated from a table, :data:`TARGETS`, with one row per public callable of
``clipax.__all__`` and, per argument, its documented range (from the docstring's ``Args`` and
``Raises``): a :class:`Num` range, a :class:`Choice` of strings, or explicit :class:`Values`.
From a range the battery of bad values is generated: NaN, +-inf, values just outside the range,
strings, ``None``, bools, complex numbers, wrong-shaped arrays, and for integers ``2.5``,
``2**31`` and ``2**63``; concrete arrays of bad values too, since ``optax.inject_hyperparams``
hands the factory arrays. ``test_the_table_covers_every_public_callable`` checks the table
against ``inspect.signature`` so that a new argument cannot be left out.

A bad value must raise at construction, or at ``init`` where only ``init`` can know (values that
need the tree are marked :class:`AtUpdate`). Every value documented as valid (the defaults
included) must be accepted. Trees (string, integer, boolean, object leaves; complex leaves for
``spam``), a state built for another tree, ``clip_with_norm``'s ``norm``, ``axes`` functions,
``metrics``' ``prefix``, ``diagnose``'s and ``suggest_max_norm``'s inputs and python numbers
given through ``optax.inject_hyperparams`` get their own batteries.

A failing case is classified: (a) another exception type, or an error raised deep inside
JAX/numpy/optax rather than by clipax; (b) no error (or a clear one only at ``update``, too
late); (c) an error whose message does not name the argument, its value or the leaf.
``test_summary`` runs everything once and prints ``bad inputs tried: N, clear errors: M``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import clipax


def ones(shape: Any, dtype: Any = np.float32) -> jax.Array:
  """``jnp.ones`` without compiling a kernel (a device put of a numpy array)."""
  return jnp.asarray(np.ones(shape, dtype))


def zeros(shape: Any, dtype: Any = np.float32) -> jax.Array:
  return jnp.asarray(np.zeros(shape, dtype))


INT_MAX = 2**31 - 1
NAN = float("nan")
INF = math.inf

PARAMS = {"w": ones((2, 3)), "b": ones(3)}
GRADS = {"w": jnp.asarray(np.full((2, 3), 0.5, np.float32)),
         "b": jnp.asarray(np.full(3, 0.5, np.float32))}
SGD = optax.sgd(0.1)

# Public names that are state or result containers (built by ``init``/``diagnose``), not
# functions taking user input.
CONTAINERS = {"AdaGCState", "AutoClipState", "ClipState", "GroupClipState", "PerExampleInfo",
              "PerExampleState", "SkipState", "SpamState", "UpdateClipState", "Verdict",
              "ZClipState"}


# ----------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class AtUpdate:
  """A bad value that can only be detected once the tree is known (at ``update``)."""

  value: Any


@dataclasses.dataclass(frozen=True)
class Num:
  """A documented numeric range; ``inside`` is a valid value well inside it."""

  inside: Any
  low: float = 0.0
  low_open: bool = False
  high: float = INF
  high_open: bool = True
  integer: bool = False
  allow_inf: bool = False  # +inf documented as valid ("no clipping", "no cap")
  optional: bool = False  # None documented as valid
  arrays: bool = True  # concrete arrays accepted (what inject_hyperparams passes)
  static: bool = False  # read as a python int (an array length): no huge or float-array values
  length_only: bool = False  # only an array length: a (1,) array holding a valid one is harmless
  valid: tuple = ()
  bad: tuple = ()

  def valid_values(self) -> list:
    out = [self.inside, *self.valid]
    if not self.low_open and math.isfinite(self.low):
      out.append(int(self.low) if self.integer else self.low)
    if math.isfinite(self.high) and not self.high_open and not self.static:
      out.append(int(self.high) if self.integer else self.high)
    if self.integer and not self.static and not math.isfinite(self.high):
      out.append(INT_MAX)
    if self.allow_inf:
      out += [INF, np.float32(INF)]
    if self.optional:
      out.append(None)
    if self.integer:
      out += [np.int64(self.inside), np.int32(self.inside)]
      if self.arrays:
        out.append(jnp.asarray(self.inside))
      if self.arrays and not self.static:
        out.append(jnp.asarray(float(self.inside)))  # an integral float array: the integer
    else:
      out += [np.float32(self.inside), np.float64(self.inside)]
      if self.arrays:
        out += [jnp.asarray(self.inside), jnp.asarray(self.inside, jnp.bfloat16)]
    return out

  def bad_values(self) -> list:
    # a scalar hyperparameter given as an array must be 0-d, even holding a valid value ((1,)
    # broadcasts into the state)
    dtype = np.int32 if self.integer else np.float32
    shapes = [(2,), (2, 2)] + ([] if self.length_only else [(1,)])
    shaped = [jnp.asarray(np.full(shape, self.inside, dtype)) for shape in shapes]
    out = ["1.0", True, np.bool_(True), 1 + 2j, [1.0], object(), NAN, -INF, np.float32(NAN),
           *shaped]
    if not self.optional:
      out.append(None)
    if not self.allow_inf and not math.isfinite(self.high):
      out.append(INF)
    below = [self.low - 1, -1]
    if self.low_open:
      below.append(self.low)
    if self.low > 0:
      below.append(0)
    if math.isfinite(self.high):
      above = [self.high + 1, 2 * self.high + 1]
      if self.high_open:
        above.append(self.high)
    else:
      above = []
    edges = [int(v) if self.integer else float(v) for v in below + above]
    out += edges
    if self.integer:
      out += [2.5, float(self.inside) + 0.5, 2**31, 2**63, -(2**63), np.int64(2**40)]
      if not self.arrays:
        out.append(jnp.asarray(self.inside))  # python integers only
    if self.arrays:
      out += [jnp.asarray(NAN), jnp.asarray(float(below[0]))]
      if self.integer:
        out.append(jnp.asarray(2.5))
    return _unique(out + list(self.bad))

  def inject_values(self) -> list:
    """Python numbers for ``optax.inject_hyperparams`` (it turns them into arrays in init).

    Not ``2**31`` and above: optax's init converts those to int32 itself and raises
    ``OverflowError`` before the factory (clipax) sees them.
    """
    out = [NAN, -1 if self.integer else -1.0]
    if self.low > 0:
      out.append(int(self.low) - 1 if self.integer else 0.0)
    if not self.allow_inf and not math.isfinite(self.high):
      out.append(INF)
    if self.low_open:
      out.append(int(self.low) if self.integer else float(self.low))
    if math.isfinite(self.high):
      out.append(self.high if self.high_open else self.high + 1)
    if self.integer:
      out.append(2.5)
    # strings and bools are static for inject_hyperparams: the factory itself sees them in init
    return _unique(out + ["1.0", True])


@dataclasses.dataclass(frozen=True)
class Choice:
  """One of a documented set of strings."""

  options: tuple
  bad: tuple = ()

  def valid_values(self) -> list:
    return list(self.options)

  def bad_values(self) -> list:
    generated = ["bogus", self.options[0].upper(), self.options[0] + " ", "", None, 0, 1.0,
                 True, [self.options[0]], 1 + 2j]
    return _unique(generated + list(self.bad))


@dataclasses.dataclass(frozen=True)
class Values:
  """Explicit valid and bad values (for non-numeric arguments)."""

  valid: tuple
  bad: tuple
  # bad python numbers to give through optax.inject_hyperparams (an AtUpdate: refused at update,
  # where the hyperparameter is traced)
  inject: tuple = ()

  def valid_values(self) -> list:
    return list(self.valid)

  def bad_values(self) -> list:
    return list(self.bad)

  def inject_values(self) -> list:
    return list(self.inject)


def _unique(values: list) -> list:
  out, seen = [], set()
  for v in values:
    key = (type(v), repr(v))
    if key not in seen:
      seen.add(key)
      out.append(v)
  return out


def _named(fn: Callable, name: str) -> Callable:
  fn.__name__ = fn.__qualname__ = name
  return fn


THRESHOLD = Num(1.0, allow_inf=True, valid=(0, 0.0, 1e30))
OPTIONAL_THRESHOLD = dataclasses.replace(THRESHOLD, optional=True)
NONFINITE = Choice(("zero", "propagate"))
UNITS = Choice(("nfnets", "last_axis"))
ORD = Values(
    valid=(1, 2, INF, "inf", 1.0, 2.0, np.int64(2), np.float64(INF), jnp.asarray(2)),
    bad=(0, 3, -1, -INF, NAN, 1.5, "l2", "2", "", None, True, 1 + 2j, 2**63, [2], ones(2),
         jnp.asarray(3), jnp.asarray(NAN)),
    inject=(3, 0, -1, 1.5, NAN, -INF),
)
# Any hashable is a valid JAX axis name; unhashable ones can never be.
AXIS_NAME = Values(valid=(None, "i", ("i", "j")), bad=({"i": 1}, ("i", ["j"])))
AXIS_NAME_OUTSIDE_SHARD_MAP = Values(valid=(None,), bad=AXIS_NAME.bad)
REPLICATED_BAD = ("yes", 1, 0.5, {"w": 1, "b": False}, {"w": "yes", "b": True}, (True, 1))
REPLICATED_VALID = (None, True, False, {"w": True, "b": False},
                    _named(lambda path: False, "predicate"))
REPLICATED = Values(
    valid=REPLICATED_VALID,
    bad=(*REPLICATED_BAD, AtUpdate({"x": True}), AtUpdate([True]), AtUpdate({"w": True})),
)
REPLICATED_NOW = Values(valid=REPLICATED_VALID,
                        bad=(*REPLICATED_BAD, {"x": True}, [True], {"w": True}))
INNER = Values(
    valid=(optax.sgd(0.1), optax.identity(), clipax.clip_by_global_norm(1.0),
           optax.chain(clipax.clip_by_value(1.0), optax.adam(1e-3))),
    bad=(None, 1, "sgd", optax.sgd, clipax.clip_by_global_norm, (SGD.init, SGD.update),
         object(), [SGD]),
)
_BAD_AXES_FNS = tuple(
    _named(lambda x, r=r: r, name)
    for name, r in [("axes_5", (5,)), ("axes_minus_5", (-5,)), ("axes_repeated", (0, 0)),
                    ("axes_repeated_negative", (0, -2)), ("axes_float", (1.5,)),
                    ("axes_str", "a"), ("axes_none", None), ("axes_bool", (True,)),
                    ("axes_huge", (2**40,)), ("axes_nested", ((0,),))]
)
_VALID_AXES_FNS = (None, _named(lambda x: tuple(range(x.ndim)), "all_axes"),
                   _named(lambda x: [0], "axes_list"))
AGC_AXES = Values(valid=_VALID_AXES_FNS,
                  bad=(3, (0,), "0", *(AtUpdate(f) for f in _BAD_AXES_FNS)))
UNITWISE_AXES = Values(valid=_VALID_AXES_FNS, bad=(3, (0,), "0", *_BAD_AXES_FNS))
PREFIX = Values(valid=("clip", "train/clip"), bad=(1, None, b"clip", 1.5, ["clip"], True))
METRICS_PREFIX = Values(valid=PREFIX.valid, bad=(*PREFIX.bad, ""))  # "a non-empty string"
SCHEDULE = optax.constant_schedule(0.1)
# Outside shard_map only axis-free specs can be valid (a named mesh axis is unbound there, as for
# AXIS_NAME_OUTSIDE_SHARD_MAP); "varying" reads no axis from an unsharded array.
SPECS_BAD = ("auto", "VARYING", 1, P, ("i",), {"w": ("i",)}, {"w": "i", "b": P()},
             {"w": P(), "b": 1})
SPECS_VALID = (None, "varying", P(), {"w": P(), "b": P()}, {"w": P(None), "b": P(None)})
SPECS_LATE = ({"w": P()}, {"w": P(None, None, None), "b": P()}, [P(), P()])
SPECS = Values(valid=SPECS_VALID, bad=(*SPECS_BAD, *(AtUpdate(s) for s in SPECS_LATE)))
SPECS_NOW = Values(valid=SPECS_VALID, bad=(*SPECS_BAD, *SPECS_LATE))
# Stacked layers (``layer_axis``): every leaf of PARAMS/GRADS has an axis 0 and -1, only "w" an
# axis 1; the form is checked at construction, the axes against the tree once it is known.
NO_LAYERS = _named(lambda path, x: None, "no_layers")
LAYER_AXIS_VALID = (None, 0, -1, np.int64(0), jnp.asarray(0), {"w": 0, "b": None},
                    {"w": None, "b": None}, NO_LAYERS,
                    _named(lambda path, x: 0 if np.ndim(x) == 2 else None, "layers_2d"))
LAYER_AXIS_BAD = ("0", 1.5, True, np.bool_(True), object(), jnp.asarray(0.0), jnp.asarray([0]),
                  {"w": 1.5, "b": None}, {"w": "0", "b": None},
                  _named(lambda x: 0, "leaf_only_fn"), _named(lambda: 0, "no_arg_fn"))
LAYER_AXIS_LATE = (1, 2**40, {"w": 5, "b": None}, {"x": 0}, {"w": 0}, [0],
                   _named(lambda path, x: "a", "axis_str_fn"),
                   _named(lambda path, x: 2.5, "axis_float_fn"),
                   _named(lambda path, x: 7, "axis_7_fn"),
                   _named(lambda path, x: True, "axis_bool_fn"))
# Through optax.inject_hyperparams a number becomes an array: a float is refused in init, and an
# int, valid in init (a concrete array), is traced in update, where it must be static_args.
LAYER_AXIS = Values(valid=LAYER_AXIS_VALID,
                    bad=(*LAYER_AXIS_BAD, *(AtUpdate(v) for v in LAYER_AXIS_LATE)),
                    inject=(1.5, NAN, True, AtUpdate(0)))
LAYER_AXIS_NOW = Values(valid=LAYER_AXIS_VALID, bad=(*LAYER_AXIS_BAD, *LAYER_AXIS_LATE))
# Label trees (optax.partition's param_labels): the base "g" labels every leaf of any tree.
LABEL_FN = _named(lambda p: jax.tree_util.tree_map(lambda x: "m" if np.ndim(x) == 2 else "v", p),
                  "label_fn")
LABELS = Values(
    valid=("g", {"w": "m", "b": "v"}, LABEL_FN),
    bad=(None, {}, 1, "", "a/b", True, b"g", object(), {"w": "m", "b": 1}, {"w": "m", "b": ""},
         {"w": "m"}, ["m", "v"], {"w": "m", "b": "v", "c": "v"},
         _named(lambda p: 1, "labels_fn_int"), _named(lambda p: {"w": "m"}, "labels_fn_partial")),
)
LABEL_SET = Values(valid=(None, "g", ["g"], ("g",), {"g"}, frozenset({"g"})),
                   bad=("", "h", ["h"], "a/b", 1, 1.5, True, [1], [], {"g": 1}, b"g"))
ADAM_INNER = Values(
    valid=(optax.adam(1e-3), optax.adamw(1e-3), optax.nadam(1e-3), optax.lamb(1e-3),
           optax.chain(optax.clip(1.0), optax.adam(1e-3)),
           optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)),
    bad=(*INNER.bad, SGD, optax.identity(), optax.chain(optax.adam(1e-3), optax.adam(1e-3))),
)
BOOL = Values(valid=(False, True, np.bool_(True)), bad=(1, 0, "yes", None, 1.0, [True]))
# Per-example gradients: every leaf with a leading batch axis of 4.
PER_EXAMPLE = {"w": ones((4, 2, 3)), "b": ones((4, 3))}
MASK = Values(
    valid=(None, jnp.asarray(np.array([True, True, False, True])), np.array([1, 0, 1, 1]),
           [1, 1, 0, 1], jnp.asarray(np.ones(4, np.float32))),
    bad=(ones(3), ones((4, 1)), ones((1, 4)), True, 1, "abcd", np.array(list("abcd")),
         np.array([1, 0, None, 1], dtype=object), jnp.asarray(np.array([1, 2, 0, 1])),
         np.array([0.5, 1.0, 1.0, 1.0]), np.array([NAN, 1.0, 1.0, 1.0]), [1, 0, 1]),
)


def _loss(w, x):
  return jnp.sum((w["w"] - x) ** 2)


LOSS = _named(_loss, "loss")

NAME = Values(valid=(None, "clip", "layer_0.w"),
              bad=("", "a/b", "/", 1, b"clip", ["clip"], True, 1.5))
LEAF_METRICS = Values(valid=(True, False), bad=(1, 0, "yes", None, np.bool_(True), [True]))
NAMING = {"name": NAME, "leaf_metrics": LEAF_METRICS}

METRICS = {"clip/count": 10, "clip/clipped_count": 1, "clip/nonfinite_count": 0}


@dataclasses.dataclass(frozen=True)
class Target:
  """A public callable: valid base arguments, the swept arguments and the argument batteries
  (tested by their own tests below) that complete its signature."""

  name: str
  base: dict
  args: dict
  transform: bool = True
  batteries: tuple = ()

  @property
  def fn(self) -> Callable:
    return getattr(clipax, self.name)

  def __str__(self) -> str:
    return self.name


TARGETS = [
    Target("clip_by_global_norm", {"max_norm": 1.0},
           {"max_norm": THRESHOLD, "ord": ORD, "axis_name": AXIS_NAME,
            "replicated": REPLICATED, "specs": SPECS, "nonfinite": NONFINITE, **NAMING}),
    Target("clip_by_value", {"max_value": 1.0},
           {"max_value": THRESHOLD, "nonfinite": NONFINITE, **NAMING}),
    Target("clip_by_leaf_norm", {"max_norm": 1.0},
           {"max_norm": THRESHOLD, "ord": ORD, "nonfinite": NONFINITE, "layer_axis": LAYER_AXIS,
            "specs": SPECS, **NAMING}),
    Target("clip_by_block_rms", {"threshold": 1.0},
           {"threshold": THRESHOLD, "nonfinite": NONFINITE, "layer_axis": LAYER_AXIS,
            "specs": SPECS, **NAMING}),
    Target("adaptive_grad_clip", {"clipping": 0.1},
           {"clipping": THRESHOLD, "eps": Num(1e-3, low_open=True), "axes": AGC_AXES,
            "units": UNITS, "nonfinite": NONFINITE, "layer_axis": LAYER_AXIS, **NAMING}),
    Target("zclip", {"warmup_steps": 3},
           {"alpha": Num(0.97, low_open=True, high=1.0),
            "z_threshold": Num(2.5, low_open=True),
            "warmup_steps": Num(3, low=1, integer=True, static=True),
            "max_norm": OPTIONAL_THRESHOLD,
            "mode": Choice(("reciprocal", "mean", "zscore")),
            "warmup_stats": Choice(("robust", "mean")),
            "axis_name": AXIS_NAME, "specs": SPECS, "nonfinite": NONFINITE,
            **NAMING}),
    Target("autoclip", {"percentile": 10.0, "history": 4},
           {"percentile": Num(10.0, high=100.0, high_open=False),
            "history": Num(4, low=1, integer=True, static=True, length_only=True),
            "max_norm": OPTIONAL_THRESHOLD, "axis_name": AXIS_NAME, "specs": SPECS,
            "nonfinite": NONFINITE, **NAMING}),
    Target("adagc", {"warmup_steps": 3},
           {"ratio": Num(1.04, low_open=True), "beta": Num(0.99, high=1.0),
            "warmup_steps": Num(3, low=1, integer=True), "warmup_max_norm": THRESHOLD,
            "max_norm": OPTIONAL_THRESHOLD, "axis_name": AXIS_NAME, "specs": SPECS,
            "nonfinite": NONFINITE, "layer_axis": LAYER_AXIS, **NAMING}),
    Target("skip_nonfinite", {"inner": SGD},
           {"inner": INNER, "max_consecutive": Num(2, integer=True, optional=True),
            "axis_name": AXIS_NAME, "specs": SPECS, **NAMING}),
    Target("skip_spikes", {"inner": SGD},
           {"inner": INNER,
            "window": Num(8, low=2, integer=True, static=True, length_only=True),
            "threshold": Num(6.0, low_open=True),
            # in [2, window]; the base keeps the default window=128
            "warmup": Num(4, low=2, high=128, high_open=False, integer=True, optional=True,
                          static=True),
            "max_consecutive": Num(2, integer=True, optional=True), "axis_name": AXIS_NAME,
            "specs": SPECS, "on": Choice(("norm",)),
            "loss_threshold": Num(6.0, low_open=True, optional=True), **NAMING}),
    Target("clip_by_group_norm", {"labels": "g", "max_norm": 1.0},
           {"labels": LABELS,
            "max_norm": dataclasses.replace(
                OPTIONAL_THRESHOLD, valid=(*THRESHOLD.valid, {"g": 1.0}, {"g": None})),
            "ord": ORD, "axis_name": AXIS_NAME, "replicated": REPLICATED,
            "nonfinite": NONFINITE, "leaf_metrics": LEAF_METRICS}),
    Target("clip_by_subset_norm", {"labels": "g", "max_norm": 1.0},
           {"labels": LABELS, "max_norm": THRESHOLD, "measure": LABEL_SET, "apply": LABEL_SET,
            "ord": ORD, "axis_name": AXIS_NAME, "replicated": REPLICATED,
            "nonfinite": NONFINITE, **NAMING}),
    Target("clip_update_rms", {"inner": optax.adam(1e-3)},
           {"inner": ADAM_INNER, "b2": Num(0.999, high=1.0), "eps": Num(1e-8, low_open=True),
            "max_rms": Num(1.0, low_open=True, allow_inf=True), "name": NAME}),
    Target("stable_adamw", {"learning_rate": 1e-3},
           {"learning_rate": Num(1e-3, valid=(SCHEDULE, _named(lambda c: 0.1, "lr_fn"))),
            "b1": Num(0.9, high=1.0), "b2": Num(0.999, high=1.0),
            "eps": Num(1e-8, low_open=True), "weight_decay": Num(1e-4),
            "max_rms": Num(1.0, low_open=True, allow_inf=True), "name": NAME}),
    Target("clippy", {"inner": SGD},
           {"inner": INNER, "relative": Num(0.5), "absolute": Num(1e-2), "name": NAME}),
    Target("clip_per_example", {"max_norm": 1.0},
           {"max_norm": Num(1.0, low_open=True, allow_inf=True), "normalize": BOOL,
            "gamma": Num(0.01, low_open=True), "reduce": Choice(("sum", "mean")),
            "axis_name": AXIS_NAME, "name": NAME}),
    Target("spam", {"learning_rate": 0.1},
           {"learning_rate": Num(0.1, valid=(SCHEDULE, _named(lambda c: 0.1, "lr_fn"))),
            "b1": Num(0.9, high=1.0), "b2": Num(0.999, high=1.0),
            "eps": Num(1e-6, low_open=True), "theta": Num(5000.0),
            "reset_interval": Num(500, low=1, integer=True),
            "warmup_steps": Num(150, integer=True), "weight_decay": Num(0.01), "name": NAME}),
    Target("monitor", {},
           {"ord": ORD, "axis_name": AXIS_NAME, "replicated": REPLICATED, "specs": SPECS,
            **NAMING}),
    Target("clip_with_norm", {"tree": GRADS, "norm": 2.0, "max_norm": 1.0},
           {"max_norm": THRESHOLD, "nonfinite": NONFINITE},
           transform=False, batteries=("tree", "norm")),
    Target("global_norm", {"tree": GRADS},
           {"ord": ORD, "axis_name": AXIS_NAME_OUTSIDE_SHARD_MAP, "replicated": REPLICATED_NOW,
            "specs": SPECS_NOW},
           transform=False, batteries=("tree",)),
    Target("leaf_norms", {"tree": GRADS},
           {"ord": ORD, "axis_name": AXIS_NAME_OUTSIDE_SHARD_MAP, "replicated": REPLICATED_NOW,
            "specs": SPECS_NOW, "layer_axis": LAYER_AXIS_NOW},
           transform=False, batteries=("tree",)),
    Target("unitwise_norms", {"tree": GRADS}, {"axes": UNITWISE_AXES, "units": UNITS},
           transform=False, batteries=("tree",)),
    Target("metrics", {"opt_state": clipax.clip_by_global_norm(1.0).init(None)},
           {"prefix": METRICS_PREFIX}, transform=False, batteries=("opt_state",)),
    Target("diagnose", {"metrics_or_state": METRICS},
           {"window": Num(100, low=1, integer=True, arrays=False),
            "clip_rate_high": Num(0.5, low_open=True, high=1.0, high_open=False, arrays=False),
            "min_steps": Num(100, integer=True, arrays=False),
            "spike_factor": Num(10.0, low=1.0, low_open=True, arrays=False),
            "threshold_factor": Num(10.0, low=1.0, low_open=True, arrays=False),
            "prefix": PREFIX},
           transform=False, batteries=("metrics_or_state",)),
    Target("suggest_max_norm", {"norms": [1.0, 2.0, 3.0]},
           {"percentile": Num(95.0, low_open=True, high=100.0, high_open=False, arrays=False),
            "margin": Num(1.2, low=1.0, arrays=False),
            "window": Num(1000, low=1, integer=True, optional=True, arrays=False),
            "ignore_nonfinite": BOOL},
           transform=False, batteries=("norms",)),
    Target("per_example_clip", {"grads": PER_EXAMPLE, "max_norm": 1.0},
           {"max_norm": Num(1.0, low_open=True, allow_inf=True), "mask": MASK,
            "normalize": BOOL, "gamma": Num(0.01, low_open=True),
            "reduce": Choice(("sum", "mean")), "axis_name": AXIS_NAME_OUTSIDE_SHARD_MAP},
           transform=False, batteries=("grads",)),
    Target("per_example_clipped_grad", {"loss_fn": LOSS, "max_norm": 1.0},
           {"loss_fn": Values(valid=(LOSS, jax.jit(_loss)), bad=(None, 1, "loss", object(),
                                                                  [LOSS], (LOSS,))),
            "max_norm": Num(1.0, low_open=True, allow_inf=True),
            "microbatch_size": Num(2, low=1, integer=True, optional=True, arrays=False),
            "normalize": BOOL, "gamma": Num(0.01, low_open=True),
            "reduce": Choice(("sum", "mean")), "axis_name": AXIS_NAME},
           transform=False, batteries=("loss_fn",)),
]
BY_NAME = {t.name: t for t in TARGETS}
TRANSFORMS = [t for t in TARGETS if t.transform]


# ----------------------------------------------------------------------------- running a case


ORDER = {"call": 0, "build": 0, "init": 1, "update": 2}

# (the stage that raised, the exception, what an update that ran did wrong)
Outcome = tuple[str | None, BaseException | None, str]


def _numeric(tree: Any) -> bool:
  """Whether every leaf is a number or a numeric array (so ``jax.eval_shape`` can take it)."""
  return all(isinstance(x, (int, float, complex, np.generic))
             or isinstance(x, (jax.Array, np.ndarray))
             and (x.dtype.kind in "biufc" or jnp.issubdtype(x.dtype, jnp.floating))  # bfloat16
             for x in jax.tree_util.tree_leaves(tree))


def _shapes(tree: Any) -> Any:
  return jax.tree_util.tree_map(lambda x: (tuple(np.shape(x)), str(x.dtype)), tree)


def step(tx: optax.GradientTransformation, state: Any, grads: Any, params: Any) -> str:
  """One update, traced but not compiled (``jax.eval_shape``) when the trees hold numbers, else
  eager. Returns what went wrong when it ran: updates or state of another shape or dtype."""
  if _numeric((grads, params)):
    out, new_state = jax.eval_shape(tx.update, grads, state, params)
  else:
    out, new_state = tx.update(grads, state, params)
  changed = [what for what, new, old in [("updates", out, grads), ("state", new_state, state)]
             if _shapes(new) != _shapes(old)]
  return f"; update changed the shape or dtype of the {' and '.join(changed)}" if changed else ""


def call(fn: Callable, *args, abstract: bool = False, **kwargs) -> Any:
  """``fn(*args, **kwargs)``; with ``abstract``, traced but not compiled (``jax.eval_shape``)
  over its tree (the first positional argument, or ``tree=``) when that holds numbers only."""
  if abstract and args and _numeric(args[0]):
    return jax.eval_shape(lambda t: fn(t, *args[1:], **kwargs), args[0])
  for key in ("tree", "grads"):
    if abstract and key in kwargs and _numeric(kwargs[key]):
      return jax.eval_shape(lambda t, k=key: fn(**{**kwargs, k: t}), kwargs[key])
  return fn(*args, **kwargs)


def attempt(
    target: Target,
    kwargs: dict,
    *,
    params: Any = PARAMS,
    grads: Any = GRADS,
    update: bool = True,
    factory: Callable | None = None,
) -> Outcome:
  """Runs construction (for a transformation: then ``init``, then one ``update``)."""
  fn = factory or target.fn
  stage = "build" if target.transform else "call"
  try:
    if not target.transform:
      call(fn, abstract=True, **kwargs)
      return None, None, ""
    out = fn(**kwargs)
    stage = "init"
    state = out.init(params)
    if not update:
      return None, None, ""
    stage = "update"
    return None, None, step(out, state, grads, params)
  except Exception as err:  # noqa: BLE001 - every exception is classified by judge
    return stage, err, ""


def _run_fn(fn: Callable, *args, abstract: bool = False) -> Outcome:
  try:
    call(fn, *args, abstract=abstract)
  except Exception as err:  # noqa: BLE001
    return "call", err, ""
  return None, None, ""


def _run_update(tx: optax.GradientTransformation, init_params: Any, grads: Any,
                params: Any) -> Outcome:
  stage = "init"
  try:
    state = tx.init(init_params)
    stage = "update"
    return None, None, step(tx, state, grads, params)
  except Exception as err:  # noqa: BLE001
    return stage, err, ""


def _origin(err: BaseException) -> str:
  """Empty when clipax raised ``err`` itself (a ``raise`` in clipax); else where it came from."""
  frames = traceback.extract_tb(err.__traceback__)
  if not frames:
    return ""
  last = frames[-1]
  path = last.filename.replace(os.sep, "/")
  if "/clipax/" in path and (last.line or "").lstrip().startswith("raise"):
    return ""
  if "site-packages/" in path:
    path = path.split("site-packages/")[-1]
  elif "/clipax/" in path:
    path = "clipax/" + path.split("/clipax/")[-1]
  return f" (raised in {path}:{last.lineno})"


def _text(err: BaseException) -> str:
  msg = " ".join(str(err).split())
  return msg if len(msg) <= 200 else msg[:197] + "..."


def value_words(value: Any) -> tuple:
  """How an error message names a python scalar or string value (nothing for other values)."""
  if isinstance(value, np.generic):
    return (str(value),)
  if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
    return (repr(value),)
  return ()


def judge(outcome: Outcome, expect: tuple, allowed: str = "init") -> str | None:
  """``None`` when a bad input got a clear error in time; else the failure, classified."""
  stage, err, note = outcome
  if err is None:
    return f"(b) no error{note}"
  where = _origin(err)
  text = f"{type(err).__name__} at {stage}{where}: {_text(err)}"
  if not isinstance(err, (ValueError, TypeError)) or where:
    return f"(a) {text}"
  missing = [s for s in expect if s not in str(err)]
  if missing:
    return f"(c) message lacks {missing}: {text}"
  if ORDER[stage] > ORDER[allowed]:
    return f"(b) accepted at construction and init, clear error only at update: {text}"
  return None


def short(value: Any) -> str:
  """A short, readable spelling of a test value (for ids and failure reports)."""
  if isinstance(value, AtUpdate):
    return f"{short(value.value)}@update"
  if isinstance(value, dict):
    text = "{" + ", ".join(f"{k!r}: {short(v)}" for k, v in value.items()) + "}"
  elif isinstance(value, list):
    text = "[" + ", ".join(map(short, value)) + "]"
  elif isinstance(value, optax.GradientTransformation):
    text = "GradientTransformation"
  elif isinstance(value, tuple) and not hasattr(value, "_fields"):
    text = "(" + ", ".join(map(short, value)) + ("," if len(value) == 1 else "") + ")"
  elif isinstance(value, tuple):
    text = f"{type(value).__name__}(...)"
  elif isinstance(value, (jax.Array, np.ndarray)):
    lib = "jnp" if isinstance(value, jax.Array) else "np"
    if value.ndim == 0:
      text = f"{lib}.asarray({value.item()!r}, {value.dtype})"
    else:
      text = f"{lib}:{value.dtype}{list(value.shape)}"
  elif callable(value):
    text = getattr(value, "__name__", type(value).__name__)
  elif type(value) is object:
    text = "object()"
  else:
    text = repr(value)
  return text if len(text) <= 80 else text[:77] + "..."


def call_text(target: Target, arg: str, value: Any, factory: str | None = None) -> str:
  head = factory or f"clipax.{target.name}"
  base = {k: v for k, v in target.base.items() if k != arg}
  shown = ", ".join(f"{k}={short(v)}" for k, v in [*base.items(), (arg, value)])
  tail = ".init(params)" if target.transform else ""
  return f"{head}({shown}){tail}"


# ----------------------------------------------------------------------------- generated cases


_RESULTS: dict[str, str | None] = {}


@dataclasses.dataclass(frozen=True)
class Case:
  """One bad input and the words its error must contain."""

  id: str
  call: str
  run: Callable[[], Outcome]
  expect: tuple
  allowed: str = "init"

  def failure(self) -> str | None:
    """The classified failure (``None``: a clear error in time); computed once."""
    if self.id not in _RESULTS:
      _RESULTS[self.id] = judge(self.run(), self.expect, self.allowed)
    return _RESULTS[self.id]


def _arg_cases() -> list[Case]:
  cases = []
  for target in TARGETS:
    for arg, spec in target.args.items():
      seen: dict[str, int] = {}
      for item in spec.bad_values():
        late = isinstance(item, AtUpdate)
        value = item.value if late else item
        kwargs = {**target.base, arg: value}
        expect = (f"`{arg}`", *value_words(value))
        label = short(item)
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:  # e.g. two transformations, two float arrays of one shape
          label = f"{label}#{seen[label]}"
        cases.append(Case(
            id=f"{target.name}-{arg}={label}",
            call=call_text(target, arg, value),
            run=lambda t=target, kw=kwargs: attempt(t, kw),
            expect=expect,
            allowed="update" if late else "init",
        ))
  return cases


def _valid_arg_values() -> list[tuple[Target, str, list]]:
  """Per swept argument, its documented valid values (the default first)."""
  out = []
  for target in TARGETS:
    sig = inspect.signature(target.fn)
    for arg, spec in target.args.items():
      default = sig.parameters[arg].default
      values = spec.valid_values()
      if default is not inspect.Parameter.empty:
        values = [default, *values]
      out.append((target, arg, _unique(values)))
  return out


def rejected(target: Target, arg: str, values: list) -> list[str]:
  """The valid values among ``values`` that construction or init refused."""
  out = []
  for value in values:
    stage, err, _ = attempt(target, {**target.base, arg: value}, update=False)
    if err is not None:
      out.append(f"{call_text(target, arg, value)} raised at {stage}: {type(err).__name__}: "
                 f"{_text(err)}")
  return out


def _inject_cases() -> list[Case]:
  cases = []
  for target in TRANSFORMS:
    for arg, spec in target.args.items():
      if not hasattr(spec, "inject_values"):
        continue
      for item in spec.inject_values():
        late = isinstance(item, AtUpdate)  # only the update (with traced hyperparameters) knows
        value = item.value if late else item
        kwargs = {**target.base, arg: value}
        factory = optax.inject_hyperparams(target.fn)
        cases.append(Case(
            id=f"inject_hyperparams({target.name})-{arg}={short(item)}",
            call=call_text(target, arg, value, f"optax.inject_hyperparams(clipax.{target.name})"),
            run=lambda t=target, kw=kwargs, f=factory, u=late: attempt(t, kw, factory=f, update=u),
            expect=(f"`{arg}`",),
            allowed="update" if late else "init",
        ))
  return cases


# Bad values of one argument that only another argument makes bad, and values whose error names
# an entry (``max_norm['g']``) rather than the argument: (target, kwargs, words the error must
# hold); each is run through build, init and update like a swept value (kwargs in an AtUpdate:
# the error may come at update).
COMBINATIONS = [
    *((name, {"specs": {"w": P(), "b": P()}, "axis_name": "i"}, ("`specs`", "axis_name"))
      for name in ("clip_by_global_norm", "zclip", "autoclip", "adagc", "skip_nonfinite",
                   "skip_spikes", "monitor", "global_norm", "leaf_norms")),
    # the specs describe the stacked leaves, not their layers: refused by the per-leaf clippers
    *((name, {"specs": specs, "layer_axis": axis}, ("`specs`", "`layer_axis`"))
      for name in ("clip_by_leaf_norm", "clip_by_block_rms", "adagc")
      for specs, axis in [({"w": P(), "b": P()}, 0), ("varying", NO_LAYERS)]),
    *((name, {"specs": "varying", "replicated": True}, ("`specs`", "replicated"))
      for name in ("clip_by_global_norm", "monitor", "global_norm", "leaf_norms")),
    ("clip_per_example", {"max_norm": INF, "normalize": True}, ("`max_norm`", "inf")),
    ("per_example_clip", {"max_norm": INF, "normalize": True}, ("`max_norm`", "inf")),
    ("per_example_clipped_grad", {"max_norm": INF, "normalize": True}, ("`max_norm`", "inf")),
    ("clip_by_group_norm", {"max_norm": {"g": -1.0}}, ("`max_norm['g']`", "-1.0")),
    ("clip_by_group_norm", {"max_norm": {"g": NAN}}, ("`max_norm['g']`", "nan")),
    ("clip_by_group_norm", {"max_norm": {"g": "1.0"}}, ("`max_norm['g']`", "'1.0'")),
    ("clip_by_group_norm", {"max_norm": {"g": ones(2)}}, ("`max_norm['g']`", "shape")),
    ("clip_by_group_norm", {"max_norm": {}}, ("`max_norm`", "'g'")),
    ("clip_by_group_norm", {"max_norm": {"h": 1.0}}, ("`max_norm`", "'g'")),
    ("clip_by_group_norm", {"max_norm": {"g": 1.0, "h": 1.0}}, ("`max_norm`", "'h'")),
    ("clip_by_group_norm", {"max_norm": {1: 1.0}}, ("`max_norm`", "1")),
    ("clip_by_group_norm", {"labels": LABEL_FN, "max_norm": {"m": 1.0}}, ("`max_norm`", "'v'")),
    ("clip_by_subset_norm", {"labels": LABEL_FN, "measure": "g"}, ("`measure`", "'g'")),
    ("clip_by_subset_norm", {"labels": {"w": "m", "b": "v"}, "apply": ["v", "x"]},
     ("`apply`", "'x'")),
]


def _combination_cases() -> list[Case]:
  cases = []
  for name, item, expect in COMBINATIONS:
    late = isinstance(item, AtUpdate)
    extra = item.value if late else item
    target = BY_NAME[name]
    kwargs = {**target.base, **extra}
    shown = ", ".join(f"{k}={short(v)}" for k, v in kwargs.items())
    cases.append(Case(
        id=f"{name}-{'-'.join(f'{k}={short(v)}' for k, v in extra.items())}",
        call=f"clipax.{name}({shown})" + (".init(params)" if target.transform else ""),
        run=lambda t=target, kw=kwargs: attempt(t, kw),
        expect=expect,
        allowed="update" if late else "init",
    ))
  return cases


# Bad leaves: each tree pairs a fine leaf "ok" with the bad leaf "bad", whose path is "['bad']".
BAD_LEAVES = {
    "str": "abc",
    "bytes": b"abc",
    "int_array": jnp.asarray(np.arange(3)),
    "uint_array": np.arange(3, dtype=np.uint8),
    "bool_array": jnp.asarray(np.array([True, False])),
    "python_int": 3,
    "python_bool": True,
    "object": object(),
    "numpy_str_array": np.array(["a", "b"]),
    "numpy_object_array": np.array([1.0, "a"], dtype=object),
}
VALID_TREES = {
    "float32": {"w": ones(2)},
    "none_leaf": {"w": ones(2), "n": None},
    "empty": {},
    "python_float": {"w": 1.5},
    "numpy": {"w": np.ones(3, np.float32)},
    "complex": {"w": ones(2, jnp.complex64)},
    "zero_size": {"w": ones((0, 3))},
}
TREE_FUNCTIONS = {
    "global_norm": clipax.global_norm,
    "leaf_norms": clipax.leaf_norms,
    "unitwise_norms": clipax.unitwise_norms,
    "clip_with_norm": lambda tree: clipax.clip_with_norm(tree, 2.0, 1.0),
}


def _tree_cases() -> list[Case]:
  cases = []
  leaves = dict(BAD_LEAVES)
  for label, leaf in leaves.items():
    tree = {"ok": ones(2), "bad": leaf}
    for name, fn in TREE_FUNCTIONS.items():
      cases.append(Case(
          id=f"{name}-tree-{label}",
          call=f"clipax.{name}({short(tree)})",
          run=lambda f=fn, t=tree: _run_fn(f, t, abstract=True),
          expect=("['bad']",),
      ))
    for target in TRANSFORMS:
      kwargs = dict(target.base)
      shown = ", ".join(f"{k}={short(v)}" for k, v in kwargs.items())
      cases.append(Case(
          id=f"{target.name}-tree-{label}",
          call=f"tx = clipax.{target.name}({shown}); tx.update(t, tx.init(t), t), "
               f"t = {short(tree)}",
          run=lambda tg=target, kw=kwargs, t=tree: attempt(tg, kw, params=t, grads=t),
          expect=("['bad']",),
          allowed="update",
      ))
  for label, leaf in [("complex64", ones(2, jnp.complex64)), ("complex_python", 1 + 2j)]:
    tree = {"ok": ones(2), "bad": leaf}
    cases.append(Case(
        id=f"spam-tree-{label}",
        call=f"tx = clipax.spam(0.1); tx.update(t, tx.init(t), t), t = {short(tree)}",
        run=lambda t=tree: attempt(BY_NAME["spam"], {"learning_rate": 0.1}, params=t, grads=t),
        expect=("['bad']", "complex"),
    ))
    other = {"ok": ones(2), "bad": ones(2)}
    cases.append(Case(
        id=f"spam-grads-{label}",
        call=f"tx = clipax.spam(0.1); tx.update({short(tree)}, tx.init(p), p), p = {short(other)}",
        run=lambda t=tree, p=other: _run_update(clipax.spam(0.1), p, t, p),
        expect=("['bad']", "complex"),
        allowed="update",
    ))
  deep = {"ok": ones(2), "bad": ones((2,) * 6)}
  cases.append(Case(
      id="unitwise_norms-tree-rank6",
      call="clipax.unitwise_norms({'ok': ones(2), 'bad': ones((2,) * 6)})",
      run=lambda: _run_fn(clipax.unitwise_norms, deep, abstract=True),
      expect=("['bad']",),
  ))
  return cases


# The transformations whose state (or update) depends on the parameters' structure.
_STRUCTURED = {
    "adagc": ("clipax.adagc()", clipax.adagc()),
    "spam": ("clipax.spam(0.1)", clipax.spam(0.1)),
    "spam_decay": ("clipax.spam(0.1, weight_decay=0.1)", clipax.spam(0.1, weight_decay=0.1)),
    "agc": ("clipax.adaptive_grad_clip(0.1)", clipax.adaptive_grad_clip(0.1)),
}
_OTHER_SHAPE = {"w": ones((3, 2)), "b": ones(3)}
_MISMATCHES = [
    # (id, transformation, init params, update grads, update params, words the error must hold)
    ("missing_leaf", "adagc", PARAMS, {"w": GRADS["w"]}, None, ("structure",)),
    ("extra_leaf", "adagc", PARAMS, {**GRADS, "c": ones(2)}, None, ("structure",)),
    ("list_for_dict", "adagc", PARAMS, [GRADS["w"], GRADS["b"]], None, ("structure",)),
    ("init_none", "adagc", None, GRADS, None, ("init(params)",)),
    ("missing_leaf", "spam", PARAMS, {"w": GRADS["w"]}, None, ("structure",)),
    ("init_none", "spam", None, GRADS, None, ("structure",)),
    ("shape", "spam", PARAMS, _OTHER_SHAPE, None, ("['w']", "shape")),
    ("broadcastable_shape", "spam", PARAMS, {"w": ones((1, 3)), "b": ones(3)}, None,
     ("['w']", "shape")),
    ("params_none", "spam_decay", PARAMS, GRADS, None, ("`params`",)),
    ("params_structure", "spam_decay", PARAMS, GRADS, {"w": PARAMS["w"]}, ("structure",)),
    ("params_shape", "spam_decay", PARAMS, GRADS, _OTHER_SHAPE, ("['w']", "shape")),
    ("params_broadcastable_shape", "spam_decay", PARAMS, GRADS,
     {"w": ones((2, 1)), "b": ones(3)}, ("['w']", "shape")),
    ("params_none", "agc", PARAMS, GRADS, None, ("`params`",)),
    ("params_structure", "agc", PARAMS, GRADS, {"w": PARAMS["w"]}, ("structure",)),
    ("params_list", "agc", PARAMS, GRADS, [PARAMS["b"], PARAMS["w"]], ("structure",)),
    ("params_shape", "agc", PARAMS, GRADS, _OTHER_SHAPE, ("['w']", "shape")),
    ("params_broadcastable_shape", "agc", PARAMS, GRADS,
     {"w": ones((1, 3)), "b": ones(3)}, ("['w']", "shape")),
]


def _mismatch_cases() -> list[Case]:
  cases = []
  for name, which, p0, g, p, expect in _MISMATCHES:
    text, tx = _STRUCTURED[which]
    cases.append(Case(
        id=f"mismatch-{which}-{name}",
        call=f"tx = {text}; tx.update({short(g)}, tx.init({short(p0)}), {short(p)})",
        run=lambda tx=tx, p0=p0, g=g, p=p: _run_update(tx, p0, g, p),
        expect=expect,
        allowed="update",
    ))
  return cases


NORM_BAD = ["abc", None, ones(2), [1.0, 2.0], True, 1 + 2j, jnp.asarray(1 + 2j), object(),
            zeros((1,)), -1.0, jnp.asarray(-1.0), np.float32(-0.5)]
NORM_VALID = [2.0, 0.0, 3, jnp.asarray(2.0), np.float32(2.0), jnp.asarray(2.0, jnp.bfloat16),
              jnp.asarray(2, jnp.int32), NAN, INF]


def _norm_cases() -> list[Case]:
  return [
      Case(id=f"clip_with_norm-norm={short(v)}",
           call=f"clipax.clip_with_norm(grads, {short(v)}, 1.0)",
           run=lambda v=v: _run_fn(clipax.clip_with_norm, GRADS, v, 1.0, abstract=True),
           expect=("`norm`",))
      for v in NORM_BAD
  ]


PER_EXAMPLE_BAD = [
    # (label, per-example grads, words the error must hold)
    *((label, {"ok": ones(2), "bad": leaf}, ("`grads`", "['bad']"))
      for label, leaf in BAD_LEAVES.items()),
    ("empty", {}, ("`grads`",)),
    ("none", None, ("`grads`",)),
    ("scalar_leaf", {"ok": ones(2), "bad": jnp.asarray(1.0)}, ("`grads`", "['bad']")),
    ("python_float", {"ok": ones(2), "bad": 1.5}, ("`grads`", "['bad']")),
    ("batch_sizes", {"ok": ones(2), "bad": ones((3, 2))}, ("`grads`", "['bad']", "['ok']")),
]
PER_EXAMPLE_VALID = {
    "one_leaf": {"w": ones((4, 3))},
    "none_leaf": {"w": ones((4, 3)), "n": None},
    "bfloat16": {"w": ones((4, 3), jnp.bfloat16), "b": ones(4)},
    "complex": {"w": ones((2, 3), jnp.complex64)},
    "empty_batch": {"w": ones((0, 3))},
}


def _loss_vector(w, x):
  return (w["w"] - x) ** 2


def _loss_int(w, x):
  return jnp.sum(w["w"] - x).astype(jnp.int32)


def _loss_aux(w, x):
  return _loss(w, x), {"aux": x}


_P1 = {"w": ones(3)}
_XS = ones((4, 3))
GRAD_FN_BAD = [
    # (label, loss_fn, microbatch_size, batch, mask, words the error must hold)
    ("loss_vector", _loss_vector, None, (_XS,), None, ("`loss_fn`", "shape (3,)")),
    ("loss_vector_microbatched", _loss_vector, 2, (_XS,), None, ("`loss_fn`",)),
    ("loss_int", _loss_int, None, (_XS,), None, ("`loss_fn`", "int32")),
    ("loss_aux", _loss_aux, None, (_XS,), None, ("`loss_fn`", "tuple")),
    ("no_batch", _loss, None, (), None, ("batch",)),
    ("batch_scalar", _loss, None, (jnp.asarray(1.0),), None, ("`batch`", "[0]")),
    ("batch_str", _loss, None, ("abc",), None, ("`batch`", "[0]")),
    ("batch_sizes", _loss, None, (_XS, ones(3)), None, ("`batch`", "[1]")),
    ("mask_shape", _loss, None, (_XS,), ones(3), ("`mask`", "(4,)")),
    ("mask_values", _loss, None, (_XS,), np.array([2, 0, 1, 1]), ("`mask`",)),
    ("mask_str", _loss, None, (_XS,), np.array(list("abcd")), ("`mask`",)),
    ("microbatch_size", _loss, 3, (_XS,), None, ("`microbatch_size`", "(3)", "(4)")),
]


def _run_grad_fn(loss_fn: Callable, microbatch_size: Any, batch: tuple, mask: Any) -> Outcome:
  stage = "build"
  try:
    fn = clipax.per_example_clipped_grad(loss_fn, 1.0, microbatch_size=microbatch_size)
    stage = "call"
    if _numeric(batch):
      jax.eval_shape(lambda p, *b: fn(p, *b, mask=mask), _P1, *batch)
    else:
      fn(_P1, *batch, mask=mask)
  except Exception as err:  # noqa: BLE001
    return stage, err, ""
  return None, None, ""


def _per_example_cases() -> list[Case]:
  cases = [
      Case(id=f"per_example_clip-grads={label}", call=f"clipax.per_example_clip({short(g)}, 1.0)",
           run=lambda g=g: _run_fn(lambda t: clipax.per_example_clip(t, 1.0), g, abstract=True),
           expect=expect)
      for label, g, expect in PER_EXAMPLE_BAD
  ]
  for label, loss_fn, size, batch, mask, expect in GRAD_FN_BAD:
    cases.append(Case(
        id=f"per_example_clipped_grad-fn-{label}",
        call=f"clipax.per_example_clipped_grad({short(loss_fn)}, 1.0, microbatch_size={size})"
             f"(params, {', '.join(map(short, batch))}, mask={short(mask)})",
        run=lambda f=loss_fn, n=size, b=batch, m=mask: _run_grad_fn(f, n, b, m),
        expect=expect,
        allowed="call",
    ))
  return cases


_HISTORY = [dict(METRICS, **{"clip/count": i + 1}) for i in range(3)]
DIAGNOSE_BAD = [
    # (label, metrics_or_state, words the error must hold)
    ("none", None, ("`metrics_or_state`",)),
    ("empty_list", [], ("`metrics_or_state`",)),
    ("empty_dict", {}, ("`metrics_or_state`",)),
    ("str", "clip/count", ("`metrics_or_state`",)),
    ("int", 5, ("`metrics_or_state`",)),
    ("non_str_keys", {1: 2}, ("`metrics_or_state`",)),
    ("no_count", {"clip/clip_rate": 0.5}, ("`metrics_or_state`",)),
    ("entry_not_dict", [METRICS, 5], ("`metrics_or_state[1]`",)),
    ("entry_missing_key", [METRICS, {"clip/count": 2}], ("`metrics_or_state[1]`",)),
    ("entry_str_value", [METRICS, dict(METRICS, **{"clip/count": "x"})],
     ("`metrics_or_state[1]`", "clip/count")),
    ("str_value", dict(METRICS, **{"clip/count": "ten"}), ("clip/count",)),
    ("complex_value", dict(METRICS, **{"clip/count": 1 + 2j}), ("clip/count",)),
    ("none_value", dict(METRICS, **{"clip/count": None}), ("clip/count",)),
    # nothing says whether anything was clipped, skipped or spiked: no verdict can be given
    ("only_count", {"clip/count": 10}, ("clipped_count",)),
    ("negative_count", dict(METRICS, **{"clip/count": -1}), ("clip/count",)),
    ("nan_count", dict(METRICS, **{"clip/count": NAN}), ("clip/count",)),
    ("fractional_count", dict(METRICS, **{"clip/count": 2.5}), ("clip/count",)),
    ("negative_clipped_count", dict(METRICS, **{"clip/clipped_count": -3}),
     ("clip/clipped_count",)),
    ("clipped_count_over_count", dict(METRICS, **{"clip/clipped_count": 20}),
     ("clip/clipped_count",)),
    ("unequal_lengths", {"clip/count": [1, 2, 3], "clip/clipped_count": [0, 0],
                         "clip/nonfinite_count": [0, 0, 0]}, ("clip/clipped_count",)),
    ("zero_length", {"clip/count": [], "clip/clipped_count": [], "clip/nonfinite_count": []},
     ("clip/count",)),
]
DIAGNOSE_VALID = [
    ("totals", METRICS),
    ("history", _HISTORY),
    ("arrays", {k: np.asarray([v]) for k, v in METRICS.items()}),
    ("jax_scalars", {k: jnp.asarray(v) for k, v in METRICS.items()}),
    ("optax_state", optax.chain(clipax.clip_by_global_norm(1.0), optax.sgd(0.1)).init(PARAMS)),
    ("nan_norm", dict(METRICS, **{"clip/norm": NAN, "clip/nonfinite_count": 1})),
]


def _diagnose_cases() -> list[Case]:
  return [
      Case(id=f"diagnose-metrics_or_state={label}", call=f"clipax.diagnose({short(value)})",
           run=lambda v=value: _run_fn(clipax.diagnose, v), expect=expect)
      for label, value, expect in DIAGNOSE_BAD
  ]


NORMS_BAD = [
    # (label, norms, extra kwargs, words the error must hold)
    ("none", None, {}, ("`norms`",)),
    ("str", "1.0 2.0", {}, ("`norms`",)),
    ("bytes", b"abc", {}, ("`norms`",)),
    ("dict", {"a": 1.0}, {}, ("`norms`",)),
    ("empty_list", [], {}, ("`norms`",)),
    ("empty_array", np.zeros((0,)), {}, ("`norms`",)),
    ("empty_jax", zeros((0,)), {}, ("`norms`",)),
    ("str_element", [1.0, "x"], {}, ("`norms[1]`",)),
    ("none_element", [1.0, None], {}, ("`norms[1]`",)),
    ("negative", [-1.0, 1.0], {}, ("`norms[0]`",)),
    ("nan", [1.0, NAN], {}, ("`norms[1]`",)),
    ("inf", [INF], {}, ("`norms[0]`",)),
    ("minus_inf", [1.0, -INF], {}, ("`norms[1]`",)),
    ("ragged", [[1.0, 2.0], [3.0]], {}, ("`norms`",)),
    ("complex", [1 + 2j], {}, ("`norms[0]`",)),
    ("bools", [True, False], {}, ("`norms[0]`",)),
    ("object", object(), {}, ("`norms",)),
    ("all_nan_ignored", [NAN, NAN], {"ignore_nonfinite": True}, ("`norms`",)),
    ("negative_ignored", [1.0, -2.0], {"ignore_nonfinite": True}, ("`norms[1]`",)),
]
NORMS_VALID = [
    ("list", [1.0, 2.0, 3.0]),
    ("ints", (1, 2, 3)),
    ("numpy", np.linspace(1.0, 2.0, 11)),
    ("jax", jnp.asarray([1.0, 2.0])),
    ("numpy_scalars", [np.float32(1.0), np.float64(2.0)]),
    ("jax_scalars", [jnp.asarray(1.0), jnp.asarray(2.0)]),
    ("two_d", [[1.0, 2.0], [3.0, 4.0]]),
]


def _kw_text(kw: dict) -> str:
  return "".join(f", {k}={v!r}" for k, v in kw.items())


def _norms_cases() -> list[Case]:
  return [
      Case(id=f"suggest_max_norm-norms={label}",
           call=f"clipax.suggest_max_norm({short(value)}{_kw_text(kw)})",
           run=lambda v=value, kw=kw: _run_fn(lambda: clipax.suggest_max_norm(v, **kw)),
           expect=expect)
      for label, value, kw, expect in NORMS_BAD
  ]


def _all_cases() -> list[Case]:
  return (_arg_cases() + _inject_cases() + _tree_cases() + _mismatch_cases() + _norm_cases()
          + _diagnose_cases() + _norms_cases() + _per_example_cases() + _combination_cases())


CASES = _all_cases()
VALID = _valid_arg_values()


# ----------------------------------------------------------------------------- tests


def test_the_table_covers_every_public_callable():
  """Every function of ``clipax.__all__`` is in the table, with every parameter of its signature
  either swept or given a battery, and every swept argument documented in its ``Args``."""
  names = set(clipax.__all__)
  assert CONTAINERS <= names
  for name in sorted(names - CONTAINERS):
    obj = getattr(clipax, name)
    assert callable(obj) and not inspect.isclass(obj), name
    assert name in BY_NAME, f"clipax.{name} is public but not in the bad-input table"
    target = BY_NAME[name]
    params = set(inspect.signature(obj).parameters)
    covered = set(target.args) | set(target.batteries)
    assert params == covered, f"{name}: signature {sorted(params)} vs table {sorted(covered)}"
    args_doc = (inspect.getdoc(obj) or "").split("Args:")[-1].split("Returns:")[0]
    for arg in params:
      assert f"{arg}:" in args_doc, f"{name}: `{arg}` is not documented in Args"
  for name in CONTAINERS:
    assert inspect.isclass(getattr(clipax, name)), name


def test_the_sweep_is_large_and_ids_are_unique():
  assert len(CASES) >= 500
  assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_a_clear_error(case):
  failure = case.failure()
  if failure is not None:
    pytest.fail(f"{case.call}\n  -> {failure}", pytrace=False)


@pytest.mark.parametrize(("target", "arg", "values"), VALID,
                         ids=[f"{t.name}-{a}" for t, a, _ in VALID])
def test_valid_values_are_accepted(target, arg, values):
  refused = rejected(target, arg, values)
  assert not refused, "\n".join(refused)


@pytest.mark.parametrize("label", list(VALID_TREES))
@pytest.mark.parametrize("name", list(TREE_FUNCTIONS))
def test_valid_tree_is_accepted(name, label):
  call(TREE_FUNCTIONS[name], VALID_TREES[label], abstract=True)


@pytest.mark.parametrize("value", NORM_VALID, ids=short)
def test_valid_norm_is_accepted(value):
  call(clipax.clip_with_norm, GRADS, value, 1.0, abstract=True)


@pytest.mark.parametrize("label", list(PER_EXAMPLE_VALID))
def test_valid_per_example_grads_are_accepted(label):
  call(lambda t: clipax.per_example_clip(t, 1.0), PER_EXAMPLE_VALID[label], abstract=True)


@pytest.mark.parametrize("microbatch_size", [None, 1, 2, 4])
def test_valid_per_example_clipped_grad_call_is_accepted(microbatch_size):
  fn = clipax.per_example_clipped_grad(_loss, 1.0, microbatch_size=microbatch_size)
  mask = np.array([1, 0, 1, 1])
  total, info = jax.eval_shape(lambda p, x: fn(p, x, mask=mask), _P1, _XS)
  assert total["w"].shape == (3,) and info.loss.shape == ()


@pytest.mark.parametrize(("label", "value"), DIAGNOSE_VALID, ids=[x[0] for x in DIAGNOSE_VALID])
def test_valid_diagnose_input_is_accepted(label, value):
  assert isinstance(clipax.diagnose(value), clipax.Verdict)


@pytest.mark.parametrize(("label", "value"), NORMS_VALID, ids=[x[0] for x in NORMS_VALID])
def test_valid_norms_are_accepted(label, value):
  assert math.isfinite(clipax.suggest_max_norm(value))


@pytest.mark.parametrize("opt_state", [None, "abc", {}, (), clipax.zclip().init(None)],
                         ids=short)
def test_metrics_takes_any_pytree(opt_state):
  assert isinstance(clipax.metrics(opt_state), dict)


def test_summary():
  """Runs the whole sweep once (reusing the results of this process' cases) and prints
  ``bad inputs tried: N, clear errors: M`` (``pytest tests/test_bad_inputs.py -s -k summary``)."""
  failures = [(c, f) for c in CASES if (f := c.failure()) is not None]
  refused = [r for target, arg, values in VALID for r in rejected(target, arg, values)]
  n_valid = sum(len(values) for _, _, values in VALID)
  by_kind = {k: sum(f.startswith(f"({k})") for _, f in failures) for k in "abc"}
  line = (f"bad inputs tried: {len(CASES)}, clear errors: {len(CASES) - len(failures)} "
          f"(failures: a={by_kind['a']} b={by_kind['b']} c={by_kind['c']}); valid inputs tried: "
          f"{n_valid}, accepted: {n_valid - len(refused)}")
  print(line)
  details = "\n".join([f"{c.id}: {c.call}\n  -> {f}" for c, f in failures] + refused)
  assert not failures and not refused, f"{line}\n{details}"
