"""Does a searched network's FLOPs reduction turn into CPU speed, in inference and in finetuning?

    .venv/bin/python benchmarks/derived_speed.py --runs runs/proxyless --search [--work DIR]
        [--epochs W A] [--budget flops=33%] [--set KEY=VALUE ...] [--structured [--target 3]]
        [--threads 2] [--repeats 21] [--steps 11] [--warmup 3] [--onnxruntime] [--default-malloc]

Networks (each a *case*: an unpruned network and the derived one a search, or a rule, made of it):
- `--runs RUN...`: finished `nasdsl search` runs, e.g. runs/proxyless from `nasdsl search
  spaces/proxyless.space` (the default search: the ProxylessNAS supernet, DNAL's multi-branch
  result). The derived network is compiled from `RUN/model/*.space` (every `RUN/model*/` of a
  run with several budgets), the architecture the search derived, before merging; the unpruned
  one from the run's space with its settings (manifest.json: `space`, `space_overrides`), so each
  case has its run's input shape (digits: 1x16x16). Both have their kernels cut to the taps their
  maps reach (`cut_kernels`), as a run builds them (a run from before that did not: timed as now).
- `--search`: ResNet-56 and MobileNetV2 (CIFAR spaces at `--resolution`, default 32) searched on
  the default data (digits) to `--budget` (default flops=33%, about 3x fewer FLOPs) with the
  default recipe, `--epochs W A` weights and architecture epochs and no finetuning (speed does
  not depend on accuracy); `--set KEY=VALUE` is passed on to both searches (e.g.
  architecture.channel_multiple=16; README says which recipe keys turn FLOPs into speed). Runs
  go to `--work DIR` (default: a temporary folder), one folder per space, command line, the
  recipe it resolves to and the derivation code (a search made before a default or derivation
  changed is not reused), and a finished
  one there is reused (an unfinished one resumed). Each search's command is printed.
- `--structured`: VGG-16 and ResNet-56 (CIFAR, 3x32x32) with structured masks, the same leading
  fraction f of every gate group kept (in a residual stage, of the channels the shortcut
  carries, so the stream stays narrow), f bisected to the largest value that gives at least
  `--target` times fewer FLOPs.

Each case is timed in a fresh process of its own (what one leaves behind in oneDNN's kernel cache
and the allocator moved the next one's ratios by up to 0.1), whose glibc heap is kept rather than
trimmed and page-faulted back on every pass (`_timing.STEADY_HEAP`: in a default process the
unpruned networks' large maps fault, the derived ones' less, which inflated MobileNetV2's batch-64
ratio from 0.81 to 1.34; `--default-malloc` times a default process). Every network is built with random
weights (speed does not depend on them), eager PyTorch on CPU, `--threads` threads (default 2),
channels_last. Per case:
- inference (eval, torch.inference_mode, batch 64 and batch 1): the unpruned network
  (`nasdsl.build`), the unpruned network merged (derived with every gate kept, then
  `nasdsl.derive.merge.merge`: each layer's parallel candidates one block, residual blocks
  dense), the derived network as finetuning trains it (`nasdsl.build`: multi-branch, each
  candidate its own convs, placed by index) and the merged network as the export runs it (merged
  from the derived one's eval state dict, checked to compute the same function);
- a training step (train mode, SGD with momentum 0.9, batch 64, forward + cross-entropy +
  backward + step): the weights stage's step of the supernet (`build_supernet`, gates disabled
  and frozen as `dnal.train_weights_only` leaves them, the run's gate placement and depth gates)
  against the finetuning step of the derived network in the form finetuning trains it
  (`merge.train_form`: each layer's candidates one block of concatenated, split and per-group
  ops, the same function and gradients; "trained"), and for the record of the multi-branch
  derived network ("derived", what finetuning trained before) and of the merged one (its
  projections have no BN, so it cannot be trained as the search's network).
Each measurement is the median of `--repeats` forward passes (`--steps` training steps) per
network. Forward passes are timed as a process serving the network runs it, call after call: in
runs of 3, each after `--warmup` untimed calls, the runs of the four networks in rounds of
alternating order (A A A, B B B, C C C, D D D, then D D D, C C C, ...; `_timing.inference_medians`):
timed call by call, each network ran right after another had filled the caches, which at batch 1
cost the small derived networks more than the unpruned ones (README). Training steps are timed
after `--warmup` of each, the networks alternating (A B C D, D C B A, ...). Either way a change of
load hits all alike. A speed-up is the unpruned network's (supernet's) median time over the
network's; its *ratio* is speed-up / FLOPs reduction, the reduction being the derived network's
(unpruned MACs / derived MACs, both networks with their kernels cut to the taps their maps reach,
as a run builds and counts them) for both forms: the merged network
computes the same function with more MACs (the zero-padded kernels and zero rows merging adds).
"vs b" divides the time of the faster of the unpruned network and the unpruned network merged
instead: stricter wherever merging alone speeds the unpruned network up (the multi-branch
ProxylessNAS supernet at batch 1; at batch 64 its zero-padded 7x7 depthwise kernels over all six
candidates make it slower); where merging changes nothing (VGG-16, ResNet-56, MobileNetV2) both
columns time the same network.

`--onnxruntime` also exports the unpruned and the derived network as `nasdsl export --onnx` does
(merged, the ONNX file checked against PyTorch) and times both files in onnxruntime at each batch
size (`--threads` intra-op threads), printed under the targets: eager PyTorch pays a fixed time per
op that onnxruntime mostly does not, which is what decides batch 1. Each file is timed in runs of
its own (`_timing.in_turn`), not call by call: onnxruntime's threads spin between runs, and two
sessions' pools contending on two cores slowed both by up to 1.6x.

Targets: inference ratio >= 0.8 at batch 64 and >= 0.7 at batch 1 for the merged network (what
the export runs), step ratio >= 0.6 for the trained form (what finetuning trains; the table's
`derived` row shows it in the step column, the per-case line all four steps); the table
marks each ratio + (met) or - (missed) against its column's target, at the two decimals printed,
and the lines under it say which case meets which. A run searched to a latency budget (`--budget
latency=45%`) also promised a batch-1 speed-up (the unpruned network's modelled time over the
target); the line under its case says whether the merged network kept it. The per-case lines above the table give the median times in ms.

Run it alone on the machine: ratios move between runs under load (on a shared machine
`--threads 1` is steadier, see benchmarks/gate_overhead.py). To reproduce (the default search
first, then this script; the searches run inside it and are reused from `--work` on a second run):

    .venv/bin/nasdsl search spaces/proxyless.space --out runs/proxyless
    .venv/bin/python benchmarks/derived_speed.py --runs runs/proxyless --search --work runs/derived_speed --structured

Results: see README.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import nasdsl  # noqa: E402  (first: it sizes oneDNN's kernel cache as a run does)
from _timing import (STEADY_HEAP, alternate, channels_last, child_environment, heap_line, in_turn,  # noqa: E402
                     inference_medians, load_line, sgd_step)
from nasdsl.derive.derive import cut_kernels, derive, unpruned  # noqa: E402
from nasdsl.derive.merge import merge, train_form  # noqa: E402
from nasdsl.graph import accounting  # noqa: E402
from nasdsl.graph.ir import Network  # noqa: E402
from nasdsl.graph.ops import CHANNELWISE  # noqa: E402
from nasdsl.pipeline.plan import RunRequest, make_plan  # noqa: E402
from nasdsl.search import dnal  # noqa: E402
from nasdsl.supernet.build import build_supernet  # noqa: E402

SEARCHED = ("resnet56_cifar", "mobilenetv2_cifar")
STRUCTURED = ("vgg16_cifar", "resnet56_cifar")
BATCHES = (64, 1)
STEP_BATCH = 64
TARGETS = {64: 0.8, 1: 0.7, "step": 0.6}
FORMS = ("derived", "merged")
STEP_FORM = {"derived": "trained"}   # the derived network's step: timed as finetuning trains it


@dataclass
class Case:
    label: str
    net: Network               # the unpruned network (with its gate ops), kernels cut as a run builds it
    derived: Network           # the derived network, before merging
    placement: str = "after_bn"   # the supernet's gate placement and depth gates, as the run had them
    depth_gates: bool = False
    note: str = ""
    promise: float | None = None   # a latency budget's run: the batch-1 speed-up it promised (`latency_promise`)

    @property
    def reduction(self) -> float:
        return accounting.network_cost(self.net).flops / accounting.network_cost(self.derived).flops


# ---- the cases ------------------------------------------------------------------------------------
def run_cases(run: Path, label: str | None = None) -> list[Case]:
    """One case per derived model of a finished run (`RUN/model*/NAME.space`)."""
    if not (run / "summary.json").exists():
        raise SystemExit(f"{run}: no summary.json: not a finished nasdsl search run")
    manifest = json.loads((run / "manifest.json").read_text())
    space = Path(manifest["space"])
    if not space.is_absolute() and not space.exists():
        space = ROOT / space
    net, _ = cut_kernels(nasdsl.compile(space, **manifest["space_overrides"]))   # as a run builds it
    summary = json.loads((run / "summary.json").read_text())
    size = summary.get("preprocessing", {}).get("input_size")
    if size and list(size) != net.input_shape.to_list():
        raise SystemExit(f"{run}: the run's input is {size}, its space compiles to {net.input_shape}")
    recipe = manifest.get("recipe", {})
    folders = sorted(d for d in run.glob("model*") if d.is_dir() and any(d.glob("*.space")))
    if not folders:
        raise SystemExit(f"{run}: no model*/ folder with a .space file")
    cases = []
    for folder in folders:
        suffix = "" if folder.name == "model" else folder.name.removeprefix("model")
        derived, _ = cut_kernels(nasdsl.compile(next(folder.glob("*.space"))))   # as derivation makes it now
        cases.append(Case(f"{label or run.name}{suffix}", net, derived, recipe.get("gate_placement", "after_bn"),
                          recipe.get("architecture", {}).get("block_cost", 0) > 0, f"derived model of {folder}",
                          latency_promise(summary, folder.name, net, recipe)))
    return cases


def latency_promise(summary: dict, folder: str, net: Network, recipe: dict) -> float | None:
    """The batch-1 speed-up a latency budget promised the model in `folder`: the unpruned network's
    modelled time (MACs plus the run's layer price for each layer) over the budget's target."""
    entries = [m for m in summary.get("models", []) if m.get("path") == folder] or [summary]
    budget = entries[0].get("budget") or {}
    if budget.get("metric") != "latency":
        return None
    price = recipe.get("architecture", {}).get("block_cost", 0)
    return accounting.metric_cost(net, "latency", price) / budget["target"]


def search_command(space: str, args) -> list[str]:
    """The `nasdsl search` command line of one benchmark search (without --out)."""
    sets = [f"resolution={args.resolution}", f"weights.epochs={args.epochs[0]}",
            f"architecture.epochs={args.epochs[1]}", "finetune.epochs=0", *args.set]
    return ["nasdsl", "search", f"spaces/{space}.space", "--budget", args.budget,
            *[a for kv in sets for a in ("--set", kv)]]


def resolved_recipe(cmd: list[str]) -> dict:
    """The recipe a search command runs with, every `auto` resolved as its plan does: a run searched
    before a default changed is not the run this command would make."""
    sets = dict(kv.split("=", 1) for flag, kv in zip(cmd, cmd[1:]) if flag == "--set")
    budget = cmd[cmd.index("--budget") + 1]
    with tempfile.TemporaryDirectory() as tmp:
        plan = make_plan(RunRequest(space=ROOT / cmd[2], sets=sets, budget=budget, out=Path(tmp) / "run",
                                    device="cpu"), join_world=False)
    recipe = plan.recipe.to_dict()
    asked = sets.get("architecture.block_cost", "0")
    if asked == "auto" or budget.startswith("latency"):   # measured at each plan: the key is the request
        recipe["architecture"]["block_cost"] = asked
    return recipe


DERIVATION = (ROOT / "nasdsl" / "derive" / "derive.py", ROOT / "nasdsl" / "derive" / "budget.py")


def derivation_source() -> str:
    """The code that turns a search's gates into its architecture (derivation and the budget fit):
    a search finished before it changed holds the architecture the old code derived."""
    return "".join(path.read_text() for path in DERIVATION)


def search_folder(space: str, args, work: Path) -> tuple[Path, list[str]]:
    """The folder of one search in `work`, named by its command line, the recipe that resolves to and
    the derivation code (`derivation_source`), and its command line (without --out)."""
    cmd = search_command(space, args)
    key = " ".join(cmd) + json.dumps(resolved_recipe(cmd), sort_keys=True) + derivation_source()
    return work / f"{space}_{hashlib.sha1(key.encode()).hexdigest()[:8]}", cmd


def search(space: str, args, work: Path) -> Path:
    """Run (or reuse, or resume) one search in `work` (`search_folder`)."""
    out, cmd = search_folder(space, args, work)
    cmd += ["--out", str(out), "--quiet"]
    if (out / "summary.json").exists():
        print(f"reusing {out}: {' '.join(cmd)}", flush=True)
        return out
    if (out / "checkpoint.pt").exists():
        cmd.append("--resume")
    print(f"searching: {' '.join(cmd)}", flush=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "nasdsl", *cmd[1:]], cwd=ROOT, env=env, check=True)
    summary = json.loads((out / "summary.json").read_text())
    print(f"  done in {time.time() - t0:.0f} s: {summary['reduction']['flops']:.2f}x fewer FLOPs, "
          f"top-1 {summary['derived']['top1']:.3f} without finetuning", flush=True)
    return out


def structured_masks(net: Network, f: float) -> dict[str, torch.Tensor]:
    """Keep the leading fraction f of every gate group; a residual layer's output gates keep the
    leading fraction f of the channels its shortcut carries (see the module docstring)."""
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
                masks[last.attrs["key"]] = keep(shortcut if shortcut is not None else list(range(width)), width)
                out |= set(masks[last.attrs["key"]].nonzero().flatten().tolist())
            elif any(op.spec.channels(op) is not CHANNELWISE for op in block.ops):
                out |= set(range(block.out_shape.channels))
            else:
                out |= live
        live = out
    return masks


def structured_case(name: str, target: float) -> Case:
    """The structured network of `name` with at least `target` times fewer FLOPs (f bisected)."""
    net, _ = cut_kernels(nasdsl.compile(ROOT / "spaces" / f"{name}.space"))
    full = accounting.network_cost(net).flops
    lo, hi, best = 0.0, 1.0, None   # reduction(lo) >= target > reduction(hi)
    for _ in range(30):
        mid = (lo + hi) / 2
        d = derive(net, structured_masks(net, mid))
        if full / accounting.network_cost(d.network).flops >= target:
            lo, best = mid, d
        else:
            hi = mid
    best = best or derive(net, structured_masks(net, lo))
    return Case(f"{name} structured", net, best.network, note=f"kept fraction f = {lo:.4f}")


# ---- the networks ---------------------------------------------------------------------------------
def merged_model(network: Network, model: torch.nn.Module | None = None) -> tuple[Network, torch.nn.Module]:
    """The merged network of `network` (with `model`'s weights, else fresh ones), as the export runs it;
    checked to compute what `network` does."""
    model = (model or nasdsl.build(network)).eval()
    network_m, state_m = merge(network, model.state_dict())
    model_m = nasdsl.build(network_m).eval()
    model_m.load_state_dict(state_m)
    x = torch.randn(2, *network.input_shape.to_list())
    with torch.inference_mode():
        a, b = model(x), model_m(x)
    err, scale = float((a - b).abs().max()), float(a.abs().max())
    assert err <= 1e-4 * scale + 1e-30, f"{network.name}: merged network differs by {err} (outputs up to {scale})"
    return network_m, model_m


def case_models(case: Case) -> tuple[dict[str, torch.nn.Module], dict[str, int]]:
    """The four networks timed in inference, and the MACs of each."""
    torch.manual_seed(0)
    full_m, full_model_m = merged_model(unpruned(case.net))
    derived = nasdsl.build(case.derived)
    derived_m, derived_model_m = merged_model(case.derived, derived)
    models = {"unpruned": nasdsl.build(case.net), "unpruned merged": full_model_m,
              "derived": derived, "merged": derived_model_m}
    graphs = {"unpruned": case.net, "unpruned merged": full_m, "derived": case.derived, "merged": derived_m}
    return models, {k: accounting.network_cost(g).flops for k, g in graphs.items()}


# ---- measuring ------------------------------------------------------------------------------------
def step_medians(case: Case, models: dict[str, torch.nn.Module], steps: int, warmup: int) -> dict[str, float]:
    """Median seconds of a training step: the supernet's weights-stage step, the finetuning step of
    the derived network as finetuning trains it (train_form), multi-branch, and merged (all on the
    same batch)."""
    torch.manual_seed(0)
    supernet = build_supernet(case.net, case.placement, depth_gates=case.depth_gates)
    params = dnal.train_weights_only(supernet)   # gates disabled and frozen: the weights stage
    x = channels_last(torch.randn(STEP_BATCH, *case.net.input_shape.to_list()))
    y = torch.randint(0, case.net.num_classes, (STEP_BATCH,))
    network, state, _ = train_form(case.derived, models["derived"].state_dict())
    trained = nasdsl.build(network)
    trained.load_state_dict(state)
    calls = {"supernet": sgd_step(supernet, params, x, y), "trained": sgd_step(trained, trained.parameters(), x, y)}
    for form in FORMS:
        calls[form] = sgd_step(models[form], models[form].parameters(), x, y)
    return alternate(calls, steps, warmup)


def measure(case: Case, args) -> dict:
    """Every median of one case, printed as it goes (ms), and the case's FLOPs reduction."""
    models, flops = case_models(case)
    left = accounting.live_layers(case.derived)
    print(f"\n{case.label}: {case.note}; {case.reduction:.2f}x fewer FLOPs "
          f"({flops['unpruned'] / 1e6:.2f}M -> {flops['derived'] / 1e6:.2f}M), input "
          f"{'x'.join(map(str, case.net.input_shape.to_list()))}, {left} of "
          f"{len(case.net.layers)} layers left; merged: {flops['merged'] / 1e6:.2f}M, unpruned merged: "
          f"{flops['unpruned merged'] / 1e6:.2f}M", flush=True)
    shape = case.net.input_shape.to_list()
    result = {"reduction": case.reduction}
    for batch in BATCHES:
        result[batch] = inference_medians(models, shape, batch, args.repeats, args.warmup)
        print(f"  batch {batch:>2} ms: " + ", ".join(f"{k} {1e3 * v:.2f}" for k, v in result[batch].items()),
              flush=True)
    result["step"] = step_medians(case, models, args.steps, args.warmup)
    print("  step     ms: " + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in result["step"].items()), flush=True)
    if args.onnxruntime:
        result["onnxruntime"] = onnxruntime_medians(case, args)
        for batch in BATCHES:
            t = result["onnxruntime"][batch]
            print(f"  onnxruntime, batch {batch:>2} ms: " + ", ".join(f"{k} {1e3 * v:.2f}" for k, v in t.items()),
                  flush=True)
    return result


def onnxruntime_medians(case: Case, args) -> dict:
    """Median seconds of onnxruntime running the unpruned and the derived network's ONNX files, each
    written as `nasdsl export --onnx` writes it (merged, checked against PyTorch by onnxruntime),
    with random weights, `--threads` intra-op threads, at each batch size."""
    import numpy as np
    import onnxruntime as ort

    from nasdsl.export.exporter import export_model
    from nasdsl.train.data import Preprocessing

    shape = case.net.input_shape
    prep = Preprocessing(tuple(shape.to_list()), (0.5,) * shape.channels, (0.5,) * shape.channels)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    sessions = {}
    with tempfile.TemporaryDirectory(prefix="derived_speed_onnx.") as tmp:
        for label, graph in (("unpruned", unpruned(case.net)), ("derived", case.derived)):
            torch.manual_seed(0)
            name = f"speed_{label}"
            out = export_model(graph, nasdsl.build(graph).eval().state_dict(), Path(tmp) / label, name,
                               preprocessing=prep, onnx=True)
            sessions[label] = ort.InferenceSession(str(out / f"{name}.onnx"), options,
                                                   providers=["CPUExecutionProvider"])
    result = {}
    for batch in BATCHES:
        x = {"input": np.random.default_rng(0).standard_normal((batch, *shape.to_list()), dtype=np.float32)}
        result[batch] = in_turn({k: (lambda s=s: s.run(None, x)) for k, s in sessions.items()},
                                args.repeats, args.warmup)   # (their thread pools spin: not call by call)
    return result


def measure_alone(case: Case, args) -> dict:
    """`measure` in a fresh process: timed in one process after another case, ResNet-56's unpruned
    network ran 88 ms a batch of 64 and 8.0 ms a batch of 1, first in its process 104 and 5.0 ms
    (oneDNN's kernel cache, the allocator: what one case leaves behind changes the next one's
    ratios by up to 0.1). Its heap is kept (_timing.STEADY_HEAP) unless `--default-malloc`."""
    with child_environment(heap_env(args)), multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure_with_threads, (case, args))


