"""`nasdsl search --init FILE`: a trained network's weights start the search. The file is read without
running pickled code, checked completely against the space before anything is written, loaded so the
supernet (gates disabled) computes the trained network exactly, recorded in the manifest, and
`weights.epochs: 0` then makes the summary's baseline the trained network's own accuracy."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import nasdsl
from nasdsl import cli
from nasdsl.recipe import load_recipe
from nasdsl.train.data import build_data

from cli_helpers import run_nasdsl

pytestmark = pytest.mark.usefixtures("one_thread")

#: on the CPU in fp32 wherever the tests run: accuracies and logits are compared with fp32 CPU results
SHORT = ["--data", "fake", "--device", "cpu", "--set", "resolution=8", "--set", "batch_size=32",
         "--set", "weights.epochs=0", "--set", "architecture.epochs=1", "--set", "finetune.epochs=1", "-q"]


@pytest.fixture(scope="module")
def trained(space):
    """The tiny space's plain network trained a little on the fake data: well above chance, so an
    accuracy equal to its own is not a coincidence, and with BN statistics that are not the defaults."""
    torch.manual_seed(0)
    model = nasdsl.build(nasdsl.compile(space, input=3, resolution=8, classes=10))
    train = build_data("fake", 8).train
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(4):
        for x, y in torch.utils.data.DataLoader(train, batch_size=32, shuffle=True):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def files(trained, tmp_path_factory) -> dict[str, Path]:
    """Its state dict as safetensors, and as a training checkpoint that torch.save wrote."""
    folder = tmp_path_factory.mktemp("init")
    state = {k: v.detach().clone().contiguous() for k, v in trained.state_dict().items()}
    save_file(state, str(folder / "tiny.safetensors"))
    torch.save({"state_dict": state, "epoch": 4}, folder / "tiny.pt")
    return {"safetensors": folder / "tiny.safetensors", "pt": folder / "tiny.pt"}


def val_accuracy(model: torch.nn.Module) -> float:
    """Top-1 on the fake validation images, computed here rather than by nasdsl's evaluator."""
    val = build_data("fake", 8).val
    x = torch.stack([val[i][0] for i in range(len(val))])
    y = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).float().mean().item()


def search(capsys, space, *args) -> tuple[int, str]:
    rc = cli.main(["search", str(space), *map(str, args)])
    return rc, capsys.readouterr().err


def one_line(rc: int, err: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the search from trained weights --------------------------------------------------------------
@pytest.mark.parametrize("kind, strategy", [("safetensors", "sequential"), ("pt", "joint")])
def test_baseline_is_the_trained_networks_own_accuracy(capsys, space, trained, files, kind, strategy, tmp_path):
    out = tmp_path / "run"
    sets = ["--set", f"strategy={strategy}"] + (["--set", "weights.epochs=1"] if strategy == "joint" else [])
    rc, err = search(capsys, space, "--init", files[kind], "--out", out, *SHORT, *sets)
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    expected = val_accuracy(trained)
    assert expected > 0.3  # trained: far from the 0.1 of a random network
    assert summary["baseline"]["top1"] == pytest.approx(expected, abs=1e-9)
    assert summary["derived"]["top1"] >= 0 and summary["stages"]["finetune"]["epochs"] == 1
    if strategy == "sequential":
        assert summary["stages"]["weights"] == {"epochs": 0, "seconds": pytest.approx(0, abs=1.0)}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["init"] == {"path": str(files[kind]), "sha256": sha256(files[kind])}


@pytest.mark.parametrize("placement", ["after_bn", "before_bn", "after_act"])
def test_supernet_after_init_computes_the_plain_network(space, trained, files, placement, tmp_path):
    """Gates disabled, the supernet is the plain network: its gated BNs keep the plain names, and a
    placement that moves the gates renumbers the ops it moves past (loaded by their new numbers)."""
    from nasdsl.pipeline.plan import RunRequest, make_plan
    from nasdsl.pipeline.runner import Pipeline

    sets = {"resolution": "8", "batch_size": "32", "gate_placement": placement, "architecture.block_cost": "1000",
            "architecture.penalty_weight": "flops"}  # depth gates too: more parameters the file lacks
    pipeline = Pipeline(make_plan(RunRequest(space=space, sets=sets, data="fake", out=tmp_path / "run",
                                             device="cpu", progress=False, init=files["safetensors"])))
    pipeline.setup()
    model = pipeline.model.eval()
    assert model.gate_set.state.mode == "disabled" and model.gate_set.depth_gates
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model(x), trained(x), atol=1e-5, rtol=0)
    pipeline.folder.close()


