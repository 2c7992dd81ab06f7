"""Every construct of the .space language, compiled and inspected on the graph IR."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from nasdsl.errors import NasdslError
from nasdsl.graph.accounting import block_cost, layer_cost, log10_space_size, network_cost, summary
from nasdsl.graph.ir import Shape
from nasdsl.language.compiler import compile_file, compile_source

ROOT = Path(__file__).resolve().parent.parent
SPACES = ROOT / "spaces"
HEAD = "space t(input=3, resolution=8, classes=10)\n"
TAIL = "\nlayer classifier = gap > linear(10)\n"


def net(body: str = "", head: str = HEAD, tail: str = TAIL, **overrides):
    return compile_source(head + body + tail, "t.space", {k: str(v) for k, v in overrides.items()})


def value(expr: str, prelude: str = ""):
    """The value of an expression, read back from the network's resolved parameters."""
    return net(f"{prelude}\nparam v = {expr}\n").params["v"]


def layer(network, name):
    return next(lay for lay in network.layers if lay.name == name)


def kinds(block):
    return [op.kind for op in block.ops]


def gate_keys(network):
    return [g.key for g in network.gates()]


# ---- header ------------------------------------------------------------------------------------
def test_header_defaults():
    n = compile_source("space tiny()\nlayer c = gap > linear(1000)\n", "t.space")
    assert n.name == "tiny"
    assert n.input_shape == Shape(3, (224, 224))
    assert n.num_classes == 1000
    assert n.params == {"input": 3, "resolution": 224, "classes": 1000}


def test_header_fields():
    n = compile_source("space x(input=1, resolution=28, classes=7)\nlayer c = gap > linear(classes)\n", "x")
    assert n.input_shape == Shape(1, (28, 28))
    assert n.num_classes == 7
    assert n.layers[-1].out_shape == Shape(7)


def test_header_fields_are_values():
    n = net("layer a = conv(input * 2) > bn > relu > avgpool(k=resolution)")
    assert layer(n, "a").out_shape == Shape(6, (1, 1))


def test_header_accepts_expressions_and_integral_floats():
    n = compile_source("space x(resolution=2 ** 4, classes=5.0)\nlayer c = gap > linear(classes)\n", "x")
    assert n.input_shape.size == (16, 16) and n.num_classes == 5


# ---- param, let, value functions -------------------------------------------------------------------
def test_param_and_let():
    n = net("param width = 2\nlet c = 4 * width\nlayer a = conv(c)")
    assert n.params["width"] == 2 and n.params["c"] == 8
    assert layer(n, "a").out_shape == Shape(8, (8, 8))


def test_param_may_hold_a_word_or_a_list():
    n = net("param act = hswish\nparam ks = [3, 5]\nlayer a = mbconv(3, k=k, act=act) for k in ks")
    assert [b.args["act"] for b in layer(n, "a").blocks] == ["hswish", "hswish"]
    assert [b.args["k"] for b in layer(n, "a").blocks] == [3, 5]


def test_value_function():
    n = net("param width = 0.5\nlet ch(c) = make_divisible(c * width, 8)\nlayer a = conv(ch(64))")
    assert layer(n, "a").width == 32


def test_value_function_several_and_keyword_arguments():
    assert value("f(1, 2) + f(b=10, a=20)", "let f(a, b) = a * 100 + b") == 102 + 2010


def test_value_function_without_arguments():
    assert value("f() + 1", "let f() = 41") == 42


def test_value_function_sees_later_params():
    # functions are evaluated when called, in the file's scope
    assert value("f(1)", "let f(x) = x + late\nparam late = 5") == 6


def test_value_function_may_call_another():
    assert value("g(3)", "let f(x) = x * x\nlet g(x) = f(x) + f(2)") == 13


