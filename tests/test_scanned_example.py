"""``examples/scanned_transformer.py``: a scanned NNX transformer clipped per layer
(``clipax.adagc(layer_axis=...)``) runs as a user runs it (``--quick``, a new process), learns,
and reports one norm and one EMA per layer."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "scanned_transformer.py"


def test_quick_run_trains_and_reports_per_layer_metrics():
  proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True,
                        text=True, timeout=300, cwd=ROOT, env=dict(os.environ), check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  final = re.search(r"final loss ([\d.]+) \(first ([\d.]+)\); (\d+) layers, per-layer EMA of "
                    r"up/kernel's norm: ([\d. ]+)", proc.stdout)
  assert final, proc.stdout
  loss, first, layers = float(final[1]), float(final[2]), int(final[3])
  assert loss < 0.3 * first, proc.stdout
  gammas = [float(g) for g in final[4].split()]
  assert layers == 3 and len(gammas) == 3 and len(set(gammas)) == 3, proc.stdout  # one per layer
  norms = re.findall(r"per-layer norm of up/kernel: ([\d. ]+)", proc.stdout)
  assert norms and all(len(n.split()) == 3 for n in norms), proc.stdout
