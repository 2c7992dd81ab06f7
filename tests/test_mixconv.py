"""Mixed and split convolutions (the `mixconv` op: timm's MixedConv2d, MixNet's blocks): counts,
the language's forms, the supernet, derivation (per-group slimming, a group that vanishes, an
output group cut off from its inputs), printing back, export, and the shipped mixnet_s space
against timm's mixnet_s."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from nasdsl.derive.derive import derive
from nasdsl.errors import NasdslError
from nasdsl.graph import accounting
from nasdsl.graph.ops import split_channels
from nasdsl.graph.printer import to_space
from nasdsl.language.compiler import compile_file, compile_source
from nasdsl.supernet.build import build_supernet
from nasdsl.supernet.network import MixConv, NasNet
from cli_helpers import distinct_bn
from test_derive import assert_equivalent, gen, random_masks, slim_and_masked

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("one_thread")]

# a MixNet in miniature: every kind of block mixnet_s has, at 16 px and a few channels
TINY = """
space tiny_mixnet(input=3, resolution=16, classes=5)
layer stem [gate=off] = conv(8, k=3, stride=2) > bn > relu
layer first = mbconv(8, k=3, e=1, act=relu)
layer a = mbconv(12, k=3, e=3, stride=2, act=relu, expand_split=2, project_split=2)
layer b = mbconv(12, k=[3, 5, 7], e=3, act=silu, se=0.5, expand_split=2, project_split=2)
layer c = mbconv(16, k=[3, 5], e=3, act=silu, se=0.25, project_split=2)
layer d = mbconv(16, k=[3, 5, 7, 9], e=2, act=silu, se=0.5, expand_split=2)
layer head = conv(24, k=1) > bn > relu
layer classifier = gap > linear(classes)
"""


def mixconvs(net):
    return [op for _, block in net.blocks() for op in block.ops if op.kind == "mixconv"]


@pytest.fixture(scope="module")
def tiny():
    return compile_source(TINY, "tiny.space")


# ---- the op and the language -------------------------------------------------------------------
def test_split_is_timms():
    import timm.layers.mixed_conv2d as timm_mixed
    for n, g in [(16, 2), (96, 3), (720, 5), (13, 4), (7, 7)]:
        assert list(split_channels(n, g)) == timm_mixed._split_channels(n, g)


def test_the_readable_forms_compile_to_mixconvs():
    net = compile_source("""space t(input=3, resolution=8, classes=5)