# ---- arithmetic --------------------------------------------------------------------------------
@pytest.mark.parametrize("expr, expected", [
    ("1 + 2 * 3", 7),
    ("(1 + 2) * 3", 9),
    ("8 - 3 - 2", 3),
    ("7 / 2", 3.5),
    ("7 // 2", 3),
    ("-7 // 2", -4),
    ("7 % 3", 1),
    ("7.5 % 2", 1.5),
    ("2 ** 3", 8),
    ("2 ** 3 ** 2", 512),          # right associative
    ("2 ** -1", 0.5),
    ("-2 ** 2", -4),               # unary minus binds looser than **, as in Python
    ("-(3)", -3),
    ("- -3", 3),
    ("+3", 3),
    ("3 - -3", 6),
    ("1e3", 1000.0),
    (".5 + 1.", 1.5),
    ("[1, 2, 3]", (1, 2, 3)),
    ("(1, 2)", (1, 2)),
    ("[]", ()),
    ("[1, [2, 3],]", (1, (2, 3), )),
])
def test_arithmetic(expr, expected):
    got = value(expr)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("expr, expected", [
    ("make_divisible(37)", 40),
    ("make_divisible(37, 8)", 40),
    ("make_divisible(10, 8)", 16),      # never more than 10% below: 8 < 0.9 * 10
    ("make_divisible(3, 8)", 8),
    ("make_divisible(30, 16)", 32),
    ("make_divisible(32 * 0.5, 8)", 16),
    ("round(2.5)", 2),
    ("round(3.7)", 4),
    ("round(3.14159, 2)", 3.14),
    ("int(3.9)", 3),
    ("int(-3.9)", -3),
    ("float(3)", 3.0),
    ("min(3, 1, 2)", 1),
    ("max(3, 1, 2)", 3),
    ("max([4, 9])", 9),
    ("min(range(5, 9))", 5),
    ("floor(2.5)", 2),
    ("ceil(2.5)", 3),
    ("range(3)", (0, 1, 2)),
    ("range(1, 10, 4)", (1, 5, 9)),
    ("range(3, 0, -1)", (3, 2, 1)),
])
def test_functions(expr, expected):
    got = value(expr)
    assert got == expected and type(got) is type(expected)


def test_functions_can_be_shadowed_by_a_let():
    assert value("round(7)", "let round(x) = x * 2") == 14


# ---- ops and chains ----------------------------------------------------------------------------
def test_chain():
    a = layer(net("layer a = conv(8) > bn > relu"), "a")
    (block,) = a.blocks
    assert block.name == "a" and block.kind == "chain"
    assert block.label == "conv 8 k3 > bn > relu"
    assert kinds(block) == ["conv", "bn", "gate", "act"]
    conv = block.ops[0]
    assert conv.attrs == {"out": 8, "k": 3, "stride": 1, "groups": 1, "padding": 1, "bias": False}
    assert conv.in_shape == Shape(3, (8, 8)) and conv.out_shape == Shape(8, (8, 8))


def test_single_op_block_kind_is_the_op():
    assert layer(net("layer a = conv(8)"), "a").blocks[0].kind == "conv"


def test_call_without_parentheses_and_defaults():
    block = layer(net("layer a = conv(4, k=1, stride=2, padding=0, bias=on) > relu6 > dwconv > bn"), "a").blocks[0]
    conv, act, dw, bn = block.ops[:4]
    assert conv.attrs["bias"] is True and conv.out_shape == Shape(4, (4, 4))
    assert act.attrs == {"fn": "relu6"}
    assert dw.attrs["groups"] == 4 and dw.attrs["k"] == 3 and dw.out_shape == Shape(4, (4, 4))
    assert bn.attrs == {"eps": 1e-5, "momentum": 0.1}


def test_positional_and_keyword_arguments():
    a = layer(net("layer a = conv(8, 5, 2)"), "a").blocks[0].ops[0]
    b = layer(net("layer a = conv(k=5, out=8, stride=2)"), "a").blocks[0].ops[0]
    assert a.attrs == b.attrs and a.attrs["k"] == 5 and a.attrs["stride"] == 2 and a.attrs["padding"] == 2


