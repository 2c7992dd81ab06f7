"""The one training loop, shared by the weights stage, the architecture stage, joint training and
finetuning; it knows nothing of gates, run folders or the command line.

What varies between stages comes in through `StageHooks` (a step's extra loss, per-step schedules,
progress fields, extra metrics), and what happens after an epoch (logging, an atomic checkpoint)
through a callback. Randomness (data order, augmentation, dropout) is re-seeded from (seed, stage,
epoch, rank) at each epoch start and the schedules are functions of the step, so a resumed run
follows exactly the path of an uninterrupted one.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from nasdsl.errors import NasdslError
from nasdsl.train import distributed as dist_utils
from nasdsl.train.evaluate import accuracy
from nasdsl.train.precision import Precision
from nasdsl.train.schedule import learning_rate


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, stage: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + stage * 10_007 + epoch * 101 + rank) % 2**63


def steps_per_epoch(samples: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps in one epoch of `samples` (what `Trainer.loader` yields, drop_last included)."""
    per_rank = samples // world_size
    return per_rank // batch_size if per_rank >= batch_size else (1 if per_rank else 0)


class StageHooks:
    """What a stage adds to the plain loop; the defaults add nothing."""

    def before_step(self, step: int, steps: int) -> None:
        """Per-step schedules other than the learning rate (DNAL's delta)."""

    def penalty(self) -> torch.Tensor | None:
        """An extra loss term, computed in fp32 outside autocast."""
        return None

    def loss(self, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
        """The batch's loss from its cross-entropy (under autocast); distillation adds the teacher's."""
        return ce

    def after_step(self, step: int, total: int) -> None:
        """Snapshots (the gate histograms)."""

    def postfix(self) -> dict:
        """Extra fields of the progress bar."""
        return {}

    def epoch_metrics(self) -> dict:
        """Extra fields of the epoch's metrics record."""
        return {}


@dataclass
class Trainer:
    """Device, process group, precision and loader settings of a run: everything a stage trains with."""
    device: torch.device
    world: dist_utils.World
    precision: Precision
    batch_size: int
    workers: int
    seed: int
    progress: bool = True
    compile: bool = False

    def place(self, model: nn.Module) -> nn.Module:
        """On the device, channels-last: 2-3x faster convolutions on CPU (oneDNN) and on GPU."""
        return model.to(self.device, memory_format=torch.channels_last)

    def batch(self, x: torch.Tensor, y: torch.Tensor):
        x = x.to(self.device, non_blocking=True)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def loader(self, dataset: Dataset, stage_index: int, epoch: int) -> DataLoader:
        """The training loader of one epoch: its order depends on (seed, stage, epoch) alone."""
        if self.world.distributed:
            sampler = DistributedSampler(dataset, self.world.size, self.world.rank, shuffle=True,
                                         seed=self.seed + 7919 * stage_index, drop_last=True)
            sampler.set_epoch(epoch)
        else:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, stage_index, epoch, 0))
            sampler = RandomSampler(dataset, generator=g)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.workers,
                          drop_last=len(dataset) // self.world.size >= self.batch_size,
                          pin_memory=self.device.type == "cuda")

    def evaluate(self, model: nn.Module, dataset: Dataset) -> float:
        with self.precision.autocast():
            return accuracy(model, dataset, self.device, self.batch_size, self.workers, self.world)["top1"]

    def wrap(self, model: nn.Module) -> nn.Module:
        """What a stage's loop calls: the model, wrapped for DDP and, with `compile`, by torch.compile.
        Made anew for each stage, since DDP registers the parameters that require grad at wrapping."""
        wrapped = model
        if self.world.distributed:
            wrapped = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return torch.compile(wrapped) if self.compile else wrapped

    def progress_bar(self, loader, desc: str):
        if not (self.progress and self.world.is_main):
            return loader
        from tqdm import tqdm
        return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)


@dataclass
class Epochs:
    """One stage's training: which epochs to run and what to run them on."""
    stage: str
    stage_index: int
    epochs: int
    start: int
    dataset: Dataset
    val: Dataset
    lr_cfg: object                     # a recipe stage: lr, schedule, warmup_epochs, label_smoothing
    bn_frozen: bool = False
    seconds_before: float = 0.0        # time this stage already took before a resume


