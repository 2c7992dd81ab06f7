"""The op catalogue (nasdsl/graph/ops.py) is the one extension point for an op kind: every entry
answers every question the torch-free stages ask (shape, params, MACs, channel map, slim attrs,
weight slicing, `.space` text, value ranges), a new kind works through the graph, accounting,
printing and derivation by adding an entry (and a builtin to call it from `.space`), and no
other graph, derive or language file compares an op's kind to a string."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from nasdsl.derive.derive import derive
from nasdsl.graph import accounting
from nasdsl.graph.ir import Op, Shape
from nasdsl.graph.ops import ACTIVATIONS, OPS, ChannelMap, OpKind, infer
from nasdsl.graph.printer import to_space
from nasdsl.language.builtins import BUILTINS, Builtin, Parts
from nasdsl.language.compiler import compile_source

ROOT = Path(__file__).resolve().parents[1]
MAP = Shape(4, (6, 6))

# one representative op per kind: (attrs, input shape)
SAMPLES = {
    "conv": ({"out": 8, "k": 3, "stride": 1, "groups": 1, "padding": 1, "bias": True}, MAP),
    "bn": ({"eps": 1e-5, "momentum": 0.1}, MAP),
    "act": ({"fn": "relu"}, MAP),
    "gate": ({"key": "a.gate"}, MAP),
    "dropout": ({"p": 0.5}, Shape(4)),
    "maxpool": ({"k": 2, "stride": 2, "padding": 0}, MAP),
    "avgpool": ({"k": 3, "stride": 1, "padding": 1}, MAP),
    "gap": ({}, MAP),
    "subsample": ({"stride": 2}, MAP),
    "flatten": ({}, MAP),
    "select": ({"index": (2, 0)}, MAP),
    "linear": ({"out": 3, "bias": True}, Shape(4)),
    "mixconv": ({"kernels": (1, 3), "in_splits": (1, 3), "out_splits": (2, 5), "stride": 2, "depthwise": False}, MAP),
    "se": ({"rd": 2, "act": "silu", "fn": "hsigmoid"}, MAP),
}


def sample(kind: str) -> Op:
    attrs, shape = SAMPLES[kind]
    return Op(kind, attrs, shape, infer(kind, attrs, shape))


def test_every_kind_has_a_sample():
    assert set(SAMPLES) == set(OPS), "add a sample for the new op kind"


@pytest.mark.parametrize("kind", sorted(OPS))
def test_every_entry_provides_every_field(kind):
    """Each field of OpKind is set and answers with the type the callers expect."""
    spec = OPS[kind]
    assert spec.name == kind
    for f in dataclasses.fields(OpKind):
        value = getattr(spec, f.name)
        assert value is not None or f.name in ("out_range", "eval_affine", "absorb_affine", "slice_state"), \
            f"{kind} lacks {f.name}"
    op = sample(kind)
    assert spec.merge(op) in (None, "dense", "depthwise", "channelwise")
    assert isinstance(spec.params(op.attrs, op.in_shape, op.out_shape), int)
    assert isinstance(spec.macs(op.attrs, op.in_shape, op.out_shape), int)
    cmap = spec.channels(op)
    assert isinstance(cmap, ChannelMap)
    live = set(range(op.in_shape.channels))
    out = cmap.forward(op, live)
    assert out <= set(range(op.out_shape.channels))
    assert cmap.backward(op, out, live) <= live
    cin, cout = tuple(sorted(live)), tuple(sorted(out))
    if not spec.searchable:  # made by merging a derived network: never slimmed or printed again
        for refused in (lambda: spec.slim_attrs(op, cin, cout), lambda: spec.slice_weights(op),
                        lambda: spec.print(op, False)):
            with pytest.raises(ValueError, match="merged"):
                refused()
    else:
        assert isinstance(spec.slim_attrs(op, cin, cout), dict)
        weights = spec.slice_weights(op)
        assert all(dims and set(dims) <= {"out", "in", None} for dims in weights.values())
        text = spec.print(op, False)
        name = text.split("(")[0]
        assert name in BUILTINS or name in ACTIVATIONS, f"{kind} prints as {text!r}, which no builtin parses"
    assert spec.range_after(op.attrs, "relu") in (None, "relu", *ACTIVATIONS)
    assert isinstance(spec.idle_on(op.attrs, "relu"), bool)
    assert isinstance(spec.allocates(op.attrs), bool)
    for flag in ("keeps_values", "elementwise", "is_gate", "absorbs_gate", "searchable"):
        assert isinstance(getattr(spec, flag), bool)


@pytest.mark.parametrize("fn", ACTIVATIONS)
def test_allocates_agrees_with_the_torch_builder(fn):
    """The torch builder still keeps its own list (nasdsl.supernet.network); until it asks the
    catalogue, the two must agree on which ops give a fresh tensor (in-place activations rely on it)."""
    from nasdsl.supernet import network
    _ALLOCATING = getattr(network, "_ALLOCATING", None)
    if _ALLOCATING is None:
        pytest.skip("the torch builder no longer keeps its own list")
    for kind in OPS:
        attrs = {"fn": fn} if kind == "act" else SAMPLES[kind][0]
        torch_side = kind in _ALLOCATING or (kind == "act" and fn != "identity")
        assert OPS[kind].allocates(attrs) == torch_side, kind


def test_sample_ops_print_and_compile_back():
    """Each kind's text compiles to the same op (gates after a BN stay implicit)."""
    for kind, (attrs, shape) in SAMPLES.items():
        if kind == "gate" or not OPS[kind].searchable:
            continue  # a bare gate is checked through bn's default gate below
        op = sample(kind)
        head = f"space t(input={shape.channels}, resolution={shape.height if not shape.is_flat else 1}, classes=10)\n"
        pre = "layer f = flatten\n" if shape.is_flat else ""
        tail = "gap > linear(10)" if not op.out_shape.is_flat else "linear(10)"
        text = head + pre + f"layer a [gate=off] = {op.spec.print(op, False)}\nlayer c = {tail}\n"
        net = compile_source(text, "t.space")
        got = next(lay for lay in net.layers if lay.name == "a").blocks[0].ops[-1]
        assert (got.kind, got.attrs) == (op.kind, op.attrs)
    net = compile_source("space t(input=3, resolution=8, classes=10)\nlayer a = conv(8) > bn > relu\n"
                         "layer c = gap > linear(10)\n", "t.space")
    assert "bn > relu" in to_space(net) and net.gates()