def test_pooling_and_flat_ops():
    n = net("layer p = maxpool > avgpool(k=3, stride=1, padding=1)",
            tail="\nlayer c = flatten > dropout(0.2) > linear(10, bias=off)\n")
    assert layer(n, "p").out_shape == Shape(3, (4, 4))       # maxpool: stride defaults to k
    c = layer(n, "c").blocks[0]
    assert kinds(c) == ["flatten", "dropout", "linear"]
    assert c.ops[0].out_shape == Shape(48) and c.ops[1].attrs == {"p": 0.2}
    assert c.ops[2].attrs == {"out": 10, "bias": False}


def test_activations():
    block = layer(net("layer a = relu > relu6 > hswish > identity"), "a").blocks[0]
    assert [op.attrs["fn"] for op in block.ops] == ["relu", "relu6", "hswish", "identity"]


def test_comments_and_free_layout():
    src = ("# a comment line\nspace   t ( input = 3 ,resolution=8, classes=10 ) # trailing\n"
           "layer\n  a =\n  conv(8)   # after an op\n  > relu\nlayer c = gap\n > linear(10,)  # end\n# last")
    n = compile_source(src, "t.space")
    assert [lay.name for lay in n.layers] == ["a", "c"]


def test_unnamed_layers_are_numbered():
    n = net("layer = conv(8)\nlayer = relu", tail="\nlayer = gap > linear(10)\n")
    assert [lay.name for lay in n.layers] == ["layer0", "layer1", "layer2"]


# ---- parallel blocks and comprehensions --------------------------------------------------------
def test_parallel_blocks():
    a = layer(net("layer a = conv(8, k=3) | conv(8, k=5) > bn"), "a")
    assert [b.name for b in a.blocks] == ["a.b0", "a.b1"]
    assert [b.label for b in a.blocks] == ["conv 8 k3", "conv 8 k5 > bn"]
    assert all(b.in_shape == a.in_shape for b in a.blocks)
    assert a.out_shape == Shape(8, (8, 8))


def test_comprehension_order():
    a = layer(net("layer a = mbconv(3, k=k, e=e) for k in [3, 5, 7] for e in [3, 6]"), "a")
    assert [(b.args["k"], b.args["e"]) for b in a.blocks] == [(3, 3), (3, 6), (5, 3), (5, 6), (7, 3), (7, 6)]
    assert [b.name for b in a.blocks] == [f"a.b{i}" for i in range(6)]


def test_comprehension_over_range_and_dependent_lists():
    a = layer(net("layer a = conv(8, k=k) for i in range(2) for k in [2 * i + 1]"), "a")
    assert [b.ops[0].attrs["k"] for b in a.blocks] == [1, 3]


def test_comprehension_and_plain_alternative():
    a = layer(net("layer a = conv(8, k=1) | conv(8, k=k) for k in [3, 5]"), "a")
    assert [b.ops[0].attrs["k"] for b in a.blocks] == [1, 3, 5]


def test_loop_variable_shadows_a_param_locally():
    n = net("param k = 7\nlayer a = conv(8, k=k) for k in [1]\nlayer b = conv(8, k=k)")
    assert layer(n, "a").blocks[0].ops[0].attrs["k"] == 1
    assert layer(n, "b").blocks[0].ops[0].attrs["k"] == 7


# ---- defs ----------------------------------------------------------------------------------------
def test_def_positional_and_keyword():
    n = net("def cbr(c, k) = conv(c, k=k) > bn > relu\nlayer a = cbr(8, 3)\nlayer b = cbr(k=1, c=16)")
    assert layer(n, "a").blocks[0].label == "conv 8 k3 > bn > relu"
    assert layer(n, "b").blocks[0].label == "conv 16 k1 > bn > relu"


def test_def_in_a_chain_is_inlined():
    n = net("def cb(c) = conv(c) > bn\nlayer a = cb(8) > relu > cb(4)")
    block = layer(n, "a").blocks[0]
    assert kinds(block) == ["conv", "bn", "gate", "act", "conv", "bn", "gate"]
    assert gate_keys(n) == ["a.bn", "a.bn2"]


