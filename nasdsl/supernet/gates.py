"""The scaled-sigmoid (SS) gate of DNAL: gate = sigmoid(delta * s) per channel.

All gates of a supernet share one `GateState` (mode and delta), so switching the whole network
between disabled / soft / hard, or stepping delta, is a single assignment. A gate placed right
after a BatchNorm is fused into it: g * (gamma * x_hat + beta) is a BatchNorm with affine
(g * gamma, g * beta), so the gate costs no extra pass over the feature map (see `gate_batchnorm`).

A block that may vanish can also carry a one-channel *depth gate* that scales its output group:
closing it removes the whole block at once, so the penalty can price a block above the sum of its
channels (a layer's fixed time: kernel launches, Python, memory passes, whatever its width).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

MODES = ("disabled", "soft", "hard")


@dataclass
class GateState:
    mode: str = "disabled"
    delta: float = 1.0


class SSGate(nn.Module):
    """Per-channel architecture parameter `s`; multiplies its input by the gate, unless `fused`
    (the BN before it applies the gate in its affine, and this op passes its input through).

    `depth_gate` is the one-channel gate of the block this gate closes (its last channel group),
    whose factor scales this one's. It is held in a tuple, not registered: it is a child of its
    block, and a second registration would give its parameter a second name in the state dict."""

    def __init__(self, channels: int, key: str, state: GateState, fused: bool = False,
                 depth_gate: "SSGate | None" = None):
        super().__init__()
        self.s = nn.Parameter(torch.zeros(channels))
        self.key = key
        self.state = state
        self.fused = fused
        self._depth = (depth_gate,)

    @property
    def depth_gate(self) -> "SSGate | None":
        return self._depth[0]

    def factor(self) -> torch.Tensor | None:
        """The per-channel multiplier, or None when gates are disabled (the identity)."""
        mode = self.state.mode
        if mode == "disabled":
            return None
        if mode == "soft":
            g = torch.sigmoid(self.state.delta * self.s)
        else:
            g = (self.s > 0).to(self.s.dtype)
        depth = self.depth_gate
        if depth is not None:
            g = g * depth.factor()
        return g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return x
        g = self.factor()
        if g is None:
            return x
        return x * g.view(1, -1, *([1] * (x.dim() - 2)))

    def extra_repr(self) -> str:
        return f"{self.s.numel()}, key={self.key!r}" + (", fused into the BN before" if self.fused else "")


class GateScale(nn.Module):
    """The parametrization t -> t * g of a BN's weight or bias, g the gate that follows the BN.

    With both of the BN's affine parameters scaled, torch's own BatchNorm forward computes
    g * BN(x) in the same single pass over the map; disabled gates return t itself (no op). The
    gate is held in a tuple, not registered: it is registered where the graph puts it, after the BN."""

    def __init__(self, gate: SSGate):
        super().__init__()
        self._gate = (gate,)

    @property
    def gate(self) -> SSGate:
        return self._gate[0]

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        g = self.gate.factor()
        return t if g is None else t * g


_AFFINE = ("weight", "bias")


def gate_batchnorm(bn: nn.modules.batchnorm._BatchNorm, gate: SSGate) -> nn.modules.batchnorm._BatchNorm:
    """Makes `bn` apply `gate` in its affine, through torch.nn.utils.parametrize; returns `bn`.

    Parametrize files the parameters under `parametrizations.<name>.original`; the two state-dict
    hooks keep the plain BN's names and order, which checkpoints, `slim_state_dict` (it slices
    each op's own state dict) and a derived network's plain BN all read. The gate must be marked
    `fused`, so that it does not multiply a second time."""
    if not gate.fused:
        raise ValueError(f"gate {gate.key!r} is not marked fused: it would apply twice")
    for name in _AFFINE:
        parametrize.register_parametrization(bn, name, GateScale(gate))
    bn.register_state_dict_post_hook(_plain_bn_keys)
    bn.register_load_state_dict_pre_hook(_parametrized_bn_keys)
    return bn


def gated(module: nn.Module) -> SSGate | None:
    """The gate fused into this BN by `gate_batchnorm`, or None."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    scale = module.parametrizations["weight"][0]
    return scale.gate if isinstance(scale, GateScale) else None


def _plain_bn_keys(module: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: the entries a plain BN has, under its names and in its order (its
    parameters, then its buffers); the hook runs last for this module, so its entries are the
    ones under `prefix`."""
    own = {key[len(prefix):]: state.pop(key) for key in [k for k in state if k.startswith(prefix)]}
    for name in _AFFINE:
        state[prefix + name] = own.pop(f"parametrizations.{name}.original")
    state.update((prefix + key, value) for key, value in own.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        for key in [k for k in metadata if k.startswith(f"{prefix}parametrizations")]:
            del metadata[key]


def _parametrized_bn_keys(module: nn.Module, state: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: a plain BN's entries, filed where parametrize keeps them."""
    for name in _AFFINE:
        if prefix + name in state:
            state[f"{prefix}parametrizations.{name}.original"] = state.pop(prefix + name)
