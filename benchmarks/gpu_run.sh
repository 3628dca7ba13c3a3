#!/usr/bin/env bash
# Every benchmark on one GPU machine in a single pass, results written to $OUT (default
# benchmarks/results). Each part has its own time limit and writes its JSON/markdown as it goes,
# so a part cut short keeps what it measured: a JSON and a markdown file per part and one log.
# Pass --quick to try the script out on a CPU.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_run.sh            # full sizes, ~6 minutes on an H100
#   OUT=/tmp/gpu bash benchmarks/gpu_run.sh --quick    # seconds, any machine
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
# torch and JAX share the GPU: JAX must not take 75% of its memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
QUICK=${1:-}
TAG=${TAG:-gpu}
run() {  # run <seconds> <tag> <bench_clip args...>
  local limit=$1 tag=$2
  shift 2
  echo "=== $tag: bench_clip $* (limit ${limit}s)"
  timeout "$limit" python benchmarks/bench_clip.py $QUICK --out "$OUT" --tag "${TAG}_$tag" "$@" \
    2>&1 | tee -a "$OUT/log_${TAG}.txt"
}
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
  python -c "import jax, optax, torch; print('jax', jax.__version__, jax.devices()); \
print('optax', optax.__version__, 'torch', torch.__version__, torch.cuda.is_available())"
} 2>&1 | tee "$OUT/log_${TAG}.txt"
# 1. (a) one leaf, (b) the transformer tree, the train step, (d) bf16/fp16, with the experiment
#    on the concatenation bound.
run 150 main --cases leaf,transformer,step,half --small-leaf-variants 0,4K,4M
# 2. (c) many small leaves; optax's compile time explodes with the leaf count, so it is capped.
#    (The first H100 run gave this part 110 s: not enough for the 1,000- and 3,000-leaf trees.)
run 150 sweep --cases sweep --leaf-counts ${LEAF_COUNTS:-1000,3000,5000} --optax-max-leaves 1000 \
  --small-leaf-variants 0,4K
# 3. the 10,000-leaf tree (compile time), last, since it is the slowest to compile.
run 100 sweep10k --cases sweep --leaf-counts ${BIG_LEAF_COUNT:-10000} --optax-max-leaves 0
ls -la "$OUT"