def heap_env(args) -> dict[str, str]:
    return {} if args.default_malloc else STEADY_HEAP


def _measure_with_threads(case: Case, args) -> dict:
    torch.set_num_threads(args.threads)
    return measure(case, args)


# ---- the report -----------------------------------------------------------------------------------
def ratios(result: dict, form: str) -> dict:
    """Speed-ups of one form and their ratios to the FLOPs reduction."""
    red = result["reduction"]
    out = {}
    for batch in BATCHES:
        t = result[batch]
        best = min(t["unpruned"], t["unpruned merged"])   # the faster form of the unpruned network
        out[batch] = (t["unpruned"] / t[form], t["unpruned"] / t[form] / red, best / t[form] / red)
    speedup = result["step"]["supernet"] / result["step"][STEP_FORM.get(form, form)]
    out["step"] = (speedup, speedup / red)
    return out


def met(value: float, target: float) -> bool:
    """Whether a ratio meets its target at the two decimals printed."""
    return round(value, 2) >= target


def mark(value: float, target: float) -> str:
    return f"{value:.2f}{'+' if met(value, target) else '-'}"


def print_table(results: dict[str, dict]) -> None:
    print("\nratio = speed-up / FLOPs reduction; vs b: the same over the faster of the unpruned network and "
          "the unpruned network merged; + meets, - misses the column's target (batch 64 >= 0.8, batch 1 >= 0.7, "
          "step >= 0.6)")
    w = max(len("network"), *map(len, results)) + 2
    print(f"{'':<{w + 8}}{'FLOPs':>7} | {'batch 64':^22} | {'batch 1':^22} | {'training step':^15}")
    print(f"{'network':<{w}}{'form':<8}{'red.':>7} | " + f"{'speed-up':>9}{'ratio':>7}{'vs b':>6} | " * 2
          + f"{'speed-up':>9}{'ratio':>6}")
    for label, result in results.items():
        for form in FORMS:
            r = ratios(result, form)
            cells = [f"{r[b][0]:>8.2f}x{mark(r[b][1], TARGETS[b]):>7}{mark(r[b][2], TARGETS[b]):>6}" for b in BATCHES]
            name = label if form == FORMS[0] else ""
            print(f"{name:<{w}}{form:<8}{result['reduction']:>6.2f}x | " + " | ".join(cells)
                  + f" | {r['step'][0]:>8.2f}x{mark(r['step'][1], TARGETS['step']):>6}")


