"""Recipes: every shipped recipe loads, and every mistake is a located one-line NasdslError."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nasdsl.errors import NasdslError
from nasdsl.recipe import (RECIPES_DIR, ArchRecipe, AugmentRecipe, Recipe, StageRecipe, available_recipes,
                           describe_recipes, load_recipe, recipe_from_dict)

PAPER = ["vgg16_cifar", "resnet56_cifar", "mobilenetv2_cifar", "vgg16_imagenet", "resnet50_imagenet",
         "mobilenetv2_imagenet", "proxyless_imagenet"]


def test_every_recipe_loads_and_spells_out_every_key():
    assert set(PAPER + ["cpu"]) <= set(available_recipes())
    for name in available_recipes():
        recipe = load_recipe(name)
        assert isinstance(recipe, Recipe) and recipe.name == name
        raw = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())
        # shipped recipes never lean on defaults: the file is the whole story
        assert set(raw) == set(recipe.to_dict()), name
        for section in ("weights", "architecture", "finetune", "augmentation"):
            assert set(raw[section]) == set(recipe.to_dict()[section]), (name, section)
        assert recipe_from_dict(recipe.to_dict()) == recipe
        # every shipped yaml documents the new keys next to them
        text = (RECIPES_DIR / f"{name}.yaml").read_text()
        for words in ("auto | fp32 | bf16 | fp16", "torch.compile", "RandomResizedCrop", "trivialaugment"):
            assert words in text, (name, words)


def test_describe_recipes():
    described = dict(describe_recipes())
    assert list(described) == available_recipes()
    for name, line in described.items():
        first = (RECIPES_DIR / f"{name}.yaml").read_text().splitlines()[0]
        assert first.startswith("# ") and line == first[2:].strip(), name
        # a whole sentence on one line, not the first line of a paragraph
        assert 20 < len(line) <= 110 and line.endswith("."), (name, line)
    assert "digits" in described["cpu"] and "CIFAR-10" in described["vgg16_cifar"]


def test_default_recipe(tmp_path):
    recipe = load_recipe(None)
    assert recipe.name == "cpu" and recipe.origin.endswith("cpu.yaml")
    raw = yaml.safe_load((RECIPES_DIR / "cpu.yaml").read_text())
    assert recipe.data == "digits" and recipe.resolution == raw["resolution"] and recipe.seed == raw["seed"]
    assert (recipe.weights.epochs, recipe.architecture.epochs, recipe.finetune.epochs) == (
        raw["weights"]["epochs"], raw["architecture"]["epochs"], raw["finetune"]["epochs"])
    assert recipe.architecture.lambda_a == float(raw["architecture"]["lambda_a"])
    assert load_recipe(str(write(tmp_path, MINIMAL))).architecture.lambda_a == 5e-4
    assert "10 minutes on 2 CPU cores" in (RECIPES_DIR / "cpu.yaml").read_text()


def test_paper_numbers():
    vgg = load_recipe("vgg16_cifar")
    assert (vgg.weights.epochs, vgg.architecture.epochs, vgg.finetune.epochs) == (100, 20, 130)
    assert vgg.batch_size == 128 and vgg.weights.weight_decay == 1e-4 and vgg.weights.schedule == "constant"
    assert vgg.finetune.milestones == [30, 80] and vgg.architecture.lr == 0.1
    assert load_recipe("resnet56_cifar").batch_size == 64
    mb = load_recipe("mobilenetv2_cifar")
    assert (mb.weights.epochs, mb.finetune.epochs, mb.finetune.milestones) == (150, 180, [30, 105])
    assert mb.weights.weight_decay == 4e-5
    for name in ("vgg16_imagenet", "resnet50_imagenet"):
        r = load_recipe(name)
        assert (r.weights.epochs, r.architecture.epochs, r.finetune.epochs) == (30, 10, 70)
        assert r.architecture.lr == 0.01 and r.batch_size == 256 and r.resolution == 224
    mi = load_recipe("mobilenetv2_imagenet")
    assert (mi.weights.epochs, mi.architecture.epochs, mi.finetune.epochs) == (80, 10, 90)
    assert mi.weights.schedule == "cosine" and mi.weights.weight_decay == 4e-5
    px = load_recipe("proxyless_imagenet")
    assert (px.weights.epochs, px.architecture.epochs, px.finetune.epochs) == (100, 10, 110)
    assert px.batch_size == 96 and px.weights.lr == 0.05 and px.weights.schedule == "cosine"
    assert px.finetune.weight_decay == 4e-5 and px.architecture.lambda_a == 6e-5
    for name in PAPER:
        r = load_recipe(name)
        a = r.architecture
        assert (a.delta_start, a.delta_end, a.penalty, r.strategy) == (1.0, 1e4, "scaled", "sequential")
        assert "section V-" in (RECIPES_DIR / f"{name}.yaml").read_text()


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# A fixed recipe for the validation tests, so that tuning the shipped defaults never breaks them.
MINIMAL = """\
name: cpu
data: digits
resolution: 32
batch_size: 64
workers: 0
seed: 0
gate_placement: after_bn
strategy: sequential

