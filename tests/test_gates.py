"""The SS gate (DNAL section III): its maths in each mode, the gated BN it is fused into, where
each placement puts it, Eq. 5 on a multi-block layer, the Eq. 4 penalty and its gradient, the
delta and learning-rate schedules, and that a gate is one vectorised op whatever its width."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from nasdsl.language.compiler import compile_source
from nasdsl.recipe import ArchRecipe, StageRecipe
from nasdsl.train.schedule import delta, learning_rate
from nasdsl.supernet.build import GateSet, Supernet, build_supernet, place_gates
from nasdsl.supernet.gates import GateState, SSGate, gate_batchnorm, gated
from nasdsl.supernet.network import NasNet

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def affine(bn: nn.Module, name: str) -> torch.Tensor:
    """A BN's own weight or bias: of a gated BN, the parameter before the gate scales it."""
    return bn.parametrizations[name].original if parametrize.is_parametrized(bn, name) else getattr(bn, name)


def randomize_bn(bn: nn.Module, g: torch.Generator) -> None:
    """Non-trivial running statistics and affine parameters, so a BN check means something."""
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5, generator=g)
        bn.running_var.uniform_(0.5, 2.0, generator=g)
        affine(bn, "weight").uniform_(0.5, 1.5, generator=g)
        affine(bn, "bias").normal_(0, 0.5, generator=g)


def randomize(model: nn.Module, seed: int = 0) -> None:
    g = gen(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            randomize_bn(m, g)


# ---- gate maths ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 5, 4, 4), (3, 5)], ids=["map", "flat"])
def test_gate_modes(shape):
    state = GateState()
    gate = SSGate(5, "k", state)
    with torch.no_grad():
        gate.s.copy_(torch.tensor([-2.0, -0.1, 0.0, 0.3, 4.0]))
    x = torch.randn(*shape, generator=gen())
    view = (1, 5) + (1,) * (len(shape) - 2)

    state.mode = "disabled"
    assert gate.factor() is None
    assert torch.equal(gate(x), x)

    state.mode, state.delta = "soft", 2.5
    expected = x * torch.sigmoid(2.5 * gate.s.detach()).view(view)
    torch.testing.assert_close(gate(x), expected, rtol=0, atol=1e-7)
    # per channel: channel c of every sample and pixel is scaled by sigmoid(delta * s_c)
    for c in range(5):
        torch.testing.assert_close(gate(x)[:, c], x[:, c] * torch.sigmoid(torch.tensor(2.5) * gate.s[c]))

    state.mode = "hard"
    out = gate(x)
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))  # s <= 0 is off, s = 0 included
    assert torch.equal(out[:, 3:], x[:, 3:])


def test_soft_gate_gradient():
    state = GateState("soft", 3.0)
    gate = SSGate(4, "k", state)
    with torch.no_grad():
        gate.s.copy_(torch.tensor([-0.5, 0.0, 0.2, 1.0]))
    x = torch.randn(2, 4, 3, 3, generator=gen())
    gate(x).sum().backward()
    sig = torch.sigmoid(3.0 * gate.s.detach())
    torch.testing.assert_close(gate.s.grad, x.sum((0, 2, 3)) * 3.0 * sig * (1 - sig))


def test_hard_gate_approaches_soft_as_delta_grows():
    """The property the scaled sigmoid rests on: lim sigmoid(delta * s) = binary(s) (s != 0)."""
    state = GateState("soft", 1e4)
    gate = SSGate(6, "k", state)
    with torch.no_grad():
        gate.s.copy_(torch.tensor([-0.3, -0.01, -0.002, 0.002, 0.05, 2.0]))
    soft = gate.factor()
    state.mode = "hard"
    torch.testing.assert_close(soft, gate.factor(), rtol=0, atol=1e-8)


# ---- the gated BN ----------------------------------------------------------------------------------
def _gated_pair(bn: nn.Module, channels: int, state: GateState, seed: int):
    """(Sequential(gated BN, its fused gate), the gate, a plain reference BN) with the same
    parameters and statistics."""
    g = gen(seed)
    randomize_bn(bn, g)
    reference = copy.deepcopy(bn)
    gate = SSGate(channels, "k", state, fused=True)
    with torch.no_grad():
        gate.s.normal_(0, 1, generator=g)
    return nn.Sequential(gate_batchnorm(bn, gate), gate), gate, reference


