"""Property tests: whatever the text, compiling it returns a network or raises NasdslError; nothing
else escapes (no RecursionError, ValueError, TypeError, ZeroDivisionError, OverflowError, no
runaway memory), and a network that compiles can be summarised."""
from __future__ import annotations

import json
import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nasdsl.errors import NasdslError
from nasdsl.graph.accounting import summary
from nasdsl.language.builtins import BUILTINS
from nasdsl.language.compiler import FUNCTIONS, compile_source

SPACES = sorted((Path(__file__).resolve().parent.parent / "spaces").glob("*.space"))
SOURCES = {p.name: p.read_text() for p in SPACES}



def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def check(source: str, overrides: dict | None = None):
    """Compile; only a NasdslError may come out, and it must be well formed."""
    try:
        net = compile_source(source, "fuzz.space", overrides)
    except NasdslError as exc:
        text = str(exc)
        assert exc.exit_code == 2
        assert text.startswith(("fuzz.space", "--set ")), text
        head = text.split("\n")[0]
        assert exc.message in head
        if exc.line is not None and exc.file == "fuzz.space":
            assert 1 <= exc.line <= len(source.split("\n")), (exc.line, text)
            assert exc.column is not None and exc.column >= 1
        assert len(text.split("\n")) in (1, 3)
        return None
    info = summary(net)
    json.dumps(info)
    assert isinstance(info["params"], int) and isinstance(info["flops"], int) and isinstance(info["gates"], int)
    assert info["params"] >= 0 and info["flops"] >= 0
    assert net.out_shape.is_flat and net.out_shape.channels == net.num_classes
    return net


# ---- random text -----------------------------------------------------------------------------------
LANGUAGE_CHARS = "abcdefgklmnoprstuvxy_0123456789 \n\t()[]{}=,|>+-*/%#.eE@"
TOKENS = ["space", "param", "let", "def", "layer", "stage", "for", "in", "(", ")", "[", "]", "{", "}", "=", ",",
          "|", ">", "+", "-", "*", "/", "//", "%", "**", "#", "\n", " ", "0", "1", "3", "8", "2.5", "1e9",
          "99999999999999999999", "x", "classes", "width", *BUILTINS, *FUNCTIONS, "on", "off", "relu6",
          "gate", "residual", "repeat", "stride", "k", "e", "out", "mid", "shortcut", "pad", "\r", "\f", "\x00",
          "é", "\u2028", "\x85", "residual", "then", "@", "@ [0, 1]", "select([0])", "subsample"]


@fuzz(150)
@given(st.one_of(st.text(max_size=200), st.text(alphabet=LANGUAGE_CHARS, max_size=300)))
def test_random_text(text):
    check(text)


@fuzz(150)
@given(st.lists(st.sampled_from(TOKENS), max_size=60))
def test_random_token_soup(tokens):
    check(" ".join(tokens))
    check("space t(input=3, resolution=8, classes=10)\n" + " ".join(tokens))


# ---- mutations of the shipped spaces ---------------------------------------------------------------
TOKEN_RE = re.compile(r"\w+(?:\.\w+)*|\*\*|//|\S|\s+")


@st.composite
def mutated(draw):
    name = draw(st.sampled_from(sorted(SOURCES)))
    text = SOURCES[name]
    for _ in range(draw(st.integers(1, 4))):
        level = draw(st.sampled_from(["char", "token"]))
        units = list(text) if level == "char" else TOKEN_RE.findall(text)
        if not units:
            break
        i = draw(st.integers(0, len(units) - 1))
        j = draw(st.integers(i, min(len(units), i + 8)))
        op = draw(st.sampled_from(["delete", "insert", "duplicate", "swap", "replace"]))
        if op == "delete":
            del units[i:j]
        elif op == "insert":
            new = draw(st.sampled_from(TOKENS)) if level == "token" else draw(st.sampled_from(LANGUAGE_CHARS))
            units.insert(i, new if level == "char" else f" {new} ")
        elif op == "duplicate":
            units[i:i] = units[i:j]
        elif op == "swap":
            k = draw(st.integers(0, len(units) - 1))
            units[i], units[k] = units[k], units[i]
        else:
            units[i] = draw(st.sampled_from(TOKENS)) if level == "token" else draw(st.sampled_from(LANGUAGE_CHARS))
        text = "".join(units)
    return text


