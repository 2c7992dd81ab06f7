"""Binary gates -> a physically slim network that computes what the hard-masked supernet does.

Passes over the graph:
0. `round_masks` (only with `channel_multiple` > 1): every gate group keeps a multiple of that
   many channels, or all of them. A CPU or GPU computes channels in blocks (16 on AVX-512 oneDNN,
   8 for tensor cores), so a conv with 3 channels costs what one with 16 does: fewer FLOPs, no
   speed. Counts are rounded to the nearest allowed value, so a block keeping a handful of
   channels closes and its layer can vanish; closed channels reopen strongest first. A group
   narrower than two multiples keeps none, one multiple or all: on ResNet-56's 16-channel first
   stage the search then removes blocks where it thinned them to 3-15 channels, which took as
   long as 16 (speed-up / FLOPs reduction 0.63 against 0.45 at batch 64, and ResNet-20's top-1 on
   Fashion-MNIST within the seeds' spread: README, "A derived network as fast as its FLOPs promise").
1. `repair_masks`: a gate closes the channels no input reaches (a split conv's output group whose
   input group is all closed: past a BN they would hold its offset alone); a block whose path is
   cut (an inner gate group all off) can only output BN offsets, so the whole block is switched off; a layer without a residual that would lose every
   channel keeps its strongest one (highest s) and the run is told so. The result, the
   *effective* masks, is what the searched network is; loading them into the supernet gives
   exactly the slim network's function.
1b. `align_layers` (only with `channel_multiple` > 1): a block summed with its layer's shortcut
   (or with an ungated block, MobileNetV2's projection) writes all of the layer's channels, and
   their count is rounded like a group's. Each block's last gate chose its own channels, so a
   stream's width was the union of what its blocks wrote (ResNet-56's stage 2: 24, 26, 27, 28,
   31 channels), every block wrote part of it, and a merged block computed the rest as zero rows
   (MACs the budget did not count) or placed its output by index; a dense op on 27 channels runs
   at the speed of 32. One width per layer, each block writing all of it, is what the merged
   network computes anyway, now counted and trained (Torch-Pruning prunes a residual stream as
   one group for the same reason). A layer of several gated candidates is left alone
   (`_aligned_layer` says why). Searched to a third of the FLOPs, ResNet-56's batch-64 speed-up /
   FLOPs reduction went from 0.67 to 0.76 and MobileNetV2's from 0.79 to 0.83 (README, "One width
   per residual stream").
2. `derive`: per layer, forward liveness (which channels can be non-zero) meets backward need
   (which channels a later op reads); every op keeps live-and-needed channels. Blocks of one
   layer that keep different channels are summed into the union by index, a residual layer
   whose blocks all vanish becomes its shortcut alone (identity: depth is learned). Its
   activation goes too when the input is already in the activation's range (ReLU after ReLU).
   Every conv keeps only the kernel taps its input map reaches (`OpKind.trim`: a 7x7 depthwise
   conv on a 1x1 map is its centre tap), the same function at this input size; `cut_kernels`
   does the same to a whole network, gates and all, and a run builds its supernet from that.
   Kept channels keep the unpruned network's order; `stream_order` renumbers residual streams in
   the order channels join them (what merging does before export: `merge.order_streams`).
Weights are sliced op by op (`slim_state_dict`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable

import torch

from nasdsl.graph.ir import Block, Layer, Network, Op, Shape, Shortcut
from nasdsl.graph.ops import CHANNELWISE, FLATTEN

Channels = tuple[int, ...]


@dataclass
class OpPlan:
    """Where a slim op's weights come from: the source op's position and the kept channels."""
    source: tuple            # (layer index, "block", block index, op index) | (layer, "shortcut", k) | (layer, "post", k)
    out_index: Channels      # kept output channels, in the source op's numbering
    in_index: Channels       # kept input channels (for dense conv and linear)
    # the source op's weight tensors and the kept channels indexing each dim (OpKind.slice_weights):
    # read from the graph here, so slicing needs no guesses from torch module types
    weights: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # the source op's own slicing (OpKind.slice_state) given its tensors, bound to its op and kept
    # channels; None: sliced dim by dim by `weights`
    slice_state: Callable[[dict], dict] | None = None
    # kernel taps cut from each side of the last two dims of its 4-d tensors (OpKind.trim)
    crop: int = 0


@dataclass
class Derivation:
    network: Network                       # the slim graph (no gates)
    plans: list[list[dict]]                # per slim layer: {"blocks": [[OpPlan|None]], "shortcut": [...], "post": [...]}
    masks: dict[str, torch.Tensor]         # the effective binary masks
    notes: list[str] = field(default_factory=list)


# ---- pass 0: hardware-friendly widths ----------------------------------------------------------
def _rounded(kept: int, width: int, multiple: int, up: bool) -> int:
    """The allowed count (a multiple of `multiple`, or the full width) nearest `kept`, ties up;
    with `up`, the smallest allowed count >= kept. 0 stays 0 when rounding up."""
    allowed = sorted({*range(0, width + 1, multiple), width})
    if up:
        return next(a for a in allowed if a >= kept)
    return min(allowed, key=lambda a: (abs(a - kept), -a))


def round_masks(masks: dict[str, torch.Tensor], strength: dict[str, torch.Tensor] | None, multiple: int,
                up: bool = False) -> tuple[dict[str, torch.Tensor], int, int]:
    """Masks whose every group keeps an allowed count (see `_rounded`): the strongest closed channels
    open, the weakest open ones close. Returns the masks and how many channels opened and closed."""
    out, opened, closed = {}, 0, 0
    for key, mask in masks.items():
        mask = mask.clone().bool()
        out[key] = mask
        kept = int(mask.sum())
        target = _rounded(kept, mask.numel(), multiple, up)
        if target == kept:
            continue
        s = (strength[key] if strength else torch.zeros(mask.numel())).detach().float().cpu()
        if target > kept:
            idx = (~mask).nonzero().flatten()
            mask[idx[s[idx].argsort(descending=True, stable=True)[: target - kept]]] = True
            opened += target - kept
        else:
            idx = mask.nonzero().flatten()
            mask[idx[s[idx].argsort(stable=True)[: kept - target]]] = False
            closed += kept - target
    return out, opened, closed


# ---- pass 1b: one width per layer ---------------------------------------------------------------
def _written_by(block: Block) -> str | None:
    """The key of the gate that chooses which of the layer's channels `block` writes: its last gate,
    when only per-channel ops follow it and the block writes the layer's channels as numbered (no
    `@ [...]` placement); None otherwise."""
    last = max((k for k, op in enumerate(block.ops) if op.is_gate), default=None)
    if last is None or block.index is not None or not all(_carries_order(op) for op in block.ops[last + 1:]):
        return None
    return block.ops[last].attrs["key"]


def _layer_width(fixed: set[int], written: set[int], width: int, score, multiple: int) -> set[int]:
    """The channels a layer keeps: `fixed` (what its shortcut and ungated blocks write, which no gate
    can close), then the strongest of the others its blocks `written` (by `score`), then the strongest
    unwritten ones, to the allowed count nearest |fixed | written| and no less than |fixed|."""
    count = max(_rounded(len(fixed | written), width, multiple, up=False), _rounded(len(fixed), width, multiple, up=True))
    rank = sorted(set(range(width)) - fixed, key=lambda c: (c not in written, -float(score[c]), c))
    return fixed | set(rank[:max(0, count - len(fixed))])


def _aligned_layer(layer: Layer, live: set[int], masks, reached: list[set[int]], strength, multiple: int):
    """The channels the one gated block of `layer` writes, beside its shortcut or ungated blocks (a
    projection written as a block), the key of the gate that must keep them (`_written_by`) and the
    block; None where the layer is left as it is: it sums nothing, or it has several gated blocks or one whose
    channels no single gate chooses. Several gated blocks are a layer of candidates (ProxylessNAS):
    merging makes their projections one conv into the union of their outputs, and writing it all
    from each would count as MACs the zero blocks that conv computes anyway, so the default search
    would go from 5.74M to 7.36M MACs (3.11x to 2.42x fewer FLOPs) for the same merged network."""
    alive = [(block, out) for block, out in zip(layer.blocks, reached) if out]
    gated = [(block, out) for block, out in alive if any(op.is_gate for op in block.ops)]
    if len(gated) != 1 or len(alive) + (layer.shortcut is not None) < 2:
        return None
    block, written = gated[0]
    key = _written_by(block)
    if key is None:
        return None
    fixed = {c for other, out in alive if other is not block for c in _placed(other.index, out)}
    if layer.shortcut is not None:
        fixed |= set(_placed(layer.shortcut.index, _reach(layer.shortcut.ops, live, masks, close=False)[0]))
    width = layer.out_shape.channels
    score = strength[key].detach().float().cpu() if strength else torch.zeros(width)
    return _layer_width(fixed, set(written), width, score, multiple), key, block


def align_layers(net: Network, masks: dict[str, torch.Tensor], strength: dict[str, torch.Tensor] | None,
                 multiple: int) -> tuple[dict[str, torch.Tensor], int, int]:
    """Masks under which the gated block of a layer that sums it with its shortcut (or an ungated
    block) writes all of the layer's channels, their count rounded to `multiple` (see the module
    docstring, pass 1b; `_aligned_layer` says which layers). Returns the masks and how many
    channels of those blocks' last gates opened and closed."""
    masks = {k: v.clone().bool() for k, v in masks.items()}
    opened = closed = 0
    live = set(range(net.input_shape.channels))
    for layer in net.layers:
        reached = [_reach(block.ops, live, masks, close=False)[0] for block in layer.blocks]
        aligned = _aligned_layer(layer, live, masks, reached, strength, multiple)
        if aligned is not None:
            keep, key, aligned_block = aligned
            mask = torch.zeros(layer.out_shape.channels, dtype=torch.bool)
            mask[sorted(keep)] = True
            opened += int((mask & ~masks[key]).sum())
            closed += int((masks[key] & ~mask).sum())
            masks[key] = mask
            reached = [set(keep) if block is aligned_block else out for block, out in zip(layer.blocks, reached)]
        live = _layer_reach(layer, live, masks, reached)
    return masks, opened, closed