@pytest.mark.parametrize("mode", ["disabled", "soft", "hard"])
@pytest.mark.parametrize("flat", [False, True], ids=["bn2d", "bn1d"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
def test_gated_bn_equals_bn_then_multiply(mode, flat, momentum):
    """The gated BN and its fused gate compute what a plain BN followed by an unfused gate does:
    outputs, statistics and the gradients to s and to the BN's own affine."""
    channels = 6
    bn = nn.BatchNorm1d(channels, momentum=momentum) if flat else nn.BatchNorm2d(channels, momentum=momentum)
    state = GateState(mode, 1.7)
    seq, gate, reference = _gated_pair(bn, channels, state, seed=1)
    assert isinstance(seq[0], nn.BatchNorm1d if flat else nn.BatchNorm2d) and gated(seq[0]) is gate
    assert gated(reference) is None and gate.fused
    # the gate is registered once, after the BN; the BN's state dict is a plain BN's
    assert list(seq[0].state_dict()) == list(reference.state_dict())
    assert [n for n, _ in seq.named_parameters()] == ["0.parametrizations.weight.original",
                                                      "0.parametrizations.bias.original", "1.s"]
    unfused = nn.Sequential(reference, SSGate(channels, "k", state))
    unfused[1].s = gate.s  # the same parameter: the same gate, applied after the BN

    g = gen(2)
    shape = (8, channels) if flat else (4, channels, 5, 5)
    weight, bias = affine(seq[0], "weight"), affine(seq[0], "bias")
    for train in (True, True, True, False):  # three steps that update the statistics, then eval
        seq.train(train)
        unfused.train(train)
        x = torch.randn(*shape, generator=g) * 2 + 0.5
        out, expected = seq(x), unfused(x)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
        w = torch.randn(*shape, generator=g)
        grads = torch.autograd.grad((out * w).sum(), [weight, bias, gate.s], allow_unused=True)
        ref_grads = torch.autograd.grad((expected * w).sum(), [reference.weight, reference.bias, gate.s],
                                        allow_unused=True)
        for a, b in zip(grads[:2], ref_grads[:2]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        if mode == "soft":
            torch.testing.assert_close(grads[2], ref_grads[2], rtol=1e-5, atol=1e-6)
        else:  # disabled: the identity; hard: a step function
            assert grads[2] is None and ref_grads[2] is None
        # the statistics follow the un-gated batch, exactly as the plain BN's do
        torch.testing.assert_close(seq[0].running_mean, reference.running_mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(seq[0].running_var, reference.running_var, rtol=1e-6, atol=1e-7)
        assert int(seq[0].num_batches_tracked) == int(reference.num_batches_tracked)
    assert int(reference.num_batches_tracked) == 3


def test_gated_bn_state_dict_loads_both_ways():
    """A gated BN saves and loads under a plain BN's keys, so either loads the other's state."""
    state = GateState("soft", 2.0)
    seq, gate, reference = _gated_pair(nn.BatchNorm2d(5), 5, state, seed=11)
    plain = nn.BatchNorm2d(5)
    plain.load_state_dict(seq[0].state_dict())
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[key], value)
    fresh = nn.Sequential(gate_batchnorm(nn.BatchNorm2d(5), SSGate(5, "k", state, fused=True)), nn.Identity())
    fresh[0].load_state_dict(reference.state_dict())  # strict: no key missing, none unexpected
    torch.testing.assert_close(affine(fresh[0], "weight"), reference.weight)
    with pytest.raises(ValueError, match="not marked fused"):
        gate_batchnorm(nn.BatchNorm2d(5), SSGate(5, "k", state))


def _unfused_supernet(net):
    """The reference: a plain NasNet whose gates multiply after their BN (none fused)."""
    state = GateState()
    gates = {}

    def factory(channels, key):
        gates[key] = SSGate(channels, key, state)
        return gates[key]
    return NasNet(net.to_config(), gate_factory=factory), GateSet(state, list(gates.values()))


def test_supernet_equals_unfused_supernet():
    """The whole default supernet (gated BNs) computes what the explicit Conv-BN-SS-ReLU chain
    does, in every mode, in training and in eval, gradients included; its state dict has the plain
    NasNet's keys, in order, plus the gates'."""
    net = compile_source(SPACE, "t.space")
    model = build_supernet(net)
    assert isinstance(model, Supernet) and isinstance(model.gate_set, GateSet)
    after_bn = [g for g in net.gates() if g.key.endswith((".bn", ".mid", ".out"))]  # all but v's bare gate
    assert sum(gated(m) is not None for m in model.modules()) == len(after_bn) == 4
    reference, ref_gates = _unfused_supernet(net)
    plain_keys = list(NasNet(net.to_config()).state_dict())
    assert list(model.state_dict()) == list(reference.state_dict())
    assert [k for k in model.state_dict() if not k.endswith(".s")] == plain_keys
    assert [k for k in model.state_dict() if k.endswith(".s")] == [f"{name}.s" for name, m in model.named_modules()
                                                                   if isinstance(m, SSGate)]
    randomize(model)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for g in model.gate_set.gates:
            g.s.normal_(0, 1, generator=gen(3))
    ref_gates.load(model.gate_set.values())
    x = torch.randn(4, 3, 8, 8, generator=gen(4))
    params = dict(model.named_parameters())
    ref_params = dict(reference.named_parameters())
    for mode in ("disabled", "soft", "hard"):
        for gs in (model.gate_set, ref_gates):
            gs.set_mode(mode)
            gs.set_delta(2.0)
        for train in (True, False):
            model.train(train)
            reference.train(train)
            out, expected = model(x), reference(x)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
            grads = torch.autograd.grad(out.square().sum(), list(params.values()), allow_unused=True)
            ref_grads = torch.autograd.grad(expected.square().sum(), list(ref_params.values()), allow_unused=True)
            for name, a, b in zip(ref_params, grads, ref_grads):
                assert (a is None) == (b is None), name
                if a is not None:
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    for a, b in zip(model.buffers(), reference.buffers()):
        torch.testing.assert_close(a, b)


def test_supernet_deepcopy_keeps_its_gates_wired():
    model = build_supernet(compile_source(DEPTH, "depth.space"), depth_gates=True)
    twin = copy.deepcopy(model)
    gates = {id(g) for g in twin.gate_set.gates + twin.gate_set.depth_gates}
    assert gates == {id(m) for m in twin.modules() if isinstance(m, SSGate)}
    assert all(id(gated(m)) in gates for m in twin.modules() if gated(m) is not None)
    assert all(g.depth_gate is None or id(g.depth_gate) in gates for g in twin.gate_set.gates)


# ---- placements ------------------------------------------------------------------------------------
SPACE = """
space t(input=3, resolution=8, classes=5)
layer stem [gate=off] = conv(8, k=3) > bn > relu
layer a = conv(6, k=3) > bn > relu
layer m = mbconv(8, k=3, e=2)
layer v = conv(8, k=3, bias=on) > gate > relu
layer h = flatten > linear(12) > bn > relu
layer classifier = linear(classes)
"""


def _ops(model, net, layer):
    i = [l.name for l in net.layers].index(layer)
    return list(model.layers[i].blocks[0].ops)


def _kinds(mods):
    names = {nn.Conv2d: "conv", nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Linear: "linear", nn.Flatten: "flatten"}
    out = []
    for m in mods:
        if isinstance(m, SSGate):
            out.append("(fused)" if m.fused else "gate")
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            out.append("bn" if gated(m) is None else "bn+gate")
        else:
            out.append(names[type(m)])
    return out


@pytest.mark.parametrize("placement,expected", [
    ("after_bn", {"a": ["conv", "bn+gate", "(fused)", "relu"],
                  "m": ["conv", "bn", "relu6", "conv", "bn+gate", "(fused)", "relu6", "conv", "bn+gate", "(fused)"],
                  "h": ["flatten", "linear", "bn+gate", "(fused)", "relu"]}),
    ("before_bn", {"a": ["conv", "gate", "bn", "relu"],
                   "m": ["conv", "bn", "relu6", "conv", "gate", "bn", "relu6", "conv", "gate", "bn"],
                   "h": ["flatten", "linear", "gate", "bn", "relu"]}),
    ("after_act", {"a": ["conv", "bn", "relu", "gate"],
                   "m": ["conv", "bn", "relu6", "conv", "bn", "relu6", "gate", "conv", "bn", "gate"],
                   "h": ["flatten", "linear", "bn", "relu", "gate"]}),
])
def test_placements_put_the_gate_where_they_say(placement, expected):
    net = compile_source(SPACE, "t.space")
    model = build_supernet(net, placement)
    for layer, kinds in expected.items():
        assert _kinds(_ops(model, net, layer)) == kinds, layer
    # a gate op without a BN before it stays before the activation unless placed after it
    assert _kinds(_ops(model, net, "v")) == (["conv", "relu", "gate"] if placement == "after_act"
                                             else ["conv", "gate", "relu"])
    # same gates, same keys, same order, in the graph and in the model
    placed = place_gates(net, placement)
    assert [(g.key, g.channels) for g in placed.gates()] == [(g.key, g.channels) for g in net.gates()]
    assert [g.key for g in model.gate_set.gates] == [g.key for g in net.gates()]
    assert placed.to_config()["layers"][1]["blocks"][0]["ops"][-1]["kind"] == ("gate" if placement == "after_act"
                                                                              else "act")


def test_placements_compute_what_they_say():
    """A hard-closed channel: after the BN or the activation it is 0; before the BN the BN's offset
    (beta - gamma * mean / sqrt(var + eps)) goes through the activation."""
    net = compile_source(SPACE, "t.space")
    i = [l.name for l in net.layers].index("a")
    x = torch.randn(2, 8, 8, 8, generator=gen(5))
    outs, fulls = {}, {}
    for placement in ("after_bn", "before_bn", "after_act"):
        torch.manual_seed(0)  # the same weights under every placement
        model = build_supernet(net, placement).eval()
        randomize(model, seed=6)
        with torch.no_grad():
            model.gate_set.gates[0].s.copy_(torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 1.0]))
        model.gate_set.set_mode("hard")
        with torch.no_grad():
            outs[placement] = model.layers[i](x)
        model.gate_set.set_mode("disabled")
        with torch.no_grad():
            fulls[placement] = full = model.layers[i](x)
        bn = next(m for m in model.layers[i].modules() if isinstance(m, nn.BatchNorm2d))
    off = [1, 3]
    on = [0, 2, 4, 5]
    for placement in ("after_bn", "before_bn"):  # disabled, every placement is the same function
        torch.testing.assert_close(fulls[placement], full)
    for placement in ("after_bn", "after_act"):
        assert torch.equal(outs[placement][:, off], torch.zeros_like(outs[placement][:, off]))
        torch.testing.assert_close(outs[placement][:, on], full[:, on])
    offset = bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)
    expected = F.relu(offset.detach())[off].view(1, -1, 1, 1).expand(2, -1, 8, 8)
    torch.testing.assert_close(outs["before_bn"][:, off], expected)
    torch.testing.assert_close(outs["before_bn"][:, on], full[:, on])


