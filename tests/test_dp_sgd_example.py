"""``examples/dp_sgd.py``: runs as a user runs it (``--quick``, a new process) and learns; its
noise has the standard deviation DP-SGD calibrates (``noise_multiplier * max_norm`` on the sum)."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import clipax

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "dp_sgd.py"


def _module():
  spec = importlib.util.spec_from_file_location("dp_sgd_example", SCRIPT)
  assert spec is not None and spec.loader is not None
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_quick_run_trains_and_reports_the_clip_metrics():
  proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True,
                        text=True, timeout=300, cwd=ROOT, env=dict(os.environ), check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  final = re.search(r"final accuracy ([\d.]+) .* clip rate ([\d.]+) over (\d+) examples",
                    proc.stdout)
  assert final, proc.stdout
  accuracy, clip_rate, examples = float(final[1]), float(final[2]), int(final[3])
  assert accuracy > 0.6, proc.stdout  # chance is 1/3
  assert 0.0 < clip_rate < 1.0 and examples == 60 * 64, proc.stdout


def test_noise_on_the_clipped_sum_has_std_noise_multiplier_times_max_norm():
  dp = _module()
  args = dp.parse(["--quick", "--noise-multiplier", "2.0", "--max-norm", "1.5"])
  params = dp.init_params(jax.random.key(0))
  tx = dp.make_optimizer(args)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  per_example = jax.tree_util.tree_map(lambda p: jnp.zeros((4, *p.shape)), params)

  @jax.jit
  def first_update(per_example, zeros, params):
    _, info = clipax.per_example_clip(per_example, args.max_norm)
    return tx.update(zeros, tx.init(params), params, per_example_info=info)[0]

  updates = first_update(per_example, zeros, params)
  # first SGD step: update = -lr * (sum + noise) / batch, with a zero sum here
  noise = np.concatenate([np.ravel(u) for u in jax.tree_util.tree_leaves(updates)])
  noise = noise * (-args.batch_size / args.learning_rate)
  assert noise.size > 400
  np.testing.assert_allclose(noise.std(), 2.0 * 1.5, rtol=0.15)
  assert abs(noise.mean()) < 0.5
