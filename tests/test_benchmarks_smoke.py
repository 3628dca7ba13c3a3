"""The benchmark command line runs end to end on tiny trees, so it cannot rot unnoticed."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_clip.py"


@pytest.fixture(scope="module")
def bench_clip():
  spec = importlib.util.spec_from_file_location("bench_clip", BENCH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_parse_count(bench_clip):
  assert bench_clip.parse_count("16M") == 16 * 2**20
  assert bench_clip.parse_count("500k") == 500 * 2**10
  assert bench_clip.parse_count("3000") == 3000
  assert bench_clip.count_label(256 * 2**20) == "256M"


def test_leaf_case_shapes(bench_clip, tmp_path):
  argv = ["--quick", "--cases", "leaf", "--sizes", "64K", "--repeats", "1", "--min-sample-s", "0",
          "--no-torch"]
  (record,) = bench_clip.main(argv)["results"]
  assert (record["label"], record["n_leaves"], record["bytes"]) == ("leaf 64K", 1, 4 * 64 * 2**10)


def test_transformer_tree_is_gpt2_small_sized(bench_clip):
  shapes = bench_clip.transformer_shapes(quick=False)
  assert len(shapes) == 196
  assert 90e6 < sum(math.prod(s) for s in shapes.values()) < 110e6


def test_quick_run_writes_tables_and_json(bench_clip, tmp_path, capsys):
  argv = ["--quick", "--cases", "half,sweep,step", "--leaf-counts", "40",
          "--repeats", "2", "--min-sample-s", "0", "--out", str(tmp_path), "--tag", "smoke"]
  result = bench_clip.main(argv)
  printed = capsys.readouterr().out
  saved = json.loads((tmp_path / f"bench_{result['environment']['platform']}_smoke.json")
                     .read_text())
  assert saved["environment"]["jax"] == result["environment"]["jax"]
  labels = [r["label"] for r in saved["results"]]
  assert labels == ["transformer bfloat16", "transformer float16", "40 leaves", "adamw step"]
  for record in saved["results"]:
    for name, t in record["times"].items():
      assert t["median_s"] > 0, name
      assert len(t["samples_s"]) == 2, name
  bf16, fp16, sweep, step = saved["results"]
  for record in (bf16, fp16, sweep):
    assert f"| {record['label']} |" in printed
  assert (bf16["dtype"], fp16["dtype"]) == ("bfloat16", "float16")
  assert bf16["bytes"] == 2 * bf16["n_params"]
  assert {"clipax", "optax", "rw", "rw_donated", "read", "clipax_plain", "optax_plain"} <= set(
      bf16["times"])
  assert bf16["ratios"]["clipax/optax"] > 0
  bound = bf16["times"]["read"]["median_s"] + bf16["times"]["rw_donated"]["median_s"]
  assert bf16["ratios"]["two_pass_bound_s"] == pytest.approx(bound)
  assert sweep["n_leaves"] == 40
  assert set(step["times"]) == {"adamw", "clipax+adamw", "optax+adamw"}
  assert "| adamw | clipax + adamw |" in printed


def test_optax_cap_skips_optax(bench_clip, tmp_path):
  argv = ["--quick", "--cases", "sweep", "--leaf-counts", "30", "--optax-max-leaves", "10",
          "--repeats", "1", "--min-sample-s", "0", "--no-torch"]
  (record,) = bench_clip.main(argv)["results"]
  assert record["optax_skipped"]
  assert "optax" not in record["times"]
  assert record["ratios"]["clipax/optax"] is None


def test_ab_times_only_the_two_clippers(bench_clip, capsys):
  argv = ["--quick", "--cases", "leaf", "--sizes", "64K", "--ab", "--repeats", "1",
          "--min-sample-s", "0"]
  (record,) = bench_clip.main(argv)["results"]
  assert set(record["times"]) == {"clipax", "optax"}
  assert record["ratios"]["clipax/optax"] > 0 and record["ratios"]["two_pass_bound_s"] is None
  assert "| leaf 64K | float32 |" in capsys.readouterr().out


def test_experiments_time_patched_clipax_in_the_step(bench_clip, capsys):
  argv = ["--quick", "--cases", "step", "--variadic-rescue", "--small-leaf-variants", "0",
          "--repeats", "1", "--min-sample-s", "0", "--no-torch"]
  (step,) = bench_clip.main(argv)["results"]
  variants = {"clipax[variadic]+adamw", "clipax[small_leaf=0]+adamw"}
  assert variants <= set(step["times"])
  assert all(step["ratios"][f"{k}/adamw"] > 0 for k in variants)
  assert "Experiment: clipax[small_leaf=0]+adamw" in capsys.readouterr().out
  # the patch is undone after tracing
  assert bench_clip.SETTINGS["_SMALL_LEAF"]._SMALL_LEAF == 1 << 16
  assert bench_clip.SETTINGS["_VARIADIC_RESCUE"]._VARIADIC_RESCUE is False
