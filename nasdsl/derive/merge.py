"""A derived network's parallel blocks merged into one, RepVGG-style: fewer, wider ops, the same function.

A DNAL-derived ProxylessNAS layer keeps up to six thinned MBConv candidates on one input, each
placed into the layer's channels by index and summed: eighteen small convs where one MBConv has
three, and per-op costs (kernel set-up, Python, memory passes) that the FLOPs count does not see.
`merge` rewrites every such layer as one MBConv over the candidates' concatenated mid channels:

- expansion: the candidates' 1x1 convs on the shared input become one 1x1 conv, their BNs and
  activations one BN and one activation (per channel, so exact in training mode too);
- depthwise: one depthwise conv whose smaller kernels are zero-padded to the largest (`depthwise=
  "padded"`, the default), or one `mixconv`, a conv per kernel size (`"mixed"`; candidates are
  sorted by kernel so each group is contiguous). Padded does more MACs but runs faster on CPU:
  the derived default network at batch 64 takes 36 ms padded against 49 ms mixed, at batch 1
  9.6 ms against 14.2 (eager PyTorch, 2 threads; the split and the concatenation cost more than
  the zeros). Training the mixed form is faster (fwd+bwd 15 ms against 24 for 240 channels of
  8x8 at batch 64), but the merged network is not trained (below);
- projection: one 1x1 conv from the mid channels to the union of the candidates' outputs, each
  candidate's output BN folded into it (exact in eval mode: BN then is an affine map); a
  candidate's block of the weight is zero where it did not write a channel.

First, each residual stream's channels are renumbered in the order they join it (`order_streams`),
so that every shortcut lands on the leading channels: a zero pad, not an add by index.

And in a residual stream, a block that writes only some of the stream's channels (placed by an
indexed add) may end in a conv that writes them all, with zero rows for the others, so the add
is a plain dense one (`dense_residual`): worth it where the extra rows cost less than the
indexed add; the rule and its measurement are at `_dense_is_cheaper`.

The merged network is for inference and export. Finetuning trains `train_form`, the same
candidates as one block whose every op is per channel or per group (expansions concatenated,
depthwise convs as a MixConv, projections as one split conv and one BN over all the candidates'
outputs): the derived network's function, BN batch statistics and gradients exactly, with half
its convs and a sixth of its BNs. The merged network cannot be trained as the search's network:
its projection has no BN (folding one is exact only in eval mode), and it is a dense matrix
where the candidates' were block-sparse, so trained, its zeros would fill in and the network
would grow past what the search (or a budget) allowed (5.95M to 8.35M MACs on the default run).
Measured alone (benchmarks/derived_speed.py, the default search, batch 64, 2 threads): a
finetuning step of the derived network took 1/1.5 of the time in the training form (see README).
Eval-mode outputs of the merged network agree to float rounding (tests/test_merge.py checks every
shipped space; the exporter checks every export), and so does training with `train_form`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from nasdsl.derive.derive import derive, slim_state_dict
from nasdsl.graph.ir import Block, Layer, Network, Op, Shape
from nasdsl.graph.ops import is_one_tap_depthwise
from nasdsl.supernet.network import NasNet


@dataclass(frozen=True)
class _Part:
    """One op of the merged block: the blocks' ops at one position, and how they combine."""
    how: str           # "concat" (channelwise, or the shared input's dense conv), "mix" (depthwise),
                       # "keep" (a lone block's op as it is), "project" (the last dense conv and its BN)
    ops: tuple[Op, ...]  # the blocks' ops at this position (project: each block's conv, then each one's BN)
    position: int      # the ops' position in every block's chain (the blocks share one kind sequence)


DEPTHWISE = ("padded", "mixed")