def test_nested_defs_and_def_with_parallel_blocks():
    n = net("def one(c, k) = conv(c, k=k) > bn\ndef all(c) = one(c, k) for k in [1, 3]\n"
            "def both(c) = all(c) | conv(c, k=5)\nlayer a = both(8)")
    assert [b.label for b in layer(n, "a").blocks] == ["conv 8 k1 > bn", "conv 8 k3 > bn", "conv 8 k5"]


def test_def_sees_params_not_the_callers_loop_variables():
    src = "param k = 5\ndef f(c) = conv(c, k=k)\nlayer a = f(8) for k in [1, 3]"
    assert [b.ops[0].attrs["k"] for b in layer(net(src), "a").blocks] == [5, 5]


def test_def_arguments_are_evaluated_in_the_callers_scope():
    src = "def f(c, k) = conv(c, k=k)\nlayer a = f(8, k) for k in [1, 3]"
    assert [b.ops[0].attrs["k"] for b in layer(net(src), "a").blocks] == [1, 3]


def test_def_defined_after_use():
    assert layer(net("layer a = f(8)\ndef f(c) = conv(c)"), "a").width == 8


# ---- stages --------------------------------------------------------------------------------------
def test_stage_repeat_and_naming():
    n = net("stage s1 [repeat=3] { layer = conv(8) }")
    assert [lay.name for lay in n.layers[:-1]] == ["s1.0", "s1.1", "s1.2"]
    assert n.layers[0].blocks[0].name == "s1.0"


def test_stage_stride_goes_to_the_first_layer_only():
    n = net("stage s [repeat=2, stride=2] { layer = conv(8) > bn > relu }")
    assert [lay.blocks[0].ops[0].attrs["stride"] for lay in n.layers[:2]] == [2, 1]
    assert [lay.out_shape for lay in n.layers[:2]] == [Shape(8, (4, 4))] * 2


def test_stage_stride_goes_to_the_first_strided_op_of_each_block():
    n = net("stage s [stride=2] { layer = relu > conv(8) > conv(8) | maxpool(k=1) > conv(8, k=1) }")
    b0, b1 = n.layers[0].blocks
    assert [op.attrs.get("stride") for op in b0.ops] == [None, 2, 1]
    assert [op.attrs.get("stride") for op in b1.ops] == [2, 1]
    assert n.layers[0].out_shape == Shape(8, (4, 4))


def test_stage_stride_overrides_the_ops_stride():
    n = net("stage s [stride=2] { layer = conv(8, stride=1) }")
    assert n.layers[0].blocks[0].ops[0].attrs["stride"] == 2


def test_stage_stride_goes_into_composites_and_defs():
    n = net("def f(c) = mbconv(c, k=k) for k in [3, 5]\nstage s [repeat=2, stride=2] { layer = f(8) }")
    assert [[b.args["stride"] for b in lay.blocks] for lay in n.layers[:2]] == [[2, 2], [1, 1]]
    assert n.layers[0].shortcut is None and n.layers[1].shortcut is not None


def test_stage_with_several_layers():
    n = net("stage s [repeat=2, stride=2] { layer = conv(8) layer = conv(16) }")
    assert [lay.name for lay in n.layers[:-1]] == ["s.0.0", "s.0.1", "s.1.0", "s.1.1"]
    assert [lay.blocks[0].ops[0].attrs["stride"] for lay in n.layers[:-1]] == [2, 1, 1, 1]


def test_stage_with_named_layers():
    n = net("stage s [repeat=2] { layer expand = conv(8) layer project = conv(4) }")
    assert [lay.name for lay in n.layers[:-1]] == ["s.0.expand", "s.0.project", "s.1.expand", "s.1.project"]
    n = net("stage s { layer only = conv(8) }")
    assert n.layers[0].name == "s.0.only"


def test_stage_repeat_from_a_param():
    n = net("param depth = 3\nstage s [repeat=depth] { layer = relu }", depth=1)
    assert [lay.name for lay in n.layers[:-1]] == ["s.0"]


