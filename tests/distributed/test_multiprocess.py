"""Two real processes on 127.0.0.1, one global array across both, clipped under ``jax.jit``.

Each process is a subprocess with a free port, a timeout and ``XLA_FLAGS`` stripped (it sets
its own device count); both are killed in ``finally`` so a dead peer never hangs the run.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
from _refs import assert_close, clip64
from _two_process_worker import MAX_NORM, PROCESSES, make_data

import clipax

WORKER = Path(__file__).with_name("_two_process_worker.py")
TIMEOUT_S = 120


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_single_process(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  port = _free_port()
  outs = [tmp_path / f"process{i}.json" for i in range(PROCESSES)]
  procs = []
  start = time.monotonic()
  try:
    for i in range(PROCESSES):
      procs.append(subprocess.Popen(
          [sys.executable, str(WORKER), str(port), str(i), str(outs[i])],
          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      ))
    logs = []
    for p in procs:
      remaining = max(1.0, TIMEOUT_S - (time.monotonic() - start))
      logs.append(p.communicate(timeout=remaining)[0])
    for p, log in zip(procs, logs, strict=True):
      assert p.returncode == 0, f"worker exited with {p.returncode}:\n{log[-3000:]}"
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  print(f"two-process wall time: {time.monotonic() - start:.1f} s")

  data = make_data()
  ref_out, ref_norm, ref_scale = clip64(data, MAX_NORM)
  ref = dict(zip(sorted(data), ref_out, strict=True))  # dicts flatten in sorted key order
  tx = clipax.clip_by_global_norm(MAX_NORM)
  single, single_state = jax.jit(tx.update)(data, tx.init(data))
  seen = {k: set() for k in data}
  for out in outs:
    result = json.loads(out.read_text())
    assert_close(result["norm"], ref_norm)
    assert_close(result["norm"], single_state.norm)
    assert_close(result["scale"], ref_scale)
    for key, shards in result["shards"].items():
      for shard in shards:
        rows = len(shard["values"])
        start_row = shard["start"]
        assert_close(shard["values"], ref[key][start_row:start_row + rows], atol=1e-6)
        assert_close(shard["values"], single[key][start_row:start_row + rows], atol=1e-6)
        seen[key].update(range(start_row, start_row + rows))
  assert all(seen[k] == set(range(data[k].shape[0])) for k in data), seen
