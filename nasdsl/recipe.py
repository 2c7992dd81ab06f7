"""Training recipes: the typed, validated settings of one DNAL search (weights, architecture, finetune).

A recipe is a YAML file loaded into the pydantic models below, which are the one declaration of the
schema: field types, allowed values and defaults all live on the models, nowhere else. Every key is
checked: unknown keys get a did-you-mean, bad values name the key and what is allowed, and each error
is one line pointing at the file, line and column of the key (or at `--set` for an override), because
pydantic's ValidationError is translated here from its `loc` to the dotted key and then to the YAML mark.
A field with a default may be left out of a file; the others are required, so a recipe never silently
inherits a learning rate. `name` defaults to the file's stem.

    load_recipe(None)                              -> the shipped recipes/cpu.yaml
    load_recipe("vgg16_cifar")                     -> the shipped recipes/vgg16_cifar.yaml
    load_recipe("my/recipe.yaml", {"architecture.lambda_a": "1e-4"})

The shipped recipes are package data (`nasdsl/recipes/*.yaml`), read through importlib.resources so
that a regular wheel install finds them. Float fields accept numeric strings because YAML 1.1 reads
`1e-4` (no dot) as a string. This module does not import torch.
"""
from __future__ import annotations

import copy
import math
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, Union, get_args

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError,
                      field_serializer, model_validator)

from nasdsl.errors import NasdslError, did_you_mean

RECIPES_DIR = resources.files("nasdsl") / "recipes"   # a Traversable: a Path unless installed zipped
DEFAULT_RECIPE = "cpu"

Schedule = Literal["cosine", "step", "constant"]
GatePlacement = Literal["after_bn", "before_bn", "after_act"]
Strategy = Literal["sequential", "joint"]
DeltaSchedule = Literal["iteration", "epoch"]
Penalty = Literal["scaled", "unscaled"]
PenaltyWeight = Literal["auto", "channels", "flops", "params"]
BnMode = Literal["frozen", "recalibrated", "train"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]

SCHEDULES = get_args(Schedule)
GATE_PLACEMENTS = get_args(GatePlacement)
STRATEGIES = get_args(Strategy)
DELTA_SCHEDULES = get_args(DeltaSchedule)
PENALTIES = get_args(Penalty)
PENALTY_WEIGHTS = get_args(PenaltyWeight)
BN_MODES = get_args(BnMode)
PRECISIONS = get_args(Precision)

# auto_augment short names -> timm's create_transform strings; other timm strings pass by prefix
AUTO_AUGMENT_NAMES = {"none": None, "rand": "rand-m9-mstd0.5", "trivial": "trivialaugment"}
AUTO_AUGMENT_PREFIXES = ("rand-", "augmix", "trivialaugment")


# --------------------------------------------------------------------------- field types

class _Bad(ValueError):
    """A bad value: its text is the whole message after 'KEY: ', so users never see pydantic's wording."""


class _Cross(ValueError):
    """A cross-field inconsistency inside one section. The section does not know its own dotted prefix
    ("weights." or "finetune."), so the message is built from it later; `keys` (relative) locate it."""

    def __init__(self, message: Callable[[str], str], *keys: str):
        super().__init__(message(""))
        self.message = message
        self.keys = keys