# ---- pass 1: effective masks -------------------------------------------------------------------
def _block_path_alive(block: Block, masks: dict[str, torch.Tensor]) -> bool:
    """False when some gate group inside the block is entirely off before the block's last gate."""
    gates = [op for op in block.ops if op.is_gate]
    return all(bool(masks[g.attrs["key"]].any()) for g in gates[:-1]) and \
        (not gates or bool(masks[gates[-1].attrs["key"]].any()))


def _placed(index: Channels | None, channels) -> list[int]:
    """A block's or shortcut's channels in the layer's numbering (its `@ [...]` placement)."""
    return [index[c] for c in channels] if index else list(channels)


def _reach(ops, live: set[int], masks: dict[str, torch.Tensor], close: bool) -> tuple[set[int], dict]:
    """The channels some live input reaches at the end of a chain, masks applied, and per gate the
    channels reaching its input. With `close`, each gate also closes the channels nothing reaches:
    past a BN such a channel holds only the BN's offset, which the slim network cannot keep (the
    output group of a split conv whose inputs are all dead or closed, a depthwise channel of a
    dead input)."""
    at = {}
    for op in ops:
        if op.is_gate:
            key = op.attrs["key"]
            at[key] = live
            if close and len(live) < masks[key].numel():
                masks[key][sorted(set(range(masks[key].numel())) - live)] = False
        live = _live_after(op, live, masks)
    return live, at