weights:
  epochs: 6             # a comment
  lr: 0.05
  schedule: cosine
  milestones: []
  gamma: 0.1
  momentum: 0.9
  weight_decay: 1.0e-4
  nesterov: false
  warmup_epochs: 0
  label_smoothing: 0.0

architecture:
  epochs: 2             # a comment
  lr: 0.05
  momentum: 0.9
  weight_decay: 0.0
  lambda_a: 5.0e-4
  delta_start: 1
  delta_end: 1.0e4
  delta_schedule: iteration
  penalty: scaled
  bn: frozen

finetune:
  epochs: 4             # a comment
  lr: 0.05
  schedule: cosine
  milestones: []
  gamma: 0.1
  momentum: 0.9
  weight_decay: 1.0e-4
  nesterov: false
  warmup_epochs: 0
  label_smoothing: 0.0
"""


def minimal() -> str:
    return MINIMAL


def error(*args, **kwargs) -> str:
    with pytest.raises(NasdslError) as info:
        load_recipe(*args, **kwargs)
    text = str(info.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_unknown_key_did_you_mean(tmp_path):
    path = write(tmp_path, minimal().replace("  lambda_a:", "  lamda_a:"))
    text = error(str(path))
    assert "architecture.lamda_a: unknown key (did you mean 'lambda_a'?)" in text
    line = next(i for i, l in enumerate(path.read_text().splitlines(), 1) if "lamda_a" in l)
    assert f"x.yaml:{line}:3: " in text

    text = error(str(write(tmp_path, minimal() + "batchsize: 3\n", "y.yaml")))
    assert "batchsize: unknown key (did you mean 'batch_size'?)" in text
    assert "unknown key" in error(str(write(tmp_path, minimal() + "zzz: 1\n", "z.yaml")))


def test_display_path_relative_to_working_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    path = Path("sub") / "mine.yaml"
    path.write_text(minimal().replace("  lambda_a:", "  lamda_a:"))
    line = next(i for i, l in enumerate(path.read_text().splitlines(), 1) if "lamda_a" in l)
    text = error(str(path))
    assert text.startswith(f"sub/mine.yaml:{line}:3: architecture.lamda_a: unknown key (did you mean 'lambda_a'?)")
    # a shipped recipe read from elsewhere is named inside the package
    assert load_recipe("cpu").origin == "recipes/cpu.yaml"


@pytest.mark.parametrize("old, new, expect", [
    ("schedule: cosine", "schedule: cosin", "weights.schedule: 'cosin' is not allowed (did you mean 'cosine'?); "
                                            "choose one of: cosine, step, constant"),
    ("penalty: scaled", "penalty: both", "architecture.penalty: 'both' is not allowed; choose one of: scaled, unscaled"),
    ("bn: frozen", "bn: fixed", "choose one of: frozen, recalibrated, train"),
    ("gate_placement: after_bn", "gate_placement: after_relu", "choose one of: after_bn, before_bn, after_act"),
    ("strategy: sequential", "strategy: joint2", "did you mean 'joint'?"),
    ("delta_schedule: iteration", "delta_schedule: step", "choose one of: iteration, epoch"),
    ("  epochs: 6 ", "  epochs: -1 ", "weights.epochs: expected an integer >= 0, got -1"),
    ("  epochs: 6 ", "  epochs: 2.5 ", "weights.epochs: expected an integer >= 0, got 2.5"),
    ("  epochs: 6 ", "  epochs: true ", "weights.epochs: expected an integer >= 0, got True"),
    ("batch_size: 64", "batch_size: 0", "batch_size: expected an integer >= 1"),
    ("lambda_a: 5.0e-4", "lambda_a: -1", "architecture.lambda_a: expected a number >= 0, got -1"),
    ("lambda_a: 5.0e-4", "lambda_a: lots", "architecture.lambda_a: expected a number >= 0, got 'lots'"),
    ("  lr: 0.05\n  schedule", "  lr: 0\n  schedule", "weights.lr: expected a number > 0, got 0"),
    ("  momentum: 0.9\n  weight_decay: 0.0\n", "  momentum: 1.0\n  weight_decay: 0.0\n",
     "architecture.momentum: expected a number in [0, 1), got 1.0"),
    ("  nesterov: false", "  nesterov: maybe", "weights.nesterov: expected true or false"),
    ("delta_end: 1.0e4", "delta_end: 0.5", "architecture.delta_end: 0.5 is below architecture.delta_start (1)"),
    ("delta_start: 1", "delta_start: 0", "architecture.delta_start: expected a number > 0"),
    ("  bn: frozen\n", "  bn: frozen\n  penalty_weight: macs\n",
     "architecture.penalty_weight: 'macs' is not allowed; choose one of: channels, flops"),
    ("  bn: frozen\n", "  bn: frozen\n  channel_multiple: 0\n",
     "architecture.channel_multiple: expected an integer >= 1, got 0"),
    ("  milestones: []\n  gamma: 0.1\n  momentum: 0.9\n  weight_decay: 1.0e-4\n  nesterov: false\n"
     "  warmup_epochs: 0\n  label_smoothing: 0.0\n\narch",
     "  milestones: [3, 2]\n  gamma: 0.1\n  momentum: 0.9\n  weight_decay: 1.0e-4\n  nesterov: false\n"
     "  warmup_epochs: 0\n  label_smoothing: 0.0\n\narch", "weights.milestones: expected a list of increasing"),
    ("  warmup_epochs: 0\n  label_smoothing: 0.0\n\narch", "  warmup_epochs: 9\n  label_smoothing: 0.0\n\narch",
     "weights.warmup_epochs: 9 is more than weights.epochs (6)"),
    ("label_smoothing: 0.0\n\narch", "label_smoothing: 1.5\n\narch", "weights.label_smoothing: expected a number in [0, 1)"),
    ("data: digits", "data: ''", "data: expected a non-empty string"),
    ("data: digits", "data: [1]", "data: expected a non-empty string"),
    ("weights:\n", "weights: 3\nold_weights:\n", "weights: expected a mapping of keys, got int"),
])
def test_bad_values(tmp_path, old, new, expect):
    text = minimal()
    assert old in text, old
    path = write(tmp_path, text.replace(old, new, 1))
    message = error(str(path))
    assert expect in message
    assert message.startswith(str(path)) or message.startswith(path.name) or "x.yaml:" in message


def test_step_schedule_needs_milestones_below_epochs(tmp_path):
    text = error("cpu", {"weights.schedule": "step"})
    assert text.startswith("--set: weights.milestones: schedule 'step' needs milestones")
    text = error("vgg16_cifar", {"finetune.epochs": "50"})
    assert text == "--set: finetune.milestones: milestone 80 is not below finetune.epochs (50)"
    # non-step schedules ignore milestones, so shortening a cosine run needs nothing else
    assert load_recipe("vgg16_cifar", {"finetune.epochs": "50", "finetune.schedule": "cosine"}).finetune.epochs == 50


def test_missing_keys(tmp_path):
    text = minimal().replace("  lambda_a: 5.0e-4\n", "")
    assert "architecture.lambda_a: missing (required key)" in error(str(write(tmp_path, text)))
    assert "missing" in error(str(write(tmp_path, "name: x\n", "b.yaml")))
    # optional keys take the paper's defaults
    text = minimal().replace("  penalty: scaled\n", "").replace("  bn: frozen\n", "")
    recipe = load_recipe(str(write(tmp_path, text, "c.yaml")))
    assert recipe.architecture.penalty == "scaled" and recipe.architecture.bn == "frozen"


def test_name_defaults_to_file_stem(tmp_path):
    text = minimal().replace("name: cpu\n", "")
    assert load_recipe(str(write(tmp_path, text, "mine.yaml"))).name == "mine"


def test_yaml_numbers_and_strings(tmp_path):
    # YAML 1.1 reads 1e-4 as a string: float fields accept it
    text = minimal().replace("lambda_a: 5.0e-4", "lambda_a: 1e-4").replace("lr: 0.05", "lr: '5e-2'", 1)
    recipe = load_recipe(str(write(tmp_path, text)))
    assert recipe.architecture.lambda_a == 1e-4 and recipe.weights.lr == 0.05
    assert isinstance(recipe.architecture.delta_start, float)


def test_overrides():
    recipe = load_recipe("cpu", {"architecture.lambda_a": "1e-4", "weights.epochs": "3", "seed": "7",
                                 "finetune.nesterov": "true", "data": "fake", "weights.milestones": "[1, 2]"})
    assert recipe.architecture.lambda_a == 1e-4 and recipe.weights.epochs == 3 and recipe.seed == 7
    assert recipe.finetune.nesterov is True and recipe.data == "fake" and recipe.weights.milestones == [1, 2]
    shipped = yaml.safe_load((RECIPES_DIR / "cpu.yaml").read_text())["architecture"]
    assert load_recipe("cpu").architecture.lambda_a == float(shipped["lambda_a"])  # the file is untouched
    section = load_recipe("cpu", {"architecture": "{lambda_a: 2.0e-4, penalty: unscaled}"})
    assert section.architecture.lambda_a == 2e-4 and section.architecture.penalty == "unscaled"
    assert section.architecture.epochs == shipped["epochs"]


@pytest.mark.parametrize("overrides, expect", [
    ({"architecture.lamda_a": "1"}, "--set: architecture.lamda_a: unknown key (did you mean 'lambda_a'?)"),
    ({"weigths.epochs": "1"}, "--set: weigths: unknown key (did you mean 'weights'?)"),
    ({"architecture.lambda_a": "abc"}, "--set: architecture.lambda_a: expected a number >= 0, got 'abc'"),
    ({"weights.schedule": "linear"}, "--set: weights.schedule: 'linear' is not allowed; choose one of"),
    ({"seed.x": "1"}, "--set: seed: is a value, not a section"),
    ({"weights": "3"}, "--set: weights: is a section"),
    ({"architecture..lr": "1"}, "--set: architecture..lr: expected a dotted key"),
    ({"architecture": "{lamda_a: 1}"}, "--set: architecture.lamda_a: unknown key (did you mean 'lambda_a'?)"),
])
def test_bad_overrides(overrides, expect):
    assert error("cpu", overrides).startswith(expect)


def test_recipe_lookup_errors(tmp_path):
    text = error("vgg16_cifra")
    assert text.startswith("--recipe: unknown recipe 'vgg16_cifra' (did you mean 'vgg16_cifar'?)")
    assert "cpu" in text
    assert "does not exist" in error(str(tmp_path / "none.yaml"))
    assert "invalid YAML" in error(str(write(tmp_path, "name: [unclosed\n")))
    assert "expected a mapping" in error(str(write(tmp_path, "- a\n- b\n", "list.yaml")))
    assert load_recipe(str(RECIPES_DIR / "cpu.yaml")) == load_recipe("cpu")


def test_dataclasses_are_typed():
    recipe = load_recipe("vgg16_cifar")
    assert isinstance(recipe.weights, StageRecipe) and isinstance(recipe.finetune, StageRecipe)
    assert isinstance(recipe.architecture, ArchRecipe)
    d = recipe.to_dict()
    assert d["architecture"]["lambda_a"] == 1e-4 and "origin" not in d
    yaml.safe_dump(d)  # manifest-ready plain data
