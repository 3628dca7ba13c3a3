"""Speed of global-norm clipping: clipax against optax, PyTorch and the machine's memory roofline.

Clipping is memory traffic. The norm reads every gradient byte once and the scale reads and writes
it once more, so the floor is 2 reads + 1 write (or 1 read when the scale fuses into the
optimizer, see the ``step`` case). Every number here is measured in one process, the
implementations interleaved round by round, so that a noisy machine affects them alike.

Cases (``--cases``, default all):

* ``leaf``: one float32 leaf of each ``--sizes`` (default 16M, 64M, 256M elements);
* ``transformer``: a GPT-2-small-shaped float32 tree, ~98M parameters in 196 leaves;
* ``half``: the same tree in bfloat16 and in float16;
* ``sweep``: trees of ``--leaf-counts`` small leaves (default 1,000 / 3,000 / 5,000 / 10,000 of
  2,000 elements; the 5,000-leaf tree is the ~10M-parameter small-leaf case), where compile time
  is the point; optax is compiled only up to ``--optax-max-leaves`` (default 3,000: its python
  ``sum`` over leaves takes minutes to compile beyond that on a CPU);
* ``step``: one jitted training step, ``optax.adamw`` alone against
  ``optax.chain(clip, optax.adamw)`` with clipax's and with optax's clip, on the transformer tree,
  parameters and optimizer state donated.

For every tree: the steady-state median of ``--repeats`` samples after warm-up
(``jax.block_until_ready``), and apart from it the trace and compile time. Beside clipax and optax:
``torch.nn.utils.clip_grad_norm_(foreach=True)`` on the same values (when torch is installed, on
CUDA when available), and the roofline, a jitted ``x * c`` pass over the same bytes (one read, one
write), with the input donated and without. A training step sees the donated one: inside a jitted
step the gradients are temporaries whose buffers XLA reuses, exactly as a donated input's. The
clippers themselves are timed donated (their output fed back as the next input) and, for the
large cases, not donated too.

Usage::

  python benchmarks/bench_clip.py                        # every case, full sizes
  python benchmarks/bench_clip.py --quick                # small sizes: a smoke test
  python benchmarks/bench_clip.py --cases leaf,step --sizes 16M,64M --out benchmarks/results
  python -m clipax bench --quick                         # the same command line
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import clipax
from clipax import _platform, _rescue

# The clipax settings an experiment may patch, and the module that reads each while tracing.
SETTINGS = {"_SMALL_LEAF": _platform, "_VARIADIC_RESCUE": _rescue}

try:  # torch is optional: its column is left out without it.
  import torch
except ImportError:  # pragma: no cover - depends on the environment
  torch = None

MAX_NORM = 1.0  # the train step's threshold, far below the norm of its random gradients
# Clippers fed their own output back (donated) see a threshold that starts at half the tree's norm
# and shrinks by DECAY every call, so that every call clips: fed a tree already under its
# threshold, optax's `select` lets XLA skip the whole rescale, which no real step would see.
# (0.999 is too close to 1: bfloat16 rounding then leaves some outputs under the next threshold.)
DECAY = 0.99
MAX_CALLS_PER_SAMPLE = 200  # so at most 1,403 calls a runner: the threshold stays > 1e-6 x start
ALL_CASES = ("leaf", "transformer", "half", "sweep", "step")
SMALL_LEAF = 2_000  # elements per leaf of the sweep trees


# ----------------------------------------------------------------------------------------------
# Trees


def transformer_shapes(quick: bool) -> dict[str, tuple[int, ...]]:
  """GPT-2-small layout with separate q/k/v: 12 layers x 16 leaves + 4 = 196 leaves, ~98M."""
  d, layers, vocab, ctx = (64, 1, 512, 64) if quick else (768, 12, 16_384, 1024)
  shapes = {"wte": (vocab, d), "wpe": (ctx, d), "ln_f/scale": (d,), "ln_f/bias": (d,)}
  for i in range(layers):
    p = f"h{i:02d}/"
    for name in ("q", "k", "v", "o"):
      shapes[p + f"attn/{name}/kernel"] = (d, d)
      shapes[p + f"attn/{name}/bias"] = (d,)
    for ln in ("ln_1", "ln_2"):
      shapes[p + f"{ln}/scale"] = (d,)
      shapes[p + f"{ln}/bias"] = (d,)
    shapes[p + "mlp/fc/kernel"] = (d, 4 * d)
    shapes[p + "mlp/fc/bias"] = (4 * d,)
    shapes[p + "mlp/proj/kernel"] = (4 * d, d)
    shapes[p + "mlp/proj/bias"] = (d,)
  return shapes


def small_leaf_shapes(n_leaves: int) -> dict[str, tuple[int, ...]]:
  """``n_leaves`` leaves of 2,000 elements in three layouts (vector, matrix, thin matrix)."""
  layouts = ((SMALL_LEAF,), (40, 50), (8, 250))
  return {f"p{i:05d}": layouts[i % 3] for i in range(n_leaves)}


def make_tree(shapes: dict[str, tuple[int, ...]], dtype: Any, seed: int = 0) -> dict:
  """Standard-normal leaves of the given shapes, generated once on the host."""
  total = sum(math.prod(s) for s in shapes.values())
  flat = np.random.default_rng(seed).standard_normal(total, dtype=np.float32)
  flat = flat.astype(jnp.dtype(dtype))
  tree, start = {}, 0
  for name, shape in shapes.items():
    n = math.prod(shape)
    tree[name] = jax.device_put(flat[start:start + n].reshape(shape))
    start += n
  return tree


def tree_bytes(tree: Any) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def copy_tree(tree: Any) -> Any:
  """A fresh buffer for every leaf, so donating the copy leaves ``tree`` alive."""
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def parse_count(text: str) -> int:
  """``"16M"`` -> 16 * 2**20, ``"500K"`` -> 500 * 2**10, ``"3000"`` -> 3000."""
  text = text.strip().upper()
  mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
  return int(float(text[:-1] if mult > 1 else text) * mult)


def count_label(n: int) -> str:
  for suffix, mult in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
    if n >= mult and n % mult == 0:
      return f"{n // mult}{suffix}"
  return str(n)


# ----------------------------------------------------------------------------------------------
# Runners: one compiled function each, called over and over


class Runner:
  """A callable under test: ``call()`` runs it once, ``sync()`` waits for the device.

  A plain class rather than a dataclass, so the module also works when loaded by file path
  (``python -m clipax bench`` does that) without being registered in ``sys.modules``.
  """

  def __init__(self, name: str, call: Callable[[], None], sync: Callable[[], None],
               trace_s: float = float("nan"), compile_s: float = float("nan")):
    self.name, self.call, self.sync = name, call, sync
    self.trace_s, self.compile_s = trace_s, compile_s


def jax_runner(name: str, fn: Callable, args: tuple, *, donate: bool) -> Runner:
  """Compiles ``fn(*args)``; donated, each output is fed back as the next call's input.

  ``fn`` must return the same structure as ``args`` when ``donate`` is true.
  """
  t0 = time.perf_counter()
  lowered = jax.jit(fn, donate_argnums=tuple(range(len(args))) if donate else ()).lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  box = {"args": args, "out": None}

  def call():
    out = compiled(*box["args"])
    if donate:
      box["args"] = tuple(out) if len(args) > 1 else (out,)
    box["out"] = out

  def sync():
    jax.block_until_ready(box["out"])

  return Runner(name, call, sync, trace_s=t1 - t0, compile_s=t2 - t1)


def first_threshold(tree: Any) -> float:
  """Half the tree's L2 norm (float64 on the host): the first call clips by 2x."""
  return 0.5 * math.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64))))
                             for x in jax.tree.leaves(tree)))