def _layer_reach(layer: Layer, live: set[int], masks, reached: list[set[int]]) -> set[int]:
    """The layer's output channels some live input reaches: its blocks' (`reached`, each block's own
    channels, already walked) and its shortcut's, placed, then through the ops after the add."""
    out: set[int] = set()
    if layer.shortcut is not None:
        reached = [*reached, _reach(layer.shortcut.ops, live, masks, close=False)[0]]
    for channels, path in zip(reached, [*layer.blocks, layer.shortcut]):
        out |= set(_placed(path.index, channels))
    return _reach(layer.post, out, masks, close=False)[0]


def _keep_strongest(layer: Layer, live: set[int], masks, strength) -> str | None:
    """A layer that would lose every channel keeps its strongest one: the block whose last gate has
    the strongest channel reopens its strongest inner channel where a gate group is all closed, and
    its last gate the strongest channel that path reaches. Returns the note, None if no block is gated."""
    best = None
    for block in layer.blocks:
        gates = [op.attrs["key"] for op in block.ops if op.is_gate]
        if not gates:
            continue
        s = strength[gates[-1]] if strength else torch.zeros(masks[gates[-1]].numel())
        value, idx = s.max(0)
        if best is None or value > best[0]:
            best = (float(value), block, gates)
    if best is None:
        return None
    _, block, gates = best
    for key in gates:  # reopen a path through the block, in order: its strongest reachable channel
        if not masks[key].any():
            s = strength[key] if strength else torch.zeros(masks[key].numel())
            reachable = sorted(_reach(block.ops, live, masks, close=False)[1][key])
            masks[key][max(reachable, key=lambda c: float(s[c]))] = True
    idx = int(masks[gates[-1]].nonzero()[0])
    value = float(strength[gates[-1]][idx]) if strength else 0.0
    return (f"layer {layer.name}: every channel was pruned, but the network cannot lose this layer; "
            f"kept its strongest channel ({block.name}, channel {idx}, s={value:.4g})")


