"""The search spaces in spaces/: they compile, they are the networks they name (parameter counts
and shapes of torchvision's and timm's models, built here at test time), the graph counts FLOPs
as thop does, and `nasdsl show --json` describes them."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nasdsl.cli import main as cli_main
from nasdsl.graph import accounting
from nasdsl.graph.ir import Shape, Shortcut
from nasdsl.language.compiler import compile_file, compile_source
from nasdsl.supernet import network as torchnet
from nasdsl.supernet.network import NasNet

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "spaces"
FILES = sorted(SPACES.glob("*.space"))
CIFAR = ["vgg16_cifar", "resnet56_cifar", "mobilenetv2_cifar", "proxyless_cifar"]
IMAGENET = ["vgg16", "resnet50", "mobilenetv2", "proxyless", "efficientnet_b0", "mobilenetv3_large", "mixnet_s"]


@lru_cache(maxsize=None)
def compiled(name: str, resolution: int | None = None):
    overrides = {"resolution": str(resolution)} if resolution else None
    return compile_file(SPACES / f"{name}.space", overrides)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def layer(net, name):
    return next(l for l in net.layers if l.name == name)


# ---- (a) every space compiles, and its header and width are parameters ----------------------
def test_the_spaces_are_there():
    assert {p.stem for p in FILES} >= set(CIFAR + IMAGENET)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_space_compiles(path):
    net = compile_file(path)
    assert net.name == path.stem
    assert net.out_shape == Shape(net.num_classes)
    assert net.gates(), "a search space without gates searches nothing"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_header_and_width_are_overridable(path):
    base = compile_file(path)
    net = compile_file(path, {"classes": "7", "width": "0.5"})
    assert net.num_classes == 7 and net.out_shape == Shape(7)
    assert accounting.network_cost(net).flops < accounting.network_cost(base).flops / 2


# ---- (b) parameter parity with the reference implementations ---------------------------------
def _torchvision(name):
    import torchvision
    return getattr(torchvision.models, name)(weights=None)


def _timm(name):
    import timm
    return timm.create_model(name, pretrained=False)


REFERENCES = {
    "vgg16": lambda: _torchvision("vgg16"),
    "resnet50": lambda: _torchvision("resnet50"),
    "mobilenetv2": lambda: _timm("mobilenetv2_100"),
    "efficientnet_b0": lambda: _timm("efficientnet_b0"),               # 5,288,548 params
    "mobilenetv3_large": lambda: _timm("mobilenetv3_large_100"),       # 5,483,032 params
    "mixnet_s": lambda: _timm("mixnet_s"),                              # 4,134,606 params
}


@lru_cache(maxsize=None)
def reference(name: str) -> nn.Module:
    with torch.device("meta"):  # shapes only: no memory, no init time
        return REFERENCES[name]().eval()


@pytest.mark.parametrize("name", REFERENCES)
def test_param_parity_with_reference(name):
    net = compiled(name)
    ref = reference(name)
    with torch.device("meta"):
        ours = NasNet(net.to_config())
    assert accounting.network_cost(net).params == n_params(ref)
    assert n_params(ours) == n_params(ref)
    # the same tensors, not just the same total (a 1x1 conv's weight counted as a linear's: timm's
    # MobileNetV3 conv_head acts on the pooled map, where the space has a linear)
    shapes = lambda m: Counter(tuple(p.shape[:2] if p.shape[2:] == (1, 1) else p.shape)  # noqa: E731
                               for p in m.parameters())
    assert shapes(ours) == shapes(ref)


# where each reference network's stages end, and the layer of ours that ends there
STAGE_ENDS = {
    "resnet50": {"layer1": "layer1.2", "layer2": "layer2.3", "layer3": "layer3.5", "layer4": "layer4.2"},
    "mobilenetv2": {"conv_stem": "stem", "blocks.0": "first", "blocks.1": "s1.1", "blocks.2": "s2.2",
                    "blocks.3": "s3.3", "blocks.4": "s4.2", "blocks.5": "s5.2", "blocks.6": "s6.0",
                    "conv_head": "head"},
    "vgg16": {f"features.{i}": f"pool{k + 1}" for k, i in enumerate([4, 9, 16, 23, 30])},
    "efficientnet_b0": {"conv_stem": "stem", "blocks.0": "first", "blocks.1": "s1.1", "blocks.2": "s2.1",
                        "blocks.3": "s3.2", "blocks.4": "s4.2", "blocks.5": "s5.3", "blocks.6": "s6.0",
                        "conv_head": "head"},
    "mobilenetv3_large": {"conv_stem": "stem", "blocks.0": "first", "blocks.1": "s1.0.b", "blocks.2": "s2.2",
                          "blocks.3": "s3.0.d", "blocks.4": "s4.1", "blocks.5": "s5.2", "blocks.6": "head"},
    "mixnet_s": {"conv_stem": "stem", "blocks.0": "first", "blocks.1": "s1.0.b", "blocks.2": "s2r.2",
                 "blocks.3": "s3r.1", "blocks.4": "s4r.1", "blocks.5": "s5r.1", "conv_head": "head"},
}


@pytest.mark.parametrize("name", STAGE_ENDS)
def test_stage_shapes_match_reference(name):
    ref = reference(name)
    modules = dict(ref.named_modules())
    seen = {}
    hooks = [modules[m].register_forward_hook(lambda mod, i, o, m=m: seen.__setitem__(m, tuple(o.shape[1:])))
             for m in STAGE_ENDS[name]]
    try:
        ref(torch.zeros(1, 3, 224, 224, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    net = compiled(name)
    for module, ours in STAGE_ENDS[name].items():
        assert tuple(layer(net, ours).out_shape.to_list()) == seen[module], module


@pytest.mark.parametrize("name", REFERENCES)
def test_stage_params_match_reference(name):
    """Per stage, not just in total: a miscount in one stage cannot hide behind another."""
    ref = reference(name)
    net = compiled(name)
    if name == "resnet50":
        pairs = {f"layer{i}": f"layer{i}." for i in range(1, 5)}
    elif name in ("mobilenetv2", "efficientnet_b0"):
        pairs = {"blocks.0": "first", **{f"blocks.{i}": f"s{i}." for i in range(1, 7)}}
    elif name == "mobilenetv3_large":
        pairs = {"blocks.0": "first", **{f"blocks.{i}": f"s{i}." for i in range(1, 6)}, "blocks.6": "head"}
    elif name == "mixnet_s":   # a stage's first layer (s2.0), then its repeats (s2r.0, ...)
        pairs = {"blocks.0": "first", **{f"blocks.{i}": f"s{i}" for i in range(1, 6)}}
    else:
        pairs = {"features": "conv", "classifier": "classifier"}
    modules = dict(ref.named_modules())
    for module, prefix in pairs.items():
        ours = sum(accounting.layer_cost(l).params for l in net.layers if l.name.startswith(prefix))
        assert ours == n_params(modules[module]), module


# ---- the paper's baselines (DNAL, tables I-VI), to its printed precision ----------------------
# (params in M, MACs in M); its params are rounded (ResNet-50's 25.557M printed as 25.55: 0.01M).
PAPER = {
    "vgg16_cifar": (14.99, 313.47),
    "resnet56_cifar": (0.85, 125.49),
    "mobilenetv2_cifar": (2.30, 91.17),
    "vgg16": (None, 15470.0),   # the paper's 138.37M params are vgg16_bn's; this is vgg16 (138.36M)
    "resnet50": (25.55, 4090.0),
    "mobilenetv2": (3.50, 300.79),
}


@pytest.mark.parametrize("name", PAPER)
def test_paper_baselines(name):
    params, flops = PAPER[name]
    cost = accounting.network_cost(compiled(name))
    if params is not None:
        assert abs(cost.params / 1e6 - params) <= 0.011, cost.params
    if flops is not None:  # within 0.05%: see each space's header for the remaining gap
        assert abs(cost.flops / 1e6 - flops) <= 5e-4 * flops, cost.flops


# ---- (c) the graph's FLOPs are thop's ----------------------------------------------------------
def _zero(m, x, y):
    """Counts nothing: the paper's FLOPs are conv and linear MACs only."""