CUTS = """
space cuts(input=3, resolution=4, classes=10)
layer stem [gate=off] = conv(8, k=3, stride=2) > bn > relu
layer a = mbconv(8, k=7, e=2) | mbconv(8, k=3, e=2)
layer down = mbconv(16, k=5, e=2, stride=2)
layer classifier = gap > linear(classes)
"""


def test_a_run_cuts_kernels_to_their_maps_and_cuts_the_init_file_alike(tmp_path):
    """On a 2x2 map a 7x7 kernel reaches its middle 3x3, a 5x5 with stride 2 too. The run builds its supernet so, says so in a note, and a weights file of the network as written
    loads into it (cut alike) and computes exactly what that network computes."""
    from cli_helpers import distinct_bn
    from nasdsl.pipeline.plan import RunRequest, make_plan
    from nasdsl.pipeline.runner import Pipeline

    space = tmp_path / "cuts.space"
    space.write_text(CUTS)
    torch.manual_seed(0)
    written = nasdsl.build(nasdsl.compile(space)).eval()
    distinct_bn(written)
    save_file({k: v.contiguous() for k, v in written.state_dict().items()}, str(tmp_path / "w.safetensors"))
    plan = make_plan(RunRequest(space=space, sets={"batch_size": "32", "resolution": "4"}, data="fake", out=tmp_path / "run",
                                device="cpu", progress=False, init=tmp_path / "w.safetensors"))
    assert any(n.startswith("2 conv kernel(s) are larger than the maps they slide over") for n in plan.notes)
    kernels = [op.attrs["k"] for _, block in plan.network.blocks() for op in block.ops
               if op.kind == "conv" and op.attrs["groups"] > 1]
    # a's 7x7 cut to 3x3 on a 2x2 map (its 3x3 stays); down's 5x5 with stride 2 on a 2x2 map reaches
    # taps 2 and 3 of 0..4, so it keeps the middle 3x3
    assert kernels == [3, 3, 3], kernels
    pipeline = Pipeline(plan)
    pipeline.setup()
    model = pipeline.model.eval()
    x = torch.randn(16, 3, 4, 4)
    with torch.no_grad():
        assert torch.allclose(model(x), written(x), atol=1e-5, rtol=0)
    pipeline.folder.close()


# ---- files that do not fit, or cannot be read ---------------------------------------------------------
def _drop_one(state):
    state.pop("layers.2.blocks.0.ops.0.weight")


def _wrong_shape(state):
    state["classifier.weight"] = torch.zeros(10, 15)


def _extra(state):
    state["layers.9.extra.weight"] = torch.zeros(3)


@pytest.mark.parametrize("change, expected", [
    (_drop_one, "1 missing (first: layers.2.blocks.0.ops.0.weight [16, 8, 3, 3])"),
    (_wrong_shape, "1 mis-shaped (first: classifier.weight [10, 15] in the file, [10, 16] in the space)"),
    (_extra, "1 unexpected (first: layers.9.extra.weight [3])"),
], ids=["missing", "shape", "unexpected"])
def test_a_state_dict_that_does_not_fit_is_one_line_and_writes_nothing(capsys, space, trained, tmp_path, change,
                                                                       expected):
    state = dict(trained.state_dict())
    change(state)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    out = tmp_path / "run"
    line = one_line(*search(capsys, space, "--init", bad, "--out", out, *SHORT))
    assert line == f"{bad}: does not fit {space}: {expected}"
    assert not out.exists()