# ---- layer options -------------------------------------------------------------------------------
def test_layer_gate_off():
    n = net("layer a [gate=off] = conv(8) > bn > relu\nlayer b = mbconv(8) | mbconv(8, k=5)")
    assert kinds(layer(n, "a").blocks[0]) == ["conv", "bn", "act"]
    assert gate_keys(n) == ["b.b0.mid", "b.b0.out", "b.b1.mid", "b.b1.out"]


@pytest.mark.parametrize("word, gated", [("on", True), ("true", True), ("off", False), ("false", False)])
def test_gate_words(word, gated):
    n = net(f"layer a [gate={word}] = conv(8) > bn")
    assert bool(n.gates()) is gated


def test_residual_auto_on_off():
    n = net("layer a = conv(3) > bn\nlayer b [residual=on] = conv(3) > bn\nlayer c [residual=auto] = conv(3)\n"
            "layer m = mbconv(3)\nlayer m2 [residual=off] = mbconv(3)")
    assert layer(n, "a").shortcut is None          # auto: only MBConv layers get one by themselves
    assert layer(n, "b").shortcut is not None and layer(n, "b").shortcut.ops == ()
    assert layer(n, "c").shortcut is None
    assert layer(n, "m").shortcut is not None
    assert layer(n, "m2").shortcut is None


def test_residual_off_removes_a_resnet_shortcut():
    n = net("layer a [residual=off] = basic(3)")
    assert layer(n, "a").shortcut is None and kinds(layer(n, "a").blocks[0])[-1] == "gate"


def test_layer_options_combined():
    n = net("layer a [gate=off, residual=on] = conv(3) > bn")
    assert layer(n, "a").shortcut is not None and not n.gates()


def test_op_level_gate_off():
    n = net("layer a = conv(8) > bn(gate=off) > relu > conv(8) > bn\nlayer b = mbconv(8, gate=off) | mbconv(8)")
    assert gate_keys(n) == ["a.bn", "b.b1.mid", "b.b1.out"]


def test_op_level_gate_on_does_not_override_layer_off():
    assert not net("layer a [gate=off] = conv(8) > bn(gate=on)").gates()


# ---- gate placement ------------------------------------------------------------------------------
def test_gates_sit_after_bn_before_the_activation():
    block = layer(net("layer a = conv(8) > bn > relu"), "a").blocks[0]
    bn, gate, act = block.ops[1:]
    assert (bn.kind, gate.kind, act.kind) == ("bn", "gate", "act")
    assert gate.attrs == {"key": "a.bn"} and gate.in_shape == gate.out_shape == Shape(8, (8, 8))


def test_mbconv_gates_mid_and_out_not_the_expansion():
    n = net("layer a = mbconv(16, e=4)")
    block = layer(n, "a").blocks[0]
    assert kinds(block) == ["conv", "bn", "act", "conv", "bn", "gate", "act", "conv", "bn", "gate"]
    gates = n.gates()
    assert [(g.key, g.channels, g.layer, g.block) for g in gates] == [("a.mid", 12, "a", "a"), ("a.out", 16, "a", "a")]


def test_no_gates_on_shortcuts_or_the_classifier():
    n = net("layer a = basic(8, stride=2, shortcut=proj)\nlayer b = bottleneck(32, shortcut=proj)")
    for lay in n.layers:
        if lay.shortcut:
            assert not any(op.is_gate for op in lay.shortcut.ops)
    assert not any(op.is_gate for op in layer(n, "classifier").all_ops())
    assert gate_keys(n) == ["a.bn1", "a.bn2", "b.bn1", "b.bn2", "b.bn3"]


def test_gate_keys_are_unique_across_the_network():
    n = compile_file(SPACES / "proxyless.space")
    keys = gate_keys(n)
    assert len(keys) == len(set(keys)) == 255
    assert "s1.0.b0.mid" in keys and "s1.0.b5.out" in keys and "first.mid" in keys
    assert not any(k.startswith(("stem.", "classifier.")) for k in keys)


