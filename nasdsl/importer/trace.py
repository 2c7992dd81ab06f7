"""A trained CNN as a chain of the language's primitive ops, traced with torch.fx.

torch.fx records what the model's forward calls. Modules the language has a word for are kept
whole as fx leaves (a conv, a BN, timm's BN-with-activation, an SE module, a pooling); everything
the forward computes between them (`x + shortcut`, `torch.flatten`, `x.mean((2, 3))`) arrives as a
function call. Each becomes a `Prim`: an op kind of the catalogue (nasdsl.graph.ops) with its attrs
and shapes, the module holding its weights, and the block it runs in (`unit`, from fx's module
stack), which is what nasdsl.importer.structure groups into layers. Ops that are the identity at
inference (nn.Identity, DropPath, adaptive pooling to the size it already has) disappear; anything
else the language cannot say is a one-line error naming the module and the operation, never a
wrong space.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from nasdsl.errors import NasdslError
from nasdsl.graph.ir import Op, Shape
from nasdsl.graph.ops import OPS, ShapeError

# module classes kept whole by the tracer, by name (timm's and torchvision's, without importing either)
SE_MODULES = ("SqueezeExcite", "SqueezeExcitation")
IDENTITY_MODULES = ("Identity", "DropPath", "StochasticDepth")
LEAF_NAMES = SE_MODULES + IDENTITY_MODULES + ("SelectAdaptivePool2d", "MixedConv2d", "Conv2dSame",
                                              "CondConv2d", "BlurPool2d")
ACTIVATION_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hswish", nn.SiLU: "silu"}
ACTIVATION_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.hardswish: "hswish",
                        F.silu: "silu"}
GATE_FUNCTIONS = {nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hsigmoid"}


@dataclass(eq=False)
class Prim:
    """One op of the traced model: a catalogue op kind, or "input" / "add" (a residual sum)."""
    kind: str
    attrs: dict
    in_shape: Shape | None
    out_shape: Shape
    inputs: list["Prim"] = field(default_factory=list)
    module: str = ""          # the module whose state dict holds the op's tensors ("": none)
    unit: str = ""            # the outermost block-like module it runs in ("": the model's own forward)
    # a 1x1 conv on a pooled map, imported as a linear: its weight loses the two 1x1 dims
    conv_as_linear: bool = False

    @property
    def op(self) -> Op:
        return Op(self.kind, dict(self.attrs), self.in_shape, self.out_shape)

    @property
    def weighted(self) -> bool:
        return bool(self.module) and self.kind in ("conv", "mixconv", "linear")


class _Tracer(fx.Tracer):
    """Keeps timm's and torchvision's composite leaves (BN + activation, SE, ...) whole."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (type(m).__name__ in LEAF_NAMES or isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm))
                or super().is_leaf_module(m, qualname))


def unit_of(node: fx.Node) -> str:
    """The outermost module on the node's stack that is not a plain container (nn.Sequential,
    nn.ModuleList): a block, a stem conv, a classifier. Subclasses of Sequential (torchvision's
    Conv2dNormActivation) count as blocks."""
    for path, cls in _stack(node):
        if cls not in (nn.Sequential, nn.ModuleList):
            return path
    return ""


