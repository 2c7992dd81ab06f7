"""benchmarks/quality.py on a tiny space and the fake data: the rows and folders of --dnal-scratch
and --dnal-set, and a second variant reusing stage 1, the default DNAL and the baselines."""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_WIDTH = """
space tinyw(input=3, resolution=8, classes=10)
param width = 1.0
let ch(c) = round(c * width)
layer stem [gate=off] = conv(ch(8), k=3) > bn > relu
layer a = conv(ch(16), k=3) > bn > relu
layer b = conv(ch(16), k=3, stride=2) > bn > relu
layer classifier = gap > linear(classes)
"""


@pytest.fixture(scope="module")
def quality():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
    spec = importlib.util.spec_from_file_location("quality_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def argv(tmp_path: Path, *extra: str) -> list[str]:
    space = tmp_path / "tinyw.space"
    space.write_text(TINY_WIDTH)
    return ["--space", str(space), "--data", "fake", "--set", "resolution=8", "--set", "batch_size=64",
            "--budgets", "50%", "--seeds", "0", "--epochs", "1", "1", "1", "--work", str(tmp_path / "work"), *extra]


def test_variant_names_its_rows_and_folders(quality):
    args = argparse.Namespace(dnal_set=["architecture.lr=0.15", "bn=frozen"], distill=None,
                              masks_from_stage1=False, dnal_scratch=True)
    assert quality.variant(args) == ("@lr=0.15,bn=frozen", {"architecture.lr": "0.15", "bn": "frozen"})
    assert quality.methods(args) == ("dnal", "dnal_scratch", "dnal@lr=0.15,bn=frozen",
                                     "dnal_scratch@lr=0.15,bn=frozen", "width", "l1", "bn", "random")
    args.dnal_set = ["finetune.distill.teacher=a/b.safetensors"]
    assert quality.variant(args)[0] == "@finetune.distill.teacher=a_b.safetensors"


def test_scratch_and_variants_reuse_stage1_and_baselines(quality, tmp_path, monkeypatch):
    assert quality.main(argv(tmp_path, "--dnal-scratch", "--dnal-set", "architecture.lr=0.1")) == 0
    b = tmp_path / "work" / "seed0" / "flops50"
    report = json.loads((tmp_path / "work" / "quality@lr=0.1.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["dnal", "dnal_scratch", "dnal@lr=0.1", "dnal_scratch@lr=0.1", "width", "l1", "bn", "random"]
    for method in ("dnal", "dnal@lr=0.1"):
        assert json.loads((b / method / "summary.json").read_text())["recipe"]["architecture"]["lr"] == \
            (0.1 if "@" in method else 0.05)
        scratch = json.loads((b / method.replace("dnal", "dnal_scratch") / "summary.json").read_text())
        searched = json.loads((b / method / "summary.json").read_text())
        assert scratch["derived"]["flops"] == searched["derived"]["flops"]     # the same network, retrained
        assert list(scratch["stages"]) == ["train"] and scratch["stages"]["train"]["epochs"] == 3
    assert rows["dnal_scratch"]["flops"] == rows["dnal"]["flops"]

    ran = []
    real = quality.Pipeline
    monkeypatch.setattr(quality, "Pipeline", lambda plan: ran.append(plan.request.out.name) or real(plan))
    assert quality.main(argv(tmp_path, "--dnal-scratch", "--dnal-set", "architecture.bn=frozen")) == 0
    assert sorted(ran) == ["dnal@bn=frozen", "dnal_scratch@bn=frozen"]     # nothing else retrained
    assert (tmp_path / "work" / "quality@bn=frozen.png").is_file()
