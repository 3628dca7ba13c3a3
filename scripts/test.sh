#!/usr/bin/env bash
# The test command of README.md, and exactly what CI runs (.ci/run): installs what the tests
# need, lints, runs the suite and the doctests, then the multi-device tests in their own process
# on 8 simulated CPU devices.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e '.[test]'
python -m ruff check .
python -m pytest -n 2 --doctest-modules clipax tests --ignore=tests/distributed "$@"
XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_collective_call_terminate_timeout_seconds=10" \
  python -m pytest tests/distributed "$@"
