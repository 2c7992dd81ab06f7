"""The plan step: every input of a run checked, and the whole run worked out, before anything is
written or trained.

A search that fails after its stages (an export name timm already uses, a file that is not UTF-8,
a batch larger than the data) costs the whole run; `make_plan` turns each such problem into one
located line now. `nasdsl search ... --dry-run` prints the plan and stops there.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from nasdsl.errors import NasdslError
from nasdsl.derive.budget import Budget, parse_budget, smallest_cost
from nasdsl.derive.derive import cut_kernels
from nasdsl.graph import spacetext
from nasdsl.graph.accounting import network_cost
from nasdsl.graph.accounting import summary as graph_summary
from nasdsl.graph.ir import Network
from nasdsl.language.compiler import compile_source
from nasdsl.language.source import read_source
from nasdsl.pipeline.budgets import UNITS
from nasdsl.pipeline.init import InitWeights, read_init
from nasdsl.recipe import Recipe, load_recipe
from nasdsl.supernet.build import place_gates
from nasdsl.train import distributed as dist_utils
from nasdsl.train.data import DataBundle, build_data
from nasdsl.train.loop import steps_per_epoch
from nasdsl.train.precision import resolve_device, resolve_precision

#: recipe keys that `--set` may name without a section (every other undotted name is a space parameter)
RECIPE_KEYS = tuple(Recipe.model_fields)


@dataclass(frozen=True)
class RunRequest:
    """What the user asked for, as typed on the command line (or passed to the Python API)."""
    space: Path
    recipe: str | None = None
    sets: dict[str, str] = field(default_factory=dict)   # --set NAME=VALUE: recipe keys and space parameters
    data: str | None = None
    out: Path | None = None
    seed: int | None = None
    device: str = "auto"
    resume: bool = False
    download: bool = False
    name: str | None = None
    budget: str | None = None      # --budget: the same as --set architecture.budget=...
    progress: bool = True
    init: Path | None = None       # --init: a trained network's state dict to start the supernet from
    train: bool = False            # `nasdsl train`: the space's network as it is, no search
    epochs: int | None = None      # train --epochs (default: the recipe's weights + finetune epochs)


@dataclass(frozen=True)
class StagePlan:
    name: str
    epochs: int
    steps_per_epoch: int


@dataclass
class Plan:
    """A checked run: the compiled space, the recipe, the data, where it runs and what it writes."""
    request: RunRequest
    space_text: str
    overrides: dict[str, str]     # the space's parameters: --set values and the data's header
    network: Network
    recipe: Recipe
    data: DataBundle
    device: torch.device
    world: dist_utils.World
    precision: str
    out: Path
    export_name: str
    stages: list[StagePlan]
    notes: list[str] = field(default_factory=list)
    budgets: list[Budget] = field(default_factory=list)   # architecture.budget, parsed
    targets: list[int] = field(default_factory=list)      # each budget in MACs or parameters
    init: InitWeights | None = None                       # --init, read and checked against the space
    teacher: InitWeights | None = None                    # finetune.distill.teacher as a file, checked alike

    @property
    def space_hash(self) -> str:
        h = hashlib.sha256(self.space_text.encode())
        h.update(json.dumps(sorted(self.overrides.items())).encode())
        return h.hexdigest()

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.name == name)

    def schedule(self) -> list[dict]:
        """The stages in the order they run: with several budgets, the weights stage once, then the
        architecture stage and finetuning once per budget."""
        rows = []
        for budget in self.budgets or [None]:
            for s in self.stages:
                if s.name in ("weights", "joint") and rows:
                    continue
                row = {"name": s.name, "epochs": s.epochs, "steps_per_epoch": s.steps_per_epoch}
                if budget is not None and s.name not in ("weights", "joint"):
                    row["budget"] = str(budget)
                rows.append(row)
        return rows

    def describe(self) -> dict:
        """The `--dry-run --json` contract."""
        info = graph_summary(self.network)
        return {"space": str(self.request.space), "network": self.network.name, "recipe": self.recipe.name,
                "data": self.data.spec, "out": str(self.out), "device": str(self.device),
                "world_size": self.world.size, "precision": self.precision,
                "stages": self.schedule(),
                "flops": info["flops"], "params": info["params"], "gates": info["gates"],
                "export_name": self.export_name, "preprocessing": self.data.preprocessing.to_dict(),
                "augmentation": dict(self.data.augmentation), "notes": list(self.notes),
                "budgets": [{"metric": b.metric, "target": t, "text": str(b)} for b, t in zip(self.budgets, self.targets)],
                "search": None if self.request.train else self.search_settings(),
                "init": self.init.describe() if self.init else None}

    def search_settings(self) -> dict:
        """How the architecture stage prices and rounds the gates, every `auto` resolved."""
        arch = self.recipe.architecture
        return {"penalty_weight": arch.penalty_weight, "channel_multiple": arch.channel_multiple,
                "block_cost": arch.block_cost}


def split_sets(pairs: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """`--set` reaches both files: dotted keys and recipe fields go to the recipe, every other name
    is a parameter of the .space file."""
    recipe, space = {}, {}
    for k, v in pairs.items():
        (recipe if "." in k or k in RECIPE_KEYS else space)[k] = v
    return recipe, space


def stage_names(recipe: Recipe, train: bool = False) -> list[str]:
    if train:
        return ["train"]
    return ["joint", "finetune"] if recipe.strategy == "joint" else ["weights", "architecture", "finetune"]


def stage_epochs(recipe: Recipe, stage: str) -> int:
    """A stage's epochs (`nasdsl train`'s one stage: its recipe's weights epochs, see train_recipe)."""
    return {"weights": recipe.weights.epochs, "joint": recipe.weights.epochs, "train": recipe.weights.epochs,
            "architecture": recipe.architecture.epochs, "finetune": recipe.finetune.epochs}[stage]


