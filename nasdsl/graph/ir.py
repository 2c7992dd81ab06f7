"""The graph IR every stage shares: typed, immutable, torch-free.

A `Network` is a chain of `Layer`s. A layer runs its `Block`s (chains of primitive `Op`s, see
ops.py) in parallel on the same input, sums their outputs (the ProxylessNAS/DNAL choice layer),
adds an optional residual `Shortcut` and applies `post` ops (ResNet's activation after the add):

    out = post(sum_i place(block_i(x), block_i.index) + place(shortcut(x), shortcut.index))

Index maps say which of the layer's output channels a block or shortcut writes; they are None in
a search space and appear after derivation, when blocks of one layer keep different channels.

`Network.graph` is the same network as a networkx DiGraph (nodes: input, blocks, layer sums;
edges: tensors with their shapes), and `Network.to_config()` a JSON-able dict the torch builder reads.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Iterator


@dataclass(frozen=True)
class Shape:
    """A tensor shape without the batch: channels and spatial size; size () is a flat vector."""
    channels: int
    size: tuple[int, ...] = ()

    @property
    def is_flat(self) -> bool:
        return not self.size

    @property
    def height(self) -> int:
        return self.size[0] if self.size else 1

    @property
    def width(self) -> int:
        return self.size[1] if self.size else 1

    @property
    def numel(self) -> int:
        n = self.channels
        for d in self.size:
            n *= d
        return n

    def __str__(self) -> str:
        return "x".join(str(d) for d in (self.channels, *self.size))

    def to_list(self) -> list[int]:
        return [self.channels, *self.size]


@dataclass(frozen=True)
class Op:
    """One primitive op. attrs hold the kind's settings (see ops.py); a gate's attrs name its group."""
    kind: str
    attrs: dict
    in_shape: Shape
    out_shape: Shape

    def __hash__(self):
        return id(self)

    @property
    def spec(self):
        """The op's catalogue entry (ops.OPS): what every stage knows about its kind."""
        from nasdsl.graph.ops import OPS  # ops.py imports Shape from this module
        return OPS[self.kind]

    @property
    def is_gate(self) -> bool:
        return self.spec.is_gate


@dataclass(frozen=True)
class Shortcut:
    """A residual path: ops (empty: identity) whose output is added at `index` (None: all channels)."""
    ops: tuple[Op, ...] = ()
    index: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Block:
    name: str                      # unique in the network, e.g. "s1.0.b2"
    kind: str                      # the source-level op or composite, e.g. "mbconv"
    label: str                     # a short human description, e.g. "mbconv k5 e3"
    ops: tuple[Op, ...]
    in_shape: Shape
    out_shape: Shape               # the block's own width, before `index` places it in the layer
    index: tuple[int, ...] | None = None
    args: dict = field(default_factory=dict, compare=False)  # source-level arguments, for printing


@dataclass(frozen=True)
class Layer:
    name: str
    blocks: tuple[Block, ...]
    in_shape: Shape
    out_shape: Shape
    shortcut: Shortcut | None = None   # the residual path (MBConv and ResNet layers)
    post: tuple[Op, ...] = ()          # ops after the sum, e.g. ResNet's ReLU after the add

    @property
    def width(self) -> int:
        return self.out_shape.channels

    def all_ops(self) -> Iterator[Op]:
        for block in self.blocks:
            yield from block.ops
        if self.shortcut:
            yield from self.shortcut.ops
        yield from self.post


@dataclass(frozen=True)
class Gate:
    """A group of gated channels: one SS gate parameter per channel."""
    key: str           # "layer.block.group", unique, also the parameter's name in checkpoints
    channels: int
    layer: str
    block: str


@dataclass(frozen=True)
class Network:
    name: str
    input_shape: Shape
    num_classes: int
    layers: tuple[Layer, ...]
    params: dict = field(default_factory=dict, compare=False)   # resolved parameter values
    source: str | None = field(default=None, compare=False)     # the file it came from

    def __hash__(self):
        return id(self)

    @property
    def out_shape(self) -> Shape:
        return self.layers[-1].out_shape if self.layers else self.input_shape

    def blocks(self) -> Iterator[tuple[Layer, Block]]:
        for layer in self.layers:
            for block in layer.blocks:
                yield layer, block

    def gates(self) -> list[Gate]:
        return [Gate(op.attrs["key"], op.in_shape.channels, layer.name, block.name)
                for layer, block in self.blocks() for op in block.ops if op.is_gate]

    def replace(self, **changes) -> "Network":
        return replace(self, **changes)

    @cached_property
    def graph(self):
        """The network as a networkx DiGraph: nodes carry ops and shapes, edges carry tensor shapes."""
        import networkx as nx

        g = nx.DiGraph(name=self.name, num_classes=self.num_classes)
        g.add_node("input", kind="input", out_shape=self.input_shape)
        prev = "input"
        for layer in self.layers:
            for block in layer.blocks:
                g.add_node(block.name, kind="block", op=block.kind, label=block.label, layer=layer.name,
                           ops=block.ops, in_shape=block.in_shape, out_shape=block.out_shape,
                           index=block.index, gates=[op.attrs["key"] for op in block.ops if op.is_gate])
                g.add_edge(prev, block.name, shape=layer.in_shape)
            if len(layer.blocks) == 1 and layer.shortcut is None and not layer.post:
                out = layer.blocks[0].name
            else:
                out = f"{layer.name}:sum"
                g.add_node(out, kind="sum", layer=layer.name, out_shape=layer.out_shape,
                           shortcut=layer.shortcut, post=layer.post)
                for block in layer.blocks:
                    g.add_edge(block.name, out, shape=block.out_shape)
                if layer.shortcut is not None:
                    g.add_edge(prev, out, shape=layer.in_shape, residual=True)
            prev = out
        return g

    def to_config(self) -> dict:
        """A JSON-able description the torch builder (nasdsl.export.slimnet) reads."""
        def op_cfg(op: Op) -> dict:
            return {"kind": op.kind, "in": op.in_shape.channels, "out": op.out_shape.channels,
                    "flat": op.in_shape.is_flat, **{k: v for k, v in op.attrs.items() if k != "out"}}

        def sc_cfg(sc: Shortcut | None):
            if sc is None:
                return None
            return {"ops": [op_cfg(o) for o in sc.ops], "index": list(sc.index) if sc.index else None}

        return {
            "name": self.name,
            "input": self.input_shape.to_list(),
            "flat_output": [layer.out_shape.is_flat for layer in self.layers],
            "num_classes": self.num_classes,
            "layers": [{
                "name": layer.name,
                "width": layer.width,
                "shortcut": sc_cfg(layer.shortcut),
                "post": [op_cfg(o) for o in layer.post],
                "blocks": [{
                    "name": b.name,
                    "ops": [op_cfg(o) for o in b.ops],
                    "index": list(b.index) if b.index else None,
                } for b in layer.blocks],
            } for layer in self.layers],
        }