def repair_masks(net: Network, masks: dict[str, torch.Tensor], strength: dict[str, torch.Tensor] | None = None):
    """Effective masks and notes (see the module docstring). One pass in network order, carrying
    which channels of the stream some input reaches."""
    masks = {k: v.clone().bool() for k, v in masks.items()}
    notes: list[str] = []
    live = set(range(net.input_shape.channels))
    for layer in net.layers:
        alive, reached = [], []
        for block in layer.blocks:
            out, _ = _reach(block.ops, live, masks, close=True)
            gates = [op.attrs["key"] for op in block.ops if op.is_gate]
            if gates and not _block_path_alive(block, masks):
                for key in gates:
                    masks[key].zero_()
                out = set()
            else:
                alive.append(block)
            reached.append(out)
        if not alive and layer.shortcut is None:
            # every block vanished and nothing else carries the signal: keep the strongest channel
            note = _keep_strongest(layer, live, masks, strength)
            if note:
                notes.append(note)
                reached = [_reach(block.ops, live, masks, close=False)[0] for block in layer.blocks]
        live = _layer_reach(layer, live, masks, reached)
    return masks, notes


# ---- pass 2: the slim graph --------------------------------------------------------------------
def _live_after(op: Op, live: set[int], masks) -> set[int]:
    if op.is_gate:
        keep = masks[op.attrs["key"]].tolist()
        return {c for c in live if keep[c]}
    return op.spec.channels(op).forward(op, live)


def _need_before(op: Op, need: set[int], live_in: set[int]) -> set[int]:
    return op.spec.channels(op).backward(op, need, live_in)


def _slim_chain(ops: tuple[Op, ...], live_in: set[int], masks, need_out: set[int] | None = None):
    """Kept channel sets at every boundary of a chain: (sets[0..n]) with sets[0] at its input."""
    lives = [set(live_in)]
    for op in ops:
        lives.append(_live_after(op, lives[-1], masks))
    need = set(lives[-1]) if need_out is None else need_out & lives[-1]
    keeps = [None] * (len(ops) + 1)
    keeps[-1] = need
    for k in range(len(ops) - 1, -1, -1):
        need = _need_before(ops[k], need, lives[k]) & lives[k]
        keeps[k] = need
    return [tuple(sorted(s)) for s in keeps]


