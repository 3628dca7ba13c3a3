"""Fingerprints of the compiled programs of clipax's norms and clippers, for refactors.

A change of structure that must not change what runs (moving code between modules, renaming)
is checked by running this before and after and comparing the outputs op by op::

    python benchmarks/programs.py --out /tmp/before   # on the old commit
    python benchmarks/programs.py --out /tmp/after    # on the new one
    diff -r /tmp/before /tmp/after                     # nothing: the same programs

Each case is compiled for the CPU and, where the compilers are installed (the ``[aot]`` extra or
the test command's ``./.aot/tpu``), for a deviceless TPU v5e and H100 (one device, and 8 for the
``shard_map`` cases); the optimized HLO is written with its metadata (source lines, op names)
removed, one file per case and target.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compiled as aot  # noqa: E402  (sets the environment for the deviceless targets)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import clipax  # noqa: E402

SHAPES = {"w": (256, 512), "v": (300, 300), "b": (512,), "s": (), "e": (3, 5, 7)}
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}


def _tree(dtype, sharding=None):
  return {k: jax.ShapeDtypeStruct(s, dtype, sharding=sharding) for k, s in SHAPES.items()}


def _step(tx):
  def step(grads, params):
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    return updates, state
  return step


def local_cases():
  """``name -> (function of (grads, params))`` compiled on one device."""
  cases = {}
  for o in (1, 2, "inf"):
    cases[f"global_norm_ord{o}"] = lambda g, p, o=o: clipax.global_norm(g, ord=o)
    cases[f"leaf_norms_ord{o}"] = lambda g, p, o=o: clipax.leaf_norms(g, ord=o)
  cases["global_norm_grad"] = lambda g, p: jax.grad(
      lambda t: clipax.global_norm(t))(jax.tree.map(lambda x: x.astype(jnp.float32), g))
  cases["leaf_norms_grad"] = lambda g, p: jax.grad(lambda t: sum(jax.tree.leaves(
      clipax.leaf_norms(t))))(jax.tree.map(lambda x: x.astype(jnp.float32), g))
  cases["unitwise_norms"] = lambda g, p: clipax.unitwise_norms(g)
  txs = {
      "clip_by_global_norm": clipax.clip_by_global_norm(1.0),
      "clip_by_global_norm_leaf_metrics": clipax.clip_by_global_norm(1.0, leaf_metrics=True),
      "clip_by_leaf_norm": clipax.clip_by_leaf_norm(1.0),
      "clip_by_block_rms": clipax.clip_by_block_rms(0.1),
      "clip_by_value": clipax.clip_by_value(0.1),
      "adaptive_grad_clip": clipax.adaptive_grad_clip(0.01),
      "zclip": clipax.zclip(),
      "autoclip": clipax.autoclip(),
      "adagc": clipax.adagc(),
      "spam": clipax.spam(1e-3),
      "skip_spikes": clipax.skip_spikes(optax.adam(1e-3)),
      "monitor": clipax.monitor(),
  }
  for name, tx in txs.items():
    cases[name] = _step(tx)
  return cases


def sharded_cases():
  """``name -> (function, in_specs)`` run under ``shard_map`` over 8 devices on axis "model"."""
  specs = {"w": P(None, "model"), "v": P(), "b": P("model"), "s": P(), "e": P()}
  rep = {"w": False, "v": True, "b": False, "s": True, "e": True}
  cases = {}
  for o in (1, 2, "inf"):
    cases[f"global_norm_ord{o}"] = lambda g, o=o: clipax.global_norm(
        g, ord=o, axis_name="model", replicated=rep)
    cases[f"leaf_norms_ord{o}"] = lambda g, o=o: clipax.leaf_norms(
        g, ord=o, axis_name="model", replicated=rep)
  tx = clipax.clip_by_global_norm(1.0, axis_name="model", replicated=rep)
  cases["clip_by_global_norm"] = lambda g: tx.update(g, tx.init(g))[0]
  return cases, specs


def normalize(text: str) -> str:
  """The program without what names the Python source: metadata, the stack-frame tables."""
  text = re.sub(r"^FileNames\n.*?(?=^(%|ENTRY))", "", text, flags=re.S | re.M)
  text = re.sub(r", metadata=\{[^}]*\}", "", text)
  text = re.sub(r"^HloModule \S+", "HloModule m", text, flags=re.M)
  return text


def targets() -> list[str]:
  out = ["cpu"]
  for t in ("tpu", "h100"):
    try:
      aot.devices(t, 1)
      out.append(t)
    except Exception as e:  # noqa: BLE001  (a compiler that is not installed)
      print(f"# {t}: not available ({type(e).__name__}: {str(e)[:80]})")
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=Path, required=True)
  args = parser.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  for target in targets():
    dev = jax.devices("cpu")[0] if target == "cpu" else aot.devices(target, 1)[0]
    single = jax.sharding.SingleDeviceSharding(dev)
    for dname, dtype in DTYPES.items():
      grads, params = _tree(dtype, single), _tree(jnp.float32, single)
      for name, fn in local_cases().items():
        text = normalize(jax.jit(fn).trace(grads, params).lower().compile().as_text())
        path = args.out / f"{target}-{dname}-{name}.hlo"
        path.write_text(text)
        print(path.name, hashlib.sha1(text.encode()).hexdigest()[:12], flush=True)
    if target == "cpu":
      continue
    mesh = jax.sharding.Mesh(np.array(aot.devices(target, 8)), ("model",))
    cases, specs = sharded_cases()
    for name, fn in cases.items():
      sm = jax.shard_map(fn, mesh=mesh, in_specs=(specs,), out_specs=P(), check_vma=False) \
          if not name.startswith("leaf") and not name.startswith("clip_") else \
          jax.shard_map(fn, mesh=mesh, in_specs=(specs,), out_specs=specs if name.startswith(
              "clip_") else {k: P() for k in specs}, check_vma=False)
      grads = {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=jax.sharding.NamedSharding(
          mesh, specs[k])) for k, s in SHAPES.items()}
      text = normalize(jax.jit(sm).trace(grads).lower().compile().as_text())
      path = args.out / f"{target}-sharded-{name}.hlo"
      path.write_text(text)
      print(path.name, hashlib.sha1(text.encode()).hexdigest()[:12], flush=True)


if __name__ == "__main__":
  main()
