"""The source model's weights under the imported space's names, and the proof that they are right.

The compiled space lowers each layer to its ops in the order the importer read them from the
source (block, shortcut, ops after the add), so the n-th op with tensors in the space is the n-th
source module with tensors; their state dicts are paired entry by entry, and every shape must
agree (a 1x1 conv imported as a linear loses its two 1x1 dims). The result is then loaded into the
plain network of the space, and its eval-mode logits and parameter count are compared with the
source's: a space that does not compute the source model is never written.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from nasdsl.errors import NasdslError
from nasdsl.importer.structure import LayerPlan

TOLERANCE = 1e-4


def _with_tensors(chain) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in chain if m.state_dict()]


def target_modules(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The plain network's ops that hold tensors, in graph order."""
    out = []
    for layer in net.op_modules():
        for chain in layer["blocks"] + [layer["shortcut"], layer["post"]]:
            out.extend(_with_tensors(chain))
    return out


def map_weights(plans: list[LayerPlan], source: nn.Module, net: nn.Module, spec: str) -> dict[str, torch.Tensor]:
    """The source's tensors keyed by the plain network's state-dict names."""
    modules = dict(source.named_modules())
    prims = [p for plan in plans for p in plan.prims if p.module]
    targets = target_modules(net)
    if len(prims) != len(targets):
        raise NasdslError(f"internal mismatch: {len(prims)} source modules with weights, {len(targets)} in the "
                          f"space (please report it)", file=spec)
    state = {}
    for prim, (name, module) in zip(prims, targets):
        theirs, ours = modules[prim.module].state_dict(), module.state_dict()
        if len(theirs) != len(ours):
            raise NasdslError(f"{prim.module}: {len(theirs)} tensors, its op in the space has {len(ours)}", file=spec)
        for (their_key, value), (key, like) in zip(theirs.items(), ours.items()):
            if prim.conv_as_linear and value.dim() == 4:
                value = value.flatten(1)
            if value.shape != like.shape:
                raise NasdslError(f"{prim.module}.{their_key} has shape {list(value.shape)}, the space's "
                                  f"{name}.{key} {list(like.shape)}", file=spec)
            state[f"{name}.{key}"] = value.detach().clone()
    return state


def check_same(source: nn.Module, net: nn.Module, in_chans: int, resolution: int, spec: str) -> float:
    """Largest logit difference on random images, relative to the largest logit; raises past 1e-4.
    Relative, because a randomly initialised classifier gives logits near 1e-3: an absolute 1e-4
    would pass networks that compute something else."""
    ours, theirs = _count(net), _count(source)
    if ours != theirs:
        raise NasdslError(f"the space has {ours:,} parameters, the model {theirs:,}", file=spec)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, in_chans, resolution, resolution, generator=gen)
    with torch.no_grad():
        want, got = source.eval()(x), net.eval()(x)
    diff = float((want - got).abs().max() / want.abs().max().clamp(min=1e-12))
    if not diff <= TOLERANCE:
        raise NasdslError(f"the imported network's logits differ from the model's by {diff:.2e} (relative), "
                          f"more than {TOLERANCE:g} (please report it)", file=spec)
    return diff


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