def _carries_order(op: Op) -> bool:
    """Whether the op's output channels are its input channels, sliced dim by dim (BN, activation,
    depthwise conv, SE): kept in any order, they come out in that order."""
    m = op.spec.channels(op)
    return op.is_gate or (m is CHANNELWISE or m.same_width) and op.spec.slice_state is None


def _reads_any_order(op: Op) -> bool:
    """Whether the op reads every input channel through a weight indexed by it (a dense conv of one
    group, a linear): kept in any order, its weight's columns follow; its rows may be in any order."""
    m = op.spec.channels(op)
    return m.dense and op.spec.slice_state is None and \
        all("in" in roles for roles in op.spec.slice_weights(op).values() if len(roles) > 1)


def _ordered_chain(ops, keeps: list[Channels], layout: Channels) -> list[Channels] | None:
    """`keeps` (sorted) in the order the chain carries its input's `layout`: a per-channel op keeps
    its input's order, a dense one starts its own (sorted). None where an op that needs its
    channels sorted (a grouped conv, a MixConv, ...) would read them in another order."""
    first = set(keeps[0])
    order = [tuple(c for c in layout if c in first)]
    for k, op in enumerate(ops):
        prev, nxt = order[-1], set(keeps[k + 1])
        if _carries_order(op):
            order.append(tuple(c for c in prev if c in nxt))
        elif op.spec.channels(op) is FLATTEN:
            hw = op.in_shape.height * op.in_shape.width
            order.append(tuple(f for c in prev for f in range(c * hw, (c + 1) * hw) if f in nxt))
        elif _reads_any_order(op) or list(prev) == sorted(prev):
            order.append(keeps[k + 1])
        else:
            return None
        if set(order[-1]) != nxt:
            return None
    return order


def _ordered_tail(ops, keeps: list[Channels], rank) -> list[Channels]:
    """`keeps` whose channels after the chain's last dense op are ordered by `rank` (their place in
    the layer's output), so that a block writing the layer's channels in its order is a plain add."""
    last = max((k for k, op in enumerate(ops) if not _carries_order(op)), default=None)
    if last is None or not _reads_any_order(ops[last]):
        return keeps   # the output order is the input's, or the op's own
    return [*keeps[:last + 1], *(tuple(sorted(s, key=rank)) for s in keeps[last + 1:])]


def _shape(op_shape: Shape, channels: int) -> Shape:
    return Shape(channels, op_shape.size)


def _slim_ops(ops, keeps, input_layout: Channels, source_prefix: tuple):
    """Slim ops (gates dropped) and their weight plans for a chain with kept sets `keeps`."""
    out_ops, plans = [], []
    if keeps[0] != input_layout:  # the chain reads a subset of its input tensor
        pos = {c: i for i, c in enumerate(input_layout)}
        index = tuple(pos[c] for c in keeps[0])
        shape_in = _shape(ops[0].in_shape, len(input_layout))
        out_ops.append(Op("select", {"index": index}, shape_in, _shape(ops[0].in_shape, len(index))))
        plans.append(None)
    for k, op in enumerate(ops):
        if op.is_gate:
            continue
        cin, cout = keeps[k], keeps[k + 1]
        need = cout
        if op.spec.channels(op).same_width and cout != cin:  # it computes every kept input's channel
            cout = cin
        attrs, crop = op.spec.trim(op, op.spec.slim_attrs(op, cin, cout))
        slim = Op(op.kind, attrs, _shape(op.in_shape, len(cin)), _shape(op.out_shape, len(cout)))
        if op.spec.is_identity(slim):
            continue  # a select of what the select before it (or the layout) already keeps
        out_ops.append(slim)
        own = op.spec.slice_state
        plans.append(OpPlan((*source_prefix, k), cout, cin, op.spec.slice_weights(op),
                            partial(own, op, cin=cin, cout=cout) if own else None, crop))
        if need != cout:  # then keeps the channels the ops after it read
            pos = {c: i for i, c in enumerate(cout)}
            out_ops.append(Op("select", {"index": tuple(pos[c] for c in need)}, out_ops[-1].out_shape,
                              _shape(op.out_shape, len(need))))
            plans.append(None)
    return out_ops, plans


