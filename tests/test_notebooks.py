"""Every notebook in ``notebooks/`` runs top to bottom in quick mode, and is committed clean.

The notebooks are executed with nbclient in a ``python3`` kernel (ipykernel, installed with the
``test`` extra, provides it in the same environment) with ``CLIPAX_NOTEBOOK_QUICK=1``, which each
notebook's parameter cell reads to shrink its sizes.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import re

import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300
QUICK_ENV = "CLIPAX_NOTEBOOK_QUICK"
BADGE = "https://colab.research.google.com/github/clipax/clipax/blob/main/notebooks/{}.ipynb"
FIGURES = {"quickstart": 1, "cliff": 2, "imbalance": 2, "adaptive_spiky_lm": 1,
           "sharded_clipping": 1}
"""How many figures (PNG outputs) each notebook shows when it runs."""

# jupyter_core warns (DeprecationWarning) that its paths will move to platformdirs unless this
# is set; setting it for the kernel too keeps the kernel's own startup quiet.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Jupyter is migrating its paths to use standard platformdirs:DeprecationWarning"
)


def _ids(paths):
  return [p.stem for p in paths]


def _load_build():
  spec = importlib.util.spec_from_file_location("_notebook_build", NOTEBOOK_DIR / "_build.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _code_sources(nb) -> list[str]:
  return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def test_every_built_notebook_is_present():
  build = _load_build()
  assert set(build.NOTEBOOKS) <= {p.stem for p in NOTEBOOKS}, "run python notebooks/_build.py"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_committed_clean(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata["kernelspec"]["name"] == "python3"
  first = nb.cells[0]
  assert first.cell_type == "markdown" and first.source.startswith("# "), "title first"
  assert BADGE.format(path.stem) in first.source, "Colab badge with this notebook's path"
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [], f"outputs committed in {path.name}"
      assert cell.execution_count is None
  sources = _code_sources(nb)
  assert 'if "google.colab" in sys.modules:' in sources[0], "the install cell runs only on Colab"
  assert any("# @param" in s and QUICK_ENV in s for s in sources), "a quick-mode parameter cell"
  transform = TransformerManager().transform_cell
  for source in sources:  # magics are fine, syntax errors are not
    ast.parse(transform(source))


@pytest.mark.parametrize("name", sorted(_load_build().NOTEBOOKS))
def test_notebook_matches_its_generator(name):
  built = _load_build().build(name)
  committed = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
  assert [c.source for c in committed.cells] == [c.source for c in built.cells], (
      f"notebooks/{name}.ipynb is stale: run python notebooks/_build.py {name}"
  )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs_in_quick_mode(path, tmp_path, monkeypatch):
  monkeypatch.setenv(QUICK_ENV, "1")
  monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(
      nb,
      timeout=CELL_TIMEOUT_S,
      kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}},
  )
  client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == FIGURES.get(path.stem, len(images)), "every figure is drawn"
  if path.stem == "quickstart":
    _check_threshold_summary("".join(o.get("text", "") for o in outputs))


def _check_threshold_summary(text: str) -> None:
  """The quickstart's section 5 states what its own numbers show: the ranking is sorted and the
  factor and comparisons it prints follow from the losses it prints."""
  block = text[text.index("lowest first:"):]
  ranked = [(float(loss), name.strip(), status) for loss, name, status in re.findall(
      r"^  (\d+\.\d+)  (.+?) diagnose: (\w+)$", block, flags=re.M)]
  assert len(ranked) == 4 and [r[0] for r in ranked] == sorted(r[0] for r in ranked)
  factor, low, high = re.search(
      r"changes this loss ([\d.]+)x: from ([\d.]+) .* to ([\d.]+) ", block).groups()
  assert (float(low), float(high)) == (ranked[0][0], ranked[-1][0])
  assert float(factor) == round(float(high) / float(low), 1)
  for rank, (_, name, status) in enumerate(ranked, start=1):
    if status == "clipping_often":
      assert f"{name} is flagged clipping_often; its loss ranks {rank} of 4" in block


def test_quickstart_text_does_not_guess_the_numbers():
  build = _load_build()
  text = " ".join(c.source for c in build.build("quickstart").cells if c.cell_type == "markdown")
  text = " ".join(text.split())
  assert "barely change" not in text
  assert "by the factor printed above" in text
