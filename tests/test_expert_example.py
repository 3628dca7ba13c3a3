"""``examples/expert_parallel.py``: a mixture-of-experts step under ``shard_map`` on 8 simulated
devices (its own process), clipped with ``specs=``: the norm measured there equals the float64
norm of the same model's gradient on one device, the loss is the one-device loss, and the
clipper adds only scalar all-reduces to the compiled step."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "expert_parallel.py"


def test_quick_run_measures_the_global_norm_of_the_expert_parallel_layout():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True,
                        timeout=300, cwd=ROOT, env=env, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  steps = re.findall(r"loss ([\d.]+) \(one device: ([\d.]+)\)  norm measured with specs "
                     r"([\d.]+), float64 norm on one device ([\d.]+)", proc.stdout)
  assert len(steps) == 3, proc.stdout
  for loss, ref_loss, norm, ref_norm in steps:
    assert abs(float(loss) - float(ref_loss)) <= 1e-4
    assert abs(float(norm) - float(ref_norm)) <= 2e-6 * float(ref_norm) + 1e-6, (norm, ref_norm)
  # the first step clips (norm > 0.05), so training moves and the norms differ step to step
  assert len({n for _, _, n, _ in steps}) == 3
  added = re.search(r"the clipper adds (\d+): (\[.*?\]) \(one scalar", proc.stdout)
  assert added, proc.stdout
  assert set(re.findall(r"'([^']+)'", added[2])) == {"f32[]"}, added[0]
