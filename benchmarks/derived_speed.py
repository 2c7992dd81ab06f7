"""Does a derived network's FLOPs reduction turn into CPU speed?

    .venv/bin/python benchmarks/derived_speed.py [--target 3] [--repeats 15] [--threads N] [--profile]
        [--depth] [--multiple M] [--runs RUN...] [--script] [--onnx]

For VGG-16 and ResNet-56 (CIFAR), gates are chosen the way a DNAL search plausibly ends up:
structured, the same fraction f of every gate group kept, its leading channels. In a residual
stage the output gates can only narrow the stream down to what the shortcut already carries (with
option-A shortcuts that is the previous stage's stream), so there they keep the leading fraction f
*of the shortcut's channels*: every block writes into the channels the stream already has and the
stream stays narrow. f is bisected to the largest value whose derived network has at least
`--target` times fewer FLOPs than the unpruned one. The slim network is built from `derive`
(weights sliced from a randomly initialised supernet, checked against the masked supernet) and
timed against the unpruned network built without gates, both in eval mode, channels_last, under
torch.inference_mode, after a warm-up, alternating the two (A B B A ...), median per network.
Prints FLOPs reduction, measured speed-up and their ratio (target >= 0.7) at batch 64 and batch 1;
`--profile` adds the top ops of each network at batch 1; `--depth` adds, for ResNet-56, the other
structured outcome: whole blocks pruned (each derives to its shortcut), the rest at full width.
`--runs RUN...` adds finished `nasdsl search` runs: the derived model a DNAL search actually found
(RUN/model), timed against the unpruned network of the run's space and settings (random weights:
speed does not depend on them). `--multiple M` derives the structured networks with
channel_multiple M. `--script` also times both networks scripted and frozen with TorchScript
(what `torch.jit.freeze` makes of an exported model: no Python per op, BN folded into the convs);
`--onnx` both exported as `nasdsl export --onnx` exports them, in onnxruntime.

ResNet-56 needs three search settings to turn FLOPs into speed on this CPU. oneDNN computes a
conv's output channels in blocks of 16 on AVX-512, so a 3x3 conv from 16 channels to anything from
1 to 16 costs the same (1.6 ms at batch 64, 32 px; 3.3 ms for 17): `architecture.channel_multiple=16`
rounds every kept gate group to a multiple of 16. The paper's penalty counts every channel alike,
so it thins the 8x8 stage, where a channel costs a quarter of the MACs it costs at 32x32, as
readily as the 32x32 stage, which is then left to dominate the time:
`architecture.penalty_weight=flops` weighs each channel by its MACs. And at batch 1 in eager
PyTorch a layer's fixed cost (Python, BN, kernel set-up, the indexed adds: tens of us whatever its
width) sets much of the time, so only removed layers pay in full: `architecture.block_cost=3e7`
gives every residual block a depth gate priced at 3e7 MACs plus its channels, and the search
trades width for depth. On the bundled digits (all reach >= 99.4% top-1 after finetuning):
    nasdsl search spaces/resnet56_cifar.space --set resolution=32 --set architecture.lambda_a=2e-4 \
        --set architecture.channel_multiple=16 --set architecture.penalty_weight=flops \
        --set architecture.block_cost=3e7 --out runs/r56
(4.0x fewer FLOPs, 13 of 28 layers left). Without block_cost, lambda_a=5e-4 gives 3.0x and 1e-3
5.0x, keeping 21 and 16 layers. block_cost is a price, not a measurement: at 3e6, about the fixed
time of a layer here (some 70 us at batch 1, where a conv costs about 20 us per million MACs), the
gates, trained on frozen weights, still found thinning cheaper than removing a block.
Speed-up / FLOPs reduction, batch 64 / batch 1, one thread, one run (`--script --onnx --depth`):

    network                          eager PyTorch   TorchScript   onnxruntime
    VGG-16 structured, 3.0x            0.85 / 0.78    0.85 / 0.85   0.59 / 0.88
    ResNet-56 structured width 3.2x    0.45 / 0.32    0.44 / 0.39   0.41 / 0.40
    ResNet-56 structured depth 3.1x    0.94 / 0.96    0.92 / 0.95   0.97 / 0.95
    DNAL, all three keys, 4.0x         0.83 / 0.72    0.80 / 0.81   0.82 / 0.78
    DNAL, no block_cost, 3.0x          0.73 / 0.58    0.74 / 0.70   0.66 / 0.63
    DNAL, no block_cost, 5.0x          0.73 / 0.52    0.72 / 0.70   0.56 / 0.53
    DNAL, paper settings, 4.3x         0.34 / 0.28    0.34 / 0.33   0.30 / 0.31

The batch-1 eager ratio varies with the seed: with all three keys, seeds 1 and 2 (4.5x and 4.9x,
14 and 13 layers) and lambda_a=1.5e-4, block_cost=4e7 with seeds 0 and 1 (4.2x, 13 and 14 layers)
read 0.76-0.80 at batch 64 and 0.63-0.67 at batch 1 in eager PyTorch, 0.75-0.81 in TorchScript
at both, 0.62-0.83 in onnxruntime; lambda_a=1e-4 with block_cost=6e7, seeds 0 and 1 (5.2x and
4.6x, 13 layers each), 0.79 / 0.63 and 0.76 / 0.68 in eager PyTorch. Other settings, eager
(ratio at batch 64 / batch 1): lambda_a 7e-4 with block_cost 3e6: 3.3x, 17 layers, 0.78 / 0.68;
3e-4 with 3e7: 6.4x, 11 layers, 0.77 / 0.65; 2.5e-4 with 2e7: 5.0x, 14 layers, 0.76 / 0.62. The
more FLOPs go, the fewer layers must be left to keep the batch-1 ratio.
Ratios move by about 0.1 between runs on this VM (under load the unpruned network slows more).
Frozen TorchScript (no Python per op, BN folded into the convs) takes much of the fixed cost
away. onnxruntime computes convs in blocks of channels too: VGG-16 derived with `--multiple 16`
reads 0.94 / 0.92 there. Before the ONNX export placed a narrow block's channels with a Gather (a
ScatterElements until then), the 3.0x search read 0.41 / 0.35 in onnxruntime.
On a machine shared with other jobs use `--threads 1` (see benchmarks/gate_overhead.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nasdsl.derive.derive import derive, slim_state_dict  # noqa: E402
from nasdsl.graph import accounting  # noqa: E402
from nasdsl.graph.ops import CHANNELWISE  # noqa: E402
import nasdsl  # noqa: E402
from nasdsl.supernet.build import build_supernet  # noqa: E402

NETWORKS = ["vgg16_cifar", "resnet56_cifar"]
RATIO_TARGET = 0.7


def structured_masks(net, f: float, scheme: str = "width") -> dict[str, torch.Tensor]:
    """width: keep the leading fraction f of every gate group; a residual layer's output gates keep
    the leading fraction f of the channels its shortcut carries (see the module docstring).
    depth: keep the first round(f * n) of the n residual blocks of each stage at full width and
    close every gate of the others (they derive to their shortcut: depth is learned)."""
    if scheme == "depth":
        stages: dict[str, list] = {}
        for layer in net.layers:
            if layer.shortcut is not None:
                stages.setdefault(layer.name.split(".")[0], []).append(layer)
        masks = {g.key: torch.ones(g.channels, dtype=torch.bool) for g in net.gates()}
        for layers in stages.values():
            for layer in layers[round(f * len(layers)):]:
                for op in layer.all_ops():
                    if op.is_gate:
                        masks[op.attrs["key"]][:] = False
        return masks
    def keep(channels: list[int], width: int) -> torch.Tensor:
        k = max(1, min(len(channels), round(f * len(channels))))
        mask = torch.zeros(width, dtype=torch.bool)
        mask[channels[:k]] = True
        return mask

    masks: dict[str, torch.Tensor] = {}
    live = set(range(net.input_shape.channels))  # live channels of the current tensor
    for layer in net.layers:
        shortcut = None
        if layer.shortcut is not None:
            index = layer.shortcut.index
            shortcut = sorted(index[c] for c in live) if index else sorted(live)
        out: set[int] = set(shortcut or ())
        for block in layer.blocks:
            gates = [op for op in block.ops if op.is_gate]
            for gate in gates[:-1]:
                masks[gate.attrs["key"]] = keep(list(range(gate.in_shape.channels)), gate.in_shape.channels)
            if gates:
                last = gates[-1]
                width = last.in_shape.channels
                channels = shortcut if shortcut is not None else list(range(width))
                masks[last.attrs["key"]] = keep(channels, width)
                out |= set(masks[last.attrs["key"]].nonzero().flatten().tolist())
            elif any(op.spec.channels(op) is not CHANNELWISE for op in block.ops):
                out |= set(range(block.out_shape.channels))
            else:
                out |= live
        live = out
    return masks


def bisect_fraction(net, target: float, scheme: str, multiple: int = 1) -> tuple[float, object]:
    full = accounting.network_cost(net).flops
    lo, hi = 0.0, 1.0  # reduction(lo) >= target > reduction(hi)
    best = None
    for _ in range(30):
        mid = (lo + hi) / 2
        d = derive(net, structured_masks(net, mid, scheme), channel_multiple=multiple)
        if full / accounting.network_cost(d.network).flops >= target:
            lo, best = mid, d
        else:
            hi = mid
    if best is None:
        best = derive(net, structured_masks(net, lo, scheme), channel_multiple=multiple)
    return lo, best


def build_pair(name: str, target: float, scheme: str = "width", multiple: int = 1):
    net = nasdsl.compile(ROOT / "spaces" / f"{name}.space")
    f, d = bisect_fraction(net, target, scheme, multiple)
    torch.manual_seed(0)
    supernet = build_supernet(net).eval()
    slim = nasdsl.build(d.network).eval()
    slim.load_state_dict(slim_state_dict(d, supernet, slim))
    supernet.gate_set.load({k: torch.where(m, 1.0, -1.0) for k, m in d.masks.items()})
    supernet.gate_set.set_mode("hard")
    x = torch.randn(2, *net.input_shape.to_list())
    with torch.inference_mode():  # the slim network is the masked supernet
        err = float((supernet(x) - slim(x)).abs().max())
    assert err < 1e-3, f"{name}: slim network differs from the masked supernet by {err}"
    torch.manual_seed(0)
    full = nasdsl.build(net).eval()
    return net, d, f, full, slim


def run_pair(run: Path):
    """The unpruned network of a search run (its space, its settings) and the derived model it found."""
    from nasdsl.export.load import load

    manifest = json.loads((run / "manifest.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    net = nasdsl.compile(manifest["space"], **manifest["space_overrides"])
    torch.manual_seed(0)
    full = nasdsl.build(net).eval()
    return net, full, load(run), summary["baseline"]["flops"] / summary["derived"]["flops"]


def latency(models: dict, shape, batch: int, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each model (a torch module, or an onnxruntime session)."""
    x = torch.randn(batch, *shape).contiguous(memory_format=torch.channels_last)
    calls = {k: (lambda m=m, a=x.numpy(): m.run(None, {"input": a})) if hasattr(m, "run") else (lambda m=m: m(x))
             for k, m in models.items()}
    times = {k: [] for k in models}
    with torch.inference_mode():
        for _ in range(warmup):
            for call in calls.values():
                call()
        keys = list(models)
        for r in range(repeats):
            for k in (keys if r % 2 == 0 else keys[::-1]):
                t0 = time.perf_counter()
                calls[k]()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def frozen_script(model):
    """torch.jit.freeze(torch.jit.script(model)): no Python per op, BN folded into the convs."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated since torch 2.9, still supported
        return torch.jit.freeze(torch.jit.script(model.eval()))


def onnx_session(model, shape, folder: Path, name: str):
    """An onnxruntime session (as many threads as torch) for the model, exported the way
    `nasdsl export --onnx` exports it."""
    import onnxruntime as ort

    from nasdsl.export.exporter import _run_onnx_export

    file = folder / f"{name}.onnx"
    _run_onnx_export(model, file, tuple(shape), "torchscript")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])


def widths(d) -> str:
    return " ".join(str(layer.width) for layer in d.network.layers[:-1])


def inner_widths(d) -> str:
    """The output width of every conv that is not a layer's last (a block's inner widths)."""
    out = []
    for layer in d.network.layers[:-1]:
        for block in layer.blocks:
            convs = [op for op in block.ops if op.kind == "conv"]
            out += [str(op.out_shape.channels) for op in convs[:-1]]
    return " ".join(out) or "-"


def profile(models: dict, shape, batch: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    x = torch.randn(batch, *shape).contiguous(memory_format=torch.channels_last)
    for key, m in models.items():
        with torch.inference_mode():
            for _ in range(3):
                m(x)
            with prof(activities=[ProfilerActivity.CPU]) as p:
                for _ in range(10):
                    m(x)
        print(f"--- {key}, batch {batch}, 10 runs")
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", type=float, default=3.0, help="minimum FLOPs reduction of the derived nets")
    ap.add_argument("--repeats", type=int, default=15, help="timed runs per network and batch (median)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="*", default=[64, 1])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--networks", nargs="*", default=NETWORKS)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--runs", nargs="*", type=Path, default=[],
                    help="finished search runs: time the derived model each found against its unpruned network")
    ap.add_argument("--multiple", type=int, default=1,
                    help="derive the structured networks with this channel_multiple (16 suits AVX-512 oneDNN)")
    ap.add_argument("--script", action="store_true",
                    help="also time both networks scripted and frozen with TorchScript (BN folded into the convs)")
    ap.add_argument("--onnx", action="store_true",
                    help="also time both networks exported to ONNX, in onnxruntime (as many threads as torch)")
    ap.add_argument("--depth", action="store_true",
                    help="also the depth scheme for residual networks: whole blocks pruned, the rest at full width")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (load {load}), eval, channels_last, inference_mode"
          f"{f', channel_multiple {args.multiple}' if args.multiple > 1 else ''}; "
          f"median of {args.repeats} interleaved runs after {args.warmup} warm-up runs")
    rows = []
    runs = [(name, "width") for name in args.networks]
    if args.depth:
        runs += [(name, "depth") for name in args.networks if name.startswith("resnet")]
    pairs = []
    for name, scheme in runs:
        net, d, f, full, slim = build_pair(name, args.target, scheme, args.multiple)
        full_cost, slim_cost = accounting.network_cost(net), accounting.network_cost(d.network)
        reduction = full_cost.flops / slim_cost.flops
        label = name if scheme == "width" else f"{name} (depth)"
        print(f"\n{label}: kept fraction f = {f:.4f}; {full_cost.flops / 1e6:.2f}M -> {slim_cost.flops / 1e6:.2f}M FLOPs "
              f"({reduction:.2f}x), {full_cost.params / 1e6:.3f}M -> {slim_cost.params / 1e6:.3f}M params")
        print(f"  derived widths: {widths(d)}")
        print(f"  inner widths:   {inner_widths(d)}")
        for note in d.notes[:3]:
            print(f"  note: {note}")
        if len(d.notes) > 3:
            print(f"  ... and {len(d.notes) - 3} more notes")
        pairs.append((label, net, full, slim, reduction))
    for run in args.runs:
        net, full, slim, reduction = run_pair(run)
        label = f"{net.name} (run {run.parent.name}/{run.name})"
        print(f"\n{label}: the derived model of {run}; {reduction:.2f}x fewer FLOPs, "
              f"{len(slim.layers)} of {len(full.layers)} layers left")
        pairs.append((label, net, full, slim, reduction))
    with tempfile.TemporaryDirectory() as folder:
        for label, net, full, slim, reduction in pairs:
            shape = net.input_shape.to_list()
            runtimes = {"torch": {"full": full.to(memory_format=torch.channels_last),
                                  "slim": slim.to(memory_format=torch.channels_last)}}
            if args.script:
                runtimes["torchscript"] = {k: frozen_script(m) for k, m in runtimes["torch"].items()}
            if args.onnx:
                runtimes["onnxruntime"] = {k: onnx_session(m, shape, Path(folder), f"{len(rows)}_{k}")
                                           for k, m in runtimes["torch"].items()}
            for runtime, models in runtimes.items():
                for batch in args.batches:
                    # TorchScript's profiling executor optimises a graph only after a few calls
                    warmup = args.warmup if runtime == "torch" else max(args.warmup, 10)
                    t = latency(models, shape, batch, args.repeats, warmup)
                    speedup = t["full"] / t["slim"]
                    rows.append((label, runtime, batch, reduction, t["full"], t["slim"], speedup, speedup / reduction))
            if args.profile:
                profile(runtimes["torch"], shape, 1)
    print(f"\n{'network':<34}{'runtime':>12}{'batch':>6}{'FLOPs red.':>11}{'full ms':>10}{'slim ms':>10}"
          f"{'speed-up':>10}{'speed-up/red.':>15}")
    for name, runtime, batch, reduction, tf, ts, speedup, ratio in rows:
        flag = "ok" if ratio >= RATIO_TARGET else f"< {RATIO_TARGET}"
        print(f"{name:<34}{runtime:>12}{batch:>6}{reduction:>10.2f}x{1e3 * tf:>10.2f}{1e3 * ts:>10.2f}"
              f"{speedup:>9.2f}x{ratio:>15.2f}  {flag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
