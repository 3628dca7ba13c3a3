#!/usr/bin/env bash
# The demo command of README.md: installs clipax[demo] (into the active virtual/conda environment,
# else into ./.venv, see scripts/_env.sh) and runs `python -m clipax demo` with the arguments given
# (e.g. `bash scripts/demo.sh cliff --quick`; `bash scripts/demo.sh --help` lists them).
set -euo pipefail
here=$PWD  # --out is relative to where you run the command
cd "$(dirname "$0")/.."
source scripts/_env.sh
clipax_install demo
cd "$here"
clipax_step "python -m clipax demo $*"
exec "$PY" -m clipax demo "$@"
