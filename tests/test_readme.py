"""The README's Quickstart runs as written and prints what the README says it prints."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _section(title):
  text = README.read_text()
  section = text[text.index(f"## {title}\n"):]
  section = section[: section.index("\n## ", 3)]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  printed = re.search(r"prints \(pasted from a run\):\n\n```\n(.*?)```", section, re.S).group(1)
  return code, printed


@pytest.mark.parametrize("title", ["Quickstart", "Metrics"])
def test_readme_example_prints_what_the_readme_shows(title):
  code, printed = _section(title)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, str(README), "exec"), {})
  assert out.getvalue() == printed


def test_readme_links_point_to_files_in_the_repository():
  root = README.parent
  for target in re.findall(r"\]\(([^)#]+)\)", README.read_text()):
    if "://" in target:
      continue
    assert (root / target).exists(), target
