"""Timing helpers for the benchmarks: interleaved (or in-turn) medians, inference calls, SGD training steps."""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Callable, Iterator

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


def in_turn(calls: dict[str, Callable[[], object]], repeats: int, warmup: int,
            rounds: int = 2) -> dict[str, float]:
    """Median seconds per call of each callable, each timed in runs of its own: `rounds` rounds
    (A A A, B B B, then B B B, A A A, ...), each run `warmup` untimed calls and then
    repeats // rounds timed ones. For callables whose state between calls decides their time:
    onnxruntime's intra-op threads spin between runs (two sessions timed call by call had four
    threads busy on two cores, and the unpruned ResNet-56's file took 68.9 ms a batch of 64
    against 47.5 timed on its own, the derived one 46.0 against 29.1), and a network called right
    after another finds its weights and maps gone from the caches (`inference_medians`). More
    rounds spread a change of load over all of them, as `alternate` does."""
    keys = list(calls)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            for _ in range(warmup):
                calls[k]()
            for _ in range(max(1, repeats // rounds)):
                t0 = time.perf_counter()
                calls[k]()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def inference_medians(models: dict[str, torch.nn.Module], shape, batch: int, repeats: int,
                      warmup: int) -> dict[str, float]:
    """Median seconds of one forward pass of each model (eval mode, channels_last, inference_mode),
    timed as a process serving it runs it: call after call (`in_turn`, 3 timed calls a run after
    `warmup` untimed ones, the runs of all models in alternating rounds). Called by turns
    (`alternate`), each network ran right after another one had filled the caches: at batch 1 a
    searched ResNet-56 took 2.34 against 1.92-2.09 ms and the unpruned one 4.52 against 4.10-4.50
    (ratios 0.63 against 0.68-0.70; MobileNetV2 0.53-0.55 against 0.54-0.68), while at batch 64 the
    two ways agreed within the runs' spread (a scratch A/B, README)."""
    x = channels_last(torch.randn(batch, *shape))
    for m in models.values():
        m.eval().to(memory_format=torch.channels_last)
    with torch.inference_mode():
        return in_turn({k: (lambda m=m: m(x)) for k, m in models.items()}, repeats, warmup,
                       rounds=max(2, repeats // 3))


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


# glibc's malloc hands the top of its heap back to the OS once enough of it is free, and the next
# allocation faults those pages in again, zeroed: a forward pass of the unpruned ResNet-56 at batch
# 64 (4 MB maps) took 27,578 minor page faults and 92 ms, with the heap kept 0 faults and 62 ms.
# Layers of one shape alternated 7.1 and 4.2 ms; the unpruned MobileNetV2 took 159 against 96 ms.
# The narrower derived networks fault less, so an inference ratio measured in a default process
# credits pruning with page faults (MobileNetV2 searched to 3x: 1.34 against 0.81 at batch 64).
# Keeping 512 MiB of free heap (glibc's M_TOP_PAD) measures the networks, not the allocator;
# training steps and batch 1 did not change.
STEADY_HEAP = {"MALLOC_TOP_PAD_": str(512 << 20)}


@contextlib.contextmanager
def child_environment(env: dict[str, str]) -> Iterator[None]:
    """os.environ with `env` set while processes started inside (spawn) inherit it; glibc reads its
    MALLOC_* settings when a process starts, so they reach a child's allocator but not this one's."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def heap_line(env: dict[str, str]) -> str:
    """How the timing processes' allocator is set, for a report's first line."""
    return ("glibc heap kept (" + ", ".join(f"{k}={v}" for k, v in env.items()) + ")") if env \
        else "glibc malloc as it comes (heap trimmed and page-faulted back)"
