"""The run pipeline: the plan step catches every input problem before anything is written or trained,
`--dry-run` prints the plan, every shipped space runs, checkpoints never run pickled code, internal
errors are one line, mixed precision, and the public Python API."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nasdsl
from nasdsl import cli

from cli_helpers import ENV, TINY, run_nasdsl

ROOT = Path(__file__).resolve().parents[1]
SPACES = sorted((ROOT / "spaces").glob("*.space"))
SHORT = ["--set", "resolution=8", "--set", "batch_size=32", "--set", "weights.epochs=1",
         "--set", "architecture.epochs=1", "--set", "finetune.epochs=1"]


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return run_nasdsl(*args, check=False, cwd=cwd)


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.space"
    path.write_text(TINY)
    return path


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stderr.strip().splitlines()[0]


# ---- the plan ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("space", SPACES, ids=lambda p: p.stem)
def test_dry_run_of_every_shipped_space(space, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("search", space, "--data", "fake", "--set", "resolution=32", "--out", out, "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert [s["name"] for s in plan["stages"]] == ["weights", "architecture", "finetune"]
    assert all(s["epochs"] >= 0 and s["steps_per_epoch"] == 4 for s in plan["stages"])  # 256 fake images / 64
    shown = json.loads(run_cli("show", space, "--set", "resolution=32", "--set", "input=3", "--set",
                               "classes=10", "--json").stdout)
    assert plan["gates"] == shown["gates"]
    cut = [n for n in plan["notes"] if "larger than the maps they slide over" in n]
    if cut:   # the run builds kernels cut to their maps (32 px leaves 1x1 maps here): fewer MACs, said so
        assert plan["flops"] < shown["flops"] and plan["params"] < shown["params"]
        assert f"the same function at {plan['flops']:,} MACs" in cut[0]
        assert f"instead of {shown['flops']:,} and {shown['params']:,}" in cut[0]
    else:
        assert (plan["flops"], plan["params"]) == (shown["flops"], shown["params"])
    assert plan["preprocessing"]["input_size"] == [3, 32, 32] and plan["preprocessing"]["crop_pct"] == 1.0
    assert plan["export_name"].isidentifier()
    assert not out.exists()  # a dry run writes nothing


@pytest.mark.parametrize("space", ["vgg16", "resnet50"])
def test_space_named_like_a_timm_model_gets_a_safe_export_name(space, tmp_path):
    proc = run_cli("search", ROOT / "spaces" / f"{space}.space", "--data", "fake", "--set", "resolution=32",
                   "--dry-run", "--json")
    plan = json.loads(proc.stdout)
    assert plan["export_name"] == f"{space}_nasdsl"
    assert any("timm" in note and f"{space}_nasdsl" in note for note in plan["notes"])


def test_a_clashing_name_asked_for_is_an_error_before_training(tiny, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("search", tiny, "--data", "fake", "--out", out, "--name", "resnet18", *SHORT)
    assert one_line_error(proc).startswith("--name: export name 'resnet18' is one of timm's own models")
    assert not out.exists()


def test_space_file_that_is_not_utf8_is_located_by_search(tmp_path):
    bad = tmp_path / "bad.space"
    bad.write_bytes(b"space bad(input=3, resolution=8, classes=10)\nlayer x = conv(8, k=3) # caf\xe9\n")
    out = tmp_path / "run"
    line = one_line_error(run_cli("search", bad, "--data", "fake", "--out", out))
    assert line.startswith(f"{bad}:2:") and "not UTF-8" in line
    assert not out.exists()


@pytest.mark.parametrize("setting, message", [
    (["--set", "weights.warmup_epochs=99"], "--set: weights.warmup_epochs: 99 is more than weights.epochs"),
    (["--budget", "flops=0.1%"], "--budget: flops <= 0.1% cannot be met"),
    (["--set", "precision=fp16"], "precision: fp16 training needs a CUDA device"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "nope"], "--device: "),
    (["--set", "augmentation.scale=[0.9,0.2]"], "--set: augmentation.scale"),
])
def test_impossible_settings_fail_before_anything_is_written(tiny, tmp_path, setting, message):
    out = tmp_path / "run"
    line = one_line_error(run_cli("search", tiny, "--data", "fake", "--out", out, *setting))
    assert line.startswith(message), line
    assert not out.exists()


def test_precision_auto_is_fp32_on_cpu(tiny):
    plan = json.loads(run_cli("search", tiny, "--data", "fake", "--device", "cpu", "--dry-run", "--json").stdout)
    assert plan["precision"] == "fp32" and plan["device"] == "cpu"


def test_dry_run_text_names_the_stages_and_the_export(tiny):
    proc = run_cli("search", tiny, "--data", "fake", *SHORT, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "weights" in proc.stdout and "1 epochs x 8 steps" in proc.stdout and "export name tiny" in proc.stdout


@pytest.mark.parametrize("budget, weight, priced", [
    (None, "auto", "each priced 1 (penalty_weight channels)"),
    ("flops=70%", "auto", "each priced 1 (penalty_weight channels)"),
    ("flops=70%", "flops", "each priced by its channel's MACs (penalty_weight flops)")])
def test_dry_run_says_how_the_gates_are_priced_and_rounded(tiny, budget, weight, priced):
    """What `auto` resolved to is part of the plan: the JSON's `search` and one line of the text."""
    extra = (["--budget", budget] if budget else []) + ["--set", f"architecture.penalty_weight={weight}"]
    plan = json.loads(run_cli("search", tiny, "--data", "fake", *extra, "--dry-run", "--json").stdout)
    block = 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8
    assert plan["search"] == {"penalty_weight": priced.split()[-1].rstrip(")"), "channel_multiple": block,
                              "block_cost": 0.0}
    text = run_cli("search", tiny, "--data", "fake", *extra, "--dry-run").stdout
    assert f"  gates     {priced}; kept widths in multiples of {block} (channel_multiple)\n" in text
    train = json.loads(run_cli("train", tiny, "--data", "fake", "--dry-run", "--json").stdout)
    assert train["search"] is None