layer a [gate=off] = conv(13, k=1, split=2) > dwconv(k=[3, 5, 7], stride=2) > mixconv(k=[1, 3], split=[9, 4], out=[2, 6])
layer b = mixconv(k=3, split=[3, 5], depthwise=on) > bn > relu
layer classifier = gap > linear(classes)
""", "t.space")
    split, dw, explicit, explicit_dw = mixconvs(net)
    assert split.attrs == {"kernels": (1, 1), "in_splits": (2, 1), "out_splits": (7, 6), "stride": 1, "depthwise": False}
    assert dw.attrs == {"kernels": (3, 5, 7), "in_splits": (5, 4, 4), "out_splits": (5, 4, 4), "stride": 2,
                        "depthwise": True}
    assert dw.out_shape.size == (4, 4)
    assert explicit.attrs["out_splits"] == (2, 6) and explicit.out_shape.channels == 8
    assert explicit_dw.attrs["kernels"] == (3, 3) and explicit_dw.attrs["in_splits"] == (3, 5)


def test_counts_are_per_group(tiny):
    """Params and MACs of a mixconv are its groups' convs' (what thop counts on the torch model)."""
    from test_spaces import thop_macs
    model = NasNet(tiny.to_config())
    assert accounting.network_cost(tiny).params == sum(p.numel() for p in model.parameters())
    assert accounting.network_cost(tiny).flops == thop_macs(model, tiny.input_shape.to_list())
    b = next(layer for layer in tiny.layers if layer.name == "b").blocks[0]
    dw = next(op for op in b.ops if op.kind == "mixconv" and op.attrs["depthwise"])
    assert dw.attrs["in_splits"] == (12, 12, 12)
    assert accounting.op_cost(dw).params == 12 * (9 + 25 + 49)
    assert accounting.op_cost(dw).flops == 16 * 12 * (9 + 25 + 49)   # 4x4 output
    pw = b.ops[0]
    assert pw.attrs == {"kernels": (1, 1), "in_splits": (6, 6), "out_splits": (18, 18), "stride": 1, "depthwise": False}
    assert accounting.op_cost(pw).params == 2 * 6 * 18


@pytest.mark.parametrize("text, message", [
    ("dwconv(k=[3, 4])", "odd kernel"),
    ("dwconv(k=[3, 5], bias=on)", "no bias"),
    ("conv(8, k=1, split=2, groups=2)", "split=2 takes neither groups"),
    ("mixconv(k=[1, 1], split=[2, 2])", "cover 4 channels, the input has 8"),
    ("mixconv(k=3, split=[4, 4], out=[4, 5], depthwise=on)", "keeps each group's channels"),
    ("mixconv(k=[3, 5, 7], split=[4, 4])", "one odd kernel per channel group"),
    ("mixconv(k=3, split=4)", "expects a list like [48, 48]"),
    ("conv(8, k=1, split=9)", "at least one channel"),
    ("mbconv(8, e=1, expand_split=2)", "needs an expansion conv"),
])
def test_mistakes_are_one_line_errors(text, message):
    source = f"space t(input=8, resolution=8, classes=5)\nlayer a = {text}\nlayer c = gap > linear(classes)\n"
    with pytest.raises(NasdslError, match=re.escape(message)) as info:
        compile_source(source, "t.space")
    assert "\n" not in info.value.message


def test_module_matches_timm_mixed_conv2d():
    """MixConv with timm's equal split computes what timm's MixedConv2d does with the same tensors,
    paired in order ({i}.weight -> convs.{i}.weight)."""
    from timm.layers.mixed_conv2d import MixedConv2d
    for depthwise, (cin, cout, kernels, stride) in [(True, (36, 36, [3, 5, 7], 2)), (False, (20, 30, [1, 1], 1))]:
        theirs = MixedConv2d(cin, cout, kernels, stride=stride, depthwise=depthwise).eval()
        ours = MixConv(list(split_channels(cin, len(kernels))), list(split_channels(cout, len(kernels))), kernels,
                       stride, depthwise).eval()
        ours.load_state_dict({f"convs.{k}": v for k, v in theirs.state_dict().items()})
        x = torch.randn(2, cin, 9, 9, generator=gen(1))
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x))


# ---- supernet, derivation, printing ------------------------------------------------------------
def test_supernet_trains(tiny):
    model = build_supernet(tiny).train()
    x = torch.randn(4, 3, 16, 16, generator=gen(2))
    loss = model(x).logsumexp(1).mean() + model.gate_set.penalty()
    loss.backward()
    grads = [m.convs[0].weight.grad for m in model.modules() if isinstance(m, MixConv)]
    assert len(grads) == len(mixconvs(tiny)) and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(g.s.grad is not None for g in model.gate_set.gates)


@pytest.mark.parametrize("density", ["0.9", "0.5", "0.1", "mixed"])
def test_derived_equals_masked(tiny, density):
    masks, strength = random_masks(tiny, density, seed=11)
    d = derive(tiny, masks, strength)
    torch.manual_seed(0)
    assert_equivalent(d, build_supernet(tiny).eval())
    assert accounting.network_cost(d.network).params == sum(
        p.numel() for p in NasNet(d.network.to_config()).parameters())


def closing(net, closed: dict[str, list[int]]):
    masks = {g.key: torch.ones(g.channels, dtype=torch.bool) for g in net.gates()}
    for key, channels in closed.items():
        masks[key][channels] = False
    return masks


def test_a_closed_kernel_group_vanishes(tiny):
    """Layer b's mid gate closes the whole 5x5 group (channels 12-23) and some of the others: the
    slim depthwise stage keeps kernels 3 and 7 with their kept channels, and the split projection
    keeps both groups (each still reads a live mid channel)."""
    masks = closing(tiny, {"b.mid": [*range(12, 24), 0, 1, 30]})
    d = derive(tiny, masks)
    torch.manual_seed(0)
    assert_equivalent(d, build_supernet(tiny).eval())
    b = next(layer for layer in d.network.layers if layer.name == "b").blocks[0]
    dw, proj = [op for op in b.ops if op.kind == "mixconv"][1:]
    assert (dw.attrs["kernels"], dw.attrs["in_splits"]) == ((3, 7), (10, 11))
    assert (proj.attrs["in_splits"], proj.attrs["out_splits"]) == ((10, 11), (6, 6))


def test_a_projection_group_cut_off_from_its_inputs_closes(tiny):
    """Layer c's mid gate closes the projection's whole first input group (mid channels 0-17): that
    group's outputs could hold only the BN's offset, so their out gate closes (the effective masks)
    and the slim projection is one group of 18 inputs and 8 outputs."""
    masks = closing(tiny, {"c.mid": list(range(18))})
    d = derive(tiny, masks)
    assert not d.masks["c.out"][:8].any() and d.masks["c.out"][8:].all()
    torch.manual_seed(0)
    assert_equivalent(d, build_supernet(tiny).eval())
    c = next(layer for layer in d.network.layers if layer.name == "c")
    proj = [op for op in c.blocks[0].ops if op.kind == "mixconv"][-1]
    assert (proj.attrs["in_splits"], proj.attrs["out_splits"]) == ((18,), (8,)) and c.width == 8


def test_a_lone_layer_keeps_a_reachable_channel():
    """Every gate of a layer without a residual closed, and the strongest output channel in the
    projection group the reopened mid channel does not reach: the repair keeps one it reaches."""
    net = compile_source("space t(input=3, resolution=8, classes=5)\n"
                         "layer stem [gate=off] = conv(8) > bn > relu\n"
                         "layer a = mbconv(8, k=[3, 5], e=2, stride=2, project_split=2)\n"
                         "layer classifier = gap > linear(classes)\n", "t.space")
    masks = closing(net, {"a.mid": list(range(16)), "a.out": list(range(8))})
    strength = {"a.mid": torch.arange(16.0), "a.out": -torch.arange(8.0)}   # mid 15 (group 1), out 0 (group 0)
    d = derive(net, masks, strength)
    assert d.masks["a.mid"].nonzero().flatten().tolist() == [15]
    assert d.masks["a.out"].nonzero().flatten().tolist() == [4]
    torch.manual_seed(0)
    assert_equivalent(d, build_supernet(net).eval())


def test_derived_prints_and_compiles_back(tiny):
    masks, strength = random_masks(tiny, "0.5", seed=12)
    masks["b.mid"][12:24] = False
    d = derive(tiny, masks, strength)
    text = to_space(d.network)
    assert "mixconv(k=[3, 7], split=" in text and "depthwise=on" in text
    again = compile_source(text, "again.space")
    assert again.to_config() == d.network.to_config()
    full = to_space(tiny)   # undecided widths print in the readable forms
    assert "dwconv(k=[3, 5, 7])" in full and "conv(36, k=1, split=2)" in full and "mixconv" not in full


# ---- export --------------------------------------------------------------------------------------
def test_export_of_a_derived_mixnet_equals_the_slim_network(tiny, tmp_path):
    import warnings

    import nasdsl
    from nasdsl.export.exporter import export_model
    from nasdsl.train.data import Preprocessing
    masks, strength = random_masks(tiny, "0.5", seed=13)
    masks["b.mid"][12:24] = False
    d = derive(tiny, masks, strength)
    torch.manual_seed(0)
    slim = slim_and_masked(d, build_supernet(tiny).eval(), seed=3)
    prep = Preprocessing((3, 16, 16), (0.5,) * 3, (0.25,) * 3)
    folder = export_model(d.network, slim.state_dict(), tmp_path / "mix", "nasdsl_tiny_mixnet", preprocessing=prep,
                          space_text=to_space(d.network))
    code = (folder / "nasdsl_tiny_mixnet.py").read_text()
    assert "class MixConv(nn.Module):" in code and "self.conv_dw = MixConv(" in code and "conv_pwl" in code
    model = nasdsl.load(folder)
    x = torch.randn(2, 3, 16, 16, generator=gen(4))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = slim(x)
        for got in (model(x), torch.jit.script(model)(x), torch.fx.symbolic_trace(model)(x)):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(ref.abs().max())))


# ---- the shipped mixnet_s --------------------------------------------------------------------------
def test_mixnet_s_has_timms_params():
    import timm
    net = compile_file(ROOT / "spaces" / "mixnet_s.space")
    with torch.device("meta"):
        ref = timm.create_model("mixnet_s", pretrained=False)
    assert accounting.network_cost(net).params == sum(p.numel() for p in ref.parameters()) == 4_134_606


def test_mixnet_s_computes_timms_logits():
    """timm's (random) tensors, copied in order into the space's NasNet (conv, BN, SE, mixed conv
    groups and classifier in the same order), give timm's eval-mode logits, with random BN
    statistics so every BN matters."""
    import timm
    ref = timm.create_model("mixnet_s", pretrained=False).eval()
    g = gen(41)
    distinct_bn(ref, g)
    ours = NasNet(compile_file(ROOT / "spaces" / "mixnet_s.space", {"resolution": "32"}).to_config()).eval()
    tensors = lambda m: [(k, v) for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")]  # noqa: E731
    pairs = list(zip(tensors(ref), tensors(ours)))
    assert len(tensors(ref)) == len(tensors(ours)) and all(a.shape == b.shape for (_, a), (_, b) in pairs)
    ours.load_state_dict({k: v for (_, v), (k, _) in pairs}, strict=False)
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(expected.abs().max())))
