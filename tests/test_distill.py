"""Distillation while finetuning (recipe `finetune.distill`): the loss is Hinton's, the teacher is the
stage-1 network exactly (or a checked weights file), and bad settings are one-line errors."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import nasdsl
from nasdsl import cli
from nasdsl.errors import NasdslError
from nasdsl.pipeline.plan import RunRequest, make_plan
from nasdsl.pipeline.runner import Pipeline
from nasdsl.recipe import load_recipe
from nasdsl.train.distill import distillation_loss


pytestmark = pytest.mark.usefixtures("one_thread")

SETS = {"resolution": "8", "batch_size": "32", "weights.epochs": "1", "architecture.epochs": "1",
        "finetune.epochs": "1", "finetune.distill.weight": "0.5"}


def test_the_loss_is_hintons():
    torch.manual_seed(0)
    student, teacher, y = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10), torch.randint(0, 10, (8,))
    ce = F.cross_entropy(student, y)
    assert torch.equal(distillation_loss(student, teacher, ce, 0.0, 4.0), ce)
    assert torch.allclose(distillation_loss(student, student.detach(), ce, 0.3, 4.0), 0.7 * ce, atol=1e-6)
    T = 2.0
    p, log_q = F.softmax(teacher / T, 1), F.log_softmax(student / T, 1)
    by_hand = 0.5 * ce + 0.5 * T * T * (p * (p.log() - log_q)).sum(1).mean()
    assert torch.allclose(distillation_loss(student, teacher, ce, 0.5, T), by_hand, atol=1e-6)


def test_the_teacher_is_the_stage1_network(space, tmp_path):
    """After the weights stage, the teacher computes what the supernet with its gates disabled does,
    even after the architecture stage has moved the supernet's BN statistics."""
    pipeline = Pipeline(make_plan(RunRequest(space=space, sets=SETS, data="fake", out=tmp_path / "run",
                                             progress=False)))
    pipeline.setup()
    pipeline.weights()
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        stage1 = pipeline.model.eval()(x)
    pipeline.architecture()
    hooks = pipeline.distillation()
    with torch.no_grad():
        assert torch.equal(hooks.teacher(x), stage1)
    assert hooks.weight == 0.5 and hooks.temperature == 4.0
    pipeline.folder.close()


def test_a_search_with_distillation_finishes(space, tmp_path):
    out = tmp_path / "run"
    argv = ["search", str(space), "--data", "fake", "--out", str(out), "-q", "--device", "cpu"]
    assert cli.main([*argv, *[x for k, v in SETS.items() for x in ("--set", f"{k}={v}")]]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"]["finetune"]["distill"] == {"teacher": "supernet", "weight": 0.5, "temperature": 4.0}
    assert summary["derived"]["top1"] >= 0


def test_a_teacher_file_is_checked_by_the_plan(space, tmp_path):
    model = nasdsl.build(nasdsl.compile(space, input=3, resolution=8, classes=10))
    good = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(good))
    plan = make_plan(RunRequest(space=space, sets={**SETS, "finetune.distill.teacher": str(good)}, data="fake",
                                out=tmp_path / "a", progress=False))
    assert plan.teacher is not None and plan.teacher.path == good
    with pytest.raises(NasdslError, match="no such file"):
        make_plan(RunRequest(space=space, sets={**SETS, "finetune.distill.teacher": str(tmp_path / "none.pt")},
                             data="fake", out=tmp_path / "b", progress=False))
    with pytest.raises(NasdslError, match="'supernet' is the stage-1 network, which the joint strategy does not have"):
        make_plan(RunRequest(space=space, sets={**SETS, "strategy": "joint"}, data="fake", out=tmp_path / "c",
                             progress=False))
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize("key, value, expected", [
    ("finetune.distill.wieght", "0.5", "unknown key (did you mean 'weight'?)"),
    ("finetune.distill.weight", "1.5", "expected a number in [0, 1], got 1.5"),
    ("finetune.distill.temperature", "0", "expected a number > 0, got 0"),
])
def test_bad_settings_are_one_line(key, value, expected):
    with pytest.raises(NasdslError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]").replace("?", r"\?")):
        load_recipe(None, {key: value})
    assert load_recipe(None).finetune.distill is None     # off unless asked