def train_recipe(recipe: Recipe, epochs: int | None) -> Recipe:
    """`nasdsl train`'s recipe: its one stage uses the weights stage's optimizer and schedule over
    --epochs (or weights + finetune epochs); a schedule that cannot span them is an error on --epochs."""
    from pydantic import ValidationError

    total = epochs if epochs is not None else recipe.weights.epochs + recipe.finetune.epochs  # a search's weight training
    if total < 1:
        raise NasdslError(f"must be at least 1, got {total}" if epochs is not None else
                          "the recipe's weights + finetune epochs are 0: give --epochs N", file="--epochs")
    try:
        weights = type(recipe.weights).model_validate({**recipe.weights.model_dump(), "epochs": total})
    except ValidationError as exc:
        raise NasdslError(f"{total} epochs do not fit the weights stage's schedule: "
                          f"{exc.errors()[0]['msg']}", file="--epochs") from None
    return recipe.model_copy(update={"weights": weights})


def make_plan(request: RunRequest, *, join_world: bool = True) -> Plan:
    """Check every input in the order a user fixes them (recipe, space, data, device, names, --init,
    folder) and work out the run; raises a NasdslError on the first problem. Writes nothing."""
    recipe_sets, space_sets = split_sets(request.sets)
    if request.seed is not None:
        recipe_sets["seed"] = str(request.seed)
    if request.budget is not None:
        recipe_sets["architecture.budget"] = request.budget
    recipe = load_recipe(request.recipe, recipe_sets)
    space = Path(request.space)
    if not space.is_file():
        raise NasdslError("no such space file", file=str(space))
    text = read_source(space)
    data = _build_data(request, recipe)
    overrides = {**space_sets, "input": str(data.in_channels), "resolution": str(recipe.resolution),
                 "classes": str(data.num_classes)}
    written = compile_source(text, str(space), overrides)
    network, cut = cut_kernels(written)
    device = resolve_device(request.device)
    precision = resolve_precision(recipe.precision, device)
    recipe = resolve_channel_multiple(recipe, device)
    world = dist_utils.init(device) if join_world else dist_utils.World()
    if device.type == "cuda" and world.distributed:
        device = torch.device("cuda", world.local_rank)
    steps = steps_per_epoch(len(data.train), recipe.batch_size, world.size)
    if steps == 0:
        raise NasdslError(f"the training set ({len(data.train)} samples over {world.size} process(es)) is "
                          f"smaller than one batch ({recipe.batch_size})", file="batch_size")
    if request.train:
        recipe = train_recipe(recipe, request.epochs)
    stages = [StagePlan(s, stage_epochs(recipe, s), steps) for s in stage_names(recipe, request.train)]
    notes: list[str] = [kernels_note(written, network, cut)] if cut else []
    export_name = choose_export_name(request.name, network.name, notes)
    out = Path(request.out) if request.out else Path("runs") / (space.stem + ("_train" if request.train else ""))
    budget_text = recipe.architecture.budget
    asked = parse_budget(budget_text) if budget_text and not request.train else []
    recipe = resolve_block_cost(recipe, network, device, recorded_recipe(out, request.resume), notes,
                                request.train, world, latency=any(b.metric == "latency" for b in asked))
    budgets, targets = plan_budgets(recipe, network, asked)
    recipe = resolve_penalty_weight(recipe, budgets)
    init = read_init(request.init, written, str(space), network) if request.init is not None else None
    if not request.train:
        note_untrained_start(recipe, init, notes)
    teacher = plan_teacher(recipe, written, str(space), network) if not request.train else None
    plan = Plan(request, text, overrides, network, recipe, data, device, world, precision, out, export_name,
                stages, notes, budgets, targets, init, teacher)
    check_run_folder(plan)
    return plan


