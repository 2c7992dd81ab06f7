"""`nasdsl import`: timm and torchvision CNNs become `.space` files whose plain network computes the
model exactly (eval-mode logits within 1e-4 relative, the same parameter count), with the model's
weights keyed for the space; the text is written with stages and composites; what the language
cannot say is a one-line error naming the module and the operation. Nothing is downloaded: every
model has random weights, made distinctive (BN statistics included) and given through --weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import nasdsl
from nasdsl import cli
from nasdsl.errors import NasdslError
from nasdsl.importer import WEIGHTS, import_model

from cli_helpers import distinct_bn

pytestmark = pytest.mark.usefixtures("one_thread")

# family -> the resolution it is checked at (VGG's 7x7 adaptive pooling is the identity only at 224)
FAMILIES = {
    "torchvision:vgg16": 224, "torchvision:vgg16_bn": 224, "torchvision:resnet18": 32, "torchvision:resnet50": 32,
    "torchvision:resnext50_32x4d": 32, "torchvision:mobilenet_v2": 32, "torchvision:mobilenet_v3_large": 32,
    "torchvision:efficientnet_b0": 32,
    "timm:resnet18": 32, "timm:resnet50": 32, "timm:mobilenetv2_100": 32, "timm:efficientnet_b0": 32,
    "timm:mobilenetv3_large_100": 32, "timm:mixnet_s": 32,
}


def source_model(spec: str) -> torch.nn.Module:
    """The library's model with seeded random weights and BN statistics that are not the defaults."""
    import timm
    import torchvision

    library, name = spec.split(":")
    torch.manual_seed(0)
    model = timm.create_model(name) if library == "timm" else torchvision.models.get_model(name)
    return distinct_bn(model).eval()


def saved(model: torch.nn.Module, folder: Path) -> Path:
    path = folder / "source.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("spec", list(FAMILIES))
def test_family_imports_exactly(spec, tmp_path):
    model = source_model(spec)
    res = FAMILIES[spec]
    done = import_model(spec, tmp_path / "out", weights=str(saved(model, tmp_path)), resolution=res)
    net = nasdsl.load(tmp_path / "out")           # through the folder, as a user loads it
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in model.parameters()) == done.params
    x = torch.randn(2, 3, res, res)
    with torch.no_grad():
        want, got = model(x), net(x)
    assert (want - got).abs().max() <= 1e-4 * want.abs().max()
    marker = json.loads((tmp_path / "out" / "import.json").read_text())
    assert marker["source"] == spec and marker["weights_from"].endswith("source.safetensors")


def test_the_space_is_written_as_a_person_would(tmp_path):
    """Stages with repeat counts and strides, composites with only the arguments that differ from
    their defaults: torchvision's ResNet-50 reads like spaces/resnet50.space."""
    done = import_model("torchvision:resnet50", tmp_path, resolution=32)
    body = [line for line in done.space.read_text().splitlines() if line and not line.startswith("#")]
    assert body == [
        "space resnet50(input=3, resolution=32, classes=1000)",
        "layer stem [gate=off] = conv(64, k=7, stride=2) > bn > relu > maxpool(k=3, stride=2, padding=1)",
        "stage layer1 [repeat=3] { layer = bottleneck(256) }",
        "stage layer2 [repeat=4, stride=2] { layer = bottleneck(512) }",
        "stage layer3 [repeat=6, stride=2] { layer = bottleneck(1024) }",
        "stage layer4 [repeat=3, stride=2] { layer = bottleneck(2048) }",
        "layer classifier [gate=off] = gap > linear(classes)",
    ]
    shipped = nasdsl.compile("spaces/resnet50.space", resolution=32)
    imported = nasdsl.compile(done.space)
    def ops(net):
        return [(op.kind, op.out_shape) for layer in net.layers for op in layer.all_ops()]

    assert ops(imported) == ops(shipped)   # gates included: the same search space


def test_mobilenet_v3_says_its_se_rule_once_per_stage(tmp_path):
    """timm's MobileNetV3 SE width is make_divisible(mid / 4, 8): said as mbconv's SE arguments, so
    blocks of one stage share one line."""
    text = import_model("timm:mobilenetv3_large_100", tmp_path, resolution=32).space.read_text()
    assert ("stage blocks_2 [repeat=3, stride=2] { layer = mbconv(40, k=5, e=3, act=relu, se=0.25, se_of=mid, "
            "se_divisor=8, se_fn=hsigmoid) }") in text
    effnet = import_model("timm:efficientnet_b0", tmp_path / "b0", resolution=32).space.read_text()
    assert "stage blocks_5 [repeat=4, stride=2] { layer = mbconv(192, k=5, act=silu, se=0.25) }" in effnet


def test_mixnet_says_mixed_kernels_and_split_convs_as_mbconv_arguments(tmp_path):
    text = import_model("timm:mixnet_s", tmp_path, resolution=32).space.read_text()
    assert ("stage blocks_4_1 [repeat=2] { layer = mbconv(120, k=[3, 5, 7, 9], e=3, act=silu, expand_split=2, "
            "project_split=2, se=0.5) }") in text


