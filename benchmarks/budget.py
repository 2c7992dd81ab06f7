"""Several budgets from one search: how close the steered gates come to each target, what the
derivation's fit changes, and the accuracy at each cost.

    .venv/bin/python benchmarks/budget.py [--space spaces/proxyless.space] [--budgets flops=50%,25%,12.5%]
        [--out runs/budget] [--set k=v ...] [--run RUN]

Runs `nasdsl search SPACE --budget BUDGETS` (the default recipe and data: the embedded digits), one
weights stage and, per budget, an architecture stage whose penalty weight is steered towards the
target, the fit at derivation and finetuning; `--run RUN` reads a finished run instead. Prints per
budget, all from that one run:
    steered/target   the exact derived cost of the gates as the architecture stage ended, over the
                     target (what the lambda controller achieved on its own);
    achieved/target  after the fit (the guarantee: in [0.9, 1]);
    closed/reopened  the channels the fit changed;
    lambda           the penalty weight the controller ended at (the recipe's lambda_a was the start);
    top-1            of the searched (hard gates, before finetuning) and the derived (finetuned) network.
Time it alone: on 2 cores a second torch process slows both by up to 18x.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_search(args) -> Path:
    out = Path(args.out)
    command = [sys.executable, "-m", "nasdsl", "search", args.space, "--budget", args.budgets, "--out", str(out),
               "-q", *[x for s in args.set for x in ("--set", s)]]
    if out.exists():
        command.append("--resume")
    subprocess.run(command, check=True, cwd=ROOT)
    return out


def report(run: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    base = summary["baseline"]
    print(f"{run}: supernet {base['flops']:,} FLOPs, {base['params']:,} params, top-1 {100 * base['top1']:.2f}%")
    print(f"{'budget':<16} {'target':>11} {'steered/target':>15} {'achieved/target':>16} {'closed':>7} "
          f"{'reopened':>8} {'lambda':>9} {'searched':>9} {'derived':>8} {'seconds':>8}")
    for m in summary["models"]:
        b = m["budget"]
        seconds = sum(m.get("seconds", {}).values())
        print(f"{b['text']:<16} {b['target']:>11,} {b['steered'] / b['target']:>15.3f} {b['achieved'] / b['target']:>16.3f} "
              f"{b['closed']:>7} {b['reopened']:>8} {b['lambda']:>9.3g} {100 * m['searched']['top1']:>8.2f}% "
              f"{100 * m['derived']['top1']:>7.2f}% {seconds:>8.0f}")
    weights = summary["stages"].get("weights", {}).get("seconds", 0)
    print(f"weights stage (once): {weights:.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default="spaces/proxyless.space")
    p.add_argument("--budgets", default="flops=50%,25%,12.5%")
    p.add_argument("--out", default="runs/budget")
    p.add_argument("--set", action="append", default=[], metavar="K=V")
    p.add_argument("--run", help="report a finished run instead of searching")
    args = p.parse_args()
    report(Path(args.run) if args.run else run_search(args))


if __name__ == "__main__":
    main()
