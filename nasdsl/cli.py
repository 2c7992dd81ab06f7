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


RECIPE_KEYS = ("name", "data", "resolution", "batch_size", "workers", "seed", "gate_placement", "strategy")


def split_sets(pairs: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """`--set` in `search` reaches both files: dotted keys and recipe fields go to the recipe,
    every other name is a parameter of the .space file."""
    recipe, space = {}, {}
    for k, v in pairs.items():
        (recipe if "." in k or k in RECIPE_KEYS else space)[k] = v
    return recipe, space


def cmd_search(args) -> int:
    from pathlib import Path

    from nasdsl.search.dnal import SearchJob, search
    from nasdsl.recipe import load_recipe

    recipe_sets, space_sets = split_sets(parse_sets(args.set))
    if args.seed is not None:
        recipe_sets["seed"] = str(args.seed)
    recipe = load_recipe(args.recipe, recipe_sets)
    space = Path(args.space)
    if not space.is_file():
        raise NasdslError("no such space file", file=args.space)
    out = Path(args.out) if args.out else Path("runs") / space.stem
    job = SearchJob(space=space, recipe=recipe, data=args.data or recipe.data, out=out, space_overrides=space_sets,
                    device=args.device, resume=args.resume, download=args.download, progress=not args.quiet)
    summary = search(job)
    if summary is not None and not args.quiet and _is_main_process():
        _print_summary(summary, out)
    return 0


def _is_main_process() -> bool:
    import os
    return os.environ.get("RANK", "0") == "0"


def _print_summary(summary: dict, out) -> None:
    def line(label, r):
        if r:
            print(f"  {label:<9} top-1 {100 * r['top1']:6.2f}%   {human(r['flops']):>8} FLOPs   {human(r['params']):>8} params")
    print(f"\nsearch finished: {out}")
    line("supernet", summary.get("baseline"))
    line("searched", summary.get("searched"))
    line("derived", summary.get("derived"))
    g = summary["gates"]
    print(f"  gates     {g['kept']:,} of {g['total']:,} kept, {100 * g['binarized_fraction']:.2f}% binary")
    if "reduction" in summary:
        print(f"  reduction {summary['reduction']['flops']:.2f}x FLOPs, {summary['reduction']['params']:.2f}x params")
    for note in summary.get("notes", []):
        print(f"  note: {note}")


def cmd_eval(args) -> int:
    import json as _json
    from pathlib import Path

    import torch

    from nasdsl.export.load import load
    from nasdsl.train.data import build_data
    from nasdsl.search.dnal import resolve_device
    from nasdsl.train.evaluate import accuracy

    model = load(args.path)
    spec = args.data
    manifest = Path(args.path) / "manifest.json"
    if spec is None and manifest.is_file():
        spec = _json.loads(manifest.read_text()).get("data")
    if spec is None:
        raise NasdslError("which data? pass --data (e.g. digits, cifar10:DIR)", file=str(args.path))
    channels, resolution = model.config["input"][0], model.config["input"][1]
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


def cmd_export(args) -> int:
    from nasdsl.export.exporter import export_run

    folder = export_run(args.run, args.out, args.name, onnx=args.onnx)
    print(f"exported {args.name} to {folder}: import {folder}/{args.name}.py, then "
          f"timm.create_model('{args.name}', pretrained=True)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nasdsl", description="Supernet architecture search with a search-space language.")
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
    r.add_argument("space", metavar="SPACE")
    r.add_argument("--recipe", help="recipe name in recipes/ or a YAML path (default: cpu)")
    r.add_argument("--data", help="digits | fake | cifar10:DIR | cifar100:DIR | imagefolder:DIR (default: the recipe's)")
    r.add_argument("--out", help="run folder (default: runs/<space name>)")
    r.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="override a space parameter (width=0.5) or a recipe key (architecture.lambda_a=1e-4)")
    r.add_argument("--seed", type=int, help="random seed (default: the recipe's)")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    r.add_argument("--download", action="store_true", help="allow torchvision to download CIFAR")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars or final table")
    r.set_defaults(func=cmd_search)

    e = sub.add_parser("eval", help="accuracy of a derived model (a run or an export folder)")
    e.add_argument("path", metavar="PATH")
    e.add_argument("--data", help="data spec (default: the run's)")
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


if __name__ == "__main__":
    sys.exit(main())
