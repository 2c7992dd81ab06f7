"""DNAL, the paper's Algorithm 1, as an algorithm: which parameters each stage trains, the gates'
delta schedule and penalty during training, and how the learned gates are settled at the end.

It knows nothing of run folders, exports or the command line (nasdsl.pipeline runs the stages in
order, checkpoints them and writes the results); the training loop is nasdsl.train's, and this
module plugs into it through `GateHooks`.

    stage 1 (weights)       every gate disabled (the identity), every weight trained
    stage 2 (architecture)  every weight frozen (classifier too), s from 0, delta from delta_start
                            to delta_end, loss + lambda_a * sum(sigmoid(delta * s))  (Eq. 4)
    joint (the ablation)    weights and gates together, delta growing
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from nasdsl.graph.accounting import gate_channel_cost
from nasdsl.graph.ir import Network
from nasdsl.train.loop import StageHooks
from nasdsl.train.schedule import delta as delta_at

BINARY_TOLERANCE = 1e-6
HISTOGRAMS = 12           # snapshots of the gate distribution over the architecture stage


def weight_params(model: nn.Module) -> list[nn.Parameter]:
    gate_ids = {id(p) for p in model.gate_set.parameters()}
    return [p for p in model.parameters() if id(p) not in gate_ids]


def train_weights_only(model: nn.Module) -> list[nn.Parameter]:
    """Stage 1: gates disabled and frozen; returns the parameters to optimise."""
    model.gate_set.set_mode("disabled")
    _trainable(model, weights=True, gates=False)
    return weight_params(model)


def train_gates_only(model: nn.Module, fresh: bool) -> list[nn.Parameter]:
    """Stage 2: weights frozen, gates soft, s reset to 0 at the stage's start (not on resume)."""
    if fresh:
        model.gate_set.reset(0.0)
    model.gate_set.set_mode("soft")
    _trainable(model, weights=False, gates=True)
    return model.gate_set.parameters()