@fuzz(300)
@given(mutated())
def test_mutated_spaces(text):
    check(text)


@fuzz(100)
@given(st.sampled_from(sorted(SOURCES)),
       st.dictionaries(st.sampled_from(["width", "depth", "dropout", "resolution", "classes", "input", "eps", "ch",
                                        "nope", "x"]),
                       st.one_of(st.sampled_from(["0", "-1", "0.5", "2", "1e9", "1e999", "2**99999", "relu", "[1]",
                                                  "(", "1)", "range(10**9)", "1/0", "10**10**10", "3 4", "#", ""]),
                                 st.text(alphabet=LANGUAGE_CHARS, min_size=1, max_size=12)),
                       max_size=3))
def test_random_overrides(name, overrides):
    check(SOURCES[name], overrides)


# ---- well-formed programs from the grammar ----------------------------------------------------------
NAMES = ["x", "y", "width", "c", "k", "e", "f", "g", "cand", "classes", "resolution", "input", "undefined_name"]
WORDS = ["on", "off", "relu", "relu6", "hswish", "identity", "silu", "auto", "pad", "proj", "true"]
CALLABLES = [*FUNCTIONS, "f", "g", "conv", "nofunc"]
ARG_NAMES = sorted({a.name for b in BUILTINS.values() for a in b.args} | {"repeat", "residual", "x", "c"})
OPERATORS = ["+", "-", "*", "/", "//", "%", "**"]

numbers = st.one_of(st.integers(0, 40).map(str),
                    st.sampled_from(["0.5", "1.0", "1e3", "2.5", "1e-3", ".5", "3.", "1e18", "1e19",
                                     "999999999999999999999", "128", "1000000"]))
atoms = st.one_of(numbers, numbers, st.sampled_from(NAMES + WORDS))


def _list(xs):
    return "[" + ", ".join(xs) + "]"


expressions = st.recursive(atoms, lambda inner: st.one_of(
    st.tuples(inner, st.sampled_from(OPERATORS), inner).map(" ".join),
    inner.map(lambda e: f"-{e}"),
    inner.map(lambda e: f"({e})"),
    st.lists(inner, max_size=3).map(_list),
    st.tuples(st.sampled_from(CALLABLES), st.lists(inner, max_size=3)).map(lambda t: f"{t[0]}({', '.join(t[1])})"),
), max_leaves=6)

small = st.integers(1, 12).map(str)
values = st.one_of(small, small, expressions)


@st.composite
def arguments(draw, names=ARG_NAMES):
    pos = draw(st.lists(values, max_size=2))
    kw = draw(st.lists(st.tuples(st.sampled_from(names), st.one_of(values, st.sampled_from(WORDS))), max_size=3))
    return ", ".join(pos + [f"{k}={v}" for k, v in kw])


@st.composite
def calls(draw):
    op = draw(st.sampled_from([*BUILTINS, *BUILTINS, "blk", "twice", "nop", "f"]))
    if draw(st.booleans()):
        return op
    return f"{op}({draw(arguments())})"


@st.composite
def blocks(draw):
    alts = []
    for _ in range(draw(st.integers(1, 3))):
        chain = " > ".join(draw(st.lists(calls(), min_size=1, max_size=4)))
        for _ in range(draw(st.integers(0, 2))):
            iterable = draw(st.one_of(st.lists(values, max_size=3).map(_list),
                                      st.tuples(small, small).map(lambda t: f"range({t[0]}, {t[1]})"),
                                      expressions))
            chain += f" for {draw(st.sampled_from(['k', 'e', 'c', 'i']))} in {iterable}"
        alts.append(chain)
    return " | ".join(alts)


@st.composite
def options(draw):
    if draw(st.booleans()):
        return ""
    opts = draw(st.lists(st.tuples(st.sampled_from(["gate", "residual", "repeat", "stride", "k"]),
                                   st.one_of(st.sampled_from(["on", "off", "auto", "1", "2", "3"]), values)),
                         min_size=1, max_size=2))
    return " [" + ", ".join(f"{k}={v}" for k, v in opts) + "]"