def print_targets(results: dict[str, dict]) -> None:
    def verdict(value: float, target) -> str:
        return f"{value:.2f} {'met' if met(value, TARGETS[target]) else 'MISSED'}"

    print("\ntargets: inference of the merged network (as exported) vs the unpruned network "
          "[vs the faster of it and it merged]; finetuning step of the derived network (as finetuning trains it) vs "
          "the supernet's")
    for label, result in results.items():
        m, d = ratios(result, "merged"), ratios(result, "derived")
        parts = [f"batch {b} >= {TARGETS[b]}: {verdict(m[b][1], b)} [{verdict(m[b][2], b)}]" for b in BATCHES]
        print(f"  {label}: " + "; ".join(parts) + f"; step >= {TARGETS['step']}: {verdict(d['step'][1], 'step')}")
        if result.get("promise"):
            speedup, promise = m[1][0], result["promise"]
            print(f"    its latency budget promised a batch-1 speed-up of at least {promise:.2f}x: "
                  f"{speedup:.2f}x {'kept' if speedup >= promise else 'NOT KEPT'}")


def print_onnxruntime(results: dict[str, dict]) -> None:
    """The exports' ONNX files in onnxruntime (--onnxruntime): ratios against the same targets."""
    timed = {label: r for label, r in results.items() if "onnxruntime" in r}
    if not timed:
        return
    print("\nonnxruntime: the exported ONNX file of the derived network against the unpruned network's "
          "(both merged, as `nasdsl export --onnx` writes them); ratio = speed-up / FLOPs reduction")
    for label, result in timed.items():
        cells = []
        for batch in BATCHES:
            t = result["onnxruntime"][batch]
            speedup = t["unpruned"] / t["derived"]
            cells.append(f"batch {batch} {1e3 * t['unpruned']:.2f} -> {1e3 * t['derived']:.2f} ms, {speedup:.2f}x, "
                         f"ratio {mark(speedup / result['reduction'], TARGETS[batch])}")
        print(f"  {label}: " + "; ".join(cells))