def _stack(node: fx.Node) -> list[tuple[str, type]]:
    """fx's record of the modules a node runs in, outermost first, as (path, class)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [v for v in stack.values() if isinstance(v, tuple) and len(v) == 2 and v[0]]


class Converter:
    """fx nodes -> Prims, one node at a time, in the graph's order."""

    def __init__(self, source: str, gm: fx.GraphModule):
        self.source = source
        self.modules = dict(gm.named_modules())
        self.of: dict[fx.Node, Prim] = {}
        self.prims: list[Prim] = []
        self.output: Prim | None = None

    def fail(self, node: fx.Node, what: str) -> NasdslError:
        where = node.target if node.op == "call_module" else (unit_of(node) or "forward")
        return NasdslError(f"cannot import {where}: {what}; the .space language has no such op", file=self.source)

    def add(self, node: fx.Node, kind: str, attrs: dict, src: Prim, module: str = "", **extra) -> Prim:
        try:
            out = OPS[kind].infer(attrs, src.out_shape)
        except ShapeError as exc:
            raise self.fail(node, f"{kind}: {exc}") from None
        prim = Prim(kind, attrs, src.out_shape, out, [src], module, unit_of(node), **extra)
        self.prims.append(prim)
        return prim

    def convert(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            shape = node.meta["tensor_meta"].shape
            prim = Prim("input", {}, None, Shape(shape[1], tuple(shape[2:])))
            self.prims.append(prim)
        elif node.op == "output":
            self.output = self.of[node.args[0]]
            return
        elif node.op == "call_module":
            prim = self.module_node(node, self.modules[node.target])
        elif node.op == "call_function":
            prim = self.function_node(node)
        elif node.op == "call_method":
            prim = self.method_node(node)
        else:
            raise self.fail(node, f"{node.op} {node.target}")
        self.of[node] = prim

    def src(self, node: fx.Node) -> Prim:
        arg = node.args[0] if node.args else None
        if not isinstance(arg, fx.Node) or arg not in self.of:
            raise self.fail(node, f"{_what(node)} on something other than one tensor")
        return self.of[arg]

    def module_node(self, node: fx.Node, m: nn.Module) -> Prim:
        x, name = self.src(node), type(m).__name__
        if name in IDENTITY_MODULES or (isinstance(m, nn.Dropout) and m.p == 0):
            return x
        if name in SE_MODULES:
            return self.squeeze_excite(node, m, x)
        if name == "MixedConv2d":
            return self.mixed_conv(node, m, x)
        if isinstance(m, nn.Conv2d) and name not in LEAF_NAMES:
            return self.conv(node, m, x)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return self.batchnorm(node, m, x)
        if type(m) in ACTIVATION_MODULES:
            return self.add(node, "act", {"fn": ACTIVATION_MODULES[type(m)]}, x)
        if isinstance(m, nn.Linear):
            return self.add(node, "linear", {"out": m.out_features, "bias": m.bias is not None}, x, node.target)
        if isinstance(m, nn.Dropout):
            return self.add(node, "dropout", {"p": float(m.p)}, x)
        if isinstance(m, nn.Flatten):
            return self.flatten(node, x)
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            return self.pool(node, m, x)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return self.adaptive(node, m.output_size, x)
        if name == "SelectAdaptivePool2d" and getattr(m, "pool_type", "") == "avg":
            return self.adaptive(node, 1, x)
        raise self.fail(node, f"{name}")

    def conv(self, node: fx.Node, m: nn.Conv2d, x: Prim) -> Prim:
        k, s, p = m.kernel_size, m.stride, m.padding
        if (isinstance(p, str) or len({*k}) != 1 or len({*s}) != 1 or len({*p}) != 1 or m.dilation != (1, 1)
                or m.padding_mode != "zeros"):
            raise self.fail(node, f"Conv2d(kernel {k}, stride {s}, padding {p}, dilation {m.dilation}, "
                                  f"padding_mode {m.padding_mode!r}): only square kernels, strides and zero "
                                  f"padding without dilation")
        if x.out_shape.is_flat:   # a 1x1 conv on a pooled map (MobileNetV3's head) is a linear layer
            if k[0] != 1 or m.groups != 1:
                raise self.fail(node, f"a {k[0]}x{k[0]} conv after global pooling")
            return self.add(node, "linear", {"out": m.out_channels, "bias": m.bias is not None}, x, node.target,
                            conv_as_linear=True)
        attrs = {"out": m.out_channels, "k": k[0], "stride": s[0], "groups": m.groups, "padding": p[0],
                 "bias": m.bias is not None}
        return self.add(node, "conv", attrs, x, node.target)

    def mixed_conv(self, node: fx.Node, m: nn.Module, x: Prim) -> Prim:
        """timm's MixedConv2d (MixNet): consecutive input groups, each its own conv, outputs concatenated."""
        convs = list(m.values()) if isinstance(m, nn.ModuleDict) else list(m.children())
        plain = all(isinstance(c, nn.Conv2d) and type(c).__name__ == "Conv2d" and c.bias is None
                    and len({*c.kernel_size}) == 1 and c.dilation == (1, 1) and c.padding_mode == "zeros"
                    and c.padding == (c.kernel_size[0] // 2,) * 2 for c in convs)
        depthwise = plain and all(c.groups == c.in_channels == c.out_channels for c in convs)
        if not plain or len({c.stride for c in convs}) != 1 or not (depthwise or all(c.groups == 1 for c in convs)):
            raise self.fail(node, "MixedConv2d with bias, dilation, 'same' padding or grouped (not depthwise) parts")
        attrs = {"kernels": tuple(c.kernel_size[0] for c in convs), "in_splits": tuple(c.in_channels for c in convs),
                 "out_splits": tuple(c.out_channels for c in convs), "stride": convs[0].stride[0],
                 "depthwise": depthwise}
        return self.add(node, "mixconv", attrs, x, node.target)

    def batchnorm(self, node: fx.Node, m: nn.modules.batchnorm._BatchNorm, x: Prim) -> Prim:
        if not (m.affine and m.track_running_stats):
            raise self.fail(node, f"{type(m).__name__} without affine parameters or running statistics")
        attrs = {"eps": float(m.eps), "momentum": float(m.momentum if m.momentum is not None else 0.1)}
        bn = self.add(node, "bn", attrs, x, node.target)
        act = getattr(m, "act", None)            # timm's BatchNormAct2d: BN, dropout, activation
        if act is None or type(act).__name__ == "Identity":
            return bn
        if type(act) not in ACTIVATION_MODULES:
            raise self.fail(node, f"activation {type(act).__name__}")
        return self.add(node, "act", {"fn": ACTIVATION_MODULES[type(act)]}, bn)

    def squeeze_excite(self, node: fx.Node, m: nn.Module, x: Prim) -> Prim:
        """timm's SqueezeExcite (conv_reduce, act1, conv_expand, gate) or torchvision's
        SqueezeExcitation (fc1, activation, fc2, scale_activation)."""
        reduce, act, gate = (getattr(m, "conv_reduce", None) or getattr(m, "fc1", None),
                             getattr(m, "act1", None) or getattr(m, "activation", None),
                             getattr(m, "gate", None) or getattr(m, "scale_activation", None))
        expand = getattr(m, "conv_expand", None) or getattr(m, "fc2", None)
        extra = [c for c in m.children() if c.state_dict() and c not in (reduce, expand)]
        if (not isinstance(reduce, nn.Conv2d) or not isinstance(expand, nn.Conv2d) or reduce.bias is None
                or type(act) not in ACTIVATION_MODULES or type(gate) not in GATE_FUNCTIONS or extra):
            raise self.fail(node, f"{type(m).__name__} with {type(act).__name__}, {type(gate).__name__}"
                                  f"{' and ' + type(extra[0]).__name__ if extra else ''}")
        attrs = {"rd": reduce.out_channels, "act": ACTIVATION_MODULES[type(act)], "fn": GATE_FUNCTIONS[type(gate)]}
        return self.add(node, "se", attrs, x, node.target)

    def pool(self, node: fx.Node, m: nn.Module, x: Prim) -> Prim:
        kind = "maxpool" if isinstance(m, nn.MaxPool2d) else "avgpool"
        k, s, p = (v if isinstance(v, int) else v[0] for v in (m.kernel_size, m.stride or m.kernel_size, m.padding))
        odd = [f"{a}={getattr(m, a)}" for a, plain in (("ceil_mode", False), ("dilation", 1),
                                                       ("count_include_pad", True), ("divisor_override", None))
               if hasattr(m, a) and getattr(m, a) not in (plain, (plain, plain))]
        odd += [f"{a}={v}" for a, v in (("kernel_size", m.kernel_size), ("stride", m.stride), ("padding", m.padding))
                if not isinstance(v, int) and len(set(v)) != 1]
        if odd:
            raise self.fail(node, f"{type(m).__name__}({', '.join(odd)})")
        return self.add(node, kind, {"k": k, "stride": s, "padding": p}, x)

    def adaptive(self, node: fx.Node, size, x: Prim) -> Prim:
        size = (size, size) if isinstance(size, int) else tuple(size)
        if x.out_shape.is_flat:
            return x
        if size == (1, 1):
            return self.add(node, "gap", {}, x)
        if size == x.out_shape.size:     # VGG's 7x7 pooling of a 7x7 map at 224 px: the identity
            return x
        raise self.fail(node, f"adaptive pooling of a {x.out_shape.size} map to {size} (import at the "
                              f"resolution it was trained at)")

    def flatten(self, node: fx.Node, x: Prim) -> Prim:
        return x if x.out_shape.is_flat else self.add(node, "flatten", {}, x)

    def function_node(self, node: fx.Node) -> Prim:
        fn = node.target
        if fn in (operator.add, operator.iadd, torch.add) and len(node.args) == 2 and not node.kwargs:
            a, b = (self.of.get(arg) for arg in node.args)
            if a is None or b is None or a.out_shape != b.out_shape:
                raise self.fail(node, "an add of something other than two tensors of one shape")
            prim = Prim("add", {}, a.out_shape, a.out_shape, [a, b], "", unit_of(node))
            self.prims.append(prim)
            return prim
        x = self.src(node)
        if fn in ACTIVATION_FUNCTIONS:
            return self.add(node, "act", {"fn": ACTIVATION_FUNCTIONS[fn]}, x)
        if fn is torch.flatten:
            return self.flatten(node, x)
        if fn is F.dropout:
            p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
            return x if not p else self.add(node, "dropout", {"p": float(p)}, x)
        if fn is F.adaptive_avg_pool2d:
            return self.adaptive(node, node.args[1] if len(node.args) > 1 else node.kwargs["output_size"], x)
        raise self.fail(node, _what(node))

    def method_node(self, node: fx.Node) -> Prim:
        x = self.src(node)
        if node.target == "mean":
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if sorted(d % 4 for d in (dims if isinstance(dims, (tuple, list)) else (dims,))) == [2, 3]:
                return self.add(node, "gap", {}, x)
        if node.target == "flatten" and (node.args[1:] or (node.kwargs.get("start_dim", 0),)) in ((1,), (1, -1)):
            return self.flatten(node, x)
        raise self.fail(node, f"tensor.{node.target}()")


def _what(node: fx.Node) -> str:
    """The operation a node calls, as its user would write it: `torch.cat()`, `tensor.permute()`."""
    if node.op == "call_method":
        return f"tensor.{node.target}()"
    if node.op == "call_function":
        fn = node.target
        owner = "torch" if getattr(fn, "__module__", None) in (None, "torch") else fn.__module__
        return f"{owner}.{getattr(fn, '__name__', fn)}()"
    return str(node.target)


def trace(model: nn.Module, source: str, in_chans: int, resolution: int) -> tuple[list[Prim], Prim]:
    """The model's ops in forward order, and the one that gives its output (eval mode)."""
    model.eval()
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model))
    except Exception as exc:  # noqa: BLE001 - fx raises many kinds; say which, on one line
        raise NasdslError(f"torch.fx cannot trace this model: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}", file=source) from None
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(1, in_chans, resolution, resolution))
    conv = Converter(source, gm)
    for node in gm.graph.nodes:
        conv.convert(node)
    if conv.output is None or not conv.output.out_shape.is_flat:
        raise NasdslError("the model's output is not a flat vector of logits", file=source)
    return conv.prims, conv.output
