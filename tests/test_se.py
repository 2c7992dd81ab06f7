"""Squeeze-and-excitation, SiLU and grouped bottlenecks (what EfficientNet-B0, MobileNetV3-Large and
ResNeXt need): the `se` op's counts and text, where mbconv puts its SE and how it sizes it, and on a
tiny space with SE blocks the whole chain: supernet, derivation with random gates (slim == hard-masked
supernet), the derived network's .space text, merging and the generated export. Also the shipped
spaces against the timm/torchvision networks they name, logits included (their weights copied in)."""
from __future__ import annotations

import re
import zlib

import pytest
import torch
import torch.nn as nn

import nasdsl
from nasdsl.derive.derive import derive
from nasdsl.derive.merge import merge
from nasdsl.errors import NasdslError
from nasdsl.export.exporter import export_model
from nasdsl.graph import accounting
from nasdsl.graph.printer import to_space
from nasdsl.language.compiler import compile_file, compile_source
from nasdsl.supernet.build import build_supernet
from nasdsl.supernet.network import NasNet, SqueezeExcite
from nasdsl.train.data import Preprocessing
from cli_helpers import distinct_bn
from test_derive import (ROOT, _normalised, assert_counts, assert_equivalent, gen, random_masks,
                         slim_and_masked)

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # thop's use of distutils
              pytest.mark.filterwarnings("ignore::FutureWarning"),      # torch.jit.script: deprecated, supported
              pytest.mark.usefixtures("one_thread")]

HEAD = "space t(input=3, resolution=8, classes=10)\nlayer stem [gate=off] = conv(16, k=3) > bn > relu\n"
TAIL = "layer classifier = gap > linear(classes)\n"

# every SE form: after an mbconv's depthwise stage with and without an expansion conv (timm's
# DepthwiseSeparableConv), rd from the input or the mid channels, made divisible by 8, hard sigmoid;
# in a chain of its own; parallel SE candidates (which merge leaves alone)
TINY = """
space tiny(input=3, resolution=16, classes=10)
layer stem [gate=off] = conv(16, k=3, stride=2) > bn > silu
layer first = mbconv(8, e=1, act=silu, se=0.25)
layer a = mbconv(8, k=5, e=4, act=silu, se=0.25)
layer b = mbconv(16, e=3, stride=2, act=hswish, se=0.25, se_of=mid, se_divisor=8, se_act=relu, se_fn=hsigmoid)
layer c = conv(16, k=1) > bn > silu > se(4, act=silu) > conv(16, k=1) > bn > silu
layer d = mbconv(16, k=3, e=2, act=silu, se=0.5) | mbconv(16, k=5, e=2, act=silu, se=0.5)
layer head = conv(32, k=1) > bn > silu
layer classifier = gap > dropout(0.2) > linear(classes)
"""


def tiny():
    return compile_source(TINY, "tiny.space")


def ops_of(net, name):
    layer = next(layer for layer in net.layers if layer.name == name)
    return layer.blocks[0].ops


# ---- the op and the builtins ------------------------------------------------------------------------
def test_se_counts_and_torch_module():
    net = compile_source(HEAD + "layer a [gate=off] = se(4)\n" + TAIL, "t.space")
    se = ops_of(net, "a")[0]
    cost = accounting.op_cost(se)
    assert (cost.params, cost.flops) == (2 * 16 * 4 + 4 + 16, 2 * 16 * 4)
    module = NasNet(net.to_config()).layers[1].blocks[0].ops[0]
    assert isinstance(module, SqueezeExcite) and sum(p.numel() for p in module.parameters()) == cost.params
    assert [n for n, _ in module.named_children()] == ["conv_reduce", "act1", "conv_expand", "gate"]
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        expected = x * torch.sigmoid(module.conv_expand(torch.relu(module.conv_reduce(x.mean((2, 3), keepdim=True)))))
        assert torch.allclose(module(x), expected)


def test_se_prints_without_defaults_and_compiles_back():
    for text, attrs in [("se(rd=8)", {"rd": 8, "act": "relu", "fn": "sigmoid"}),
                        ("se(rd=4, act=silu)", {"rd": 4, "act": "silu", "fn": "sigmoid"}),
                        ("se(rd=8, fn=hsigmoid)", {"rd": 8, "act": "relu", "fn": "hsigmoid"})]:
        op = ops_of(compile_source(HEAD + f"layer a [gate=off] = {text}\n" + TAIL, "t.space"), "a")[0]
        assert op.attrs == attrs and op.spec.print(op, False) == text


