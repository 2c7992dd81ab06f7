"""Learning-rate and delta schedules, as pure functions of the step, so resume needs no state."""
from __future__ import annotations

import math


def learning_rate(cfg, step: int, steps_per_epoch: int) -> float:
    """lr at a global step of a stage: linear warmup, then cosine, step or constant.

    A stage config without a `schedule` (the architecture stage) keeps its lr constant, as the paper does.
    """
    schedule = getattr(cfg, "schedule", "constant")
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = getattr(cfg, "warmup_epochs", 0) * steps_per_epoch
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "step":
        epoch = step // steps_per_epoch
        return cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    return cfg.lr


def delta(cfg, step: int, steps_per_epoch: int, epochs: int) -> float:
    """The scale factor, growing exponentially from delta_start to delta_end over `epochs`.

    Per iteration (default) the first step trains at delta_start and the last at exactly
    delta_end; per epoch, delta is constant within an epoch (the released code's schedule).
    """
    if cfg.delta_schedule == "epoch":
        position, last = step // steps_per_epoch, epochs - 1
    else:
        position, last = step, epochs * steps_per_epoch - 1
    if last <= 0:
        return float(cfg.delta_end)
    ratio = cfg.delta_end / cfg.delta_start
    return float(cfg.delta_start * ratio ** (min(position, last) / last))