ZERO_OPS = {cls: _zero for cls in (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.Sigmoid, nn.Hardsigmoid,
    nn.Identity, nn.Dropout, nn.Flatten, nn.MaxPool2d, nn.AvgPool2d, torchnet.GlobalAvgPool, torchnet.Subsample,
    torchnet.Select)}


def thop_macs(model: nn.Module, shape) -> int:
    import thop

    model.eval()
    with torch.no_grad():
        from thop.vision.basic_hooks import count_convNd   # thop matches types exactly: a one-tap
        ops = {**ZERO_OPS, torchnet.ChannelScale: count_convNd}  # depthwise conv is counted as the conv it is
        macs, _ = thop.profile(model, inputs=(torch.zeros(1, *shape),), custom_ops=ops, verbose=False)
    return int(macs)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # thop's use of distutils
@pytest.mark.parametrize("name,resolution", [(n, None) for n in CIFAR] +
                         [("vgg16", 32), ("resnet50", 64), ("mobilenetv2", 64), ("efficientnet_b0", 64),
                          ("mobilenetv3_large", 64), ("mixnet_s", 64)])
def test_flops_equal_thop(name, resolution):
    net = compiled(name, resolution)
    model = NasNet(net.to_config())
    assert thop_macs(model, net.input_shape.to_list()) == accounting.network_cost(net).flops


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_flops_convention_bias_not_counted():
    """MACs = output elements x (in / groups) x k^2 for a conv and out x in for a linear; a bias
    adds none (thop >= 0.1 agrees; thop 0.0.x added one per output, as HRank's 313.73M shows)."""
    net = compile_source("space t(input=3, resolution=8, classes=10)\n"
                         "layer a = conv(4, k=3, stride=2, bias=on) > relu\n"
                         "layer b = gap > linear(classes, bias=on)\n")
    assert accounting.network_cost(net).flops == 4 * 4 * 4 * 3 * 9 + 10 * 4
    assert thop_macs(NasNet(net.to_config()), [3, 8, 8]) == accounting.network_cost(net).flops