def test_sigmoid_is_not_a_chain_activation():
    """sigmoid(0) = 0.5: after a closed gate it would make a zero channel non-zero."""
    with pytest.raises(NasdslError, match="unknown op 'sigmoid'"):
        compile_source(HEAD + "layer a = conv(8) > bn > sigmoid\n" + TAIL, "t.space")
    with pytest.raises(NasdslError, match="fn expects one of sigmoid, hsigmoid"):
        compile_source(HEAD + "layer a = se(4, fn=tanh)\n" + TAIL, "t.space")


def test_silu_in_chains_and_blocks():
    net = compile_source(HEAD + "layer a = conv(8) > bn > silu\nlayer b = mbconv(8, act=silu)\n" + TAIL, "t.space")
    assert [op.attrs["fn"] for op in ops_of(net, "a") if op.kind == "act"] == ["silu"]
    model = NasNet(net.to_config())
    assert sum(isinstance(m, nn.SiLU) for m in model.modules()) == 3
    assert "layer a = conv(8, k=3) > bn > silu" in to_space(net)


def test_mbconv_places_and_sizes_its_se():
    net = tiny()
    # timm's DepthwiseSeparableConv: conv_dw, bn1 (gated: mid), act, se, conv_pw, bn2 (gated: out)
    assert [op.kind for op in ops_of(net, "first")] == ["conv", "bn", "gate", "act", "se", "conv", "bn", "gate"]
    assert ops_of(net, "first")[4].attrs == {"rd": 4, "act": "silu", "fn": "sigmoid"}   # 16 * 0.25, block's act
    # InvertedResidual: the SE after the depthwise stage's gate and activation, before the projection
    a = [op.kind for op in ops_of(net, "a")]
    assert a[a.index("se") - 3:a.index("se") + 2] == ["bn", "gate", "act", "se", "conv"]
    assert ops_of(net, "a")[a.index("se")].attrs["rd"] == 2                             # of the input: 8 * 0.25
    b = next(op for op in ops_of(net, "b") if op.kind == "se")
    assert b.attrs == {"rd": 8, "act": "relu", "fn": "hsigmoid"}     # make_divisible(24 * 0.25, 8): MobileNetV3
    assert "se0.25" in next(lay for lay in net.layers if lay.name == "a").blocks[0].label
    none = compile_source(HEAD + "layer a = mbconv(16, se=0)\n" + TAIL, "t.space")
    assert not any(op.kind == "se" for op in ops_of(none, "a"))
    with pytest.raises(NasdslError, match="se must be 0 or more"):
        compile_source(HEAD + "layer a = mbconv(16, se=-0.25)\n" + TAIL, "t.space")


# ---- derivation, printing, merging, export on the tiny SE space --------------------------------------
@pytest.fixture(scope="module")
def tiny_supernet():
    torch.manual_seed(0)
    return build_supernet(tiny()).eval()


def test_supernet_trains_through_se():
    torch.manual_seed(1)
    model = build_supernet(tiny()).train()
    model.gate_set.set_mode("soft")
    model(torch.randn(4, 3, 16, 16)).sum().backward()
    se = [m for m in model.modules() if isinstance(m, SqueezeExcite)]
    assert len(se) == 6 and all(m.conv_reduce.weight.grad is not None for m in se)
    assert all(g.s.grad is not None for g in model.gate_set.gates)


@pytest.mark.parametrize("density", ["0.7", "0.3", "mixed"])
def test_slim_equals_masked_supernet(tiny_supernet, density):
    net = tiny()
    masks, strength = random_masks(net, density, seed=zlib.crc32(f"se:{density}".encode()))
    d = derive(net, masks, strength)
    assert_equivalent(d, tiny_supernet)
    assert_counts(d)
    # an SE keeps every reduced channel and scales exactly its block's kept mid channels
    rd = {block.name: op.attrs["rd"] for _, block in net.blocks() for op in block.ops if op.kind == "se"}
    for _, block in d.network.blocks():
        for i, op in enumerate(block.ops):
            if op.kind == "se":
                assert op.in_shape.channels == op.out_shape.channels == block.ops[i - 2].out_shape.channels
                assert op.attrs["rd"] == rd[block.name]
    text = to_space(d.network)
    assert "se(rd=" in text
    again = compile_source(text, "tiny_derived.space")
    assert _normalised(again.to_config()) == _normalised(d.network.to_config())
    assert accounting.network_cost(again) == accounting.network_cost(d.network)


