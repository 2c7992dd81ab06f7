"""benchmarks/derived_speed.py's searches: a finished search is reused only by the command line and
the recipe that made it, so a search made before a recipe default changed is not timed as today's."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "derived_speed.py"
    spec = importlib.util.spec_from_file_location("derived_speed_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_search_resolves_its_recipe_as_the_run_will(bench):
    args = bench.parse(["--search"])
    recipe = bench.resolved_recipe(bench.search_command("resnet56_cifar", args))
    assert recipe["architecture"]["penalty_weight"] == "channels"   # auto, the default, under a flops budget
    flops = bench.parse(["--search", "--set", "architecture.block_cost=1e6"])
    assert bench.resolved_recipe(bench.search_command("resnet56_cifar", flops))["architecture"]["penalty_weight"] \
        == "flops"   # auto, where depth gates are priced in MACs
    assert recipe["architecture"]["channel_multiple"] in (8, 16)  # auto: the device's channel block
    assert recipe["weights"]["epochs"] == 5 and recipe["finetune"]["epochs"] == 0


def test_a_search_folder_changes_with_the_resolved_recipe_and_the_derivation_code(bench, monkeypatch, tmp_path):
    args = bench.parse(["--search"])
    folder, cmd = bench.search_folder("resnet56_cifar", args, tmp_path)
    assert folder.parent == tmp_path and folder.name.startswith("resnet56_cifar_")
    assert cmd[:3] == ["nasdsl", "search", "spaces/resnet56_cifar.space"] and "--out" not in cmd
    assert bench.search_folder("resnet56_cifar", args, tmp_path)[0] == folder
    today = bench.resolved_recipe
    monkeypatch.setattr(bench, "resolved_recipe", lambda c: {**today(c), "seed": 1})  # a default changed
    assert bench.search_folder("resnet56_cifar", args, tmp_path)[0] != folder
    monkeypatch.setattr(bench, "resolved_recipe", today)
    code = bench.derivation_source()
    monkeypatch.setattr(bench, "derivation_source", lambda: code + "# derivation changed")
    assert bench.search_folder("resnet56_cifar", args, tmp_path)[0] != folder


def test_a_measured_layer_price_keeps_the_search_folder(bench, tmp_path):
    """block_cost auto, or a latency budget, measures the price at every plan: the folder is named
    by what was asked, so a finished search is found again on the next run."""
    for argv in (["--search", "--set", "architecture.penalty_weight=flops", "--set", "architecture.block_cost=auto"],
                 ["--search", "--budget", "latency=45%", "--set", "architecture.penalty_weight=auto"]):
        args = bench.parse(argv)
        assert bench.search_folder("resnet56_cifar", args, tmp_path)[0] == \
            bench.search_folder("resnet56_cifar", args, tmp_path)[0]


def test_a_latency_budget_promises_the_unpruned_time_over_its_target(bench):
    """The promise of a latency-budget run is the unpruned network's MACs plus the run's layer price
    for each of its layers, over the budget's target (per model folder with several budgets)."""
    import nasdsl
    from nasdsl.graph.accounting import live_layers, network_cost

    net = nasdsl.compile(Path(__file__).resolve().parents[1] / "spaces" / "resnet56_cifar.space")
    full = network_cost(net).flops + 1000 * live_layers(net)
    recipe = {"architecture": {"block_cost": 1000.0}}
    one = {"budget": {"metric": "latency", "target": full // 2}}
    assert bench.latency_promise(one, "model", net, recipe) == pytest.approx(2.0, rel=1e-6)
    several = {"budget": {"metric": "latency", "target": full // 2},
               "models": [{"path": "model_latency_50pct", "budget": {"metric": "latency", "target": full // 2}},
                          {"path": "model_latency_25pct", "budget": {"metric": "latency", "target": full // 4}}]}
    assert bench.latency_promise(several, "model_latency_25pct", net, recipe) == pytest.approx(4.0, rel=1e-6)
    assert bench.latency_promise({"budget": {"metric": "flops", "target": 5}}, "model", net, recipe) is None
    assert bench.latency_promise({}, "model", net, recipe) is None


def test_timing_processes_keep_their_heap_unless_asked_not_to(bench):
    """Each case's process inherits _timing.STEADY_HEAP (glibc reads it at start), this one's
    environment comes back as it was, and --default-malloc times a default process."""
    import os
    import subprocess

    probe = [sys.executable, "-c", "import os; print(os.environ.get('MALLOC_TOP_PAD_'))"]
    before = os.environ.get("MALLOC_TOP_PAD_")
    assert before is None   # (the test would show nothing otherwise)
    for argv, expected in ((["--search"], str(512 << 20)), (["--search", "--default-malloc"], "None")):
        env = bench.heap_env(bench.parse(argv))
        with bench.child_environment(env):
            assert subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip() == expected
        assert os.environ.get("MALLOC_TOP_PAD_") == before
        assert ("kept" in bench.heap_line(env)) == (expected != "None")


def test_onnxruntime_times_the_exported_files_of_both_networks(bench, monkeypatch):
    """--onnxruntime exports a case's unpruned and derived network as `nasdsl export --onnx` does
    and returns onnxruntime's median per batch size for both (what is timed, not how fast), each
    session in runs of its own (in_turn)."""
    pytest.importorskip("onnxruntime")
    import torch

    from nasdsl.derive.derive import derive
    from nasdsl.language.compiler import compile_source

    net = compile_source("""
space tiny(input=3, resolution=8, classes=4)
layer stem = conv(8, k=3) > bn > relu
layer m = mbconv(8, k=3, e=2) | mbconv(8, k=5, e=2)
layer classifier = gap > linear(classes)
""")
    masks = {g.key: torch.arange(g.channels) % 2 == 0 for g in net.gates()}
    case = bench.Case("tiny", net, derive(net, masks).network)
    args = bench.parse(["--search", "--onnxruntime", "--repeats", "2", "--warmup", "1", "--threads", "1"])
    timed, in_turn = [], bench.in_turn
    monkeypatch.setattr(bench, "in_turn", lambda calls, *a: timed.append(sorted(calls)) or in_turn(calls, *a))
    result = bench.onnxruntime_medians(case, args)
    assert timed == [["derived", "unpruned"]] * len(bench.BATCHES)
    assert set(result) == set(bench.BATCHES)
    for batch in bench.BATCHES:
        assert set(result[batch]) == {"unpruned", "derived"} and all(t > 0 for t in result[batch].values())


def test_the_onnxruntime_lines_give_each_batch_its_ratio_and_verdict(bench, capsys):
    result = {"reduction": 3.0, "onnxruntime": {64: {"unpruned": 0.09, "derived": 0.03},
                                                1: {"unpruned": 0.002, "derived": 0.001}}}
    bench.print_onnxruntime({"timed": result, "not timed": {"reduction": 2.0}})
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == ("  timed: batch 64 90.00 -> 30.00 ms, 3.00x, ratio 1.00+; "
                         "batch 1 2.00 -> 1.00 ms, 2.00x, ratio 0.67-")
    assert not any("not timed" in line for line in lines)


def test_onnxruntime_sessions_are_timed_each_in_a_run_of_its_own():
    """onnxruntime's thread pools spin after a run: sessions timed call by call contend (_timing.in_turn).
    Each file is timed in runs of its own, both orders, its warm-up calls right before each run."""
    import _timing

    calls = []
    result = _timing.in_turn({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=4, warmup=1)
    assert "".join(calls) == "aaa" "bbb" "bbb" "aaa" and set(result) == {"a", "b"}


def test_inference_is_timed_call_after_call_in_alternating_rounds(bench):
    """A network called right after another finds the caches full of the other's weights and maps
    (at batch 1 a searched ResNet-56 took 2.34 against 1.92-2.09 ms on its own): each network is
    timed in runs of its own, each run after an untimed call of it, the runs of all the networks in
    rounds of alternating order, so that a change of load still hits all of them."""
    import _timing
    import torch

    calls = []

    class Probe(torch.nn.Module):
        def __init__(self, name: str):
            super().__init__()
            self.name = name

        def forward(self, x):
            calls.append((self.name, tuple(x.shape), x.is_contiguous(memory_format=torch.channels_last)))
            return x

    result = _timing.inference_medians({"a": Probe("a"), "b": Probe("b")}, [3, 4, 4], 1, repeats=9, warmup=1)
    assert "".join(name for name, _, _ in calls) == "aaaa" "bbbb" "bbbb" "aaaa" "aaaa" "bbbb"
    assert {shape for _, shape, _ in calls} == {(1, 3, 4, 4)} and all(last for _, _, last in calls)
    assert set(result) == {"a", "b"} and all(t > 0 for t in result.values())
