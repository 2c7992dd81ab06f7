"""Training recipes: the typed, validated settings of one DNAL search (weights, architecture, finetune).

A recipe is a YAML file (`recipes/*.yaml`) loaded into the dataclasses below. Every key is checked:
unknown keys get a did-you-mean, bad values name the key and what is allowed, and each error points
at the file and line of the key (or at `--set` for an override). Keys that a file leaves out take the
defaults below only where the default is the paper's own choice (marked "optional" in `SCHEMA`);
everything else is required, so a recipe never silently inherits a learning rate.

    load_recipe(None)                              -> recipes/cpu.yaml
    load_recipe("vgg16_cifar")                     -> recipes/vgg16_cifar.yaml
    load_recipe("my/recipe.yaml", {"architecture.lambda_a": "1e-4"})

Float fields accept numeric strings because YAML 1.1 reads `1e-4` (no dot) as a string.
This module does not import torch.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

import nasdsl
from nasdsl.errors import NasdslError, did_you_mean

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
DEFAULT_RECIPE = "cpu"

SCHEDULES = ("cosine", "step", "constant")
GATE_PLACEMENTS = ("after_bn", "before_bn", "after_act")
STRATEGIES = ("sequential", "joint")
DELTA_SCHEDULES = ("iteration", "epoch")
PENALTIES = ("scaled", "unscaled")
PENALTY_WEIGHTS = ("channels", "flops")
BN_MODES = ("frozen", "recalibrated", "train")


@dataclass
class StageRecipe:
    """SGD settings of the weight-training stage and of the finetuning stage."""
    epochs: int
    lr: float
    schedule: str                       # cosine | step | constant
    momentum: float
    weight_decay: float
    milestones: list[int] = field(default_factory=list)   # step: epochs where lr *= gamma
    gamma: float = 0.1
    nesterov: bool = False
    warmup_epochs: int = 0              # linear warm-up from 0, counted inside `epochs`
    label_smoothing: float = 0.0


@dataclass
class ArchRecipe:
    """The architecture stage: gate parameters s trained with a constant-lr SGD, weights fixed."""
    epochs: int
    lr: float
    momentum: float
    lambda_a: float                     # penalty coefficient (Eq. 4)
    weight_decay: float = 0.0           # on the gate parameters
    delta_start: float = 1.0            # scale factor of the scaled sigmoid, grown exponentially
    delta_end: float = 1e4
    delta_schedule: str = "iteration"   # iteration: smooth growth; epoch: the release's per-epoch steps
    penalty: str = "scaled"             # scaled: sum sigmoid(delta*s) (paper Eq. 4); unscaled: sum sigmoid(s)
    penalty_weight: str = "channels"    # channels: every gate counts 1 (paper); flops: the MACs its channel costs
    bn: str = "frozen"                  # frozen: BN statistics fixed (eval mode); train: keep updating
    channel_multiple: int = 1           # derived widths: each gate group keeps a multiple of this (1: exact)
    block_cost: float = 0.0             # MACs a removable block costs beyond its channels (0: no depth gates)


@dataclass
class Recipe:
    name: str
    data: str                           # default --data spec
    resolution: int
    batch_size: int                     # per process
    workers: int                        # DataLoader workers; 0 loads in the main process
    seed: int
    weights: StageRecipe
    architecture: ArchRecipe
    finetune: StageRecipe
    gate_placement: str = "after_bn"    # after_bn | before_bn | after_act
    strategy: str = "sequential"        # sequential: DNAL's decoupled stages; joint: weights and gates together
    origin: str | None = field(default=None, compare=False, repr=False)  # file it came from (not schema)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (schema keys only), loadable again with `recipe_from_dict`."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "origin":
                continue
            value = getattr(self, f.name)
            if isinstance(value, (StageRecipe, ArchRecipe)):
                value = {g.name: copy.deepcopy(getattr(value, g.name)) for g in fields(value)}
            out[f.name] = value
        return out


# --------------------------------------------------------------------------- schema

# kind: "int>=0", "int>=1", "float>0", "float>=0", "momentum", "unit", "bool", "str", "milestones",
#       or a tuple of allowed strings. `optional` keys may be left out of a file.
_STAGE = {
    "epochs": ("int>=0", False), "lr": ("float>0", False), "schedule": (SCHEDULES, False),
    "momentum": ("momentum", False), "weight_decay": ("float>=0", False),
    "milestones": ("milestones", True), "gamma": ("float>0", True), "nesterov": ("bool", True),
    "warmup_epochs": ("int>=0", True), "label_smoothing": ("unit", True),
}
_ARCH = {
    "epochs": ("int>=0", False), "lr": ("float>0", False), "momentum": ("momentum", False),
    "lambda_a": ("float>=0", False), "weight_decay": ("float>=0", True), "delta_start": ("float>0", True),
    "delta_end": ("float>0", True), "delta_schedule": (DELTA_SCHEDULES, True), "penalty": (PENALTIES, True),
    "penalty_weight": (PENALTY_WEIGHTS, True), "bn": (BN_MODES, True), "channel_multiple": ("int>=1", True),
    "block_cost": ("float>=0", True),
}
_TOP = {
    "name": ("str", True), "data": ("str", False), "resolution": ("int>=1", False),
    "batch_size": ("int>=1", False), "workers": ("int>=0", False), "seed": ("int>=0", False),
    "gate_placement": (GATE_PLACEMENTS, True), "strategy": (STRATEGIES, True),
    "weights": (_STAGE, False), "architecture": (_ARCH, False), "finetune": (_STAGE, False),
}
SCHEMA = _TOP

_DESCRIBE = {
    "int>=0": "an integer >= 0", "int>=1": "an integer >= 1", "float>0": "a number > 0",
    "float>=0": "a number >= 0", "momentum": "a number in [0, 1)", "unit": "a number in [0, 1)",
    "bool": "true or false", "str": "a non-empty string",
    "milestones": "a list of increasing integers > 0, e.g. [30, 80]",
}


class _Origins:
    """Where each dotted key was written: 'FILE:LINE:COL' parts for NasdslError, or '--set'."""

    def __init__(self, file: str | None):
        self.file = file
        self.marks: dict[str, tuple[int, int]] = {}
        self.overridden: set[str] = set()

    def error(self, message: str, *paths: str) -> NasdslError:
        for p in paths:
            if p in self.overridden:
                return NasdslError(message, file="--set")
        for p in paths:
            if p in self.marks:
                line, col = self.marks[p]
                return NasdslError(message, file=self.file, line=line, column=col)
        return NasdslError(message, file=self.file)


def _collect_marks(node, prefix: str, marks: dict[str, tuple[int, int]]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                path = f"{prefix}{key.value}"
                marks[path] = (key.start_mark.line + 1, key.start_mark.column + 1)
                _collect_marks(value, path + ".", marks)


def _check_value(path: str, kind, value, origins: _Origins):
    def bad(expect: str):
        return origins.error(f"{path}: expected {expect}, got {value!r}", path)

    if isinstance(kind, tuple):
        if not isinstance(value, str) or value not in kind:
            hint = did_you_mean(value, kind) if isinstance(value, str) else ""
            return_msg = f"{path}: {value!r} is not allowed{hint}; choose one of: {', '.join(kind)}"
            raise origins.error(return_msg, path)
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad(_DESCRIBE[kind])
        return value
    if kind == "str":
        if not isinstance(value, str) or not value.strip():
            raise bad(_DESCRIBE[kind])
        return value.strip()
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise bad(_DESCRIBE[kind])
        if value < int(kind[-1]):
            raise bad(_DESCRIBE[kind])
        return value
    if kind == "milestones":
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise bad(_DESCRIBE[kind])
        if any(v <= 0 for v in value) or any(b <= a for a, b in zip(value, value[1:])):
            raise bad(_DESCRIBE[kind])
        return list(value)
    # floats
    number = value
    if isinstance(number, str):
        try:
            number = float(number.strip())
        except ValueError:
            raise bad(_DESCRIBE[kind]) from None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
        raise bad(_DESCRIBE[kind])
    number = float(number)
    ok = {"float>0": number > 0, "float>=0": number >= 0, "momentum": 0 <= number < 1,
          "unit": 0 <= number < 1}[kind]
    if not ok:
        raise bad(_DESCRIBE[kind])
    return number


def _check_section(raw, schema: dict, prefix: str, origins: _Origins) -> dict[str, Any]:
    where = prefix.rstrip(".") or "recipe"
    if not isinstance(raw, dict):
        raise origins.error(f"{where}: expected a mapping of keys, got {type(raw).__name__}", prefix.rstrip("."))
    out: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if not isinstance(key, str) or key not in schema:
            raise origins.error(f"{path}: unknown key{did_you_mean(str(key), schema)}; known keys"
                                f"{' in ' + where if prefix else ''}: {', '.join(schema)}", path)
        kind, _ = schema[key]
        if isinstance(kind, dict):
            out[key] = _check_section(value, kind, path + ".", origins)
        else:
            out[key] = _check_value(path, kind, value, origins)
    missing = [k for k, (_, optional) in schema.items() if not optional and k not in raw]
    if missing:
        names = ", ".join(prefix + k for k in missing)
        raise origins.error(f"{names}: missing (required key{'s' if len(missing) > 1 else ''})",
                            prefix.rstrip("."))
    return out


def _check_stage(stage: dict, prefix: str, origins: _Origins) -> None:
    epochs = stage["epochs"]
    if stage.get("warmup_epochs", 0) > epochs:
        raise origins.error(f"{prefix}.warmup_epochs: {stage['warmup_epochs']} is more than {prefix}.epochs "
                            f"({epochs})", f"{prefix}.warmup_epochs", f"{prefix}.epochs")
    if stage["schedule"] == "step":
        milestones = stage.get("milestones", [])
        if not milestones:
            raise origins.error(f"{prefix}.milestones: schedule 'step' needs milestones, e.g. [30, 80]",
                                f"{prefix}.milestones", f"{prefix}.schedule")
        if milestones[-1] >= epochs:
            raise origins.error(f"{prefix}.milestones: milestone {milestones[-1]} is not below {prefix}.epochs "
                                f"({epochs})", f"{prefix}.milestones", f"{prefix}.epochs")
    if stage.get("nesterov") and stage["momentum"] == 0:
        raise origins.error(f"{prefix}.nesterov: needs momentum > 0", f"{prefix}.nesterov", f"{prefix}.momentum")


def _build(raw: dict, origins: _Origins, default_name: str) -> Recipe:
    checked = _check_section(raw, _TOP, "", origins)
    for stage in ("weights", "finetune"):
        _check_stage(checked[stage], stage, origins)
    arch = checked["architecture"]
    start, end = arch.get("delta_start", 1.0), arch.get("delta_end", 1e4)
    if end < start:
        raise origins.error(f"architecture.delta_end: {end:g} is below architecture.delta_start ({start:g})",
                            "architecture.delta_end", "architecture.delta_start")
    if arch.get("block_cost", 0.0) > 0 and arch.get("penalty_weight", "channels") != "flops":
        raise origins.error("architecture.block_cost: is counted in MACs, so it needs architecture.penalty_weight: "
                            "flops", "architecture.block_cost", "architecture.penalty_weight")
    checked.setdefault("name", default_name)
    checked["weights"] = StageRecipe(**checked["weights"])
    checked["finetune"] = StageRecipe(**checked["finetune"])
    checked["architecture"] = ArchRecipe(**arch)
    return Recipe(**checked, origin=origins.file)


# --------------------------------------------------------------------------- loading

def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []


def _resolve(name_or_path: str | None) -> Path:
    if name_or_path is None:
        name_or_path = DEFAULT_RECIPE
    text = str(name_or_path)
    looks_like_path = "/" in text or "\\" in text or text.endswith((".yaml", ".yml"))
    if looks_like_path:
        path = Path(text).expanduser()
        if not path.is_file():
            raise NasdslError(f"recipe file {text} does not exist" if not path.exists()
                              else f"recipe {text} is not a file", file="--recipe")
        return path
    path = RECIPES_DIR / f"{text}.yaml"
    if not path.is_file():
        known = available_recipes()
        raise NasdslError(f"unknown recipe '{text}'{did_you_mean(text, known)}; known: {', '.join(known)} "
                          f"(or give a path to a .yaml file)", file="--recipe")
    return path


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        try:
            return str(path.resolve().relative_to(RECIPES_DIR.parent))
        except ValueError:
            return str(path)


def _parse_yaml(text: str, file: str):
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
    for dotted, text in overrides.items():
        parts = [p.strip() for p in str(dotted).split(".")]
        if not all(parts):
            raise NasdslError(f"{dotted}: expected a dotted key such as architecture.lambda_a", file="--set")
        try:
            value = yaml.safe_load(text) if isinstance(text, str) else text
        except yaml.YAMLError:
            value = text  # not YAML: keep the text; validation says what was expected
        schema: dict = _TOP
        target = raw
        for i, part in enumerate(parts):
            path = ".".join(parts[: i + 1])
            if part not in schema:
                raise NasdslError(f"{path}: unknown key{did_you_mean(part, schema)}; known keys"
                                  f"{' in ' + '.'.join(parts[:i]) if i else ''}: {', '.join(schema)}",
                                  file="--set")
            kind = schema[part][0]
            last = i == len(parts) - 1
            if not last:
                if not isinstance(kind, dict):
                    raise NasdslError(f"{path}: is a value, not a section", file="--set")
                if not isinstance(target.get(part), dict):
                    target[part] = {}
                target, schema = target[part], kind
                continue
            if isinstance(kind, dict):
                if not isinstance(value, dict):
                    raise NasdslError(f"{path}: is a section; set its keys ({path}.KEY=VALUE)", file="--set")
                target.setdefault(part, {})
                if not isinstance(target[part], dict):
                    target[part] = {}
                target[part].update(value)
                origins.overridden.update(f"{path}.{k}" for k in value)
            else:
                target[part] = value
            origins.overridden.add(path)


def load_recipe(name_or_path: str | None = None, overrides: dict[str, str] | None = None) -> Recipe:
    """Load and validate a recipe: None -> recipes/cpu.yaml; a bare name -> recipes/NAME.yaml; or a path.

    `overrides` maps dotted keys to YAML text (`{"architecture.lambda_a": "1e-4"}`, from `--set`);
    they are applied on top of the file and validated like it, errors attributed to `--set`."""
    path = _resolve(name_or_path)
    file = _display(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise NasdslError(f"cannot read recipe: {exc}", file=file) from None
    node, raw = _parse_yaml(text, file)
    if raw is None:
        raw = {}
    origins = _Origins(file)
    if isinstance(raw, dict):
        _collect_marks(node, "", origins.marks)
        raw = copy.deepcopy(raw)
    if isinstance(raw, dict):
        _apply_overrides(raw, overrides or {}, origins)
    return _build(raw, origins, path.stem)


def recipe_from_dict(data: dict, *, file: str = "recipe") -> Recipe:
    """Rebuild a recipe from `Recipe.to_dict()` output (a run manifest), with the same validation."""
    origins = _Origins(file)
    return _build(copy.deepcopy(data), origins, str(data.get("name", "recipe")) if isinstance(data, dict) else "")
