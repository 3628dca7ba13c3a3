"""clipax ships its types (``py.typed``): a user's script type-checks against it with mypy."""

import importlib.resources
import textwrap

import pytest


def test_package_ships_py_typed():
  assert importlib.resources.files("clipax").joinpath("py.typed").is_file()


def test_mypy_checks_a_user_script_against_clipax(tmp_path):
  api = pytest.importorskip("mypy.api", reason="mypy is a test dependency (pyproject [test])")
  script = tmp_path / "train.py"
  script.write_text(textwrap.dedent("""
      import jax.numpy as jnp
      import optax
      import clipax

      tx = optax.chain(clipax.clip_by_global_norm(1.0, name="clip"), optax.adamw(3e-4))
      state = tx.init({"w": jnp.zeros(3)})
      m: dict[str, object] = dict(clipax.metrics(state))
      bad = clipax.clip_by_global_norm("one")
  """))
  out, err, status = api.run([str(script), "--cache-dir", str(tmp_path / "cache"),
                              "--follow-imports=silent", "--no-error-summary"])
  assert "Cannot find implementation or library stub" not in out + err
  assert "missing library stubs or py.typed" not in out + err
  # the hyperparameter is typed ArrayLike: a string is an error mypy reports
  assert status == 1 and 'Argument 1 to "clip_by_global_norm" has incompatible type "str"' in out
  assert out.count("error:") == 1, out
