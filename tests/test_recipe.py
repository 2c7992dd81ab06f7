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
    assert "5 minutes on 2 CPU cores" in (RECIPES_DIR / "cpu.yaml").read_text()


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
     "architecture.penalty_weight: 'macs' is not allowed; choose one of: auto, channels, flops, params"),
    ("  bn: frozen\n", "  bn: frozen\n  channel_multiple: 0\n",
     "architecture.channel_multiple: expected 'auto' or an integer >= 1, got 0"),
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


# --------------------------------------------------------------------------- precision, compile, augmentation

NEW_KEYS = """\
precision: auto
compile: false
augmentation:
  scale: auto
  ratio: [0.75, 1.3333333]
  hflip: auto
  auto_augment: none
  re_prob: 0
"""


def located(path: Path, message: str, key_line: str) -> None:
    """The message points at FILE:LINE:COL of the (first) line holding `key_line`'s key."""
    lines = path.read_text().splitlines()
    line = next(i for i, l in enumerate(lines, 1) if l.lstrip().startswith(key_line))
    column = len(lines[line - 1]) - len(lines[line - 1].lstrip()) + 1
    assert message.startswith(f"{path}:{line}:{column}: "), (message, line, column)


def test_new_keys_default_when_left_out(tmp_path):
    recipe = load_recipe(str(write(tmp_path, MINIMAL)))
    assert recipe.precision == "auto" and recipe.compile is False
    aug = recipe.augmentation
    assert isinstance(aug, AugmentRecipe)
    assert (aug.scale, aug.ratio, aug.hflip, aug.auto_augment, aug.re_prob) == (None, (0.75, 1.3333333), None, None, 0.0)
    # spelling the defaults out changes nothing, and the defaults dump back as the words a file uses
    spelled = load_recipe(str(write(tmp_path, MINIMAL + NEW_KEYS, "spelled.yaml")))
    assert spelled == recipe
    assert recipe.to_dict()["augmentation"] == {"scale": "auto", "ratio": [0.75, 1.3333333], "hflip": "auto",
                                                "auto_augment": "none", "re_prob": 0.0}
    assert (recipe.to_dict()["precision"], recipe.to_dict()["compile"]) == ("auto", False)
    # the shipped cpu recipe takes the defaults too
    cpu = load_recipe("cpu")
    assert (cpu.precision, cpu.compile, cpu.augmentation) == ("auto", False, AugmentRecipe())


@pytest.mark.parametrize("old, new, attribute, expect", [
    ("precision: auto", "precision: bf16", "precision", "bf16"),
    ("precision: auto", "precision: fp16", "precision", "fp16"),
    ("compile: false", "compile: true", "compile", True),
    ("scale: auto", "scale: [0.08, 1]", "augmentation.scale", (0.08, 1.0)),
    ("scale: auto", "scale: [0.5, 0.5]", "augmentation.scale", (0.5, 0.5)),
    ("scale: auto", "scale: ['1e-1', 1]", "augmentation.scale", (0.1, 1.0)),
    ("ratio: [0.75, 1.3333333]", "ratio: [1, 1]", "augmentation.ratio", (1.0, 1.0)),
    ("hflip: auto", "hflip: 0", "augmentation.hflip", 0.0),
    ("hflip: auto", "hflip: 1", "augmentation.hflip", 1.0),
    ("auto_augment: none", "auto_augment: rand", "augmentation.auto_augment", "rand-m9-mstd0.5"),
    ("auto_augment: none", "auto_augment: trivial", "augmentation.auto_augment", "trivialaugment"),
    ("auto_augment: none", "auto_augment: rand-m7-n3-mstd1", "augmentation.auto_augment", "rand-m7-n3-mstd1"),
    ("auto_augment: none", "auto_augment: augmix-m5-w4", "augmentation.auto_augment", "augmix-m5-w4"),
    ("re_prob: 0", "re_prob: 0.25", "augmentation.re_prob", 0.25),
    ("re_prob: 0", "re_prob: 1e-1", "augmentation.re_prob", 0.1),  # YAML 1.1 reads 1e-1 as a string
])
def test_new_keys_good_values(tmp_path, old, new, attribute, expect):
    text = MINIMAL + NEW_KEYS
    assert old in text
    recipe = load_recipe(str(write(tmp_path, text.replace(old, new, 1))))
    value = recipe
    for part in attribute.split("."):
        value = getattr(value, part)
    assert value == expect and type(value) is type(expect)
    again = recipe_from_dict(json.loads(json.dumps(recipe.to_dict())))  # a manifest round trip
    assert again == recipe