def test_a_bad_file_never_touches_an_existing_run(space, trained, files, tmp_path):
    """Through the real command: exit 2, one line, and the run it was to resume is as it was."""
    out = tmp_path / "run"
    assert run_nasdsl("search", space, "--init", files["safetensors"], "--out", out, *SHORT).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    state = dict(trained.state_dict())
    state.pop("classifier.bias")
    bad = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(bad))
    proc = run_nasdsl("search", space, "--init", bad, "--out", out, "--resume", *SHORT, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"{bad}: does not fit {space}: 1 missing (first: classifier.bias [10])"
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


class RunsCode:
    """Unpickling this runs a shell command: what weights_only must never do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_unreadable_files_are_one_line_errors(capsys, space, trained, tmp_path):
    out = tmp_path / "run"
    missing = tmp_path / "missing.pt"
    assert one_line(*search(capsys, space, "--init", missing, "--out", out, *SHORT)) == f"{missing}: no such file"

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file" * 8)
    line = one_line(*search(capsys, space, "--init", corrupt, "--out", out, *SHORT))
    assert line.startswith(f"{corrupt}: corrupt or not a torch file (") and "PyTorch" not in line  # torch's reason

    truncated = tmp_path / "truncated.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:100])
    assert one_line(*search(capsys, space, "--init", truncated, "--out", out, *SHORT)).startswith(
        f"{truncated}: corrupt weights file")

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({**trained.state_dict(), "payload": RunsCode(marker)}, evil)
    line = one_line(*search(capsys, space, "--init", evil, "--out", out, *SHORT))
    assert line.startswith(f"{evil}: holds a Python object (") and "never" in line
    assert not marker.exists()

    not_tensors = tmp_path / "numbers.pt"
    torch.save({"epoch": 3, "lr": 0.1}, not_tensors)
    assert one_line(*search(capsys, space, "--init", not_tensors, "--out", out, *SHORT)).startswith(
        f"{not_tensors}: holds no state dict")
    assert not out.exists()


# ---- the manifest and --resume ------------------------------------------------------------------------
def test_resume_needs_the_same_init(capsys, space, files, tmp_path):
    out = tmp_path / "run"
    assert search(capsys, space, "--init", files["safetensors"], "--out", out, *SHORT)[0] == 0
    recorded = sha256(files["safetensors"])
    assert json.loads((out / "manifest.json").read_text())["init"]["sha256"] == recorded

    line = one_line(*search(capsys, space, "--init", files["pt"], "--out", out, "--resume", *SHORT))
    assert line == (f"{out}: this run started from --init {files['safetensors']} (sha256 {recorded[:12]}); resume it "
                    f"with the same --init, not {files['pt']} (sha256 {sha256(files['pt'])[:12]})")
    line = one_line(*search(capsys, space, "--out", out, "--resume", *SHORT))
    assert line.endswith("resume it with the same --init")

    moved = tmp_path / "moved.safetensors"  # the same bytes elsewhere: the same weights
    moved.write_bytes(files["safetensors"].read_bytes())
    rc, err = search(capsys, space, "--init", moved, "--out", out, "--resume", *SHORT)
    assert rc == 0, err  # finished: the checkpoint's (derived) weights are restored, the init is not loaded

    plain_run = tmp_path / "plain"
    assert search(capsys, space, "--out", plain_run, *SHORT, "--set", "weights.epochs=1")[0] == 0
    line = one_line(*search(capsys, space, "--init", moved, "--out", plain_run, "--resume", *SHORT,
                            "--set", "weights.epochs=1"))
    assert line == f"{plain_run}: this run started from random weights (no --init); resume it without --init"


# ---- the plan and the recipe ---------------------------------------------------------------------------
def test_no_weights_stage_without_init_is_a_note(capsys, space, files):
    assert cli.main(["search", str(space), *SHORT, "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["init"] is None and [s["epochs"] for s in plan["stages"]] == [0, 1, 1]
    assert any("weights.epochs is 0 and there is no --init" in note for note in plan["notes"])

    assert cli.main(["search", str(space), *SHORT, "--init", str(files["pt"]), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["init"] == {"path": str(files["pt"]), "sha256": sha256(files["pt"])}
    assert not any("--init" in note for note in plan["notes"])


def test_pretrained_imagenet_recipe(capsys, space, files):
    recipe = load_recipe("pretrained_imagenet")
    assert recipe.weights.epochs == 0 and recipe.strategy == "sequential"
    assert recipe.data.startswith("imagefolder:") and recipe.resolution == 224
    paper = load_recipe("resnet50_imagenet")
    assert 0 < recipe.architecture.epochs < paper.architecture.epochs
    assert recipe.finetune.epochs < paper.finetune.epochs and recipe.finetune.lr < paper.finetune.lr
    assert cli.main(["recipes"]) == 0
    assert "pretrained_imagenet" in [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    # it plans a search from trained weights (the tiny space and fake data stand in for ImageNet)
    assert cli.main(["search", str(space), "--recipe", "pretrained_imagenet", "--data", "fake", "--set",
                     "resolution=8", "--init", str(files["safetensors"]), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["recipe"] == "pretrained_imagenet" and plan["stages"][0] == {
        "name": "weights", "epochs": 0, "steps_per_epoch": 1}
