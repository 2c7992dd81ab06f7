"""Parameters, FLOPs and search-space size, counted on the graph.

FLOPs are multiply-accumulates of conv and linear layers (the paper's convention, and thop's);
parameters count every trainable weight (conv, BN affine, linear), not BN running statistics and
not the architecture gates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from nasdsl.graph.ir import Block, Layer, Network, Op


@dataclass(frozen=True)
class Cost:
    params: int = 0
    flops: int = 0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.params + other.params, self.flops + other.flops)


def op_cost(op: Op) -> Cost:
    kind = op.spec
    return Cost(kind.params(op.attrs, op.in_shape, op.out_shape), kind.macs(op.attrs, op.in_shape, op.out_shape))


def block_cost(block: Block) -> Cost:
    return sum((op_cost(op) for op in block.ops), Cost())


def layer_cost(layer: Layer) -> Cost:
    return sum((op_cost(op) for op in layer.all_ops()), Cost())


def network_cost(net: Network) -> Cost:
    return sum((layer_cost(layer) for layer in net.layers), Cost())


def live_layers(net: Network) -> int:
    """The layers that run something: each costs a fixed time at batch 1 whatever its width."""
    return sum(1 for layer in net.layers if layer.blocks)


def channel_metric(metric: str) -> str:
    """What one channel is priced by under a budget's metric: its MACs under "latency" too (a
    layer's fixed time is its depth gate's price, not its channels')."""
    return "flops" if metric == "latency" else metric


def metric_cost(net: Network, metric: str, layer_price: float = 0.0) -> int:
    """What a budget counts: "flops" (MACs), "params", or "latency": MACs plus `layer_price` MACs for
    every layer that runs (a layer's fixed time at batch 1 on the run's device, in MACs,
    `nasdsl.pipeline.latency`), a model of the network's time in units of a MAC's."""
    if metric == "latency":
        return network_cost(net).flops + round(layer_price * live_layers(net))
    return getattr(network_cost(net), metric)


def gate_channel_cost(net: Network, metric: str = "flops") -> dict[str, float]:
    """MACs ("flops") or parameters ("params") per channel of each gate group: its share of the ops
    of its block that touch it, back to the dense op that computes it and on to the dense op that
    reads it (depthwise convs and BN affines on the way count too; `ChannelMap.dense` says which ops
    mix channels). A block's last gate also feeds the next layer, but that read is shared with the
    shortcut and the other blocks (the channel stays while any of them writes it), so it is left out.
    Under "latency" a channel costs its MACs (`channel_metric`)."""
    metric = channel_metric(metric)

    def share(ops) -> int:  # the cost from the start of `ops` up to and including the first dense op
        total = 0
        for op in ops:
            total += getattr(op_cost(op), metric)
            if op.spec.channels(op).dense:
                break
        return total

    costs = {}
    for _, block in net.blocks():
        ops = block.ops
        for i, gate in enumerate(ops):
            if gate.is_gate:
                costs[gate.attrs["key"]] = (share(reversed(ops[:i])) + share(ops[i + 1:])) / gate.in_shape.channels
    return costs


def log10_space_size(gated_channels: int) -> float:
    """log10 of 2^(gated channels): every gated channel is on or off."""
    return gated_channels * math.log10(2)


def summary(net: Network) -> dict:
    """The `nasdsl show --json` contract: scripts rely on these keys."""
    gates = sum(g.channels for g in net.gates())
    total = network_cost(net)
    layers = []
    for layer in net.layers:
        cost = layer_cost(layer)
        layers.append({
            "name": layer.name,
            "blocks": len(layer.blocks),
            "ops": [b.label for b in layer.blocks],
            "in_shape": layer.in_shape.to_list(),
            "out_shape": layer.out_shape.to_list(),
            "out_channels": layer.width,
            "residual": layer.shortcut is not None,
            "gates": sum(op.in_shape.channels for op in layer.all_ops() if op.is_gate),
            "flops": cost.flops,
            "params": cost.params,
        })
    return {
        "name": net.name,
        "input": net.input_shape.to_list(),
        "num_classes": net.num_classes,
        "params": total.params,
        "flops": total.flops,
        "gates": gates,
        "gate_groups": len(net.gates()),
        "log10_space_size": log10_space_size(gates),
        "parameters": {k: v for k, v in net.params.items()},
        "layers": layers,
    }