def fit(trainer: Trainer, model: nn.Module, optimizer: torch.optim.Optimizer, run: Epochs,
        hooks: StageHooks, on_epoch_end: Callable[[int, dict], None]) -> float:
    """Train `run.start..run.epochs-1`, calling `on_epoch_end(epoch, record)` after each (the caller
    logs and checkpoints there). Returns the stage's seconds, resumed time included."""
    started = time.time() - run.seconds_before
    forward = trainer.wrap(model)
    for epoch in range(run.start, run.epochs):
        torch.manual_seed(epoch_seed(trainer.seed, run.stage_index, epoch, trainer.world.rank))
        loader = trainer.loader(run.dataset, run.stage_index, epoch)
        if len(loader) == 0:
            raise NasdslError(f"the training set has fewer samples than one batch ({trainer.batch_size})",
                              file="batch_size")
        model.train()
        if run.bn_frozen:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        loss_sum, correct, seen = _epoch(trainer, forward, optimizer, run, hooks, epoch, loader)
        loss_sum, correct, seen = dist_utils.all_sum(trainer.world, loss_sum, correct, seen, device=trainer.device)
        record = {"stage": run.stage, "epoch": epoch, "train_loss": loss_sum / seen, "train_top1": correct / seen,
                  "val_top1": trainer.evaluate(model, run.val), "lr": optimizer.param_groups[0]["lr"],
                  "seconds": time.time() - started, **hooks.epoch_metrics()}
        on_epoch_end(epoch, record)
    return time.time() - started


def _epoch(trainer: Trainer, forward: nn.Module, optimizer, run: Epochs, hooks: StageHooks, epoch: int,
           loader) -> tuple[float, float, float]:
    steps = len(loader)
    smoothing = getattr(run.lr_cfg, "label_smoothing", 0.0)
    loss_sum = correct = seen = 0.0
    bar = trainer.progress_bar(loader, f"{run.stage} {epoch + 1}/{run.epochs}")
    for i, (x, y) in enumerate(bar):
        step = epoch * steps + i
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(run.lr_cfg, step, steps) * group.get("lr_scale", 1.0)
        hooks.before_step(step, steps)
        x, y = trainer.batch(x, y)
        with trainer.precision.autocast():
            logits = forward(x)
            loss = hooks.loss(x, logits, y, F.cross_entropy(logits, y, label_smoothing=smoothing))
        extra = hooks.penalty()
        total = loss.float() + extra if extra is not None else loss.float()
        if not torch.isfinite(total):
            raise NasdslError(f"the {run.stage} loss became {total.item()} at epoch {epoch + 1}; "
                              f"lower the learning rate", file="recipe")
        optimizer.zero_grad(set_to_none=True)
        trainer.precision.backward_and_step(total, optimizer)
        loss_sum += loss.item() * y.numel()
        correct += (logits.argmax(1) == y).sum().item()
        seen += y.numel()
        if hasattr(bar, "set_postfix") and (i % 5 == 0 or i == steps - 1):
            bar.set_postfix({"loss": f"{loss_sum / seen:.3f}", "acc": f"{correct / seen:.3f}", **hooks.postfix()})
        hooks.after_step(step, steps * run.epochs)
    return loss_sum, correct, seen


@torch.no_grad()
def recalibrate_bn(trainer: Trainer, model: nn.Module, dataset: Dataset, stage_index: int,
                   batches: int = 50) -> None:
    """Re-estimate every BN's statistics for the network as it is now, as a cumulative average over
    `batches` training batches; under DDP every rank keeps rank 0's statistics."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    torch.manual_seed(epoch_seed(trainer.seed, stage_index, -1, trainer.world.rank))
    for i, (x, _) in enumerate(trainer.loader(dataset, stage_index, -1)):
        if i == batches:
            break
        with trainer.precision.autocast():
            model(trainer.batch(x, torch.zeros(0))[0])
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    dist_utils.broadcast_(trainer.world, [b for m in bns for b in (m.running_mean, m.running_var)])
