"""Export: the generated timm module, local-dir config, safetensors, ONNX, nasdsl.load, atomic writes."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import nasdsl
from nasdsl.errors import NasdslError
from nasdsl.export import exporter
from nasdsl.export.exporter import export_model
from nasdsl.graph.ir import Op, Shape, Shortcut
from nasdsl.graph.printer import to_space
from nasdsl.language.compiler import compile_source
from nasdsl.supernet.network import NasNet
from nasdsl.train.data import Preprocessing, build_data

from cli_helpers import contiguous_maps

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnxscript") is not None
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def prep(network, mean=MEAN, std=STD, **kw) -> Preprocessing:
    """The preprocessing of a 3-channel network's input (as a data source would make it)."""
    shape = network.input_shape
    return Preprocessing((shape.channels, *shape.size), mean, std, **kw)


TINY = """
space tiny(input=3, resolution=32, classes=10)
layer stem = conv(8, k=3, stride=2) > bn > relu
layer a = conv(8, k=3) > bn > relu
layer m = mbconv(8, k=3, e=3) | mbconv(8, k=5, e=2)
layer r = basic(16, stride=2, shortcut=pad)
layer classifier = gap > dropout(0.1) > linear(classes)
"""

INDEXED = """
space idx(input=3, resolution=16, classes=7)
layer stem = conv(6, k=3) > bn > relu
layer m = mbconv(8, k=3, e=2) | mbconv(8, k=5, e=1.5)
layer r = basic(12, stride=2, shortcut=pad)
layer classifier = gap > linear(classes)
"""


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights and BN statistics, so no op is an identity and every index matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.3)
    return model.eval()


def _narrow(block, out: int, index: tuple):
    """The block with its last conv (and what follows it) cut to `out` channels, placed at `index`."""
    ops = list(block.ops)
    last = max(i for i, op in enumerate(ops) if op.kind == "conv")
    for i in range(last, len(ops)):
        op = ops[i]
        in_shape = op.in_shape if i == last else Shape(out, op.in_shape.size)
        ops[i] = replace(op, in_shape=in_shape, out_shape=Shape(out, op.out_shape.size))
    return replace(block, ops=tuple(ops), out_shape=Shape(out, block.out_shape.size), index=index)


def _indexed_network():
    """A derived-looking network: blocks narrower than their layer, placed by index maps, and a
    shortcut that gathers channels (select) and lands on an index."""
    net = compile_source(INDEXED)
    stem, m, r, head = net.layers
    assert m.shortcut is None and m.width == 8
    select = Op("select", {"index": (0, 2, 3, 5)}, m.in_shape, Shape(4, m.in_shape.size))
    m = replace(m, blocks=(_narrow(m.blocks[0], 5, (0, 1, 2, 3, 4)), _narrow(m.blocks[1], 6, (2, 3, 4, 5, 6, 7))),
                shortcut=Shortcut((select,), (1, 3, 5, 7)))
    r = replace(r, blocks=(_narrow(r.blocks[0], 10, tuple(range(1, 11))),))
    return net.replace(layers=(stem, m, r, head))


def _export(tmp: Path, network, name: str, seed: int, **kw):
    model = _randomize(NasNet(network.to_config()), seed)
    kw.setdefault("preprocessing", prep(network))
    out = export_model(network, model.state_dict(), tmp / name, name, **kw)
    return out, model


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    net = compile_source(TINY)
    out, model = _export(tmp_path_factory.mktemp("exp"), net, "nasdsl_tiny_test", 0,
                         space_text="space tiny_slim(input=3, resolution=32, classes=10)\n", onnx=HAS_ORT)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    return out, model, x, ref


@pytest.fixture(scope="module")
def registered(tiny):
    out, model, x, ref = tiny
    from nasdsl.export.timm import register
    return register(out)


