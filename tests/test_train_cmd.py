"""`nasdsl train`: a space's network trained as it is, with the recipe machinery of a search (plan
step, schedule, checkpoints, resume, --init, export) and a summary.json of a search's shape whose
`derived` row is the trained network."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import nasdsl
from nasdsl import cli
from nasdsl.graph.accounting import network_cost
from nasdsl.pipeline.plan import RunRequest, make_plan
from nasdsl.pipeline.runner import Pipeline
from nasdsl.supernet.network import NasNet
from nasdsl.train.data import build_data

from cli_helpers import ENV, TINY, run_nasdsl

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ["--data", "fake", "--set", "resolution=8", "--set", "batch_size=32", "--device", "cpu", "-q"]


def derived_space(folder):
    """The tiny space as derivation writes a derived network: both candidates kept, no gates."""
    path = folder / "derived.space"
    path.write_text(TINY.replace("layer choice =", "layer choice [gate=off] ="))
    return path


def val_accuracy(model) -> float:
    val = build_data("fake", 8).val
    x = torch.stack([val[i][0] for i in range(len(val))])
    y = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).float().mean().item()


def test_train_writes_a_run_whose_derived_row_is_the_trained_network(space, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", str(space), "--epochs", "3", "--out", str(out), *ARGS]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["baseline"] is None and summary["searched"] is None
    assert summary["stages"] == {"train": {"epochs": 3, "seconds": pytest.approx(summary["stages"]["train"]["seconds"])}}
    network = nasdsl.compile(space, input=3, resolution=8, classes=10)
    model = nasdsl.load(out)                                # the export of the trained network
    assert sum(p.numel() for p in model.parameters()) == summary["derived"]["params"]
    assert summary["derived"]["flops"] == network_cost(network).flops
    assert summary["derived"]["top1"] == pytest.approx(val_accuracy(model), abs=1e-9)
    assert summary["derived"]["top1"] > 0.2                 # it learned: chance is 0.1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["train"] * 3


def test_epochs_default_to_a_searchs_weight_training(space, tmp_path, capsys):
    assert cli.main(["train", str(space), "--out", str(tmp_path / "run"), "--dry-run", "--json", *ARGS[:-1]]) == 0
    plan = json.loads(capsys.readouterr().out)
    from nasdsl.recipe import load_recipe

    recipe = load_recipe(None)
    assert [s["name"] for s in plan["stages"]] == ["train"]
    assert plan["stages"][0]["epochs"] == recipe.weights.epochs + recipe.finetune.epochs


@pytest.mark.parametrize("argv, expected", [
    (["--epochs", "0"], "--epochs: must be at least 1, got 0"),
    (["--set", "weights.schedule=step", "--set", "weights.milestones=[3]", "--epochs", "2"],
     "--epochs: 2 epochs do not fit the weights stage's schedule"),
])
def test_impossible_epochs_are_one_line(space, tmp_path, capsys, argv, expected):
    rc = cli.main(["train", str(space), "--out", str(tmp_path / "run"), *ARGS, *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().startswith(expected) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_train_from_init_continues_the_given_weights(space, tmp_path):
    """--init loads the plain network's weights (no gates moved), then training goes on from them."""
    torch.manual_seed(0)
    start = nasdsl.build(nasdsl.compile(space, input=3, resolution=8, classes=10))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in start.state_dict().items()}, str(tmp_path / "w.safetensors"))
    out = tmp_path / "run"
    assert cli.main(["train", str(space), "--init", str(tmp_path / "w.safetensors"), "--epochs", "1",
                     "--set", "weights.lr=1e-30", "--set", "weights.weight_decay=0", "--set", "weights.momentum=0", "--out", str(out), *ARGS]) == 0
    trained = torch.load(out / "checkpoint.pt", weights_only=True)["model"]   # the plain network's names
    # lr 1e-30: every weight is the file's (BN statistics move with the batches, so they are left out)
    for key, value in start.state_dict().items():
        if "running" not in key and "num_batches" not in key:
            assert torch.allclose(trained[key], value, rtol=0, atol=1e-20), key


@pytest.mark.parametrize("gates", ["search space", "derived"])
def test_resume_after_sigkill_gives_the_same_weights(space, tmp_path, gates):
    """Killed after its first epoch and resumed: the same trained weights as a run never interrupted
    (a derived space's parallel blocks train as one block: resume must rebuild that form)."""
    if gates == "derived":
        space = derived_space(tmp_path)
    args = ["train", str(space), "--epochs", "4", *ARGS]
    reference = tmp_path / "reference"
    assert run_nasdsl(*args, "--out", reference).returncode == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "nasdsl", *args, "--out", str(out)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and '"epoch": 1' in metrics.read_text()):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
    assert run_nasdsl(*args, "--out", out, "--resume").returncode == 0
    a, b = (load_file(str(run / "model" / "model.safetensors")) for run in (out, reference))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    stages = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]
    assert stages == [0, 1, 2, 3]


def test_a_layers_parallel_blocks_train_as_one_and_the_run_keeps_the_spaces_weights(tmp_path):
    """A derived .space keeps a layer's candidates as parallel blocks (the tiny space has two):
    `nasdsl train` trains merge.train_form's network, one block per layer with fewer convs and the
    same function and gradients (tests/test_merge.py), while checkpoints and the export hold the
    space's own weights."""
    space = derived_space(tmp_path)
    request = RunRequest(space=space, sets={"resolution": "8", "batch_size": "32"}, data="fake",
                         out=tmp_path / "run", device="cpu", progress=False, train=True, epochs=1)
    pipeline = Pipeline(make_plan(request))
    pipeline.setup()
    plain = NasNet(pipeline.plan.network.to_config())
    convs = [sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) for model in (pipeline.model, plain)]
    assert convs[0] < convs[1]
    plain.load_state_dict(pipeline.model_state(), strict=True)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(pipeline.model.eval()(x), plain.eval()(x), atol=1e-5)
    pipeline.folder.close()
