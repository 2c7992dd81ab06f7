"""Does DNAL beat the obvious alternatives at equal FLOPs? (issue 15)

    .venv/bin/python benchmarks/quality.py --space spaces/resnet56_cifar.space --set depth=3 \\
        --data 'fashion-mnist?train=5000,val=2000' --budgets 50% 25% --seeds 0 1 2 \\
        --epochs 6 3 6 --work runs/quality --out benchmarks/results/quality_resnet20

For each seed, one network is trained first (stage 1: `nasdsl train SPACE --epochs W`, the weights
stage as a search runs it: a search's stage 1 trains the supernet with its gates disabled, which is
this plain network). Then, for each FLOPs budget:
- DNAL: `nasdsl search SPACE --init STAGE1 --budget flops=B` with no weights stage, A architecture
  epochs and F finetuning epochs; its derived network's FLOPs are "the same FLOPs" below;
- (a) width: the space's `width` parameter, the largest that costs at most DNAL's FLOPs, trained
  from scratch for W + A + F epochs (`nasdsl train`);
- with --distill W T, `dnal_kd`: DNAL with finetune.distill (the stage-1 network as teacher);
- with --masks-from-stage1, `dnal_from_stage1`: DNAL's channels cut from the stage-1 weights and
  finetuned like the pruning baselines (is it the channels DNAL keeps, or where its finetuning starts?);
- with --dnal-scratch, `dnal_scratch`: DNAL's derived network (its run's exported .space) trained
  from scratch for W + A + F epochs exactly as (a) is (does DNAL pick a worse architecture, or do
  inherited weights and F epochs of finetuning lose to training from scratch? Liu et al. 2019,
  "Rethinking the Value of Network Pruning"; a diagnostic, not an equal-cost method: it pays for
  stage 1 and the search and then for the whole training again);
- with --dnal-set KEY=VALUE (repeatable), one DNAL variant besides the default: the search with these
  recipe overrides on top (meant for architecture.* keys; stage 1 and the baselines do not see
  them), as `dnal@TAG` (TAG: the overrides without the `architecture.` prefix, e.g. `dnal@lr=0.15`),
  and likewise `dnal_kd@TAG`, `dnal_from_stage1@TAG`, `dnal_scratch@TAG` with the options above. The
  default DNAL still runs (or is reused): its FLOPs remain the target of (a)-(d), so every variant
  is compared with the same stage-1 and baseline runs (the variant's own FLOPs are in its row);
- (b) l1, (c) bn, (d) random: the stage-1 network pruned to at most DNAL's FLOPs by filter L1 norm,
  by BN |scale| or at random (nasdsl.derive.criteria), then finetuned like DNAL's (F epochs with the
  recipe's finetune optimizer and schedule: `nasdsl train` of the pruned network from its weights).
Every method uses the same recipe, data and seed, and keeps the exact widths it chose
(`architecture.channel_multiple=1` unless --set says otherwise: the pruning baselines do not round). Prints the table (method, FLOPs, params, top-1
mean +- std over the seeds), writes OUT.json and OUT.png (top-1 against FLOPs; OUT defaults to
WORK/quality, WORK/quality@TAG with --dnal-set). Runs go to --work, one folder per method, named as
the method (WORK/seedS/stage1, WORK/seedS/flopsB/METHOD); a finished one is reused, so an
interrupted benchmark continues where it stopped and a new variant reruns only its own DNAL runs.
Run it alone: it is training, hours of it at full size (the README gives the commands).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nasdsl  # noqa: E402
from nasdsl.derive.criteria import channel_scores, prune_to_budget  # noqa: E402
from nasdsl.derive.derive import cut_kernels, derive, slim_state_dict  # noqa: E402
from nasdsl.files import save_tensors  # noqa: E402
from nasdsl.graph.accounting import network_cost  # noqa: E402
from nasdsl.graph.printer import to_space  # noqa: E402
from nasdsl.pipeline.plan import RunRequest, make_plan, split_sets  # noqa: E402
from nasdsl.pipeline.runner import Pipeline  # noqa: E402
from nasdsl.recipe import load_recipe  # noqa: E402
from nasdsl.supernet.network import NasNet  # noqa: E402

EXACT_WIDTHS = {"architecture.channel_multiple": "1"}   # as the README's tables were measured
PRUNERS = {"l1": True, "bn": False, "random": True}     # criterion -> the same fraction of every group
METHODS = ("dnal", "width", *PRUNERS)
DISTILLED = "dnal_kd"       # with --distill: DNAL finetuned with distillation from the stage-1 network
MASKS = "dnal_from_stage1"  # with --masks-from-stage1: DNAL's channels finetuned from the stage-1 weights
SCRATCH = "dnal_scratch"    # with --dnal-scratch: DNAL's derived network trained from scratch like (a)


def run(space: Path, out: Path, common: dict, **request) -> dict:
    """One nasdsl run (search, or train with train=True), or its summary if it finished before."""
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    resume = out.exists()
    sets = {**common["sets"], **request.pop("sets", {})}
    plan = make_plan(RunRequest(space=space, recipe=common["recipe"], data=common["data"], sets=sets, out=out,
                                seed=common["seed"], resume=resume, progress=False, **request))
    print(f"  {'train' if request.get('train') else 'search'} {space.name} -> {out}", flush=True)
    return Pipeline(plan).execute()


def network(space: Path, common: dict, **params):
    """The space compiled as the runs compile it (the data's input, the recipe's resolution, kernels
    cut to the taps their maps reach: the stage-1 checkpoint has them so)."""
    recipe = load_recipe(common["recipe"], split_sets(common["sets"])[0])
    shape = common["input"]
    settings = {**split_sets(common["sets"])[1], **params}
    return cut_kernels(nasdsl.compile(space, input=shape, resolution=recipe.resolution, classes=common["classes"],
                                      **settings))[0]


def widest(space: Path, common: dict, target: int) -> float:
    """The largest `width` (to 1e-3) whose network costs at most `target` MACs."""
    lo, hi = 0.01, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if network_cost(network(space, common, width=mid)).flops <= target:
            lo = mid
        else:
            hi = mid
    return math.floor(lo * 1e4) / 1e4      # rounded down: rounding up could cross the target


def finetune_sets(common: dict) -> dict:
    """`nasdsl train` with the recipe's finetune optimizer and schedule instead of the weights stage's."""
    recipe = load_recipe(common["recipe"], split_sets(common["sets"])[0])
    fields = recipe.finetune.model_dump()
    return {f"weights.{k}": json.dumps(v) for k, v in fields.items() if k != "epochs" and k in type(recipe.weights).model_fields}


def finetuned(space: Path, common: dict, stage1: dict, name: str, derivation_of, work: Path, epochs: int) -> dict:
    """The stage-1 network cut by `derivation_of(net, model)` (a Derivation), finetuned like DNAL's:
    F epochs of `nasdsl train` from its sliced weights with the recipe's finetune settings."""
    out = work / name
    if not (out / "summary.json").is_file():
        net = network(space, common)
        model = NasNet(net.to_config())
        model.load_state_dict(stage1)
        d = derivation_of(net, model)
        slim = NasNet(d.network.to_config())
        work.mkdir(parents=True, exist_ok=True)
        (work / f"{name}.space").write_text(to_space(d.network))
        save_tensors(work / f"{name}.safetensors", slim_state_dict(d, model, slim))
    recipe_sets = split_sets(common["sets"])[0]    # the derived space has none of the space's parameters
    return run(work / f"{name}.space", out, {**common, "sets": {**recipe_sets, **finetune_sets(common)}},
               train=True, epochs=epochs, init=work / f"{name}.safetensors")