def test_folder_layout(tiny):
    out, model, _, _ = tiny
    name = "nasdsl_tiny_test"
    files = {p.name for p in out.iterdir()}
    assert {f"{name}.py", "model.safetensors", "config.json", f"{name}.space"} <= files
    assert (f"{name}.onnx" in files) == HAS_ORT
    if HAS_ORT:
        info = json.loads((out / "config.json").read_text())["nasdsl"]["onnx"]
        assert info["file"] == f"{name}.onnx" and info["max_abs_diff"] <= 1e-4
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]   # no temp folders left
    module = (out / f"{name}.py").read_text()
    assert "class NasdslTinyTest(nn.Module):" in module and "def forward(self, x: torch.Tensor)" in module
    assert "import nasdsl" not in module and "from nasdsl" not in module and "_ARCH" not in module
    assert "@register_model\ndef nasdsl_tiny_test(pretrained: bool = False, **kwargs)" in module
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == name and cfg["num_classes"] == 10 and cfg["num_features"] == 16
    assert "model_args" not in cfg                      # the module is the architecture
    assert cfg["nasdsl"]["format"] == 2 and cfg["nasdsl"]["model"] == "NasdslTinyTest"
    assert cfg["nasdsl"]["module"] == f"{name}.py" and cfg["nasdsl"]["space"] == f"{name}.space"
    pc = cfg["pretrained_cfg"]
    assert pc["input_size"] == [3, 32, 32] and pc["mean"] == list(MEAN) and pc["std"] == list(STD)
    assert pc["first_conv"] == "stages.0.0.conv" and pc["classifier"] == "classifier"
    assert pc["pool_size"] == [8, 8] and pc["num_classes"] == 10
    state = nasdsl.load(out).state_dict()
    assert state[pc["first_conv"] + ".weight"].shape[1] == 3
    assert "classifier.weight" in state
    assert (out / f"{name}.space").read_text().startswith("space tiny_slim")


def test_local_dir_without_nasdsl(tiny, tmp_path):
    """A fresh interpreter with only torch and timm: local-dir and the registered name both load the weights."""
    out, model, x, ref = tiny
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(out)!r})
        import torch, timm
        import nasdsl_tiny_test
        x = torch.load({str(tmp_path / 'x.pt')!r})
        a = timm.create_model("local-dir:{out}", pretrained=True).eval()
        b = timm.create_model("nasdsl_tiny_test", pretrained=True).eval()
        with torch.no_grad():
            torch.save((a(x), b(x), a.pretrained_cfg), {str(tmp_path / 'y.pt')!r})
        assert "nasdsl" not in sys.modules, [m for m in sys.modules if m.startswith("nasdsl")]
        assert not any(m.startswith("nasdsl.") for m in sys.modules)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b, cfg = torch.load(tmp_path / "y.pt", weights_only=False)
    assert _close(a, ref) and _close(b, ref)
    assert cfg["source"] == "local-dir" and tuple(cfg["mean"]) == MEAN


def test_register_then_create_pretrained(tiny, registered):
    import timm

    out, model, x, ref = tiny
    assert registered == "nasdsl_tiny_test"
    m = timm.create_model(registered, pretrained=True).eval()
    with torch.no_grad():
        assert _close(m(x), ref)
    assert Path(m.pretrained_cfg["file"]) == (out / "model.safetensors").resolve()
    assert tuple(m.pretrained_cfg["mean"]) == MEAN and tuple(m.pretrained_cfg["std"]) == STD
    data = timm.data.resolve_data_config({}, model=m)
    assert data["input_size"] == (3, 32, 32) and data["mean"] == MEAN
    # a new head: the body loads, the classifier is fresh (timm drops it when num_classes differs)
    m5 = timm.create_model(registered, pretrained=True, num_classes=5).eval()
    with torch.no_grad():
        assert m5(x).shape == (4, 5)
        assert _close(m5.forward_head(m5.forward_features(x), pre_logits=True),
                      model.forward_head(model.forward_features(x), pre_logits=True))
    # registering again (same process) replaces the entry quietly
    from nasdsl.export.timm import register
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert register(out) == registered


def test_nasdsl_load(tiny, tmp_path):
    out, model, x, ref = tiny
    loaded = nasdsl.load(out)
    assert not loaded.training
    with torch.no_grad():
        assert _close(loaded(x), ref)
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.txt").write_text("a run folder\n")
    shutil.copytree(out, run / "model")
    with torch.no_grad():
        assert _close(nasdsl.load(run)(x), ref)
        assert _close(nasdsl.load(str(run))(x), ref)


def test_two_exports_of_one_name_load_side_by_side(tmp_path):
    """nasdsl.load runs each export's module under a private name: same name, two architectures."""
    small = compile_source(SMALL.format(name="small", channels=3, resolution=16, classes=4))
    out_a, model_a = _export(tmp_path / "a", compile_source(INDEXED), "nasdsl_same_name", 1)
    out_b, model_b = _export(tmp_path / "b", small, "nasdsl_same_name", 2)
    a, b = nasdsl.load(out_a), nasdsl.load(out_b)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert _close(a(x), model_a(x)) and _close(b(x), model_b(x))
    assert type(a).__module__ != type(b).__module__