def train_jointly(model: nn.Module, fresh: bool) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The joint strategy: (weight params, gate params), both trained, gates soft."""
    if fresh:
        model.gate_set.reset(0.0)
    model.gate_set.set_mode("soft")
    _trainable(model, weights=True, gates=True)
    return weight_params(model), model.gate_set.parameters()


def _trainable(model: nn.Module, *, weights: bool, gates: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(weights)
    for p in model.gate_set.parameters():
        p.requires_grad_(gates)


def weigh_gates(model: nn.Module, network: Network, arch) -> None:
    """With `penalty_weight: flops` (or params), each gate counts the MACs (parameters) of its channel,
    and each depth gate its block's fixed `block_cost`, so pruning goes where the compute is; `auto`
    is resolved by the plan step (nasdsl.pipeline.plan.resolve_penalty_weight)."""
    if arch.penalty_weight == "auto":
        raise ValueError("architecture.penalty_weight auto must be resolved against the budget first")
    if arch.penalty_weight != "channels":
        model.gate_set.weigh(gate_channel_cost(network, arch.penalty_weight), arch.block_cost)


class GateHooks(StageHooks):
    """The architecture stage's additions to the training loop: delta grows per step, the loss gains
    lambda_a times the gate penalty, and the gate distribution is snapshotted about 12 times."""

    def __init__(self, gate_set, arch, epochs: int, histograms: list[dict] | None = None):
        self.gate_set, self.arch, self.epochs = gate_set, arch, epochs
        self.histograms = histograms  # None: take no snapshots (every rank but the main one)

    def before_step(self, step: int, steps: int) -> None:
        self.gate_set.set_delta(delta_at(self.arch, step, steps, self.epochs))

    def penalty(self) -> torch.Tensor:
        return self.arch.lambda_a * self.gate_set.penalty(self.arch.penalty)

    def after_step(self, step: int, total: int) -> None:
        every = max(1, total // HISTOGRAMS)
        if self.histograms is not None and (step % every == 0 or step == total - 1):
            self.histograms.append(histogram(self.gate_set))

    def kept(self) -> int:
        return int(sum(int((g.s > 0).sum()) for g in self.gate_set.gates))

    def postfix(self) -> dict:
        return {"delta": f"{self.gate_set.state.delta:.3g}", "kept": f"{self.kept()}/{self.gate_set.channels}"}

    def epoch_metrics(self) -> dict:
        return {"delta": self.gate_set.state.delta, "kept_channels": self.kept(),
                "penalty": float(self.gate_set.penalty(self.arch.penalty).detach())}


class BudgetHooks(GateHooks):
    """GateHooks whose penalty weight is steered so that the hard-masked network ends at a budget.

    Every `every` steps the exact cost of the network the gates select now (s > 0), derived and
    counted by `measure`, is compared with the target, and lambda moves by dual ascent in log space:
    log lambda += rate * clip((cost - target) / target, -1, 1). Too expensive raises the price of a
    channel, too cheap lowers it; lambda_a is only the starting value. The derivation that follows
    the stage closes or reopens the last few channels to fit exactly (nasdsl.derive.budget).
    """

    def __init__(self, gate_set, arch, epochs: int, histograms: list[dict] | None, *, target: float,
                 measure, rate: float = 0.1, every: int = 1, lam: float | None = None):
        super().__init__(gate_set, arch, epochs, histograms)
        self.target, self.measure, self.rate, self.every = float(target), measure, rate, every
        self.lam = float(arch.lambda_a if lam is None else lam)
        self.cost: float | None = None

    def before_step(self, step: int, steps: int) -> None:
        super().before_step(step, steps)
        if step % self.every == 0:
            self.cost = float(self.measure(selected_values(self.gate_set)))
            error = max(-1.0, min(1.0, (self.cost - self.target) / self.target))
            self.lam = min(max(self.lam * math.exp(self.rate * error), LAMBDA_MIN), LAMBDA_MAX)

    def penalty(self) -> torch.Tensor:
        return self.lam * self.gate_set.penalty(self.arch.penalty)

    def postfix(self) -> dict:
        return {**super().postfix(), "lambda": f"{self.lam:.3g}", "cost/target": f"{(self.cost or 0) / self.target:.2f}"}

    def epoch_metrics(self) -> dict:
        self.cost = float(self.measure(selected_values(self.gate_set)))  # after the epoch's last step
        return {**super().epoch_metrics(), "lambda": self.lam, "cost": self.cost, "target": self.target}


LAMBDA_MIN, LAMBDA_MAX = 1e-12, 1e3


def selected_values(gate_set) -> dict[str, torch.Tensor]:
    """The channel gates' values with every block whose depth gate is closed closed too: what the
    hard gates select now, in the form derivation reads (the gates themselves are left as they are)."""
    values = gate_set.values()
    for depth in gate_set.depth_gates:
        if float(depth.s.detach()) <= 0:
            for key in gate_set.blocks_of[depth.key]:
                values[key] = -values[key].abs()
    return values


def histogram(gate_set) -> dict:
    g = torch.sigmoid(gate_set.state.delta * gate_set.flat_s().detach().cpu())
    return {"delta": gate_set.state.delta, "counts": torch.histc(g, bins=10, min=0.0, max=1.0).tolist()}


def settle_gates(s: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                 delta_end: float) -> tuple[dict[str, torch.Tensor], int]:
    """The final gates: each s on the side of zero its effective mask says, and out of the band where
    sigmoid(delta_end * s) is not yet within BINARY_TOLERANCE of 0 or 1.

    The masks may differ from s > 0 (derivation reopens a channel or closes a cut block). A few gates
    end the search inside the band because sigmoid' vanishes there as delta grows faster than s moves;
    settling them changes no decision. Returns the new values and how many such stranded gates moved.
    """
    margin = math.log(10 / BINARY_TOLERANCE) / delta_end  # a gate within tolerance / 10
    settled, stranded = {}, 0
    for key, v in s.items():
        keep = masks[key].to(v.device)
        stranded += int(((v > 0) == keep).logical_and(v.abs() < margin).sum())
        settled[key] = torch.where(keep, v.clamp_min(margin), v.clamp_max(-margin))
    return settled, stranded


def harden(gate_set, settled: dict[str, torch.Tensor]) -> None:
    """The searched network: the settled gates loaded and applied as hard 0/1 masks."""
    gate_set.load(settled)
    gate_set.set_mode("hard")


def gate_counts(gates: dict[str, torch.Tensor] | None, delta_end: float) -> dict:
    """How many gates there are, how many are kept and what fraction is binary at delta_end."""
    if not gates:
        return {"total": 0, "kept": 0, "binarized_fraction": 0.0}
    s = torch.cat([t.reshape(-1) for t in gates.values()])
    g = torch.sigmoid(delta_end * s.double())
    binary = ((g < BINARY_TOLERANCE) | (g > 1 - BINARY_TOLERANCE)).double().mean().item() if s.numel() else 1.0
    return {"total": int(s.numel()), "kept": int((s > 0).sum()), "binarized_fraction": binary}


def stranded_note(count: int, delta_end: float) -> str:
    return (f"{count} gate(s) ended the architecture stage not yet binary at delta {delta_end:g} (|s| too "
            f"small); each was moved just outside that band on its own side, so it stays kept or closed as before")