# ---- (d) shapes, shortcuts and gates -----------------------------------------------------------
def test_resnet56_option_a_shortcuts():
    net = compiled("resnet56_cifar")
    blocks = [l for l in net.layers if l.blocks[0].kind == "basic"]
    assert len(blocks) == 27 and 6 * 9 + 2 == 56
    widths = {"s1": Shape(16, (32, 32)), "s2": Shape(32, (16, 16)), "s3": Shape(64, (8, 8))}
    for l in blocks:
        assert l.out_shape == widths[l.name.split(".")[0]], l.name
        if l.name in ("s2.0", "s3.0"):  # the stage transitions: subsample, zero-pad both sides
            cin, cout = l.in_shape.channels, l.out_shape.channels
            assert [(op.kind, op.attrs["stride"]) for op in l.shortcut.ops] == [("subsample", 2)]
            assert l.shortcut.index == tuple(range((cout - cin) // 2, (cout - cin) // 2 + cin))
        else:  # s1.0 included: the stem already gives 16 channels
            assert l.shortcut == Shortcut(), l.name
    assert accounting.network_cost(net).params == sum(  # no shortcut has parameters
        accounting.block_cost(b).params for l in net.layers for b in l.blocks)


def test_resnet56_option_a_in_torch():
    """With its residual branch silenced, a transition block is relu(F.pad(x[:, :, ::2, ::2]))."""
    net = compiled("resnet56_cifar")
    model = NasNet(net.to_config()).eval()
    i = [l.name for l in net.layers].index("s2.0")
    block = model.layers[i]
    last_bn = [m for m in block.blocks[0].modules() if isinstance(m, nn.BatchNorm2d)][-1]
    with torch.no_grad():
        last_bn.weight.zero_()
        last_bn.bias.zero_()
        x = torch.rand(2, 16, 32, 32)
        expected = F.relu(F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8)))
        assert torch.equal(block(x), expected)
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_vgg16_gates_the_13_convs():
    for name in ("vgg16_cifar", "vgg16"):
        net = compiled(name)
        convs = [l for l in net.layers if l.name.startswith("conv")]
        assert len(convs) == 13
        assert sum(g.channels for g in net.gates()) == 4224
        assert sorted(g.layer for g in net.gates()) == sorted(l.name for l in convs)
        assert all(g.channels == layer(net, g.layer).width for g in net.gates())
    net = compiled("vgg16_cifar")
    sizes = [layer(net, f"pool{i}").out_shape for i in range(1, 6)]
    assert sizes == [Shape(64, (16, 16)), Shape(128, (8, 8)), Shape(256, (4, 4)), Shape(512, (2, 2)),
                     Shape(512, (1, 1))]
    head = [(op.kind, op.out_shape.channels) for op in layer(net, "classifier").blocks[0].ops]
    assert head == [("flatten", 512), ("linear", 512), ("bn", 512), ("act", 512), ("linear", 10)]