def _range_after(ops, in_range: str | None) -> str | None:
    """The activation whose output range a tensor is in after `ops`, given the one it was in."""
    for op in ops:
        in_range = op.spec.range_after(op.attrs, in_range)
    return in_range


def _drop_idle_activations(post: tuple, plan: list, in_range: str | None) -> tuple[tuple, list]:
    """The layer-closing ops without the activations that cannot change their input: relu on the
    output of a relu. Once a residual layer's blocks are gone, that is what makes it an identity."""
    kept = [(op, pl) for op, pl in zip(post, plan)
            if not op.spec.idle_on(op.attrs, in_range)]
    return tuple(op for op, _ in kept), [pl for _, pl in kept]


def _effective(net: Network, masks, strength, channel_multiple: int) -> tuple[dict, list[str]]:
    """Passes 0, 1 and 1b: the masks rounded to `channel_multiple`, repaired, each layer's blocks
    aligned on one width (then repaired again: a block's reopened channel is one its last dense op
    computes), and the notes."""
    opened = closed = 0
    if channel_multiple > 1:
        masks, opened, closed = round_masks(masks, strength, channel_multiple)
    masks, notes = repair_masks(net, masks, strength)
    if channel_multiple > 1:  # a channel kept by the repair grows to a whole multiple
        masks, more, _ = round_masks(masks, strength, channel_multiple, up=True)
        opened += more
    if opened or closed:
        notes.insert(0, f"kept channels rounded to multiples of {channel_multiple} (or a gate group's full width): "
                        f"{opened} channel(s) reopened, {closed} closed")
    if channel_multiple > 1:
        masks, opened, closed = align_layers(net, masks, strength, channel_multiple)
        if opened or closed:
            masks, more_notes = repair_masks(net, masks, strength)
            notes += [n for n in more_notes if n not in notes]
            notes.append(f"a block summed with its layer's shortcut writes all of the layer's channels, a "
                         f"multiple of {channel_multiple} (or the full width): {opened} channel(s) reopened, "
                         f"{closed} closed")
    return masks, notes


def _layer_keeps(layer: Layer, layout: Channels, masks, stream_order: bool):
    """The kept channels of a layer's chains: [(block index, block, keeps)] of the blocks that stay,
    the shortcut's keeps (None without one) and the layer's output channels, in order."""
    live_in = set(layout)
    kept_blocks = []
    for bi, block in enumerate(layer.blocks):
        keeps = _slim_chain(block.ops, live_in, masks)
        if not keeps[-1]:
            continue  # the block vanished
        if stream_order:
            keeps = _ordered_chain(block.ops, keeps, layout) or keeps
        kept_blocks.append((bi, block, keeps))
    sc_keeps, sc_placed = None, []
    union: set[int] = set()
    for _, block, keeps in kept_blocks:
        union |= set(_placed(block.index, keeps[-1]))
    if layer.shortcut is not None:
        sc_keeps = _slim_chain(layer.shortcut.ops, live_in, masks) if layer.shortcut.ops else [tuple(sorted(live_in))]
        if stream_order:
            sc_keeps = _ordered_chain(layer.shortcut.ops, sc_keeps, layout) or sc_keeps
        sc_placed = _placed(layer.shortcut.index, sc_keeps[-1])
        union |= set(sc_placed)
    if not union:
        raise ValueError(f"layer {layer.name} lost every channel")
    if layer.post and not all(op.spec.elementwise for op in layer.post):
        raise ValueError(f"layer {layer.name}: only activations and dropout can follow the sum")
    out_layout = tuple(sorted(union))
    if stream_order and layer.shortcut is not None:   # the shortcut's channels first, as they come
        out_layout = tuple(sc_placed) + tuple(sorted(union - set(sc_placed)))
    elif stream_order and len(kept_blocks) == 2:   # each block's channels a contiguous range
        a, b = (set(_placed(block.index, keeps[-1])) for _, block, keeps in kept_blocks)
        out_layout = tuple(sorted(a - b)) + tuple(sorted(a & b)) + tuple(sorted(b - a))
    return kept_blocks, sc_keeps, out_layout


