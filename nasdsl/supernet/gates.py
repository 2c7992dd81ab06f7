"""The scaled-sigmoid (SS) gate of DNAL: gate = sigmoid(delta * s) per channel.

All gates of a supernet share one `GateState` (mode and delta), so switching the whole network
between disabled / soft / hard, or stepping delta, is a single assignment. A gate placed right
after a BatchNorm is fused into it: g * (gamma * x_hat + beta) is a BatchNorm with affine
(g * gamma, g * beta), so the gate costs no extra pass over the feature map.

A block that may vanish can also carry a one-channel *depth gate* that scales its output group:
closing it removes the whole block at once, so the penalty can price a block above the sum of its
channels (a layer's fixed time: kernel launches, Python, memory passes, whatever its width).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ("disabled", "soft", "hard")


@dataclass
class GateState:
    mode: str = "disabled"
    delta: float = 1.0


class SSGate(nn.Module):
    """Per-channel architecture parameter `s`; multiplies its input by the gate, unless fused."""

    def __init__(self, channels: int, key: str, state: GateState):
        super().__init__()
        self.s = nn.Parameter(torch.zeros(channels))
        self.key = key
        self.state = state
        self.fused = False
        self.depth_gate: SSGate | None = None  # a reference (set by `attach_depth_gate`), not a child

    def attach_depth_gate(self, gate: "SSGate") -> None:
        object.__setattr__(self, "depth_gate", gate)

    def factor(self) -> torch.Tensor | None:
        """The per-channel multiplier, or None when gates are disabled (the identity)."""
        mode = self.state.mode
        if mode == "disabled":
            return None
        if mode == "soft":
            g = torch.sigmoid(self.state.delta * self.s)
        else:
            g = (self.s > 0).to(self.s.dtype)
        if self.depth_gate is not None:
            g = g * self.depth_gate.factor()
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


class _GatedBatchNorm:
    """Mixin for a BatchNorm whose affine parameters are scaled by the following gate."""

    gate: SSGate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate.factor()
        if g is None:
            return super().forward(x)
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or self.running_mean is None
        return F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                            self.running_var if not self.training or self.track_running_stats else None,
                            self.weight * g, self.bias * g, use_batch_stats, momentum, self.eps)


class GatedBatchNorm1d(_GatedBatchNorm, nn.BatchNorm1d):
    pass


class GatedBatchNorm2d(_GatedBatchNorm, nn.BatchNorm2d):
    pass


def fuse_gates_into_bn(model: nn.Module) -> int:
    """Fuse every gate that directly follows a BatchNorm in a Sequential; returns how many."""
    fused = 0
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        mods = list(seq)
        for bn, gate in zip(mods, mods[1:]):
            if isinstance(gate, SSGate) and type(bn) in (nn.BatchNorm1d, nn.BatchNorm2d):
                bn.__class__ = GatedBatchNorm1d if isinstance(bn, nn.BatchNorm1d) else GatedBatchNorm2d
                object.__setattr__(bn, "gate", gate)  # a reference, not a second registration
                gate.fused = True
                fused += 1
    return fused