@pytest.mark.parametrize("old, new, expect", [
    ("precision: auto", "precision: fp8",
     "precision: 'fp8' is not allowed; choose one of: auto, fp32, bf16, fp16"),
    ("precision: auto", "precision: bf61", "precision: 'bf61' is not allowed (did you mean 'bf16'?)"),
    ("compile: false", "compile: 1", "compile: expected true or false, got 1"),
    ("compile: false", "compile: maybe", "compile: expected true or false, got 'maybe'"),
    ("scale: auto", "scale: [0, 1]", "augmentation.scale: expected 'auto' or [lo, hi] with 0 < lo <= hi <= 1, "
                                     "got [0, 1]"),
    ("scale: auto", "scale: [0.9, 0.5]", "augmentation.scale: expected 'auto' or [lo, hi]"),
    ("scale: auto", "scale: [0.5, 1.5]", "got [0.5, 1.5]"),
    ("scale: auto", "scale: [0.5]", "augmentation.scale: expected 'auto' or [lo, hi]"),
    ("scale: auto", "scale: big", "augmentation.scale: expected 'auto' or [lo, hi] with 0 < lo <= hi <= 1, got 'big'"),
    ("ratio: [0.75, 1.3333333]", "ratio: [0, 1]", "augmentation.ratio: expected [lo, hi] with 0 < lo <= hi, got [0, 1]"),
    ("ratio: [0.75, 1.3333333]", "ratio: [2, 1]", "augmentation.ratio: expected [lo, hi] with 0 < lo <= hi"),
    ("ratio: [0.75, 1.3333333]", "ratio: auto", "augmentation.ratio: expected [lo, hi] with 0 < lo <= hi, got 'auto'"),
    ("hflip: auto", "hflip: 1.5", "augmentation.hflip: expected 'auto' or a probability in [0, 1], got 1.5"),
    ("hflip: auto", "hflip: -0.1", "augmentation.hflip: expected 'auto' or a probability in [0, 1], got -0.1"),
    ("hflip: auto", "hflip: sometimes", "got 'sometimes'"),
    ("auto_augment: none", "auto_augment: randaugment",
     "augmentation.auto_augment: 'randaugment' is not allowed; choose one of: none, rand, trivial, or a timm string "
     "starting with rand-, augmix or trivialaugment"),
    ("auto_augment: none", "auto_augment: trivail", "'trivail' is not allowed (did you mean 'trivial'?)"),
    ("auto_augment: none", "auto_augment: 3", "augmentation.auto_augment: 3 is not allowed"),
    ("re_prob: 0", "re_prob: 1", "augmentation.re_prob: expected a number in [0, 1), got 1"),
    ("re_prob: 0", "re_prob: -0.5", "augmentation.re_prob: expected a number in [0, 1), got -0.5"),
    ("hflip: auto", "hflp: auto", "augmentation.hflp: unknown key (did you mean 'hflip'?); known keys in "
                                  "augmentation: scale, ratio, hflip, auto_augment, re_prob"),
    ("precision: auto", "precison: auto", "precison: unknown key (did you mean 'precision'?)"),
    ("augmentation:\n", "augmentation: 3\nold_augmentation:\n", "augmentation: expected a mapping of keys, got int"),
])
def test_new_keys_bad_values_are_located(tmp_path, old, new, expect):
    text = MINIMAL + NEW_KEYS
    assert old in text
    path = write(tmp_path, text.replace(old, new, 1))
    message = error(str(path))
    assert expect in message
    located(path, message, new.split(":")[0] + ":")


def test_new_keys_overrides():
    recipe = load_recipe("cpu", {"augmentation.hflip": "0.5", "augmentation.scale": "[0.5,1.0]",
                                 "augmentation.auto_augment": "rand", "augmentation.re_prob": "0.25",
                                 "precision": "bf16", "compile": "true"})
    aug = recipe.augmentation
    assert (aug.hflip, aug.scale, aug.auto_augment, aug.re_prob) == (0.5, (0.5, 1.0), "rand-m9-mstd0.5", 0.25)
    assert recipe.precision == "bf16" and recipe.compile is True
    assert aug.ratio == (0.75, 1.3333333)  # untouched keys keep the file's values
    section = load_recipe("cpu", {"augmentation": "{hflip: 0, ratio: [1, 2]}"})
    assert section.augmentation.hflip == 0.0 and section.augmentation.ratio == (1.0, 2.0)
    assert load_recipe("cpu", {"augmentation.hflip": "auto"}).augmentation.hflip is None