def pruned(space: Path, common: dict, stage1: dict, criterion: str, target: int, work: Path, epochs: int) -> dict:
    """The stage-1 network pruned by `criterion` to at most `target` MACs, finetuned like DNAL's."""
    def cut(net, model):
        return prune_to_budget(net, channel_scores(net, model, criterion, seed=common["seed"]), target,
                               uniform=PRUNERS[criterion])
    return finetuned(space, common, stage1, criterion, cut, work, epochs)


def dnal_masks(space: Path, common: dict, stage1: dict, dnal_run: Path, work: Path, epochs: int,
               name: str = MASKS) -> dict:
    """DNAL's channels (its run's gates, derived as the search derived them), finetuned from the
    stage-1 weights rather than from the weights the architecture stage left."""
    from safetensors.torch import load_file

    def cut(net, model):
        gates = load_file(str(dnal_run / "gates.safetensors"))
        multiple = json.loads((dnal_run / "summary.json").read_text())["recipe"]["architecture"]["channel_multiple"]
        return derive(net, {k: v > 0 for k, v in gates.items()}, gates, multiple)
    return finetuned(space, common, stage1, name, cut, work, epochs)


def dnal_scratch(common: dict, dnal_run: Path, out: Path, epochs: int) -> dict:
    """DNAL's derived network (the .space its run exported) trained from scratch like (a): `nasdsl
    train` for W + A + F epochs with the recipe's weights-stage settings and no --init."""
    summary = json.loads((dnal_run / "summary.json").read_text())
    exported = dnal_run / summary["models"][0]["path"] / f"{summary['export_name']}.space"
    recipe_sets = split_sets(common["sets"])[0]    # the derived space has none of the space's parameters
    return run(exported, out, {**common, "sets": recipe_sets}, train=True, epochs=epochs)