def test_mobilenet_v2_is_mbconv_stages(tmp_path):
    done = import_model("timm:mobilenetv2_100", tmp_path, resolution=32)
    text = done.space.read_text()
    assert "stage blocks_1 [repeat=2, stride=2] { layer = mbconv(24, k=3) }" in text
    assert "layer blocks_0_0 = mbconv(16, k=3, e=1)" in text
    assert len(text.splitlines()) < 20


def test_check_show_and_search_accept_the_import(capsys, tmp_path):
    """The CLI round: import, check, show; the weights file loads into the supernet with --init."""
    rc = cli.main(["import", "torchvision:resnet18", "--out", str(tmp_path), "--resolution", "32"])
    out = capsys.readouterr().out
    assert rc == 0 and "resnet18.space" in out and "11.69M params" in out
    assert cli.main(["check", str(tmp_path / "resnet18.space")]) == 0
    assert cli.main(["show", str(tmp_path / "resnet18.space")]) == 0
    assert "11,689,512 params" in capsys.readouterr().out
    rc = cli.main(["search", str(tmp_path / "resnet18.space"), "--init", str(tmp_path / "weights.safetensors"),
                   "--data", "fake", "--set", "resolution=32", "--dry-run"])
    assert rc == 0, capsys.readouterr().err


def one_line_error(capsys, argv) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize("spec, expected", [
    ("torchvision:squeezenet1_0", "cannot import features.2: MaxPool2d(ceil_mode=True)"),
    ("torchvision:densenet121", "cannot import features.denseblock1: torch.cat()"),
    ("timm:convnext_atto", "cannot import stem.1: tensor.permute()"),
    ("timm:resnet5", "timm has no model 'resnet5' (did you mean 'resnet50'?)"),
    ("keras:resnet50", "expected timm:NAME or torchvision:NAME"),
])
def test_what_the_language_cannot_say_is_a_one_line_error(capsys, tmp_path, spec, expected):
    err = one_line_error(capsys, ["import", spec, "--out", str(tmp_path / "out"), "--resolution", "64"])
    assert err.startswith(spec) and expected in err
    assert not (tmp_path / "out").exists()


def test_weights_that_do_not_fit_are_refused(capsys, tmp_path):
    model = source_model("torchvision:resnet18")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state.pop("layer1.0.bn1.bias")
    state["fc.weight"] = torch.zeros(1000, 100)
    save_file(state, str(tmp_path / "bad.safetensors"))
    err = one_line_error(capsys, ["import", "torchvision:resnet18", "--weights", str(tmp_path / "bad.safetensors"),
                                  "--out", str(tmp_path / "out")])
    assert err.endswith("bad.safetensors: does not fit torchvision:resnet18: 1 missing (first: layer1.0.bn1.bias "
                        "[64]), 1 mis-shaped (first: fc.weight [1000, 100] in the file, [1000, 512] in the model)")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    assert "junk.pt: corrupt or not a torch file" in one_line_error(
        capsys, ["import", "torchvision:resnet18", "--weights", str(tmp_path / "junk.pt")])


def test_a_second_import_replaces_the_first_whole(tmp_path):
    """The folder is written file by file atomically, the marker last: a failed import leaves the
    previous one as it was."""
    import_model("torchvision:resnet18", tmp_path, resolution=32)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(NasdslError):
        import_model("torchvision:densenet121", tmp_path, resolution=32)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("space, spec", [("spaces/resnet50.space", "torchvision:resnet50"),
                                         ("spaces/mobilenetv2.space", "timm:mobilenetv2_100")])
def test_a_library_checkpoint_initialises_the_shipped_space(space, spec, tmp_path):
    """--init with torchvision's or timm's own names: mapped through the importer, and the supernet
    (gates disabled) computes the model's features; the 1000-class classifier makes way for the
    data's 10 classes, which the plan says."""
    from nasdsl.pipeline.plan import RunRequest, make_plan
    from nasdsl.pipeline.runner import Pipeline

    model = source_model(spec)
    plan = make_plan(RunRequest(space=Path(space), sets={"resolution": "32", "batch_size": "8"}, data="fake",
                                out=tmp_path / "run", progress=False, init=saved(model, tmp_path)))
    assert any("everything but the classifier (1000 outputs; the data has 10 classes)" in n for n in plan.notes)
    pipeline = Pipeline(plan)
    pipeline.setup()
    net = pipeline.model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = net.forward_head(net.forward_features(x), pre_logits=True)
        theirs = (model.forward_head(model.forward_features(x), pre_logits=True) if spec.startswith("timm")
                  else torch.flatten(torch.nn.Sequential(*list(model.children())[:-1])(x), 1))
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    pipeline.folder.close()


