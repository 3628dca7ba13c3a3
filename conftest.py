"""JAX settings for every test and doctest: silent rank promotion is a bug here.

Dtype promotion stays "standard" globally because optax itself (e.g. adam's bias correction)
is not strict-clean; tests/test_contract.py runs every clipax transformation on its own under
``jax.numpy_dtype_promotion("strict")``, so clipax's own code is held to the strict rule.
"""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_addoption(parser):
  parser.addoption("--slow", action="store_true", default=False, help="run tests marked slow")


# Modules with single tests of 5-25 s (subprocesses, notebooks, whole training runs, TPU
# compiles), run first: the two pytest-xdist workers share them out at the start instead of one
# worker finishing the suite's last long test alone (the test command's wall time, issue 16).
LONG_FIRST = ("test_experiments", "test_notebooks", "test_compiled_structure", "test_properties",
              "test_expert_example", "test_typing", "test_scanned_example", "test_ecosystem",
              "test_bad_batches", "test_benchmarks_smoke", "test_dp_sgd_example")


def _long_first(item) -> int:
  stem = item.path.stem
  return LONG_FIRST.index(stem) if stem in LONG_FIRST else len(LONG_FIRST)


def pytest_collection_modifyitems(config, items):
  items.sort(key=_long_first)  # stable: the order within a module is kept
  if config.getoption("--slow"):
    return
  deselected = [item for item in items if item.get_closest_marker("slow")]
  if deselected:
    config.hook.pytest_deselected(items=deselected)
    items[:] = [item for item in items if not item.get_closest_marker("slow")]
