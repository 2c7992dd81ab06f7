"""Graph IR -> .space source that compiles back to the same network (as torch.fx prints code).

Every layer is written out in primitive ops, so any network prints, including derived ones whose
widths no composite block could express: blocks place their channels with `@ [...]`, shortcuts
are explicit (`residual subsample(2) @ [...]`) and ops after the sum follow `then`.
"""
from __future__ import annotations

from nasdsl.graph.ir import Layer, Network, Op
from nasdsl.graph.ops import is_depthwise

_BN_DEFAULTS = {"eps": 1e-5, "momentum": 0.1}


def _num(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        text = repr(v)
        return text if ("." in text or "e" in text) else text + ".0"
    return str(v)


def _index(index) -> str:
    index = list(index)
    if index and index == list(range(index[0], index[-1] + 1)):
        return f"range({index[0]}, {index[-1] + 1})" if index[0] else f"range({index[-1] + 1})"
    return "[" + ", ".join(map(str, index)) + "]"


def _call(name: str, positional=(), **kwargs) -> str:
    args = [_num(v) if not isinstance(v, str) else v for v in positional]
    args += [f"{k}={_num(v) if not isinstance(v, str) else v}" for k, v in kwargs.items()]
    return f"{name}({', '.join(args)})" if args else name


def _op(op: Op, gated: bool) -> str:
    a = op.attrs
    if op.kind == "conv":
        extra = {}
        if a["stride"] != 1:
            extra["stride"] = a["stride"]
        if a["padding"] != a["k"] // 2:
            extra["padding"] = a["padding"]
        if a["bias"]:
            extra["bias"] = True
        if is_depthwise(op):
            return _call("dwconv", k=a["k"], **extra)
        if a["groups"] != 1:
            extra = {"groups": a["groups"], **extra}
        return _call("conv", (op.out_shape.channels,), k=a["k"], **extra)
    if op.kind == "bn":
        extra = {k: a[k] for k in ("eps", "momentum") if a[k] != _BN_DEFAULTS[k]}
        if not gated:
            extra["gate"] = False
        return _call("bn", **extra)
    if op.kind == "act":
        return a["fn"]
    if op.kind in ("maxpool", "avgpool"):
        extra = {"padding": a["padding"]} if a["padding"] else {}
        return _call(op.kind, k=a["k"], stride=a["stride"], **extra)
    if op.kind == "linear":
        return _call("linear", (op.out_shape.channels,), **({} if a["bias"] else {"bias": False}))
    if op.kind == "dropout":
        return _call("dropout", (a["p"],))
    if op.kind == "select":
        return f"select({_index(a['index'])})"
    if op.kind == "subsample":
        return _call("subsample", (a["stride"],))
    if op.kind == "gate":
        return "gate"
    return op.kind  # gap, flatten


def _chain(ops) -> str:
    parts = []
    for i, op in enumerate(ops):
        if op.is_gate and i and ops[i - 1].kind == "bn":
            continue  # printed as the BN's default gate
        gated = op.kind == "bn" and i + 1 < len(ops) and ops[i + 1].is_gate
        parts.append(_op(op, gated))
    return " > ".join(parts) if parts else "identity"


def _layer(layer: Layer) -> str:
    options = "" if any(op.is_gate for op in layer.all_ops()) else " [gate=off]"
    blocks = [_chain(b.ops) + (f" @ {_index(b.index)}" if b.index is not None else "") for b in layer.blocks]
    text = f"layer {layer.name}{options} = " + "\n    | ".join(blocks)
    if layer.shortcut is not None:
        sc = layer.shortcut
        text += "\n    residual" + (f" {_chain(sc.ops)}" if sc.ops else "")
        if sc.index is not None:
            text += f" @ {_index(sc.index)}"
    if layer.post:
        text += f"\n    then {_chain(layer.post)}"
    return text


def to_space(net: Network) -> str:
    shape = net.input_shape
    lines = [f"# {net.name}, written by nasdsl: every layer in primitive ops; `@ [...]` places a block's",
             "# channels in the layer's output, `residual` is the shortcut added to the sum, `then` follows it.",
             f"space {net.name}(input={shape.channels}, resolution={shape.height}, classes={net.num_classes})", ""]
    lines += [_layer(layer) for layer in net.layers]
    return "\n".join(lines) + "\n"