def _as_number(value) -> float | None:
    """A finite float from a number or a numeric string (YAML 1.1 reads 1e-4 as text); else None."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _float(describe: str, ok: Callable[[float], bool]):
    """A float field with its range, failing with 'expected <describe>, got <value as written>'."""
    def check(value):
        number = _as_number(value)
        if number is None or not ok(number):
            raise _Bad(f"expected {describe}, got {value!r}")
        return number
    return Annotated[float, BeforeValidator(check)]


def _int(minimum: int):
    """An integer field >= minimum; a float with an integral value (3.0) is accepted, bools are not."""
    def check(value):
        number = int(value) if isinstance(value, float) and value.is_integer() else value
        if isinstance(number, bool) or not isinstance(number, int) or number < minimum:
            raise _Bad(f"expected an integer >= {minimum}, got {value!r}")
        return number
    return Annotated[int, BeforeValidator(check)]


def _check_multiple(value):
    """architecture.channel_multiple: 'auto' (the plan step picks the device's channel block) or an
    integer >= 1."""
    if value == "auto":
        return value
    number = int(value) if isinstance(value, float) and value.is_integer() else value
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise _Bad(f"expected 'auto' or an integer >= 1, got {value!r}")
    return number


def _check_block_cost(value):
    """architecture.block_cost: 'auto' (the plan step measures a layer's fixed time on the run's
    device, `nasdsl.pipeline.latency`) or a number of MACs >= 0."""
    if value == "auto":
        return value
    try:   # YAML reads 6e6 (no dot) as a string, and --set values are strings
        number = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or not number >= 0 or number == float("inf"):
        raise _Bad(f"expected 'auto' or a number of MACs >= 0, got {value!r}")
    return number


def _choice(kind):
    """A Literal field whose error names the allowed values, with a did-you-mean for near misses."""
    allowed = get_args(kind)

    def check(value):
        if not isinstance(value, str) or value not in allowed:
            hint = did_you_mean(value, allowed) if isinstance(value, str) else ""
            raise _Bad(f"{value!r} is not allowed{hint}; choose one of: {', '.join(allowed)}")
        return value
    return Annotated[kind, BeforeValidator(check)]


def _check_bool(value):
    """YAML's true/false only: a 0/1 or 'yes' string is more likely a slip than a flag."""
    if not isinstance(value, bool):
        raise _Bad(f"expected true or false, got {value!r}")
    return value


def _check_str(value):
    """A non-empty string, stripped: an empty data spec or name would only fail much later."""
    if not isinstance(value, str) or not value.strip():
        raise _Bad(f"expected a non-empty string, got {value!r}")
    return value.strip()


def _check_milestones(value):
    """Step-schedule epochs: increasing positive integers, so the schedule is unambiguous."""
    ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok or any(v <= 0 for v in value) or any(b <= a for a, b in zip(value, value[1:])):
        raise _Bad(f"expected a list of increasing integers > 0, e.g. [30, 80], got {value!r}")
    return list(value)


def _pair(value) -> tuple[float, float] | None:
    """[lo, hi] as two floats (numeric strings allowed), or None when it is not a pair of numbers."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    lo, hi = (_as_number(v) for v in value)
    return None if lo is None or hi is None else (lo, hi)


def _check_scale(value):
    """RandomResizedCrop's area range; 'auto' (None) leaves the choice to the data module."""
    if value is None or value == "auto":
        return None
    pair = _pair(value)
    if pair is None or not 0 < pair[0] <= pair[1] <= 1:
        raise _Bad(f"expected 'auto' or [lo, hi] with 0 < lo <= hi <= 1, got {value!r}")
    return pair


def _check_ratio(value):
    """RandomResizedCrop's aspect-ratio range: positive and ordered, as torchvision requires."""
    pair = _pair(value)
    if pair is None or not 0 < pair[0] <= pair[1]:
        raise _Bad(f"expected [lo, hi] with 0 < lo <= hi, got {value!r}")
    return pair


def _check_hflip(value):
    """Horizontal-flip probability; 'auto' (None) lets the data module decide (digits must not flip)."""
    if value is None or value == "auto":
        return None
    number = _as_number(value)
    if number is None or not 0 <= number <= 1:
        raise _Bad(f"expected 'auto' or a probability in [0, 1], got {value!r}")
    return number


def _check_auto_augment(value):
    """Short names map to timm strings; a full timm string passes when timm's prefixes accept it."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text in AUTO_AUGMENT_NAMES:
            return AUTO_AUGMENT_NAMES[text]
        if text.startswith(AUTO_AUGMENT_PREFIXES):
            return text
    hint = did_you_mean(value, AUTO_AUGMENT_NAMES) if isinstance(value, str) else ""
    raise _Bad(f"{value!r} is not allowed{hint}; choose one of: {', '.join(AUTO_AUGMENT_NAMES)}, or a timm "
               f"string starting with {', '.join(AUTO_AUGMENT_PREFIXES[:-1])} or {AUTO_AUGMENT_PREFIXES[-1]}")


Int0, Int1 = _int(0), _int(1)
PositiveFloat = _float("a number > 0", lambda x: x > 0)
ClosedUnitFloat = _float("a number in [0, 1]", lambda x: 0 <= x <= 1)
NonNegativeFloat = _float("a number >= 0", lambda x: x >= 0)
UnitFloat = _float("a number in [0, 1)", lambda x: 0 <= x < 1)
Bool = Annotated[bool, BeforeValidator(_check_bool)]
Text = Annotated[str, BeforeValidator(_check_str)]
Milestones = Annotated[list[int], BeforeValidator(_check_milestones)]
ScheduleChoice = _choice(Schedule)
DeltaScheduleChoice = _choice(DeltaSchedule)
PenaltyChoice = _choice(Penalty)
PenaltyWeightChoice = _choice(PenaltyWeight)
BnModeChoice = _choice(BnMode)
GatePlacementChoice = _choice(GatePlacement)
StrategyChoice = _choice(Strategy)
PrecisionChoice = _choice(Precision)


# --------------------------------------------------------------------------- models

class _Section(BaseModel):
    """Base of every section: unknown keys are errors (a typo must never be silently ignored)."""
    model_config = ConfigDict(extra="forbid")


class StageRecipe(_Section):
    """SGD settings of the weight-training stage and of the finetuning stage.

    Required: epochs, lr, schedule (cosine | step | constant), momentum, weight_decay.
    Optional: milestones (step: epochs where lr *= gamma), gamma, nesterov, warmup_epochs (linear
    warm-up from 0, counted inside `epochs`), label_smoothing."""
    epochs: Int0
    lr: PositiveFloat
    schedule: ScheduleChoice
    momentum: UnitFloat
    weight_decay: NonNegativeFloat
    milestones: Milestones = Field(default_factory=list)
    gamma: PositiveFloat = 0.1
    nesterov: Bool = False
    warmup_epochs: Int0 = 0
    label_smoothing: UnitFloat = 0.0

    @model_validator(mode="after")
    def _consistent(self) -> StageRecipe:
        """Checks that need two keys: each names both, so the error can point at either."""
        epochs, warmup, milestones = self.epochs, self.warmup_epochs, self.milestones
        if warmup > epochs:
            raise _Cross(lambda p: f"{p}warmup_epochs: {warmup} is more than {p}epochs ({epochs})",
                         "warmup_epochs", "epochs")
        if self.schedule == "step" and not milestones:
            raise _Cross(lambda p: f"{p}milestones: schedule 'step' needs milestones, e.g. [30, 80]",
                         "milestones", "schedule")
        if self.schedule == "step" and milestones[-1] >= epochs:
            raise _Cross(lambda p: f"{p}milestones: milestone {milestones[-1]} is not below {p}epochs ({epochs})",
                         "milestones", "epochs")
        if self.nesterov and self.momentum == 0:
            raise _Cross(lambda p: f"{p}nesterov: needs momentum > 0", "nesterov", "momentum")
        return self


class DistillRecipe(_Section):
    """Knowledge distillation while finetuning: the derived network also learns the teacher's softened
    outputs, loss = (1 - weight) x cross-entropy + weight x T^2 x KL(teacher_T || student_T) (Hinton
    et al. 2015). teacher: `supernet` (the stage-1 network, gates disabled: the network the search
    started from) or a weights file keyed like the space's plain network (checked by the plan step)."""
    teacher: Text = "supernet"
    weight: ClosedUnitFloat = 0.5
    temperature: PositiveFloat = 4.0


class FinetuneRecipe(StageRecipe):
    """The finetuning stage: a weights stage's SGD settings, and optionally `distill` (a
    `DistillRecipe`; none by default)."""
    distill: Optional[DistillRecipe] = None


class ArchRecipe(_Section):
    """The architecture stage: gate parameters s trained with a constant-lr SGD, weights fixed.

    Required: epochs, lr, momentum, lambda_a (the penalty coefficient of Eq. 4).
    Optional: weight_decay (on the gates), delta_start/delta_end (scale of the scaled sigmoid, grown
    exponentially), delta_schedule (iteration: smooth; epoch: the release's per-epoch steps), penalty
    (scaled: sum sigmoid(delta*s), the paper; unscaled: sum sigmoid(s)), penalty_weight (channels: every
    gate counts 1, the paper; flops / params: the MACs / parameters its channel costs; auto, the
    default: channels, or flops where the penalty holds a price in MACs (a latency budget, block_cost);
    resolved by the plan step), bn (frozen | recalibrated | train),
    channel_multiple (every gate group keeps a multiple of this many channels, or all of them, and a
    block summed with its layer's shortcut writes all of the layer's channels, one such width; auto: the
    device's channel block, 16 on an AVX-512 CPU, 8 on other CPUs and on CUDA, resolved by the plan
    step), block_cost (MACs a removable block costs beyond its channels; 0: no depth gates; auto: a
    layer's fixed time at batch 1 on the run's device, in MACs, measured by the plan step; needs
    penalty_weight flops or auto), budget (what the derived network
    may cost: `flops=50%`, `flops=5M`, `params=1.2M`, `latency=50%`, or several, `flops=50%,25%`; None: lambda_a alone
    decides; parsed and checked against the space by the plan step, `--budget` sets it)."""
    epochs: Int0
    lr: PositiveFloat
    momentum: UnitFloat
    lambda_a: NonNegativeFloat
    weight_decay: NonNegativeFloat = 0.0
    delta_start: PositiveFloat = 1.0
    delta_end: PositiveFloat = 1e4
    delta_schedule: DeltaScheduleChoice = "iteration"
    penalty: PenaltyChoice = "scaled"
    penalty_weight: PenaltyWeightChoice = "auto"
    bn: BnModeChoice = "frozen"
    channel_multiple: Annotated[Union[int, Literal["auto"]], BeforeValidator(_check_multiple)] = "auto"
    block_cost: Annotated[Union[float, Literal["auto"]], BeforeValidator(_check_block_cost)] = 0.0
    budget: Optional[str] = None

    @model_validator(mode="after")
    def _consistent(self) -> ArchRecipe:
        """delta must grow, and a block's cost is in MACs, which only the flops weighting counts."""
        start, end = self.delta_start, self.delta_end
        if end < start:
            raise _Cross(lambda p: f"{p}delta_end: {end:g} is below {p}delta_start ({start:g})",
                         "delta_end", "delta_start")
        if (self.block_cost == "auto" or self.block_cost > 0) and self.penalty_weight not in ("flops", "auto"):
            raise _Cross(lambda p: f"{p}block_cost: is counted in MACs, so it needs {p}penalty_weight: flops or auto",
                         "block_cost", "penalty_weight")
        return self


class AugmentRecipe(_Section):
    """Training-time augmentation, built by the data module with timm's create_transform. All optional.

    scale: 'auto' (None) or [lo, hi], 0 < lo <= hi <= 1: RandomResizedCrop's area fraction.
    ratio: [lo, hi], 0 < lo <= hi: RandomResizedCrop's aspect ratio (default [0.75, 1.3333333]).
    hflip: 'auto' (None) or a probability in [0, 1].
    auto_augment: none (None) | rand (timm 'rand-m9-mstd0.5') | trivial (timm 'trivialaugment') | a timm
        string starting with rand-, augmix or trivialaugment; the attribute holds the timm string.
    re_prob: random-erasing probability in [0, 1) (default 0).
    Dumped back as 'auto' / 'none' / lists, so `Recipe.to_dict()` reloads and is JSON-stable."""
    scale: Annotated[tuple[float, float] | None, BeforeValidator(_check_scale)] = None
    ratio: Annotated[tuple[float, float], BeforeValidator(_check_ratio)] = (0.75, 1.3333333)
    hflip: Annotated[float | None, BeforeValidator(_check_hflip)] = None
    auto_augment: Annotated[str | None, BeforeValidator(_check_auto_augment)] = None
    re_prob: UnitFloat = 0.0

    @field_serializer("scale", "hflip")
    def _dump_auto(self, value):
        """None is written back as 'auto', the word a file uses, so a dump reloads as the same recipe."""
        return "auto" if value is None else list(value) if isinstance(value, tuple) else value

    @field_serializer("ratio")
    def _dump_ratio(self, value):
        """A list, as YAML and JSON give it back, so a manifest compares equal after a round trip."""
        return list(value)

    @field_serializer("auto_augment")
    def _dump_auto_augment(self, value):
        """None is written back as 'none', the word a file uses."""
        return "none" if value is None else value


class Recipe(_Section):
    """One search: data, loader and seed; the three stages; gate placement and strategy.

    Required: data (default --data spec), resolution, batch_size (per process), workers (0: load in the
    main process), seed, weights, architecture, finetune. `name` defaults to the file stem.
    Optional: gate_placement (after_bn | before_bn | after_act), strategy (sequential: DNAL's decoupled
    stages; joint: weights and gates together), precision (auto | fp32 | bf16 | fp16; auto = bf16 on a
    CUDA device that supports it, else fp32, resolved by the trainer), compile (opt-in torch.compile,
    default false), augmentation (an `AugmentRecipe`). `origin` is the file it came from, not schema,
    and equality ignores it."""
    name: Text
    data: Text
    resolution: Int1
    batch_size: Int1
    workers: Int0
    seed: Int0
    weights: StageRecipe
    architecture: ArchRecipe
    finetune: FinetuneRecipe
    gate_placement: GatePlacementChoice = "after_bn"
    strategy: StrategyChoice = "sequential"
    precision: PrecisionChoice = "auto"
    compile: Bool = False
    augmentation: AugmentRecipe = Field(default_factory=AugmentRecipe)
    _origin: str | None = PrivateAttr(default=None)

    @property
    def origin(self) -> str | None:
        """The file the recipe was read from (for messages); private so it is neither schema nor compared."""
        return self._origin

    def __eq__(self, other) -> bool:
        """Schema values only: the same recipe read through two paths is the same recipe."""
        return type(other) is type(self) and self.__dict__ == other.__dict__

    __hash__ = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (schema keys only), loadable again with `recipe_from_dict`."""
        return self.model_dump()


# --------------------------------------------------------------------------- errors

class _Origins:
    """Where each dotted key was written: 'FILE:LINE:COL' parts for NasdslError, or '--set'."""

    def __init__(self, file: str | None):
        self.file = file
        self.marks: dict[str, tuple[int, int]] = {}
        self.overridden: set[str] = set()

    def error(self, message: str, *paths: str) -> NasdslError:
        """Blame --set if any of `paths` was overridden, else the first of them written in the file."""
        for p in paths:
            if p in self.overridden:
                return NasdslError(message, file="--set")
        for p in paths:
            if p in self.marks:
                line, col = self.marks[p]
                return NasdslError(message, file=self.file, line=line, column=col)
        return NasdslError(message, file=self.file)


def _collect_marks(node, prefix: str, marks: dict[str, tuple[int, int]]) -> None:
    """LINE, COL of every dotted key, from the composed YAML: plain data forgets where keys were."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                path = f"{prefix}{key.value}"
                marks[path] = (key.start_mark.line + 1, key.start_mark.column + 1)
                _collect_marks(value, path + ".", marks)


def _sub_model(model: type[BaseModel] | None, key: str) -> type[BaseModel] | None:
    """The section model behind `key` of `model`, or None when it is a value (or unknown)."""
    info = model.model_fields.get(key) if model is not None else None
    kind = info.annotation if info is not None else None
    optional = [a for a in get_args(kind) if a is not type(None)]   # Optional[Section]: a section too
    if len(optional) == 1 and len(get_args(kind)) == 2:
        kind = optional[0]
    return kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None


def _unknown_key(section: list[str], key: str, model: type[BaseModel]) -> str:
    """'PATH: unknown key (did you mean ...); known keys in SECTION: ...', for files and --set alike."""
    where = ".".join(section)
    known = list(model.model_fields)
    return (f"{'.'.join([*section, key])}: unknown key{did_you_mean(key, known)}; known keys"
            f"{' in ' + where if where else ''}: {', '.join(known)}")


def _keys(loc: tuple) -> list[str]:
    """Pydantic's loc as recipe keys: section names down to the field, dropping what pydantic adds
    below a field (union member names, list indices)."""
    keys: list[str] = []
    model: type[BaseModel] | None = Recipe
    for part in loc:
        if model is None:
            break
        keys.append(str(part))
        model = _sub_model(model, str(part))
    return keys


def _problem(err: dict) -> tuple[int, list[str], str, tuple[str, ...]]:
    """(rank, keys, message, dotted keys to locate it by) for one pydantic error. Rank orders what
    to report: values and unknown keys first (the first in the file), then missing keys, then
    cross-field checks, which only mean something once every value is right."""
    keys = _keys(err["loc"])
    path = ".".join(keys)
    cause = (err.get("ctx") or {}).get("error")
    if err["type"] == "extra_forbidden":
        model = Recipe
        for part in keys[:-1]:
            model = _sub_model(model, part)
        return 0, keys, _unknown_key(keys[:-1], keys[-1], model), (path,)
    if err["type"] == "missing":
        return 1, keys, path, (".".join(keys[:-1]),)
    if isinstance(cause, _Cross):
        prefix = f"{path}." if path else ""
        return 2, keys, cause.message(prefix), tuple(prefix + k for k in cause.keys)
    if isinstance(cause, _Bad):
        return 0, keys, f"{path}: {cause}", (path,)
    if err["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return 0, keys, f"{path or 'recipe'}: expected a mapping of keys, got {type(err['input']).__name__}", (path,)
    return 0, keys, f"{path or 'recipe'}: {err['msg']}", (path,)


def _report(exc: ValidationError, origins: _Origins) -> NasdslError:
    """The one error to show for a ValidationError, located at its YAML key or at --set."""
    problems = [_problem(err) for err in exc.errors()]
    far = (1 << 30, 0)
    rank, keys, message, paths = min(problems, key=lambda p: (p[0], origins.marks.get(p[3][0], far)))
    if rank == 1:  # every key missing from the same section, in one message
        section = keys[:-1]
        missing = [p[2] for p in problems if p[0] == 1 and p[1][:-1] == section]
        message = f"{', '.join(missing)}: missing (required key{'s' if len(missing) > 1 else ''})"
    return origins.error(message, *paths)


def _build(raw, origins: _Origins, default_name: str) -> Recipe:
    """Validate plain data into a Recipe, translating pydantic's errors into one NasdslError."""
    if not isinstance(raw, dict):
        raise origins.error(f"recipe: expected a mapping of keys, got {type(raw).__name__}")
    raw.setdefault("name", default_name)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise _report(exc, origins) from None
    recipe._origin = origins.file
    return recipe


# --------------------------------------------------------------------------- loading

def available_recipes() -> list[str]:
    """Names of the shipped recipes (package data, so this works from an installed wheel too)."""
    if not RECIPES_DIR.is_dir():
        return []
    return sorted(e.name[: -len(".yaml")] for e in RECIPES_DIR.iterdir() if e.name.endswith(".yaml") and e.is_file())


def describe_recipes() -> list[tuple[str, str]]:
    """(name, one-line description) of each shipped recipe: the first line of its file, a comment,
    so the description is written once, next to the settings it describes."""
    out = []
    for name in available_recipes():
        first = (RECIPES_DIR / f"{name}.yaml").read_text(encoding="utf-8").split("\n", 1)[0].strip()
        out.append((name, first.lstrip("#").strip() if first.startswith("#") else ""))
    return out


def _display(path: Path) -> str:
    """A short name for errors: relative to the working directory, else to the package."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        try:
            return str(path.resolve().relative_to(Path(__file__).resolve().parent))
        except ValueError:
            return str(path)


def _read(name_or_path: str | None) -> tuple[str, str, str]:
    """(text, file name for errors, stem) of a recipe given by shipped name or by path."""
    text = str(DEFAULT_RECIPE if name_or_path is None else name_or_path)
    if "/" in text or "\\" in text or text.endswith((".yaml", ".yml")):
        path = Path(text).expanduser()
        if not path.is_file():
            raise NasdslError(f"recipe file {text} does not exist" if not path.exists()
                              else f"recipe {text} is not a file", file="--recipe")
        entry, file, stem = path, _display(path), path.stem
    else:
        entry = RECIPES_DIR / f"{text}.yaml"
        if not entry.is_file():
            known = available_recipes()
            raise NasdslError(f"unknown recipe '{text}'{did_you_mean(text, known)}; known: {', '.join(known)} "
                              f"(or give a path to a .yaml file)", file="--recipe")
        file = _display(entry) if isinstance(entry, Path) else f"recipes/{text}.yaml"
        stem = text
    try:
        return entry.read_text(encoding="utf-8"), file, stem
    except (OSError, UnicodeDecodeError) as exc:
        raise NasdslError(f"cannot read recipe: {exc}", file=file) from None


def _parse_yaml(text: str, file: str):
    """(node tree for key positions, plain data); a YAML syntax error becomes a located NasdslError."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise NasdslError(f"invalid YAML: {problem}", file=file, line=mark.line + 1 if mark else None,
                          column=mark.column + 1 if mark else None) from None
    return node, data


def _apply_overrides(raw: dict, overrides: dict[str, str], origins: _Origins) -> None:
    """Write each `--set KEY=VALUE` into the raw data, walking the models to reject unknown keys
    early (with --set as the place), and remember the keys so later errors blame --set."""
    for dotted, text in overrides.items():
        parts = [p.strip() for p in str(dotted).split(".")]
        if not all(parts):
            raise NasdslError(f"{dotted}: expected a dotted key such as architecture.lambda_a", file="--set")
        try:
            value = yaml.safe_load(text) if isinstance(text, str) else text
        except yaml.YAMLError:
            value = text  # not YAML: keep the text; validation says what was expected
        model: type[BaseModel] = Recipe
        target = raw
        for i, part in enumerate(parts):
            path = ".".join(parts[: i + 1])
            if part not in model.model_fields:
                raise NasdslError(_unknown_key(parts[:i], part, model), file="--set")
            sub = _sub_model(model, part)
            if i < len(parts) - 1:
                if sub is None:
                    raise NasdslError(f"{path}: is a value, not a section", file="--set")
                if not isinstance(target.get(part), dict):
                    target[part] = {}
                target, model = target[part], sub
                continue
            if sub is not None:
                if not isinstance(value, dict):
                    raise NasdslError(f"{path}: is a section; set its keys ({path}.KEY=VALUE)", file="--set")
                if not isinstance(target.get(part), dict):
                    target[part] = {}
                target[part].update(value)
                origins.overridden.update(f"{path}.{k}" for k in value)
            else:
                target[part] = value
            origins.overridden.add(path)


def load_recipe(name_or_path: str | None = None, overrides: dict[str, str] | None = None) -> Recipe:
    """Load and validate a recipe: None -> the shipped cpu recipe; a bare name -> the shipped NAME.yaml;
    or a path to a YAML file.

    `overrides` maps dotted keys to YAML text (`{"architecture.lambda_a": "1e-4"}`, from `--set`);
    they are applied on top of the file and validated like it, errors attributed to `--set`."""
    text, file, stem = _read(name_or_path)
    node, raw = _parse_yaml(text, file)
    if raw is None:
        raw = {}
    origins = _Origins(file)
    if isinstance(raw, dict):
        _collect_marks(node, "", origins.marks)
        _apply_overrides(raw, overrides or {}, origins)
    return _build(raw, origins, stem)


def recipe_from_dict(data: dict, *, file: str = "recipe") -> Recipe:
    """Rebuild a recipe from `Recipe.to_dict()` output (a run manifest), with the same validation."""
    origins = _Origins(file)
    return _build(copy.deepcopy(data), origins, str(data.get("name", "recipe")) if isinstance(data, dict) else "")