# ---- Eq. 5: a layer of several blocks, with and without a residual -----------------------------------
EQ5 = """
space eq5(input=4, resolution=6, classes=3)
layer plain = conv(8, k=3) > bn > relu | conv(8, k=1) > bn > relu | conv(8, k=5) > bn > relu
layer res [residual=on] = conv(8, k=3) > bn > relu | conv(8, k=5) > bn > relu
layer classifier = gap > linear(classes)
"""


def _bn_eval(bn: nn.BatchNorm2d, y: torch.Tensor) -> torch.Tensor:
    """The BN in eval, with its own affine (not the gate's share of a gated BN's)."""
    view = (1, -1, 1, 1)
    return (y - bn.running_mean.view(view)) / torch.sqrt(bn.running_var.view(view) + bn.eps) \
        * affine(bn, "weight").view(view) + affine(bn, "bias").view(view)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_eq5_multi_block_layer(mode):
    """x^l = sum_i ReLU(x_i^l * sigmoid(delta s_i^l)) (+ the input where the layer is residual)."""
    net = compile_source(EQ5, "eq5.space")
    model = build_supernet(net).eval()
    randomize(model, seed=7)
    g = gen(8)
    with torch.no_grad():
        for gate in model.gate_set.gates:
            gate.s.normal_(0, 0.5, generator=g)
    model.gate_set.set_mode(mode)
    model.gate_set.set_delta(2.0)
    x = torch.randn(2, 4, 6, 6, generator=g)
    with torch.no_grad():
        h = x
        for li, residual in ((0, False), (1, True)):
            layer = model.layers[li]
            expected = h.clone() if residual else torch.zeros(2, 8, 6, 6)
            for block in layer.blocks:
                conv, bn, gate, act = block.ops
                assert isinstance(gate, SSGate) and gated(bn) is gate
                s = gate.s.view(1, -1, 1, 1)
                p = torch.sigmoid(2.0 * s) if mode == "soft" else (s > 0).float()
                expected += F.relu(_bn_eval(bn, F.conv2d(h, conv.weight, None, 1, conv.padding)) * p)
            out = layer(h)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
            h = out
        assert len(model.layers[0].blocks) == 3 and model.layers[1].has_shortcut and not model.layers[0].has_shortcut