def test_se_keeps_every_reduced_channel():
    net = tiny()
    masks = {g.key: torch.ones(g.channels, dtype=torch.bool) for g in net.gates()}
    masks["a.mid"][::2] = False
    d = derive(net, masks)
    se = next(op for op in ops_of(d.network, "a") if op.kind == "se")
    assert se.attrs["rd"] == 2 and se.in_shape.channels == 16
    plan = next(p for p in d.plans[2]["blocks"][0] if p is not None and "conv_reduce.weight" in p.weights)
    assert plan.weights["conv_reduce.weight"] == (None, "in") and plan.in_index == tuple(range(1, 32, 2))


def test_fewer_channels_needed_after_an_se_are_selected_after_it():
    """An SE reads all its live inputs; when the ops after it need fewer (a depthwise conv before a
    gate), it still computes every kept input's channel and a select keeps the needed ones."""
    src = HEAD + "layer a = conv(8, k=1) > bn(gate=off) > silu > se(2) > dwconv(k=3) > bn > relu\n" + TAIL
    net = compile_source(src, "t.space")
    torch.manual_seed(0)
    model = build_supernet(net).eval()
    masks = {g.key: torch.ones(g.channels, dtype=torch.bool) for g in net.gates()}
    masks["a.bn"][[1, 4, 5]] = False
    d = derive(net, masks)
    ops = ops_of(d.network, "a")
    assert [op.kind for op in ops] == ["conv", "bn", "act", "se", "select", "conv", "bn", "act"]
    assert ops[3].out_shape.channels == 8 and ops[4].attrs["index"] == (0, 2, 3, 6, 7)
    assert_equivalent(d, model)
    assert_counts(d)
    again = compile_source(to_space(d.network), "again.space")
    assert _normalised(again.to_config()) == _normalised(d.network.to_config())


def test_merge_leaves_se_layers_alone_and_keeps_the_function(tiny_supernet):
    net = tiny()
    masks, strength = random_masks(net, "0.5", seed=31)
    d = derive(net, masks, strength)
    slim = slim_and_masked(d, tiny_supernet, seed=3)
    network, state = merge(d.network, slim.state_dict())
    parallel = next(layer for layer in network.layers if layer.name == "d")
    assert len(parallel.blocks) == len(next(lay for lay in d.network.layers if lay.name == "d").blocks) == 2
    merged = NasNet(network.to_config()).eval()
    merged.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 16, 16, generator=gen(4))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), slim(x), rtol=1e-4, atol=1e-4)