def merge(network: Network, state: dict[str, torch.Tensor], dense_residual: bool = True,
          depthwise: str = "padded", fold_scales: bool = True,
          ordered: bool = True) -> tuple[Network, dict[str, torch.Tensor]]:
    """The merged network and its NasNet state dict (see the module docstring). Layers that cannot
    be merged stay as they are; `state` is the derived network's NasNet state dict, in eval mode.
    `fold_scales`: fold each one-tap depthwise conv into its BN (`_fold_scales`); `ordered`: first
    put each residual stream's channels in the order they join it (`order_streams`). Exports made
    before nasdsl did either hold the merged network without it."""
    if depthwise not in DEPTHWISE:
        raise ValueError(f"depthwise must be one of {DEPTHWISE}, got {depthwise!r}")
    if ordered:
        network, state = order_streams(network, state)
    state = dict(state)
    layers = []
    last = len(network.layers) - 1
    for i, layer in enumerate(network.layers):
        prefix = f"layers.{i}."
        own = _under(state, prefix) if i < last else None
        merged = _merge_layer(layer, own, dense_residual, depthwise) if own is not None else None
        if merged is None:
            layers.append(layer)
            continue
        layer, own = merged
        _replace_under(state, prefix, own)
        layers.append(layer)
    network = replace(network, layers=tuple(layers))
    return _fold_scales(network, state) if fold_scales else (network, state)


def _merge_layer(layer: Layer, own: dict, dense_residual: bool, depthwise: str):
    """(merged layer, its state under `layers.i.`), or None when there is nothing to merge."""
    if len(layer.blocks) > 1:
        parts, order = _parts(layer)
    elif len(layer.blocks) == 1 and layer.shortcut is not None and layer.blocks[0].index is not None \
            and dense_residual:
        parts, order = _tail_parts(layer.blocks[0]), [0]
    else:
        return None
    if parts is None:
        return None
    blocks = [layer.blocks[j] for j in order]
    union = sorted({c for b in blocks for c in (b.index if b.index is not None else range(b.out_shape.channels))})
    width = layer.width
    dense = dense_residual and layer.shortcut is not None and len(union) < width and \
        _dense_is_cheaper(len(union), width)
    if len(blocks) == 1 and not dense:
        return None   # a lone block that stays indexed: nothing to gain
    outputs = list(range(width)) if dense else union
    ops, tensors = [], {}
    for part in parts:
        k = len(ops)
        ops.append(_merged_op(part, outputs, depthwise))
        for name, t in _merged_tensors(part, blocks, order, own, outputs, depthwise).items():
            tensors[f"blocks.0.ops.{k}.{name}"] = t
    tensors.update((k, v) for k, v in own.items() if not k.startswith("blocks."))  # shortcut, post
    index = None if outputs == list(range(width)) else tuple(outputs)
    first = blocks[0]
    label = " + ".join(b.label for b in blocks) if len(blocks) > 1 else first.label
    block = Block(f"{layer.name}.merged", "merged", label, tuple(ops), first.in_shape,
                  Shape(len(outputs), first.out_shape.size), index)
    return replace(layer, blocks=(block,)), tensors


def order_streams(network: Network, state: dict[str, torch.Tensor]) -> tuple[Network, dict[str, torch.Tensor]]:
    """`network` with each residual stream's channels in the order they join it, and its state:
    the same function. Derivation numbers a layer's channels as the unpruned network did, so where
    a block adds channels to a stream, the channels the layer's input already had are scattered
    among them and the shortcut is added by index (ResNet-56 searched to 3x: 9 of its 22 layers).
    In the order they join, the shortcut is the leading channels, a zero pad; derivation with
    `stream_order` renumbers them so (the dense convs' rows and columns permuted, nothing else),
    and gives each of two blocks side by side (MobileNetV2's projection) a contiguous range. The
    logits are the same; a feature map inside a stream holds the same channels in the new order.
    A network that still has gates is left as it is (derivation would drop them)."""
    if network.gates():
        return network, state
    d = derive(network, {}, stream_order=True)
    if d.network == network:
        return network, state
    source = NasNet(network.to_config())
    source.load_state_dict(state)
    return d.network, slim_state_dict(d, source, NasNet(d.network.to_config()))


# ---- one-tap depthwise convs folded into their BN -----------------------------------------------
def _fold_scales(network: Network, state: dict[str, torch.Tensor]) -> tuple[Network, dict[str, torch.Tensor]]:
    """`network` with every one-tap depthwise conv in a block folded into the BN after it (exact in
    eval mode: both are per-channel affine maps), a stride kept as a `subsample`. PyTorch runs such
    a conv as a grouped conv of C groups: on the default search's 1x1 maps, at batch 1, about 0.1 ms
    each on 2 threads and 2 to 3.6 ms on 1 (a per-group loop), for C multiplies. Folded, the
    default run's merged network took 4.2 against 5.5 ms a batch of 1 and 22 against 24 ms a batch
    of 64 (2 threads), and 1/10 of the time at batch 1 on one thread."""
    layers = []
    for i, layer in enumerate(network.layers):
        blocks = []
        for j, block in enumerate(layer.blocks):
            if any(is_one_tap_depthwise(op) for op in block.ops):
                prefix = f"layers.{i}.blocks.{j}.ops."
                ops, own = _fold_block(block.ops, _under(state, prefix))
                if ops is not None:
                    _replace_under(state, prefix, own)
                    block = replace(block, ops=ops)
            blocks.append(block)
        layers.append(replace(layer, blocks=tuple(blocks)))
    return replace(network, layers=tuple(layers)), state


