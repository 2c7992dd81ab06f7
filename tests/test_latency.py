"""`architecture.block_cost: auto`: a layer's fixed time at batch 1 on the run's device, in MACs, read
off a line fitted to the layers' times (nasdsl/pipeline/latency.py), resolved by the plan step and
kept by a resumed run."""
from __future__ import annotations

import json

import pytest
import torch

import nasdsl
from nasdsl.errors import NasdslError
from nasdsl.graph.accounting import layer_cost
from nasdsl.pipeline import latency
from nasdsl.pipeline.plan import RunRequest, make_plan

from cli_helpers import TINY, run_nasdsl

PLAIN = """
space plain(input=3, resolution=16, classes=10)
layer stem [gate=off] = conv(16, k=3) > bn > relu
layer a = conv(48, k=3) > bn > relu
layer b = conv(48, k=3) > bn > relu > conv(48, k=3) > bn
    residual
layer classifier = gap > linear(classes)
"""
DEPTH = {"architecture.block_cost": "auto"}   # penalty_weight's default, auto, is then flops


def line(fixed: float, per_mac: float, macs=(1e6, 3e6, 2e5, 8e6)) -> latency.LayerTime:
    return latency.LayerTime(tuple((int(m), fixed + per_mac * m) for m in macs), "cpu")


def test_the_fit_reads_a_layers_fixed_time_off_a_line():
    """Points on t = a + b M give back a, b and a / b MACs; a negative intercept (noise) prices a
    layer at 1 MAC, which keeps the depth gates (0 would remove them)."""
    fit = line(fixed=5e-5, per_mac=2e-11)
    assert fit.per_mac == pytest.approx(2e-11, rel=1e-9)
    assert fit.fixed == pytest.approx(5e-5, rel=1e-9)
    assert fit.block_cost == pytest.approx(2.5e6, rel=1e-9)
    assert line(fixed=-1e-6, per_mac=2e-11).block_cost == 1.0
    assert "is 0.05 ms, the time of 2.5M MACs (4 layers" in fit.note()


def test_every_layer_of_the_network_and_its_thinnest_derivation_is_timed(tmp_path):
    """One point per layer with blocks (the classifier, NasNet's head, is not a layer there) of the
    unpruned network and of the thinnest one, each with that layer's MACs, every time positive."""
    net = nasdsl.compile(_write(tmp_path, PLAIN))
    thin = latency.thinnest(net, 16)
    assert [layer_cost(a).flops > layer_cost(b).flops for a, b in zip(net.layers[1:3], thin.layers[1:3])] == [True] * 2
    assert [g.channels for g in net.gates()] == [48, 48, 48]
    fit = latency.layer_time(net, 16, torch.device("cpu"))
    full_macs = [layer_cost(layer).flops for layer in net.layers[:3]]
    thin_macs = [layer_cost(layer).flops for layer in thin.layers[:3]]
    assert [m for m, _ in fit.points] == full_macs + thin_macs
    assert all(t > 0 for _, t in fit.points)


def test_block_cost_auto_is_measured_by_the_plan_and_kept_on_resume(tmp_path, monkeypatch):
    """The plan step turns auto into the measured number (the run's recipe records it) and says how
    it was read; `--resume` takes the number the run began with instead of measuring again, so the
    recipes match and the depth gates keep their price."""
    space, out = _write(tmp_path, TINY), tmp_path / "run"
    monkeypatch.setattr(latency, "layer_time", lambda net, multiple, device: line(5e-5, 2e-11))
    plan = make_plan(RunRequest(space=space, data="fake", sets=DEPTH, out=out, device="cpu"), join_world=False)
    assert plan.recipe.architecture.block_cost == pytest.approx(2.5e6)
    assert plan.recipe.architecture.penalty_weight == "flops"
    assert any(n.startswith("architecture.block_cost auto: a layer's fixed time at batch 1 on cpu is 0.05 ms")
               for n in plan.notes)
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"space_hash": plan.space_hash, "recipe": plan.recipe.to_dict()}))
    monkeypatch.setattr(latency, "layer_time", lambda net, multiple, device: line(9e-5, 2e-11))   # a busier machine
    resumed = make_plan(RunRequest(space=space, data="fake", sets=DEPTH, out=out, device="cpu", resume=True),
                        join_world=False)
    assert resumed.recipe.to_dict() == plan.recipe.to_dict()
    trained = make_plan(RunRequest(space=space, data="fake", sets=DEPTH, out=tmp_path / "train", device="cpu",
                                   train=True), join_world=False)
    assert trained.recipe.architecture.block_cost == 0.0   # `nasdsl train` searches nothing


