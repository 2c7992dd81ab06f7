"""benchmarks/latency_budget.py: its folder names and its table (the searches and timing are the
benchmark's own run; quality.run and derived_speed's measurement are tested in their files)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "latency_budget.py"
    spec = importlib.util.spec_from_file_location("latency_budget_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_run_folders_are_named_as_their_budgets(bench):
    assert bench.folder_name("flops=33%") == "flops33"
    assert bench.folder_name("latency=45%") == "latency45"
    assert bench.folder_name("latency=12.5%") == "latency12_5"


def test_the_table_says_whether_each_promise_was_kept_and_averages_each_budget(bench):
    def r(red, speedup, promise, top1):
        return {"flops_reduction": red, "layers": "6 of 11", "speedup": speedup, "promise": promise, "top1": top1}

    rows = {0: {"flops=33%": r(3.5, 1.5, None, 0.81), "latency=45%": r(12.0, 2.9, 2.22, 0.79)},
            1: {"flops=33%": r(3.7, 1.6, None, 0.80), "latency=45%": r(7.0, 2.1, 2.22, 0.81)}}
    lines = bench.report(rows, ["flops=33%", "latency=45%"])
    assert len(lines) == 1 + 4 + 2
    assert "(kept 2.22x)" in lines[2] and "(NOT kept 2.22x)" in lines[4]
    assert "kept" not in lines[1] and "kept" not in lines[3]
    assert lines[5].startswith("mean  flops=33%") and "1.55x" in lines[5] and "80.50% +- 0.71" in lines[5]
    assert lines[6].startswith("mean  latency=45%") and "9.50x" in lines[6] and "80.00% +- 1.41" in lines[6]