def test_export_of_a_derived_se_network(tiny_supernet, tmp_path):
    """export_model itself checks that the generated model computes the slim network (1e-4)."""
    net = tiny()
    masks, strength = random_masks(net, "0.5", seed=32)
    d = derive(net, masks, strength)
    slim = slim_and_masked(d, tiny_supernet, seed=5)
    prep = Preprocessing((3, 16, 16), (0.5,) * 3, (0.25,) * 3)
    folder = export_model(d.network, slim.state_dict(), tmp_path / "se", "nasdsl_se_tiny", preprocessing=prep,
                          space_text=to_space(d.network))
    code = (folder / "nasdsl_se_tiny.py").read_text()
    assert "class SqueezeExcite(nn.Module):" in code
    assert re.search(r"\('se', SqueezeExcite\(|self\.se = SqueezeExcite\(", code)
    assert "gate_layer=nn.Hardsigmoid" in code and "act_layer=nn.SiLU" in code
    model = nasdsl.load(folder)
    x = torch.randn(2, 3, 16, 16, generator=gen(6))
    with torch.no_grad():
        torch.testing.assert_close(model(x), slim(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.jit.script(model)(x), slim(x), rtol=1e-4, atol=1e-4)


# ---- grouped bottleneck (ResNeXt) --------------------------------------------------------------------
GROUPED = """
space rx(input=3, resolution=16, classes=10)
layer stem [gate=off] = conv(16, k=3, stride=2) > bn > relu
layer a = bottleneck(32, mid=16, groups=4)
layer b = bottleneck(32, mid=16, groups=4)
layer c = bottleneck(32, mid=16)
layer classifier = gap > linear(classes)
"""


def test_grouped_bottleneck_gates_only_bn3_and_derives():
    net = compile_source(GROUPED, "rx.space")
    assert [g.key for g in net.gates()] == ["a.bn3", "b.bn3", "c.bn1", "c.bn2", "c.bn3"]
    conv = ops_of(net, "a")[3]
    assert conv.attrs["groups"] == 4 and accounting.op_cost(conv).params == 16 * 4 * 9
    assert "conv(16, k=3, groups=4)" in to_space(net)
    torch.manual_seed(0)
    model = build_supernet(net).eval()
    for density in ("0.5", "mixed"):
        masks, strength = random_masks(net, density, seed=33)
        d = derive(net, masks, strength)
        assert_equivalent(d, model)
        assert_counts(d)
        again = compile_source(to_space(d.network), "rx_derived.space")
        assert _normalised(again.to_config()) == _normalised(d.network.to_config())


# ResNeXt-50 32x4d (torchvision's resnext50_32x4d) in stages of grouped bottlenecks. Not shipped as a
# space: with only bn3 gated, a block's cost comes and goes whole with its last channel, and a budget
# fit at 25% of its FLOPs lands at 0.898 of the target, below the 0.9 that tests/test_budget.py holds
# every shipped space to.
RESNEXT50 = """
space resnext50(input=3, resolution=224, classes=1000)
def block(c) = bottleneck(4 * c, mid=2 * c, groups=32)      # c: the base width; 32 groups of c / 16
layer stem [gate=off] = conv(64, k=7, stride=2) > bn > relu > maxpool(k=3, stride=2, padding=1)
stage layer1 [repeat=3]           { layer = block(64) }
stage layer2 [repeat=4, stride=2] { layer = block(128) }
stage layer3 [repeat=6, stride=2] { layer = block(256) }
stage layer4 [repeat=3, stride=2] { layer = block(512) }
layer classifier = gap > linear(classes)
"""


def test_resnext50_stages_have_torchvision_param_count():
    net = compile_source(RESNEXT50, "resnext50.space")
    assert accounting.network_cost(net).params == 25_028_904
    assert sum(g.channels for g in net.gates()) == 15_104 and all(g.key.endswith(".bn3") for g in net.gates())


# ---- the shipped spaces (and ResNeXt-50) are the networks they name, to the logits ---------------------
def _reference(name: str) -> nn.Module:
    import timm
    import torchvision
    if name == "resnext50_32x4d":
        return torchvision.models.resnext50_32x4d(weights=None)
    return timm.create_model(name, pretrained=False)


@pytest.mark.parametrize("stem, reference", [("efficientnet_b0", "efficientnet_b0"),
                                             ("mobilenetv3_large", "mobilenetv3_large_100"),
                                             (None, "resnext50_32x4d")])
def test_space_computes_the_reference_network(stem, reference):
    """The reference's tensors, copied in order into the space's NasNet (both list conv, BN, SE and
    classifier tensors in the same order; timm's conv_head on the pooled map is our linear), give
    the reference's eval-mode logits, with random BN statistics so every BN matters."""
    ref = _reference(reference).eval()
    g = gen(40)
    distinct_bn(ref, g)
    net = compile_file(ROOT / "spaces" / f"{stem}.space", {"resolution": "32"}) if stem else \
        compile_source(RESNEXT50, "resnext50.space", {"resolution": "32"})
    ours = NasNet(net.to_config()).eval()
    tensors = lambda m: [(k, v) for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")]  # noqa: E731
    pairs = list(zip(tensors(ref), tensors(ours)))
    assert len(tensors(ref)) == len(tensors(ours)) and all(a.numel() == b.numel() for (_, a), (_, b) in pairs)
    ours.load_state_dict({k: v.reshape(mine.shape) for (_, v), (k, mine) in pairs}, strict=False)
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(expected.abs().max())))