@contextlib.contextmanager
def traced_with(patch: dict[str, Any] | None):
  """Sets clipax settings (:data:`SETTINGS`, read while tracing only) for the duration, with JAX's
  trace caches cleared on the way in and out so the patched values are the ones traced."""
  saved = {k: getattr(SETTINGS[k], k) for k in (patch or {})}
  if patch:
    jax.clear_caches()
  for k, v in (patch or {}).items():
    setattr(SETTINGS[k], k, v)
  try:
    yield
  finally:
    for k, v in saved.items():
      setattr(SETTINGS[k], k, v)
    if patch:
      jax.clear_caches()


def clip_runner(name: str, make_tx: Callable[[jax.Array], optax.GradientTransformation],
                tree: Any, *, donate: bool, patch: dict[str, Any] | None = None) -> Runner:
  """``make_tx(max_norm).update`` on ``tree``, every call clipping.

  Donated, the output, the state and the threshold times :data:`DECAY` are fed back; not donated,
  every call sees the same input and threshold. ``patch`` traces clipax with other values of
  clipax settings (:data:`SETTINGS`: ``_SMALL_LEAF``, ``_VARIADIC_RESCUE``).
  """
  # In the leaves' dtype: optax's clip needs that (a float32 array threshold with bfloat16
  # leaves fails in its `lax.select`); clipax takes any.
  m = jnp.asarray(first_threshold(tree), jax.tree.leaves(tree)[0].dtype)
  state = copy_tree(make_tx(m).init(tree))  # init may share one buffer between fields
  args = (copy_tree(tree), state, m) if donate else (tree, state, m)

  def fn(g, s, m):
    out, s = make_tx(m).update(g, s)
    return out, s, (m * DECAY if donate else m)

  with traced_with(patch):
    return jax_runner(name, fn, args, donate=donate)