def derive(net: Network, masks: dict[str, torch.Tensor], strength: dict[str, torch.Tensor] | None = None,
           channel_multiple: int = 1, stream_order: bool = False) -> Derivation:
    """The slim network for these binary gate masks (key -> bool tensor), and its weight plans.
    Each tensor's kept channels are in their original order; with `stream_order`, a residual
    layer's output has its shortcut's channels first, in the order they come in, so every residual
    add is a dense add or a zero pad, never a scatter by index, and a layer of two blocks without
    a shortcut (MobileNetV2's projection beside its block) has each block's channels contiguous
    (`merge.order_streams`)."""
    masks, notes = _effective(net, masks, strength, channel_multiple)
    layers, plans = [], []
    layout: Channels = tuple(range(net.input_shape.channels))
    in_range: str | None = None  # the activation whose output the current tensor is (its values' range)
    for li, layer in enumerate(net.layers):
        kept_blocks, sc_keeps, out_layout = _layer_keeps(layer, layout, masks, stream_order)
        pos = {c: i for i, c in enumerate(out_layout)}

        def place(channels) -> tuple[int, ...] | None:
            index = tuple(pos[c] for c in channels)
            return None if index == tuple(range(len(out_layout))) else index

        blocks, block_plans = [], []
        for bi, block, keeps in kept_blocks:
            if stream_order:   # the block writes its channels in the layer's order
                keeps = _ordered_tail(block.ops, keeps, lambda c, b=block: pos[_placed(b.index, (c,))[0]])
            ops, plan = _slim_ops(block.ops, keeps, layout, (li, "block", bi))
            blocks.append(Block(block.name, block.kind, block.label, tuple(ops), _shape(block.in_shape, len(layout)),
                                _shape(block.out_shape, len(keeps[-1])), place(_placed(block.index, keeps[-1])),
                                args=block.args))
            block_plans.append(plan)
        shortcut, sc_plan = None, []
        if layer.shortcut is not None:
            sc_ops, sc_plan = (_slim_ops(layer.shortcut.ops, sc_keeps, layout, (li, "shortcut"))
                               if layer.shortcut.ops else ([], []))
            shortcut = Shortcut(tuple(sc_ops), place(_placed(layer.shortcut.index, sc_keeps[-1])))
        width = len(out_layout)
        post = tuple(Op(op.kind, op.attrs, _shape(op.in_shape, width), _shape(op.out_shape, width)) for op in layer.post)
        post_plan = [OpPlan((li, "post", k), out_layout, out_layout, op.spec.slice_weights(op))
                     for k, op in enumerate(layer.post)]
        in_shape, out_shape = _shape(layer.in_shape, len(layout)), _shape(layer.out_shape, width)
        if not blocks:  # every block vanished: what is left is the shortcut (and the ops after it)
            if all(op.spec.keeps_values for op in shortcut.ops):
                post, post_plan = _drop_idle_activations(post, post_plan, in_range)
            if not shortcut.ops and not post:
                notes.append(f"layer {layer.name}: every block was pruned; the layer is an identity and was removed")
                layout = out_layout
                continue
            notes.append(f"layer {layer.name}: every block was pruned; only its shortcut remains")
            blocks = [Block(layer.name, "shortcut", "shortcut", (*shortcut.ops, *post), in_shape, out_shape)]
            block_plans, shortcut, post, sc_plan, post_plan = [sc_plan + post_plan], None, (), [], []
        layers.append(Layer(layer.name, tuple(blocks), in_shape, out_shape, shortcut, post))
        plans.append({"blocks": block_plans, "shortcut": sc_plan, "post": post_plan})
        layout = out_layout
        in_range = (_range_after((*blocks[0].ops, *post), in_range) if len(blocks) == 1 and not shortcut
                    else _range_after(post, None))
    notes += _cut_note(plans)
    slim = replace(net, layers=tuple(layers))
    return Derivation(slim, plans, masks, notes)