def test_timm_model_api(tiny, registered):
    import timm

    out, model, x, ref = tiny
    m = timm.create_model(registered, pretrained=True).eval()
    assert m.num_classes == 10 and m.num_features == 16 and m.head_hidden_size == 16
    assert m.get_classifier() is m.classifier
    assert m.head_drop.p == 0.1                          # the space's dropout before the classifier
    with torch.no_grad():
        feats = m.forward_features(x)
        assert feats.shape == (4, 16, 8, 8)
        assert m.forward_head(feats, pre_logits=True).shape == (4, m.num_features)
        pool = m.global_pool
        m.reset_classifier(5, global_pool=None)          # keeps the pooling
        assert m.global_pool is pool and m.num_classes == 5 and m(x).shape == (4, 5)
        m.reset_classifier(0)
        assert m(x).shape == (4, 16)
        assert _close(m(x), model.forward_head(model.forward_features(x), pre_logits=True))
        m.reset_classifier(3, global_pool="max")         # timm's pool types, on a global-average head
        assert m.global_pool.pool_type == "max" and m(x).shape == (4, 3)
        m.reset_classifier(0, global_pool="")
        assert m(x).shape == (4, 16, 8, 8)
    assert timm.create_model(registered, drop_rate=0.3).head_drop.p == 0.3


def test_constructor_takes_only_timm_arguments(registered):
    """num_classes, in_chans (the network's) and drop_rate; anything else is a TypeError, as for timm's models."""
    import timm

    with pytest.raises(TypeError, match="not_a_model_arg"):
        timm.create_model(registered, not_a_model_arg=1)
    with pytest.raises(ValueError, match="takes 3-channel images"):
        timm.create_model(registered, in_chans=1)
    assert timm.create_model(registered, num_classes=0)(torch.randn(1, 3, 32, 32)).shape == (1, 16)


def test_features_only(tiny, registered):
    """timm's features_only: the last map at each reduction (stem/a/m at 2, r at 4), the model's
    own values, pretrained weights loaded, and the stages after the last picked map dropped."""
    import timm

    out, model, x, ref = tiny
    feats = timm.create_model(registered, pretrained=True, features_only=True).eval()
    assert feats.feature_info.channels() == [8, 16] and feats.feature_info.reduction() == [2, 4]
    assert feats.feature_info.module_name() == ["stages.0", "stages.1"]
    with torch.no_grad():
        maps = feats(x)
        h = x
        expect = []
        for i, layer in enumerate(model.layers):
            h = layer(h)
            if i in (2, 3):
                expect.append(h)
    assert [tuple(m.shape) for m in maps] == [(4, 8, 16, 16), (4, 16, 8, 8)]
    assert all(_close(a, b) for a, b in zip(maps, expect))
    first = timm.create_model(registered, pretrained=True, features_only=True, out_indices=(0,)).eval()
    assert len(first.model.stages) == 1 and not any("classifier" in k for k in first.state_dict())
    full = timm.create_model(registered, pretrained=True).eval()
    with torch.no_grad():
        (only,) = first(x)
        assert _close(only, expect[0])
        last, picked = full.forward_intermediates(x, indices=1)
        assert _close(last, full.forward_features(x)) and len(picked) == 1 and _close(picked[0], expect[1])
        picked = full.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        assert len(picked) == 1 and _close(picked[0], expect[0])
    with pytest.raises(AssertionError, match="feature index 5 is out of range"):
        timm.create_model(registered, features_only=True, out_indices=(5,))


def test_no_feature_maps():
    flat = NasNet(compile_source("space flat(input=3, resolution=4, classes=5)\n"
                                 "layer a = flatten > linear(8) > relu\nlayer classifier = linear(classes)\n").to_config())
    assert flat.feature_info == []
    with pytest.raises(ValueError, match="no feature maps: its first layer already flattens"):
        flat.forward_intermediates(torch.randn(1, 3, 4, 4))