@pytest.mark.parametrize("overrides, expect", [
    ({"augmentation.hflip": "2"}, "--set: augmentation.hflip: expected 'auto' or a probability in [0, 1], got 2"),
    ({"augmentation.scale": "[1.0, 0.5]"}, "--set: augmentation.scale: expected 'auto' or [lo, hi] with "
                                           "0 < lo <= hi <= 1, got [1.0, 0.5]"),
    ({"augmentation.flip": "1"}, "--set: augmentation.flip: unknown key (did you mean 'hflip'?); known keys in "
                                 "augmentation: scale, ratio, hflip, auto_augment, re_prob"),
    ({"augmentaton.hflip": "1"}, "--set: augmentaton: unknown key (did you mean 'augmentation'?)"),
    ({"augmentation.auto_augment": "rnd"}, "--set: augmentation.auto_augment: 'rnd' is not allowed (did you mean "
                                           "'rand'?)"),
    ({"augmentation": "{re_prob: 1}"}, "--set: augmentation.re_prob: expected a number in [0, 1), got 1"),
    ({"augmentation": "0.5"}, "--set: augmentation: is a section; set its keys"),
    ({"precision": "fp8"}, "--set: precision: 'fp8' is not allowed; choose one of: auto, fp32, bf16, fp16"),
    ({"compile": "yes please"}, "--set: compile: expected true or false, got 'yes please'"),
    ({"compile.mode": "max"}, "--set: compile: is a value, not a section"),
])
def test_new_keys_bad_overrides(overrides, expect):
    assert error("cpu", overrides).startswith(expect)


# --------------------------------------------------------------------------- the rest of the contract

def test_cross_field_checks_are_located(tmp_path):
    text = MINIMAL.replace("  bn: frozen\n", "  bn: frozen\n  penalty_weight: channels\n  block_cost: 5.0e+6\n")
    path = write(tmp_path, text)
    message = error(str(path))
    assert "architecture.block_cost: is counted in MACs, so it needs architecture.penalty_weight: flops or auto" \
        in message
    located(path, message, "block_cost:")
    for weight in ("flops", "auto"):
        ok = text.replace("penalty_weight: channels", f"penalty_weight: {weight}")
        assert load_recipe(str(write(tmp_path, ok, f"{weight}.yaml"))).architecture.block_cost == 5e6
    assert error("cpu", {"finetune.nesterov": "true", "finetune.momentum": "0"}) == \
        "--set: finetune.nesterov: needs momentum > 0"
    path = write(tmp_path, MINIMAL.replace("delta_end: 1.0e4", "delta_end: 0.5"), "d.yaml")
    located(path, error(str(path)), "delta_end:")


def test_missing_keys_are_listed_together(tmp_path):
    text = MINIMAL.replace("  lr: 0.05\n  schedule", "  schedule", 1).replace("  momentum: 0.9\n", "", 1)
    path = write(tmp_path, text)
    message = error(str(path))
    assert "weights.lr, weights.momentum: missing (required keys)" in message
    located(path, message, "weights:")  # at the section that lacks them


def test_first_error_in_the_file_is_reported(tmp_path):
    text = MINIMAL.replace("batch_size: 64", "batch_size: 0").replace("lambda_a: 5.0e-4", "lambda_a: -1")
    assert "batch_size: expected an integer >= 1, got 0" in error(str(write(tmp_path, text)))


def test_models_validate_direct_construction():
    # other modules and tests build sections directly: the same checks apply there
    stage = StageRecipe(epochs=10, lr="1e-1", schedule="step", momentum=0.9, weight_decay=0, milestones=[5])
    assert stage.lr == 0.1 and stage.gamma == 0.1 and stage.label_smoothing == 0.0
    with pytest.raises(ValueError, match="milestones: milestone 10 is not below epochs"):
        StageRecipe(epochs=10, lr=0.1, schedule="step", momentum=0.9, weight_decay=0, milestones=[10])
    with pytest.raises(ValueError, match="unknown|extra"):
        ArchRecipe(epochs=1, lr=0.1, momentum=0.9, lambda_a=0, lamda_a=1)
    assert AugmentRecipe(hflip=0.5, auto_augment="trivial").auto_augment == "trivialaugment"


def test_equality_ignores_origin_but_not_values(tmp_path):
    cpu = load_recipe("cpu")
    copy = load_recipe(str(write(tmp_path, (RECIPES_DIR / "cpu.yaml").read_text(), "cpu.yaml")))
    assert copy == cpu and copy.origin != cpu.origin
    assert load_recipe("cpu", {"augmentation.re_prob": "0.1"}) != cpu
    assert load_recipe("cpu", {"compile": "true"}) != cpu


def test_recipe_module_does_not_import_torch():
    code = "import sys, nasdsl.recipe; nasdsl.recipe.load_recipe(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
