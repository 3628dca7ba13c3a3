"""One of the two processes of ``test_multiprocess.py``; run by that test, not by pytest.

``python _two_process_worker.py PORT PROCESS_ID OUT_JSON``: joins a two-process JAX cluster on
127.0.0.1 (CPU collectives through gloo), builds a global gradient from this process's rows with
``jax.make_array_from_process_local_data``, clips it under ``jax.jit`` and writes the norm and
its own shards of the clipped gradient to ``OUT_JSON``.
"""

from __future__ import annotations

import json
import sys

import numpy as np

PROCESSES = 2
LOCAL_DEVICES = 2
ROWS = 16


def make_data() -> dict[str, np.ndarray]:
  """The global gradient, the same in every process and in the test."""
  rng = np.random.default_rng(42)
  return {
      "w": (rng.normal(size=(ROWS, 12)) * 3).astype(np.float32),
      "v": rng.normal(size=(ROWS,)).astype(np.float32),
  }


MAX_NORM = 2.0


def main(port: int, process_id: int, out_path: str) -> None:
  import jax

  jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{port}",
      num_processes=PROCESSES,
      process_id=process_id,
      initialization_timeout=60,
  )
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  import clipax

  assert jax.device_count() == PROCESSES * LOCAL_DEVICES, jax.devices()
  mesh = jax.make_mesh((jax.device_count(),), ("rows",), axis_types=(AxisType.Auto,))
  sharding = NamedSharding(mesh, P("rows"))
  full = make_data()

  def global_array(x):
    rows = [idx[0] for idx in sharding.addressable_devices_indices_map(x.shape).values()]
    starts = [r.start or 0 for r in rows]
    stops = [x.shape[0] if r.stop is None else r.stop for r in rows]
    local = x[min(starts):max(stops)]  # this process's rows (contiguous on a 1-D mesh)
    return jax.make_array_from_process_local_data(sharding, local, x.shape)

  grads = {k: global_array(v) for k, v in full.items()}
  tx = clipax.clip_by_global_norm(MAX_NORM)
  out, state = jax.jit(tx.update)(grads, tx.init(grads))
  shards = {
      k: [
          {"start": s.index[0].start or 0, "values": np.asarray(s.data).tolist()}
          for s in v.addressable_shards
      ]
      for k, v in out.items()
  }
  with open(out_path, "w") as f:
    json.dump({"norm": float(state.norm), "scale": float(state.scale), "shards": shards}, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
