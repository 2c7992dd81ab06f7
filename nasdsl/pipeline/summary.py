"""What a finished run reports: summary.json (the contract scripts read) and the search's figures."""
from __future__ import annotations

from nasdsl.derive.derive import Derivation
from nasdsl.pipeline import budgets
from nasdsl.pipeline.plan import Plan
from nasdsl.pipeline.state import RunState
from nasdsl.search import dnal


def summarize(plan: Plan, s: RunState) -> dict:
    """summary.json: baseline, searched and derived (flops, params, top1), gates, stages, notes,
    reduction, and with budgets `budget` and `models` (the top-level fields are the first budget's)."""
    delta_end = plan.recipe.architecture.delta_end
    out = {"space": str(plan.request.space), "recipe": plan.recipe.to_dict(), "data": plan.data.spec,
           "baseline": vars(s.baseline) if s.baseline else None,
           "searched": vars(s.searched) if s.searched else None,
           "derived": vars(s.derived) if s.derived else None,
           "gates": dnal.gate_counts(s.gates, delta_end), "notes": list(s.notes),
           "stages": {st.name: {"epochs": st.epochs, "seconds": round(s.stage_seconds.get(st.name, 0.0), 2)}
                      for st in plan.stages},
           "export_name": plan.export_name, "precision": plan.precision,
           "preprocessing": plan.data.preprocessing.to_dict(),
           "distributed": {"world_size": plan.world.size, "gate_divergence_before_sync": s.gate_divergence}}
    if plan.budgets and s.models:
        first = s.models[0]
        out.update(searched=first["searched"], derived=first["derived"], gates=first["gates"],
                   notes=first["notes"], budget=first["budget"], models=s.models)
        for stage in ("architecture", "finetune"):
            out["stages"][stage]["seconds"] = first["seconds"][stage]
    base, derived = out["baseline"], out["derived"] or out["searched"]
    if base and derived:
        out["reduction"] = {"flops": base["flops"] / max(derived["flops"], 1),
                            "params": base["params"] / max(derived["params"], 1)}
    return out


def plot_search(plan: Plan, state: RunState, derivation: Derivation | None) -> None:
    """This search's figures: the gate distribution as delta grew and the channels kept."""
    from nasdsl.pipeline.plots import plot_gate_distribution, plot_kept_channels

    end = budgets.suffix(plan, state.budget)
    if state.histograms:
        plot_gate_distribution(state.histograms, plan.out / f"gate_distribution{end}.png")
    if derivation is not None:
        plot_kept_channels(plan.network, derivation.masks, plan.out / f"kept_channels{end}.png")