def roofline_runner(name: str, tree: Any, *, donate: bool) -> Runner:
  """One read and one write of every byte: ``x * c`` with ``c`` a runtime 1."""
  def rw(g, c):  # ``c`` is an argument, or XLA would fold the multiply by 1 away
    return jax.tree.map(lambda x: x * c.astype(x.dtype), g), c

  one = jnp.ones([], jnp.float32)
  args = (copy_tree(tree), one) if donate else (tree, one)
  return jax_runner(name, rw, args, donate=donate)


def read_runner(name: str, tree: Any) -> Runner:
  """One read of every byte and nothing written: each leaf's sum of squares in float32 (the norm
  pass optax compiles), returned as one scalar per leaf."""
  def read(g):
    return [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(g)]

  return jax_runner(name, read, (tree,), donate=False)


def torch_device() -> str:
  return "cuda" if torch is not None and torch.cuda.is_available() else "cpu"


def torch_tensors(tree: Any) -> list:
  """The leaves of ``tree`` as torch tensors on :func:`torch_device`, same dtype and values."""
  out = []
  for x in jax.tree.leaves(tree):
    a = np.array(x)  # a writable host copy
    if a.dtype == jnp.bfloat16:
      t = torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    else:
      t = torch.from_numpy(a)
    out.append(t.to(torch_device()))
  return out


def torch_sync() -> None:
  if torch_device() == "cuda":
    torch.cuda.synchronize()


def torch_clip_runner(tree: Any) -> Runner:
  """``clip_grad_norm_(foreach=True)``, in place on ``.grad`` like a real training loop."""
  params = []
  for g in torch_tensors(tree):
    p = torch.zeros(1, dtype=g.dtype, device=g.device).expand(g.shape)  # no memory: a stand-in
    p.grad = g
    params.append(p)

  box = {"max_norm": first_threshold(tree)}

  def call():  # in place, so the threshold shrinks as for the donated JAX clippers
    torch.nn.utils.clip_grad_norm_(params, box["max_norm"], foreach=True)
    box["max_norm"] *= DECAY

  return Runner("torch", call, torch_sync)


def torch_copy_runner(tree: Any) -> Runner:
  """Device-to-device copy of every tensor (``torch._foreach_copy_``): the copy bandwidth."""
  src = torch_tensors(tree)
  dst = [torch.empty_like(t) for t in src]

  def call():
    torch._foreach_copy_(dst, src)

  return Runner("torch_copy", call, torch_sync)


# ----------------------------------------------------------------------------------------------
# Timing