# ---- Eq. 4: the penalty and its gradient --------------------------------------------------------------
@pytest.mark.parametrize("form", ["scaled", "unscaled"])
def test_penalty_and_gradient(form):
    net = compile_source(SPACE, "t.space")
    gs = build_supernet(net).gate_set
    g = gen(9)
    with torch.no_grad():
        for gate in gs.gates:
            gate.s.normal_(0, 0.7, generator=g)
    d = 3.5
    gs.set_delta(d)
    for mode in ("disabled", "soft", "hard"):  # the penalty does not depend on the forward mode
        gs.set_mode(mode)
        for gate in gs.gates:
            gate.s.grad = None
        p = gs.penalty(form)
        scale = d if form == "scaled" else 1.0
        s = torch.cat([gate.s.detach() for gate in gs.gates])
        assert s.numel() == gs.channels == sum(gate.channels for gate in net.gates())
        torch.testing.assert_close(p, torch.sigmoid(scale * s).sum())
        p.backward()
        for gate in gs.gates:
            sig = torch.sigmoid(scale * gate.s.detach())
            torch.testing.assert_close(gate.s.grad, scale * sig * (1 - sig))
    gs.reset()
    assert float(gs.penalty(form).detach()) == pytest.approx(0.5 * gs.channels)  # s = 0: every gate at 1/2