def test_explicit_gate_op():
    n = net("layer a = conv(8) > gate > relu\nlayer b [gate=off] = conv(8) > gate")
    assert gate_keys(n) == ["a.gate"]


# ---- composites ----------------------------------------------------------------------------------
def test_mbconv_structure():
    block = layer(net("layer a = mbconv(8, k=5, e=6, stride=2, act=hswish)"), "a").blocks[0]
    expand, dw, project = (op for op in block.ops if op.kind == "conv")
    assert (expand.attrs["k"], expand.out_shape) == (1, Shape(18, (8, 8)))
    assert (dw.attrs["k"], dw.attrs["groups"], dw.attrs["stride"], dw.out_shape) == (5, 18, 2, Shape(18, (4, 4)))
    assert (project.attrs["k"], project.out_shape) == (1, Shape(8, (4, 4)))
    assert {op.attrs["fn"] for op in block.ops if op.kind == "act"} == {"hswish"}
    assert block.label == "mbconv 8 k5 e6 s2"


def test_mbconv_expansion_1_has_no_expand_conv():
    block = layer(net("layer a = mbconv(3, e=1)"), "a").blocks[0]
    assert kinds(block) == ["conv", "bn", "gate", "act", "conv", "bn", "gate"]
    assert block.ops[0].attrs["groups"] == 3


def test_mbconv_mid_and_eps():
    block = layer(net("layer a = mbconv(8, mid=5, eps=1e-3)"), "a").blocks[0]
    assert block.ops[0].out_shape.channels == 5
    assert {op.attrs["eps"] for op in block.ops if op.kind == "bn"} == {1e-3}


@pytest.mark.parametrize("body, residual", [
    ("layer a = mbconv(3)", True),
    ("layer a = mbconv(3, stride=2)", False),
    ("layer a = mbconv(8)", False),
    ("layer a = mbconv(3) | mbconv(3, k=5)", True),
    ("layer a = mbconv(3) | conv(3)", False),
])
def test_mbconv_residual(body, residual):
    assert (net(body).layers[0].shortcut is not None) is residual


def test_mbconv_stride_2_on_a_1x1_map_has_no_residual():
    n = net("layer a = mbconv(3, stride=2)", head="space t(input=3, resolution=1, classes=10)\n")
    assert n.layers[0].in_shape == n.layers[0].out_shape and n.layers[0].shortcut is None


def test_basic_block():
    a = layer(net("layer a = basic(3)"), "a")
    assert kinds(a.blocks[0]) == ["conv", "bn", "gate", "act", "conv", "bn", "gate"]
    assert a.shortcut.ops == () and a.shortcut.index is None      # auto: identity
    assert [op.attrs["fn"] for op in a.post] == ["relu"]


@pytest.mark.parametrize("shortcut", ["auto", "proj"])
def test_basic_projection_shortcut(shortcut):
    a = layer(net(f"layer a = basic(8, stride=2, shortcut={shortcut})"), "a")
    conv, bn = a.shortcut.ops
    assert conv.attrs["k"] == 1 and conv.attrs["stride"] == 2 and conv.out_shape == Shape(8, (4, 4))
    assert bn.kind == "bn"


def test_basic_pad_shortcut():
    a = layer(net("layer a = basic(8, stride=2, shortcut=pad)", head="space t(input=4, resolution=8, classes=10)\n"),
              "a")
    (sub,) = a.shortcut.ops
    assert sub.kind == "subsample" and sub.out_shape == Shape(4, (4, 4))
    assert a.shortcut.index == (2, 3, 4, 5)


def test_pad_shortcut_without_change_is_the_identity():
    a = layer(net("layer a = basic(3, shortcut=pad)"), "a")
    assert a.shortcut.ops == () and a.shortcut.index is None


def test_identity_shortcut():
    assert layer(net("layer a = basic(3, shortcut=identity)"), "a").shortcut.ops == ()


