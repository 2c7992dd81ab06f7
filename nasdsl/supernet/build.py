"""Graph IR -> gated supernet: every gate op of the graph becomes an SSGate, built into the
Supernet (a NasNet) as it is constructed; `GateSet` controls them all."""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

import torch
import torch.nn as nn

from nasdsl.graph.ir import Block, Layer, Network, Op
from nasdsl.supernet.gates import MODES, GateState, SSGate, gate_batchnorm
from nasdsl.supernet.network import NasNet

PLACEMENTS = ("after_bn", "before_bn", "after_act")


def place_gates(net: Network, placement: str) -> Network:
    """Move every gate one op earlier (before its BN) or later (after its activation).

    The paper's ablation (section VI) compares Conv-SS-BN-ReLU, Conv-BN-SS-ReLU (the default) and
    Conv-BN-ReLU-SS. Gates are channelwise, so shapes are unchanged.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"gate placement must be one of {PLACEMENTS}, got {placement!r}")
    if placement == "after_bn":
        return net

    def move(ops: tuple[Op, ...]) -> tuple[Op, ...]:
        ops = list(ops)
        i = 0
        while i < len(ops):
            op = ops[i]
            if op.is_gate:
                j = i - 1 if placement == "before_bn" else i + 1
                neighbour = "bn" if placement == "before_bn" else "act"
                if 0 <= j < len(ops) and ops[j].kind == neighbour:
                    a, b = sorted((i, j))
                    ops[a], ops[b] = replace(ops[b], in_shape=ops[a].in_shape, out_shape=ops[a].in_shape), \
                        replace(ops[a], in_shape=ops[a].in_shape, out_shape=ops[a].in_shape)
                    i += 1
            i += 1
        return tuple(ops)

    layers = tuple(replace(layer, blocks=tuple(replace(b, ops=move(b.ops)) for b in layer.blocks))
                   for layer in net.layers)
    return replace(net, layers=layers)


class GateSet:
    """The supernet's gates in graph order, with the shared mode and delta: the channel groups in
    `gates`, and in `depth_gates` the one-channel gates of blocks that may vanish (if any), each
    given with the keys of its block's channel groups (`blocks_of`) and its share of its layer's
    fixed cost (`shares`: 1 / the layer's blocks that may vanish; see `weigh`)."""

    def __init__(self, state: GateState, gates: list[SSGate],
                 depth: list[tuple[SSGate, list[str], float]] = ()):
        self.state = state
        self.gates: list[SSGate] = list(gates)
        self.depth_gates: list[SSGate] = [d for d, _, _ in depth]
        self.by_key = {g.key: g for g in self.gates}
        self.blocks_of: dict[str, list[str]] = {d.key: list(keys) for d, keys, _ in depth}  # depth key -> groups
        self.shares = torch.tensor([share for _, _, share in depth], dtype=torch.float32)
        self.channel_weights: torch.Tensor | None = None  # per channel, in flat_s order; None: all 1
        self.depth_weights = torch.zeros(len(self.depth_gates))  # per depth gate (see `weigh`)
        # per channel, 0 (no depth gate) or 1 + the index of the depth gate of its block
        slot = {key: i + 1 for i, d in enumerate(self.depth_gates) for key in self.blocks_of[d.key]}
        self.owner = torch.cat([torch.full((g.s.numel(),), slot.get(g.key, 0), dtype=torch.long)
                                for g in self.gates]) if self.gates else torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.gates)

    @property
    def channels(self) -> int:
        return sum(g.s.numel() for g in self.gates)

    def parameters(self):
        return [g.s for g in self.gates + self.depth_gates]

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"gate mode must be one of {MODES}")
        self.state.mode = mode

    def set_delta(self, delta: float) -> None:
        self.state.delta = float(delta)

    def reset(self, value: float = 0.0) -> None:
        with torch.no_grad():
            for g in self.gates + self.depth_gates:
                g.s.fill_(value)

    def flat_s(self) -> torch.Tensor:
        return torch.cat([g.s.reshape(-1) for g in self.gates]) if self.gates else torch.zeros(0)

    def weigh(self, group_cost: dict[str, float], block_cost: float = 0.0) -> None:
        """Weigh each channel in the penalty by its group's cost, normalised so that the mean channel
        weighs 1 (lambda_a keeps its scale); each depth gate weighs its share of `block_cost` on that
        scale. `block_cost` is a layer's fixed time: the layer pays it while any of its blocks lives
        (its candidates merge into one block at export), so k blocks side by side that may vanish
        cost block_cost / k each, and closing them all saves it once (a residual layer's one block:
        all of it). Priced whole, six ProxylessNAS candidates cost six layers' fixed time, and one
        epoch's search closed 116 of them for a latency budget that needed far fewer."""
        w = torch.cat([torch.full((g.s.numel(),), float(group_cost[g.key])) for g in self.gates])
        mean = w.mean().clamp_min(1e-12)
        self.channel_weights = (w / mean).to(self.owner.device)
        self.depth_weights = (self.shares * block_cost / mean).to(self.owner.device)

    def penalty(self, form: str = "scaled") -> torch.Tensor:
        """The paper's Eq. 4 term sum(sigmoid(delta * s)); `unscaled` is the release's sum(sigmoid(s)).
        With `weigh`, each channel counts its weight instead of 1. A block with a depth gate d costs
        d * (block_cost + its channels' terms): what it costs if d is 0 or 1, so closing d is priced
        at the whole block, fixed cost included."""
        s = self.flat_s()
        if self.owner.device != s.device:  # the model moved after the weights were made
            self._move_weights(s.device)
        scale = self.state.delta if form == "scaled" else 1.0
        g = torch.sigmoid(scale * s)
        if self.channel_weights is not None:
            g = g * self.channel_weights
        if not self.depth_gates:
            return g.sum()
        d = torch.sigmoid(scale * torch.cat([m.s for m in self.depth_gates]))
        alive = torch.cat([d.new_ones(1), d])[self.owner]
        return (g * alive).sum() + (d * self.depth_weights).sum()

    def _move_weights(self, device: torch.device) -> None:
        self.owner = self.owner.to(device)
        self.depth_weights = self.depth_weights.to(device)
        if self.channel_weights is not None:
            self.channel_weights = self.channel_weights.to(device)

    def fold_depth_gates(self) -> int:
        """Close every channel of each block whose depth gate is closed, then open all depth gates, so
        the channel gates alone say what survives (derivation reads only them). Returns how many
        blocks closed."""
        closed = 0
        with torch.no_grad():
            for d in self.depth_gates:
                if float(d.s.detach()) <= 0:
                    closed += 1
                    for key in self.blocks_of[d.key]:
                        s = self.by_key[key].s
                        s.copy_(-s.abs())
                d.s.fill_(1.0)
        return closed

    def values(self) -> dict[str, torch.Tensor]:
        return {g.key: g.s.detach().clone() for g in self.gates}

    def kept(self) -> dict[str, torch.Tensor]:
        """Binary masks: the channels a hard gate lets through (s > 0)."""
        return {g.key: (g.s.detach() > 0) for g in self.gates}

    def load(self, values: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, s in values.items():
                self.by_key[key].s.copy_(s)


class Supernet(NasNet):
    """A NasNet with an SS gate at every gate op of the graph, built as such.

    The gates, and with `depth_gates` the depth gates, are made from the graph first: which gate
    follows a BN (fused into it), and which blocks may vanish (in a residual layer, or beside other
    blocks: the last gate of each then also carries its block's depth gate) are properties of the
    graph. NasNet's builder takes them through `gate_factory`; each BN followed by a fused gate is
    then made a gated BN (`gate_batchnorm`) and each depth gate is registered on its block, before
    `gate_set` is set, so a Supernet never exists half-gated. network.py stays free of gates: it is
    shipped as the exported model's code."""

    gate_set: GateSet

    def __init__(self, net: Network, placement: str = "after_bn", depth_gates: bool = False):
        placed = place_gates(net, placement)
        state = GateState()
        vanishing = _vanishing_blocks(placed) if depth_gates else []
        depth = {block.name: SSGate(1, f"{block.name}:depth", state) for _, block in vanishing}
        gates = _channel_gates(placed, state, depth, fuse=placement == "after_bn")
        super().__init__(placed.to_config(), gate_factory=lambda channels, key: gates[key])
        for layer, module in zip(placed.layers, self.layers):
            for block, block_module in zip(layer.blocks, module.blocks):
                if block.name in depth:  # registered on its block: its state-dict key is `...blocks.j.depth_gate.s`
                    block_module.add_module("depth_gate", depth[block.name])
        for chain in self._chains():
            for (_, before), (_, gate) in zip(chain, chain[1:]):
                if isinstance(gate, SSGate) and gate.fused:
                    gate_batchnorm(before, gate)
        per_layer = Counter(layer.name for layer, _ in vanishing)
        self.gate_set = GateSet(state, list(gates.values()),
                                [(depth[block.name], [op.attrs["key"] for op in block.ops if op.is_gate],
                                  1.0 / per_layer[layer.name]) for layer, block in vanishing])

    def _chains(self) -> list[list[tuple[str, nn.Module]]]:
        """Every op chain (block, shortcut, post, head), as (name, module) pairs in order."""
        return [chain for layer in self.op_modules()
                for chain in layer["blocks"] + [layer["shortcut"], layer["post"]]]


def _vanishing_blocks(net: Network) -> list[tuple[Layer, Block]]:
    """The gated blocks that may vanish: those of a residual layer, or beside other blocks (a lone
    block without a shortcut cannot go: nothing would carry the layer's input on)."""
    return [(layer, block) for layer, block in net.blocks()
            if (layer.shortcut is not None or len(layer.blocks) > 1) and any(op.is_gate for op in block.ops)]


def _channel_gates(placed: Network, state: GateState, depth: dict[str, SSGate],
                   fuse: bool) -> dict[str, SSGate]:
    """key -> the gate of each gate op, in graph order: `fused` where it directly follows a BN
    (and `fuse`), carrying its block's depth gate where it is that block's last gate."""
    gates = {}
    for _, block in placed.blocks():
        keyed = [(i, op) for i, op in enumerate(block.ops) if op.is_gate]
        for n, (i, op) in enumerate(keyed):
            after_bn = fuse and i > 0 and block.ops[i - 1].kind == "bn"
            last = n == len(keyed) - 1
            gates[op.attrs["key"]] = SSGate(op.in_shape.channels, op.attrs["key"], state, fused=after_bn,
                                            depth_gate=depth.get(block.name) if last else None)
    return gates


def build_supernet(net: Network, placement: str = "after_bn", depth_gates: bool = False) -> Supernet:
    """A Supernet with SS gates where the graph has gate ops; `model.gate_set` controls them.

    With `depth_gates`, every gated block that may vanish (in a residual layer, or beside other
    blocks) also gets a depth gate on its output group (see gates.py)."""
    return Supernet(net, placement, depth_gates)


def is_gate_param(name: str) -> bool:
    return name.endswith(".s") or name == "s"