@st.composite
def statements(draw):
    kind = draw(st.sampled_from(["param", "let", "letf", "def", "layer", "layer", "layer", "stage"]))
    name = draw(st.sampled_from(NAMES))
    if kind == "param":
        return f"param {name} = {draw(values)}"
    if kind == "let":
        return f"let {name} = {draw(values)}"
    if kind == "letf":
        formals = ", ".join(draw(st.lists(st.sampled_from(["a", "b", "x"]), max_size=2)))
        return f"let {draw(st.sampled_from(['f', 'g']))}({formals}) = {draw(expressions)}"
    if kind == "def":
        formals = ", ".join(draw(st.lists(st.sampled_from(["c", "k", "e"]), max_size=2)))
        return f"def {draw(st.sampled_from(['blk', 'twice', 'nop']))}({formals}) = {draw(blocks())}"
    if kind == "layer":
        label = draw(st.sampled_from(["", " a", " b", " s1.x"]))
        return f"layer{label}{draw(options())} = {draw(blocks())}"
    layers = [f"layer{draw(st.sampled_from(['', ' p', ' q']))}{draw(options())} = {draw(blocks())}"
              for _ in range(draw(st.integers(1, 2)))]
    return f"stage {draw(st.sampled_from(['s1', 's2']))}{draw(options())} {{ {' '.join(layers)} }}"


@st.composite
def programs(draw):
    fields = draw(st.lists(st.tuples(st.sampled_from(["input", "resolution", "classes"]),
                                     st.one_of(st.integers(1, 16).map(str), values)), max_size=3))
    header = f"space fuzz({', '.join(f'{k}={v}' for k, v in fields)})"
    body = draw(st.lists(statements(), max_size=6))
    tail = draw(st.sampled_from(["", "layer cls = gap > linear(classes)", "layer = flatten > linear(classes)"]))
    return "\n".join([header, *body, tail]) + "\n"


@fuzz(400)
@given(programs())
def test_generated_programs(source):
    check(source)


# Programs that are valid more often: small, plausible layers from a menu, in random order.
MENU = [
    "conv({c}) > bn > relu", "conv({c}, k=1) > bn(gate=off) > relu6", "mbconv({c}, k={k}, e={e})",
    "mbconv({c}, k=k, e=e) for k in [3, 5] for e in [1, 3]", "basic({c}, shortcut={sc})",
    "bottleneck({c4}, stride={s})", "dwconv(k={k}) > bn > hswish", "maxpool(k=2)", "avgpool(k=1, stride=1)",
    "conv({c}, stride={s}) > gate > relu", "blk({c}) | conv({c}, k=1) > bn", "relu", "dropout(0.1)",
]


@st.composite
def plausible(draw):
    res = draw(st.sampled_from([1, 2, 4, 8, 16]))
    lines = [f"space ok(input={draw(st.integers(1, 4))}, resolution={res}, classes={draw(st.integers(1, 10))})",
             f"param width = {draw(st.sampled_from(['0.25', '0.5', '1.0', '2']))}",
             "let ch(c) = make_divisible(c * width, 4)",
             "def blk(c) = conv(c, k=3) > bn > relu"]
    for i in range(draw(st.integers(1, 6))):
        fmt = draw(st.sampled_from(MENU))
        text = fmt.format(c=f"ch({draw(st.sampled_from([4, 8, 16]))})", c4=f"ch({draw(st.sampled_from([8, 16]))})",
                          k=draw(st.sampled_from([1, 3, 5])), e=draw(st.sampled_from([1, 3, 6])),
                          s=draw(st.sampled_from([1, 2])), sc=draw(st.sampled_from(["auto", "pad", "proj", "identity"])))
        opts = draw(st.sampled_from(["", " [gate=off]", " [residual=off]", " [residual=on]"]))
        if draw(st.integers(0, 3)) == 0:
            lines.append(f"stage st{i} [repeat={draw(st.integers(1, 3))}, stride={draw(st.sampled_from([1, 2]))}]"
                         f" {{ layer{opts} = {text} }}")
        else:
            lines.append(f"layer l{i}{opts} = {text}")
    lines.append("layer classifier = gap > linear(classes)")
    return "\n".join(lines) + "\n"


@fuzz(200)
@given(plausible(), st.sampled_from([None, {"width": "0.5"}, {"resolution": "3"}, {"width": "3", "classes": "2"}]))
def test_plausible_programs(source, overrides):
    check(source, overrides)