def channel_block(device: torch.device) -> int:
    """How many channels the device's conv kernels compute as one block: 16 on an AVX-512 CPU
    (oneDNN's nChw16c layout), else 8 (AVX2's nChw8c; CUDA tensor cores want multiples of 8)."""
    if device.type == "cpu" and torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return 16
    return 8


def resolve_channel_multiple(recipe: Recipe, device: torch.device) -> Recipe:
    """`architecture.channel_multiple: auto` as the device's channel block, so that the derived
    widths are ones it computes without padding; the run's recipe records the number."""
    arch = recipe.architecture
    if arch.channel_multiple != "auto":
        return recipe
    return recipe.model_copy(update={"architecture": arch.model_copy(update={"channel_multiple": channel_block(device)})})


def recorded_recipe(out: Path, resume: bool) -> dict:
    """The recipe a run folder's manifest records (what --resume must match), or {}."""
    if not (resume and (out / "manifest.json").is_file()):
        return {}
    from nasdsl.pipeline.folder import RunFolder

    try:
        return RunFolder(out, True).read_manifest().get("recipe") or {}
    except NasdslError:
        return {}   # check_run_folder reports it


def resolve_block_cost(recipe: Recipe, network: Network, device: torch.device, recorded: dict,
                       notes: list[str], train: bool = False, world: dist_utils.World | None = None,
                       latency: bool = False) -> Recipe:
    """`architecture.block_cost: auto` as a layer's fixed time at batch 1 on `device`, in MACs,
    measured (`latency.measure_block_cost`; with several processes, rank 0's number, so that all
    price alike); a resumed run keeps the number its manifest records, so it prices its depth gates
    as it began. A `latency` budget counts that price for every layer, so with one `0` (the
    default) is measured too: the depth gates then let the search remove what a layer's fixed time
    does not pay for. `nasdsl train` searches nothing: 0."""
    arch = recipe.architecture
    if latency and arch.penalty_weight not in ("flops", "auto"):
        raise NasdslError("a latency budget prices a layer's fixed time in MACs, so it needs "
                          f"architecture.penalty_weight: flops or auto (the default), not {arch.penalty_weight}",
                          file="--budget")
    measured = arch.block_cost == "auto" or (latency and arch.block_cost == 0)
    if not measured:
        return recipe
    before = (recorded.get("architecture") or {}).get("block_cost")
    if train:
        cost = 0.0
    elif isinstance(before, (int, float)) and not isinstance(before, bool):
        cost = float(before)
    else:
        from nasdsl.pipeline.latency import measure_block_cost

        fit = measure_block_cost(network, arch.channel_multiple, device)
        shared = torch.tensor([fit.block_cost], dtype=torch.float64, device=device)
        dist_utils.broadcast_(world or dist_utils.World(), [shared])
        cost = float(shared)
        notes.append(fit.note())
    return recipe.model_copy(update={"architecture": arch.model_copy(update={"block_cost": cost})})