def test_torchscript_and_fx(tiny, registered):
    import timm

    out, model, x, ref = tiny
    m = timm.create_model(registered, pretrained=True).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # torch.jit.script is deprecated, still supported
        warnings.simplefilter("ignore", UserWarning)     # about torch.fx's own GraphModule.__init__
        scripted = torch.jit.script(m)
        traced = torch.fx.symbolic_trace(m)
        traced_scripted = torch.jit.script(traced)          # no private torch aliases, no fx leaves
    with torch.no_grad():
        assert _close(scripted(x), ref)
        assert _close(traced(x), ref)
        assert _close(traced_scripted(x), ref)
    # fx's inference fusion folds every BN into its conv (the README's measured inference speed-up)
    from torch.fx.experimental.optimization import fuse

    fused = fuse(m)
    assert not [n for n, mod in fused.named_modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        assert _close(fused(x), ref)


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime/onnxscript not installed")
def test_onnx_matches(tiny):
    import onnxruntime as ort

    out, model, x, ref = tiny
    session = ort.InferenceSession(str(out / "nasdsl_tiny_test.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "input"
    for batch in (4, 1):
        (y,) = session.run(["logits"], {"input": x[:batch].numpy()})
        assert abs(torch.from_numpy(y) - ref[:batch]).max() <= 1e-4


def test_index_maps(tmp_path):
    """Blocks narrower than their layer and a selecting shortcut survive timm, TorchScript, fx and ONNX;
    contiguous channel ranges are zero-padded, scattered ones added by index."""
    import timm
    from nasdsl.export.timm import register

    net = _indexed_network()
    out, model = _export(tmp_path, net, "nasdsl_indexed_test", 2, onnx=HAS_ORT)
    module = (out / "nasdsl_indexed_test.py").read_text()
    assert "nn.functional.pad(self.b0(x), self.b0_pad)" in module                 # b0 writes channels 0-4 of 8
    assert "self.b0_pad = [0, 0, 0, 0, 0, 3]" in module
    assert "add_at(out, self.shortcut(x), self.shortcut_index, self.shortcut_spread)" in module
    assert 'torch.tensor([1, 3, 5, 7])' in module                                 # the shortcut's channels
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x)
        name = register(out)
        m = timm.create_model(name, pretrained=True).eval()
        assert _close(m(x), ref)
        assert _close(timm.create_model(f"local-dir:{out}", pretrained=True).eval()(x), ref)
        assert _close(nasdsl.load(out)(x), ref)
        cl = torch.channels_last   # (add_at and Select keep a channels-last map channels-last)
        m_cl = timm.create_model(name, pretrained=True).eval().to(memory_format=cl)
        assert _close(m_cl(x.contiguous(memory_format=cl)), ref)
        layers = [n for n, _ in m_cl.named_modules() if n.startswith("stages.") and n.count(".") == 2]
        assert layers and contiguous_maps(m_cl, x.contiguous(memory_format=cl), layers) == []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            assert _close(torch.jit.script(m)(x), ref)
            assert _close(torch.jit.script(torch.fx.symbolic_trace(m))(x), ref)
        assert _close(torch.fx.symbolic_trace(m)(x), ref)
    if HAS_ORT:
        import onnxruntime as ort
        session = ort.InferenceSession(str(out / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        (y,) = session.run(["logits"], {"input": x.numpy()})
        assert abs(torch.from_numpy(y) - ref).max() <= 1e-4
        assert _placement_ops(out / f"{name}.onnx") == PLACEMENT_OPS


# the generated code for _indexed_network selects once (the shortcut) and adds it at scattered
# channels once: one Gather each, and no scatter (the contiguous ranges are Pads)
PLACEMENT_OPS = {"Gather": 2}


def _placement_ops(file) -> dict:
    """How an ONNX file places channels: Gathers (fast), or scatters over full-size index maps."""
    import onnx

    ops = [node.op_type for node in onnx.load(str(file)).graph.node]
    return {op: ops.count(op) for op in ("Gather", "ScatterElements", "ScatterND") if op in ops}


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime/onnxscript not installed")
def test_onnx_dynamo_places_by_gather(tmp_path):
    """The dynamo exporter, too, places a narrow block's channels with a Gather, and matches PyTorch."""
    net = _indexed_network()
    out, _ = _export(tmp_path, net, "nasdsl_dynamo_test", 5)
    model = nasdsl.load(out)
    file = tmp_path / "indexed.onnx"
    exporter._run_onnx_export(model, file, (3, 16, 16), "dynamo")
    assert exporter._check_onnx(model, file, (3, 16, 16))[0] is None
    assert _placement_ops(file) == PLACEMENT_OPS


@pytest.mark.parametrize("name", ["1net", "my-net", "net.v2", "", "class", "json", "torch", "add_at", "default_cfgs",
                                  "SelectAdaptivePool2d", "resnet18", "ñet"])
def test_bad_name(tmp_path, name):
    net = compile_source(TINY)
    state = NasNet(net.to_config()).state_dict()
    with pytest.raises(NasdslError) as err:
        export_model(net, state, tmp_path / "out", name, preprocessing=prep(net))
    assert "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())


def test_bad_inputs(tmp_path):
    net = compile_source(TINY)
    state = NasNet(net.to_config()).state_dict()
    with pytest.raises(NasdslError, match="mean"):
        export_model(net, state, tmp_path / "out", "ok_name", preprocessing=prep(net, mean=(0.5, 0.5)))
    with pytest.raises(NasdslError, match="input_size"):
        export_model(net, state, tmp_path / "out", "ok_name",
                     preprocessing=Preprocessing((3, 16, 16), MEAN, STD))
    with pytest.raises(NasdslError, match="preprocessing must be"):
        export_model(net, state, tmp_path / "out", "ok_name", preprocessing={"mean": MEAN})
    with pytest.raises(NasdslError, match="state dict does not fit"):
        export_model(net, {k: v for k, v in list(state.items())[1:]}, tmp_path / "out", "ok_name",
                     preprocessing=prep(net))
    assert not any(tmp_path.iterdir())


def test_corrupt_files(tiny, tmp_path):
    from nasdsl.export.timm import register

    out = tiny[0]
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    for fn in (register, nasdsl.load):
        with pytest.raises(NasdslError, match="corrupt weights") as err:
            fn(bad)
        assert "model.safetensors" in str(err.value) and "\n" not in str(err.value)
    weights.unlink()
    with pytest.raises(NasdslError, match="missing weights") as err:
        nasdsl.load(bad)
    assert "model.safetensors" in str(err.value)
    (bad / "config.json").write_text("{not json")
    for fn in (register, nasdsl.load):
        with pytest.raises(NasdslError, match="corrupt config") as err:
            fn(bad)
        assert "config.json" in str(err.value)
    with pytest.raises(NasdslError, match="no such"):
        nasdsl.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NasdslError, match="not a nasdsl export"):
        nasdsl.load(tmp_path / "empty")


def test_broken_model_module(tiny, tmp_path):
    """A model module that is missing, cut short or raising is a one-line error naming the file."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny[0], bad)
    module = bad / "nasdsl_tiny_test.py"
    text = module.read_text()
    module.write_text(text[: text.index("# ---- timm")])
    with pytest.raises(NasdslError, match="no timm entrypoint section") as err:
        nasdsl.load(bad)
    assert str(module) in str(err.value) and "\n" not in str(err.value)
    module.write_text(text.replace("import torch\n", "import torch\nraise RuntimeError('boom\\nsecond line')\n", 1))
    with pytest.raises(NasdslError, match="cannot run the model module: RuntimeError: boom") as err:
        nasdsl.load(bad)
    assert "\n" not in str(err.value)
    module.unlink()
    with pytest.raises(NasdslError, match="the model module is missing"):
        nasdsl.load(bad)


def test_format_1_export_is_refused_and_reexported(tmp_path):
    """An export of an older nasdsl (format 1: NasNet's weights, the architecture in model_args) is
    refused with a one-line error naming its config; `nasdsl export` rewrites it as generated code."""
    from safetensors.torch import save_file

    from nasdsl.export.exporter import export_run
    from nasdsl.export.timm import register
    from nasdsl.graph.printer import to_space

    net = compile_source(INDEXED)
    model = _randomize(NasNet(net.to_config()), 8)
    old = tmp_path / "old"
    old.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(old / "model.safetensors"))
    (old / "old_net.space").write_text(to_space(net))
    (old / "old_net.py").write_text("# NasNet and _ARCH, as format 1 shipped them\n")
    (old / "config.json").write_text(json.dumps({
        "architecture": "old_net", "num_classes": 7, "num_features": 12,
        "pretrained_cfg": {**prep(net).to_timm_cfg(), "num_classes": 7, "classifier": "classifier"},
        "model_args": {"config": json.loads(json.dumps(net.to_config()))},
        "nasdsl": {"format": 1, "version": "0.0.9", "module": "old_net.py", "network": "idx",
                   "space": "old_net.space", "onnx": None}}))
    for fn in (nasdsl.load, register):
        with pytest.raises(NasdslError, match="exported by an older nasdsl") as err:
            fn(old)
        assert str(old / "config.json") in str(err.value) and "\n" not in str(err.value)
    new = export_run(old, tmp_path / "new", "nasdsl_from_format_1")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert _close(nasdsl.load(new)(x), model(x))


POINTWISE = """
space pw(input=3, resolution=2, classes=5)
layer stem = conv(8, k=3, stride=2) > bn > relu
layer m = mbconv(8, k=3, e=3) | mbconv(8, k=5, e=2)
layer classifier = gap > linear(classes)
"""


def _export_made_before(tmp_path: Path, monkeypatch, net, step: str, key: str):
    """An export of `net` (random weights) as nasdsl wrote it before merging did `step` (patched out
    here) and config.json recorded `key`, and the model it holds."""
    from nasdsl.derive import merge as merging

    with monkeypatch.context() as m:
        m.setattr(merging, step, lambda network, state: (network, state))
        old, model = _export(tmp_path, net, f"nasdsl_before_{key}", 9, space_text=to_space(net))
    config = json.loads((old / "config.json").read_text())
    del config["nasdsl"][key]
    (old / "config.json").write_text(json.dumps(config))
    return old, model


def test_an_export_made_before_one_tap_depthwise_convs_were_folded_is_reexported_as_it_was(tmp_path, monkeypatch):
    """Exports made before merging folded one-tap depthwise convs into their BN (merge._fold_scales)
    hold weights of the merged network without the fold (config.json has no `folded`): re-exported,
    they stay that network, and say so; a new export records the fold."""
    from nasdsl.derive.derive import cut_kernels, unpruned
    from nasdsl.export.exporter import export_run

    net, cut = cut_kernels(compile_source(POINTWISE))
    assert cut    # at 1x1 both kernels are their centre tap
    net = unpruned(net)   # as derivation leaves it: no gates, so the candidates merge
    old, model = _export_made_before(tmp_path, monkeypatch, net, "_fold_scales", "folded")
    new = export_run(old, tmp_path / "new", "nasdsl_after_fold")
    again = export_run(new, tmp_path / "again", "nasdsl_unfolded_again")
    folded, _ = _export(tmp_path, net, "nasdsl_folded", 9, space_text=to_space(net))
    folded_again = export_run(folded, tmp_path / "folded_again", "nasdsl_folded_again")
    x = torch.randn(2, 3, 2, 2)
    with torch.no_grad():
        for folder in (old, new, again, folded, folded_again):
            assert _close(nasdsl.load(folder)(x), model(x)), folder.name
            one_tap_depthwise = "groups=" in next(folder.glob("*.py")).read_text()
            recorded = json.loads((folder / "config.json").read_text())["nasdsl"].get("folded", False)
            assert one_tap_depthwise != recorded == (folder in (folded, folded_again)), folder.name
    code = (folded / "nasdsl_folded.py").read_text()   # named as the MBConv it is, without conv_dw
    assert "conv_pw > bn1 > act1 > bn2 > act2 > conv_pwl (its one-tap depthwise conv folded into bn2)" in code
    assert "self.bn2 = nn.BatchNorm2d" in code and "conv_dw" not in code and "bn1_2" not in code


def test_an_export_made_before_residual_streams_were_renumbered_is_reexported_as_it_was(tmp_path, monkeypatch):
    """Exports made before merging renumbered residual streams (merge.order_streams) hold weights of
    the merged network in the derivation's numbering, shortcuts added by index (config.json has no
    `ordered`): re-exported, they stay that network; a new export renumbers and records it."""
    from nasdsl.derive.derive import derive
    from nasdsl.export.exporter import export_run
    from test_merge import STREAM, _stream_masks

    net = compile_source(STREAM, "stream.space")
    derived = derive(net, _stream_masks(net)).network
    old, model = _export_made_before(tmp_path, monkeypatch, derived, "order_streams", "ordered")
    new = export_run(old, tmp_path / "new", "nasdsl_after_order")
    ordered, _ = _export(tmp_path, derived, "nasdsl_ordered", 9, space_text=to_space(derived))
    ordered_again = export_run(ordered, tmp_path / "ordered_again", "nasdsl_ordered_again")
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        for folder in (old, new, ordered, ordered_again):
            assert _close(nasdsl.load(folder)(x), model(x)), folder.name
            indexed = "add_at(" in next(folder.glob("*.py")).read_text()
            recorded = json.loads((folder / "config.json").read_text())["nasdsl"].get("ordered", False)
            assert indexed != recorded == (folder in (ordered, ordered_again)), folder.name


def test_overwrite_and_atomicity(tmp_path, monkeypatch):
    net = compile_source(TINY)
    model = _randomize(NasNet(net.to_config()), 5)
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(NasdslError, match="refusing to overwrite") as err:
        export_model(net, model.state_dict(), target, "tiny_a", preprocessing=prep(net))
    assert "\n" not in str(err.value)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]

    (target / "notes.txt").unlink()          # an empty folder is fine
    export_model(net, model.state_dict(), target, "tiny_a", preprocessing=prep(net), space_text="space a()")
    model_b = _randomize(NasNet(net.to_config()), 6)
    export_model(net, model_b.state_dict(), target, "tiny_b", preprocessing=prep(net))   # replaces an export
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "tiny_b.py"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _close(nasdsl.load(target)(x), model_b(x))

    # a failing export leaves the previous one as it was and no temp folder behind
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    monkeypatch.setattr(exporter, "_save_weights", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        export_model(net, model.state_dict(), target, "tiny_c", preprocessing=prep(net))
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime/onnxscript not installed")
def test_onnx_dynamo_fallback_and_mismatch(tmp_path, monkeypatch):
    """The dynamo exporter takes over when the TorchScript one fails; a mismatch of both is an error."""
    net = compile_source(TINY)
    model = _randomize(NasNet(net.to_config()), 7)
    real = exporter._run_onnx_export

    def no_torchscript(model, file, input_size, kind):
        if kind == "torchscript":
            raise RuntimeError("pretend the TorchScript exporter is gone")
        return real(model, file, input_size, kind)

    monkeypatch.setattr(exporter, "_run_onnx_export", no_torchscript)
    out = export_model(net, model.state_dict(), tmp_path / "dyn", "tiny_dyn", preprocessing=prep(net), onnx=True)
    info = json.loads((out / "config.json").read_text())["nasdsl"]["onnx"]
    assert info["exporter"] == "dynamo" and info["file"] == "tiny_dyn.onnx" and info["max_abs_diff"] <= 1e-4
    assert (out / "tiny_dyn.onnx").is_file()

    monkeypatch.setattr(exporter, "_run_onnx_export", real)
    monkeypatch.setattr(exporter, "ONNX_TOLERANCE", -1.0)
    with pytest.raises(NasdslError, match="ONNX export failed: torchscript exporter: max .* dynamo exporter: max"):
        export_model(net, model.state_dict(), tmp_path / "bad", "tiny_onnx", preprocessing=prep(net), onnx=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dyn"]


def test_import_nasdsl_is_light():
    script = textwrap.dedent("""
        import sys, nasdsl
        assert "torch" not in sys.modules, "import nasdsl imported torch"
        assert callable(nasdsl.load) and nasdsl.load.__module__ == "nasdsl.api"
        try:
            nasdsl.nothing
        except AttributeError:
            pass
        else:
            raise SystemExit("nasdsl.nothing exists")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# --------------------------------------------------------------------------- preprocessing carried into the export

SMALL = """
space {name}(input={channels}, resolution={resolution}, classes={classes})
layer stem = conv(4, k=3, stride=2) > bn > relu
layer classifier = gap > linear(classes)
"""


def _export_for(data, tmp: Path, name: str) -> tuple[Path, torch.nn.Module]:
    """A small random network for `data`'s input, exported with the bundle's preprocessing, loaded back
    through timm (its module registered, pretrained weights from the folder)."""
    import timm
    from nasdsl.export.timm import register

    net = compile_source(SMALL.format(name=name, channels=data.in_channels, resolution=data.resolution,
                                      classes=data.num_classes))
    model = _randomize(NasNet(net.to_config()), 11)
    out = export_model(net, model.state_dict(), tmp / name, name, preprocessing=data.preprocessing)
    return out, timm.create_model(register(out), pretrained=True).eval()


def test_export_of_uncropped_data_advertises_no_crop(tmp_path):
    """digits and CIFAR are measured on whole images: timm must not resize-and-crop them (crop_pct 1.0)."""
    import timm.data
    from test_data import write_cifar10

    cifar = write_cifar10(tmp_path / "c10")
    for spec, res, name in (("digits", 16, "nasdsl_digits_prep"), (f"cifar10:{cifar}", 32, "nasdsl_cifar_prep")):
        data = build_data(spec, res)
        out, m = _export_for(data, tmp_path, name)
        cfg = json.loads((out / "config.json").read_text())["pretrained_cfg"]
        assert {k: cfg[k] for k in data.preprocessing.to_dict()} == data.preprocessing.to_dict()
        assert cfg["crop_pct"] == 1.0
        assert {k: m.pretrained_cfg[k] for k in data.preprocessing.to_timm_cfg()} == data.preprocessing.to_timm_cfg()
        resolved = timm.data.resolve_data_config({}, model=m)
        assert resolved["crop_pct"] == 1.0 and resolved["input_size"] == data.preprocessing.input_size


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_timm_eval_transform_reproduces_validation(tmp_path, mode):
    """Through the export alone, timm's standard eval transform gives each val image exactly the
    tensor nasdsl measured top-1 on (non-square images, RGB and grayscale)."""
    import timm.data
    from PIL import Image
    from test_data import write_folder

    data = build_data(f"imagefolder:{write_folder(tmp_path / 'imgs', (31, 23), mode)}", 20)
    assert data.in_channels == (3 if mode == "RGB" else 1)
    out, m = _export_for(data, tmp_path, f"nasdsl_folder_{mode.lower()}")
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=m))
    assert len(data.val) == 8
    for i, (path, _) in enumerate(data.val.samples):
        ours = data.val[i][0]
        theirs = transform(Image.open(path).convert(mode))
        assert theirs.shape == ours.shape == data.preprocessing.input_size
        assert torch.allclose(theirs, ours, atol=1e-6, rtol=0)
    with torch.no_grad():
        m(torch.stack([data.val[i][0] for i in range(2)]))


def test_export_run_keeps_preprocessing(tmp_path):
    """A re-export carries the saved preprocessing; an old digits run's 0.875 crop is put right."""
    from nasdsl.export.exporter import export_run
    from nasdsl.graph.printer import to_space

    data = build_data(f"imagefolder:{_folder(tmp_path)}", 20)
    net = compile_source(SMALL.format(name="again", channels=3, resolution=20, classes=2))
    state = _randomize(NasNet(net.to_config()), 3).state_dict()
    export_model(net, state, tmp_path / "first", "nasdsl_first", preprocessing=data.preprocessing,
                 space_text=to_space(net))
    again = export_run(tmp_path / "first", tmp_path / "again", "nasdsl_again")
    cfg = json.loads((again / "config.json").read_text())["pretrained_cfg"]
    assert Preprocessing.from_timm_cfg(cfg) == data.preprocessing and cfg["crop_pct"] == 0.875

    run = tmp_path / "old_run"
    old = Preprocessing((3, 20, 20), MEAN, STD, crop_pct=0.875)   # what every export used to say
    export_model(net, state, run / "model", "nasdsl_old", preprocessing=old, space_text=to_space(net))
    (run / "manifest.json").write_text(json.dumps({"data": "fake"}))
    fixed = export_run(run, tmp_path / "fixed", "nasdsl_fixed")
    assert json.loads((fixed / "config.json").read_text())["pretrained_cfg"]["crop_pct"] == 1.0


def _folder(tmp: Path) -> Path:
    from test_data import write_folder
    return write_folder(tmp / "imgs", (26, 20), "RGB", per_class=1)


def test_an_export_that_would_not_compute_the_derived_network_is_refused(tmp_path, monkeypatch):
    """The exporter runs the generated model against the derived network it was given before it
    writes anything: a merge that broke the function (here one BN statistic off) is caught."""
    from nasdsl.derive import merge as merge_module

    real = merge_module.merge

    def broken(network, state, **kw):
        merged, merged_state = real(network, state, **kw)
        key = next(k for k in merged_state if k.endswith("running_mean"))
        return merged, {**merged_state, key: merged_state[key] + 1.0}

    monkeypatch.setattr(merge_module, "merge", broken)
    net = compile_source(TINY, "tiny.space")
    with pytest.raises(NasdslError, match="differs from the derived network"):
        _export(tmp_path, net, "tiny_broken", seed=3)
    assert not (tmp_path / "tiny_broken").exists()
    monkeypatch.setattr(merge_module, "merge", real)
    out, model = _export(tmp_path, net, "tiny_ok", seed=3)
    assert (out / "model.safetensors").is_file()


def test_a_mixnet_block_on_a_1x1_map_exports_with_its_depthwise_conv_folded(tmp_path):
    """A MixNet block (split 1x1 convs: mixconvs) whose single-kernel depthwise conv is one tap on a
    1x1 map: merging folds it, and the generated code names the block as an MBConv without conv_dw."""
    from nasdsl.derive.derive import cut_kernels, unpruned

    text = """
space mixpw(input=3, resolution=2, classes=5)
layer stem = conv(8, k=3, stride=2) > bn > relu
layer m = mbconv(8, k=3, e=3, act=silu, expand_split=2, project_split=2)
layer classifier = gap > linear(classes)
"""
    net = unpruned(cut_kernels(compile_source(text))[0])
    out, model = _export(tmp_path, net, "nasdsl_mixpw", 3, space_text=to_space(net))
    code = " ".join((out / "nasdsl_mixpw.py").read_text().split())   # (the docstring wraps)
    assert "conv_pw > bn1 > act1 > bn2 > act2 > conv_pwl > bn3 (its one-tap depthwise conv folded into bn2)" in code
    assert "self.conv_pw = MixConv(" in code and "conv_dw" not in code
    x = torch.randn(2, 3, 2, 2)
    with torch.no_grad():
        assert _close(nasdsl.load(out)(x), model(x))


@pytest.mark.skipif(not HAS_ORT, reason="needs onnxruntime and onnxscript")
def test_onnx_is_checked_against_the_logits_scale_not_an_absolute_difference(tmp_path):
    """Logits in the thousands (an untrained network, random BN statistics) agree between
    onnxruntime and PyTorch to float rounding of their size, as the generated model is checked
    (1e-4 of max(1, |logits|)); an absolute 1e-4 refused such an export."""
    net = compile_source(TINY)
    model = _randomize(NasNet(net.to_config()), 4)
    with torch.no_grad():
        model.classifier.weight.mul_(1e5)
    out = export_model(net, model.state_dict(), tmp_path / "big", "nasdsl_big_logits", preprocessing=prep(net),
                       onnx=True)
    onnx = json.loads((out / "config.json").read_text())["nasdsl"]["onnx"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        scale = float(model(x).abs().max())
    assert scale > 1e3 and onnx["max_abs_diff"] <= 1e-4 * scale
