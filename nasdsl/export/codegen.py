"""Graph IR -> a standalone timm model module: Python a person reads, as torch.fx turns a graph into code.

`generate(network, name, pretrained_cfg)` writes one module that imports only torch, timm and the
standard library, laid out the way timm's own model files are:

- a class per layer structure (`MBConv`, `ConvBnAct`, `BasicBlock`, ...) with timm's op names
  (conv_pw, bn1, act1, conv_dw, bn2, act2, conv_pwl, bn3; conv1, bn1, ...), a straight-line
  forward, and constructor arguments for what differs between the layers that share it (widths,
  kernels, strides, channel maps, whether the input is added back);
- the model class: `stages`, one nn.Sequential of layers per timm feature map, then the head
  (global_pool, pre_logits, head_drop, classifier) and timm's model API;
- `default_cfgs` and the `@register_model` entrypoint (after the `REGISTRATION` line).

A layer computes post(sum_i place(block_i(x), index_i) + place(shortcut(x), index)) (graph/ir.py).
Each case gets the simplest code that computes it: a chain alone; `x + chain(x)` for a dense
residual; a zero pad for a contiguous channel range (an option-A shortcut); `add_at` (index_add)
only where a block writes scattered channels.

`Generated.names` says which module of the generated model holds each graph op, so the exporter
can rename a NasNet state dict (NasNet.op_modules()) to the generated model's.
"""
from __future__ import annotations

import inspect
import re
import textwrap
from dataclasses import dataclass, field

from nasdsl._version import __version__
from nasdsl.errors import NasdslError
from nasdsl.export.load import FORMAT, REGISTRATION
from nasdsl.graph.ir import Layer, Network, Op
from nasdsl.graph.ops import CHANNELWISE, is_depthwise

WIDTH = 110   # the longest line the generator writes where it can choose

# the generated module's fixed top-level names (an export's name must differ from each)
IMPORTS = ("os", "OrderedDict", "List", "Optional", "Tuple", "Union", "torch", "nn", "SelectAdaptivePool2d",
           "create_classifier", "build_model_with_cfg", "generate_default_cfgs", "register_model",
           "feature_take_indices")
HELPERS = ("Select", "Subsample", "MixConv", "GlobalAvgPool", "SqueezeExcite", "spread_index", "place", "add_at",
           "_select", "_channels_last", "_index_add")
RESERVED = frozenset(IMPORTS + HELPERS + ("default_cfgs", "__nasdsl_export__", "_WEIGHTS", "annotations"))

Position = tuple   # (layer, "block", block, op) | (layer, "shortcut", op) | (layer, "post", op)


@dataclass
class Generated:
    text: str                    # the whole module
    model_text: str              # the module up to REGISTRATION: the model without the timm entrypoint
    class_name: str              # the model class
    names: dict                  # graph op Position -> the generated model's module name holding it
    pretrained_cfg: dict         # the cfg given, with first_conv and classifier naming generated modules
    num_features: int
    lines: int = 0


# ---- values a shared class may take as arguments ------------------------------------------------
@dataclass(frozen=True)
class Slot:
    """A value in generated code that may differ between layers sharing a class (`key`: unique in it)."""
    key: str


@dataclass(frozen=True)
class Half:
    """`slot // 2`: a conv's or pool's `same` padding follows its kernel."""
    key: str


@dataclass(frozen=True)
class Arg:
    value: object                # Slot, Half or source text
    name: str | None = None      # a keyword argument
    default: object = None       # left out at this value when it is not a parameter (None: never)


@dataclass(frozen=True)
class Call:
    callee: str
    args: tuple = ()


@dataclass(frozen=True)
class Seq:
    """nn.Sequential(OrderedDict([(name, module), ...]))."""
    items: tuple                 # ((name, Call), ...)


def literal(value) -> str:
    """Python source for a slot's value: a list for tuples (runs of 4+ consecutive ints as ranges)."""
    if isinstance(value, (tuple, list)):
        parts, i = [], 0
        while i < len(value):
            j = i
            while j + 1 < len(value) and isinstance(value[j], int) and value[j + 1] == value[j] + 1:
                j += 1
            if j - i >= 3:
                parts.append(f"*range({value[i]}, {value[j] + 1})" if value[i] else f"*range({value[j] + 1})")
                i = j + 1
            else:
                parts.append(literal(value[i]))
                i += 1
        return "[" + ", ".join(parts) + "]"
    return repr(value)