def resolve_penalty_weight(recipe: Recipe, budgets: list[Budget]) -> Recipe:
    """`architecture.penalty_weight: auto` (the default) as the most accurate pricing the request
    allows: `channels` (every channel 1, the paper), unless something in the penalty is a number of
    MACs (a latency budget's layer price, or block_cost's depth gates), which a channel's price must
    share a unit with: then `flops`. Priced by what a FLOPs budget counts, MobileNetV2 at 50% FLOPs
    lost 0.82 +- 0.25 points over 5 seeds (equal at 25%, and on ResNet-20 at both), though ResNet-56
    at 33% ran 0.73-0.75 of its FLOPs reduction at batch 64 instead of 0.67-0.70
    (benchmarks/quality.py, derived_speed.py with the heap kept; README): `flops` or `params` asks
    for that. The run's recipe records the choice."""
    arch = recipe.architecture
    if arch.penalty_weight != "auto":
        return recipe
    in_macs = arch.block_cost > 0 or any(b.metric == "latency" for b in budgets)
    weight = "flops" if in_macs else "channels"
    return recipe.model_copy(update={"architecture": arch.model_copy(update={"penalty_weight": weight})})


def kernels_note(written: Network, network: Network, cut: int) -> str:
    before, after = network_cost(written), network_cost(network)
    return (f"{cut} conv kernel(s) are larger than the maps they slide over: the run builds them cut to the "
            f"taps each map reaches, the same function at {after.flops:,} MACs and {after.params:,} parameters "
            f"instead of {before.flops:,} and {before.params:,} (the baseline and budgets count these)")


def plan_teacher(recipe: Recipe, network: Network, space: str, cut: Network) -> InitWeights | None:
    """finetune.distill's teacher: `supernet` (the stage-1 network, which only the sequential
    strategy has) or a weights file for the space's plain network, read and checked now (against
    `network` as written, then cut like `cut`)."""
    distill = recipe.finetune.distill
    if distill is None:
        return None
    if distill.teacher == "supernet":
        if recipe.strategy == "joint":
            raise NasdslError("finetune.distill.teacher: 'supernet' is the stage-1 network, which the joint "
                              "strategy does not have; give a weights file", file="recipe")
        return None
    return read_init(Path(distill.teacher), network, space, cut)


def note_untrained_start(recipe: Recipe, init: InitWeights | None, notes: list[str]) -> None:
    """`weights.epochs: 0` belongs with --init (the weights are trained already); without it the
    architecture stage would judge channels of a random network, which is almost surely a mistake.
    A note, not an error: a quick smoke test of the later stages may want exactly that."""
    if init is None and recipe.weights.epochs == 0:
        notes.append("weights.epochs is 0 and there is no --init: the search starts from random weights "
                     "(pass --init FILE to search a trained network, or give the weights stage epochs)")
    if init is not None and init.new_classifier:
        theirs, ours = init.new_classifier
        if recipe.weights.epochs == 0:
            raise NasdslError(f"its classifier has {theirs} outputs and the data {ours} classes: the new "
                              f"classifier needs training; give the weights stage epochs "
                              f"(--set weights.epochs=2)", file=str(init.path))
        notes.append(f"--init {init.path}: everything but the classifier ({theirs} outputs; the data has {ours} "
                     f"classes): the weights stage trains a new one")


def plan_budgets(recipe: Recipe, network: Network, budgets: list[Budget]) -> tuple[list[Budget], list[int]]:
    """The recipe's budgets (`budgets`, parsed from it) and their targets in MACs, parameters or
    MACs of time; a budget below the cheapest network the space can derive (stem, classifier, the
    channel each layer must keep) is an error now."""
    if not budgets:
        return [], []
    if recipe.strategy == "joint":
        raise NasdslError("budgets steer the architecture stage; strategy joint has none (use sequential)",
                          file="--budget")
    price = recipe.architecture.block_cost   # a number by now (resolve_block_cost)
    budgets = [replace(b, layer_price=price) if b.metric == "latency" else b for b in budgets]
    graph = place_gates(network, recipe.gate_placement)  # its kernels cut already
    floors = {metric: smallest_cost(graph, metric, recipe.architecture.channel_multiple, price)
              for metric in {b.metric for b in budgets}}  # several derives each: once per metric
    multiple = recipe.architecture.channel_multiple
    kept = "the channel every layer must keep" + (
        f", {multiple} of them with architecture.channel_multiple {multiple}; 1 keeps one" if multiple > 1 else "")
    targets = []
    for budget in budgets:
        target = budget.absolute(budget.cost(network))
        floor = floors[budget.metric]
        if target < floor:
            raise NasdslError(f"{budget} cannot be met: the smallest network this space derives costs "
                              f"{floor:,} {UNITS[budget.metric]} (the stem, the classifier and {kept})",
                              file="--budget")
        targets.append(target)
    return budgets, targets


