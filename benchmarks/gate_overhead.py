"""What the SS gates cost in training: one SGD step of the gated supernet in soft mode against the
same network built without gates.

    .venv/bin/python benchmarks/gate_overhead.py [--check] [--batch 64] [--repeats 5] [--threads N]

A step is what the trainer (nasdsl/search/dnal.py) does with a batch: forward, cross-entropy (plus
the Eq. 4 penalty for the supernet), backward, SGD step, on CPU in channels_last. The supernet
trains weights and gates together (the joint strategy, the costliest step with gates); the plain
network trains its weights. The two are timed alternately (A B B A ...) after a warm-up, and the
median step time of each is compared, so a load change on the machine hits both alike. On a
machine shared with other jobs, `--threads 1` gives far steadier numbers: with as many threads as
cores, every parallel region waits for a descheduled thread.
Target: supernet / plain <= 1.10; `--check` exits 1 if a ratio is above it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nasdsl  # noqa: E402
from nasdsl.supernet.build import build_supernet  # noqa: E402

SPACES = [("proxyless_cifar", 32), ("resnet56_cifar", 32), ("vgg16_cifar", 32)]
TARGET = 1.10


def make_step(model, gated: bool, lambda_a: float = 1e-4):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

    def step(x, y):
        loss = F.cross_entropy(model(x), y)
        if gated:
            loss = loss + lambda_a * model.gate_set.penalty("scaled")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def measure(name: str, resolution: int, batch: int, repeats: int, warmup: int) -> dict:
    net = nasdsl.compile(ROOT / "spaces" / f"{name}.space", resolution=resolution)
    torch.manual_seed(0)
    supernet = build_supernet(net).to(memory_format=torch.channels_last).train()
    supernet.gate_set.set_mode("soft")
    supernet.gate_set.set_delta(10.0)
    with torch.no_grad():  # gates in the middle of their range, as during the search
        for g in supernet.gate_set.gates:
            g.s.normal_(0, 0.1)
    torch.manual_seed(0)
    plain = nasdsl.build(net).to(memory_format=torch.channels_last).train()
    x = torch.randn(batch, *net.input_shape.to_list()).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, net.num_classes, (batch,))
    steps = {"gated": make_step(supernet, True), "plain": make_step(plain, False)}
    times = {"gated": [], "plain": []}
    for _ in range(warmup):
        for key in steps:
            steps[key](x, y)
    for r in range(repeats):
        order = ("gated", "plain") if r % 2 == 0 else ("plain", "gated")  # A B, B A, ...
        for key in order:
            t0 = time.perf_counter()
            steps[key](x, y)
            times[key].append(time.perf_counter() - t0)
    gated, plain_t = statistics.median(times["gated"]), statistics.median(times["plain"])
    # the fastest steps are the least disturbed by other jobs: their ratio is a second estimate,
    # and the spread of each network's steps (max / min) says how noisy the machine was
    return {"space": name, "resolution": resolution, "gates": supernet.gate_set.channels,
            "gated_ms": 1e3 * gated, "plain_ms": 1e3 * plain_t, "ratio": gated / plain_t,
            "min_ratio": min(times["gated"]) / min(times["plain"]),
            "spread": max(max(t) / min(t) for t in times.values())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help=f"exit 1 if a ratio is above {TARGET}")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per network (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--spaces", nargs="*", default=[s for s, _ in SPACES])
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (load {load}), batch {args.batch}, channels_last, "
          f"soft gates (weights + gates trained) vs no gates; median of {args.repeats} interleaved steps")
    print(f"{'space':<18}{'px':>4}{'gates':>8}{'gated ms':>11}{'plain ms':>11}{'ratio':>8}{'min ratio':>11}"
          f"{'spread':>8}  (ratio: of the medians; spread: slowest / fastest step)")
    worst = 0.0
    for name, res in SPACES:
        if name not in args.spaces:
            continue
        r = measure(name, res, args.batch, args.repeats, args.warmup)
        worst = max(worst, r["ratio"])
        flag = "ok" if r["ratio"] <= TARGET else f"> {TARGET}"
        print(f"{r['space']:<18}{r['resolution']:>4}{r['gates']:>8}{r['gated_ms']:>11.1f}{r['plain_ms']:>11.1f}"
              f"{r['ratio']:>8.3f}{r['min_ratio']:>11.3f}{r['spread']:>8.2f}  {flag}", flush=True)
    print(f"target: ratio <= {TARGET}; worst {worst:.3f}")
    return 1 if args.check and worst > TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
