"""The ops a .space file can call: their signatures, and how composites lower to primitive ops.

Each builtin lowers to `Parts`: the ops of the block's main path, an optional internal shortcut and
ops after the add. Gates are inserted here, where the paper places them: after each BN, before the
activation; on MBConv's mid and output channels; never on shortcuts. An SE has no gate of its own
(it follows the gate before it), and a grouped conv's neighbouring BNs none (it cannot be cut).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from nasdsl.graph.ir import Op, Shape, Shortcut
from nasdsl.graph.ops import ACTIVATIONS, SE_GATES, infer, split_channels


class Symbol(str):
    """A bare word used as a value (`act=relu6`, `gate=off`)."""


BOOL_WORDS = {"on": True, "off": False, "true": True, "false": False}


@dataclass(frozen=True)
class Arg:
    name: str
    type: str                 # channels | kernel | kernels (one or a list) | counts (a list of channels) |
                              # index | stride | int0 | float | float0 | prob | bool | enum
    default: Any = None       # None: derived from other arguments (or required, see `required`)
    required: bool = False
    choices: tuple[str, ...] = ()


@dataclass
class Parts:
    ops: list[Op] = field(default_factory=list)
    shortcut: Shortcut | None = None
    post: list[Op] = field(default_factory=list)


class Lowering:
    """Appends ops to a block under construction, tracking the running shape and gate names."""

    def __init__(self, block_name: str, shape: Shape, gate: bool):
        self.block_name = block_name
        self.shape = shape
        self.gate = gate
        self.gate_names: list[str] = []

    def op(self, kind: str, **attrs) -> Op:
        out = infer(kind, attrs, self.shape)
        op = Op(kind, attrs, self.shape, out)
        self.shape = out
        return op

    def bn(self, ops: list, eps: float, momentum: float = 0.1, gate: str | None = None) -> None:
        ops.append(self.op("bn", eps=eps, momentum=momentum))
        if gate:
            self.add_gate(ops, gate)

    def add_gate(self, ops: list, gate: str) -> None:
        if self.gate:
            name, i = gate, 2
            while name in self.gate_names:  # a chain with several BNs: bn, bn2, bn3...
                name, i = f"{gate}{i}", i + 1
            self.gate_names.append(name)
            ops.append(self.op("gate", key=f"{self.block_name}.{name}"))

    def conv(self, out: int, k: int = 1, stride: int = 1, groups: int = 1, padding: int | None = None,
             bias: bool = False, split: int = 1) -> Op:
        """A conv; with split > 1, timm's split conv (a mixconv): input and output cut into `split`
        equal groups (timm's _split_channels), group i a dense conv from its inputs to its outputs."""
        if split == 1:
            return self.op("conv", out=out, k=k, stride=stride, groups=groups,
                           padding=k // 2 if padding is None else padding, bias=bias)
        if groups != 1 or bias or padding not in (None, k // 2):
            raise ValueError(f"split={split} takes neither groups, bias nor a padding other than k // 2 "
                             f"(timm's MixedConv2d)")
        return self.mixconv((k,) * split, split_channels(self.shape.channels, split), split_channels(out, split),
                            stride, depthwise=False)

    def dwconv(self, k, stride: int = 1, padding: int | None = None, bias: bool = False) -> Op:
        """A depthwise conv; with a list of kernels, timm's mixed depthwise conv (a mixconv): the
        channels cut into one equal group per kernel (timm's _split_channels)."""
        c = self.shape.channels
        if not isinstance(k, tuple):
            return self.conv(c, k, stride, c, padding, bias)
        if bias or padding is not None:
            raise ValueError("mixed kernels (k=[...]) take no bias and pad each kernel by k // 2")
        splits = split_channels(c, len(k))
        return self.mixconv(k, splits, splits, stride, depthwise=True)

    def mixconv(self, kernels, in_splits, out_splits, stride: int, depthwise: bool) -> Op:
        return self.op("mixconv", kernels=tuple(kernels), in_splits=tuple(in_splits), out_splits=tuple(out_splits),
                       stride=stride, depthwise=depthwise)


def make_divisible(v, divisor=8, min_value=None, round_limit=0.9):
    """Round channels to a multiple of `divisor`, never more than 10% down (the MobileNet rule)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < round_limit * v else new_v


# ---- composite blocks ------------------------------------------------------------------------
def se_channels(a: dict, cin: int, mid: int) -> int:
    """An MBConv's SE reduced channels: `se` times the block's input (timm's EfficientNet) or mid
    channels (MobileNetV3), rounded, or made divisible by `se_divisor` as MobileNetV3 does."""
    base = cin if a["se_of"] == "in" else mid
    if a["se_divisor"] == 1:
        return max(1, round(base * a["se"]))
    return make_divisible(base * a["se"], a["se_divisor"])


def _mbconv(lo: Lowering, a: dict) -> Parts:
    """Expand, depthwise, [SE], project. The SE scales the depthwise output after its gate and
    activation, so it follows the mid gate; its reduced channels are not gated (ops.py, `se`)."""
    cin = lo.shape.channels
    mid = a["mid"] if a["mid"] is not None else max(1, round(cin * a["e"]))
    ops: list[Op] = []
    if mid != cin or a["e"] != 1:
        ops.append(lo.conv(mid, split=a["expand_split"]))
        lo.bn(ops, a["eps"], a["momentum"])
        ops.append(lo.op("act", fn=a["act"]))
    elif a["expand_split"] != 1:
        raise ValueError(f"expand_split={a['expand_split']} needs an expansion conv, and e=1 has none")
    ops.append(lo.dwconv(a["k"], a["stride"]))
    lo.bn(ops, a["eps"], a["momentum"], gate="mid")
    ops.append(lo.op("act", fn=a["act"]))
    if a["se"] > 0:
        ops.append(lo.op("se", rd=se_channels(a, cin, mid), act=a["se_act"] or a["act"], fn=a["se_fn"]))
    ops.append(lo.conv(a["out"], split=a["project_split"]))
    lo.bn(ops, a["eps"], a["momentum"], gate="out")
    return Parts(ops)


def _shortcut(lo: Lowering, kind: str, shape_in: Shape, out: int, stride: int, eps: float,
              momentum: float) -> Shortcut | None:
    """The ResNet shortcut: identity, option A (subsample + zero-padded channels) or 1x1 projection."""
    if kind == "auto":
        kind = "identity" if stride == 1 and shape_in.channels == out else "proj"
    saved = lo.shape
    lo.shape = shape_in
    try:
        if kind == "identity":
            if stride != 1 or shape_in.channels != out:
                raise ValueError(f"an identity shortcut needs stride 1 and equal channels, got stride "
                                 f"{stride} and {shape_in.channels} -> {out}: use shortcut=pad or proj")
            return Shortcut()
        if kind == "pad":
            if out < shape_in.channels:
                raise ValueError(f"shortcut=pad cannot shrink {shape_in.channels} channels to {out}")
            ops = (lo.op("subsample", stride=stride),) if stride > 1 else ()
            front = (out - shape_in.channels) // 2
            index = tuple(range(front, front + shape_in.channels))
            return Shortcut(ops, None if index == tuple(range(out)) else index)
        ops = [lo.conv(out, 1, stride)]
        lo.bn(ops, eps, momentum)
        return Shortcut(tuple(ops))
    finally:
        lo.shape = saved


def _basic(lo: Lowering, a: dict) -> Parts:
    shape_in = lo.shape
    mid = a["mid"] if a["mid"] is not None else a["out"]
    ops: list[Op] = [lo.conv(mid, 3, a["stride"])]
    lo.bn(ops, a["eps"], a["momentum"], gate="bn1")
    ops.append(lo.op("act", fn=a["act"]))
    ops.append(lo.conv(a["out"], 3))
    lo.bn(ops, a["eps"], a["momentum"], gate="bn2")
    sc = _shortcut(lo, a["shortcut"], shape_in, a["out"], a["stride"], a["eps"], a["momentum"])
    return Parts(ops, sc, [lo.op("act", fn=a["act"])])


def _bottleneck(lo: Lowering, a: dict) -> Parts:
    """1x1, 3x3 (grouped for ResNeXt), 1x1. A grouped conv cannot lose channels unevenly between
    its groups, so with groups > 1 neither its input (bn1) nor its output (bn2) is gated; bn3 is."""
    shape_in = lo.shape
    mid = a["mid"] if a["mid"] is not None else max(1, a["out"] // 4)
    gated = a["groups"] == 1
    ops: list[Op] = [lo.conv(mid, 1)]
    lo.bn(ops, a["eps"], a["momentum"], gate="bn1" if gated else None)
    ops.append(lo.op("act", fn=a["act"]))
    ops.append(lo.conv(mid, 3, a["stride"], groups=a["groups"]))
    lo.bn(ops, a["eps"], a["momentum"], gate="bn2" if gated else None)
    ops.append(lo.op("act", fn=a["act"]))
    ops.append(lo.conv(a["out"], 1))
    lo.bn(ops, a["eps"], a["momentum"], gate="bn3")
    sc = _shortcut(lo, a["shortcut"], shape_in, a["out"], a["stride"], a["eps"], a["momentum"])
    return Parts(ops, sc, [lo.op("act", fn=a["act"])])


# ---- primitive ops ---------------------------------------------------------------------------
def _conv(lo, a):
    return Parts([lo.conv(a["out"], a["k"], a["stride"], a["groups"], a["padding"], a["bias"], a["split"])])


def _dwconv(lo, a):
    return Parts([lo.dwconv(a["k"], a["stride"], a["padding"], a["bias"])])


def _mixconv(lo, a):
    """Every group explicit (what a derived network prints): a kernel per group, or one for all."""
    splits = a["split"]
    kernels = a["k"] if isinstance(a["k"], tuple) else (a["k"],) * len(splits)
    return Parts([lo.mixconv(kernels, splits, a["out"] if a["out"] is not None else splits, a["stride"],
                             a["depthwise"])])


def _bn(lo, a):
    ops: list[Op] = []
    lo.bn(ops, a["eps"], a["momentum"], gate="bn" if a["gate"] else None)
    return Parts(ops)


def _se(lo, a):
    return Parts([lo.op("se", rd=a["rd"], act=a["act"], fn=a["fn"])])


def _gate(lo, a):
    ops: list[Op] = []
    lo.add_gate(ops, "gate")
    return Parts(ops)


def _pool(kind):
    def lower(lo, a):
        stride = a["stride"] if a["stride"] is not None else a["k"]
        return Parts([lo.op(kind, k=a["k"], stride=stride, padding=a["padding"])])
    return lower


@dataclass(frozen=True)
class Builtin:
    name: str
    args: tuple[Arg, ...]
    lower: Callable[[Lowering, dict], Parts]
    composite: bool = False
    doc: str = ""
    # a layer of these blocks at stride 1 gets `residual=auto`'s shortcut when its shapes allow
    # (MBConv's inverted residual); the compiler asks this instead of naming the block
    auto_residual: bool = False

    @property
    def has_stride(self) -> bool:
        return any(a.name == "stride" for a in self.args)


_ACT = Arg("act", "enum", "relu", choices=ACTIVATIONS)
_EPS = Arg("eps", "float", 1e-5)
# the composites' BN momentum (torchvision's MobileNetV3 and EfficientNet train with 0.01)
_MOMENTUM = Arg("momentum", "float", 0.1)
_GATE = Arg("gate", "bool", True)
_SHORTCUT = Arg("shortcut", "enum", "auto", choices=("auto", "identity", "pad", "proj"))
_SE_FN = Arg("fn", "enum", "sigmoid", choices=SE_GATES)

BUILTINS: dict[str, Builtin] = {b.name: b for b in (
    Builtin("conv", (Arg("out", "channels", required=True), Arg("k", "kernel", 3), Arg("stride", "stride", 1),
                     Arg("groups", "stride", 1), Arg("padding", "int0"), Arg("bias", "bool", False),
                     Arg("split", "stride", 1)), _conv,
            doc="convolution; padding defaults to k // 2; split=G: G equal channel groups, each its own conv "
                "(timm's MixedConv2d, MixNet's split 1x1 convs)"),
    Builtin("dwconv", (Arg("k", "kernels", 3), Arg("stride", "stride", 1), Arg("padding", "int0"),
                       Arg("bias", "bool", False)), _dwconv,
            doc="depthwise convolution; k=[3, 5, 7]: mixed kernels, one per equal channel group (MixConv)"),
    Builtin("mixconv", (Arg("k", "kernels", required=True), Arg("split", "counts", required=True),
                        Arg("out", "counts"), Arg("stride", "stride", 1), Arg("depthwise", "bool", False)), _mixconv,
            doc="timm's MixedConv2d with explicit groups: input groups `split`, output groups `out` (default: "
                "split), a kernel per group (or one for all); depthwise=on: depthwise groups"),
    Builtin("bn", (_EPS, _MOMENTUM, _GATE), _bn,
            doc="batch norm (1d or 2d from the input); gated by default"),
    *(Builtin(fn, (), lambda lo, a, fn=fn: Parts([lo.op("act", fn=fn)]), doc="activation") for fn in ACTIVATIONS),
    Builtin("gate", (), _gate, doc="a gate on every channel, for networks without BN (put it where the BN "
                                   "would be: after the conv, before the activation); `[gate=off]` removes it"),
    Builtin("maxpool", (Arg("k", "kernel", 2), Arg("stride", "stride"), Arg("padding", "int0", 0)), _pool("maxpool")),
    Builtin("avgpool", (Arg("k", "kernel", 2), Arg("stride", "stride"), Arg("padding", "int0", 0)), _pool("avgpool")),
    Builtin("select", (Arg("index", "index", required=True),),
            lambda lo, a: Parts([lo.op("select", index=tuple(a["index"]))]),
            doc="keep the listed input channels, in order (derived networks use it)"),
    Builtin("subsample", (Arg("stride", "stride", 2),), lambda lo, a: Parts([lo.op("subsample", stride=a["stride"])]),
            doc="keep every stride-th pixel (the spatial part of an option-A shortcut)"),
    Builtin("gap", (), lambda lo, a: Parts([lo.op("gap")]), doc="global average pooling to a flat vector"),
    Builtin("flatten", (), lambda lo, a: Parts([lo.op("flatten")])),
    Builtin("linear", (Arg("out", "channels", required=True), Arg("bias", "bool", True)),
            lambda lo, a: Parts([lo.op("linear", out=a["out"], bias=a["bias"])])),
    Builtin("dropout", (Arg("p", "prob", 0.5),), lambda lo, a: Parts([lo.op("dropout", p=a["p"])])),
    Builtin("se", (Arg("rd", "channels", required=True), _ACT, _SE_FN), _se,
            doc="squeeze-and-excitation: x * fn(conv(act(conv(mean(x))))), rd reduced channels (not gated)"),
    Builtin("mbconv", (Arg("out", "channels", required=True), Arg("k", "kernels", 3), Arg("e", "float", 6),
                       Arg("stride", "stride", 1), Arg("act", "enum", "relu6", choices=ACTIVATIONS),
                       Arg("mid", "channels"), _EPS, _MOMENTUM, _GATE, Arg("se", "float0", 0.0),
                       Arg("se_of", "enum", "in", choices=("in", "mid")), Arg("se_divisor", "stride", 1),
                       Arg("se_act", "enum", None, choices=ACTIVATIONS), Arg("se_fn", "enum", "sigmoid", choices=SE_GATES),
                       Arg("expand_split", "stride", 1), Arg("project_split", "stride", 1)),
            _mbconv, composite=True, auto_residual=True,
            doc="inverted residual: 1x1 expand, kxk depthwise, [SE], 1x1 project; residual when stride 1 and "
                "in == out; se > 0 adds squeeze-and-excitation with the block's act unless se_act; k=[3, 5]: "
                "mixed depthwise kernels; expand_split, project_split: split 1x1 convs (MixNet)"),
    Builtin("basic", (Arg("out", "channels", required=True), Arg("stride", "stride", 1), _SHORTCUT, _ACT,
                      Arg("mid", "channels"), _EPS, _MOMENTUM, _GATE), _basic, composite=True,
            doc="ResNet basic block; shortcut=pad is CIFAR option A, proj the 1x1 projection"),
    Builtin("bottleneck", (Arg("out", "channels", required=True), Arg("stride", "stride", 1),
                           Arg("mid", "channels"), _SHORTCUT, _ACT, _EPS, _MOMENTUM, _GATE, Arg("groups", "stride", 1)),
            _bottleneck, composite=True,
            doc="ResNet bottleneck (1x1, 3x3, 1x1); mid defaults to out / 4; groups > 1: ResNeXt (bn3 gated only)"),
)}