def test_plausible_programs_often_compile():
    """The generator above is worth its time only if many of its programs are valid."""
    from hypothesis import find
    find(plausible(), lambda s: check(s) is not None and "stage" in s and "mbconv" in s,
         settings=settings(max_examples=500, database=None, deadline=None))


# ---- pathological inputs, each once --------------------------------------------------------------------
HEAD = "space t(input=3, resolution=8, classes=10)\n"
TAIL = "layer c = gap > linear(10)\n"
PATHOLOGICAL = [
    "(" * 5000, "[" * 5000 + "]" * 5000, "-" * 10000 + "1", "1" + "+1" * 5000, "2" + "**2" * 3000,
    "f(" * 3000 + ")" * 3000, "9" * 5000, "1e" + "9" * 400, "10 ** 10 ** 10", "2 ** 99999", "(-8) ** 0.5",
    "range(10 ** 9)", "range(0, 10 ** 18, 1)", "round(2.5, -10 ** 18)", "round(2.5, 10 ** 18)",
    "make_divisible(1e18, 1e-300)", "make_divisible(8, 0.0)", "int(1e18) * 1e18", "float(10 ** 18) ** 2",
    "max(range(100000))", "min([])", "0 ** -1", "0.0 ** -1", "1 % 0.0", "(1e18 * 10) // 1",
]


def test_pathological_expressions():
    for expr in PATHOLOGICAL:
        check(HEAD + f"param v = {expr}\n" + TAIL)
        check(HEAD + f"layer a = conv(8, k={expr})\n" + TAIL)
        check(HEAD + f"layer a = conv(8) for i in {expr}\n" + TAIL)


def test_pathological_programs():
    deep_defs = "".join(f"def d{i}(c) = d{i - 1}(c) > d{i - 1}(c)\n" for i in range(1, 40))
    wide_defs = "".join(f"def w{i}(c) = w{i - 1}(c) | w{i - 1}(c)\n" for i in range(1, 40))
    mutual = "let f(x) = g(x) + 1\nlet g(x) = f(x) * 2\nparam v = f(1)\n"
    mutual_defs = "def p(c) = q(c)\ndef q(c) = p(c)\nlayer a = p(8)\n"
    for body in [
        "def d0(c) = relu > relu\n" + deep_defs + "layer a = d39(8)\n",
        "def w0(c) = relu | relu\n" + wide_defs + "layer a = w39(8)\n",
        mutual, mutual_defs,
        "layer a = relu for a in range(100000) for b in range(100000)\n",
        "stage s [repeat=1000000] { layer = relu }\n",
        "stage s [repeat=1000000, stride=2] { layer = maxpool }\n",
        "layer a = conv(1000000) > conv(1000000)\n",
        "layer a = mbconv(8, e=1e18)\n",
        "layer a = conv(8, k=1000000, padding=1000000)\n",
        "layer a = basic(1000000, shortcut=pad)\n",
        "layer a = conv(8) > flatten\nlayer b = linear(1000000)\n",
        "layer a" + " [gate=off]" * 50 + " = relu\n",
        "layer " + "a" * 10000 + " = relu\n",
        "layer a = " + "relu > " * 5000 + "relu\n",
        "layer a = " + "relu | " * 5000 + "relu\n",
        "param v = [" + "1, " * 20000 + "]\nlayer a = relu for i in v\n",
    ]:
        check(HEAD + body + TAIL)


def test_pathological_headers():
    for header in ["space t(resolution=1000000000)", "space t(input=0)", "space t(classes=1e999)",
                   "space t(resolution=1000000, input=1000000)", "space t(1, 2, 3)"]:
        check(header + "\nlayer a = conv(8) > gap > linear(classes)\n")


@fuzz(200)
@given(programs())
def test_compiled_names_are_unique(source):
    """Layer and block names are graph nodes and gate keys: a network never repeats one."""
    net = check(source)
    if net is not None:
        names = [layer.name for layer in net.layers] + [b.name for layer in net.layers for b in layer.blocks
                                                       if b.name != layer.name]
        assert len(names) == len(set(names)) and "input" not in names
        keys = [g.key for g in net.gates()]
        assert len(keys) == len(set(keys))
        assert net.graph.number_of_nodes() >= len(net.layers) + 1