# ---- runs --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_vgg16_space_searches_and_exports_a_model_timm_loads(tmp_path):
    """The review's first failure: all three stages trained, then the export name 'vgg16' (timm's own)
    stopped the run with no summary and no model."""
    out = tmp_path / "run"
    proc = run_cli("search", ROOT / "spaces" / "vgg16.space", "--data", "fake", "--out", out, "-q",
                   "--set", "resolution=32", "--set", "weights.epochs=1", "--set", "architecture.epochs=1",
                   "--set", "finetune.epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["export_name"] == "vgg16_nasdsl" and summary["derived"]["flops"] > 0
    load = ("import sys, timm, torch; sys.path.insert(0, sys.argv[1]); import vgg16_nasdsl; "
            "m = timm.create_model('vgg16_nasdsl', pretrained=True).eval(); "
            "assert 'nasdsl' not in sys.modules; print(m(torch.randn(2, 3, 32, 32)).shape[1])")
    check = subprocess.run([sys.executable, "-c", load, str(out / "model")], capture_output=True, text=True,
                           env=ENV, timeout=300, cwd=tmp_path)
    assert check.returncode == 0 and check.stdout.strip() == "10", check.stderr[-2000:]


def test_bf16_autocast_run_keeps_fp32_gates(tiny, tmp_path):
    from nasdsl.pipeline.plan import RunRequest, make_plan
    from nasdsl.pipeline.runner import Pipeline

    sets = {"resolution": "8", "batch_size": "32", "weights.epochs": "1", "architecture.epochs": "1",
            "finetune.epochs": "1", "precision": "bf16"}
    pipeline = Pipeline(make_plan(RunRequest(space=tiny, sets=sets, data="fake", out=tmp_path / "run",
                                             progress=False)))
    summary = pipeline.execute()
    assert summary["precision"] == "bf16" and summary["derived"]["top1"] >= 0
    gates = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["state"]["gates"]
    assert all(t.dtype == torch.float32 for t in gates.values())


def test_checkpoint_never_runs_pickled_code(tiny, tmp_path):
    """The review's fifth failure: checkpoints were read with weights_only=False, running pickled code."""
    out = tmp_path / "run"
    assert run_cli("search", tiny, "--data", "fake", "--out", out, "-q", *SHORT).returncode == 0
    marker = tmp_path / "pwned"
    evil = f"import pickle, os\nclass E:\n    def __reduce__(self):\n        return (os.system, ('touch {marker}',))\n" \
           f"pickle.dump({{'state': E()}}, open({str(out / 'checkpoint.pt')!r}, 'wb'))\n"
    subprocess.run([sys.executable, "-c", evil], check=True)
    line = one_line_error(run_cli("search", tiny, "--data", "fake", "--out", out, "--resume", *SHORT))
    assert "checkpoint.pt: corrupt checkpoint" in line
    assert not marker.exists()


def test_a_checkpoint_that_does_not_fit_the_network_is_one_line(tiny, tmp_path):
    """A run folder from an older nasdsl (whose supernet kept kernels larger than their maps) or
    for an edited space: resuming names the file and says what to do, without a traceback."""
    out = tmp_path / "run"
    assert run_cli("search", tiny, "--data", "fake", "--out", out, "-q", *SHORT).returncode == 0
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    name = next(k for k, v in checkpoint["model"].items() if v.dim() == 4)
    checkpoint["model"][name] = torch.zeros(*checkpoint["model"][name].shape[:2], 7, 7)
    torch.save(checkpoint, out / "checkpoint.pt")
    line = one_line_error(run_cli("search", tiny, "--data", "fake", "--out", out, "--resume", *SHORT))
    assert "checkpoint.pt: does not fit this run's network" in line and name in line


# ---- the command line and the API --------------------------------------------------------------------
def test_internal_error_is_one_line_unless_debug(monkeypatch, capsys, tiny):
    def broken(request, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("nasdsl.pipeline.plan.make_plan", broken)
    assert cli.main(["search", str(tiny)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RuntimeError: boom" in err and "--debug" in err
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["--debug", "search", str(tiny)])


def test_recipes_command_lists_the_shipped_recipes(capsys):
    from nasdsl.recipe import available_recipes

    assert cli.main(["recipes"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == available_recipes() and "cpu" in listed


def test_public_api_compiles_builds_and_loads(tmp_path):
    from nasdsl.graph.accounting import network_cost

    network = nasdsl.compile(ROOT / "spaces" / "resnet56_cifar.space", depth=3, resolution=32)
    model = nasdsl.build(network)
    assert sum(p.numel() for p in model.parameters()) == network_cost(network).params
    assert not hasattr(model, "gate_set")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, network.num_classes)
    with pytest.raises(nasdsl.errors.NasdslError):
        nasdsl.load(tmp_path / "nothing")


REPRODUCE = """
import sys, timm, torch
from pathlib import Path
from PIL import Image
from timm.data import create_transform, resolve_data_config
sys.path.insert(0, sys.argv[1])
import tiny
model = timm.create_model("tiny", pretrained=True).eval()
transform = create_transform(**resolve_data_config({}, model=model))
val = Path(sys.argv[2]) / "val"
correct = total = 0
for label, folder in enumerate(sorted(p for p in val.iterdir() if p.is_dir())):
    for file in sorted(folder.iterdir()):
        x = transform(Image.open(file).convert("RGB")).unsqueeze(0)
        correct += int(model(x).argmax(1).item() == label)
        total += 1
assert "nasdsl" not in sys.modules
print(correct / total)
"""


@pytest.mark.slow
def test_timm_eval_transform_reproduces_the_reported_top1_on_an_imagefolder(tiny, tmp_path):
    """timm's standard eval transform, applied to an export of an imagefolder run, gives the top-1
    nasdsl reported (non-square images of several sizes, so resize and centre crop both matter)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    root = tmp_path / "folder"
    for split, per_class in (("train", 24), ("val", 12)):
        for c in range(3):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(per_class):
                h, w = 20 + 4 * (i % 4), 28 + 3 * (i % 3)
                img = torch.rand(h, w, 3, generator=g) * 0.6
                img[..., c] += 0.4 * torch.rand(1, generator=g)
                Image.fromarray((img.clamp(0, 1) * 255).byte().numpy()).save(root / split / f"c{c}" / f"{i}.png")
    out = tmp_path / "run"
    proc = run_cli("search", tiny, "--data", f"imagefolder:{root}", "--out", out, "-q", "--set", "batch_size=16",
                   "--set", "resolution=16", "--set", "weights.epochs=2", "--set", "architecture.epochs=1",
                   "--set", "finetune.epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    reported = json.loads((out / "summary.json").read_text())["derived"]["top1"]
    check = subprocess.run([sys.executable, "-c", REPRODUCE, str(out / "model"), str(root)], capture_output=True,
                           text=True, env=ENV, timeout=300, cwd=tmp_path)
    assert check.returncode == 0, check.stderr[-2000:]
    assert abs(float(check.stdout) - reported) <= 0.005


# ---- the runtime -------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset, expected", [(None, "4096"), ("2048", "2048")])
def test_importing_nasdsl_gives_onednn_room_for_every_conv_shape_of_a_derived_network(preset, expected):
    """A derived network's ~1,200 conv kernels thrashed oneDNN's default 1024-entry cache (finetuning
    ran slower than the supernet); nasdsl raises the capacity unless the user chose one."""
    env = {k: v for k, v in ENV.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if preset is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = preset
    code = "import os, nasdsl; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


AUTO = {"architecture.penalty_weight": "auto"}
FLOPS = {"architecture.penalty_weight": "flops"}


@pytest.mark.parametrize("budget, sets, expected", [
    ("flops=50%", {}, "channels"), ("params=90%", {}, "channels"), (None, {}, "channels"),
    ("flops=70%,50%", AUTO, "channels"), ("latency=60%", {}, "flops"),
    (None, {"architecture.block_cost": "1e6"}, "flops"), ("params=90%", {"architecture.block_cost": "1e6"}, "flops"),
    ("flops=50%", {"architecture.penalty_weight": "flops"}, "flops"),
    (None, {"architecture.penalty_weight": "params"}, "params")])
def test_penalty_weight_auto_is_the_papers_count_unless_a_price_is_in_macs(tiny, tmp_path, budget, sets, expected):
    """`auto`, the default, becomes a choice in the plan (and so in the run's recipe): the paper's
    count of 1 a channel (the more accurate), budget or not, unless the penalty holds a price in MACs
    (a latency budget's layers, block_cost's depth gates), which a channel's price must share a unit
    with; a choice given stays."""
    from nasdsl.pipeline.plan import RunRequest, make_plan

    plan = make_plan(RunRequest(space=tiny, data="fake", sets=sets, budget=budget, out=tmp_path / "run",
                                device="cpu"), join_world=False)
    assert plan.recipe.architecture.penalty_weight == expected


def test_resuming_with_another_recipe_names_the_keys_that_differ(tiny, tmp_path):
    """A run searched before a default changed (penalty_weight's, say) is refused on --resume with
    the keys that differ and both values, so the user knows which --set restores it."""
    from nasdsl.pipeline.plan import RunRequest, make_plan

    out = tmp_path / "run"
    plan = make_plan(RunRequest(space=tiny, data="fake", out=out, device="cpu", budget="flops=70%", sets=FLOPS),
                     join_world=False)
    recipe = plan.recipe.to_dict()
    assert recipe["architecture"]["penalty_weight"] == "flops"
    recipe["architecture"]["penalty_weight"] = "channels"   # as if a default had differed then
    recipe["finetune"]["lr"] = 0.5
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"space_hash": plan.space_hash, "recipe": recipe}))
    proc = run_nasdsl("search", tiny, "--data", "fake", "--out", out, "--budget", "flops=70%", "--resume",
                      "--set", "architecture.penalty_weight=flops", check=False)
    assert one_line_error(proc) == (
        f"{out}: this run used a different recipe (architecture.penalty_weight: channels there, flops now; "
        f"finetune.lr: 0.5 there, {plan.recipe.finetune.lr:g} now); resume it with the same recipe and --set")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]


def test_channel_multiple_auto_is_the_devices_channel_block(tiny, tmp_path):
    """`auto` becomes a number in the plan (and so in the run's recipe and summary): the channel block
    of the device the run uses; a number given stays as it is."""
    from nasdsl.pipeline.plan import RunRequest, channel_block, make_plan, resolve_channel_multiple
    from nasdsl.recipe import load_recipe

    auto = load_recipe("cpu", {"architecture.channel_multiple": "auto"})
    assert auto.architecture.channel_multiple == "auto"
    block = 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8
    assert channel_block(torch.device("cpu")) == block and channel_block(torch.device("cuda")) == 8
    assert resolve_channel_multiple(auto, torch.device("cuda")).architecture.channel_multiple == 8
    fixed = load_recipe("cpu", {"architecture.channel_multiple": "4"})
    assert resolve_channel_multiple(fixed, torch.device("cpu")) is fixed
    plan = make_plan(RunRequest(space=tiny, data="fake", sets={"architecture.channel_multiple": "auto"},
                                out=tmp_path / "run", device="cpu"), join_world=False)
    assert plan.recipe.architecture.channel_multiple == block