# ---- a new op kind, registered in the catalogue only ------------------------------------------
@pytest.fixture
def scale_op(monkeypatch):
    """A channelwise learned scale (one weight per channel, one multiply per value): registered in
    OPS and, so that `.space` can call it, as a builtin; both are removed after the test."""
    monkeypatch.setitem(OPS, "scale", OpKind(
        "scale", lambda a, s: s, params=lambda a, i, o: i.channels, macs=lambda a, i, o: o.numel,
        slice_weights=lambda op: {"weight": ("out",)}, keeps_values=False))
    monkeypatch.setitem(BUILTINS, "scale", Builtin("scale", (), lambda lo, a: Parts([lo.op("scale")]),
                                                   doc="a learned scale per channel"))
    yield OPS["scale"]


SCALED = """space t(input=3, resolution=8, classes=10)
layer a = conv(8) > bn > scale > relu > conv(6, k=1) > bn > relu
layer classifier = gap > linear(10)
"""


def test_new_kind_infers_counts_and_prints(scale_op):
    assert infer("scale", {}, MAP) == MAP
    net = compile_source(SCALED, "t.space")
    a = net.layers[0].blocks[0]
    assert [op.kind for op in a.ops][:6] == ["conv", "bn", "gate", "scale", "act", "conv"]
    conv1, conv2 = accounting.op_cost(a.ops[0]), accounting.op_cost(a.ops[5])
    assert accounting.block_cost(a).params == conv1.params + 2 * 8 + 8 + conv2.params + 2 * 6
    assert accounting.block_cost(a).flops == conv1.flops + 8 * 8 * 8 + conv2.flops
    # the scale lies between the gate and the next dense conv: its MACs are the gate's too
    flops = accounting.gate_channel_cost(net, "flops")
    assert flops["a.bn"] * 8 == conv1.flops + 8 * 8 * 8 + conv2.flops
    text = to_space(net)
    assert "bn > scale > relu" in text
    again = compile_source(text, "again.space")
    assert again.to_config() == net.to_config()


def test_new_kind_derives(scale_op):
    """Derivation carries channel sets through it and cuts its weights to the kept channels."""
    net = compile_source(SCALED, "t.space")
    masks = {g.key: torch.ones(g.channels, dtype=torch.bool) for g in net.gates()}
    masks["a.bn"][[1, 5, 6]] = False
    d = derive(net, masks)
    ops = d.network.layers[0].blocks[0].ops
    assert [op.kind for op in ops] == ["conv", "bn", "scale", "act", "conv", "bn", "act"]
    assert ops[2].in_shape.channels == ops[2].out_shape.channels == 5
    plan = d.plans[0]["blocks"][0][2]
    assert (plan.out_index, plan.weights) == ((0, 2, 3, 4, 7), {"weight": ("out",)})
    assert accounting.network_cost(d.network).params == accounting.network_cost(
        compile_source(to_space(d.network), "slim.space")).params


# ---- no kind strings outside the catalogue -----------------------------------------------------
CATALOGUE = {"nasdsl/graph/ops.py", "nasdsl/language/builtins.py"}


def _is_kind(node) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "kind"


def _has_str(node) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_has_str(e) for e in node.elts)
    return False


def kind_comparisons(source: str) -> list[int]:
    """Lines where `<x>.kind` is compared with a string literal (==, !=, in, not in a literal)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_is_kind(s) for s in sides) and any(_has_str(s) for s in sides):
                lines.append(node.lineno)
        elif isinstance(node, ast.Match) and _is_kind(node.subject):
            lines.append(node.lineno)
    return lines


def test_the_checker_sees_kind_comparisons():
    assert kind_comparisons("if op.kind == 'conv': pass\nx = b.kind in ('a', 'b')\n") == [1, 2]
    assert kind_comparisons("x = op.kind in OPS\ny = kind == 'auto'\n") == []


def test_no_kind_strings_outside_the_catalogue():
    found = []
    for folder in ("graph", "derive", "language"):
        for path in sorted((ROOT / "nasdsl" / folder).glob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel not in CATALOGUE:
                found += [f"{rel}:{line}" for line in kind_comparisons(path.read_text())]
    assert not found, f"ask the op catalogue (Op.spec) instead of comparing kinds: {found}"
