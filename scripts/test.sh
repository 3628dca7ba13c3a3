#!/usr/bin/env bash
# The test command of README.md, and exactly what CI runs (.ci/run): installs clipax[test] (into the
# active virtual/conda environment, else into ./.venv, see scripts/_env.sh), lints, type-checks
# the package (mypy), runs the suite and the doctests (2 pytest-xdist workers), then the
# multi-device tests in their own pytest run on 8 simulated CPU devices (2 workers too). It also installs
# libtpu (into ./.aot/tpu) for the tests that compile for a TPU without one. Extra arguments go to both
# pytest runs (e.g. `bash scripts/test.sh -x -k norm`). Runs every phase; exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh
clipax_install test || exit
clipax_install_tpu_compiler
# The suite runs on the CPU (multi-device tests on simulated CPU devices); JAX_PLATFORMS=cpu keeps
# JAX from looking for an accelerator (libtpu or a CUDA plugin in the environment would make it
# try). Compiling for TPU/GPU without one still works.
export JAX_PLATFORMS=cpu
failed=()

clipax_step "lint: ruff check ."
"$PY" -m ruff check . || failed+=(lint)

clipax_step "types: mypy (the package, configured in pyproject.toml)"
"$PY" -m mypy || failed+=(types)

# pytest exits 5 when it collects nothing, which a -k filter can do to one of the two runs.
pytest_run() {
  "$PY" -m pytest "$@"
  local status=$?
  if (( status == 5 && ${#extra[@]} > 0 )); then status=0; fi
  return "$status"
}
extra=("$@")

# XLA's persistent compilation cache, shared by the two workers (many tests compile the same
# programs from fresh closures; the cache is keyed by the program, JAX version and flags, so it is
# safe to keep between runs: a rerun compiles little). CLIPAX_JAX_CACHE= (empty) turns it off.
if [[ -n "${CLIPAX_JAX_CACHE-.jax-cache}" ]]; then
  export JAX_COMPILATION_CACHE_DIR="$PWD/${CLIPAX_JAX_CACHE-.jax-cache}"
  export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
fi

# The suite compiles thousands of tiny programs whose run time is negligible: XLA:CPU's LLVM
# backend optimisation is off for it (a sixth less compile time). XLA's own passes, which decide
# the fusions, copies and collectives the tests check, are unchanged: the 63 CPU programs of
# benchmarks/programs.py compile to the same optimized HLO either way. The benchmarks and the
# demo run fully optimised.
FAST_COMPILE="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

clipax_step "tests and doctests (2 workers)"
XLA_FLAGS="${XLA_FLAGS:-} $FAST_COMPILE" \
  pytest_run -n 2 --durations=5 --doctest-modules clipax tests --ignore=tests/distributed "$@" ||
  failed+=(tests)

# Its own pytest run (2 workers, each a process with 8 simulated CPU devices): 49 -> 34 s.
clipax_step "multi-device tests (8 simulated CPU devices, own pytest run, 2 workers)"
XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_collective_call_terminate_timeout_seconds=10 $FAST_COMPILE" \
  pytest_run -n 2 tests/distributed "$@" || failed+=(multi-device)

if (( ${#failed[@]} )); then
  clipax_step "FAILED: ${failed[*]}"
  exit 1
fi
clipax_step "all passed"