# ---- main -----------------------------------------------------------------------------------------
def parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="*", type=Path, default=[], help="finished search runs (e.g. runs/proxyless)")
    ap.add_argument("--search", action="store_true", help=f"search and time {', '.join(SEARCHED)}")
    ap.add_argument("--work", type=Path, help="the searches' folder (default: a temporary one); finished runs reused")
    ap.add_argument("--epochs", type=int, nargs=2, default=[5, 5], metavar=("W", "A"),
                    help="the searches' weights and architecture epochs (default: 5 5)")
    ap.add_argument("--budget", default="flops=33%", help="the searches' budget (default: flops=33%%)")
    ap.add_argument("--resolution", type=int, default=32, help="the searched spaces' resolution (default: 32)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed on to the searches")
    ap.add_argument("--structured", action="store_true", help=f"structured masks of {', '.join(STRUCTURED)}")
    ap.add_argument("--target", type=float, default=3.0, help="the structured networks' FLOPs reduction")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    ap.add_argument("--repeats", type=int, default=21, help="timed forward passes per network and batch")
    ap.add_argument("--steps", type=int, default=11, help="timed training steps per network")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls of each network first")
    ap.add_argument("--onnxruntime", action="store_true",
                    help="also time the unpruned and the derived network's exported ONNX files in onnxruntime")
    ap.add_argument("--default-malloc", action="store_true",
                    help="time with glibc's malloc as it comes (default: its heap kept, see _timing.STEADY_HEAP)")
    args = ap.parse_args(argv)
    if not (args.runs or args.search or args.structured):
        ap.error("nothing to time: give --runs RUN..., --search and/or --structured")
    return args


def cases(args, work: Path) -> list[Case]:
    out = [c for run in args.runs for c in run_cases(run)]
    if args.search:
        out += [c for space in SEARCHED for c in run_cases(search(space, args, work), f"{space} searched")]
    if args.structured:
        out += [structured_case(name, args.target) for name in STRUCTURED]
    return out


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="derived_speed.") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        todo = cases(args, work.resolve())
    print(f"\n{load_line()}; {heap_line(heap_env(args))}; eager, channels_last; median of {args.repeats} forward passes (inference_mode) "
          f"call after call in runs of their own, each after {args.warmup} warm-up calls, and {args.steps} training steps per network, "
          f"interleaved, after {args.warmup} warm-up calls")
    results = {case.label: {**measure_alone(case, args), "promise": case.promise} for case in todo}
    print_table(results)
    print_targets(results)
    print_onnxruntime(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
