"""The primitive op catalogue: shape inference, parameters and MACs of each op kind.

Pure data, no torch. Every stage (compiler, accounting, derivation, the torch builder) agrees on
op kinds through this table, so adding an op means adding one entry here and one torch builder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from nasdsl.graph.ir import Shape


class ShapeError(ValueError):
    """An impossible shape; the compiler turns it into a located NasdslError."""


@dataclass(frozen=True)
class OpKind:
    name: str
    infer: Callable[[dict, Shape], Shape]
    params: Callable[[dict, Shape, Shape], int] = lambda a, i, o: 0
    macs: Callable[[dict, Shape, Shape], int] = lambda a, i, o: 0
    # channelwise ops map channel c of the input to channel c of the output and nothing else;
    # derivation relies on this to carry channel sets through them.
    channelwise: bool = True
    # every output value is one of the input values (a view, a subset, a maximum): a tensor keeps
    # its range through the op, so a ReLU after it on a ReLU's output changes nothing
    keeps_values: bool = False


def _need_map(shape: Shape, what: str) -> None:
    if shape.is_flat:
        raise ShapeError(f"{what} needs a feature map, got a flat vector of {shape.channels}")


def _spatial(size: int, k: int, stride: int, padding: int, what: str) -> int:
    out = (size + 2 * padding - k) // stride + 1
    if out < 1:
        raise ShapeError(f"{what} with kernel {k}, stride {stride}, padding {padding} shrinks a "
                         f"{size}x{size} map below 1x1")
    return out


def _conv_infer(a: dict, s: Shape) -> Shape:
    _need_map(s, "conv")
    g = a["groups"]
    if s.channels % g or a["out"] % g:
        raise ShapeError(f"groups={g} must divide both input channels ({s.channels}) and output "
                         f"channels ({a['out']})")
    h = _spatial(s.height, a["k"], a["stride"], a["padding"], "conv")
    w = _spatial(s.width, a["k"], a["stride"], a["padding"], "conv")
    return Shape(a["out"], (h, w))


def _conv_params(a, i: Shape, o: Shape) -> int:
    return o.channels * (i.channels // a["groups"]) * a["k"] ** 2 + (o.channels if a["bias"] else 0)


def _conv_macs(a, i: Shape, o: Shape) -> int:
    return o.numel * (i.channels // a["groups"]) * a["k"] ** 2


def _pool_infer(a: dict, s: Shape) -> Shape:
    _need_map(s, "pooling")
    return Shape(s.channels, (_spatial(s.height, a["k"], a["stride"], a["padding"], "pooling"),
                              _spatial(s.width, a["k"], a["stride"], a["padding"], "pooling")))


def _gap_infer(a: dict, s: Shape) -> Shape:
    _need_map(s, "global pooling")
    return Shape(s.channels, ())


def _flatten_infer(a: dict, s: Shape) -> Shape:
    return Shape(s.numel, ())


def _linear_infer(a: dict, s: Shape) -> Shape:
    if not s.is_flat:
        raise ShapeError(f"linear needs a flat vector, got a {s} map: add `flatten` or `gap` first")
    return Shape(a["out"], ())


def _subsample_infer(a: dict, s: Shape) -> Shape:
    _need_map(s, "subsample")
    st = a["stride"]
    return Shape(s.channels, (-(-s.height // st), -(-s.width // st)))


def _same(a: dict, s: Shape) -> Shape:
    return s


def _select_infer(a: dict, s: Shape) -> Shape:
    index = a["index"]
    if not index or len(set(index)) != len(index) or min(index) < 0 or max(index) >= s.channels:
        raise ShapeError(f"select needs distinct channel indices in [0, {s.channels}), got {list(index)}")
    return Shape(len(index), s.size)


OPS: dict[str, OpKind] = {k.name: k for k in (
    OpKind("conv", _conv_infer, _conv_params, _conv_macs, channelwise=False),
    OpKind("bn", _same, lambda a, i, o: 2 * i.channels),
    OpKind("act", _same),
    OpKind("gate", _same),
    OpKind("dropout", _same, keeps_values=True),  # at inference, where derivation's equivalence holds
    OpKind("maxpool", _pool_infer, keeps_values=True),
    OpKind("avgpool", _pool_infer),
    OpKind("gap", _gap_infer),
    OpKind("subsample", _subsample_infer, keeps_values=True),
    OpKind("flatten", _flatten_infer, channelwise=False, keeps_values=True),
    # keeps the listed input channels, in order (derivation emits it where a depthwise conv loses
    # channels of a tensor that other consumers still need)
    OpKind("select", _select_infer, channelwise=False, keeps_values=True),
    OpKind("linear", _linear_infer, lambda a, i, o: o.channels * i.channels + (o.channels if a["bias"] else 0),
           lambda a, i, o: o.channels * i.channels, channelwise=False),
)}

ACTIVATIONS = ("relu", "relu6", "hswish", "identity")


def is_depthwise(op) -> bool:
    """A conv whose every group is one channel in and one out: channelwise for derivation."""
    return op.kind == "conv" and op.attrs["groups"] == op.in_shape.channels == op.out_shape.channels


def infer(kind: str, attrs: dict, shape: Shape) -> Shape:
    return OPS[kind].infer(attrs, shape)
