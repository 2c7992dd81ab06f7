"""`nasdsl` command line. Each command imports its pipeline stage lazily, so `check` never loads torch."""
from __future__ import annotations

import argparse
import json
import sys

from nasdsl.errors import NasdslError


def parse_sets(pairs: list[str] | None) -> dict[str, str]:
    """`--set k=v` pairs -> {k: v}; the value is parsed later, as a .space expression."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise NasdslError("expected NAME=VALUE, like --set width=0.5",
                              file=f"--set {pair if pair.isprintable() else repr(pair)}")
        out[name.strip()] = value.strip()
    return out


def _internal_error(where: str, exc: BaseException) -> str:
    """A bug, not a user error: one line, still no traceback."""
    return f"{where}: internal error, please report it: {type(exc).__name__}: {exc}"


def _stdout_closed() -> int:
    """`nasdsl show ... | head`: the reader went away; exit quietly, as the Python docs advise."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 1


def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def cmd_check(args) -> int:
    from nasdsl.language.compiler import compile_file

    sets = parse_sets(args.set)
    failed = 0
    try:
        for path in args.files:
            try:
                compile_file(path, sets)
                if not args.quiet:
                    print(f"{path}: ok")
            except NasdslError as exc:
                print(exc, file=sys.stderr)
                failed += 1
            except Exception as exc:  # noqa: BLE001 - a bug; still never a traceback
                print(_internal_error(path, exc), file=sys.stderr)
                failed += 1
    except BrokenPipeError:
        return _stdout_closed()
    return 2 if failed else 0


def cmd_show(args) -> int:
    from nasdsl.graph.accounting import summary
    from nasdsl.language.compiler import compile_file

    sets = parse_sets(args.set)
    try:
        info = summary(compile_file(args.file, sets))
    except NasdslError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bug; still never a traceback
        raise NasdslError(_internal_error(args.file, exc)) from None
    try:
        _print_show(info, args.json)
    except BrokenPipeError:
        return _stdout_closed()
    return 0


