"""The typed state of a run: where it is and what it has measured, checkpointed after every epoch.

It converts to and from plain data (numbers, strings, lists, dicts and tensors) so a checkpoint
loads with `torch.load(weights_only=True)`, which never runs pickled code.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Measured:
    """A network's cost and accuracy."""
    flops: int
    params: int
    top1: float


@dataclass
class RunState:
    stage: str                                   # the stage running (or next to run)
    epoch: int = 0                               # epochs of `stage` already done
    baseline: Measured | None = None             # the supernet after stage 1 (joint: after it, or with
                                                 # --init before it), gates disabled
    searched: Measured | None = None             # the supernet with the settled hard gates
    derived: Measured | None = None              # the slim network after finetuning
    stage_seconds: dict[str, float] = field(default_factory=dict)
    histograms: list[dict] = field(default_factory=list)  # gate distribution snapshots of stage 2
    notes: list[str] = field(default_factory=list)         # what derivation changed, for the summary
    gates: dict[str, torch.Tensor] | None = None  # the settled gate values, once searched
    depth_closed: int = 0                         # blocks closed by their depth gate
    gate_divergence: float = 0.0                  # largest gate difference between DDP ranks
    budget: int = 0                               # which of the plan's budgets is being searched
    budget_lambda: float | None = None            # the steered penalty weight at the last epoch's end
    achieved: int | None = None                   # the derived network's cost in the budget's metric
    fit: dict | None = None                       # the fit at derivation: {steered, closed, reopened}
    models: list[dict] = field(default_factory=list)  # the finished budgets' summary entries

    def kept(self, record: dict, stages: list[str]) -> bool:
        """Whether a metrics record is of an epoch this state has done (on resume the others go)."""
        if record.get("stage") not in stages:
            return True
        done = _position(stages, self.stage, self.epoch, self.budget)
        return _position(stages, record["stage"], record["epoch"], record.get("budget", 0)) < done

    def next_budget(self) -> None:
        """Forget what the last budget's search found; the weights stage's results stay."""
        self.budget += 1
        self.stage, self.epoch = "architecture", 0
        self.searched = self.derived = self.gates = self.budget_lambda = self.achieved = self.fit = None
        self.histograms, self.notes, self.depth_closed = [], [], 0
        for stage in ("architecture", "finetune"):
            self.stage_seconds.pop(stage, None)

    def to_plain(self) -> dict:
        out = asdict(self)
        out["gates"] = self.gates  # tensors as they are (asdict would deep-copy them anyway)
        return out

    @classmethod
    def from_plain(cls, data: dict) -> "RunState":
        data = dict(data)
        for key in ("baseline", "searched", "derived"):
            if data.get(key) is not None:
                data[key] = Measured(**data[key])
        return cls(**data)


def _position(stages: list[str], stage: str, epoch: int, budget: int) -> tuple:
    """Where in a run an epoch lies: the weights stage, then each budget's stages in order."""
    if stage not in stages:  # "done"
        return (2, 0, 0, 0)
    order = stages.index(stage)
    return (0, 0, order, epoch) if stage in ("weights", "joint") else (1, budget, order, epoch)