def _fold_block(ops: tuple[Op, ...], own: dict) -> tuple[tuple[Op, ...] | None, dict]:
    """(the chain with each one-tap depthwise conv and the op after it that absorbs an affine map
    (BN) as [subsample +] that op, its tensors renumbered), or (None, own) when there is none."""
    out, tensors, p = [], {}, 0
    while p < len(ops):
        op = ops[p]
        after = ops[p + 1] if p + 1 < len(ops) else None
        if is_one_tap_depthwise(op) and after is not None and after.spec.absorb_affine is not None:
            if op.attrs["stride"] > 1:
                out.append(Op("subsample", {"stride": op.attrs["stride"]}, op.in_shape, op.out_shape))
            conv = _under(own, f"{p}.")
            scale = conv["weight"].reshape(-1)
            shift = conv["bias"] if "bias" in conv else torch.zeros_like(scale)
            folded = after.spec.absorb_affine(after.attrs, _under(own, f"{p + 1}."), scale, shift)
            tensors.update((f"{len(out)}.{k}", v) for k, v in folded.items())
            out.append(after)
            p += 2
            continue
        tensors.update((f"{len(out)}.{k}", v) for k, v in _under(own, f"{p}.").items())
        out.append(op)
        p += 1
    return (tuple(out), tensors) if out != list(ops) else (None, own)


# ---- which layers merge, and how (the op catalogue's `merge` and `eval_affine` say per kind) ------
def _role(op: Op) -> str | None:
    return op.spec.merge(op)


def _under(state: dict, prefix: str) -> dict:
    """The entries of a state dict under `prefix`, named relative to it."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _replace_under(state: dict, prefix: str, own: dict) -> None:
    """`state`'s entries under `prefix` replaced by `own` (named relative to it), in place."""
    for key in [k for k in state if k.startswith(prefix)]:
        del state[key]
    state.update((prefix + k, v) for k, v in own.items())


def _project_part(columns: list, proj: int) -> _Part:
    """The projection: each block's dense conv at `proj`, then each one's BN after it (if any)."""
    after = columns[proj + 1] if proj + 1 < len(columns) else ()
    return _Part("project", tuple(columns[proj] + after), proj)


def _kernel(block: Block) -> int:
    return next((op.attrs["k"] for op in block.ops if _role(op) == "depthwise"), 0)


def _parts(layer: Layer):
    """The merged block's parts for parallel blocks of one kind sequence ending in a dense conv
    (and its BN): a channelwise prefix that concatenates, then one projection; and the blocks'
    order in it, sorted by kernel (stable) so each kernel's channels are contiguous. (None, None)
    when the blocks do not fit that form."""
    order = sorted(range(len(layer.blocks)), key=lambda j: _kernel(layer.blocks[j]))
    blocks = [layer.blocks[j] for j in order]
    kinds = {tuple(op.kind for op in b.ops) for b in blocks}
    if len(kinds) != 1:
        return None, None
    n = len(blocks[0].ops)
    columns = [tuple(b.ops[p] for b in blocks) for p in range(n)]
    proj = max((p for p in range(n) if _role(columns[p][0]) == "dense"), default=None)
    if proj is None or proj == 0 or not _tail_fits(columns[proj:]):
        return None, None
    parts = []
    for p, ops in enumerate(columns[:proj]):
        how = _concat_how(ops, first=p == 0, in_width=layer.in_shape.channels)
        if how is None:
            return None, None
        parts.append(_Part(how, ops, p))
    parts.append(_project_part(columns, proj))
    return parts, order


