"""What a run with budgets writes: one export folder per budget, a summary entry per budget, the
accuracy/cost table on the terminal and the Pareto plot.

With one budget the run looks as it always did (`model/`, `gates.safetensors`); with several, each
budget gets `model_<slug>/` and `gates_<slug>.safetensors`, where the slug reads like the budget
(`flops_50pct`, `params_1.2M`).
"""
from __future__ import annotations

from pathlib import Path

from nasdsl.derive.budget import Budget
from nasdsl.search import dnal

UNITS = {"flops": "MACs", "params": "parameters", "latency": "MACs of time"}


def slug(budget: Budget) -> str:
    """`flops=50%` -> `flops_50pct`; `params=1.2M` -> `params_1.2M`: a folder name that reads as the budget."""
    if budget.relative:
        value = f"{100 * budget.target:g}pct"
    else:
        value = next((f"{budget.target / scale:g}{unit}" for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3))
                      if budget.target >= scale), f"{budget.target:g}")
    return f"{budget.metric}_{value}"


def model_dir(plan, index: int) -> str:
    return "model" if len(plan.budgets) <= 1 else f"model_{slug(plan.budgets[index])}"


def gates_file(plan, index: int) -> str:
    return "gates.safetensors" if len(plan.budgets) <= 1 else f"gates_{slug(plan.budgets[index])}.safetensors"


def suffix(plan, index: int) -> str:
    return "" if len(plan.budgets) <= 1 else f"_{slug(plan.budgets[index])}"


def fit_note(budget: Budget, target: int, achieved: int, closed: int, reopened: int) -> str:
    changed = []
    if closed:
        changed.append(f"closed {closed} channel(s) that gave least per unit of cost")
    if reopened:
        changed.append(f"reopened {reopened} strongest closed channel(s)")
    how = "; ".join(changed) if changed else "the gates met it as they were"
    return (f"budget {budget}: the derived network costs {achieved:,} of {target:,} {UNITS[budget.metric]} "
            f"({100 * achieved / max(target, 1):.1f}%); {how}")


def model_entry(plan, state) -> dict:
    """A finished budget's entry in summary.json's `models`."""
    index = state.budget
    budget, target = plan.budgets[index], plan.targets[index]
    return {"budget": {"metric": budget.metric, "target": target, "achieved": state.achieved, "text": str(budget),
                       "lambda": state.budget_lambda, **(state.fit or {})},
            "searched": vars(state.searched) if state.searched else None,
            "derived": vars(state.derived) if state.derived else None,
            "gates": dnal.gate_counts(state.gates, plan.recipe.architecture.delta_end),
            "notes": list(state.notes), "path": model_dir(plan, index),
            "seconds": {k: round(state.stage_seconds.get(k, 0.0), 2) for k in ("architecture", "finetune")}}


def table(summary: dict) -> list[str]:
    """Terminal lines: the supernet, then each budget's target, achieved cost and top-1."""
    base = summary.get("baseline") or {}
    lines = [f"  {'model':<22} {'FLOPs':>10} {'params':>10} {'top-1':>8}   budget (achieved / target)"]
    if base:
        lines.append(f"  {'supernet':<22} {base['flops']:>10,} {base['params']:>10,} {100 * base['top1']:>7.2f}%")
    for m in summary.get("models", []):
        d, b = m["derived"] or {}, m["budget"]
        lines.append(f"  {m['path']:<22} {d.get('flops', 0):>10,} {d.get('params', 0):>10,} "
                     f"{100 * d.get('top1', 0):>7.2f}%   {b['text']}: {b['achieved']:,} / {b['target']:,} "
                     f"({100 * b['achieved'] / max(b['target'], 1):.1f}%)")
    return lines


def plot_pareto(summary: dict, path: Path) -> None:
    """Top-1 against FLOPs: one point per budget and one for the supernet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    models = [m for m in summary.get("models", []) if m.get("derived")]
    xs = [m["derived"]["flops"] / 1e6 for m in models]
    ys = [100 * m["derived"]["top1"] for m in models]
    ax.plot(xs, ys, "o-", label="derived (one per budget)")
    for m, x, y in zip(models, xs, ys):
        ax.annotate(m["budget"]["text"].split(" (")[0], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    base = summary.get("baseline")
    if base:
        ax.plot([base["flops"] / 1e6], [100 * base["top1"]], "s", color="gray", label="supernet")
    ax.set_xlabel("FLOPs (M MACs)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Accuracy against cost, one search")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
