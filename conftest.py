"""JAX settings for every test and doctest: silent rank promotion is a bug here.

Dtype promotion stays "standard" globally because optax itself (e.g. adam's bias correction)
is not strict-clean; tests/test_contract.py runs every clipax transformation on its own under
``jax.numpy_dtype_promotion("strict")``, so clipax's own code is held to the strict rule.
"""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_addoption(parser):
  parser.addoption("--slow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--slow"):
    return
  deselected = [item for item in items if item.get_closest_marker("slow")]
  if deselected:
    config.hook.pytest_deselected(items=deselected)
    items[:] = [item for item in items if not item.get_closest_marker("slow")]