def _tail_parts(block: Block) -> list[_Part] | None:
    """A lone residual block whose indexed output can be widened: its ops up to the last dense conv
    stay one part each ("keep"), that conv (and its BN) is the projection. None if it cannot."""
    proj = max((p for p, op in enumerate(block.ops) if _role(op) == "dense"), default=None)
    columns = [(op,) for op in block.ops]
    if proj is None or not _tail_fits(columns[proj:]):
        return None
    return [_Part("keep", (op,), p) for p, op in enumerate(block.ops[:proj])] + [_project_part(columns, proj)]


def _tail_fits(columns) -> bool:
    """A dense conv, optionally followed by a per-channel affine map in eval mode (BN), and nothing after."""
    conv = columns[0]
    if len({(op.attrs["k"], op.attrs["stride"], op.attrs["padding"]) for op in conv}) != 1:
        return False
    return len(columns) == 1 or (len(columns) == 2 and columns[1][0].spec.eval_affine is not None)


def _concat_how(ops: tuple[Op, ...], first: bool, in_width: int) -> str | None:
    """How the blocks' ops at one position before the projection combine, or None if they cannot."""
    op = ops[0]
    role = _role(op)
    if role == "depthwise":
        same_stride = len({o.attrs["stride"] for o in ops}) == 1
        centred = all(o.attrs["padding"] == o.attrs["k"] // 2 and o.attrs["k"] % 2 and not o.attrs["bias"]
                      for o in ops)
        return "mix" if same_stride and centred else None
    same = len({tuple(sorted((k, v) for k, v in o.attrs.items() if k != "out")) for o in ops}) == 1
    if role == "dense":   # a dense conv reading the whole shared input: the expansion
        return "concat" if first and same and op.in_shape.channels == in_width else None
    return "concat" if role == "channelwise" and same else None


def _dense_is_cheaper(kept: int, width: int) -> bool:
    """Whether a residual block should write all `width` channels (zero rows) rather than add its
    `kept` ones by index: yes while the zero rows at most double the conv's MACs. An indexed add
    allocates a zeroed map of the stream and scatters into it. Measured alone on this CPU (2
    threads, eager, channels-last): a single conv + add at batch 1 was always faster dense (46
    against 53 us, a 3x3 conv from 32 channels writing 32 of 64 at 8x8); at batch 64 it broke even
    near half the MACs added (620 against 623 us writing 40 of 64) and lost at double (1.85 against
    0.51 ms). But in whole networks the indexed adds that remain cost more than alone (the generated
    code's index_add has no channels-last path): ResNet-56 searched to 3x, merged, read 0.45 / 0.36
    (speed-up / FLOPs reduction, batch 64 / 1, benchmarks/derived_speed.py) with this rule against
    0.39 / 0.34 with the half rule, and MobileNetV2 the same within the noise."""
    return width - kept <= kept