def test_bottleneck():
    a = layer(net("layer a = bottleneck(32, stride=2)"), "a")
    convs = [op for op in a.blocks[0].ops if op.kind == "conv"]
    assert [(c.attrs["k"], c.attrs["stride"], c.out_shape.channels) for c in convs] == [(1, 1, 8), (3, 2, 8), (1, 1, 32)]
    assert a.shortcut.ops[0].attrs["stride"] == 2
    assert layer(net("layer a = bottleneck(32, mid=4)"), "a").blocks[0].ops[0].out_shape.channels == 4


# ---- --set overrides -----------------------------------------------------------------------------
def test_set_overrides_a_param():
    src = HEAD + "param width = 1.0\nlayer a = conv(make_divisible(64 * width, 8))" + TAIL
    assert layer(compile_source(src, "t.space"), "a").width == 64
    n = compile_source(src, "t.space", {"width": "0.5"})
    assert layer(n, "a").width == 32 and n.params["width"] == 0.5


def test_set_accepts_expressions_and_words():
    src = HEAD + "param width = 1\nparam act = relu\nlayer a = mbconv(8 * width, act=act)" + TAIL
    n = compile_source(src, "t.space", {"width": "2 ** 2 / 2", "act": "hswish"})
    assert layer(n, "a").width == 16 and layer(n, "a").blocks[0].args["act"] == "hswish"


def test_set_overrides_header_fields():
    n = net("layer a = conv(8)", resolution=32, input=1)
    assert n.input_shape == Shape(1, (32, 32))
    n = compile_source("space t(classes=10)\nlayer c = gap > linear(classes)\n", "t", {"classes": "3"})
    assert n.num_classes == 3 and n.layers[-1].out_shape == Shape(3)


def test_set_feeds_lets():
    n = net("param width = 1\nlet c = 8 * width\nlayer a = conv(c)", width=3)
    assert n.params["c"] == 24 and layer(n, "a").width == 24


# ---- shapes on the graph -------------------------------------------------------------------------
def test_graph_nodes_and_edges_carry_shapes():
    n = compile_source("space t(input=8, resolution=4, classes=10)\n"
                       "layer a = mbconv(8, e=2) | mbconv(8, k=5, e=2)\n"
                       "layer b = conv(16, stride=2) > bn > relu\n"
                       "layer c = gap > linear(10)\n", "t.space")
    g = n.graph
    assert set(g.nodes) == {"input", "a.b0", "a.b1", "a:sum", "b", "c"}
    assert g.nodes["input"]["out_shape"] == Shape(8, (4, 4))
    assert g.nodes["a.b1"]["gates"] == ["a.b1.mid", "a.b1.out"]
    assert g.nodes["b"]["in_shape"] == Shape(8, (4, 4)) and g.nodes["b"]["out_shape"] == Shape(16, (2, 2))
    assert g.nodes["c"]["out_shape"] == Shape(10)
    assert g.edges["input", "a:sum"]["residual"] is True
    assert g.edges["a.b0", "a:sum"]["shape"] == Shape(8, (4, 4))
    assert g.edges["a:sum", "b"]["shape"] == Shape(8, (4, 4))
    assert g.edges["b", "c"]["shape"] == Shape(16, (2, 2))
    assert set(g.edges) == {("input", "a.b0"), ("input", "a.b1"), ("input", "a:sum"), ("a.b0", "a:sum"),
                            ("a.b1", "a:sum"), ("a:sum", "b"), ("b", "c")}


def test_every_op_chains_its_shapes():
    n = compile_file(SPACES / "proxyless.space")
    prev = n.input_shape
    for lay in n.layers:
        assert lay.in_shape == prev
        for block in lay.blocks:
            shape = lay.in_shape
            for op in block.ops:
                assert op.in_shape == shape
                shape = op.out_shape
            assert shape == block.out_shape == lay.out_shape
        prev = lay.out_shape
    assert prev == Shape(1000)


