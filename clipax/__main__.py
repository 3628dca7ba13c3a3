"""The clipax command line.

``python -m clipax demo [imbalance|cliff|spiky-lm|all] [--quick] [--seeds N] [--out DIR]`` runs
the demo experiments on embedded data (nothing is downloaded), prints a table per experiment and
writes PNG plots and a JSON of every number to ``--out`` (default ``./clipax-demo/``).
``python -m clipax bench [args]`` runs ``benchmarks/bench_clip.py`` from a source checkout,
``python -m clipax bench compiled [args]`` ``benchmarks/compiled.py`` (deviceless GPU/TPU
program structure; needs the ``[aot]`` extra).
``python -m clipax`` alone runs the whole demo. The ``clipax`` console script is the same.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import pathlib
import sys
import time
from collections.abc import Sequence

BENCH_SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_clip.py"
"""Where ``bench`` looks for the benchmark script: ``benchmarks/`` beside the ``clipax`` package."""


def _positive_int(text: str) -> int:
  """``--seeds``: a positive integer, else a usage error (argparse prints it and exits 2)."""
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
  return value


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
  """The ``clipax`` parser and its ``demo`` subparser (which reports the demo's usage errors)."""
  from clipax.experiments import EXPERIMENTS

  parser = argparse.ArgumentParser(prog="clipax", description="clipax: gradient clipping for JAX.")
  sub = parser.add_subparsers(dest="command")
  demo = sub.add_parser(
      "demo", help="run the demo experiments (tables, PNG plots and a JSON of every number)"
  )
  demo.add_argument(
      "experiment", nargs="?", default="all", choices=(*EXPERIMENTS, "all"),
      help="which experiment to run (default: all)",
  )
  demo.add_argument("--quick", action="store_true", help="a small, fast version of each experiment")
  demo.add_argument(
      "--seeds", type=_positive_int, default=None, metavar="N",
      help="number of seeds (default: 10 for imbalance, 1 for the others)",
  )
  demo.add_argument(
      "--out", type=pathlib.Path, default=pathlib.Path("clipax-demo"), metavar="DIR",
      help="output folder for the PNG and JSON files (default: ./clipax-demo/)",
  )
  demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
  sub.add_parser(
      "bench", help="run benchmarks/bench_clip.py, or with `compiled` benchmarks/compiled.py "
      "(source checkout only); arguments are forwarded",
      add_help=False,
  )
  return parser, demo


def run_demo(
    experiments: Sequence[str], *, quick: bool, seeds: int | None, out: pathlib.Path,
    progress: bool = True,
) -> dict[str, dict]:
  """Runs the named experiments, prints their tables and writes their plots and JSON.

  Returns:
    ``{name: result}``; ``out/<name>.json`` holds each result and ``out/<name>_*.png`` its plots.
  """
  from clipax.experiments import MODULES

  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  results = {}
  for name in experiments:
    module = importlib.import_module(f"clipax.experiments.{MODULES[name]}")
    config = module.Config.quick() if quick else module.Config()
    kwargs = {} if seeds is None else {"seeds": seeds}
    start = time.perf_counter()
    result = module.run(config, progress=progress, **kwargs)
    elapsed = time.perf_counter() - start
    result["seconds"] = elapsed
    print(f"\n## {name} ({elapsed:.1f} s)\n")
    print(module.table(result))
    paths = module.plot(result, out)
    json_path = out / f"{MODULES[name]}.json"
    json_path.write_text(json.dumps(result, indent=1, allow_nan=False))
    for path in [*paths, json_path]:
      print(f"wrote {path}")
    results[name] = result
  return results


def _bench(argv: list[str]) -> int:
  script = BENCH_SCRIPT
  if argv and argv[0] == "compiled":
    script, argv = BENCH_SCRIPT.with_name("compiled.py"), argv[1:]
  if not script.is_file():
    print(
        f"clipax bench needs benchmarks/{script.name} from a source checkout of clipax (looked "
        f"for {script}); it is not part of the installed package. Clone the repository "
        f"and run `pip install -e .` there, or run `python benchmarks/{script.name}` directly.",
        file=sys.stderr,
    )
    return 2
  spec = importlib.util.spec_from_file_location(f"clipax_bench_{script.stem}", script)
  if spec is None or spec.loader is None:
    raise RuntimeError(f"cannot load {script}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.main(argv)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """The ``clipax`` command: ``demo`` (the default) or ``bench``. Returns the exit status."""
  from clipax.experiments import EXPERIMENTS

  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] == "bench":
    return _bench(argv[1:])
  if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
    argv = ["demo", *argv]
  parser, demo_parser = _parser()
  args = parser.parse_args(argv)
  if args.command != "demo":  # pragma: no cover - argparse exits for anything else
    return 2
  # Before any experiment runs: a bad --out is a usage error, not a traceback minutes later.
  if args.out.exists() and not args.out.is_dir():
    demo_parser.error(f"argument --out: {str(args.out)!r} exists and is not a folder")
  try:
    args.out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    demo_parser.error(f"argument --out: cannot create the folder {str(args.out)!r}: "
                      f"{e.strerror or e}")
  names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
  try:
    run_demo(names, quick=args.quick, seeds=args.seeds, out=args.out,
             progress=not args.no_progress)
  except KeyboardInterrupt:
    print("clipax: interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
