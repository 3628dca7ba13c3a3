"""The public API: sorted ``__all__``, every name documented with a runnable example."""

import inspect

import clipax


def test_all_is_sorted_and_complete():
  assert list(clipax.__all__) == sorted(clipax.__all__)
  assert len(set(clipax.__all__)) == len(clipax.__all__)
  for name in clipax.__all__:
    assert hasattr(clipax, name), name


def test_every_public_name_has_a_docstring_with_an_example():
  missing = []
  for name in clipax.__all__:
    obj = getattr(clipax, name)
    doc = inspect.getdoc(obj) or ""
    needs = (">>>", "Returns:", "Args:")
    if inspect.isfunction(obj) and not all(n in doc for n in needs):
      missing.append(name)
    elif inspect.isclass(obj) and ("Attributes:" not in doc and ">>>" not in doc):
      missing.append(name)
  assert not missing, f"public names without Args/Returns/Examples: {missing}"


def test_version_is_exposed():
  assert isinstance(clipax.__version__, str) and clipax.__version__.count(".") >= 2


def test_design_names_are_public():
  for name in ["global_norm", "leaf_norms", "clip_by_global_norm", "clip_by_value",
               "clip_by_leaf_norm", "clip_by_block_rms", "adaptive_grad_clip", "clip_with_norm",
               "ClipState", "metrics"]:
    assert name in clipax.__all__, name