def test_a_new_classifier_needs_a_weights_stage(capsys, tmp_path):
    cli.main(["import", "torchvision:resnet18", "--out", str(tmp_path), "--resolution", "32"])
    capsys.readouterr()
    err = one_line_error(capsys, ["search", str(tmp_path / "resnet18.space"), "--init",
                                  str(tmp_path / "weights.safetensors"), "--data", "fake", "--set", "weights.epochs=0",
                                  "--dry-run"])
    assert "weights.safetensors: its classifier has 1000 outputs and the data 10 classes" in err
    assert "--set weights.epochs=" in err


def test_search_from_an_imported_network_starts_at_its_accuracy(capsys, tmp_path):
    """A torchvision ResNet-18 trained a little on 10 classes, imported (its class count read from
    the file), then searched with no weights stage: the baseline is its own accuracy."""
    import torch.nn.functional as F
    import torchvision

    from nasdsl.train.data import build_data

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    data = build_data("fake", 8)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.002)
    for _ in range(2):
        for x, y in torch.utils.data.DataLoader(data.train, batch_size=32, shuffle=True):
            optimizer.zero_grad()
            F.cross_entropy(model.train()(x), y).backward()
            optimizer.step()
    model.eval()
    val = [data.val[i] for i in range(len(data.val))]
    with torch.no_grad():
        expected = (model(torch.stack([x for x, _ in val])).argmax(1) == torch.tensor([y for _, y in val])).float().mean()
    assert expected > 0.3
    assert cli.main(["import", "torchvision:resnet18", "--weights", str(saved(model, tmp_path)), "--out",
                     str(tmp_path / "imp"), "--resolution", "8"]) == 0
    rc = cli.main(["search", str(tmp_path / "imp" / "resnet18.space"), "--init", str(tmp_path / "imp" / WEIGHTS),
                   "--data", "fake", "--set", "resolution=8", "--set", "batch_size=32", "--set", "weights.epochs=0",
                   "--set", "architecture.epochs=1", "--set", "finetune.epochs=1", "--out", str(tmp_path / "run"),
                   "--device", "cpu", "-q"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["baseline"]["top1"] == pytest.approx(float(expected), abs=1e-9)


def test_torchvision_vgg16_names_map_onto_the_shipped_space():
    """The mapping checks the logits itself; here its names must be the space's plain network's."""
    from nasdsl.importer.mapping import translate
    from nasdsl.pipeline.init import plain_shapes

    model = source_model("torchvision:vgg16")
    network = nasdsl.compile("spaces/vgg16.space")
    renamed = translate(model.state_dict(), network, "vgg16.pth")
    shapes = plain_shapes(network)
    assert renamed is not None and {k: tuple(v.shape) for k, v in renamed.items()} == shapes


@pytest.mark.parametrize("space, spec", [("spaces/efficientnet_b0.space", "timm:efficientnet_b0"),
                                         ("spaces/mixnet_s.space", "timm:mixnet_s"),
                                         ("spaces/efficientnet_b0.space", "torchvision:efficientnet_b0")])
def test_library_names_map_onto_the_shipped_spaces(space, spec):
    from nasdsl.importer.mapping import translate
    from nasdsl.pipeline.init import plain_shapes

    network = nasdsl.compile(space, resolution=32)
    renamed = translate(source_model(spec).state_dict(), network, "w.pth")
    assert renamed is not None and {k: tuple(v.shape) for k, v in renamed.items()} == plain_shapes(network)


def test_a_checkpoint_of_another_network_with_the_same_names_is_refused():
    """torchvision's MobileNetV3 has BN eps 1e-3; spaces/mobilenetv3_large.space is timm's (1e-5)."""
    from nasdsl.importer.mapping import translate

    network = nasdsl.compile("spaces/mobilenetv3_large.space", resolution=32)
    with pytest.raises(NasdslError, match="has torchvision:mobilenet_v3_large's names, but mobilenetv3_large is not "
                                          "that network .*logits differ.*nasdsl import torchvision:mobilenet_v3_large"):
        translate(source_model("torchvision:mobilenet_v3_large").state_dict(), network, "w.pth")


def test_pretrained_weights_come_from_the_cache_and_never_the_network(tmp_path):
    """A Hugging Face cache holding timm's resnet18 weights (written here) is used; nothing else is
    reachable (HF_HUB_OFFLINE), and without the cache the import says it is random."""
    import os
    import subprocess
    import sys

    import timm

    repo = timm.models.get_pretrained_cfg("resnet18").hf_hub_id
    snapshot = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    model = source_model("timm:resnet18")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snapshot / "model.safetensors"))
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "nasdsl", "import", "timm:resnet18", "--resolution", "32", "--out"]
    done = subprocess.run([*cmd, str(tmp_path / "cached")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    marker = json.loads((tmp_path / "cached" / "import.json").read_text())
    assert marker["weights_from"] == f"timm's pretrained weights ({snapshot / 'model.safetensors'})"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(nasdsl.load(tmp_path / "cached")(x), model(x), rtol=0, atol=1e-4)
    env["HF_HUB_CACHE"] = str(tmp_path / "empty")
    done = subprocess.run([*cmd, str(tmp_path / "random")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "no pretrained weights are cached on this machine" in done.stdout
