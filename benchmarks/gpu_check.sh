#!/usr/bin/env bash
# One short GPU check in a single call: the norm and clipper tests on the GPU (where the
# branch-free overflow rescue is compiled), then the speed benchmark for the one-leaf, transformer
# and train-step cases, clipax beside optax and torch, with the variadic-rescue experiment
# (one reduction instead of three per leaf on GPU/TPU) and a 4M-element small-leaf bound (fewer
# reduction kernels) beside them. Results go to $OUT.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
TAG=${TAG:-gpu_check}
{
  nvidia-smi --query-gpu=name --format=csv,noheader || true
  timeout 170 python -m pytest -q -p no:cacheprovider -p no:benchmark -n 4 \
    tests/test_norms.py tests/test_clipping.py tests/test_contract.py 2>&1 | tail -15
  timeout 300 python benchmarks/bench_clip.py --out "$OUT" --tag "$TAG" \
    --cases step,transformer,leaf,half --sizes 64M,256M --variadic-rescue --small-leaf-variants 4M
} 2>&1 | tee "$OUT/log_${TAG}.txt"
