"""A layer's fixed time on the run's device, in MACs: what `architecture.block_cost: auto` prices a
depth gate at.

At batch 1 a layer costs a time whatever its width: in eager PyTorch on a CPU each of its convs,
BNs and activations is dispatched and launched, which on the 2-core machine of the README took
0.05-0.08 ms a ResNet-56 basic block and about 0.2 ms a MobileNetV2 block. A network thinned to a
third of its MACs is then far from three times as fast unless whole layers go. A depth gate priced
at that fixed time lets the search weigh what a layer adds against what it costs in time. The
number is measured, not guessed: a layer's fixed time and the time of a MAC differ between a 2-core
CPU and a GPU by orders of magnitude (a constant that suited one CPU, 6e6, was the README's first
try).

The fit: every layer of the unpruned network (`derive.unpruned`) and of its thinnest derivation
(every gate group at one `channel_multiple`) is timed where it sits in its network, and a line
t = a + b M (M the layer's MACs) is fitted to those points by least squares; a layer's fixed time
a is worth a / b MACs. Timed per layer, not per network: a two-point fit of whole networks has one
difference of two noisy times to read b from (on the README's noisy 2-core machine it came out
negative for ResNet-56, whose thinnest derivation keeps 57% of its MACs: the residual streams keep
their width), where the layers give dozens of points.

Forward passes are timed as a server runs them (eval, inference mode, channels-last, each network
in runs of its own after warm-up calls, the two in alternating rounds) at batch 1, the latency of
one request; each layer's time is the median over its runs. The run's recipe records the number,
so a resumed run prices its depth gates as it began.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from nasdsl.derive.derive import derive, unpruned
from nasdsl.errors import NasdslError
from nasdsl.graph.accounting import layer_cost
from nasdsl.graph.ir import Network
from nasdsl.supernet.network import NasNet

BATCH = 1          # the latency of one request
ROUNDS = 6         # alternating rounds (full, thin, thin, full, ...)
RUN = 5            # timed calls a run, after WARMUP untimed ones
WARMUP = 2


@dataclass(frozen=True)
class LayerTime:
    """The fit's points, (MACs, median seconds) per layer of both networks, and what they give."""
    points: tuple[tuple[int, float], ...]
    device: str

    @property
    def per_mac(self) -> float:
        """b: seconds per MAC, the least-squares slope."""
        n = len(self.points)
        mx = sum(m for m, _ in self.points) / n
        my = sum(t for _, t in self.points) / n
        sxx = sum((m - mx) ** 2 for m, _ in self.points)
        return sum((m - mx) * (t - my) for m, t in self.points) / sxx if sxx else 0.0

    @property
    def fixed(self) -> float:
        """a: seconds a layer costs whatever its width, the intercept."""
        n = len(self.points)
        return (sum(t for _, t in self.points) - self.per_mac * sum(m for m, _ in self.points)) / n

    @property
    def block_cost(self) -> float:
        """A layer's fixed time in MACs (at least 1, so that depth gates stay: 0 would remove them)."""
        return max(1.0, self.fixed / self.per_mac)

    def note(self) -> str:
        return (f"architecture.block_cost auto: a layer's fixed time at batch {BATCH} on {self.device} is "
                f"{1e3 * self.fixed:.3g} ms, the time of {self.block_cost / 1e6:.3g}M MACs ({len(self.points)} "
                f"layers of the unpruned network and its narrowest derivation timed: {1e9 * self.per_mac:.3g} ms "
                f"per million MACs beyond it); each depth gate is priced at that")


def thinnest(net: Network, multiple: int) -> Network:
    """`net` derived with every gate group at its leading `multiple` channels (all, if narrower)."""
    masks = {}
    for gate in net.gates():
        mask = torch.zeros(gate.channels, dtype=torch.bool)
        mask[:max(1, multiple)] = True
        masks[gate.key] = mask
    return derive(net, masks, channel_multiple=multiple).network


def _timed_layers(model: NasNet, sync) -> tuple[list[list[float]], list]:
    """Per-layer lists of seconds that fill as `model` runs, and the hooks that fill them."""
    times: list[list[float]] = [[] for _ in model.layers]
    start = [0.0]

    def before(*_):
        sync()
        start[0] = time.perf_counter()

    def after(i):
        def hook(*_):
            sync()
            times[i].append(time.perf_counter() - start[0])
        return hook

    hooks = [h for i, layer in enumerate(model.layers)
             for h in (layer.register_forward_pre_hook(before), layer.register_forward_hook(after(i)))]
    return times, hooks


def layer_seconds(models: list[NasNet], x: torch.Tensor) -> list[list[float]]:
    """The median seconds of each layer of each model, each model timed in runs of its own (a server
    calls one network over and over; called by turns, each found the caches full of the other's
    weights), the runs in alternating rounds so that a change of load hits both alike."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    timed = [_timed_layers(m, sync) for m in models]
    with torch.inference_mode():
        for r in range(ROUNDS):
            for i in (range(len(models)) if r % 2 == 0 else reversed(range(len(models)))):
                for _ in range(WARMUP):
                    models[i](x)
                times = timed[i][0]
                marks = [len(t) for t in times]
                for _ in range(RUN):
                    models[i](x)
                for t, mark in zip(times, marks):   # the warm-up calls' times are not kept
                    del t[mark - WARMUP:mark]
    for _, hooks in timed:
        for h in hooks:
            h.remove()
    return [[statistics.median(t) for t in times] for times, _ in timed]


def layer_time(net: Network, multiple: int, device: torch.device) -> LayerTime:
    """The fit of `net`'s layers' forward times at batch 1 on `device` (module docstring)."""
    nets = [unpruned(net), thinnest(net, multiple)]
    fmt = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    models = [NasNet(n.to_config()).eval().to(device, memory_format=fmt) for n in nets]
    x = torch.randn(BATCH, *net.input_shape.to_list(), device=device).contiguous(memory_format=fmt)
    seconds = layer_seconds(models, x)
    points = tuple((layer_cost(layer).flops, t) for n, ts in zip(nets, seconds)
                   for layer, t in zip(n.layers, ts) if layer.blocks)
    return LayerTime(points, str(device))


def measure_block_cost(net: Network, multiple: int, device: torch.device) -> LayerTime:
    """The fit, checked: a layer's time must grow with its MACs, else there is no price to read off
    (a one-line error)."""
    fit = layer_time(net, multiple, device)
    if fit.per_mac <= 0:
        raise NasdslError(f"auto: on {device} the layers' times at batch {BATCH} did not grow with their MACs "
                          f"({len(fit.points)} layers timed), so a layer's fixed time cannot be read off; "
                          f"set a number of MACs", file="architecture.block_cost")
    return fit