TINY = """
space tiny(input=3, resolution=8, classes=10)
layer stem [gate=off] = conv(8, k=3) > bn > relu
layer choice = mbconv(8, k=3, e=2)
layer down = conv(16, k=3, stride=2) > bn > relu
layer classifier = gap > linear(classes)
"""


def test_gate_channel_flops_by_hand():
    """MACs per channel at 8x8: the mbconv's mid channels are written by the 1x1 expansion
    (8*16*64 MACs over 16 channels) and read by the 3x3 depthwise (16*9*64) and the 1x1
    projection (16*8*64); its outputs are written by the projection; the strided conv's by itself."""
    from nasdsl.graph.accounting import gate_channel_cost

    costs = gate_channel_cost(compile_source(TINY, "tiny.space"), "flops")
    assert costs == {"choice.mid": (8 * 16 * 64 + 16 * 9 * 64 + 16 * 8 * 64) / 16,
                     "choice.out": 16 * 8 * 64 / 8,
                     "down.bn": 8 * 9 * 16 * 16 / 16}


def test_flops_weighted_penalty():
    net = compile_source(TINY, "tiny.space")
    gs = build_supernet(net).gate_set
    costs = {"choice.mid": 1.0, "choice.out": 4.0, "down.bn": 2.0}
    gs.weigh(costs)
    w = torch.cat([torch.full((gate.s.numel(),), costs[gate.key]) for gate in gs.gates])
    assert float(gs.channel_weights.mean()) == pytest.approx(1.0)  # lambda_a keeps its scale
    with torch.no_grad():
        for gate in gs.gates:
            gate.s.normal_(0, 0.7, generator=gen(3))
    gs.set_delta(2.0)
    p = gs.penalty("scaled")
    s = gs.flat_s().detach()
    torch.testing.assert_close(p, (torch.sigmoid(2.0 * s) * w / w.mean()).sum())
    p.backward()
    sig = torch.sigmoid(2.0 * s)
    torch.testing.assert_close(torch.cat([gate.s.grad for gate in gs.gates]), 2.0 * sig * (1 - sig) * w / w.mean())