def test_mobilenetv2_cifar_layout():
    net = compiled("mobilenetv2_cifar")
    # downsampling only in the 32-, 64- and 160-channel stages: 32 -> 16 -> 8 -> 4
    size = {l.name: l.out_shape.size for l in net.layers}
    assert size["stem"] == size["first"] == size["s1.0"] == (32, 32)
    assert size["s2.2"] == (16, 16) and size["s4.1"] == (8, 8) and size["s6"] == size["head"] == (4, 4)
    # the port's projection shortcuts: in every stride-1 layer that changes the width, ungated
    projected = [l.name for l in net.layers if len(l.blocks) == 2]
    assert projected == ["first", "s1_in", "s4_in", "s6"]
    for name in projected:
        proj = layer(net, name).blocks[1]
        assert [op.kind for op in proj.ops] == ["conv", "bn"] and proj.ops[0].attrs["k"] == 1
    gated = {g.layer: g.channels for g in net.gates() if g.key.startswith("head")}
    assert gated == {"head": 1280}  # the final 1x1 conv is gated, the stem and classifier are not
    assert not any(g.layer in ("stem", "classifier") for g in net.gates())


def test_proxyless_supernets():
    for name in ("proxyless", "proxyless_cifar"):
        net = compiled(name)
        assert sum(g.channels for g in net.gates()) == 60704
        searchable = [l for l in net.layers if len(l.blocks) == 6]
        assert len(searchable) == 21
    assert abs(accounting.network_cost(compiled("proxyless")).params - 16.0e6) < 0.05e6
    net = compiled("proxyless_cifar")
    size = {l.name: l.out_shape.size[0] for l in net.layers if l.out_shape.size}
    assert [size[n] for n in ("stem", "first", "s1.3", "s2.3", "s3.3", "s4.3", "s5.3", "s6.0")] == \
        [32, 32, 32, 16, 8, 8, 4, 4]


# ---- (e) `nasdsl show --json`: the contract ----------------------------------------------------
TOP_KEYS = {"name", "params", "flops", "gates", "log10_space_size", "layers"}
LAYER_KEYS = {"name", "blocks", "out_channels", "flops", "params"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_show_json_contract(path, capsys):
    assert cli_main(["show", "--json", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert TOP_KEYS <= set(info)
    assert info["layers"] and all(LAYER_KEYS <= set(l) for l in info["layers"])
    net = compiled(path.stem)
    cost = accounting.network_cost(net)
    assert (info["name"], info["params"], info["flops"]) == (net.name, cost.params, cost.flops)
    assert info["gates"] == sum(g.channels for g in net.gates())
    assert sum(l["params"] for l in info["layers"]) == info["params"]
    assert sum(l["flops"] for l in info["layers"]) == info["flops"]
    assert info["log10_space_size"] == pytest.approx(info["gates"] * 0.30103, rel=1e-5)


def test_show_json_command_line():
    out = subprocess.run([sys.executable, "-m", "nasdsl", "show", "--json", "--set", "width=0.5",
                          str(SPACES / "resnet56_cifar.space")], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    assert info["name"] == "resnet56_cifar" and info["layers"][0]["out_channels"] == 8


# ---- the README's examples compile ---------------------------------------------------------------
def test_readme_examples_compile():
    text = (SPACES / "README.md").read_text()
    snippets = re.findall(r"```space\n(.*?)```", text, re.S)
    assert len(snippets) >= 4
    for snippet in snippets:
        compile_source(snippet, "README.md")
