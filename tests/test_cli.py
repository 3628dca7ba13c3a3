"""The command line's usage errors: argparse style (usage, one error line, exit 2), no traceback.

Nothing here runs an experiment: ``run_demo`` is replaced by a recorder, so a bad argument that
slipped through would show up as a recorded call instead of a usage error.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from clipax import __main__ as cli

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def calls(monkeypatch) -> list:
  """The ``run_demo`` calls ``cli.main`` makes (none are run)."""
  recorded = []
  monkeypatch.setattr(cli, "run_demo", lambda names, **kw: recorded.append((names, kw)))
  return recorded


def _usage_error(argv: list[str], capsys) -> str:
  """Runs ``cli.main(argv)``, expects a usage error, returns its one error line."""
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv)
  assert exit_info.value.code == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  lines = captured.err.strip().splitlines()
  assert lines[0].startswith("usage: clipax")
  errors = [line for line in lines if "error:" in line]
  assert len(errors) == 1 and errors[0] == lines[-1], captured.err
  assert "Traceback" not in captured.err
  return errors[0]


@pytest.mark.parametrize("value", ["0", "-3", "abc", "1.5", ""])
def test_bad_seeds_is_a_usage_error(value, calls, capsys):
  line = _usage_error(["demo", "cliff", "--seeds", value], capsys)
  assert line == f"clipax demo: error: argument --seeds: expected a positive integer, got {value!r}"
  assert calls == []


def test_bad_seeds_without_the_demo_word(calls, capsys):
  line = _usage_error(["--quick", "--seeds", "0"], capsys)
  assert "argument --seeds" in line and "'0'" in line
  assert calls == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "nope"], "argument experiment: invalid choice: 'nope'"),
        (["nope"], "argument command: invalid choice: 'nope'"),
        (["demo", "--bogus"], "unrecognized arguments: --bogus"),
        (["demo", "--seeds"], "argument --seeds: expected one argument"),
        (["demo", "cliff", "imbalance"], "unrecognized arguments: imbalance"),
    ],
)
def test_other_bad_arguments_are_usage_errors(argv, message, calls, capsys):
  assert message in _usage_error(argv, capsys)
  assert calls == []


def test_out_that_is_a_file_is_a_usage_error(tmp_path, calls, capsys):
  path = tmp_path / "results"
  path.write_text("not a folder")
  line = _usage_error(["demo", "--out", str(path)], capsys)
  assert line == f"clipax demo: error: argument --out: {str(path)!r} exists and is not a folder"
  assert path.read_text() == "not a folder"
  assert calls == []


def test_out_that_cannot_be_created_is_a_usage_error(tmp_path, calls, capsys):
  blocker = tmp_path / "file"
  blocker.write_text("")
  line = _usage_error(["demo", "--out", str(blocker / "sub")], capsys)
  assert line.startswith(f"clipax demo: error: argument --out: cannot create the folder "
                         f"{str(blocker / 'sub')!r}: ")
  assert calls == []


def test_good_arguments_reach_run_demo(tmp_path, calls):
  out = tmp_path / "new" / "folder"
  assert cli.main(["demo", "cliff", "--seeds", "3", "--quick", "--out", str(out)]) == 0
  assert calls == [(["cliff"], {"quick": True, "seeds": 3, "out": out, "progress": True})]
  assert out.is_dir()  # made before any experiment runs


def test_interrupt_exits_130_without_traceback(monkeypatch, tmp_path, capsys):
  def interrupted(names, **kw):
    raise KeyboardInterrupt

  monkeypatch.setattr(cli, "run_demo", interrupted)
  try:
    status = cli.main(["demo", "--out", str(tmp_path)])
  except KeyboardInterrupt:  # re-raised, it would stop the whole pytest session
    pytest.fail("KeyboardInterrupt escaped clipax.__main__.main")
  assert status == 130
  assert capsys.readouterr().err == "clipax: interrupted\n"


def test_module_entry_point_usage_error_has_no_traceback():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, "-m", "clipax", "demo", "--seeds", "0"],
      capture_output=True, text=True, timeout=120, cwd=ROOT, env=env, check=False,
  )
  assert proc.returncode == 2
  assert proc.stdout == ""
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      "clipax demo: error: argument --seeds: expected a positive integer, got '0'"
  )