def test_a_device_whose_layer_times_do_not_grow_with_macs_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(latency, "layer_time", lambda net, multiple, device: line(5e-5, -1e-12))
    with pytest.raises(NasdslError) as err:
        make_plan(RunRequest(space=_write(tmp_path, TINY), data="fake", sets=DEPTH, out=tmp_path / "run",
                             device="cpu"), join_world=False)
    assert str(err.value).startswith("architecture.block_cost: auto: on cpu the layers' times at batch 1 did not "
                                     "grow with their MACs (4 layers timed)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sets, message", [
    (("architecture.block_cost=autox", "architecture.penalty_weight=flops"),
     "--set: architecture.block_cost: expected 'auto' or a number of MACs >= 0, got 'autox'"),
    (("architecture.block_cost=auto", "architecture.penalty_weight=channels"),
     "--set: architecture.block_cost: is counted in MACs, so it needs architecture.penalty_weight: flops or auto")])
def test_block_cost_auto_errors_are_one_line(tmp_path, sets, message):
    args = [a for kv in sets for a in ("--set", kv)]
    proc = run_nasdsl("search", _write(tmp_path, TINY), "--data", "fake", "--out", tmp_path / "run", *args,
                      check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[0] == message
    assert not (tmp_path / "run").exists()


def _write(tmp_path, text: str):
    path = tmp_path / "space.space"
    path.write_text(text)
    return path


def test_a_latency_budget_measures_the_layer_price_and_counts_it(tmp_path, monkeypatch):
    """`--budget latency=45%` with block_cost at its default 0: the plan measures the price (a
    latency budget has no meaning without it), turns the depth gates on at it, prices channels by
    MACs, and the target is 45% of the unpruned network's MACs plus the price for each layer."""
    from nasdsl.graph.accounting import live_layers, network_cost

    monkeypatch.setattr(latency, "layer_time", lambda net, multiple, device: line(5e-7, 2e-11))
    plan = make_plan(RunRequest(space=_write(tmp_path, TINY), data="fake", budget="latency=45%", out=tmp_path / "run",
                                device="cpu"), join_world=False)
    arch, (budget,) = plan.recipe.architecture, plan.budgets
    assert (arch.block_cost, arch.penalty_weight) == (pytest.approx(2.5e4), "flops")
    assert budget.metric == "latency" and budget.layer_price == arch.block_cost
    full = network_cost(plan.network).flops + round(arch.block_cost * live_layers(plan.network))
    assert plan.targets == [45 * full // 100]


def test_a_latency_budget_needs_macs_pricing_and_says_so_before_measuring(tmp_path, monkeypatch):
    def unexpected(*_):
        raise AssertionError("measured before the recipe was checked")

    monkeypatch.setattr(latency, "layer_time", unexpected)
    proc = run_nasdsl("search", _write(tmp_path, TINY), "--data", "fake", "--out", tmp_path / "run",
                      "--budget", "latency=45%", "--set", "architecture.penalty_weight=channels", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[0] == (
        "--budget: a latency budget prices a layer's fixed time in MACs, so it needs "
        "architecture.penalty_weight: flops or auto (the default), not channels")
    assert not (tmp_path / "run").exists()
    with pytest.raises(NasdslError, match="needs architecture.penalty_weight"):
        make_plan(RunRequest(space=_write(tmp_path, TINY), data="fake", budget="latency=45%", out=tmp_path / "r",
                             sets={"architecture.penalty_weight": "params"}, device="cpu"), join_world=False)
