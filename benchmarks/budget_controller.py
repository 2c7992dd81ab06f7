"""How the penalty weight is steered towards a budget: the controller's rate, and no steering at all.

    .venv/bin/python benchmarks/budget_controller.py [--space spaces/proxyless.space] [--budget flops=25%]
        [--rates 0.1,0.3,0.03,0] [--set k=v ...]

One weights stage (the default recipe, 3 epochs unless --set says otherwise), then, from the same
stage-1 weights, one architecture stage per controller, each ended by the fit at derivation:
    steered/target   the exact derived cost of the gates as the stage ended, over the target;
    closed/reopened  what the fit then changed to land in [0.9, 1] x target;
    lambda           where the penalty weight ended (it started at the recipe's lambda_a);
    searched top-1   the hard-gated supernet after the fit, before finetuning (what finetuning starts from).
Rate 0 is plain DNAL (lambda_a fixed) with the fit alone doing the work. Time it alone.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

from nasdsl.pipeline.plan import RunRequest, make_plan
from nasdsl.pipeline.runner import Pipeline
from nasdsl.pipeline.state import RunState
from nasdsl.search import dnal

ROOT = Path(__file__).resolve().parents[1]


def steer_with(pipeline: Pipeline, rate: float) -> None:
    """Make the pipeline's architecture stage use this controller rate."""
    make = pipeline.gate_hooks

    def hooks(epochs: int):
        h = make(epochs)
        if isinstance(h, dnal.BudgetHooks):
            h.rate = rate
        return h

    pipeline.gate_hooks = hooks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default=str(ROOT / "spaces" / "proxyless.space"))
    p.add_argument("--budget", default="flops=25%")
    p.add_argument("--rates", default="0.1,0.3,0.03,0")
    p.add_argument("--set", action="append", default=[], metavar="K=V")
    args = p.parse_args()
    sets = {"weights.epochs": "3", **dict(s.split("=", 1) for s in args.set)}
    with tempfile.TemporaryDirectory() as tmp:
        plan = make_plan(RunRequest(space=Path(args.space), sets=sets, budget=args.budget, out=Path(tmp) / "run",
                                    progress=False))
        pipeline = Pipeline(plan)
        pipeline.setup()
        pipeline.weights()
        stage1, baseline = copy.deepcopy(pipeline.model.state_dict()), pipeline.state.baseline
        target = plan.targets[0]
        print(f"{plan.budgets[0]}: target {target:,} MACs; supernet top-1 {100 * baseline.top1:.2f}%")
        print(f"{'rate':>6} {'steered/target':>15} {'achieved/target':>16} {'closed':>7} {'reopened':>8} "
              f"{'lambda':>9} {'searched top-1':>15}")
        for rate in (float(r) for r in args.rates.split(",")):
            pipeline.model.load_state_dict(stage1)
            pipeline.state = RunState(stage="architecture", baseline=baseline)
            steer_with(pipeline, rate)
            pipeline.architecture()
            fit, state = pipeline.state.fit, pipeline.state
            print(f"{rate:>6g} {fit['steered'] / target:>15.3f} {state.achieved / target:>16.3f} {fit['closed']:>7} "
                  f"{fit['reopened']:>8} {state.budget_lambda:>9.3g} {100 * state.searched.top1:>14.2f}%")


if __name__ == "__main__":
    main()