def _cut_note(plans: list[dict]) -> list[str]:
    cut = [p for layer in plans for chain in (*layer["blocks"], layer["shortcut"]) for p in chain if p and p.crop]
    if not cut:
        return []
    return [f"{len(cut)} conv kernel(s) cut to the taps their input map reaches (a 7x7 kernel on a 1x1 map is "
            f"its centre tap): the same function at this input size, not at a larger one; the baseline and "
            f"budgets count the unpruned network cut alike"]


def cut_kernels(net: Network) -> tuple[Network, int]:
    """`net`, gates and all, with every conv kernel cut to the taps its input map reaches (OpKind.trim),
    and how many were cut: the same function, trained faster (the ProxylessNAS supernet at 16 px
    takes a training step in 1/1.4 of the time, its 7x7 candidates on 1x1 maps being their centre
    taps). A run builds its supernet from it, so what it trains, counts and derives is what runs."""
    count = 0

    def cut(ops: tuple[Op, ...]) -> tuple[Op, ...]:
        nonlocal count
        out = []
        for op in ops:
            attrs, taps = op.spec.trim(op, op.attrs)
            count += bool(taps)
            out.append(replace(op, attrs=attrs) if taps else op)
        return tuple(out)

    layers = tuple(replace(layer, blocks=tuple(replace(b, ops=cut(b.ops)) for b in layer.blocks),
                           shortcut=layer.shortcut and replace(layer.shortcut, ops=cut(layer.shortcut.ops)),
                           post=cut(layer.post)) for layer in net.layers)
    return (replace(net, layers=layers), count) if count else (net, 0)


def unpruned(net: Network) -> Network:
    """What derivation makes of `net` with every channel kept: the same function, without gates and
    with its kernels cut to what each map reaches (what merging starts from for an unpruned network)."""
    return derive(net, {g.key: torch.ones(g.channels, dtype=torch.bool) for g in net.gates()}).network


# ---- weights -----------------------------------------------------------------------------------
def _slice(module_state: dict[str, torch.Tensor], plan: OpPlan) -> dict:
    """One op's tensors cut to its kept channels, each dim as the catalogue says (OpPlan.weights),
    or by the op's own slicing where it has one."""
    if plan.slice_state is not None:
        return {name: t.clone() for name, t in plan.slice_state(module_state).items()}
    index = {"out": torch.tensor(plan.out_index, dtype=torch.long),
             "in": torch.tensor(plan.in_index, dtype=torch.long)}
    result = {}
    for name, t in module_state.items():
        if name == "num_batches_tracked" or t.dim() == 0:
            result[name] = t.clone()
            continue
        for dim, role in enumerate(plan.weights.get(name, ("out",))):  # unnamed: one entry per output
            if role is not None:  # None: the dim is kept whole
                t = t.index_select(dim, index[role])
        if plan.crop and t.dim() == 4:
            t = t[..., plan.crop:-plan.crop, plan.crop:-plan.crop]
        result[name] = t.clone()
    return result


def slim_state_dict(derivation: Derivation, supernet, slim_model) -> dict[str, torch.Tensor]:
    """Slices the supernet's weights into a state dict for `slim_model` (both NasNet)."""
    src_ops = supernet.op_modules()
    dst_ops = slim_model.op_modules()
    state = {}
    for li, (plan, dst) in enumerate(zip(derivation.plans, dst_ops)):
        pairs = []
        for bplan, dmods in zip(plan["blocks"], dst["blocks"]):
            pairs += list(zip(bplan, dmods))
        pairs += list(zip(plan["shortcut"], dst["shortcut"])) + list(zip(plan["post"], dst["post"]))
        for op_plan, (dname, dmod) in pairs:
            if op_plan is None:
                continue
            layer_i, where, *rest = op_plan.source
            src = src_ops[layer_i]
            sname, smod = (src["blocks"][rest[0]][rest[1]] if where == "block" else src[where][rest[0]])
            if not list(smod.state_dict()):
                continue
            for k, v in _slice(smod.state_dict(), op_plan).items():
                state[f"{dname}.{k}"] = v
    return state
