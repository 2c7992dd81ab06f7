"""The DNAL search end to end on a tiny space and synthetic data: contract, stages, resume, DDP, errors."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nasdsl.derive.merge import train_form
from nasdsl.language.compiler import compile_file
from nasdsl.pipeline.plan import RunRequest, make_plan
from nasdsl.pipeline.runner import Pipeline
from nasdsl.search.dnal import settle_gates
from nasdsl.supernet.network import NasNet

from cli_helpers import ENV, TINY, run_nasdsl

# small and fast: 256 synthetic images, 8 steps an epoch
# pinned, not the default recipe's: the outcomes below (which layers survive) depend on them
SETTINGS = ["resolution=8", "batch_size=32", "weights.epochs=2", "weights.lr=0.05", "architecture.epochs=3",
            "finetune.epochs=1", "architecture.lambda_a=2e-3", "architecture.channel_multiple=1"]


@pytest.fixture(scope="module")
def space(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("space") / "tiny.space"
    path.write_text(TINY)
    return path


def nasdsl(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
    return run_nasdsl(*args, check=check, timeout=600, **kwargs)


def search_args(space, out, *extra):
    sets = [x for s in SETTINGS for x in ("--set", s)]
    return ["search", space, "--data", "fake", "--out", out, "-q", *sets, *extra]


@pytest.fixture(scope="module")
def finished_run(space, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    nasdsl(*search_args(space, out))
    return out


DEPTH_SETS = ("--set", "architecture.penalty_weight=flops", "--set", "architecture.block_cost=1e8")


@pytest.fixture(scope="module")
def depth_run(space, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "depth"
    nasdsl(*search_args(space, out, *DEPTH_SETS))
    return out


def test_summary_contract(finished_run):
    summary = json.loads((finished_run / "summary.json").read_text())
    for key in ("space", "recipe", "baseline", "searched", "derived", "gates", "stages", "reduction"):
        assert key in summary
    for key in ("baseline", "searched", "derived"):
        assert set(summary[key]) >= {"flops", "params", "top1"}
        assert 0.0 <= summary[key]["top1"] <= 1.0
        assert isinstance(summary[key]["flops"], int) and summary[key]["flops"] > 0
    # the hard-masked network and the slim one have the same architecture
    assert summary["searched"]["flops"] == summary["derived"]["flops"]
    assert summary["searched"]["flops"] <= summary["baseline"]["flops"]
    gates = summary["gates"]
    assert gates["total"] == 2 * (16 + 8) + 16  # two mbconvs (mid 16, out 8) + the strided conv
    assert 0 <= gates["kept"] <= gates["total"]
    assert gates["binarized_fraction"] == 1.0
    assert {s: v["epochs"] for s, v in summary["stages"].items()} == {"weights": 2, "architecture": 3, "finetune": 1}
    assert all(v["seconds"] > 0 for v in summary["stages"].values())


def test_run_folder(finished_run):
    for name in ("manifest.json", "metrics.jsonl", "gates.safetensors", "checkpoint.pt",
                 "gate_distribution.png", "kept_channels.png", "model/config.json", "model/model.safetensors",
                 "model/tiny.space", "model/tiny.py"):
        assert (finished_run / name).is_file(), name
    assert any((finished_run / "tensorboard").iterdir())
    manifest = json.loads((finished_run / "manifest.json").read_text())
    assert {"versions", "seed", "space_hash", "recipe", "command"} <= set(manifest)
    records = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in records] == [
        ("weights", 0), ("weights", 1), ("architecture", 0), ("architecture", 1), ("architecture", 2), ("finetune", 0)]
    arch = [r for r in records if r["stage"] == "architecture"]
    assert arch[-1]["delta"] == pytest.approx(1e4)
    gates = load_file(str(finished_run / "gates.safetensors"))
    assert set(gates) == {"choice.b0.mid", "choice.b0.out", "choice.b1.mid", "choice.b1.out", "down.bn"}


def test_eval_and_export(finished_run, tmp_path):
    summary = json.loads((finished_run / "summary.json").read_text())
    report = json.loads(nasdsl("eval", finished_run, "--json").stdout)
    assert report["top1"] == pytest.approx(summary["derived"]["top1"])
    out = tmp_path / "export"
    nasdsl("export", finished_run, "--name", "tiny_searched", "--out", out)
    assert (out / "tiny_searched.py").is_file() and (out / "model.safetensors").is_file()


def job(space, out, **recipe_sets) -> Pipeline:
    sets = dict(s.split("=") for s in SETTINGS)
    sets.update({k: str(v) for k, v in recipe_sets.items()})
    return Pipeline(make_plan(RunRequest(space=space, sets=sets, data="fake", out=out, progress=False)))


@pytest.mark.parametrize("bn", ["frozen", "train"])
def test_architecture_stage_freezes_weights_and_binarises(space, tmp_path, bn):
    search = job(space, tmp_path / "run", **{"architecture.bn": bn})
    search.setup()
    search.weights()
    gate_keys = {k for k in search.model.state_dict() if k.endswith(".s")}
    params = {k for k, _ in search.model.named_parameters()}
    before = {k: v.clone() for k, v in search.model.state_dict().items() if k not in gate_keys}
    search.architecture()
    after = search.model.state_dict()
    for k, v in before.items():  # conv, BN affine, classifier; BN statistics too when frozen
        if bn == "frozen" or k in params:
            assert torch.equal(v, after[k]), k
    s = search.model.gate_set.flat_s().detach().double()
    g = torch.sigmoid(1e4 * s)
    assert bool(((g < 1e-6) | (g > 1 - 1e-6)).all())
    assert not any("not yet binary" in note for note in search.state.notes)  # the optimizer did it alone
    assert search.model.gate_set.state.mode == "hard"


@pytest.mark.parametrize("metric", ["flops", "params"])
def test_cost_penalty_weighs_gates_by_their_macs_or_parameters(space, tmp_path, metric):
    from nasdsl.graph.accounting import gate_channel_cost

    search = job(space, tmp_path / "run", **{"architecture.penalty_weight": metric})
    search.setup()
    gs = search.model.gate_set
    costs = gate_channel_cost(search.plan.network, metric)
    per_channel = torch.cat([torch.full((g.s.numel(),), costs[g.key]) for g in gs.gates])
    torch.testing.assert_close(gs.channel_weights, per_channel / per_channel.mean())
    plain = job(space, tmp_path / "plain")
    plain.setup()
    assert plain.model.gate_set.channel_weights is None


def test_settle_gates_binarises_stranded_gates_without_changing_a_decision():
    s = {"a": torch.tensor([2e-3, 1e-4, 0.0, -1e-4, -3e-3, 0.5]), "b": torch.tensor([1e-4, -1e-4])}
    masks = {"a": s["a"] > 0, "b": torch.tensor([False, True])}  # derivation closed b[0], reopened b[1]
    settled, stranded = settle_gates(s, masks, delta_end=1e4)
    assert stranded == 3  # a's 1e-4, 0.0 and -1e-4; b's were repaired, not stranded
    for key in s:
        assert torch.equal(settled[key] > 0, masks[key])
        g = torch.sigmoid(1e4 * settled[key].double())
        assert bool(((g < 1e-6) | (g > 1 - 1e-6)).all())
    assert settled["a"][0] == s["a"][0] and settled["a"][-1] == s["a"][-1]  # binary gates are left alone
    assert s["a"][1] == 1e-4  # the input is not modified


def test_resume_between_the_architecture_stage_and_finetuning(space, tmp_path):
    """The checkpoint written when the architecture stage ends holds the supernet with its settled
    gates, at finetuning's epoch 0: resumed from it, the run derives and finetunes as one never
    interrupted does. (Resume once took any finetuning checkpoint for the derived network's: this
    one failed as 'does not fit this run's network', and the run was lost.)"""
    sets = {**dict(s.split("=") for s in SETTINGS), "finetune.epochs": "2", "architecture.lambda_a": "1e-5"}

    def pipeline(out: Path, resume: bool = False) -> Pipeline:
        return Pipeline(make_plan(RunRequest(space=space, sets=sets, data="fake", out=out, progress=False,
                                             resume=resume)))

    pipeline(tmp_path / "reference").execute()
    stopped = pipeline(tmp_path / "stopped")
    stopped.setup()
    stopped.weights()
    stopped.architecture()          # its checkpoint: stage finetune, epoch 0, the supernet's weights
    stopped.folder.close()
    pipeline(tmp_path / "stopped", resume=True).execute()
    a, b = (load_file(str(tmp_path / run / "model" / "model.safetensors")) for run in ("stopped", "reference"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def killed_and_resumed(space, out: Path, extra, stage: str) -> Path:
    """A search SIGKILLed once its metrics log `stage`'s first epoch, then resumed to the end; its
    metrics file."""
    proc = subprocess.Popen([sys.executable, "-m", "nasdsl", *map(str, search_args(space, out, *extra))], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and f'"{stage}", "epoch": 0' in metrics.read_text():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
    nasdsl(*search_args(space, out, "--resume", *extra))
    return metrics


@pytest.mark.parametrize("variant", ["channels", "depth"])
def test_resume_after_sigkill_gives_the_same_gates(space, finished_run, depth_run, variant, tmp_path):
    """Killed in the middle of the architecture stage, resumed: the same gates and notes as a run
    never interrupted (with depth gates too: they are checkpointed with the model)."""
    extra, reference = (DEPTH_SETS, depth_run) if variant == "depth" else ((), finished_run)
    out = tmp_path / "killed"
    metrics = killed_and_resumed(space, out, extra, "architecture")   # in the middle of the architecture stage
    a = load_file(str(out / "gates.safetensors"))
    b = load_file(str(reference / "gates.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    stages = [json.loads(line)["stage"] for line in metrics.read_text().splitlines()]
    assert stages == ["weights"] * 2 + ["architecture"] * 3 + ["finetune"]
    notes = [json.loads((run / "summary.json").read_text())["notes"] for run in (out, reference)]
    assert notes[0] == notes[1]


def test_resume_in_the_middle_of_finetuning_gives_the_same_weights(space, tmp_path):
    """Finetuning trains the derived network's merged training form (merge.train_form) and
    checkpoints the derived network's weights: killed after a finetuning epoch and resumed, the run
    rebuilds that form, its optimizer state fits it, and the weights end bit for bit as a run never
    interrupted."""
    extra = ("--set", "finetune.epochs=3", "--set", "architecture.lambda_a=1e-5")   # both candidates stay
    reference = tmp_path / "reference"
    nasdsl(*search_args(space, reference, *extra))
    derived = compile_file(reference / "model" / "tiny.space")
    trained, _, _ = train_form(derived, NasNet(derived.to_config()).state_dict())
    assert len(trained.layers[1].blocks) == 1 < len(derived.layers[1].blocks)
    out = tmp_path / "killed"
    metrics = killed_and_resumed(space, out, extra, "finetune")   # after its first finetuning epoch
    a, b = (load_file(str(run / "model" / "model.safetensors")) for run in (out, reference))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    stages = [json.loads(line)["stage"] for line in metrics.read_text().splitlines()]
    assert stages.count("finetune") == 3


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["channels", "depth"])
def test_ddp_two_processes_agree(space, tmp_path, variant):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun comes with torch"
    out = tmp_path / "ddp"
    sets = [x for s in SETTINGS for x in ("--set", s)] + list(DEPTH_SETS if variant == "depth" else ())
    port = 29611 if variant == "channels" else 29612
    proc = subprocess.run([torchrun, "--nproc_per_node=2", f"--master_port={port}", "-m", "nasdsl", "search",
                           str(space), "--data", "fake", "--out", str(out), "-q", *sets],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distributed"]["world_size"] == 2
    assert summary["distributed"]["gate_divergence_before_sync"] == 0.0
    assert summary["gates"]["binarized_fraction"] == 1.0
    if variant == "depth":  # the divergence above covers the depth gates too
        assert summary["notes"][0] == "2 block(s) closed by their depth gate (architecture.block_cost)"


def test_missing_dataset_is_one_line_and_writes_nothing(space, tmp_path):
    out = tmp_path / "run"
    proc = nasdsl("search", space, "--data", f"cifar10:{tmp_path / 'nowhere'}", "--out", out, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "cifar10" in proc.stderr
    assert not out.exists()


def test_bad_recipe_setting_is_one_line(space, tmp_path):
    proc = nasdsl("search", space, "--data", "fake", "--out", tmp_path / "run",
                  "--set", "architecture.lamda_a=1e-4", check=False)
    assert proc.returncode == 2
    assert "lambda_a" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_existing_run_is_never_overwritten(space, finished_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    before = (copy / "summary.json").read_bytes()
    proc = nasdsl(*search_args(space, copy), check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr
    assert (copy / "summary.json").read_bytes() == before


def test_corrupt_checkpoint_is_a_clear_error(space, finished_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    (copy / "checkpoint.pt").write_bytes(b"not a checkpoint")
    proc = nasdsl(*search_args(space, copy, "--resume"), check=False)
    assert proc.returncode == 2 and "corrupt checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_model_space_compiles_back_to_the_exported_network(finished_run, tmp_path):
    """RUN/model/tiny.space, the derived architecture, is what was trained and exported: it counts the
    summary's derived FLOPs and parameters, and re-exporting from it (merge, generate, load the saved
    weights strictly) gives a model that computes what the run's model computes."""
    from nasdsl.export.exporter import export_run
    from nasdsl.export.load import load
    from nasdsl.graph.accounting import network_cost
    from nasdsl.language.compiler import compile_file

    summary = json.loads((finished_run / "summary.json").read_text())
    cost = network_cost(compile_file(finished_run / "model" / "tiny.space"))
    assert (cost.flops, cost.params) == (summary["derived"]["flops"], summary["derived"]["params"])
    again = export_run(finished_run, tmp_path / "again", "tiny_again")
    x = torch.randn(3, *summary["preprocessing"]["input_size"])
    with torch.no_grad():
        assert torch.allclose(load(again)(x), load(finished_run)(x), atol=1e-5)


def test_channel_multiple_search_derives_whole_multiples(space, tmp_path):
    """The rounding happens before the gates are settled: the hard-masked supernet that is evaluated
    as `searched`, the saved gates and the finetuned slim model all have the rounded widths."""
    out = tmp_path / "rounded"
    nasdsl(*search_args(space, out, "--set", "architecture.channel_multiple=4"))
    counts = [int((s > 0).sum()) for s in load_file(out / "gates.safetensors").values()]
    assert all(c % 4 == 0 for c in counts), counts
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"]["architecture"]["channel_multiple"] == 4
    assert any(n.startswith("kept channels rounded to multiples of 4") for n in summary["notes"])  # 1, 1, 1, 2, 9 here
    assert summary["gates"]["binarized_fraction"] == 1.0
    assert summary["searched"]["flops"] == summary["derived"]["flops"]
    # the derived architecture (RUN/model/tiny.space) has the rounded widths; the exported model is it
    # merged, whose layer outputs are unions of the candidates' channels (any count)
    from nasdsl.language.compiler import compile_file

    derived = compile_file(out / "model" / "tiny.space")
    widths = [op.out_shape.channels for _, block in derived.blocks() for op in block.ops if op.kind == "conv"]
    assert widths and all(w % 4 == 0 for w in widths), widths


def test_joint_strategy_runs_end_to_end(space, tmp_path):
    out = tmp_path / "joint"
    nasdsl(*search_args(space, out, "--set", "strategy=joint"))
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stages"]) == {"joint", "finetune"}
    assert summary["gates"]["binarized_fraction"] == 1.0
    assert summary["derived"]["flops"] == summary["searched"]["flops"]


def test_block_cost_removes_whole_blocks(depth_run, finished_run):
    """A block cost far above any channel's closes the choice layer's depth gates: both blocks go
    and the residual layer becomes the identity; without it the same search keeps the layer."""
    out = depth_run
    summary = json.loads((out / "summary.json").read_text())
    plain = json.loads((finished_run / "summary.json").read_text())
    assert not any(note.startswith("layer choice:") for note in plain["notes"])
    assert plain["derived"]["flops"] > summary["derived"]["flops"]
    assert summary["notes"][0] == "2 block(s) closed by their depth gate (architecture.block_cost)"
    assert "layer choice: every block was pruned; the layer is an identity and was removed" in summary["notes"]
    assert summary["searched"]["flops"] == summary["derived"]["flops"]
    assert set(load_file(out / "gates.safetensors")) == {"choice.b0.mid", "choice.b0.out", "choice.b1.mid",
                                                         "choice.b1.out", "down.bn"}  # channel groups only
    assert not any(k.endswith("depth_gate.s") for k in load_file(out / "model" / "model.safetensors"))


def test_block_cost_needs_flops_weights(space, tmp_path):
    proc = nasdsl("search", space, "--data", "fake", "--out", tmp_path / "run", "--set",
                  "architecture.penalty_weight=channels", "--set", "architecture.block_cost=1e6", check=False)
    assert proc.returncode == 2 and not (tmp_path / "run").exists()
    assert proc.stderr.strip() == ("--set: architecture.block_cost: is counted in MACs, so it needs "
                                   "architecture.penalty_weight: flops or auto")