def _build_data(request: RunRequest, recipe: Recipe) -> DataBundle:
    return build_data(request.data or recipe.data, recipe.resolution, augmentation=recipe.augmentation,
                      download=request.download)


def choose_export_name(asked: str | None, space_name: str, notes: list[str]) -> str:
    """`--name` if given (an error if it cannot name a timm model); else the space's name, or, when
    that clashes with a timm model or a Python module, the same with `_nasdsl` appended (noted)."""
    from nasdsl.export.exporter import check_export_name

    if asked is not None:
        try:
            check_export_name(asked)
        except NasdslError as exc:
            raise NasdslError(exc.message, file="--name") from None
        return asked
    name = spacetext.identifier(space_name)
    try:
        check_export_name(name)
        return name
    except NasdslError as exc:
        reason = exc.message.split("; pick another")[0]
    safe = f"{name}_nasdsl"
    check_export_name(safe)
    notes.append(f"the export is named {safe}: {reason} (--name chooses another)")
    return safe


def check_run_folder(plan: Plan) -> None:
    """A run folder is never overwritten; `--resume` continues only the same space, settings and recipe."""
    folder, resume = plan.out, plan.request.resume
    exists = folder.exists() and (not folder.is_dir() or any(folder.iterdir()))
    if exists and not folder.is_dir():
        raise NasdslError("the run folder is a file", file=str(folder))
    if exists and not resume:
        raise NasdslError("the run folder already exists; pass --resume to continue it or --out to "
                          "choose another folder", file=str(folder))
    if not (exists and resume):
        return
    from nasdsl.pipeline.folder import RunFolder

    manifest = RunFolder(folder, True).read_manifest()
    if manifest.get("space_hash") != plan.space_hash:
        raise NasdslError("this run searched a different space (or different --set values); "
                          "resume it with the same space and settings", file=str(folder))
    if manifest.get("recipe") != plan.recipe.to_dict():
        changed = recipe_changes(manifest.get("recipe") or {}, plan.recipe.to_dict())
        raise NasdslError(f"this run used a different recipe ({changed}); resume it with the same recipe "
                          "and --set", file=str(folder))
    check_same_init(manifest.get("init"), plan.init, str(folder))


def recipe_changes(then: dict, now: dict, shown: int = 3) -> str:
    """'KEY: A there, B now; ...' for the first `shown` dotted keys whose values differ (a default
    that changed since the run began, or a --set), and how many more."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    def text(v) -> str:
        return "(none)" if v is None else f"{v:g}" if isinstance(v, float) else str(v)

    a, b = flat(then), flat(now)
    keys = [k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    parts = [f"{k}: {text(a.get(k))} there, {text(b.get(k))} now" for k in keys[:shown]]
    more = f"; {len(keys) - shown} more" if len(keys) > shown else ""
    return "; ".join(parts) + more


def check_same_init(recorded: dict | None, init: InitWeights | None, folder: str) -> None:
    """A resumed run takes its weights from its checkpoint, yet it must be the run it claims to be:
    the --init file (compared by sha256, so a moved file still matches) is the manifest's, or
    there is none on both sides."""
    recorded_hash = (recorded or {}).get("sha256")
    if recorded_hash == (init.sha256 if init else None):
        return
    if not recorded_hash:
        raise NasdslError("this run started from random weights (no --init); resume it without --init",
                          file=folder)
    given = f", not {init.path} (sha256 {init.sha256[:12]})" if init else ""
    raise NasdslError(f"this run started from --init {recorded.get('path')} (sha256 {recorded_hash[:12]}); "
                      f"resume it with the same --init{given}", file=folder)
