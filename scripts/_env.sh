# Sourced by scripts/test.sh and scripts/demo.sh. `clipax_install EXTRA` picks the Python
# environment, installs clipax (editable) with that extra into it and sets PY to its python:
#   - an active virtual environment ($VIRTUAL_ENV) or conda environment ($CONDA_PREFIX): that one;
#   - otherwise ./.venv, created on the first run from $PYTHON (default: python3) and reused.
# Nothing is ever installed into the system Python (Debian and Ubuntu refuse that: PEP 668).
# If the system Python cannot make a venv with pip in it (Debian/Ubuntu without the python3-venv
# package), the venv is made without pip and pip is bootstrapped from a wheel
# (scripts/bootstrap_pip.py). CLIPAX_REINSTALL=1 reinstalls into an existing ./.venv.

CLIPAX_MIN_PYTHON="3.11"  # keep in step with requires-python in pyproject.toml

# A phase line, with the minutes:seconds since the command started.
clipax_step() { printf '==> [%d:%02d] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }
clipax_die() { printf 'error: %s\n' "$*" >&2; exit 2; }

# Exits unless $1 is a python of version >= CLIPAX_MIN_PYTHON.
clipax_check_python() {
  local version
  version=$("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) ||
    clipax_die "cannot run $1"
  "$1" -c "import sys; sys.exit(sys.version_info[:2] < tuple(map(int, '$CLIPAX_MIN_PYTHON'.split('.'))))" ||
    clipax_die "clipax needs Python >= $CLIPAX_MIN_PYTHON; $1 is Python $version. Install a newer" \
      "one and point PYTHON at it, e.g. PYTHON=python3.12 bash $0"
}

clipax_make_venv() {
  local base="${PYTHON:-python3}"
  command -v "$base" >/dev/null ||
    clipax_die "no '$base' on PATH: install Python >= $CLIPAX_MIN_PYTHON or set PYTHON=/path/to/python3"
  clipax_check_python "$base"
  rm -rf .venv
  clipax_step "creating .venv with $("$base" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
  if ! "$base" -m venv .venv >/dev/null 2>&1; then
    # Debian/Ubuntu ship ensurepip in the separate python3-venv package; without it, make the venv
    # without pip and bootstrap pip from a wheel.
    clipax_step "$base has no ensurepip (Debian/Ubuntu: the python3-venv package); bootstrapping pip"
    rm -rf .venv
    "$base" -m venv --without-pip .venv || clipax_die "$base -m venv --without-pip .venv failed"
    .venv/bin/python scripts/bootstrap_pip.py || { rm -rf .venv; exit 1; }
  fi
  touch .venv/.clipax-ready
}

clipax_install() {
  local extra="$1" where stamp=""
  if [[ -n "${VIRTUAL_ENV:-}" ]]; then
    PY="$VIRTUAL_ENV/bin/python"
    where="the active virtual environment $VIRTUAL_ENV"
  elif [[ -n "${CONDA_PREFIX:-}" ]]; then
    PY="$CONDA_PREFIX/bin/python"
    where="the active conda environment $CONDA_PREFIX"
  else
    # .clipax-ready marks a venv that was made completely (an interrupted first run starts over).
    if [[ ! -f .venv/.clipax-ready ]] || ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
      clipax_make_venv
    fi
    PY="$PWD/.venv/bin/python"
    where="./.venv"
    # Installed once per extra and pyproject.toml; later runs skip pip entirely.
    stamp=".venv/.clipax-$extra-$(cksum pyproject.toml | cut -d' ' -f1)"
  fi
  [[ -x "$PY" ]] || clipax_die "no python at $PY ($where)"
  clipax_check_python "$PY"
  if [[ -n "$stamp" && -f "$stamp" && -z "${CLIPAX_REINSTALL:-}" ]]; then
    clipax_step "clipax[$extra] already installed in $where (CLIPAX_REINSTALL=1 to reinstall)"
    return
  fi
  clipax_step "installing clipax[$extra] into $where (the first time takes a few minutes)"
  "$PY" -m pip install --disable-pip-version-check -e ".[$extra]"
  if [[ -n "$stamp" ]]; then
    rm -f .venv/.clipax-"$extra"-*
    touch "$stamp"
  fi
}

# The TPU compiler (libtpu, the version the installed jax's `tpu` extra names) for the structure
# tests that compile for a TPU without one (tests/test_compiled_structure.py). It goes into
# ./.aot/tpu, not into the Python environment: there it would make every JAX program look for a
# TPU at startup (and print libtpu's warnings). The tests point TPU_LIBRARY_PATH at it. Optional:
# when pip cannot install it (no wheel for this platform, no network), CLIPAX_AOT_UNAVAILABLE says
# why and those tests are skipped with that reason.
clipax_install_tpu_compiler() {
  local spec
  if [[ -f .aot/tpu/libtpu/libtpu.so ]]; then
    return
  fi
  spec=$("$PY" -c 'import importlib.metadata as m, re
print(next(re.split(r"\s*;", r)[0] for r in m.requires("jax") if r.startswith("libtpu")))') || {
    export CLIPAX_AOT_UNAVAILABLE="the installed jax names no libtpu version in its tpu extra"
    return
  }
  clipax_step "installing the TPU compiler into ./.aot/tpu for the deviceless structure tests ($spec)"
  rm -rf .aot/tpu
  if ! "$PY" -m pip install --disable-pip-version-check --no-deps --target .aot/tpu "$spec"; then
    rm -rf .aot/tpu
    export CLIPAX_AOT_UNAVAILABLE="pip could not install $spec (its output is above)"
    clipax_step "not installed: the TPU structure tests will be skipped"
  fi
}
