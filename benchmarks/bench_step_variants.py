"""Experiment: which part of a clipper costs time inside a jitted adamw step (median ms, HLO
fusion and conditional counts). Usage: python benchmarks/bench_step_variants.py [quick] [hlo_out]
"""
import re
import statistics
import sys
import time

sys.path.insert(0, "benchmarks")
import bench_clip as b
import jax
import jax.numpy as jnp
import optax

import clipax
from clipax import _platform

params = b.make_tree(b.transformer_shapes(sys.argv[1:2] == ["quick"]), jnp.float32, seed=1)
grads = b.make_tree(b.transformer_shapes(sys.argv[1:2] == ["quick"]), jnp.float32, seed=2)
adamw = optax.adamw(1e-3, weight_decay=1e-4)

def ideal(c):
  def init(p): return optax.EmptyState()
  def upd(g, s, p=None):
    n = optax.global_norm(g)
    sc = jnp.minimum(1.0, c / n)
    return jax.tree_util.tree_map(lambda x: x * sc, g), s
  return optax.GradientTransformation(init, upd)

variants = {
  "adamw": lambda: adamw,
  "clipax": lambda: optax.chain(clipax.clip_by_global_norm(1.0), adamw),
  "clipax_propagate": lambda: optax.chain(
      clipax.clip_by_global_norm(1.0, nonfinite="propagate"), adamw),
  "clipax_noconcat": lambda: optax.chain(clipax.clip_by_global_norm(1.0), adamw),
  "ideal_scalar": lambda: optax.chain(ideal(1.0), adamw),
  "optax": lambda: optax.chain(optax.clip_by_global_norm(1.0), adamw),
}
res = {}
for name, make in variants.items():
  _platform._SMALL_LEAF = 0 if name == "clipax_noconcat" else (1 << 16)
  tx = make()
  def step(p, s, g, tx=tx):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  p = b.copy_tree(params)
  s = b.copy_tree(tx.init(p))
  comp = jax.jit(step, donate_argnums=(0, 1)).lower(p, s, grads).compile()
  txt = comp.as_text()
  nfus = len(re.findall(r"^\s*\S+ = \S+ fusion\(", txt, re.M))
  ncond = txt.count("conditional(")
  box = {"p": p, "s": s}
  for _ in range(3):
    box["p"], box["s"] = comp(box["p"], box["s"], grads)
  jax.block_until_ready(box["p"])
  ts = []
  for _ in range(15):
    t0 = time.perf_counter()
    for _ in range(10):
      box["p"], box["s"] = comp(box["p"], box["s"], grads)
    jax.block_until_ready(box["p"])
    ts.append((time.perf_counter() - t0) / 10)
  res[name] = statistics.median(ts)
  ratio = res[name] / res["adamw"]
  print(f"{name:18s} {res[name] * 1e3:8.3f} ms  x{ratio:.3f}  fusions={nfus} "
        f"conditionals={ncond}", flush=True)
  if name == "clipax":
    open(sys.argv[2] if len(sys.argv) > 2 else "/tmp/clipax_step_hlo.txt", "w").write(txt)