# ---- accounting, computed by hand ----------------------------------------------------------------
def test_accounting_conv_bn_linear():
    n = net("layer a = conv(4, k=3) > bn > relu")
    a, c = n.layers
    # conv 3->4 3x3 on 8x8: 4*3*9 weights, 4*(8*8)*3*9 MACs; BN 2*4; gate 4 channels
    assert layer_cost(a).params == 108 + 8 and layer_cost(a).flops == 6912
    # linear 4->10 with bias
    assert layer_cost(c).params == 50 and layer_cost(c).flops == 40
    total = network_cost(n)
    assert (total.params, total.flops) == (166, 6952)
    s = summary(n)
    assert (s["params"], s["flops"], s["gates"]) == (166, 6952, 4)
    assert s["log10_space_size"] == pytest.approx(4 * math.log10(2))


def test_accounting_mbconv():
    n = compile_source("space t(input=8, resolution=4, classes=10)\nlayer a = mbconv(8, k=3, e=2)\n"
                       "layer c = gap > linear(10, bias=off)\n", "t.space")
    a = n.layers[0]
    # expand 1x1 8->16: 128 w, 16*16*8 MACs; BN 32; dw 3x3 16: 144 w, 16*16*9 MACs; BN 32;
    # project 1x1 16->8: 128 w, 8*16*16 MACs; BN 16
    assert block_cost(a.blocks[0]).params == 128 + 32 + 144 + 32 + 128 + 16
    assert block_cost(a.blocks[0]).flops == 2048 + 2304 + 2048
    assert layer_cost(a) == block_cost(a.blocks[0])     # the identity shortcut is free
    assert network_cost(n).params == 480 + 80 and network_cost(n).flops == 6400 + 80
    assert sum(g.channels for g in n.gates()) == 16 + 8


def test_accounting_parallel_blocks_and_shortcut():
    n = compile_source("space t(input=4, resolution=8, classes=10)\nlayer a = basic(8, stride=2, shortcut=proj)\n"
                       "layer c = gap > linear(10)\n", "t.space")
    a = n.layers[0]
    # 3x3 s2 4->8 at 4x4: 288 w, 8*16*4*9 MACs; BN 16; 3x3 8->8: 576 w, 8*16*8*9 MACs; BN 16
    # shortcut 1x1 s2 4->8: 32 w, 8*16*4 MACs; BN 16
    assert layer_cost(a).params == 288 + 16 + 576 + 16 + 32 + 16
    assert layer_cost(a).flops == 4608 + 9216 + 512
    n2 = net("layer a = conv(8, k=1) | conv(8, k=3)")
    assert layer_cost(n2.layers[0]).params == 8 * 3 + 8 * 3 * 9
    assert layer_cost(n2.layers[0]).flops == 8 * 64 * 3 * (1 + 9)


def test_accounting_grouped_conv_with_bias():
    n = net("layer a = conv(6, k=3, groups=3, bias=on)")
    assert layer_cost(n.layers[0]).params == 6 * 1 * 9 + 6
    assert layer_cost(n.layers[0]).flops == 6 * 64 * 1 * 9


def test_log10_space_size():
    assert log10_space_size(0) == 0
    assert log10_space_size(10) == pytest.approx(3.0103, abs=1e-4)
    s = summary(compile_file(SPACES / "proxyless.space"))
    assert s["gates"] == 60704 and s["log10_space_size"] == pytest.approx(60704 * math.log10(2))


def test_proxyless_totals():
    s = summary(compile_file(SPACES / "proxyless.space"))
    assert (s["params"], s["gates"], s["gate_groups"]) == (16_034_168, 60_704, 255)


# ---- files -----------------------------------------------------------------------------------------
def test_every_shipped_space_compiles():
    paths = sorted(SPACES.glob("*.space"))
    assert paths
    for path in paths:
        compile_file(path)


def test_compile_file_errors_name_the_file(tmp_path):
    with pytest.raises(NasdslError) as exc:
        compile_file(tmp_path / "missing.space")
    assert str(exc.value).startswith(str(tmp_path / "missing.space") + ": cannot read")
