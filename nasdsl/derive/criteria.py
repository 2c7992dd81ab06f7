"""Classic channel-pruning criteria at a cost budget: the baselines DNAL is measured against
(benchmarks/quality.py), on the same gate groups, derivation and accounting as DNAL itself.

- `l1`: in every gate group the channels whose filters (the conv that computes them) have the
  smallest L1 norm go, each group losing the same fraction (Li et al. 2017, "Pruning Filters for
  Efficient ConvNets");
- `bn`: the channels with the smallest |BN scale| go, one threshold for the whole network (Liu et al.
  2017, "network slimming", here without its sparsity training: the network is the one DNAL starts
  from), each group keeping at least its strongest `MIN_KEEP` of channels;
- `random`: every group loses the same fraction, chosen at random (the floor).

The fraction (or the threshold's rank) is bisected until the derived network, with derivation's
repair and `channel_multiple`, costs at most the target: "the same FLOPs" as DNAL's budget fit, to
the granularity of one channel. Torch-Pruning's pruners would need our graph's channel groups
(parallel blocks placed by index) explained to them; these are a few lines each on derive's own.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from nasdsl.derive.derive import Derivation, derive
from nasdsl.errors import NasdslError
from nasdsl.graph.accounting import network_cost
from nasdsl.graph.ir import Network

CRITERIA = ("l1", "bn", "random")
MIN_KEEP = 0.1   # bn: the share of each group's channels that one global threshold cannot close


def channel_scores(net: Network, model: nn.Module, criterion: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per gate key, one score per channel (higher: more worth keeping). `model` is the plain
    network of `net` (a NasNet: its op_modules follow the graph's ops, gates as identities)."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    gen = torch.Generator().manual_seed(seed)
    scores = {}
    for (layer, block), modules in zip(net.blocks(), _block_modules(net, model)):
        for i, op in enumerate(block.ops):
            if op.is_gate:
                scores[op.attrs["key"]] = (torch.rand(op.in_shape.channels, generator=gen) if criterion == "random"
                                           else _score(block.ops[:i], modules[:i], criterion, op.attrs["key"]))
    return scores


def _block_modules(net: Network, model: nn.Module) -> list[list[nn.Module]]:
    """Per block of `net`, in `net.blocks()` order, the modules of its ops."""
    return [[m for _, m in chain] for layer in model.op_modules() for chain in layer["blocks"]]


def _score(ops, modules, criterion: str, key: str) -> torch.Tensor:
    """The channels' BN |scale|, or their filters' L1 norm, from the nearest op before the gate that
    has them (a mixed conv's filters are its groups' filters, in channel order)."""
    for module in reversed(modules):
        if criterion == "bn" and isinstance(module, nn.modules.batchnorm._BatchNorm):
            return module.weight.detach().abs().cpu()
        if criterion == "l1" and isinstance(module, (nn.Conv2d, nn.Linear)):
            return module.weight.detach().abs().flatten(1).sum(1).cpu()
        if criterion == "l1" and isinstance(getattr(module, "convs", None), nn.ModuleList):
            return torch.cat([c.weight.detach().abs().flatten(1).sum(1) for c in module.convs]).cpu()
    raise NasdslError(f"gate {key}: no {'BN' if criterion == 'bn' else 'conv'} before it to score its channels "
                      f"by", file=f"criterion {criterion}")


def _strongest(s: torch.Tensor, keep: int) -> torch.Tensor:
    """The mask of the `keep` highest scores of `s`."""
    mask = torch.zeros(s.numel(), dtype=torch.bool)
    mask[s.argsort(descending=True)[:keep]] = True
    return mask


def _uniform(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Each group keeps its best ceil((1 - fraction) x n) channels (at least one)."""
    return {key: _strongest(s, max(1, math.ceil((1 - fraction) * s.numel() - 1e-9))) for key, s in scores.items()}


def _floor(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per group, the channels a global threshold leaves open: its strongest ceil(MIN_KEEP x n). BN
    scales of different layers are not on one scale (network slimming's L1 penalty trains them to be;
    these baselines prune the network DNAL starts from), and one threshold closed all but one channel
    of MobileNetV2's head, whose scales are small: that network trained to 38% where L1's reached 82%
    (Fashion-MNIST subset, 25% FLOPs). Torch-Pruning's global pruning offers the same cap per layer
    (max_pruning_ratio)."""
    return {key: _strongest(s, math.ceil(MIN_KEEP * s.numel() - 1e-9)) for key, s in scores.items()}


def _global_order(scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """The channels a global threshold may close, as indices into the groups' scores concatenated
    in `scores`' order, lowest score first: every channel but each group's floor (`_floor`)."""
    flat = torch.cat(list(scores.values()))
    floor = torch.cat(list(_floor(scores).values()))
    order = flat.argsort()
    return order[~floor[order]]


def _global(scores: dict[str, torch.Tensor], order: torch.Tensor, pruned: int) -> dict[str, torch.Tensor]:
    """The first `pruned` channels of `order` (`_global_order`) closed."""
    closed = torch.zeros(sum(s.numel() for s in scores.values()), dtype=torch.bool)
    closed[order[:pruned]] = True
    return dict(zip(scores, (~closed).split([s.numel() for s in scores.values()])))


def prune_to_budget(net: Network, scores: dict[str, torch.Tensor], target: int, metric: str = "flops",
                    uniform: bool = True, channel_multiple: int = 1, steps: int = 40) -> Derivation:
    """The derivation that prunes the fewest channels (by `scores`: the same fraction of each group,
    or one global ranking) while costing at most `target`."""
    def cost(d: Derivation) -> int:
        return getattr(network_cost(d.network), metric)

    order = None if uniform else _global_order(scores)   # ranked once; each step closes a prefix of it

    def at(x):
        masks = _uniform(scores, x) if uniform else _global(scores, order, int(x))
        return derive(net, masks, None, channel_multiple)

    lo, hi = 0.0, 1.0 if uniform else float(order.numel())
    best = at(hi)
    if cost(best) > target:
        raise NasdslError(f"no pruning reaches {target:,} {metric}: the smallest network costs {cost(best):,}")
    for _ in range(steps):  # invariant: `hi` fits, `lo` does not (or is nothing pruned)
        mid = (lo + hi) / 2 if uniform else float((int(lo) + int(hi)) // 2)
        if mid in (lo, hi) or (uniform and hi - lo < 1e-4):
            break
        d = at(mid)
        if cost(d) <= target:
            best, hi = d, mid
        else:
            lo = mid
    return best
