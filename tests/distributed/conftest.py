"""Eight simulated CPU devices for the distributed tests, which run in their own process.

Run this directory on its own, with the device count and a collective timeout set before JAX
starts (a collective that hangs then fails after 10 s instead of hanging CI)::

  XLA_FLAGS="--xla_force_host_platform_device_count=8 \
--xla_cpu_collective_call_terminate_timeout_seconds=10" python -m pytest tests/distributed

Without ``XLA_FLAGS`` the device count is set here with ``jax_num_cpu_devices``, which works as
long as no JAX operation has run yet. A run that does not name this directory (``pytest`` or
``pytest tests``) leaves it out, so the other tests keep one device and this process's JAX
settings are untouched.
"""

from pathlib import Path

import jax
import pytest

DEVICES = 8
HERE = Path(__file__).resolve().parent


def _targets_this_directory(config) -> bool:
  root = config.invocation_params.dir
  for arg in config.args:
    path = (root / arg.split("::")[0]).resolve()
    if path == HERE or HERE in path.parents:
      return True
  return False


def pytest_configure(config):
  if not _targets_this_directory(config):
    return
  import os

  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    jax.config.update("jax_num_cpu_devices", DEVICES)


def pytest_ignore_collect(collection_path, config):
  if HERE in Path(collection_path).resolve().parents and not _targets_this_directory(config):
    return True
  return None


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
  if jax.device_count() < DEVICES:
    raise RuntimeError(
        f"tests/distributed needs {DEVICES} CPU devices, found {jax.device_count()}: JAX started "
        "before this conftest; run the directory in its own pytest process (see its docstring)"
    )