class Render:
    """Source text for slots: a parameter's name, the layer's value, or (signature) the key itself."""

    def __init__(self, values: dict, params: dict | None = None, signature: bool = False):
        self.values, self.params, self.signature = values, params or {}, signature

    def value(self, v) -> str:
        if isinstance(v, Slot):
            if self.signature:
                return f"<{v.key}>"
            return self.params.get(v.key) or literal(self.values[v.key])
        if isinstance(v, Half):
            if self.signature:
                return f"<{v.key}>//2"
            return f"{self.params[v.key]} // 2" if v.key in self.params else str(self.values[v.key] // 2)
        return v

    def omitted(self, arg: Arg) -> bool:
        if self.signature or arg.default is None or not isinstance(arg.value, (Slot, Half)):
            return False
        if arg.value.key in self.params:
            return False
        value = self.values[arg.value.key]
        return (value // 2 if isinstance(arg.value, Half) else value) == arg.default

    def args(self, c: Call) -> list[str]:
        return [(f"{a.name}=" if a.name else "") + self.value(a.value) for a in c.args if not self.omitted(a)]

    def call(self, c: Call) -> str:
        return f"{c.callee}({', '.join(self.args(c))})"

    def module(self, m, indent: int) -> str:
        """A Call, or a Seq written one op per line at `indent`."""
        if isinstance(m, Call):
            return self.call(m)
        pad = " " * (indent + 4)
        items = "".join(f"{pad}({name!r}, {self.call(c)}),\n" for name, c in m.items)
        return "nn.Sequential(OrderedDict([\n" + items + " " * indent + "]))"


def wrap_call(head: str, args: list[str], indent: int, tail: str = "") -> str:
    """`head(a, b, ...)tail` on one line when it fits, else one argument per line."""
    one = f"{head}({', '.join(args)}){tail}"
    if indent + len(one) <= WIDTH:
        return one
    pad = " " * (indent + 4)
    return head + "(\n" + "".join(f"{pad}{a},\n" for a in args) + " " * indent + ")" + tail


# ---- op names and op modules -------------------------------------------------------------------
_DENSE = ("conv", "mixconv", "linear")


def skipped(op: Op) -> bool:
    """Ops that compute nothing at inference and hold no state: gates (derived networks have
    none; an exported search space's gates are idle) and identity activations."""
    return op.is_gate or (op.kind == "act" and op.attrs["fn"] == "identity")


def conv_role(op: Op) -> str:
    """dw (depthwise, mixed kernels included), pw (1x1, split or not: MixNet's) or conv."""
    if is_depthwise(op) or (op.kind == "mixconv" and op.attrs["depthwise"]):
        return "dw"
    if op.kind == "mixconv":
        return "pw" if set(op.attrs["kernels"]) == {1} else "conv"
    if op.attrs["k"] == 1 and op.attrs["groups"] == 1:
        return "pw"
    return "conv"


_MBCONV_NAMES = {("pw", "dw", "pw"): ("conv_pw", "conv_dw", "conv_pwl"), ("dw", "pw"): ("conv_dw", "conv_pw"),
                 ("pw", "dw"): ("conv_pw", "conv_dw")}
_SHORT = {"bn": "bn", "act": "act", "dropout": "drop", "maxpool": "pool", "avgpool": "pool", "gap": "pool",
          "flatten": "flatten", "subsample": "subsample", "select": "select", "se": "se"}
_UNNUMBERED = ("se",)   # timm's blocks name their squeeze-and-excitation `se`, whichever conv it follows


def _folded_mbconv(kept, roles: tuple) -> bool:
    """An MBConv without its conv_dw: two 1x1 convs with BN > act twice between them (merging folds
    a one-tap depthwise conv into its BN, merge._fold_scales; a stride stays as a subsample)."""
    if roles != ("pw", "pw"):
        return False
    kinds = [op.kind for op in kept if op.kind != "subsample"]
    convs = [i for i, kind in enumerate(kinds) if kind in ("conv", "mixconv")]
    return kinds[convs[0] + 1:convs[-1]] == ["bn", "act", "bn", "act"]


def op_names(ops) -> list[str | None]:
    """timm-style names for a chain's ops (None: skipped). MBConv's convs are conv_pw, conv_dw,
    conv_pwl; other convs conv1, conv2, ... (conv when alone), linears fc1, ... (fc); the ops after
    the n-th conv or linear are bn{n}, act{n}, drop{n}, ... (unnumbered when there is one). An
    MBConv whose one-tap depthwise conv merging folded into bn2 (merge._fold_scales) keeps its
    names: conv_pw, bn1, act1, [subsample2,] bn2, act2, conv_pwl."""
    kept = [op for op in ops if not skipped(op)]
    roles = tuple(conv_role(op) for op in kept if op.kind in ("conv", "mixconv"))
    folded = _folded_mbconv(kept, roles)
    special = ["conv_pw", "conv_pwl"] if folded else list(_MBCONV_NAMES.get(roles, ()))
    convs = sum(op.kind in ("conv", "mixconv") for op in kept)
    linears = sum(op.kind == "linear" for op in kept)
    numbered = convs + linears > 1
    names, used, dense, conv_i, fc_i, previous = [], set(), 0, 0, 0, None
    for op in ops:
        if skipped(op):
            names.append(None)
            continue
        if op.kind in ("conv", "mixconv"):
            conv_i += 1
            name = special[conv_i - 1] if special else (f"conv{conv_i}" if convs > 1 else "conv")
        elif op.kind == "linear":
            fc_i += 1
            name = f"fc{fc_i}" if linears > 1 else "fc"
        else:
            dense += folded and op.kind in ("bn", "subsample") and previous == "act"   # where conv_dw was
            name = _SHORT[op.kind] + (str(dense) if numbered and dense and op.kind not in _UNNUMBERED else "")
        dense += op.kind in _DENSE
        previous = op.kind
        base, n = name, 2
        while name in used:
            name, n = f"{base}_{n}", n + 1
        used.add(name)
        names.append(name)
    return names


class Builder:
    """Collects a layer's slot values while its code is built: `slot` registers one, checked consistent."""

    def __init__(self):
        self.values: dict = {}

    def slot(self, key: str, value) -> Slot:
        if key in self.values and self.values[key] != value:
            raise NasdslError(f"internal: slot {key} has two values ({self.values[key]} and {value})")
        self.values[key] = value
        return Slot(key)

    def width(self, key: str, value: int) -> Slot:
        return self.slot(f"chs:{key}", value)


_ACTS = {"relu": "nn.ReLU", "relu6": "nn.ReLU6", "hswish": "nn.Hardswish", "silu": "nn.SiLU", "identity": "nn.Identity"}
_SE_GATES = {"sigmoid": "nn.Sigmoid", "hsigmoid": "nn.Hardsigmoid"}


def op_call(op: Op, b: Builder, q: str, cin: str, cout: str, inplace: bool) -> Call:
    """The torch module for `op`; `q` prefixes its slot keys, `cin`/`cout` are its width symbols."""
    a, kind = op.attrs, op.kind
    win = lambda: b.width(cin, op.in_shape.channels)  # noqa: E731 - registered only where used
    wout = lambda: b.width(cout, op.out_shape.channels)  # noqa: E731
    if kind == "conv":
        args = [Arg(win()), Arg(wout()), Arg(b.slot(q + "k", a["k"])),
                Arg(b.slot(q + "stride", a["stride"]), "stride", 1)]
        same = a["padding"] == a["k"] // 2
        args.append(Arg(Half(q + "k") if same else b.slot(q + "padding", a["padding"]), "padding", 0))
        if is_depthwise(op):
            args.append(Arg(Slot(f"chs:{cin}"), "groups"))
        elif a["groups"] != 1:
            args.append(Arg(str(a["groups"]), "groups"))
        if not a["bias"]:
            args.append(Arg("False", "bias"))
        return Call("nn.Conv2d", tuple(args))
    if kind == "mixconv":
        return Call("MixConv", (Arg(b.slot(q + "in_splits", tuple(a["in_splits"]))),
                                Arg(b.slot(q + "out_splits", tuple(a["out_splits"]))),
                                Arg(b.slot(q + "kernels", tuple(a["kernels"]))),
                                Arg(b.slot(q + "stride", a["stride"]), "stride", 1),
                                Arg(b.slot(q + "depthwise", a["depthwise"]), "depthwise", False)))
    if kind == "bn":
        return Call("nn.BatchNorm1d" if op.in_shape.is_flat else "nn.BatchNorm2d",
                    (Arg(win()), Arg(b.slot(q + "eps", a["eps"]), "eps", 1e-5),
                     Arg(b.slot(q + "momentum", a["momentum"]), "momentum", 0.1)))
    if kind == "act":
        return Call(_ACTS[a["fn"]], (Arg("True", "inplace"),) if inplace else ())
    if kind == "se":
        return Call("SqueezeExcite", (Arg(win()), Arg(b.slot(q + "rd_channels", a["rd"])),
                                      Arg(_ACTS[a["act"]], "act_layer"), Arg(_SE_GATES[a["fn"]], "gate_layer")))
    if kind == "dropout":
        return Call("nn.Dropout", (Arg(b.slot(q + "p", a["p"])),))
    if kind in ("maxpool", "avgpool"):
        same = a["padding"] == a["k"] // 2 and a["padding"]
        return Call("nn.MaxPool2d" if kind == "maxpool" else "nn.AvgPool2d",
                    (Arg(b.slot(q + "k", a["k"])), Arg(b.slot(q + "stride", a["stride"]), "stride"),
                     Arg(Half(q + "k") if same else b.slot(q + "padding", a["padding"]), "padding", 0)))
    if kind == "gap":
        return Call("GlobalAvgPool")
    if kind == "flatten":
        return Call("nn.Flatten", (Arg("1"),))
    if kind == "subsample":
        return Call("Subsample", (Arg(b.slot(q + "stride", a["stride"])),))
    if kind == "select":
        return Call("Select", (Arg(b.slot(q + "index", tuple(a["index"]))),))
    if kind == "linear":
        return Call("nn.Linear", (Arg(win()), Arg(wout())) + (() if a["bias"] else (Arg("False", "bias"),)))
    raise NasdslError(f"cannot generate code for op kind {kind!r}")


def changes_width(op: Op) -> bool:
    """The op makes a tensor of a new width (a new width symbol), rather than keeping its input's:
    any op the catalogue does not call channelwise or same-width (an SE)."""
    cmap = op.spec.channels(op)
    return cmap is not CHANNELWISE and not cmap.same_width


def chain(ops, positions, b: Builder, scope: str, cin: str, cout: str | None, fresh: bool,
          names: list | None = None):
    """A chain's named modules [(name, Call, position)], whether its output is a tensor it made
    (activations work in place only on such a tensor), and its output's width symbol. The last op
    that changes the width writes `cout` (None: a symbol of its own); others get mid, mid2, ..."""
    names = names if names is not None else op_names(ops)
    changers = [i for i, op in enumerate(ops) if changes_width(op)]
    out, width, mids = [], cin, 0
    prefix = f"{scope}." if scope else ""
    for i, (op, pos, name) in enumerate(zip(ops, positions, names)):
        if name is None:
            continue
        new = width
        if i in changers:
            if i == changers[-1] and cout is not None:
                new = cout
            else:
                mids += 1
                new = f"{prefix}mid{mids if mids > 1 else ''}"
        out.append((name, op_call(op, b, f"{prefix}{name}.", width, new, inplace=fresh), pos))
        width = new
        fresh = fresh or op.spec.allocates(op.attrs)
    return out, fresh, width


def ops_module(items):
    """A Seq of named modules, the module itself when there is one, or nn.Identity for none."""
    if not items:
        return Call("nn.Identity")
    if len(items) == 1:
        return items[0][1]
    return Seq(tuple((name, c) for name, c, _ in items))


def sub_names(items, attr: str) -> dict:
    """Positions -> module names, for a chain held as `attr` by ops_module."""
    if len(items) == 1:
        return {items[0][2]: attr}
    return {pos: f"{attr}.{name}" for name, _, pos in items}


# ---- layers ------------------------------------------------------------------------------------
@dataclass
class LayerCode:
    """One layer's generated code before classes are shared: constructor items, forward lines
    ((condition, text); a condition ("when", key) keeps a line under `if self.<flag>:` when the
    flag is an argument, ("also", key) keeps it whenever the flag may be true), its slot values,
    and the module name (inside the layer) of each of its ops."""
    layer: Layer
    base: str
    doc: str
    # ("flag", key) | ("module", attr, Call|Seq) | ("index", attr, key, width key) | ("pad", attr, key)
    init: list = field(default_factory=list)
    forward: list = field(default_factory=list)
    values: dict = field(default_factory=dict)
    names: dict = field(default_factory=dict)
    single: object = None                         # a Call: the layer is this one module, no class


def positions(li: int, layer: Layer, where: str, j: int = 0) -> list:
    if where == "block":
        return [(li, "block", j, k) for k in range(len(layer.blocks[j].ops))]
    ops = layer.shortcut.ops if where == "shortcut" else layer.post
    return [(li, where, k) for k in range(len(ops))]


def is_plain(layer: Layer) -> bool:
    return len(layer.blocks) == 1 and layer.shortcut is None and layer.blocks[0].index is None


def dense_skip(layer: Layer) -> bool | None:
    """Whether a one-block layer is `chain(x)` (False) or `x + chain(x)` (True), the two forms a
    class can share with a has_skip argument; None for every other wiring."""
    if len(layer.blocks) != 1 or layer.blocks[0].index is not None:
        return None
    sc = layer.shortcut
    if sc is None:
        return False
    return True if not sc.ops and sc.index is None else None


_KINDS = {"basic": "BasicBlock", "bottleneck": "Bottleneck", "mbconv": "MBConv"}
_CAMEL = {"conv": "Conv", "mixconv": "MixConv", "bn": "Bn", "act": "Act", "dropout": "Drop", "maxpool": "Pool",
          "avgpool": "Pool", "gap": "Pool", "flatten": "Flatten", "linear": "Fc", "subsample": "Subsample",
          "select": "Select", "se": "SE"}


def chain_base(ops, kind: str) -> str:
    """A class name stem for a chain: timm's block names where the convs say which, else its ops."""
    kept = [op for op in ops if not skipped(op)]
    roles = tuple(conv_role(op) for op in kept if op.kind in ("conv", "mixconv"))
    if roles == ("pw", "dw", "pw") or _folded_mbconv(kept, roles):
        return "MBConv"
    if roles == ("dw", "pw"):
        return "DepthwiseSeparable"
    if kind in _KINDS and kind != "mbconv":
        return _KINDS[kind]
    parts = [_CAMEL[op.kind] for op in kept]
    return "".join(parts) if 0 < len(parts) <= 4 else "Layer"


def source_kind(block) -> str:
    """The block's kind in the space (a merged block's label starts with its candidates' kind)."""
    return block.label.split()[0] if block.kind == "merged" and block.label else block.kind


def contiguous(index) -> bool:
    return index is not None and list(index) == list(range(index[0], index[0] + len(index)))


def pads(index, width: int, spatial: bool) -> tuple[int, ...]:
    """F.pad's pads that zero-pad a map's channels to `width`, landing on the contiguous range `index`."""
    channels = (index[0], width - index[0] - len(index))
    return (0, 0, 0, 0, *channels) if spatial else channels


def rank(contrib) -> int:
    """The order `combine` sums in: dense, then zero-padded ranges, then scattered channels."""
    index = contrib[1]
    return 0 if index is None else (1 if contiguous(index) else 2)


def combine(code: LayerCode, b: Builder, contribs: list, acc: str, layer: Layer) -> bool:
    """Forward lines summing `contribs` [(expr, index, attr)] into `acc`, each placed at its
    channels: dense ones first (a plain add), then contiguous ranges (a zero pad), then scattered
    channels (`place` / `add_at` with index buffers). Returns whether `acc` is a tensor they made."""
    width, spatial = layer.width, not layer.out_shape.is_flat
    base, made = None, False
    for expr, index, attr in sorted(contribs, key=rank):
        if index is not None and not contiguous(index):
            key = f"{attr or 'block'}.index"
            b.slot(key, tuple(index))
            b.width("out", width)
            code.init.append(("index", attr, key, "chs:out"))
        elif index is not None:   # the pads an argument, so that layers differing in them share a class
            b.slot(f"{attr or 'block'}.pad", pads(index, width, spatial))
            code.init.append(("pad", attr, f"{attr or 'block'}.pad"))
        name = f"self.{attr}_" if attr else "self."
        padded = f"nn.functional.pad({expr}, {name}pad)"
        if base is None:
            if index is None:
                base = expr
                continue
            rhs = padded if contiguous(index) else f"place({expr}, {name}spread)"
        elif index is None:
            rhs = f"{base} + {expr}"
        elif contiguous(index):
            rhs = f"{base} + {padded}"
        else:
            rhs = f"add_at({base}, {expr}, {name}index, {name}spread)"
        code.forward.append((None, f"{acc} = {rhs}"))
        base, made = acc, True
    if base != acc:
        code.forward.append((None, f"{acc} = {base}"))
    return made


def one_block_layer(layer: Layer, li: int) -> LayerCode:
    """A layer of one block: its ops are the layer's own modules (timm's conv_pw, bn1, ...)."""
    block = layer.blocks[0]
    base = chain_base((*block.ops, *layer.post), source_kind(block))
    code = LayerCode(layer, base + ("Down" if layer.shortcut is not None and layer.shortcut.ops else ""), "")
    b = Builder()
    ops = (*block.ops, *layer.post)
    names = op_names(ops)
    nb = len(block.ops)
    skip = dense_skip(layer)
    items, fresh, width = chain(block.ops, positions(li, layer, "block"), b, "", "in",
                                "out" if block.index is None else "kept", False, names[:nb])
    if skip is not None:
        b.slot("has_skip", skip)
        code.init.append(("flag", "has_skip"))
        code.forward.append((("also", "has_skip"), "shortcut = x"))
    elif layer.shortcut is not None and layer.shortcut.ops:
        sc, _, _ = chain(layer.shortcut.ops, positions(li, layer, "shortcut"), b, "shortcut", "in",
                         "out" if layer.shortcut.index is None else "shortcut.kept", False)
        code.init.append(("module", "shortcut", ops_module(sc)))
        code.names.update(sub_names(sc, "shortcut"))
        code.forward.append((None, "shortcut = self.shortcut(x)"))
    elif layer.shortcut is not None:
        code.forward.append((None, "shortcut = x"))
    for name, c, pos in items:
        code.init.append(("module", name, c))
        code.names[pos] = name
        code.forward.append((None, f"x = self.{name}(x)"))
    acc = "x"
    if skip is not None:
        code.forward.append((("when", "has_skip"), "x = x + shortcut"))
        fresh = fresh or skip
    else:
        contribs = [("x", block.index, "")]
        if layer.shortcut is not None:
            contribs.append(("shortcut", layer.shortcut.index, "shortcut"))
        acc = "x" if min(contribs, key=rank)[2] == "" else "out"   # x: the block's output comes first
        fresh = combine(code, b, contribs, acc, layer) or fresh
    post, _, _ = chain(layer.post, positions(li, layer, "post"), b, "", "out", None, fresh, names[nb:])
    for name, c, pos in post:
        code.init.append(("module", name, c))
        code.names[pos] = name
        code.forward.append((None, f"{acc} = self.{name}({acc})"))
    code.forward.append((None, f"return {acc}"))
    code.values = b.values
    code.doc = describe(code, [n for n, _, _ in items], [n for n, _, _ in post], skip)
    return code


def block_attr(layer: Layer, j: int, used: set) -> str:
    """The attribute holding block j of a parallel layer: its number in the space (b2 of s1.0.b2)."""
    tail = layer.blocks[j].name[len(layer.name) + 1:] if layer.blocks[j].name.startswith(layer.name + ".") else ""
    attr, n = (tail if re.fullmatch(r"b\d+", tail) else f"b{j}"), j
    while attr in used:    # the space's own block number where it is free, else the next free one
        n += 1
        attr = f"b{n}"
    used.add(attr)
    return attr


def parallel_layer(layer: Layer, li: int) -> LayerCode:
    """A layer of parallel blocks: each block an nn.Sequential attribute (b0, b1, ...), summed."""
    bases = {chain_base(b.ops, source_kind(b)) for b in layer.blocks}
    code = LayerCode(layer, "Parallel" + (bases.pop() if len(bases) == 1 else "Blocks"), "")
    b, contribs, used = Builder(), [], {"shortcut"}
    for j, block in enumerate(layer.blocks):
        attr = block_attr(layer, j, used)
        items, _, _ = chain(block.ops, positions(li, layer, "block", j), b, attr, "in",
                            "out" if block.index is None else f"{attr}.kept", False)
        if items:
            code.init.append(("module", attr, ops_module(items)))
            code.names.update(sub_names(items, attr))
        contribs.append((f"self.{attr}(x)" if items else "x", block.index, attr))
    if layer.shortcut is not None:
        sc, _, _ = chain(layer.shortcut.ops, positions(li, layer, "shortcut"), b, "shortcut", "in",
                         "out" if layer.shortcut.index is None else "shortcut.kept", False)
        if sc:
            code.init.append(("module", "shortcut", ops_module(sc)))
            code.names.update(sub_names(sc, "shortcut"))
        contribs.append(("self.shortcut(x)" if sc else "x", layer.shortcut.index, "shortcut"))
    fresh = combine(code, b, contribs, "out", layer)
    post, _, _ = chain(layer.post, positions(li, layer, "post"), b, "", "out", None, fresh)
    for name, c, pos in post:
        code.init.append(("module", name, c))
        code.names[pos] = name
        code.forward.append((None, f"out = self.{name}(out)"))
    code.forward.append((None, "return out"))
    code.values = b.values
    code.doc = describe(code, [], [n for n, _, _ in post], None)
    return code


_SKIP = "<plus the input>"


def describe(code: LayerCode, ops: list, post: list, skip) -> str:
    """The class docstring's first line: what the layer computes, in its module names."""
    layer = code.layer
    if len(layer.blocks) > 1:
        text = f"{len(layer.blocks)} parallel blocks, summed" + (
            ", each at its channels" if any(bl.index is not None for bl in layer.blocks) else "")
    else:
        text = (" > ".join(ops) or "the input") + placed(layer.blocks[0].index)
        if "conv_pwl" in ops and "conv_dw" not in ops:
            text += " (its one-tap depthwise conv folded into bn2)"
    if skip is not None:
        text += _SKIP      # the class says how: always, never, or when has_skip
    elif layer.shortcut is not None:
        names = [n for n in op_names(layer.shortcut.ops) if n]
        text += f", plus the shortcut ({' > '.join(names)})" if names else ", plus the input"
        text += placed(layer.shortcut.index)
    if post:
        text += ", then " + " > ".join(post)
    return f"Computes {text}."


def placed(index) -> str:
    if index is None:
        return ""
    return " zero-padded to the layer's channels" if contiguous(index) else " added at its channels by index"


def layer_code(layer: Layer, li: int) -> LayerCode:
    """The generated code of one layer: one module when it is a single op, else a class's pieces."""
    if is_plain(layer):
        ops = (*layer.blocks[0].ops, *layer.post)
        named = [op for op in ops if not skipped(op)]
        if len(named) <= 1:
            b = Builder()
            pos = positions(li, layer, "block") + positions(li, layer, "post")
            items, _, _ = chain(ops, pos, b, "", "in", "out", False)
            return LayerCode(layer, "", "", values=b.values, names={items[0][2]: ""} if items else {},
                             single=items[0][1] if items else Call("nn.Identity"))
    if len(layer.blocks) == 1:
        return one_block_layer(layer, li)
    return parallel_layer(layer, li)


# ---- sharing classes ---------------------------------------------------------------------------
def init_lines(item, r: Render, params: dict) -> list[str]:
    kind = item[0]
    if kind == "flag":
        return [f"self.{params[item[1]]} = {params[item[1]]}"] if item[1] in params else []
    if kind == "module":
        if isinstance(item[2], Call):   # one argument a line when the call is too long for one
            return [wrap_call(f"self.{item[1]} = {item[2].callee}", r.args(item[2]), 8)]
        return [f"self.{item[1]} = {r.module(item[2], 8)}"]
    name = f"{item[1]}_" if item[1] else ""
    if kind == "pad":
        return [f"self.{name}pad = {r.value(Slot(item[2]))}"]
    _, attr, key, width = item
    return [f'self.register_buffer("{name}index", torch.tensor({r.value(Slot(key))}), persistent=False)',
            f'self.register_buffer("{name}spread", spread_index(self.{name}index, {r.value(Slot(width))}), '
            f'persistent=False)']


def signature(code: LayerCode) -> tuple:
    r = Render(code.values, signature=True)
    return (code.base, tuple(tuple(init_lines(i, r, {})) for i in code.init), tuple(code.forward))


_ATTR_NAMES = {"k": "kernel_size"}


def param_names(keys: list[str]) -> dict[str, str]:
    """Readable constructor argument names for varying slots: in_chs, mid_chs, out_chs, stride,
    kernel_size, ... (qualified by their module, conv1_stride, where two would clash)."""
    def short(key):
        if key.startswith("chs:"):
            sym = key[4:]
            return {"in": "in_chs", "out": "out_chs"}.get(sym, sym.replace(".", "_") + "_chs")
        if key == "has_skip":
            return key
        scope, _, attr = key.rpartition(".")
        if attr in ("index", "pad"):   # channel maps and pads: whose (block_index, shortcut_pad, ...)
            return f"{scope.replace('.', '_')}_{attr}"
        return _ATTR_NAMES.get(attr, attr)

    shorts = {k: short(k) for k in keys}
    counts = {}
    for s in shorts.values():
        counts[s] = counts.get(s, 0) + 1
    out = {}
    for k, s in shorts.items():
        if counts[s] > 1 and not k.startswith("chs:"):
            scope, _, attr = k.rpartition(".")
            s = f"{scope.replace('.', '_')}_{_ATTR_NAMES.get(attr, attr)}" if scope else s
        out[k] = s
    return out


def ordered_params(code: LayerCode, varying: set) -> list[str]:
    """Widths first (in, mid..., out), then the rest in order of appearance, has_skip last."""
    keys = [k for k in code.values if k in varying]
    chs = sorted((k for k in keys if k.startswith("chs:")),
                 key=lambda k: (k != "chs:in", k == "chs:out", keys.index(k)))
    rest = [k for k in keys if not k.startswith("chs:") and k != "has_skip"]
    return chs + rest + (["has_skip"] if "has_skip" in varying else [])


def annotation(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (tuple, list)):
        return "List[int]"
    return type(value).__name__


@dataclass
class SharedClass:
    name: str
    members: list                 # LayerCodes
    params: dict                  # slot key -> argument name, in constructor order

    def text(self) -> str:
        code = self.members[0]
        r = Render(code.values, self.params)
        skip = "" if "has_skip" not in code.values else ", plus the input when has_skip" \
            if "has_skip" in self.params else ", plus the input" if code.values["has_skip"] else ""
        doc = code.doc.replace(_SKIP, skip)
        layers = [m.layer.name for m in self.members]
        used = ", ".join(layers) if len(layers) <= 6 else f"{', '.join(layers[:3])}, ..., {layers[-1]}"
        args = ["self"] + [f"{n}: {annotation(code.values[k])}" for k, n in self.params.items()]
        doc = textwrap.fill(doc, WIDTH, initial_indent='    """', subsequent_indent="    ")
        lines = [f"class {self.name}(nn.Module):", doc, "",
                 f"    Layer{'s' if len(layers) > 1 else ''} {used}.", '    """', "",
                 "    " + wrap_call("def __init__", args, 4, ":"), "        super().__init__()"]
        for item in sorted(code.init, key=lambda i: ("flag", "module", "index", "pad").index(i[0])):
            lines += ["        " + line for line in init_lines(item, r, self.params)]
        lines += ["", "    def forward(self, x: torch.Tensor) -> torch.Tensor:"]
        for cond, line in code.forward:
            if cond is None:
                lines.append("        " + line)
            elif cond[1] in self.params:
                lines += [f"        if self.{self.params[cond[1]]}:", "            " + line] if cond[0] == "when" \
                    else ["        " + line]
            elif code.values[cond[1]]:
                lines.append("        " + line)
        return "\n".join(lines)

    def instance(self, code: LayerCode, indent: int) -> str:
        """`Class(widths..., name=value, ...)`; when that is too long for one line, the widths
        stay on the first line and each keyword argument gets its own."""
        widths = [literal(code.values[k]) for k in self.params if k.startswith("chs:")]
        keywords = [f"{n}={literal(code.values[k])}" for k, n in self.params.items() if not k.startswith("chs:")]
        one = f"{self.name}({', '.join(widths + keywords)})"
        if indent + len(one) <= WIDTH or not keywords:
            return one
        pad = " " * (indent + 4)
        first = f"{self.name}(" + "".join(f"{w}, " for w in widths).rstrip() + "\n"
        return first + "".join(f"{pad}{k},\n" for k in keywords) + " " * indent + ")"


def share(codes: list[LayerCode], taken: set) -> tuple[list[SharedClass], dict]:
    """One class per layer structure; what differs between its layers becomes constructor arguments.
    Returns the classes in order of first use and, per layer code, its class."""
    groups: dict = {}
    for code in codes:
        if code.single is None:
            groups.setdefault(signature(code), []).append(code)
    classes, of = [], {}
    for members in groups.values():
        first = members[0]
        keys = list(first.values)
        if any(list(m.values) != keys for m in members):
            raise NasdslError(f"internal: layers {[m.layer.name for m in members]} share code but not slots")
        varying = {k for k in keys if any(m.values[k] != first.values[k] for m in members)}
        ordered = ordered_params(first, varying)
        names = param_names(ordered)
        name = unique(first.base, taken)
        cls = SharedClass(name, members, {k: names[k] for k in ordered})
        classes.append(cls)
        for m in members:
            of[id(m)] = cls
    return classes, of


def unique(base: str, taken: set) -> str:
    name, n = base, 2
    while name in taken or name in RESERVED:
        name, n = f"{base}{n}", n + 1
    taken.add(name)
    return name


def camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_") if part) or "Model"


# ---- the head ----------------------------------------------------------------------------------
@dataclass
class Head:
    """forward_head's modules as source: pre_pool (spatial ops after the last feature map),
    global_pool, pre_logits (ops between pooling and the classifier), head_drop, classifier."""
    pre_pool: list = field(default_factory=list)     # [(name, source)]
    pool: str = ""
    gap: bool = False                                # a plain global average: timm's pool types apply
    pool_kind: str = ""
    pre_logits: list = field(default_factory=list)   # [(name, source)]
    drop: float = 0.0
    classifier: Op | None = None
    names: dict = field(default_factory=dict)


def head_units(network: Network, first: int, taken_codes: list) -> list:
    """The ops of the layers after the feature maps, in order: ("op", op, position), or
    ("layer", code) for a flat layer that is not a plain chain (it becomes one module)."""
    units = []
    for li in range(first, len(network.layers)):
        layer = network.layers[li]
        if is_plain(layer):
            pos = positions(li, layer, "block") + positions(li, layer, "post")
            units += [("op", op, p) for op, p in zip((*layer.blocks[0].ops, *layer.post), pos)]
        elif li == len(network.layers) - 1 or not layer.in_shape.is_flat:
            raise NasdslError(f"cannot export layer {layer.name}: after the last feature map only plain chains "
                              f"of ops may come before pooling, and the last layer must be one chain")
        else:
            code = layer_code(layer, li)
            taken_codes.append(code)
            units.append(("layer", code))
    return units


def build_head(network: Network, first: int, codes: list) -> Head:
    units = head_units(network, first, codes)
    head = Head()
    last = units[-1]
    if last[0] != "op" or last[1].kind != "linear":
        raise NasdslError("cannot export: the network must end in a linear classifier")
    head.classifier = last[1]
    head.names[last[2]] = "classifier"
    cut = next((i for i, u in enumerate(units)
                if u[0] == "op" and not u[1].in_shape.is_flat and u[1].out_shape.is_flat), None)
    if cut is None or any(u[0] != "op" for u in units[:cut]):
        raise NasdslError("cannot export: the network's head must pool or flatten its last feature map")
    pool = units[cut][1]
    head.gap, head.pool_kind = pool.kind == "gap", pool.kind
    head.pool = 'SelectAdaptivePool2d(pool_type="avg", flatten=True)' if head.gap else r_call(pool, False)
    head.names[units[cut][2]] = "global_pool"
    middle = units[cut + 1:-1]
    if middle and middle[-1][0] == "op" and middle[-1][1].kind == "dropout":
        head.drop = middle[-1][1].attrs["p"]
        head.names[middle[-1][2]] = "head_drop"
        middle = middle[:-1]
    head.pre_pool = head_modules(units[:cut], "pre_pool", head.names, fresh=False)
    head.pre_logits = head_modules(middle, "pre_logits", head.names, fresh=pool.spec.allocates(pool.attrs))
    return head


def r_call(op: Op, inplace: bool) -> str:
    b = Builder()
    return Render(b.values).call(op_call(op, b, "", "in", "out", inplace))


def head_modules(units: list, attr: str, names: dict, fresh: bool) -> list:
    """[(name, source)] of an nn.Sequential(OrderedDict) at `attr`, filling in `names`."""
    ops = [u for u in units if u[0] == "op"]
    op_name = dict(zip((id(u) for u in ops), op_names([u[1] for u in ops])))
    out = []
    for u in units:
        if u[0] == "layer":
            code = u[1]
            name = re.sub(r"\W", "_", code.layer.name)
            out.append((name, code))
            names.update({p: f"{attr}.{name}" + (f".{n}" if n else "") for p, n in code.names.items()})
            fresh = True
            continue
        name = op_name[id(u)]
        if name is None:
            continue
        out.append((name, r_call(u[1], fresh)))
        names[u[2]] = f"{attr}.{name}"
        fresh = fresh or u[1].spec.allocates(u[1].attrs)
    return out


# ---- the module --------------------------------------------------------------------------------
def feature_layers(network: Network) -> int:
    """Layers up to the last one that outputs a feature map (NasNet's split); the rest is the head."""
    return max((i + 1 for i, layer in enumerate(network.layers[:-1]) if not layer.out_shape.is_flat), default=0)


def stage_ranges(network: Network) -> list[tuple[int, int, int]]:
    """(first layer, last layer, reduction) per stage: one stage per timm feature map, each
    ending at the last layer of one reduction (nasdsl.supernet.network.feature_points)."""
    from nasdsl.supernet.network import feature_points

    points = feature_points(network.to_config())
    out, start = [], 0
    for end, reduction in points:
        out.append((start, end, reduction))
        start = end + 1
    return out


def label(layer: Layer, room: int) -> str:
    """`name: what the space said`, cut to `room` columns; a merged block lists its candidates by
    what differs between them ("s1.1: mbconv 24: k3e3 k5e6 k7e3")."""
    labels = []
    for block in layer.blocks:
        parts = [p.split() for p in block.label.split(" + ")]
        if len(parts) == 1:
            labels.append(block.label)
            continue
        common = [t for t in parts[0] if all(t in p for p in parts)]
        rest = " ".join("".join(t for t in p if t not in common) for p in parts)
        labels.append(f"{' '.join(common)}: {rest}" if common else rest)
    text = f"{layer.name}: {' | '.join(labels)}"
    return text if len(text) <= room else text[:max(room - 3, len(layer.name))] + "..."


def instance(code: LayerCode, of: dict, indent: int) -> str:
    if code.single is not None:
        return Render(code.values).call(code.single)
    return of[id(code)].instance(code, indent)


def stages_text(network: Network, codes: list, of: dict, names: dict) -> list[str]:
    """The model constructor's `self.stages = nn.Sequential(...)` lines; fills in `names`."""
    lines = ["self.stages = nn.Sequential("]
    for s, (start, end, reduction) in enumerate(stage_ranges(network)):
        layer = network.layers[end]
        lines.append(f"    nn.Sequential(  # stage {s}: {layer.width} channels at 1/{reduction}")
        for i, li in enumerate(range(start, end + 1)):
            code = codes[li]
            path = f"stages.{s}.{i}"
            names.update({p: path + (f".{n}" if n else "") for p, n in code.names.items()})
            text = instance(code, of, 16) + ","
            room = WIDTH - 16 - len(text.splitlines()[-1]) - 4
            if room >= 20:
                lines.append(f"        {text}  # {label(code.layer, room)}")
            else:
                lines += [f"        # {label(code.layer, WIDTH - 18)}", f"        {text}"]
        lines.append("    ),")
    lines.append(")")
    return lines


def head_text(head: Head, of: dict) -> list[str]:
    """The model constructor's head lines."""
    def seq(attr, items):
        if not items:
            return []
        body = [f"    ({n!r}, {instance(s, of, 8) if isinstance(s, LayerCode) else s})," for n, s in items]
        return [f"self.{attr} = nn.Sequential(OrderedDict([", *body, "]))"]

    c = head.classifier
    bias = "" if c.attrs["bias"] else ", bias=False"
    return [*seq("pre_pool", head.pre_pool), f"self.global_pool = {head.pool}", *seq("pre_logits", head.pre_logits),
            "self.head_drop = nn.Dropout(drop_rate)",
            f"self.classifier = nn.Linear(self.head_hidden_size, num_classes{bias}) if num_classes > 0 "
            f"else nn.Identity()"]


def first_convs(network: Network, names: dict) -> list[str]:
    """Module names of the convs that read the input image (timm adapts these to in_chans)."""
    channels = network.input_shape.channels
    for li, layer in enumerate(network.layers[:-1]):
        found, chains = [], [(positions(li, layer, "block", j), b.ops) for j, b in enumerate(layer.blocks)]
        if layer.shortcut is not None:
            chains.append((positions(li, layer, "shortcut"), layer.shortcut.ops))
        for pos, ops in chains:
            for p, op in zip(pos, ops):
                if op.kind == "conv":
                    if op.in_shape.channels == channels and op.attrs["groups"] == 1:
                        found.append(names[p])
                    break
                if op.kind in ("select", "flatten", "linear", "mixconv"):
                    break
        if found or any(op.kind in ("conv", "mixconv") for _, ops in chains for op in ops):
            return found
    return []


def helpers(classes: list, codes: list, head: Head) -> str:
    """The helper modules and functions the generated code calls: network.py's own (copied, not
    retyped) and the channel placement functions, only those used."""
    from nasdsl.supernet import network as net

    text = "\n".join([*(c.text() for c in classes), *(instance(c, {}, 0) for c in codes if c.single is not None),
                      head.pool, *(s for _, s in head.pre_pool + head.pre_logits if isinstance(s, str))])
    parts = [inspect.getsource(getattr(net, n)) for n in ("Select", "Subsample", "MixConv", "GlobalAvgPool",
                                                          "SqueezeExcite") if re.search(rf"\b{n}\(", text)]
    if "place(" in text or "add_at(" in text:
        parts.append(_PLACEMENT)
    leaves = []   # what Select and add_at call: network.py's channels-last gather and scatter
    if re.search(r"\bSelect\(", text):
        leaves.append("_select")
    if "add_at(" in text:
        leaves.append("_index_add")
    if leaves:
        parts += [inspect.getsource(getattr(net, n)) for n in (*leaves, "_channels_last")]
        parts += [f'torch.fx.wrap("{n}")  # a leaf for torch.fx: its memory-format test is not traceable'
                  for n in leaves]
    return "\n\n\n".join(p.strip("\n") for p in parts)


_PLACEMENT = '''
def spread_index(index: torch.Tensor, width: int) -> torch.Tensor:
    """For `place`: per channel of a `width`-channel map, the channel of y that lands there, or
    len(index) (the zero channel `place` pads onto y) where none does."""
    spread = torch.full((width,), len(index), dtype=torch.long)
    spread[index] = torch.arange(len(index))
    return spread


def place(y: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """y's channels at their places in a wider map, zeros elsewhere: a zero channel padded onto y,
    then one gather (a Concat and a Gather in ONNX)."""
    return torch.cat([y, torch.zeros_like(y.narrow(1, 0, 1))], 1).index_select(1, spread)


def add_at(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """x with y added to its channels `index`: index_add (`_index_add`, which keeps a channels-last
    map channels-last), the fastest in PyTorch. Under ONNX export a gather (`place`) instead:
    index_add exports as a ScatterElements over an index the size of the whole map, which made a
    pruned ResNet-56 in onnxruntime barely faster than the unpruned one."""
    if not torch.jit.is_scripting():  # TorchScript skips this; it cannot compile the ONNX test
        if torch.onnx.is_in_onnx_export():
            return x + place(y, spread)
    return _index_add(x, index, y, False)
'''


def model_text(cls: str, network: Network, head: Head, body: list[str], head_lines: list[str], info: list[dict],
               hidden: int, features: int, title: str) -> str:
    """The model class: constructor, timm's model API, forward."""
    from nasdsl.supernet.network import NasNet

    channels = network.input_shape.channels
    init = [
        "super().__init__()",
        f"if in_chans != {channels}:",
        f'    raise ValueError(f"{cls} takes {channels}-channel images (in_chans={channels}), not {{in_chans}}")',
        "self.num_classes = num_classes",
        f"self.num_features = {features}  # channels of forward_features' map",
        f"self.head_hidden_size = {hidden}  # the classifier's input",
        "self.drop_rate = drop_rate",
        *body,
        "self.feature_info = [",
        *[f'    dict(num_chs={f["num_chs"]}, reduction={f["reduction"]}, module="{f["module"]}"),' for f in info],
        "]",
        *head_lines,
        "self._init_weights()",
    ]
    forward_head = ["x = self.pre_pool(x)"] * bool(head.pre_pool) + ["x = self.global_pool(x)"] + \
        ["x = self.pre_logits(x)"] * bool(head.pre_logits) + ["x = self.head_drop(x)"]
    prune = ["self.pre_pool = nn.Identity()"] * bool(head.pre_pool) + ["self.global_pool = nn.Identity()"] + \
        ["self.pre_logits = nn.Identity()"] * bool(head.pre_logits)
    text = _MODEL.format(
        cls=cls, title=title, classes=network.num_classes, channels=channels, drop=head.drop,
        init="\n".join(("        " + line) if line else "" for line in init),
        init_weights=inspect.getsource(NasNet._init_weights).rstrip(),
        matcher=_MATCHER if info else "",
        reset=_RESET_POOL if head.gap and not head.pre_logits else _RESET_FIXED.format(pool=head.pool_kind),
        forward_head="\n".join("        " + line for line in forward_head),
        prune="\n".join("            " + line for line in prune))
    return text


_MODEL = '''
class {cls}(nn.Module):
    """{title}.

    stages[i] ends at timm's i-th feature map (feature_info); forward_features returns the last
    stage's map, forward_head pools and classifies it. Constructor: num_classes (0: no classifier),
    in_chans (the network's only), drop_rate (the dropout before the classifier).
    """

    def __init__(self, num_classes: int = {classes}, in_chans: int = {channels}, drop_rate: float = {drop}):
{init}

{init_weights}
{matcher}
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier

{reset}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
{forward_head}
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's feature API: the stage outputs picked by `indices` (None: all; n: the last n; a
        list: those, negative from the end) and, unless intermediates_only, the final map."""
        assert output_fmt == "NCHW", "Output shape must be NCHW."
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        if torch.jit.is_scripting() or not stop_early:
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drops the stages after the last picked feature map (and the head): what timm's
        features_only model keeps. Returns the picked indices, counted from the start."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_head:
{prune}
            self.reset_classifier(0)
        return take_indices
'''

_MATCHER = '''
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stages\\.0\\.0\\.", blocks=r"^stages\\.(\\d+)" if coarse else r"^stages\\.(\\d+)\\.(\\d+)")
'''

_RESET_POOL = '''    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier for num_classes (0: none, forward gives pooled features). global_pool:
        None keeps the pooling, else one of timm's ('avg', 'max', 'avgmax', 'catavgmax'; '': none)."""
        self.num_classes = num_classes
        if global_pool is None:
            self.classifier = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        else:
            self.global_pool, self.classifier = create_classifier(self.num_features, num_classes, global_pool)
            self.head_hidden_size = self.num_features * self.global_pool.feat_mult()'''

_RESET_FIXED = '''    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier for num_classes (0: none, forward gives the pre-logits features). The
        pooling ({pool}) is part of the searched architecture: global_pool must be None."""
        if global_pool is not None:
            raise ValueError(f"this network's pooling is fixed ({pool}); cannot use global_pool={{global_pool!r}}")
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()'''


# ---- assembly ----------------------------------------------------------------------------------
def generate(network: Network, name: str, pretrained_cfg: dict, title: str | None = None) -> Generated:
    """The model module for `network` registered with timm as `name`. `pretrained_cfg` is timm's
    default cfg for it; its first_conv, classifier and pool_size are filled in from the code."""
    if not network.layers or network.input_shape.is_flat:
        raise NasdslError("timm export needs a network of layers on an image input")
    cls = camel(name)
    cls = cls if cls != name and cls not in RESERVED else cls + "Model"
    taken = {cls, name}
    split = feature_layers(network)
    codes = [layer_code(layer, li) for li, layer in enumerate(network.layers[:split])]
    head_codes: list = []
    head = build_head(network, split, head_codes)
    classes, of = share(codes + head_codes, taken)
    names = dict(head.names)
    body = stages_text(network, codes, of, names)
    head_lines = head_text(head, of)
    ranges = stage_ranges(network)
    info = [{"num_chs": network.layers[end].width, "reduction": r, "module": f"stages.{s}"}
            for s, (_, end, r) in enumerate(ranges)]
    features = network.layers[split - 1].width if split else network.input_shape.channels
    hidden = head.classifier.in_shape.channels
    title = title or f"{network.name}, searched with nasdsl"
    convs = first_convs(network, names)
    last_map = network.layers[split - 1].out_shape if split else network.input_shape
    cfg = {**pretrained_cfg, "num_classes": network.num_classes, "pool_size": tuple(last_map.size) or None,
           "first_conv": convs[0] if len(convs) == 1 else (tuple(convs) or None), "classifier": "classifier"}
    marker = {"format": FORMAT, "version": __version__, "name": name, "model": cls}
    parts = [helpers(classes, codes + head_codes, head), *(c.text() for c in classes),
             model_text(cls, network, head, body, head_lines, info, hidden, features, title)]
    model = "\n\n\n".join(t.strip("\n") for t in parts if t.strip())
    head_text_ = _HEADER.format(name=name, title=title, version=__version__, marker=repr(marker),
                                summary=summary(network, len(info), hidden), usage=usage(name))
    model_part = reflow(head_text_.strip("\n") + "\n\n\n" + model.strip("\n") + "\n")
    entry = _ENTRY.format(name=name, cls=cls, cfg=pretty({**cfg, "file": Source(_WEIGHTS_FILE)}, 4),
                          indices=tuple(range(len(info))), title=title)
    text = model_part + "\n\n" + entry.lstrip("\n")
    try:
        compile(text, f"{name}.py", "exec", dont_inherit=True)   # code that does not parse is our bug: fail here
    except SyntaxError as exc:
        raise NasdslError(f"internal: the generated module does not parse ({exc.msg}, line {exc.lineno})") from None
    return Generated(text, model_part, cls, names, cfg, features, text.count("\n"))


def usage(name: str) -> str:
    lines = [(f"import timm, {name}", "with this folder on sys.path"),
             (f'model = timm.create_model("{name}", pretrained=True)', "model.safetensors here"),
             ('model = timm.create_model("local-dir:THIS_FOLDER", pretrained=True)', "config.json + weights"),
             (f'backbone = timm.create_model("{name}", pretrained=True, features_only=True)', "")]
    width = max(len(code) for code, note in lines if note) + 2
    return "\n".join(f"    {code.ljust(width)}# {note}" if note else f"    {code}" for code, note in lines)


def summary(network: Network, stages: int, hidden: int) -> str:
    shape = network.input_shape
    return (f"{len(network.layers)} layers in {stages} stages on {shape.channels}x{shape.height}x{shape.width} "
            f"images, {hidden} features into {network.num_classes} classes")


class Source(str):
    """Text written into a literal as code (its repr is itself)."""

    def __repr__(self) -> str:
        return str(self)


_WEIGHTS_FILE = "_WEIGHTS if os.path.isfile(_WEIGHTS) else None"


def pretty(value, indent: int, lead: int = 0) -> str:
    """A Python literal of JSON-like data: one line where it fits, else one item per line.
    `indent` is the indentation of the line it starts on, `lead` the columns a key takes there."""
    flat = repr(value)
    if indent + lead + len(flat) + 1 <= WIDTH or not isinstance(value, (dict, list, tuple)) or not value:
        return flat
    pad = " " * (indent + 4)
    if isinstance(value, dict):
        items = [f"{pad}{k!r}: {pretty(v, indent + 4, len(repr(k)) + 2)}," for k, v in value.items()]
        return "{\n" + "\n".join(items) + "\n" + " " * indent + "}"
    items = [f"{pad}{pretty(v, indent + 4)}," for v in value]
    opening, closing = ("[", "]") if isinstance(value, list) else ("(", ")")
    return opening + "\n" + "\n".join(items) + "\n" + " " * indent + closing


def reflow(text: str) -> str:
    """Lines longer than WIDTH that hold a long list literal (channel indices) get the list's
    items packed into lines of their own."""
    return "\n".join(_reflow_line(line) if len(line) > WIDTH else line for line in text.split("\n"))


def _reflow_line(line: str) -> str:
    start = line.find("[")
    if start < 0:
        return line
    depth, items, item, end = 0, [], "", None
    for i in range(start + 1, len(line)):
        ch = line[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                end = i
                break
            depth -= 1
        if ch == "," and depth == 0:
            items.append(item.strip())
            item = ""
        else:
            item += ch
    if end is None or len(items) < 2:
        return line
    items.append(item.strip())
    indent = len(line) - len(line.lstrip())
    pad = " " * (indent + 4)
    rows, row = [], ""
    for it in items:
        if row and len(pad) + len(row) + len(it) + 2 > WIDTH:
            rows.append(pad + row.rstrip())
            row = ""
        row += it + ", "
    rows.append(pad + row.rstrip())
    return line[:start + 1] + "\n" + "\n".join(rows) + "\n" + " " * indent + line[end:]


_HEADER = '''
"""{name}: {title}, as PyTorch code generated by nasdsl {version}.

{summary}. Needs only torch and timm:

{usage}
"""
import os
from collections import OrderedDict
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import SelectAdaptivePool2d, create_classifier
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

__nasdsl_export__ = {marker}
'''

_ENTRY = REGISTRATION + '''
# timm.create_model("{name}", pretrained=True) loads the model.safetensors in this module's folder.

_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(globals().get("__file__") or ".")), "model.safetensors")

default_cfgs = generate_default_cfgs({{
    "{name}": {cfg},
}})


@register_model
def {name}(pretrained: bool = False, **kwargs) -> {cls}:
    """{cls}; pretrained: with the weights in model.safetensors beside this file."""
    feature_cfg = dict(feature_cls="getter", out_indices={indices})
    return build_model_with_cfg({cls}, "{name}", pretrained, feature_cfg=feature_cfg, **kwargs)
'''