def test_penalty_only_touches_gates():
    net = compile_source(SPACE, "t.space")
    model = build_supernet(net)
    model.gate_set.penalty().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.endswith(".s"), name


# ---- schedules ----------------------------------------------------------------------------------------
def arch(schedule="iteration", start=1.0, end=1e4):
    return ArchRecipe(epochs=5, lr=0.1, momentum=0.9, lambda_a=1e-4, delta_start=start, delta_end=end,
                      delta_schedule=schedule)


@pytest.mark.parametrize("start,end", [(1.0, 1e4), (0.5, 200.0)])
def test_delta_per_iteration(start, end):
    cfg, spe, epochs = arch("iteration", start, end), 7, 5
    values = [delta(cfg, step, spe, epochs) for step in range(spe * epochs)]
    assert values[0] == pytest.approx(start, rel=1e-12)
    assert values[-1] == pytest.approx(end, rel=1e-12)
    assert all(b > a for a, b in zip(values, values[1:]))  # strictly increasing
    # exponential growth: log delta is linear in the step
    logs = [math.log(v) for v in values]
    steps = [b - a for a, b in zip(logs, logs[1:])]
    assert max(steps) - min(steps) < 1e-9
    assert delta(cfg, spe * epochs + 10, spe, epochs) == pytest.approx(end)  # clamped after the end


def test_delta_per_epoch():
    cfg, spe, epochs = arch("epoch"), 7, 5
    values = [delta(cfg, step, spe, epochs) for step in range(spe * epochs)]
    per_epoch = [values[e * spe:(e + 1) * spe] for e in range(epochs)]
    assert all(len(set(v)) == 1 for v in per_epoch)  # constant within an epoch
    firsts = [v[0] for v in per_epoch]
    assert firsts[0] == pytest.approx(1.0) and firsts[-1] == pytest.approx(1e4)
    assert all(b > a for a, b in zip(firsts, firsts[1:]))
    assert firsts == pytest.approx([10.0 ** e for e in range(5)])  # 1, 10, ..., 1e4 over 5 epochs


def test_delta_degenerate_lengths():
    assert delta(arch("iteration"), 0, 1, 1) == pytest.approx(1e4)   # a single step trains at delta_end
    assert delta(arch("epoch"), 3, 10, 1) == pytest.approx(1e4)


def stage(schedule, **kw):
    return StageRecipe(**{"epochs": 10, "lr": 0.1, "schedule": schedule, "momentum": 0.9, "weight_decay": 0.0, **kw})


