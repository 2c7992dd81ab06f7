"""Does a latency budget buy batch-1 speed, and what does it cost in accuracy, against a FLOPs budget?

    .venv/bin/python benchmarks/latency_budget.py --space spaces/resnet56_cifar.space --set depth=3 \\
        --data 'fashion-mnist?train=5000,val=2000' --seeds 0 1 2 --epochs 6 3 6 --work runs/latq

For each seed, one network is trained first (stage 1, `nasdsl train`, as benchmarks/quality.py does),
then searched twice from it (`--init`, no weights stage, A architecture and F finetuning epochs,
every gate group rounded to `--multiple` channels as `channel_multiple: auto` does on an AVX-512
CPU), each with every other recipe key at its default: to `--flops` (default flops=33%) and to
`--latency` (default latency=45%: the plan measures a layer's fixed time on this machine and the
search and the fit count it, README "Ask for latency"). Each derived network is
then timed against the unpruned one as benchmarks/derived_speed.py times a `--runs` case (a fresh
process, heap kept, eager PyTorch, channels-last, merged as the export runs it), and the table
gives per seed and method: the FLOPs reduction, the layers left, the batch-1 speed-up (and, for the
latency budget, the speed-up it promised and whether it was kept) and top-1. Runs go to --work
(WORK/seedS/stage1, flops33, latency45: the names are the budgets'), and a finished one is reused,
so a second run only times. Run it alone: the timing is what the machine is doing.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import derived_speed  # noqa: E402  (imports nasdsl first, as a run does)
import quality  # noqa: E402
from nasdsl.files import save_tensors  # noqa: E402
from nasdsl.graph.accounting import live_layers  # noqa: E402


def folder_name(budget: str) -> str:
    """`flops=33%` -> `flops33`, `latency=45%` -> `latency45`."""
    metric, _, value = budget.partition("=")
    return metric + value.rstrip("%").replace(".", "_")


def searches(args, seed: int) -> dict[str, Path]:
    """Stage 1 and the two searches of one seed (each reused when finished): {budget: run folder}."""
    W, A, F = args.epochs
    sets = {**dict(s.split("=", 1) for s in args.set), "architecture.channel_multiple": str(args.multiple)}
    common = {"recipe": args.recipe, "data": args.data, "sets": sets, "seed": seed}
    work = Path(args.work) / f"seed{seed}"
    quality.run(Path(args.space), work / "stage1", common, train=True, epochs=W)
    stage1 = torch.load(work / "stage1" / "checkpoint.pt", weights_only=True)["model"]
    save_tensors(work / "stage1.safetensors", stage1)
    search = {**sets, "weights.epochs": "0", "architecture.epochs": str(A), "finetune.epochs": str(F)}
    folders = {}
    for budget in (args.flops, args.latency):
        folders[budget] = work / folder_name(budget)
        quality.run(Path(args.space), folders[budget], {**common, "sets": search},
                    init=work / "stage1.safetensors", budget=budget)
    return folders


def row(run: Path, timing: dict, promise: float | None) -> dict:
    """One table row: the run's summary and its merged network's batch-1 speed-up."""
    summary = json.loads((run / "summary.json").read_text())
    t = timing[1]
    return {"flops_reduction": summary["reduction"]["flops"], "layers": timing["layers"],
            "speedup": t["unpruned"] / t["merged"], "promise": promise, "top1": summary["derived"]["top1"]}


def timed(run: Path, speed_args) -> dict:
    """derived_speed's measurement of the run's one model, in a fresh process."""
    (case,) = derived_speed.run_cases(run)
    result = derived_speed.measure_alone(case, speed_args)
    layers = f"{live_layers(case.derived)} of {live_layers(case.net)}"
    return row(run, {**result, "layers": layers}, case.promise)


def report(rows: dict[int, dict[str, dict]], budgets: list[str]) -> list[str]:
    """The table's lines: one per seed and budget, then each budget's means."""
    lines = [f"{'seed':>4}  {'budget':<12} {'FLOPs':>7} {'layers':>9} {'batch-1 speed-up':>24} {'top-1':>7}"]
    for seed, by_budget in rows.items():
        for budget in budgets:
            r = by_budget[budget]
            promise = "" if r["promise"] is None else \
                f" ({'kept' if r['speedup'] >= r['promise'] else 'NOT kept'} {r['promise']:.2f}x)"
            lines.append(f"{seed:>4}  {budget:<12} {r['flops_reduction']:6.2f}x {r['layers']:>9} "
                         f"{r['speedup']:>8.2f}x{promise:<15} {100 * r['top1']:6.2f}%")
    for budget in budgets:
        rs = [by_budget[budget] for by_budget in rows.values()]
        top1 = [100 * r["top1"] for r in rs]
        spread = f" +- {statistics.stdev(top1):.2f}" if len(top1) > 1 else ""
        lines.append(f"mean  {budget:<12} {statistics.mean(r['flops_reduction'] for r in rs):6.2f}x "
                     f"{'':>9} {statistics.mean(r['speedup'] for r in rs):>8.2f}x{'':<15} "
                     f"{statistics.mean(top1):6.2f}%{spread}")
    return lines


def main(argv=None) -> int:
    p = quality.seeded_runs_parser(__doc__.split("\n")[0])
    p.add_argument("--flops", default="flops=33%")
    p.add_argument("--latency", default="latency=45%")
    p.add_argument("--multiple", type=int, default=16, help="architecture.channel_multiple (default: 16)")
    p.add_argument("--work", default="runs/latency_budget")
    args = p.parse_args(argv)
    budgets = [args.flops, args.latency]
    folders = {seed: searches(args, seed) for seed in args.seeds}
    speed_args = derived_speed.parse(["--runs", "unused"])
    rows = {seed: {b: timed(run, speed_args) for b, run in by_budget.items()} for seed, by_budget in folders.items()}
    print(f"\n{Path(args.space).name} {' '.join(args.set)} on {args.data}, epochs W A F = {args.epochs}; "
          f"{derived_speed.load_line()}; batch-1 speed-up of the merged network over the unpruned one")
    print("\n".join(report(rows, budgets)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
