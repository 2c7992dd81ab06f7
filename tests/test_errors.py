"""Golden tests of the error messages: `FILE:LINE:COL: message`, the line, a caret under the column;
`nasdsl check` exits 2 on them, never with a traceback, and never imports torch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nasdsl import cli
from nasdsl.errors import NasdslError
from nasdsl.language.compiler import compile_file, compile_source

ROOT = Path(__file__).resolve().parent.parent
H = "space t(input=3, resolution=8, classes=10)\n"
T = "layer c = gap > linear(10)\n"

# (what, source, the exact str(NasdslError))
GOLDEN = [
    ('syntax: missing parenthesis', H + "layer a = conv(8 > bn\n" + T,
     """t.space:2:18: unexpected '>' (expected ')', ',' or an operator)
    layer a = conv(8 > bn
                     ^"""),
    ("syntax: end of file after '>'", H + "layer a = conv(8) >\n# trailing comment\n",
     """t.space:2:20: unexpected end of file (expected a name)
    layer a = conv(8) >
                       ^"""),
    ('syntax: bad character', H + "layer a = conv(8) $ bn\n" + T,
     """t.space:2:19: unexpected character '$'
    layer a = conv(8) $ bn
                      ^"""),
    ('syntax: missing header', "layer a = conv(8)\n",
     """t.space:1:1: unexpected 'layer' (expected 'space')
    layer a = conv(8)
    ^"""),
    ('syntax: empty file', "\n  # nothing\n",
     """t.space:1:1: empty file: a space starts with `space NAME(...)`"""),
    ('syntax: empty stage', H + "stage s { }\n" + T,
     """t.space:2:11: unexpected '}' (expected 'layer')
    stage s { }
              ^"""),
    ("syntax: missing operator", H + "param x = 1 y\n" + T,
     """t.space:2:13: unexpected 'y' (expected a new statement or an operator)
    param x = 1 y
                ^"""),
    ('syntax: two numbers', H + "layer a = conv(8, k=3 5)\n" + T,
     """t.space:2:23: unexpected '5' (expected ')', ',' or an operator)
    layer a = conv(8, k=3 5)
                          ^"""),
    ('syntax: unclosed bracket at end', H + "param x = (3",
     """t.space:2:13: unexpected end of file (expected ')' or ',')
    param x = (3
                ^"""),
    ('syntax: number too large', H + "param x = 1e999\n" + T,
     """t.space:2:11: number too large: 1e999 (the limit is 1e18)
    param x = 1e999
              ^"""),
    ('syntax: integer too large', H + "param x = 12345678901234567890123\n" + T,
     """t.space:2:11: number too large: 12345678901234567... (the limit is 1e18)
    param x = 12345678901234567890123
              ^"""),
    ('syntax: too deeply nested', H + "param x = " + "-" * 150 + "1\n" + T,
     """t.space:2:110: too deeply nested (more than 100 levels)
    ...----------------------------------------------------------------------------------------------------...
                                                         ^"""),
    ('unknown op', H + "layer a = cnv(8)\n" + T,
     """t.space:2:11: unknown op 'cnv' (did you mean 'conv'?)
    layer a = cnv(8)
              ^"""),
    ('unknown op without a close match', H + "layer a = frobnicate(8)\n" + T,
     """t.space:2:11: unknown op 'frobnicate'
    layer a = frobnicate(8)
              ^"""),
    ('unknown op that is a value', H + "let ch(c) = c\nlayer a = ch(8)\n" + T,
     """t.space:3:11: unknown op 'ch' ('ch' is a value, not an op)
    layer a = ch(8)
              ^"""),
    ('unknown argument', H + "layer a = conv(8, strde=2)\n" + T,
     """t.space:2:19: unknown argument 'strde' for conv (did you mean 'stride'?)
    layer a = conv(8, strde=2)
                      ^"""),
    ('unknown argument without a close match', H + "layer a = conv(8, kernel=3)\n" + T,
     """t.space:2:19: unknown argument 'kernel' for conv (conv takes out, k, stride, groups, padding, bias, split)
    layer a = conv(8, kernel=3)
                      ^"""),
    ('unknown argument of a def', H + "def f(c) = conv(c)\nlayer a = f(c=8, k=3)\n" + T,
     """t.space:3:18: unknown argument 'k' for f (f takes c)
    layer a = f(c=8, k=3)
                     ^"""),
    ('unknown function', H + "param x = mx(1, 2)\n" + T,
     """t.space:2:11: unknown function 'mx' (did you mean 'max'?)
    param x = mx(1, 2)
              ^"""),
    ('unknown function that is an op', H + "param x = conv(1)\n" + T,
     """t.space:2:11: unknown function 'conv' ('conv' is an op; ops build layers, functions compute values)
    param x = conv(1)
              ^"""),
    ('unknown header argument', "space t(resolutoin=8)\n" + T,
     """t.space:1:9: unknown header argument 'resolutoin' (did you mean 'resolution'?)
    space t(resolutoin=8)
            ^"""),
    ('unknown layer option', H + "layer a [gates=off] = conv(8)\n" + T,
     """t.space:2:10: unknown argument 'gates' for layer a (did you mean 'gate'?)
    layer a [gates=off] = conv(8)
             ^"""),
    ('unknown stage option', H + "stage s [repeats=2] { layer = conv(8) }\n" + T,
     """t.space:2:10: unknown argument 'repeats' for stage s (did you mean 'repeat'?)
    stage s [repeats=2] { layer = conv(8) }
             ^"""),
    ('unknown activation', H + "layer a = mbconv(8, act=relu5)\n" + T,
     """t.space:2:25: mbconv: act expects one of relu, relu6, hswish, identity, silu, got 'relu5' (did you mean 'relu'?)
    layer a = mbconv(8, act=relu5)
                            ^"""),
    ('unknown shortcut', H + "layer a = basic(8, shortcut=projection)\n" + T,
     """t.space:2:29: basic: shortcut expects one of auto, identity, pad, proj, got 'projection'
    layer a = basic(8, shortcut=projection)
                                ^"""),
    ('arguments to an op that takes none', H + "layer a = relu(1)\n" + T,
     """t.space:2:16: relu takes no arguments
    layer a = relu(1)
                   ^"""),
    ('too many positional arguments', H + "layer a = bn(1, 0.1, on, 4)\n" + T,
     """t.space:2:26: bn takes at most 3 positional arguments, got 4
    layer a = bn(1, 0.1, on, 4)
                             ^"""),
    ('missing argument', H + "layer a = conv()\n" + T,
     """t.space:2:11: conv needs argument 'out'
    layer a = conv()
              ^"""),
    ('missing argument of a def', H + "def f(c, k) = conv(c, k=k)\nlayer a = f(8)\n" + T,
     """t.space:3:11: f needs argument 'k'
    layer a = f(8)
              ^"""),
    ('argument given twice', H + "layer a = conv(8, out=8)\n" + T,
     """t.space:2:19: argument 'out' given twice
    layer a = conv(8, out=8)
                      ^"""),
    ('positional after keyword', H + "layer a = conv(out=8, 3)\n" + T,
     """t.space:2:23: positional argument after a keyword argument
    layer a = conv(out=8, 3)
                          ^"""),
    ('type: a word for a number', H + "layer a = conv(8, k=relu)\n" + T,
     """t.space:2:21: conv: k expects a number, got 'relu'
    layer a = conv(8, k=relu)
                        ^"""),
    ('type: a number for on/off', H + "layer a = conv(8, bias=3)\n" + T,
     """t.space:2:24: conv: bias expects on or off, got 3
    layer a = conv(8, bias=3)
                           ^"""),
    ('type: fractional channels', H + "layer a = conv(8 * 1.5 + 0.5)\n" + T,
     """t.space:2:16: conv: out must be an integer, got 12.5; round it with make_divisible(x, 8) or int(x)
    layer a = conv(8 * 1.5 + 0.5)
                   ^"""),
    ('type: a list for a number', H + "layer a = conv([8, 16])\n" + T,
     """t.space:2:16: conv: out expects a number, got a list
    layer a = conv([8, 16])
                   ^"""),
    ('type: for over a number', H + "layer a = conv(8, k=k) for k in 3\n" + T,
     """t.space:2:33: `for k in` needs a list like [3, 5, 7] or range(n), got 3
    layer a = conv(8, k=k) for k in 3
                                    ^"""),
    ('type: probability', H + "layer a = dropout(1.5)\n" + T,
     """t.space:2:19: dropout: p must be in [0, 1), got 1.5
    layer a = dropout(1.5)
                      ^"""),
    ('type: arithmetic on a list', H + "param x = [1, 2] * 2\n" + T,
     """t.space:2:11: expected a number, got a list
    param x = [1, 2] * 2
              ^"""),
    ('type: a function as a value', H + "param x = max\n" + T,
     """t.space:2:11: 'max' is a function; call it as max(...)
    param x = max
              ^"""),
    ('type: a value as a function', H + "param w = 2\nparam x = w(3)\n" + T,
     """t.space:3:11: 'w' is 2, not a function
    param x = w(3)
              ^"""),
    ('type: header field', "space t(input=3, resolution=7.5)\n" + T,
     """t.space:1:29: resolution must be an integer, got 7.5
    space t(input=3, resolution=7.5)
                                ^"""),
    ('type: arguments to a function that takes none', H + "let f() = 1\nparam x = f(2)\n" + T,
     """t.space:3:11: f() takes no arguments
    param x = f(2)
              ^"""),
    ('type: missing argument of a builtin function', H + "param x = make_divisible()\n" + T,
     """t.space:2:11: make_divisible() missing 1 required positional argument: 'v'
    param x = make_divisible()
              ^"""),
    ('type: bad argument of a builtin function', H + "param x = round(2.5, 0.5)\n" + T,
     """t.space:2:11: round(): ndigits must be an integer between -30 and 30, got 0.5
    param x = round(2.5, 0.5)
              ^"""),
    ('shape: one channel', H + "layer a = conv(1)\n",
     """t.space:2:1: the network must end with 10 class scores (classes=10), but its output is 1 channel at 8x8; end it with gap > linear(classes)
    layer a = conv(1)
    ^"""),
    ('undefined parameter', H + "param width = 1\nlayer a = conv(8 * widht)\n" + T,
     """t.space:3:20: undefined parameter 'widht' (did you mean 'width'?)
    layer a = conv(8 * widht)
                       ^"""),
    ('undefined parameter without a close match', H + "layer a = conv(chanels)\n" + T,
     """t.space:2:16: undefined parameter 'chanels'
    layer a = conv(chanels)
                   ^"""),
    ('undefined parameter in a def', H + "def f(c) = conv(c * w)\nlayer a = f(8)\n" + T,
     """t.space:2:21: undefined parameter 'w'
    def f(c) = conv(c * w)
                        ^"""),
    ('shape: residual of unequal channels', H + "layer a [residual=on] = conv(16)\n" + T,
     """t.space:2:10: residual add of unequal shapes: the layer's input is 3 channels at 8x8, its output 16 channels at 8x8
    layer a [residual=on] = conv(16)
             ^"""),
    ('shape: residual of unequal sizes', H + "layer a [residual=on] = conv(3, stride=2)\n" + T,
     """t.space:2:10: residual add of unequal shapes: the layer's input is 3 channels at 8x8, its output 3 channels at 4x4
    layer a [residual=on] = conv(3, stride=2)
             ^"""),
    ('shape: parallel blocks of unequal widths', H + "layer a = conv(8) | conv(16)\n" + T,
     """t.space:2:21: parallel blocks are summed, so their outputs must match: conv 8 k3 gives 8 channels at 8x8, conv 16 k3 gives 16 channels at 8x8
    layer a = conv(8) | conv(16)
                        ^"""),
    ('shape: map below 1x1', H + "layer a = conv(8, k=3, stride=2, padding=0) > maxpool(k=2) > maxpool(k=2)\n" + T,
     """t.space:2:62: maxpool: pooling with kernel 2, stride 2, padding 0 shrinks a 1x1 map below 1x1
    layer a = conv(8, k=3, stride=2, padding=0) > maxpool(k=2) > maxpool(k=2)
                                                                 ^"""),
    ('shape: stage stride shrinks the map', "space t(input=3, resolution=2, classes=10)\nstage s [stride=2] { layer = maxpool(k=3) }\n" + T,
     """t.space:2:30: maxpool: pooling with kernel 3, stride 2, padding 0 shrinks a 2x2 map below 1x1 (stride=2 comes from stage 's')
    stage s [stride=2] { layer = maxpool(k=3) }
                                 ^"""),
    ('shape: stage stride with no strided op', H + "stage s [stride=2] { layer = relu }\n" + T,
     """t.space:2:30: stage 's' has stride=2, but this block has no op that takes a stride (conv, dwconv, a pooling or a composite block)
    stage s [stride=2] { layer = relu }
                                 ^"""),
    ('shape: zero channels', H + "layer a = conv(0)\n" + T,
     """t.space:2:16: conv: out must be at least 1 channel, got 0
    layer a = conv(0)
                   ^"""),
    ('shape: negative channels', H + "param width = 0.25\nlayer a = conv(make_divisible(8 * width, 8) - 16)\n" + T,
     """t.space:3:16: conv: out must be at least 1 channel, got -8
    layer a = conv(make_divisible(8 * width, 8) - 16)
                   ^"""),
    ('shape: identity shortcut that changes width', H + "layer a = basic(8, shortcut=identity)\n" + T,
     """t.space:2:11: basic: an identity shortcut needs stride 1 and equal channels, got stride 1 and 3 -> 8: use shortcut=pad or proj
    layer a = basic(8, shortcut=identity)
              ^"""),
    ('shape: groups', H + "layer a = conv(8, groups=2)\n" + T,
     """t.space:2:11: conv: groups=2 must divide both input channels (3) and output channels (8)
    layer a = conv(8, groups=2)
              ^"""),
    ('shape: linear on a map', H + "layer a = linear(10)\n",
     """t.space:2:11: linear needs a flat vector, got a 3x8x8 map: add `flatten` or `gap` first
    layer a = linear(10)
              ^"""),
    ('shape: conv on a vector', H + "layer a = gap > conv(8)\n" + T,
     """t.space:2:17: conv needs a feature map, got a flat vector of 3
    layer a = gap > conv(8)
                    ^"""),
    ('shape: output is not the classes', H + "layer a = conv(8)\n",
     """t.space:2:1: the network must end with 10 class scores (classes=10), but its output is 8 channels at 8x8; end it with gap > linear(classes)
    layer a = conv(8)
    ^"""),
    ('shape: output has the wrong number of classes', H + "layer c = gap > linear(100)\n",
     """t.space:2:1: the network must end with 10 class scores (classes=10), but its output is a vector of 100
    layer c = gap > linear(100)
    ^"""),
    ('shape: no layers', H + "param x = 1\n",
     """t.space:1:1: the space has no layers
    space t(input=3, resolution=8, classes=10)
    ^"""),
    ('limit: division by zero', H + "param x = 8 // (2 - 2)\n" + T,
     """t.space:2:11: division by zero
    param x = 8 // (2 - 2)
              ^"""),
    ('limit: division by zero in a function', H + "param x = make_divisible(8, 0)\n" + T,
     """t.space:2:11: make_divisible(): division by zero
    param x = make_divisible(8, 0)
              ^"""),
    ('limit: huge power', H + "param x = 2 ** 99999\n" + T,
     """t.space:2:11: number too large (the limit is 1e18)
    param x = 2 ** 99999
              ^"""),
    ('limit: power tower', H + "param x = 10 ** 10 ** 10\n" + T,
     """t.space:2:11: number too large (the limit is 1e18)
    param x = 10 ** 10 ** 10
              ^"""),
    ('limit: complex number', H + "param x = (-8) ** 0.5\n" + T,
     """t.space:2:11: not a real number (a fractional power of a negative number?)
    param x = (-8) ** 0.5
              ^"""),
    ('limit: huge range', H + "layer a = conv(8, k=k) for k in range(10 ** 9)\n" + T,
     """t.space:2:33: range(): too many values (the limit is 100,000)
    layer a = conv(8, k=k) for k in range(10 ** 9)
                                    ^"""),
    ('limit: too many channels', H + "layer a = conv(10 ** 7)\n" + T,
     """t.space:2:16: conv: out must be at most 1,000,000, got 10000000
    layer a = conv(10 ** 7)
                   ^"""),
    ('limit: huge expansion', H + "layer a = mbconv(8, e=10 ** 9)\n" + T,
     """t.space:2:11: mbconv: 3,000,000,000 channels is more than the limit of 1,000,000
    layer a = mbconv(8, e=10 ** 9)
              ^"""),
    ('limit: network too large', H + "stage s [repeat=30000] { layer = relu }\n" + T,
     """t.space:2:34: the network is too large: more than 20,000 ops after expanding defs, stages and `for`s
    stage s [repeat=30000] { layer = relu }
                                     ^"""),
    ('limit: recursive let', H + "let f(x) = f(x) + 1\nparam y = f(1)\n" + T,
     """t.space:2:12: 'f' calls itself too deeply
    let f(x) = f(x) + 1
               ^"""),
    ('limit: recursive def', H + "def f(c) = f(c) > relu\nlayer a = f(8)\n" + T,
     """t.space:2:12: defs nested too deeply (is 'f' recursive?)
    def f(c) = f(c) > relu
               ^"""),
    ('limit: exponential functions', H + "let f0(x) = x\n" + "".join(f"let f{i}(x) = f{i-1}(x) + f{i-1}(x)\n" for i in range(1, 25)) + "param y = f24(1)\n" + T,
     """t.space:5:13: too many function calls (more than 100,000; exponential recursion?)
    let f3(x) = f2(x) + f2(x)
                ^"""),
    ('duplicate param', H + "param x = 1\nparam x = 2\n" + T,
     """t.space:3:7: 'x' is already defined
    param x = 2
          ^"""),
    ('duplicate header field', H + "param classes = 5\n" + T,
     """t.space:2:7: 'classes' is a header field
    param classes = 5
          ^"""),
    ('duplicate header argument', "space t(input=3, input=1)\n" + T,
     """t.space:1:18: header argument 'input' given twice
    space t(input=3, input=1)
                     ^"""),
    ('duplicate layer', H + "layer a = relu\nlayer a = relu\n" + T,
     """t.space:3:1: layer 'a' is already defined
    layer a = relu
    ^"""),
    ('duplicate block name', H + "layer a = conv(8) > bn | conv(8) > bn\nlayer a.b0 = conv(8) > bn\n" + T,
     """t.space:3:1: layer name 'a.b0' is taken by a block of layer 'a'
    layer a.b0 = conv(8) > bn
    ^"""),
    ('duplicate block name, the other way', H + "layer a.b1 = relu\nlayer a = relu | relu\n" + T,
     """t.space:3:1: layer 'a' names a block 'a.b1', but that name is taken by layer 'a.b1'
    layer a = relu | relu
    ^"""),
    ('layer named input', H + "layer input = relu\n" + T,
     """t.space:2:1: 'input' names the network's input; give the layer another name
    layer input = relu
    ^"""),
    ('duplicate def', H + "def f(c) = conv(c)\ndef f(c) = conv(c)\n" + T,
     """t.space:3:5: 'f' is already defined
    def f(c) = conv(c)
        ^"""),
    ('def named like a builtin', H + "def conv(c) = relu\n" + T,
     """t.space:2:5: 'conv' is a builtin op; give the def another name
    def conv(c) = relu
        ^"""),
    ('def argument named twice', H + "def f(c, c) = conv(c)\n" + T,
     """t.space:2:5: 'f' names its argument 'c' twice
    def f(c, c) = conv(c)
        ^"""),
    ('composite in a chain', H + "layer a = mbconv(8) > relu\n" + T,
     """t.space:2:11: mbconv is a whole block and cannot be chained with other ops; put it in a layer of its own
    layer a = mbconv(8) > relu
              ^"""),
    ('def with parallel blocks in a chain', H + "def f(c) = conv(c) | conv(c)\nlayer a = f(8) > relu\n" + T,
     """t.space:3:11: 'f' has 2 parallel blocks, so it cannot be chained with other ops; put it in a layer of its own
    layer a = f(8) > relu
              ^"""),
    ('empty for', H + "layer a = conv(8) for k in []\n" + T,
     """t.space:2:11: this layer has no blocks (an empty `for` range?)
    layer a = conv(8) for k in []
              ^"""),
    ('caret: tabs', H + "layer a =\tcnv(8)\n" + T,
     """t.space:2:11: unknown op 'cnv' (did you mean 'conv'?)
    layer a = cnv(8)
              ^"""),
    ('caret: CRLF line ends', H.replace("\n", "\r\n") + "layer a = cnv(8)\r\n" + T,
     """t.space:2:11: unknown op 'cnv' (did you mean 'conv'?)
    layer a = cnv(8)
              ^"""),
    ('caret: form feed is not a line break', H + "\f\nlayer a = \fcnv(8)\n" + T,
     """t.space:3:12: unknown op 'cnv' (did you mean 'conv'?)
    layer a =  cnv(8)
               ^"""),
    ('caret: long line', H + "param x = " + " + ".join(["1"] * 60) + " + oops\n" + T,
     """t.space:2:251: undefined parameter 'oops'
    ...1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + oops
                                                                                                       ^"""),

]


@pytest.mark.parametrize("what, source, expected", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_error_message(what, source, expected):
    with pytest.raises(NasdslError) as exc:
        compile_source(source, "t.space")
    assert str(exc.value) == expected
    assert exc.value.exit_code == 2


def test_every_located_error_has_its_caret_under_the_column():
    for _, source, expected in GOLDEN:
        lines = expected.split("\n")
        head = lines[0]
        if len(lines) == 1:
            continue
        line, column = (int(x) for x in head.split(":")[1:3])
        text, caret = lines[1][4:], lines[2][4:]
        assert caret.strip() == "^" and len(lines) == 3
        if not text.startswith("..."):
            src_line = source.split("\n")[line - 1].rstrip("\r")
            assert caret.index("^") == column - 1
            assert src_line[column - 1:].replace("\t", " ").replace("\f", " ").startswith(text[column - 1:].rstrip())


def test_missing_chain_operator():
    with pytest.raises(NasdslError) as exc:
        compile_source(H + "layer a = conv(8) bn\n" + T, "t.space")
    head, line, caret = str(exc.value).split("\n")
    assert head.startswith("t.space:2:19: unexpected 'bn' (expected '>', ") and "'|'" in head
    assert head.endswith(" or a new statement)")
    assert (line, caret) == ("    layer a = conv(8) bn", "                      ^")


def test_error_attributes():
    with pytest.raises(NasdslError) as exc:
        compile_source(H + "layer a = cnv(8)\n" + T, "x.space")
    e = exc.value
    assert (e.file, e.line, e.column, e.where) == ("x.space", 2, 11, "x.space:2:11")
    assert e.message == "unknown op 'cnv' (did you mean 'conv'?)"


def test_error_without_a_location_is_one_line():
    assert str(NasdslError("boom")) == "boom"
    assert str(NasdslError("boom", file="f.space")) == "f.space: boom"
    assert str(NasdslError("boom", file="f", line=9, column=1, source="one line")) == "f:9:1: boom"


# ---- --set ---------------------------------------------------------------------------------------
SET_SRC = H + "param width = 1.0\nparam act = relu\nlet c = 16 * width\nlayer a = conv(c)\n" + T


@pytest.mark.parametrize("overrides, expected", [
    ({"wdth": "0.5"}, "--set wdth=0.5: unknown parameter 'wdth' in t.space (did you mean 'width'?)"),
    ({"zzz": "2"}, "--set zzz=2: unknown parameter 'zzz' in t.space"),
    ({"c": "8"}, "--set c=8: 'c' is a `let`, computed in t.space; only a `param` or input, resolution, classes "
                 "can be set"),
    ({"width": "abc"}, "--set width=abc: expected a number like the default 1.0, got 'abc'"),
    ({"width": "[1, 2]"}, "--set width=[1, 2]: expected a number like the default 1.0, got a list"),
    ({"width": "(1"}, "--set width=(1: not a valid value: unexpected end of file (expected ')' or ',')"),
    ({"width": "1) layer x = relu"}, "--set width=1) layer x = relu: not a valid value: unexpected ')' "
                                        "(expected end of file)"),
    ({"width": "1/0"}, "--set width=1/0: not a valid value: division by zero"),
    ({"width": "1e999"}, "--set width=1e999: not a valid value: number too large: 1e999 (the limit is 1e18)"),
    ({"width": "2**99999"}, "--set width=2**99999: not a valid value: number too large (the limit is 1e18)"),
    ({"resolution": "0"}, "--set resolution=0: expected an integer from 1 to 1,000,000"),
    ({"classes": "2.5"}, "--set classes=2.5: expected an integer from 1 to 1,000,000"),
    ({"input": "rgb"}, "--set input=rgb: expected a number like the default 3, got 'rgb'"),
])
def test_bad_set_is_one_line_naming_the_setting(overrides, expected):
    with pytest.raises(NasdslError) as exc:
        compile_source(SET_SRC, "t.space", overrides)
    assert str(exc.value) == expected
    assert "\n" not in str(exc.value)


def test_set_errors_inside_the_file_still_point_into_the_file():
    # a good --set value can make the file fail: the error is then located in the file
    with pytest.raises(NasdslError) as exc:
        compile_source(SET_SRC, "t.space", {"act": "relu", "width": "-1"})
    assert str(exc.value).startswith("t.space:5:16: conv: out must be at least 1 channel, got -16")


def test_parse_sets():
    assert cli.parse_sets(["width=0.5", " depth = 3 ", "a=b=c"]) == {"width": "0.5", "depth": "3", "a": "b=c"}
    for bad in ["width", "=3", "width=", "  =  "]:
        with pytest.raises(NasdslError) as exc:
            cli.parse_sets([bad])
        assert str(exc.value) == f"--set {bad}: expected NAME=VALUE, like --set width=0.5"


# ---- the CLI -------------------------------------------------------------------------------------
def run_cli(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "nasdsl", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def files(tmp_path):
    good = tmp_path / "good.space"
    good.write_text(H + "param width = 1\nlayer a = conv(8 * width) > bn > relu\n" + T)
    bad = tmp_path / "bad.space"
    bad.write_text(H + "layer a = cnv(8)\n" + T)
    binary = tmp_path / "binary.space"
    binary.write_bytes(bytes(range(256)))
    nul = tmp_path / "nul.space"
    nul.write_bytes(b"space t()\x00\n")
    return {"good": good, "bad": bad, "binary": binary, "nul": nul, "missing": tmp_path / "missing.space",
            "dir": tmp_path}


def test_check_good(files, capsys):
    assert cli.main(["check", str(files["good"])]) == 0
    out, err = capsys.readouterr()
    assert out == f"{files['good']}: ok\n" and err == ""
    assert cli.main(["check", "-q", str(files["good"])]) == 0
    assert capsys.readouterr() == ("", "")


def test_check_bad(files, capsys):
    assert cli.main(["check", str(files["good"]), str(files["bad"])]) == 2
    out, err = capsys.readouterr()
    assert out == f"{files['good']}: ok\n"
    assert err == (f"{files['bad']}:2:11: unknown op 'cnv' (did you mean 'conv'?)\n"
                   "    layer a = cnv(8)\n"
                   "              ^\n")


@pytest.mark.parametrize("which, message", [
    ("missing", "cannot read: No such file or directory"),
    ("dir", "cannot read: Is a directory"),
    ("binary", "not a text file (it is not UTF-8)"),
    ("nul", "not a text file (it contains NUL bytes)"),
])
def test_check_unreadable_files(files, capsys, which, message):
    assert cli.main(["check", str(files[which])]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"{files[which]}: {message}\n"


def test_check_bad_set(files, capsys):
    assert cli.main(["check", str(files["good"]), "--set", "wdth=2"]) == 2
    assert capsys.readouterr().err == f"--set wdth=2: unknown parameter 'wdth' in {files['good']} (did you mean 'width'?)\n"
    assert cli.main(["check", str(files["good"]), str(files["good"]), "--set", "width"]) == 2
    assert capsys.readouterr().err == "--set width: expected NAME=VALUE, like --set width=0.5\n"   # once
    assert cli.main(["check", str(files["good"]), "--set", "width=2"]) == 0


def test_show_errors(files, capsys):
    assert cli.main(["show", str(files["bad"])]) == 2
    assert capsys.readouterr().err.startswith(f"{files['bad']}:2:11: unknown op 'cnv'")
    assert cli.main(["show", str(files["missing"]), "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"{files['missing']}: cannot read: No such file or directory\n"
    assert cli.main(["show", str(files["good"]), "--set", "width=0"]) == 2
    assert capsys.readouterr().err.startswith(f"{files['good']}:3:16: conv: out must be at least 1 channel, got 0")


def test_check_subprocess_exit_codes_and_no_traceback(files):
    ok = run_cli("check", "spaces/proxyless.space", files["good"])
    assert ok.returncode == 0 and ok.stderr == ""
    for args in ([files["bad"]], [files["missing"]], [files["binary"]], [files["good"], "--set", "nope=1"],
                 [files["good"], "--set", "width=1/0"], [files["good"], "--set", "width"]):
        r = run_cli("check", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.strip()
        first = r.stderr.splitlines()[0]
        assert first.startswith((str(files["bad"]) + ":2:11: ", str(files["missing"]) + ": ",
                                 str(files["binary"]) + ": ", "--set "))


def test_show_subprocess_no_traceback_when_the_reader_goes_away():
    r = subprocess.run(f"{sys.executable} -m nasdsl show spaces/proxyless.space --json | head -c 5", shell=True,
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                       timeout=120)
    assert r.stdout == '{"nam' and "Traceback" not in r.stderr


def test_check_does_not_import_torch():
    code = ("import nasdsl.cli, sys; rc = nasdsl.cli.main(['check', 'spaces/proxyless.space']); "
            "assert rc == 0; assert 'torch' not in sys.modules, 'check imported torch'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_check_is_fast():
    import time
    start = time.perf_counter()
    for path in sorted((ROOT / "spaces").glob("*.space")):
        compile_file(path)
    assert time.perf_counter() - start < 10
