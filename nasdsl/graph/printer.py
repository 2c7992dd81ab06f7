"""Graph IR -> .space source that compiles back to the same network (as torch.fx prints code).

Every layer is written out in primitive ops, so any network prints, including derived ones whose
widths no composite block could express: blocks place their channels with `@ [...]`, shortcuts
are explicit (`residual subsample(2) @ [...]`) and ops after the sum follow `then`.
"""
from __future__ import annotations

from nasdsl.graph.ir import Layer, Network
from nasdsl.graph.spacetext import index as _index


def _chain(ops) -> str:
    """The ops joined by `>`; each kind prints itself (ops.OpKind.print). A gate its predecessor's
    builtin adds by default (bn's) stays implicit, so the text compiles back to the same ops."""
    parts = []
    for i, op in enumerate(ops):
        if op.is_gate and i and ops[i - 1].spec.absorbs_gate:
            continue  # printed as the BN's default gate
        gated = op.spec.absorbs_gate and i + 1 < len(ops) and ops[i + 1].is_gate
        parts.append(op.spec.print(op, gated))
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