def _print_show(info: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(info))
        return
    rows = [("layer", "blocks", "in", "out", "gates", "params", "FLOPs")]
    for layer in info["layers"]:
        ops = layer["ops"]
        blocks = ops[0] if len(ops) == 1 else f"{len(ops)}x: " + " | ".join(ops)
        if layer["residual"]:
            blocks += " (+residual)"
        rows.append((layer["name"], blocks, "x".join(map(str, layer["in_shape"])),
                     "x".join(map(str, layer["out_shape"])), str(layer["gates"] or "-"),
                     human(layer["params"]), human(layer["flops"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    widths[1] = min(widths[1], 60)
    for r in rows:
        cells = [c if len(c) <= widths[i] else c[: widths[i] - 3] + "..." for i, c in enumerate(r)]
        print("  ".join(c.ljust(widths[i]) if i < 4 else c.rjust(widths[i]) for i, c in enumerate(cells)))
    print(f"\n{info['name']}: {info['params']:,} params, {info['flops']:,} FLOPs (MACs), "
          f"{info['gates']:,} gated channels in {info['gate_groups']} groups, "
          f"search space 10^{info['log10_space_size']:.1f}")


def cmd_search(args) -> int:
    return _run(args, train=False)


def cmd_train(args) -> int:
    return _run(args, train=True)


def _run(args, train: bool) -> int:
    """`nasdsl search` and `nasdsl train`: one plan step and one pipeline; train has one stage."""
    from pathlib import Path

    from nasdsl.pipeline.plan import RunRequest, make_plan

    request = RunRequest(space=Path(args.space), recipe=args.recipe, sets=parse_sets(args.set), data=args.data,
                         out=Path(args.out) if args.out else None, seed=args.seed, device=args.device,
                         resume=args.resume, download=args.download, name=args.name,
                         budget=None if train else args.budget, progress=not (args.quiet or args.dry_run),
                         init=Path(args.init) if args.init else None, train=train,
                         epochs=args.epochs if train else None)
    plan = make_plan(request, join_world=not args.dry_run)
    if args.dry_run:
        _print_plan(plan.describe(), args.json)
        return 0
    for note in plan.notes:
        if not args.quiet and _is_main_process():
            print(f"note: {note}")
    from nasdsl.pipeline.runner import Pipeline

    summary = Pipeline(plan).execute()
    if not args.quiet and _is_main_process():
        _print_summary(summary, plan.out, "training" if train else "search")
    return 0


def _print_plan(info: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(info))
        return
    print(f"plan for {info['space']} ({info['network']}): recipe {info['recipe']}, data {info['data']}, "
          f"{info['device']} x{info['world_size']}, {info['precision']}")
    label = "network" if [s["name"] for s in info["stages"]] == ["train"] else "supernet"
    print(f"  {label:<9} {human(info['flops'])} FLOPs, {human(info['params'])} params, {info['gates']:,} gated channels")
    for s in info["stages"]:
        budget = f"   ({s['budget']})" if "budget" in s else ""
        print(f"  stage     {s['name']:<13} {s['epochs']:>4} epochs x {s['steps_per_epoch']} steps{budget}")
    steps = sum(s["epochs"] * s["steps_per_epoch"] for s in info["stages"])
    print(f"  total     {sum(s['epochs'] for s in info['stages'])} epochs, {steps:,} steps")
    pre = info["preprocessing"]
    print(f"  input     {'x'.join(map(str, pre['input_size']))}, mean {pre['mean']}, std {pre['std']}, "
          f"crop_pct {pre['crop_pct']}, {pre['interpolation']}")
    if info.get("augmentation"):
        print("  augment   " + ", ".join(f"{k} {v}" for k, v in info["augmentation"].items()))
    if info.get("search"):
        print(f"  gates     {_gate_settings(info['search'])}")
    if info.get("init"):
        print(f"  init      {info['init']['path']} (sha256 {info['init']['sha256'][:12]})")
    print(f"  writes    {info['out']}/ (export name {info['export_name']})")
    for note in info["notes"]:
        print(f"  note: {note}")


_PRICES = {"channels": "each priced 1", "flops": "each priced by its channel's MACs",
           "params": "each priced by its channel's parameters"}


def _gate_settings(search: dict) -> str:
    """The plan's `gates` line: the penalty's price of a gate and the rounding of kept widths."""
    weight, multiple = search["penalty_weight"], search["channel_multiple"]
    text = f"{_PRICES[weight]} (penalty_weight {weight}); "
    text += f"kept widths in multiples of {multiple} (channel_multiple)" if multiple > 1 else "exact widths"
    if search["block_cost"] > 0:
        text += f"; depth gates at {search['block_cost']:g} MACs a block (block_cost)"
    return text


def _is_main_process() -> bool:
    import os
    return os.environ.get("RANK", "0") == "0"


def _print_summary(summary: dict, out, what: str = "search") -> None:
    def line(label, r):
        if r:
            print(f"  {label:<9} top-1 {100 * r['top1']:6.2f}%   {human(r['flops']):>8} FLOPs   {human(r['params']):>8} params")
    print(f"\n{what} finished: {out}")
    line("supernet", summary.get("baseline"))
    line("searched", summary.get("searched"))
    line("derived", summary.get("derived"))
    g = summary["gates"]
    if g["total"]:
        print(f"  gates     {g['kept']:,} of {g['total']:,} kept, {100 * g['binarized_fraction']:.2f}% binary")
    if "reduction" in summary:
        print(f"  reduction {summary['reduction']['flops']:.2f}x FLOPs, {summary['reduction']['params']:.2f}x params")
    for note in summary.get("notes", []):
        print(f"  note: {note}")
    if len(summary.get("models", [])) > 1:
        from nasdsl.pipeline.budgets import table

        print("\n".join(["", "budgets:", *table(summary)]))
    if "budget" in summary:
        b = summary["budget"]
        print(f"  budget    {b['text']}: achieved {b['achieved']:,} ({100 * b['achieved'] / max(b['target'], 1):.1f}% "
              f"of the target {b['target']:,})")


def cmd_eval(args) -> int:
    import json as _json
    from pathlib import Path

    import torch

    from nasdsl.export.load import load
    from nasdsl.train.data import build_data
    from nasdsl.train.precision import resolve_device
    from nasdsl.train.evaluate import accuracy

    model = load(args.path)
    spec = args.data
    manifest = Path(args.path) / "manifest.json"
    if spec is None and manifest.is_file():
        spec = _json.loads(manifest.read_text()).get("data")
    if spec is None:
        raise NasdslError("which data? pass --data (e.g. digits, cifar10:DIR)", file=str(args.path))
    channels, resolution = model.pretrained_cfg["input_size"][0], model.pretrained_cfg["input_size"][1]
    data = build_data(spec, resolution)
    if data.in_channels != channels or data.num_classes != model.num_classes:
        raise NasdslError(f"the model takes {channels}-channel images and predicts {model.num_classes} classes, "
                          f"but {data.name} has {data.in_channels} channels and {data.num_classes} classes",
                          file="--data")
    device = resolve_device(args.device)
    model = model.to(device, memory_format=torch.channels_last)
    result = accuracy(model, data.val, device, args.batch_size)
    params = sum(p.numel() for p in model.parameters())
    report = {"path": str(args.path), "data": spec, **result, "params": params}
    if args.json:
        print(_json.dumps(report))
    else:
        print(f"{args.path}: top-1 {100 * result['top1']:.2f}%, top-5 {100 * result['top5']:.2f}% "
              f"on {result['samples']} {data.name} validation images ({params:,} params)")
    return 0


def cmd_recipes(args) -> int:
    from nasdsl.recipe import available_recipes

    try:
        from nasdsl.recipe import describe_recipes
        rows = describe_recipes()
    except ImportError:
        rows = [(name, "") for name in available_recipes()]
    width = max(len(name) for name, _ in rows)
    for name, text in rows:
        print(f"{name:<{width}}  {text}".rstrip())
    return 0


def cmd_export(args) -> int:
    from nasdsl.export.exporter import export_run

    folder = export_run(args.run, args.out, args.name, onnx=args.onnx)
    print(f"exported {args.name} to {folder}: import {folder}/{args.name}.py, then "
          f"timm.create_model('{args.name}', pretrained=True)")
    return 0


def cmd_import(args) -> int:
    from nasdsl.importer import import_model

    if args.resolution is not None and not 8 <= args.resolution <= 4096:
        raise NasdslError(f"--resolution must be between 8 and 4096, got {args.resolution}")
    done = import_model(args.model, args.out, args.weights, args.download, args.resolution)
    for note in done.notes:
        print(f"note: {note}")
    print(f"wrote {done.space} ({human(done.params)} params, {human(done.flops)} FLOPs) and its weights "
          f"({done.weights}); the imported network's logits equal the model's (largest relative difference "
          f"{done.difference:.1e})")
    print(f"next: nasdsl search {done.space} --init {done.folder / 'weights.safetensors'}")
    return 0


def _run_arguments(r: argparse.ArgumentParser, default_out: str) -> None:
    """The arguments `search` and `train` share: the space, recipe, data, run folder and where it runs."""
    r.add_argument("space", metavar="SPACE")
    r.add_argument("--recipe", help="recipe name in recipes/ or a YAML path (default: cpu)")
    r.add_argument("--data", help="digits | fake | cifar10:DIR | cifar100:DIR | imagefolder:DIR | mnist:DIR | "
                   "fashion-mnist[:DIR] (mnist sets take ?train=N,val=N: a fixed class-stratified subset; "
                   "default: the recipe's)")
    r.add_argument("--out", help=f"run folder (default: {default_out})")
    r.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="override a space parameter (width=0.5) or a recipe key (architecture.lambda_a=1e-4)")
    r.add_argument("--seed", type=int, help="random seed (default: the recipe's)")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    r.add_argument("--download", action="store_true", help="allow torchvision to download CIFAR")
    r.add_argument("--name", help="the exported model's timm name (default: the space's name, or NAME_nasdsl "
                                  "when that is a timm model or a Python module)")
    r.add_argument("--init", metavar="FILE", help="start from these trained weights (.safetensors, or a torch "
                   "state dict read with weights_only), keyed like the space's network, as nasdsl import writes them")
    r.add_argument("--dry-run", action="store_true", help="check every input, print the plan and exit")
    r.add_argument("--json", action="store_true", help="with --dry-run: the plan as one JSON object")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars or final table")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nasdsl", description="Supernet architecture search with a search-space language.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an internal error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("check", help="validate .space files (exit 0 if all are valid, 2 otherwise)")
    c.add_argument("files", nargs="+", metavar="FILE")
    c.add_argument("--set", action="append", metavar="NAME=VALUE", help="override a parameter")
    c.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    c.set_defaults(func=cmd_check)

    s = sub.add_parser("show", help="per-layer table and totals of a .space file")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--set", action="append", metavar="NAME=VALUE", help="override a parameter")
    s.add_argument("--json", action="store_true", help="print one JSON object (name, params, flops, gates, "
                                                       "log10_space_size, layers)")
    s.set_defaults(func=cmd_show)

    r = sub.add_parser("search", help="run DNAL on a .space file: weights -> architecture -> derive -> finetune")
    _run_arguments(r, "runs/<space name>")
    r.add_argument("--budget", metavar="METRIC=VALUE", help="what the derived network may cost: flops=50%%, "
                   "flops=5M, params=1.2M, latency=50%% (of the unpruned network's time at batch 1 here); several (flops=50%%,25%%) search once per budget from one weights stage")
    r.set_defaults(func=cmd_search)

    t = sub.add_parser("train", help="train a .space file's network as it is (no search), with a recipe's "
                                     "weights-stage optimizer and schedule")
    _run_arguments(t, "runs/<space name>_train")
    t.add_argument("--epochs", type=int, help="epochs (default: the recipe's weights + finetune epochs)")
    t.set_defaults(func=cmd_train)

    rc = sub.add_parser("recipes", help="list the shipped recipes (--recipe NAME)")
    rc.set_defaults(func=cmd_recipes)

    e = sub.add_parser("eval", help="accuracy of a derived model (a run or an export folder)")
    e.add_argument("path", metavar="PATH")
    e.add_argument("--data", help="data spec, as search's --data (default: the run's)")
    e.add_argument("--device", default="auto")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--json", action="store_true", help="print one JSON object (top1, top5, samples, params)")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="write a run's derived model as a standalone timm module + weights")
    x.add_argument("run", metavar="RUN")
    x.add_argument("--name", required=True, help="the timm model name (a Python identifier)")
    x.add_argument("--out", required=True, help="the export folder")
    x.add_argument("--onnx", action="store_true", help="also write a verified ONNX file")
    x.set_defaults(func=cmd_export)

    m = sub.add_parser("import", help="write a timm or torchvision CNN as a .space file and its weights")
    m.add_argument("model", metavar="timm:NAME|torchvision:NAME")
    m.add_argument("--weights", metavar="FILE", help="the model's state dict, under the library's names "
                   "(safetensors, or a torch file read with weights_only); default: the library's pretrained "
                   "weights if this machine has them cached, else the random initialisation")
    m.add_argument("--out", metavar="DIR", help="the import folder (default: imports/NAME)")
    m.add_argument("--resolution", type=int, help="the input size the space is written for (default: the "
                   "model's pretrained config, else 224)")
    m.add_argument("--download", action="store_true", help="allow fetching the library's pretrained weights")
    m.set_defaults(func=cmd_import)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except NasdslError as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug, not a user error: one line unless --debug
        if args.debug:
            raise
        print(f"nasdsl {args.command}: internal error, please report it: {type(exc).__name__}: {exc} "
              f"(run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
