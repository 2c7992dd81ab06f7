"""Budgets end to end on a tiny space: one budget lands in [0.9, 1] x its target, several budgets
share one weights stage and each gets its own export, a kill inside the second budget resumes there,
and an impossible budget is refused by the plan step."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import ENV, run_nasdsl, tiny_space

TINY = tiny_space(width=16, expansion=3)   # wider than the shared one: room for budgets to land in
# exact widths: on a space this narrow, rounding to the CPU's 16 channels leaves a layer none or all
SETS = ["resolution=8", "batch_size=32", "weights.epochs=2", "architecture.epochs=2", "finetune.epochs=1",
        "architecture.lambda_a=1e-3", "architecture.channel_multiple=1"]
SEVERAL = "flops=50%,25%"


def search_args(space, out, *extra):
    return ["search", space, "--data", "fake", "--out", out, *[x for s in SETS for x in ("--set", s)], *extra]


def nasdsl(*args, check=True) -> subprocess.CompletedProcess:
    return run_nasdsl(*args, check=check)


@pytest.fixture(scope="module")
def space(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("space") / "tiny.space"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def several(space, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "several"
    nasdsl(*search_args(space, out, "-q", "--budget", SEVERAL))
    return out


def test_one_budget_lands_between_90_and_100_percent(space, tmp_path):
    out = tmp_path / "run"
    proc = nasdsl(*search_args(space, out, "--budget", "flops=40%"))
    summary = json.loads((out / "summary.json").read_text())
    budget = summary["budget"]
    assert budget["metric"] == "flops" and budget["target"] == int(0.4 * summary["baseline"]["flops"])
    assert 0.9 * budget["target"] <= budget["achieved"] <= budget["target"]
    assert summary["derived"]["flops"] == summary["searched"]["flops"] == budget["achieved"]
    assert "budget    flops <= 40%: achieved" in proc.stdout  # the last lines say target and achieved
    assert any(note.startswith("budget flops <= 40%") for note in summary["notes"])
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["architecture"] == "tiny"


def test_params_budget(space, tmp_path):
    out = tmp_path / "run"
    nasdsl(*search_args(space, out, "-q", "--budget", "params=1.5k"))
    budget = json.loads((out / "summary.json").read_text())["budget"]
    assert budget["target"] == 1500 and 1350 <= budget["achieved"] <= 1500


def test_several_budgets_from_one_weights_stage(several):
    summary = json.loads((several / "summary.json").read_text())
    models = summary["models"]
    assert [m["budget"]["text"] for m in models] == ["flops <= 50%", "flops <= 25%"]
    assert [m["path"] for m in models] == ["model_flops_50pct", "model_flops_25pct"]
    for m in models:
        b = m["budget"]
        assert 0.9 * b["target"] <= b["achieved"] <= b["target"] and m["derived"]["flops"] == b["achieved"]
        assert (several / m["path"] / "config.json").is_file() and (several / m["path"] / "tiny.py").is_file()
    assert summary["derived"] == models[0]["derived"] and summary["budget"] == models[0]["budget"]
    assert (several / "pareto.png").is_file() and not (several / "model").exists()
    records = [json.loads(line) for line in (several / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records].count("weights") == 2  # the weights stage ran once
    assert [(r["stage"], r["budget"]) for r in records if r["stage"] != "weights"] == \
        [("architecture", 0)] * 2 + [("finetune", 0)] + [("architecture", 1)] * 2 + [("finetune", 1)]


def test_kill_inside_the_second_budget_resumes_there(space, several, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "nasdsl", *map(str, search_args(space, out, "-q", "--budget",
                                                                                      SEVERAL))],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline:  # kill it in the second budget's architecture stage
        if metrics.exists() and '"architecture", "epoch": 0, "global_epoch": 5, "budget": 1' in metrics.read_text():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists() and (out / "model_flops_50pct").is_dir()
    nasdsl(*search_args(space, out, "-q", "--budget", SEVERAL, "--resume"))
    for name in ("gates_flops_50pct.safetensors", "gates_flops_25pct.safetensors"):
        a, b = load_file(str(out / name)), load_file(str(several / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    resumed, reference = (json.loads((run / "summary.json").read_text()) for run in (out, several))
    assert [m["budget"] for m in resumed["models"]] == [m["budget"] for m in reference["models"]]


def test_impossible_budget_is_refused_before_training(space, tmp_path):
    out = tmp_path / "run"
    proc = nasdsl(*search_args(space, out, "--budget", "flops=100"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[0]
    assert line.startswith("--budget: flops <= 100 cannot be met: the smallest network this space derives costs ")
    assert not out.exists()


def test_an_impossible_budget_says_when_rounding_makes_it_so(space, tmp_path):
    """With channel_multiple 16 the channel a layer must keep is 16 of them (or its whole width): the
    floor is higher, and the error says why and what keeps single channels."""
    proc = nasdsl(*search_args(space, tmp_path / "run", "--budget", "flops=25%", "--set",
                               "architecture.channel_multiple=16"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[0]
    assert line.startswith("--budget: flops <= 25% cannot be met: the smallest network this space derives costs ")
    assert line.endswith("(the stem, the classifier and the channel every layer must keep, 16 of them with "
                         "architecture.channel_multiple 16; 1 keeps one)")
    nasdsl(*search_args(space, tmp_path / "dry", "--budget", "flops=25%", "--dry-run"))   # SETS: exact widths


def test_dry_run_says_what_the_budgets_cost(space):
    plan = json.loads(nasdsl(*search_args(space, "unused", "--budget", SEVERAL, "--dry-run", "--json")).stdout)
    assert [b["text"] for b in plan["budgets"]] == ["flops <= 50%", "flops <= 25%"]
    assert [(s["name"], s.get("budget")) for s in plan["stages"]] == [
        ("weights", None), ("architecture", "flops <= 50%"), ("finetune", "flops <= 50%"),
        ("architecture", "flops <= 25%"), ("finetune", "flops <= 25%")]


def test_latency_budget(space, tmp_path):
    """`--budget latency=60%` with a layer priced at 20k MACs: the target is 60% of the unpruned
    network's MACs plus 20k for each of its layers, the derived network lands in [0.9, 1] x it, and
    what it achieved counts its own layers that way. No other key needs setting: penalty_weight's
    default, auto, prices the channels by their MACs under it."""
    from nasdsl.api import compile as compile_space
    from nasdsl.graph.accounting import live_layers, network_cost

    out, price = tmp_path / "run", 2e4
    nasdsl(*search_args(space, out, "-q", "--budget", "latency=60%",
                        "--set", f"architecture.block_cost={price:g}"))
    summary = json.loads((out / "summary.json").read_text())
    budget, derived = summary["budget"], compile_space(out / "model" / "tiny.space")
    unpruned = compile_space(space, resolution=8)
    assert budget["metric"] == "latency"
    assert budget["target"] == 6 * (network_cost(unpruned).flops + int(price) * live_layers(unpruned)) // 10
    assert budget["achieved"] == summary["derived"]["flops"] + int(price) * live_layers(derived)
    assert 0.9 * budget["target"] <= budget["achieved"] <= budget["target"]
    recipe = json.loads((out / "manifest.json").read_text())["recipe"]["architecture"]
    assert (recipe["block_cost"], recipe["penalty_weight"]) == (price, "flops")