def measure(runners: list[Runner], repeats: int, min_sample_s: float) -> dict[str, dict]:
  """Steady-state seconds per call: warm up, then ``repeats`` interleaved samples of each.

  A sample is ``inner`` back-to-back calls followed by one wait, ``inner`` chosen so that a
  sample lasts at least ``min_sample_s``; the order of the runners rotates every round.
  """
  inner = {}
  for r in runners:
    for _ in range(2):
      r.call()
      r.sync()
    t0 = time.perf_counter()
    r.call()
    r.sync()
    one = max(time.perf_counter() - t0, 1e-7)
    inner[r.name] = int(min(MAX_CALLS_PER_SAMPLE, max(1, math.ceil(min_sample_s / one))))
  samples = {r.name: [] for r in runners}
  for i in range(repeats):
    k = i % len(runners)
    for r in runners[k:] + runners[:k]:
      n = inner[r.name]
      t0 = time.perf_counter()
      for _ in range(n):
        r.call()
      r.sync()
      samples[r.name].append((time.perf_counter() - t0) / n)
  out = {}
  for r in runners:
    s = samples[r.name]
    out[r.name] = {
        "median_s": statistics.median(s),
        "min_s": min(s),
        "samples_s": s,
        "calls_per_sample": inner[r.name],
        "trace_s": r.trace_s,
        "compile_s": r.compile_s,
    }
  return out


# ----------------------------------------------------------------------------------------------
# Cases


def _ratio(a: float | None, b: float | None) -> float | None:
  if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
    return None
  return a / b


def bench_tree(label: str, case: str, tree: Any, args: argparse.Namespace, *,
               with_optax: bool = True, plain: bool = True) -> dict:
  """Every runner on one tree; the record for the JSON file."""
  n_leaves = len(jax.tree.leaves(tree))
  nbytes = tree_bytes(tree)
  dtype = str(jax.tree.leaves(tree)[0].dtype)
  print(f"[bench] {label}: {n_leaves} leaves, {nbytes / 2**20:.1f} MiB {dtype}", flush=True)
  ours, theirs = clipax.clip_by_global_norm, optax.clip_by_global_norm
  runners = [clip_runner("clipax", ours, tree, donate=True)]
  if not args.ab:
    runners += [
        roofline_runner("rw_donated", tree, donate=True),
        roofline_runner("rw", tree, donate=False),
        read_runner("read", tree),
    ]
  if with_optax:
    runners.append(clip_runner("optax", theirs, tree, donate=True))
  if plain and not args.ab:
    runners.append(clip_runner("clipax_plain", ours, tree, donate=False))
    if with_optax:
      runners.append(clip_runner("optax_plain", theirs, tree, donate=False))
  for n in args.small_leaf_variants:
    runners.append(clip_runner(f"clipax[small_leaf={n}]", ours, tree, donate=True,
                               patch={"_SMALL_LEAF": n}))
  if args.variadic_rescue:
    runners.append(clip_runner("clipax[variadic]", ours, tree, donate=True,
                               patch={"_VARIADIC_RESCUE": True}))
  if torch is not None and not args.no_torch and not args.ab:
    runners.append(torch_clip_runner(tree))
    if torch_device() == "cuda":
      runners.append(torch_copy_runner(tree))
  times = measure(runners, args.repeats, args.min_sample_s)
  med = {k: v["median_s"] for k, v in times.items()}
  passes = {"rw": 2, "rw_donated": 2, "torch_copy": 2, "read": 1}
  gbps = {k: nbytes * passes.get(k, 3) / t / 1e9 for k, t in med.items()}
  # A global-norm clip must read every byte twice (the scale needs the whole norm first): its
  # best time is a read pass plus an r+w pass, whatever the bandwidth of each on this machine.
  two_pass = med["read"] + med["rw_donated"] if "read" in med else None
  record = {
      "case": case,
      "label": label,
      "dtype": dtype,
      "n_leaves": n_leaves,
      "n_params": sum(x.size for x in jax.tree.leaves(tree)),
      "bytes": nbytes,
      "optax_skipped": not with_optax,
      "times": times,
      "bandwidth_GBps": gbps,
      "ratios": {
          "clipax/optax": _ratio(med.get("clipax"), med.get("optax")),
          "clipax/torch": _ratio(med.get("clipax"), med.get("torch")),
          "clipax_plain/optax_plain": _ratio(med.get("clipax_plain"), med.get("optax_plain")),
          "achieved/roofline": _ratio(gbps.get("clipax"), gbps.get("rw_donated")),
          "two_pass_bound_s": two_pass,
          "two_pass/clipax": _ratio(two_pass, med.get("clipax")),
          "two_pass/optax": _ratio(two_pass, med.get("optax")),
          "achieved/roofline_plain": _ratio(gbps.get("clipax_plain"), gbps.get("rw")),
          "achieved/copy": _ratio(gbps.get("clipax"), gbps.get("torch_copy")),
          "clipax_compile/optax_compile": _ratio(
              times["clipax"]["trace_s"] + times["clipax"]["compile_s"],
              times["optax"]["trace_s"] + times["optax"]["compile_s"] if with_optax else None),
      },
  }
  del runners
  gc.collect()
  return record


