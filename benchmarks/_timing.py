"""Timing helpers for the benchmarks: interleaved medians, inference calls, SGD training steps."""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F


def alternate(calls: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each callable, after `warmup` calls of each, timed in alternating
    order (A B C, C B A, A B C, ...) so that a change of load on the machine hits all of them alike."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    keys = list(calls)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(repeats):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            t0 = time.perf_counter()
            calls[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def inference_medians(models: dict[str, torch.nn.Module], shape, batch: int, repeats: int,
                      warmup: int) -> dict[str, float]:
    """Median seconds of one forward pass of each model (eval mode, channels_last, inference_mode)."""
    x = channels_last(torch.randn(batch, *shape))
    for m in models.values():
        m.eval().to(memory_format=torch.channels_last)
    with torch.inference_mode():
        return alternate({k: (lambda m=m: m(x)) for k, m in models.items()}, repeats, warmup)


def sgd_step(model: torch.nn.Module, params, x: torch.Tensor, y: torch.Tensor,
             lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 1e-4) -> Callable[[], None]:
    """One training step as nasdsl's loop takes it: forward, cross-entropy, zero_grad, backward,
    SGD step (train mode, channels_last)."""
    model.train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(list(params), lr=lr, momentum=momentum, weight_decay=weight_decay)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def load_line() -> str:
    """torch's version, its threads and the machine's load, for the first line of a report."""
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {load}"
