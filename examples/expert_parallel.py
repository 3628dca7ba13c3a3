"""Clipping a mixture-of-experts layer trained with expert and tensor parallelism (``shard_map``).

The layout the big training stacks get wrong: expert weights split over an ``expert`` mesh axis
(and over ``model``), dense weights split over ``model`` and the same on every expert group, the
router and layer norm whole everywhere. A norm that sums every leaf over every axis counts the
dense weights once per expert group; one that sums over ``expert`` only forgets the ``model``
split; a per-group norm clips the same dense weight differently in each group. ``specs=`` (the
``in_specs`` tree you already wrote) sums each leaf over exactly the axes it is split over.

Runs on 8 simulated CPU devices (``--quick``: a few steps)::

    python examples/expert_parallel.py --quick

and prints, per step, the clipped norm measured inside ``shard_map`` beside the float64 norm of
the whole gradient, then the number of all-reduces the norm costs in the compiled step.
"""

from __future__ import annotations

import argparse
import os
import re

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import clipax  # noqa: E402

EXPERTS, D, F, TOKENS = 4, 16, 32, 64


def init_params(key):
  k = iter(jax.random.split(key, 6))
  normal = lambda shape, scale: jax.random.normal(next(k), shape) * scale
  return {
      "attn": {"qkv": normal((D, 3 * D), D**-0.5), "out": normal((3 * D, D), (3 * D)**-0.5)},
      "router": normal((D, EXPERTS), D**-0.5),
      "experts": {"up": normal((EXPERTS, D, F), D**-0.5), "down": normal((EXPERTS, F, D), F**-0.5)},
      "ln": jnp.ones((D,)),
  }


# Where each parameter (and so its gradient) lives on the (expert=2, model=4) mesh.
SPECS = {
    "attn": {"qkv": P(None, "model"), "out": P("model", None)},
    "router": P(),
    "experts": {"up": P("expert", None, "model"), "down": P("expert", "model", None)},
    "ln": P(),
}


def local_loss(params, x, y):
  """The loss of the tokens ``x`` on one device, from its shards of the parameters.

  Tensor parallelism: ``qkv`` and ``up`` are split by columns, ``out`` and ``down`` by rows, so
  each device computes a partial output that a ``psum`` over ``model`` completes. Expert
  parallelism: each expert group holds ``EXPERTS / 2`` experts; every token is sent (densely,
  weighted by the router) to the local experts and the groups' outputs are summed over
  ``expert``.
  """
  h = x * params["ln"]
  attn = jax.lax.psum(jnp.tanh(h @ params["attn"]["qkv"]) @ params["attn"]["out"], "model")
  h = h + attn
  gates = jax.nn.softmax(h @ params["router"], axis=-1)  # (tokens, EXPERTS), the same everywhere
  group = jax.lax.axis_index("expert")
  local = jax.lax.dynamic_slice_in_dim(gates, group * (EXPERTS // 2), EXPERTS // 2, axis=1)
  inner = jnp.einsum("td,edf->etf", h, params["experts"]["up"])
  moe = jnp.einsum("etf,efd,te->td", jax.nn.gelu(inner), params["experts"]["down"], local)
  out = h + jax.lax.psum(moe, ("expert", "model"))
  return jnp.mean((out - y) ** 2)


def reference_loss(params, x, y):
  """The same model on one device, no sharding: what the sharded gradients must equal."""
  h = x * params["ln"]
  h = h + jnp.tanh(h @ params["attn"]["qkv"]) @ params["attn"]["out"]
  gates = jax.nn.softmax(h @ params["router"], axis=-1)
  inner = jnp.einsum("td,edf->etf", h, params["experts"]["up"])
  out = h + jnp.einsum("etf,efd,te->td", jax.nn.gelu(inner), params["experts"]["down"], gates)
  return jnp.mean((out - y) ** 2)


def sharded_step(tx, state, mesh):
  """One jitted ``shard_map`` train step for ``tx``. Its state's specs: Adam's moments follow the
  parameters; everything else (the clipper's scalars and counters) is the same on every device."""
  is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)  # noqa: E731
  specs = jax.tree.map(
      lambda s: optax.ScaleByAdamState(count=P(), mu=SPECS, nu=SPECS) if is_adam(s) else P(),
      state, is_leaf=is_adam)
  return jax.jit(jax.shard_map(
      lambda p, s, x, y: _step(tx, p, s, x, y), mesh=mesh,
      in_specs=(SPECS, specs, P(), P()), out_specs=(SPECS, specs, P(), SPECS)))


def _step(tx, params, state, x, y):
  loss, grads = jax.value_and_grad(local_loss)(params, x, y)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state, loss, grads


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="3 steps instead of 20")
  args = parser.parse_args(argv)
  mesh = jax.make_mesh((2, 4), ("expert", "model"), axis_types=(AxisType.Auto,) * 2)
  key = jax.random.key(0)
  params = init_params(key)
  params = jax.tree.map(lambda p, s: jax.device_put(p, NamedSharding(mesh, s)), params, SPECS)
  x = jax.random.normal(jax.random.key(1), (TOKENS, D))
  y = jnp.roll(x, 1, axis=-1)

  max_norm = 0.05
  tx = optax.chain(clipax.clip_by_global_norm(max_norm, specs=SPECS, name="moe"),
                   optax.adam(1e-2))
  state = tx.init(params)
  step = sharded_step(tx, state, mesh)
  reference = jax.jit(jax.value_and_grad(reference_loss))

  rows = []
  for i in range(3 if args.quick else 20):
    new_params, new_state, loss, grads = step(params, state, x, y)
    norm = float(clipax.metrics(new_state)["clip/moe/norm"])
    ref_loss, ref_grads = reference(params, x, y)
    full = float(np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2)
                             for g in jax.tree.leaves(ref_grads))))
    error = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True))
    rows.append({"step": i, "loss": float(loss), "norm": norm, "float64_norm": full,
                 "grad_error": error, "clipped": norm > max_norm})
    print(f"step {i:2d}  loss {float(loss):.4f} (one device: {float(ref_loss):.4f})  "
          f"norm measured with specs {norm:.6f}, float64 norm on one device {full:.6f}")
    params, state = new_params, new_state

  def all_reduces(t):
    init = t.init(params)
    hlo = sharded_step(t, init, mesh).lower(params, init, x, y).compile().as_text()
    return re.findall(r"= (\S+) all-reduce(?:-start)?\(", hlo)

  with_clip, without = all_reduces(tx), all_reduces(optax.adam(1e-2))
  added = list(with_clip)
  for shape in without:
    added.remove(shape)
  print(f"all-reduces in the compiled step: {len(with_clip)} with the clipper, {len(without)} "
        f"without (the model's own psums); the clipper adds {len(added)}: {added} (one scalar "
        "for the norm; on the CPU a second one sits in the overflow-rescue branch, which runs "
        "only when the float32 sum overflows)")
  return rows



if __name__ == "__main__":
  main()