def case_leaf(args) -> Iterator[dict]:
  for n in args.sizes:
    tree = {"w": make_tree({"w": (n // 1024, 1024) if n % 1024 == 0 else (n,)}, jnp.float32)["w"]}
    yield bench_tree(f"leaf {count_label(n)}", "leaf", tree, args)
    del tree


def case_transformer(args) -> Iterator[dict]:
  tree = make_tree(transformer_shapes(args.quick), jnp.float32)
  yield bench_tree("transformer", "transformer", tree, args)


def case_half(args) -> Iterator[dict]:
  for dtype in (jnp.bfloat16, jnp.float16):
    tree = make_tree(transformer_shapes(args.quick), dtype)
    yield bench_tree(f"transformer {jnp.dtype(dtype).name}", "half", tree, args)
    del tree


def case_sweep(args) -> Iterator[dict]:
  for n in args.leaf_counts:
    tree = make_tree(small_leaf_shapes(n), jnp.float32)
    yield bench_tree(f"{n} leaves", "sweep", tree, args, with_optax=n <= args.optax_max_leaves,
                     plain=False)
    del tree


def case_step(args) -> Iterator[dict]:
  """One training step: adamw alone, and chained after clipax's and optax's clip, for each of
  ``--step-dtypes`` (params, gradients and adamw's moments in that dtype)."""
  for dtype in args.step_dtypes:
    yield step_record(args, jnp.dtype(dtype))


def step_record(args, dtype: jnp.dtype) -> dict:
  params = make_tree(transformer_shapes(args.quick), dtype, seed=1)
  grads = make_tree(transformer_shapes(args.quick), dtype, seed=2)
  print(f"[bench] step: {len(params)} leaves, {tree_bytes(params) / 2**20:.1f} MiB {dtype}",
        flush=True)
  adamw = optax.adamw(1e-3, weight_decay=1e-4)
  txs = {
      "adamw": adamw,
      "clipax+adamw": optax.chain(clipax.clip_by_global_norm(MAX_NORM), adamw),
      "optax+adamw": optax.chain(optax.clip_by_global_norm(MAX_NORM), adamw),
  }
  patches = {}
  if args.variadic_rescue:
    patches["clipax[variadic]+adamw"] = {"_VARIADIC_RESCUE": True}
  for n in args.small_leaf_variants:
    patches[f"clipax[small_leaf={n}]+adamw"] = {"_SMALL_LEAF": n}
  for name in patches:
    txs[name] = txs["clipax+adamw"]
  runners = []
  for name, tx in txs.items():
    p = copy_tree(params)

    def step(p, s, g, tx=tx):
      updates, s = tx.update(g, s, p)
      return optax.apply_updates(p, updates), s

    # params and optimizer state donated; the gradients are a fixed, non-donated input.
    t0 = time.perf_counter()
    s = copy_tree(tx.init(p))
    with traced_with(patches.get(name)):
      lowered = jax.jit(step, donate_argnums=(0, 1)).lower(p, s, grads)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    box = {"p": p, "s": s}

    def call(compiled=compiled, box=box):
      box["p"], box["s"] = compiled(box["p"], box["s"], grads)

    def sync(box=box):
      jax.block_until_ready(box["p"])

    runners.append(Runner(name, call, sync, trace_s=t1 - t0, compile_s=t2 - t1))
  times = measure(runners, args.repeats, args.min_sample_s)
  med = {k: v["median_s"] for k, v in times.items()}
  return {
      "case": "step",
      "label": "adamw step" + ("" if dtype == jnp.float32 else f" {dtype}"),
      "dtype": str(dtype),
      "n_leaves": len(params),
      "n_params": sum(x.size for x in params.values()),
      "bytes": tree_bytes(params),
      "times": times,
      "ratios": {
          "clipax+adamw/adamw": _ratio(med["clipax+adamw"], med["adamw"]),
          "optax+adamw/adamw": _ratio(med["optax+adamw"], med["adamw"]),
          **{f"{k}/adamw": _ratio(med[k], med["adamw"]) for k in med if k.startswith("clipax[")},
      },
  }


CASES: dict[str, Callable[[argparse.Namespace], Iterator[dict]]] = {
    "leaf": case_leaf,
    "transformer": case_transformer,
    "half": case_half,
    "sweep": case_sweep,
    "step": case_step,
}


# ----------------------------------------------------------------------------------------------
# Output


def environment() -> dict:
  dev = jax.devices()[0]
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "jax": jax.__version__,
      "jaxlib": importlib.metadata.version("jaxlib"),
      "optax": optax.__version__,
      "clipax": clipax.__version__,
      "torch": None if torch is None else torch.__version__,
      "torch_device": None if torch is None else torch_device(),
      "platform": dev.platform,
      "device_kind": dev.device_kind,
      "device_count": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "torch_threads": None if torch is None else torch.get_num_threads(),
      "python": platform.python_version(),
      "machine": platform.machine(),
  }


def _ms(t: dict, name: str) -> str:
  v = t.get(name)
  return "-" if v is None else f"{v['median_s'] * 1e3:.3f}"


def _x(v: float | None, fmt: str = "{:.2f}") -> str:
  return "-" if v is None else fmt.format(v)


def _table(intro: str, columns: str, rows: list[list[str]], left: int = 2) -> list[str]:
  """A blank line, the one-paragraph ``intro``, a blank line and a markdown table whose header
  names are ``columns`` (separated by ``|``): the first ``left`` columns left-aligned, the others
  right-aligned."""
  names = [c.strip() for c in columns.split("|")]
  align = ["---"] * left + ["---:"] * (len(names) - left)
  return ["", intro, "", "| " + " | ".join(names) + " |", "|" + "|".join(align) + "|",
          *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(env: dict, records: list[dict]) -> str:
  lines = [
      f"jax {env['jax']}, optax {env['optax']}, torch {env['torch'] or '-'} "
      f"({env['torch_device'] or '-'}), device: {env['device_kind']} ({env['platform']}), "
      f"{env['cpu_count']} CPUs, {env['date']}",
  ]
  clip = [r for r in records if r["case"] != "step"]
  if clip:
    rows = []
    for r in clip:
      t, g, q = r["times"], r["bandwidth_GBps"], r["ratios"]
      rows.append([
          r["label"], r["dtype"], str(r["n_leaves"]), f"{r['bytes'] / 2**20:.0f}",
          _ms(t, "clipax"), "not run" if r["optax_skipped"] else _ms(t, "optax"),
          _ms(t, "torch"), _ms(t, "rw_donated"), _x(q["clipax/optax"]), _x(q["clipax/torch"]),
          f"{g['clipax']:.1f}", _x(g.get("rw_donated"), "{:.1f}"), _x(q["achieved/roofline"]),
      ])
    lines += _table(
        "Steady state, median ms per call; clippers and the r+w roofline donated (what a train "
        "step sees); bandwidth counts 2 reads + 1 write for a clipper, 1 read + 1 write for the "
        "roofline.",
        "tree | dtype | leaves | MiB | clipax | optax | torch | r+w roofline | clipax/optax "
        "| clipax/torch | clipax GB/s | roofline GB/s | achieved/roofline", rows)
    rows = []
    for r in clip:
      t, g, q = r["times"], r["bandwidth_GBps"], r["ratios"]
      bound = q["two_pass_bound_s"]
      rows.append([
          r["label"], r["dtype"], _ms(t, "read"), _ms(t, "rw_donated"),
          _x(g.get("read"), "{:.1f}"), _x(g.get("rw_donated"), "{:.1f}"),
          _x(bound and bound * 1e3, "{:.3f}"), _ms(t, "clipax"), _x(q["two_pass/clipax"]),
          _x(q["two_pass/optax"]),
      ])
    lines += _table(
        "The two-pass bound: a global-norm clip reads every byte twice (the scale needs the whole "
        "norm), so its best time is one read pass (each leaf's sum of squares) plus one r+w pass. "
        "bound/clipax = 1 means clipax runs at that bound.",
        "tree | dtype | read | r+w | read GB/s | r+w GB/s | two-pass bound | clipax "
        "| bound/clipax | bound/optax", rows)
    rows = []
    for r in clip:
      t, g, q = r["times"], r["bandwidth_GBps"], r["ratios"]
      rows.append([
          r["label"], r["dtype"], _ms(t, "clipax_plain"), _ms(t, "optax_plain"), _ms(t, "rw"),
          _x(q["clipax_plain/optax_plain"]), _x(q["achieved/roofline_plain"]),
          _x(g.get("torch_copy"), "{:.1f}"), _x(q["achieved/copy"]),
      ])
    lines += _table(
        "Without donation (a fresh output buffer every call), median ms; and the copy bandwidth "
        "(torch `_foreach_copy_`, CUDA only).",
        "tree | dtype | clipax | optax | r+w roofline | clipax/optax | achieved/roofline "
        "| copy GB/s | clipax/copy", rows)
    rows = []
    for r in clip:
      c, o = r["times"]["clipax"], r["times"].get("optax")
      rows.append([
          r["label"], str(r["n_leaves"]), f"{c['trace_s']:.2f}", f"{c['compile_s']:.2f}",
          "not run" if o is None else f"{o['trace_s']:.2f}",
          "not run" if o is None else f"{o['compile_s']:.2f}",
          _x(r["ratios"]["clipax_compile/optax_compile"], "{:.3f}"),
      ])
    lines += _table(
        "Trace and compile time, seconds (clipax and optax clippers, donated variant).",
        "tree | leaves | clipax trace | clipax compile | optax trace | optax compile "
        "| clipax/optax", rows, left=1)
  variants = sorted({k for r in clip for k in r["times"] if k.startswith("clipax[")})
  if variants:
    rows = [[r["label"], _ms(r["times"], "clipax"), *(_ms(r["times"], v) for v in variants)]
            for r in clip]
    lines += _table(
        "Experiments, median ms, donated: clipax traced with another bound on the leaf size it "
        "concatenates before reducing (`small_leaf`, default " + str(_platform._SMALL_LEAF)
        + "), or with the GPU/TPU rescue's three sums as one variadic reduction (`variadic`; "
        "the same program as clipax on a CPU).",
        " | ".join(["tree", "clipax", *variants]), rows, left=1)
  for r in (r for r in records if r["case"] == "step"):
    t, q = r["times"], r["ratios"]
    lines += _table(
        f"Training step on the transformer tree ({r['n_params'] / 1e6:.1f}M {r['dtype']} "
        "parameters, params and adamw state donated), median ms.",
        "adamw | clipax + adamw | optax + adamw | clipax overhead | optax overhead",
        [[_ms(t, "adamw"), _ms(t, "clipax+adamw"), _ms(t, "optax+adamw"),
          _x(q["clipax+adamw/adamw"], "{:.3f}x"), _x(q["optax+adamw/adamw"], "{:.3f}x")]],
        left=0)
    for k in (k for k in t if k.startswith("clipax[")):
      lines += ["", f"Experiment: {k} {_ms(t, k)} ms, {_x(q[k + '/adamw'], '{:.3f}x')} adamw."]
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="clipax bench", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="small sizes and 3 repeats: a smoke test that runs in seconds")
  p.add_argument("--cases", default=",".join(ALL_CASES),
                 help=f"comma-separated subset of {','.join(ALL_CASES)} (default: all)")
  p.add_argument("--sizes", default=None,
                 help="leaf sizes for the leaf case, e.g. 16M,64M,256M (quick: 1M)")
  p.add_argument("--leaf-counts", default=None,
                 help="leaf counts for the sweep case (default 1000,3000,5000,10000; quick: 300)")
  p.add_argument("--optax-max-leaves", type=int, default=3000,
                 help="compile optax only for trees of at most this many leaves (default 3000)")
  p.add_argument("--repeats", type=int, default=None, help="samples per runner (default 7)")
  p.add_argument("--min-sample-s", type=float, default=None,
                 help="least duration of one sample, calls repeated to fill it (default 0.05)")
  p.add_argument("--no-torch", action="store_true", help="leave torch out even if installed")
  p.add_argument("--torch-threads", type=int, default=None,
                 help="torch.set_num_threads for torch on CPU (default: torch's own choice)")
  p.add_argument("--small-leaf-variants", default="",
                 help="experiment: also time clipax traced with these bounds (elements) on the "
                      "leaves it concatenates before reducing, e.g. 0,4194304")
  p.add_argument("--step-dtypes", default="float32",
                 help="dtypes of the step case's params and gradients, e.g. float32,bfloat16")
  p.add_argument("--variadic-rescue", action="store_true",
                 help="experiment: also time clipax (clip and train step) with the GPU/TPU "
                      "overflow rescue's three sums taken as one variadic reduction")
  p.add_argument("--ab", action="store_true",
                 help="time clipax and optax (donated) only: on a CPU whose cache holds the "
                      "tree, the other runners' buffers evict it and skew small trees")
  p.add_argument("--out", default=None,
                 help="folder to write bench_<platform>.json and .md into (default: print only)")
  p.add_argument("--tag", default=None, help="suffix of the output file names")
  args = p.parse_args(argv)
  args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
  unknown = sorted(set(args.cases) - set(ALL_CASES))
  if unknown:
    p.error(f"unknown case(s) {unknown}; choose from {list(ALL_CASES)}")
  args.sizes = [parse_count(s) for s in (args.sizes or ("1M" if args.quick else
                                                        "16M,64M,256M")).split(",")]
  args.leaf_counts = [parse_count(s) for s in (args.leaf_counts or (
      "300" if args.quick else "1000,3000,5000,10000")).split(",")]
  args.small_leaf_variants = [parse_count(s) for s in args.small_leaf_variants.split(",") if s]
  args.step_dtypes = [d.strip() for d in args.step_dtypes.split(",") if d.strip()]
  if args.repeats is None:
    args.repeats = 3 if args.quick else 7
  if args.min_sample_s is None:
    args.min_sample_s = 0.005 if args.quick else 0.05
  return args


def main(argv: list[str] | None = None) -> dict:
  """Runs the selected cases, prints the markdown table, writes JSON/markdown with ``--out``.

  Returns:
    ``{"environment": ..., "results": [...]}``, the content of the JSON file.
  """
  args = parse_args(argv)
  if torch is not None and args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  env = environment()
  records = []
  result = {"environment": env, "args": dict(vars(args)), "results": records}
  for case in args.cases:
    for record in CASES[case](args):
      records.append(record)
      if args.out:  # after every tree, so that a run cut short keeps what it measured
        write(Path(args.out), result)
  print(markdown(env, records), flush=True)
  return result


def write(out: Path, result: dict) -> None:
  """``bench_<platform>[_<tag>].json`` and ``.md`` in ``out``."""
  env, args = result["environment"], result["args"]
  out.mkdir(parents=True, exist_ok=True)
  stem = f"bench_{env['platform']}" + (f"_{args['tag']}" if args["tag"] else "")
  (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
  (out / f"{stem}.md").write_text(markdown(env, result["results"]))
  print(f"[bench] wrote {out / stem}.json and .md", flush=True)


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