def variant(args) -> tuple[str, dict]:
    """--dnal-set as (suffix of its methods and folders, e.g. '@lr=0.15', recipe overrides); ('', {})."""
    overrides = dict(s.split("=", 1) for s in args.dnal_set)
    tag = ",".join(f"{k.removeprefix('architecture.')}={v}" for k, v in overrides.items())
    return (f"@{re.sub(r'[^A-Za-z0-9._=,+-]', '_', tag)}" if tag else ""), overrides


def dnal_family(args, space: Path, common: dict, stage1: dict, b: Path, search: dict, suffix: str,
                overrides: dict) -> dict:
    """{method: summary}: DNAL (`search`: its --init and --budget) with `overrides` on its recipe, in
    folder b/dnal{suffix}, and what the options derive from its run."""
    W, A, F = args.epochs
    sets = {**common["sets"], "weights.epochs": "0", "architecture.epochs": str(A), "finetune.epochs": str(F),
            **overrides}
    folder = b / f"dnal{suffix}"
    results = {f"dnal{suffix}": run(space, folder, {**common, "sets": sets}, **search)}
    if args.distill:
        weight, temperature = args.distill
        results[DISTILLED + suffix] = run(space, b / (DISTILLED + suffix), {**common, "sets": {
            **sets, "finetune.distill.weight": str(weight), "finetune.distill.temperature": str(temperature)}},
            **search)
    if args.masks_from_stage1:
        results[MASKS + suffix] = dnal_masks(space, common, stage1, folder, b, F, MASKS + suffix)
    if args.dnal_scratch:
        results[SCRATCH + suffix] = dnal_scratch(common, folder, b / (SCRATCH + suffix), W + A + F)
    return results


def one_seed(args, seed: int) -> dict:
    """{method: [{budget, flops, params, top1}]} for one seed."""
    W, A, F = args.epochs
    data = nasdsl_data(args)
    common = {"recipe": args.recipe, "data": args.data, "sets": {**EXACT_WIDTHS, **dict(s.split("=", 1) for s in args.set)},
              "seed": seed, "input": data.in_channels, "classes": data.num_classes}
    space, work = Path(args.space), Path(args.work) / f"seed{seed}"
    run(space, work / "stage1", common, train=True, epochs=W)
    stage1 = torch.load(work / "stage1" / "checkpoint.pt", weights_only=True)["model"]
    save_tensors(work / "stage1.safetensors", stage1)
    rows: dict[str, list] = {m: [] for m in methods(args)}
    suffix, overrides = variant(args)
    for budget in args.budgets:
        b = work / f"flops{budget.rstrip('%')}"
        search = {"init": work / "stage1.safetensors", "budget": f"flops={budget}"}
        results = dnal_family(args, space, common, stage1, b, search, "", {})
        target = results["dnal"]["derived"]["flops"]    # the baselines' FLOPs: the default DNAL's
        if suffix:
            results.update(dnal_family(args, space, common, stage1, b, search, suffix, overrides))
        width = str(widest(space, common, target))
        results["width"] = run(space, b / "width", {**common, "sets": {**common["sets"], "width": width}},
                               train=True, epochs=W + A + F)
        for criterion in PRUNERS:
            results[criterion] = pruned(space, common, stage1, criterion, target, b, F)
        for method, summary in results.items():
            rows[method].append({"budget": budget, **summary["derived"]})
    return rows