# ---- the merged ops and their weights ------------------------------------------------------------
def _merged_op(part: _Part, outputs: list[int], depthwise: str) -> Op:
    ops = part.ops
    op = ops[0]
    if part.how == "keep":
        return op
    channels = sum(o.out_shape.channels for o in ops)
    if part.how == "project":
        convs = [o for o in ops if _role(o) == "dense"]
        in_shape = Shape(sum(o.in_shape.channels for o in convs), op.in_shape.size)
        attrs = dict(op.attrs, out=len(outputs), bias=op.attrs["bias"] or len(convs) < len(ops))
        return Op(op.kind, attrs, in_shape, Shape(len(outputs), op.out_shape.size))
    dense = _role(op) == "dense"
    in_channels = op.in_shape.channels if dense else channels
    in_shape, out_shape = Shape(in_channels, op.in_shape.size), Shape(channels, op.out_shape.size)
    if part.how == "mix":
        kernels = sorted({o.attrs["k"] for o in ops})
        if len(kernels) == 1 or depthwise == "padded":
            k = kernels[-1]
            return Op(op.kind, dict(op.attrs, out=channels, groups=channels, k=k, padding=k // 2), in_shape, out_shape)
        splits = [sum(o.out_shape.channels for o in ops if o.attrs["k"] == k) for k in kernels]
        return Op("mixconv", {"kernels": tuple(kernels), "in_splits": tuple(splits), "out_splits": tuple(splits),
                              "stride": op.attrs["stride"], "depthwise": True}, in_shape, out_shape)
    attrs = dict(op.attrs, out=channels) if dense else dict(op.attrs)
    return Op(op.kind, attrs, in_shape, out_shape)


def _merged_tensors(part: _Part, blocks, order: list[int], own: dict, outputs: list[int], depthwise: str) -> dict:
    """The merged op's tensors (its NasNet state-dict entries), from each block's op at this position."""
    if part.how == "project":
        return _projection(part, blocks, order, own, outputs)
    per_block = [_under(own, f"blocks.{j}.ops.{part.position}.") for j in order]
    if part.how == "keep":
        return per_block[0]
    kernels = sorted({o.attrs["k"] for o in part.ops}) if part.how == "mix" else []
    if len(kernels) > 1 and depthwise == "padded":
        return {"weight": torch.cat([_pad_kernel(t["weight"], kernels[-1]) for t in per_block])}
    if len(kernels) > 1:
        return {f"convs.{g}.weight": torch.cat([t["weight"] for t, o in zip(per_block, part.ops) if o.attrs["k"] == kk])
                for g, kk in enumerate(kernels)}
    out = {}
    for name, first in per_block[0].items():
        if first.dim() == 0:   # BN's num_batches_tracked
            out[name] = first.clone()
        else:
            out[name] = torch.cat([t[name] for t in per_block])
    return out


def _pad_kernel(weight: torch.Tensor, k: int) -> torch.Tensor:
    """A depthwise kernel zero-padded, centred, to k x k: the same conv with padding k // 2."""
    pad = (k - weight.shape[-1]) // 2
    return torch.nn.functional.pad(weight, [pad] * 4)


def _projection(part: _Part, blocks, order: list[int], own: dict, outputs: list[int]) -> dict:
    """One conv from the concatenated mid channels to `outputs`, each block's output BN folded in
    (its eval-mode affine map, the catalogue's `eval_affine`): BN(Wx + b) = scale * (Wx + b) + shift."""
    row = {c: r for r, c in enumerate(outputs)}
    convs = [op for op in part.ops if _role(op) == "dense"]
    mids = [op.in_shape.channels for op in convs]
    first = convs[0]
    weight = torch.zeros(len(outputs), sum(mids), first.attrs["k"], first.attrs["k"])
    bias = torch.zeros(len(outputs))
    offset = 0
    p = part.position
    for n, (block, conv) in enumerate(zip(blocks, convs)):
        prefix = f"blocks.{order[n]}.ops."
        w = own[f"{prefix}{p}.weight"].float()
        b = own[f"{prefix}{p}.bias"].float() if conv.attrs["bias"] else torch.zeros(w.shape[0])
        if p + 1 < len(block.ops):   # the BN after it
            after = block.ops[p + 1]
            tensors = {k: v.float() for k, v in _under(own, f"{prefix}{p + 1}.").items()}
            scale, shift = after.spec.eval_affine(after.attrs, tensors)
            w, b = w * scale.view(-1, 1, 1, 1), b * scale + shift
        placed = block.index if block.index is not None else range(w.shape[0])
        rows = torch.tensor([row[c] for c in placed], dtype=torch.long)
        weight[rows, offset:offset + mids[n]] += w
        bias[rows] += b
        offset += mids[n]
    return {"weight": weight, "bias": bias}


# ---- the form finetuning trains ----------------------------------------------------------------------
# A tensor of the training form and where its rows come from: the derived tensors concatenated along
# dim 0, each with its row count (None: a 0-d tensor, BN's num_batches_tracked, shared by all)
_Rows = tuple[tuple[str, int | None], ...]


def train_form(network: Network, state: dict[str, torch.Tensor]):
    """The derived network with each layer's parallel blocks as one block that computes exactly what
    they do in training mode too, for finetuning: the expansions as one conv, BN and activation over
    the concatenated mid channels, the depthwise convs as a MixConv (a conv per kernel size), the
    projections as one split conv (MixConv with 1x1 groups: each candidate reads its own mid channels)
    and one BN over all the candidates' outputs, which the block's index adds into the layer (two
    candidates writing one channel are summed: the index repeats it, which `@ [...]` in a .space never
    does, so this form is never printed). Every op is per channel or per group, so batch statistics,
    gradients and the MACs are the candidates' own; a finetuning step takes fewer, wider ops.

    Returns the network, its state, and the function that maps a state of it back to `network`'s
    (exact: every tensor is a concatenation of the derived network's). Layers that do not fit the
    form (a lone block, candidates of different structure, a projection with a bias) stay as they are."""
    layers, out, rows = [], dict(state), {}
    for i, layer in enumerate(network.layers):
        merged = _train_layer(layer, f"layers.{i}.", state) if len(layer.blocks) > 1 else None
        if merged is None:
            layers.append(layer)
            continue
        layer, layer_rows = merged
        for sources in layer_rows.values():   # (block 0's tensors share names with the merged ones)
            for s, _ in sources:
                del out[s]
        out.update((name, torch.cat([state[s] for s, _ in sources]) if sources[0][1] is not None
                    else state[sources[0][0]].clone()) for name, sources in layer_rows.items())
        rows.update(layer_rows)
        layers.append(layer)

    def to_derived(trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        back = {k: v for k, v in trained.items() if k not in rows}
        for name, sources in rows.items():
            if sources[0][1] is None:
                back.update((s, trained[name].clone()) for s, _ in sources)
            else:
                back.update(zip([s for s, _ in sources], trained[name].split([n for _, n in sources])))
        return {k: back[k] for k in state}   # the derived network's order

    return replace(network, layers=tuple(layers)), out, to_derived


def _train_layer(layer: Layer, prefix: str, state: dict) -> tuple[Layer, dict[str, _Rows]] | None:
    """One layer's training form and where each of its merged tensors' rows come from, or None."""
    parts, order = _parts(layer)
    if parts is None:
        return None
    blocks = [layer.blocks[j] for j in order]
    proj = parts[-1].position
    convs = [b.ops[proj] for b in blocks]
    if any(c.attrs["bias"] or c.attrs["k"] != 1 or c.attrs["stride"] != 1 for c in convs):
        return None
    ops, rows, own = [], {}, _under(state, prefix)

    def suffixes(position: int) -> list[str]:   # the tensor names of the blocks' op at `position`
        return list(_under(own, f"blocks.{order[0]}.ops.{position}."))

    def add(op: Op, names: dict[str, list[str]]) -> None:   # suffix -> the derived tensors, in rows order
        for suffix, keys in names.items():
            rows[f"{prefix}blocks.0.ops.{len(ops)}.{suffix}"] = tuple(
                (k, None if state[k].dim() == 0 else state[k].shape[0]) for k in keys)
        ops.append(op)

    for part in parts[:-1]:
        op = _merged_op(part, [], "mixed")
        kernels = sorted({o.attrs["k"] for o in part.ops}) if part.how == "mix" else []
        if len(kernels) > 1:   # a MixConv: one weight per kernel size
            add(op, {f"convs.{g}.weight": [f"{prefix}blocks.{j}.ops.{part.position}.weight"
                                           for j, b in zip(order, blocks) if _kernel(b) == k]
                     for g, k in enumerate(kernels)})
        else:
            add(op, {s: [f"{prefix}blocks.{j}.ops.{part.position}.{s}" for j in order]
                     for s in suffixes(part.position)})
    mids = tuple(c.in_shape.channels for c in convs)
    outs = tuple(c.out_shape.channels for c in convs)
    size = convs[0].out_shape.size
    add(Op("mixconv", {"kernels": (1,) * len(convs), "in_splits": mids, "out_splits": outs, "stride": 1,
                       "depthwise": False}, Shape(sum(mids), size), Shape(sum(outs), size)),
        {f"convs.{g}.weight": [f"{prefix}blocks.{j}.ops.{proj}.weight"] for g, j in enumerate(order)})
    if proj + 1 < len(blocks[0].ops):   # each candidate's BN after its projection: one BN over them all
        bn = blocks[0].ops[proj + 1]
        add(Op(bn.kind, dict(bn.attrs), Shape(sum(outs), size), Shape(sum(outs), size)),
            {s: [f"{prefix}blocks.{j}.ops.{proj + 1}.{s}" for j in order] for s in suffixes(proj + 1)})
    index = tuple(c for b in blocks for c in (b.index if b.index is not None else range(b.out_shape.channels)))
    label = " + ".join(b.label for b in blocks)
    block = Block(f"{layer.name}.merged", "merged", label, tuple(ops), blocks[0].in_shape,
                  Shape(sum(outs), size), index)
    return replace(layer, blocks=(block,)), rows