def test_learning_rate_schedules():
    spe = 4
    total = 10 * spe
    # constant
    assert {learning_rate(stage("constant"), s, spe) for s in range(total)} == {0.1}
    # an architecture stage (no `schedule`) keeps its lr
    assert {learning_rate(arch(), s, spe) for s in range(total)} == {0.1}
    # cosine: starts at lr, decreases monotonically, ends near 0 (never below)
    cos = [learning_rate(stage("cosine"), s, spe) for s in range(total)]
    assert cos[0] == pytest.approx(0.1)
    assert all(b <= a for a, b in zip(cos, cos[1:])) and 0 < cos[-1] < 0.1 * 0.01
    assert cos[total // 2] == pytest.approx(0.05)
    # step: times gamma at each milestone epoch
    st = [learning_rate(stage("step", milestones=[3, 7], gamma=0.1), s, spe) for s in range(total)]
    assert st[3 * spe - 1] == pytest.approx(0.1) and st[3 * spe] == pytest.approx(0.01)
    assert st[7 * spe - 1] == pytest.approx(0.01) and st[7 * spe] == pytest.approx(0.001)
    # linear warm-up inside the epochs, then the schedule starts at the full lr
    warm = [learning_rate(stage("cosine", warmup_epochs=2), s, spe) for s in range(total)]
    assert warm[:2 * spe] == pytest.approx([0.1 * (s + 1) / (2 * spe) for s in range(2 * spe)])
    assert warm[2 * spe] == pytest.approx(0.1)
    assert all(b <= a for a, b in zip(warm[2 * spe:], warm[2 * spe + 1:]))


# ---- vectorised: no Python loop over channels -------------------------------------------------------
def _aten_ops(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_gate_is_one_vectorised_op_whatever_its_width(mode):
    """The op count of a gate's forward (alone, fused into a BN, and of the penalty) is the same for
    10 and for 10,000 channels, and small: no per-channel Python loop anywhere."""
    counts = {}
    for channels in (10, 10_000):
        state = GateState(mode, 5.0)
        gate = SSGate(channels, "k", state)
        x = torch.randn(2, channels, 2, 2)
        fused = SSGate(channels, "k2", state, fused=True)
        bn = nn.Sequential(gate_batchnorm(nn.BatchNorm2d(channels), fused), fused).eval()
        gs = GateSet(state, [gate, fused])
        with torch.no_grad():
            counts[channels] = (_aten_ops(lambda: gate(x)), _aten_ops(lambda: bn(x)),
                                _aten_ops(lambda: gs.penalty("scaled")))
    assert counts[10] == counts[10_000], counts
    assert all(c <= 30 for c in counts[10_000]), counts


@pytest.mark.parametrize("flat", [False, True], ids=["bn2d", "bn1d"])
def test_disabled_gated_bn_costs_nothing(flat):
    """Disabled, a gated BN runs exactly the ops of a plain BN, and its fused gate none at all."""
    state = GateState("disabled")
    plain = nn.BatchNorm1d(8) if flat else nn.BatchNorm2d(8)
    gate = SSGate(8, "k", state, fused=True)
    seq = nn.Sequential(gate_batchnorm(copy.deepcopy(plain), gate), gate)
    x = torch.randn(4, 8) if flat else torch.randn(4, 8, 3, 3)
    for train in (True, False):
        plain.train(train)
        seq.train(train)
        assert _aten_ops(lambda: seq(x)) == _aten_ops(lambda: plain(x))
        assert _aten_ops(lambda: gate(x)) == 0


# ---- depth gates ----------------------------------------------------------------------------------
DEPTH = """
space depth(input=3, resolution=8, classes=4)
layer stem [gate=off] = conv(8, k=3) > bn > relu
layer a = mbconv(8, k=3, e=2) | mbconv(8, k=5, e=2)
layer b [residual=off] = mbconv(8, k=3, e=2) | mbconv(8, k=5, e=2)
layer down = conv(16, k=3, stride=2) > bn > relu
layer classifier = gap > linear(classes)
"""


def _depth_supernet():
    torch.manual_seed(0)
    return build_supernet(compile_source(DEPTH, "depth.space"), depth_gates=True)


def test_depth_gates_only_on_blocks_that_may_vanish():
    gs = _depth_supernet().gate_set
    assert [d.key for d in gs.depth_gates] == ["a.b0:depth", "a.b1:depth", "b.b0:depth", "b.b1:depth"]
    assert gs.blocks_of["a.b1:depth"] == ["a.b1.mid", "a.b1.out"]
    assert [g.key for g in gs.gates if g.depth_gate is not None] == ["a.b0.out", "a.b1.out", "b.b0.out", "b.b1.out"]
    assert gs.channels == sum(g.s.numel() for g in gs.gates)  # depth gates are not channels
    assert len(build_supernet(compile_source(DEPTH, "depth.space")).gate_set.depth_gates) == 0


def test_depth_gates_share_their_layers_fixed_cost():
    """block_cost is a layer's fixed time, paid while any of its blocks lives: two blocks side by
    side that may vanish weigh half of it each, a residual layer's one block all of it."""
    gs = _depth_supernet().gate_set
    assert gs.shares.tolist() == [0.5, 0.5, 0.5, 0.5]   # layers a and b: two blocks each
    gs.weigh({g.key: 1.0 for g in gs.gates}, block_cost=8.0)
    assert gs.depth_weights.tolist() == [4.0, 4.0, 4.0, 4.0]
    resnet = compile_source((ROOT / "spaces" / "resnet56_cifar.space").read_text(), "resnet56_cifar.space",
                            {"depth": "1"})
    shares = build_supernet(resnet, depth_gates=True).gate_set.shares
    assert len(shares) == 3 and shares.tolist() == [1.0, 1.0, 1.0]   # one block a residual layer


def test_depth_gate_penalty_prices_the_whole_block():
    """A block costs d * (its share of block_cost + its channels' terms); other channels count as
    before."""
    gs = _depth_supernet().gate_set
    costs = {g.key: float(i + 1) for i, g in enumerate(gs.gates)}
    gs.weigh(costs, block_cost=50.0)
    with torch.no_grad():
        for i, g in enumerate(gs.gates + gs.depth_gates):
            g.s.normal_(0, 0.7, generator=gen(10 + i))
    gs.set_delta(3.0)
    mean = torch.cat([torch.full((g.s.numel(),), costs[g.key]) for g in gs.gates]).mean()
    depth = {d.key.split(":")[0]: torch.sigmoid(3.0 * d.s)[0] for d in gs.depth_gates}
    expected = sum(torch.sigmoid(3.0 * d.s).sum() * 25.0 / mean for d in gs.depth_gates)   # half each
    for g in gs.gates:
        block = g.key.rsplit(".", 1)[0]
        term = (torch.sigmoid(3.0 * g.s) * costs[g.key] / mean).sum()
        expected = expected + term * depth.get(block, 1.0)
    got = gs.penalty()
    torch.testing.assert_close(got, expected)
    params = gs.parameters()
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(expected, params)):
        torch.testing.assert_close(a, b)
    # the down layer's gates have no depth gate: their gradient is the plain weighted one
    down = gs.by_key["down.bn"]
    (grad,) = torch.autograd.grad(gs.penalty(), [down.s])
    sig = torch.sigmoid(3.0 * down.s)
    torch.testing.assert_close(grad, 3.0 * sig * (1 - sig) * costs["down.bn"] / mean)


def test_closed_depth_gate_removes_its_block_and_folds_into_the_channels():
    model = _depth_supernet().eval()
    gs = model.gate_set
    gs.reset(1.0)
    gs.set_mode("hard")
    x = torch.randn(2, 3, 8, 8, generator=gen(4))
    with torch.no_grad():
        model.layers[1].blocks[1].depth_gate.s.fill_(-1.0)   # a.b1
        closed = model(x)
        gs.by_key["a.b1.out"].s.fill_(-1.0)
        model.layers[1].blocks[1].depth_gate.s.fill_(1.0)
        torch.testing.assert_close(model(x), closed)          # the same as closing its output group
        gs.reset(1.0)
        gs.by_key["a.b1.mid"].s[:3] = -0.5
        model.layers[1].blocks[1].depth_gate.s.fill_(-2.0)
        assert gs.fold_depth_gates() == 1
        torch.testing.assert_close(model(x), closed)          # folding changes nothing computed
    assert all(bool(d.s > 0) for d in gs.depth_gates)
    assert not (gs.by_key["a.b1.mid"].s > 0).any() and not (gs.by_key["a.b1.out"].s > 0).any()
    assert (gs.by_key["a.b0.out"].s > 0).all()
    assert gs.fold_depth_gates() == 0


def test_reading_depth_gates_while_they_train_warns_nothing():
    """`selected_values` (the budget controller's view, every step) and `fold_depth_gates` read each
    depth gate's trainable s as a number: without detaching it torch warned once a run, in the
    middle of the progress output."""
    import warnings

    from nasdsl.search.dnal import selected_values

    gs = _depth_supernet().gate_set
    gs.reset(1.0)
    gs.depth_gates[0].s.data.fill_(-1.0)
    assert all(s.requires_grad for s in gs.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values = selected_values(gs)
        assert gs.fold_depth_gates() == 1
    assert any(bool((v < 0).all()) for v in values.values())