def nasdsl_data(args):
    from nasdsl.train.data import build_data

    recipe = load_recipe(args.recipe, split_sets(dict(s.split("=", 1) for s in args.set))[0])
    return build_data(args.data, recipe.resolution)


def methods(args) -> tuple[str, ...]:
    """The table's rows in order: DNAL and its options' rows, the variant's likewise, the baselines."""
    extra = ((DISTILLED,) if args.distill else ()) + ((MASKS,) if args.masks_from_stage1 else ()) + \
        ((SCRATCH,) if args.dnal_scratch else ())
    family = (METHODS[0], *extra)
    suffix = variant(args)[0]
    return (*family, *(m + suffix for m in family if suffix), *METHODS[1:])


def table(results: dict, budgets: list[str], names: tuple[str, ...]) -> list[dict]:
    rows = []
    for budget in budgets:
        for method in names:
            runs = [r for seed in results.values() for r in seed[method] if r["budget"] == budget]
            top1 = [100 * r["top1"] for r in runs]
            rows.append({"budget": budget, "method": method, "flops": statistics.mean(r["flops"] for r in runs),
                         "params": statistics.mean(r["params"] for r in runs), "top1_mean": statistics.mean(top1),
                         "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0, "seeds": len(top1)})
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        ax.errorbar([r["flops"] / 1e6 for r in mine], [r["top1_mean"] for r in mine],
                    yerr=[r["top1_std"] for r in mine], marker="o", capsize=3, label=method)
    ax.set_xlabel("MFLOPs (MACs)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def seeded_runs_parser(description: str) -> argparse.ArgumentParser:
    """The options of a benchmark that trains a stage-1 network a seed and searches from it (this
    one and latency_budget.py): the space and its settings, the data, the recipe, seeds, epochs."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--space", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="space parameters, recipe keys")
    p.add_argument("--data", default="fashion-mnist?train=5000,val=2000")
    p.add_argument("--recipe", default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", nargs=3, type=int, default=[6, 3, 6], metavar=("W", "A", "F"))
    return p


def main(argv=None) -> int:
    p = seeded_runs_parser(__doc__.split("\n")[0])
    p.add_argument("--budgets", nargs="+", default=["50%", "25%"])
    p.add_argument("--distill", nargs=2, type=float, metavar=("WEIGHT", "T"),
                   help="also DNAL finetuned with distillation from the stage-1 network (finetune.distill)")
    p.add_argument("--masks-from-stage1", action="store_true",
                   help="also DNAL's channels finetuned from the stage-1 weights (not the architecture stage's)")
    p.add_argument("--dnal-scratch", action="store_true",
                   help="also DNAL's derived network trained from scratch for W + A + F epochs, like (a)")
    p.add_argument("--dnal-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a DNAL variant: recipe overrides for its search only (rows and folders dnal@TAG)")
    p.add_argument("--work", default="runs/quality")
    p.add_argument("--out", default=None, help="OUT.json and OUT.png (default: WORK/quality[@TAG])")
    args = p.parse_args(argv)
    results = {}
    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        results[seed] = one_seed(args, seed)
    rows = table(results, args.budgets, methods(args))
    print(f"\n{Path(args.space).name} {' '.join(args.set)} on {args.data}, epochs W A F = {args.epochs}, "
          f"seeds {args.seeds}")
    wide = max(16, *(len(r["method"]) for r in rows))
    print(f"{'budget':>7}  {'method':<{wide}} {'MFLOPs':>8} {'params':>9}  top-1 mean +- std")
    for r in rows:
        print(f"{r['budget']:>7}  {r['method']:<{wide}} {r['flops'] / 1e6:8.2f} {r['params']:9,.0f}  "
              f"{r['top1_mean']:6.2f} +- {r['top1_std']:.2f}")
    out = Path(args.out) if args.out else Path(args.work) / f"quality{variant(args)[0]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    written = Path(f"{out}.json"), Path(f"{out}.png")    # not with_suffix: a tag such as lr=0.15 has a dot
    written[0].write_text(json.dumps({"args": vars(args), "rows": rows, "runs": results}, indent=2))
    plot(rows, written[1], f"{Path(args.space).stem} {' '.join(args.set)} {' '.join(args.dnal_set)}".strip())
    print(f"wrote {written[0]} and {written[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
