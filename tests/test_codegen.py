"""Generated model code (nasdsl/export/codegen.py): on every shipped space with random gates, the
exported model computes what the derived (slim) NasNet computes, loads through timm in a process
that never imports nasdsl, scripts, traces, exports to ONNX and keeps timm's model contract; and
the code reads like timm's (op names, shared classes, only torch/timm/stdlib imports)."""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import warnings
import zlib
from functools import lru_cache
from pathlib import Path

import pytest
import torch

import nasdsl
from nasdsl.derive.derive import derive
from nasdsl.derive.merge import merge
from nasdsl.export import codegen, exporter
from nasdsl.export.exporter import export_model
from nasdsl.export.timm import register
from nasdsl.graph.printer import to_space
from nasdsl.language.compiler import compile_source
from nasdsl.supernet.network import feature_points
from nasdsl.train.data import Preprocessing
from test_derive import FILES, compiled, random_masks, slim_and_masked, supernet

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnxscript") is not None
STEMS = [p.stem for p in FILES]

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),      # torch.jit.script: deprecated, supported
              pytest.mark.usefixtures("one_thread")]


def prep(network) -> Preprocessing:
    s = network.input_shape
    return Preprocessing((s.channels, *s.size), (0.5,) * s.channels, (0.25,) * s.channels)


@lru_cache(maxsize=None)
def derived(stem: str):
    """A derived network of the space (random gates keeping ~40% of the channels) and its slim
    NasNet with weights sliced from the randomised, hard-masked supernet."""
    net = compiled(stem)
    masks, strength = random_masks(net, "0.4", seed=zlib.crc32(f"codegen:{stem}".encode()))
    d = derive(net, masks, strength)
    return d, slim_and_masked(d, supernet(stem), seed=3)


def assert_same(got: torch.Tensor, ref: torch.Tensor) -> None:
    scale = max(1.0, float(ref.abs().max()))
    assert got.shape == ref.shape
    err = float((got - ref).abs().max())
    assert err <= 1e-4 * scale, f"generated model and slim NasNet differ by {err:.3g} (logits up to {scale:.3g})"


def assert_same_channels(got: torch.Tensor, ref: torch.Tensor) -> None:
    """got holds ref's channels (dim 1), in some order: merging renumbers each residual stream in the
    order its channels join it (merge.order_streams), so a feature map's channels move."""
    from scipy.optimize import linear_sum_assignment

    assert got.shape == ref.shape
    flat = lambda t: t.transpose(0, 1).reshape(t.shape[1], -1)   # noqa: E731 - one row a channel
    _, order = linear_sum_assignment(torch.cdist(flat(got), flat(ref)).numpy())
    assert_same(got, ref[:, torch.as_tensor(order)])


class Exports(dict):
    """stem -> (folder, name, slim NasNet, x, slim(x)): each shipped space derived and exported on
    first use (so no single test pays for all of them)."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, stem: str):
        d, slim = derived(stem)
        name = f"nasdsl_cg_{stem}"
        folder = export_model(d.network, slim.state_dict(), self.root / stem, name, preprocessing=prep(d.network),
                              space_text=to_space(d.network))
        x = torch.randn(2, *d.network.input_shape.to_list(), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            self[stem] = (folder, name, slim, x, slim(x))
        return self[stem]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return Exports(tmp_path_factory.mktemp("codegen"))


def test_every_space_is_covered():
    assert len(STEMS) >= 8 and "proxyless" in STEMS


@pytest.mark.parametrize("stem", STEMS)
def test_generated_equals_derived(exports, stem):
    folder, name, slim, x, ref = exports[stem]
    model = nasdsl.load(folder)
    assert type(model).__name__ == json.loads((folder / "config.json").read_text())["nasdsl"]["model"]
    with torch.no_grad():
        assert_same(model(x), ref)
        assert float((ref[0] - ref[1]).abs().max()) > 1e-5    # the input matters
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # torch.fx's own GraphModule.__init__ annotations
        scripted = torch.jit.script(model)
        traced = torch.fx.symbolic_trace(model)
        traced_scripted = torch.jit.script(traced)
    with torch.no_grad():
        for m in (scripted, traced, traced_scripted):
            assert_same(m(x), ref)


@pytest.mark.parametrize("stem", STEMS)
def test_timm_contract(exports, stem):
    """features_only (the slim NasNet's maps at its feature points), reset_classifier keeping the
    pooling, forward_head(pre_logits), group_matcher naming real parameters, TypeError on other
    constructor arguments."""
    import timm

    folder, name, slim, x, ref = exports[stem]
    assert register(folder) == name
    feats = timm.create_model(name, pretrained=True, features_only=True).eval()
    points = [i for i, _ in feature_points(slim.config)]
    with torch.no_grad():
        maps, h, expect = feats(x), x, []
        for i, layer in enumerate(slim.layers):
            h = layer(h)
            if i in points:
                expect.append(h)
        assert len(maps) == len(expect) == len(feats.feature_info.channels())
        for got, want in zip(maps, expect):
            assert_same_channels(got, want)
        m = timm.create_model(name, pretrained=True).eval()
        pool = m.global_pool
        assert_same_channels(m.forward_head(m.forward_features(x), pre_logits=True),
                    slim.forward_head(slim.forward_features(x), pre_logits=True))
        m.reset_classifier(3, global_pool=None)
        assert m.global_pool is pool and m(x).shape == (2, 3)
    last = derived(stem)[0].network.layers[-1].blocks[0].ops
    assert m.head_drop.p == (last[-2].attrs["p"] if last[-2].kind == "dropout" else 0.0)   # drop_rate's default
    groups = timm.models.group_parameters(m, m.group_matcher())
    named = {n for n, _ in m.named_parameters() if n.startswith("stages.")}
    assert named <= {n for names in groups.values() for n in names}
    with pytest.raises(TypeError, match="not_a_model_arg"):
        timm.create_model(name, not_a_model_arg=1)


def test_timm_loads_every_export_without_nasdsl(exports, tmp_path):
    """A fresh interpreter with only torch and timm: local-dir and the registered name both load the
    weights of every export and give the slim NasNet's logits."""
    inputs = {stem: (str(exports[stem][0]), exports[stem][1], exports[stem][3]) for stem in STEMS}
    torch.save(inputs, tmp_path / "in.pt")
    script = textwrap.dedent(f"""
        import importlib, sys
        import torch, timm
        inputs = torch.load({str(tmp_path / 'in.pt')!r})
        outputs = {{}}
        for stem, (folder, name, x) in inputs.items():
            sys.path.insert(0, folder)
            importlib.import_module(name)
            a = timm.create_model("local-dir:" + folder, pretrained=True).eval()
            b = timm.create_model(name, pretrained=True).eval()
            try:
                timm.create_model(name, not_a_model_arg=1)
            except TypeError:
                pass
            else:
                raise SystemExit("an unknown constructor argument was accepted")
            with torch.no_grad():
                outputs[stem] = (a(x), b(x))
        assert not any(m == "nasdsl" or m.startswith("nasdsl.") for m in sys.modules)
        torch.save(outputs, {str(tmp_path / 'out.pt')!r})
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = torch.load(tmp_path / "out.pt")
    for stem, (a, b) in outputs.items():
        assert_same(a, exports[stem][4])
        assert_same(b, exports[stem][4])


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime/onnxscript not installed")
@pytest.mark.parametrize("stem", ["proxyless", "resnet56_cifar", "vgg16_cifar"])
def test_onnx(exports, stem):
    """The generated model exports to ONNX (a merged MBConv stack, indexed residual adds, a flatten
    head) and onnxruntime computes what PyTorch does; channels are never placed by a scatter."""
    folder, name, slim, x, ref = exports[stem]
    model = nasdsl.load(folder)
    file = folder.parent / f"{stem}.onnx"
    exporter._run_onnx_export(model, file, tuple(x.shape[1:]), "torchscript")
    assert exporter._check_onnx(model, file, tuple(x.shape[1:]))[0] is None
    import onnx
    ops = {node.op_type for node in onnx.load(str(file)).graph.node}
    assert not ops & {"ScatterElements", "ScatterND"}


def test_mixconv(tmp_path):
    """A merge that keeps one depthwise conv per kernel (mixconv) generates network.py's MixConv,
    copied, and computes the derived network's logits in PyTorch, TorchScript, fx and ONNX."""
    d, slim = derived("proxyless")
    network, state = merge(d.network, slim.state_dict(), depthwise="mixed")
    assert any(op.kind == "mixconv" for layer in network.layers for op in layer.all_ops())
    out = exporter._write(network, state, None, tmp_path / "mix", "nasdsl_mixconv", preprocessing=prep(network),
                          space_text=None, onnx=HAS_ORT, source=d.network)
    text = (out / "nasdsl_mixconv.py").read_text()
    assert "class MixConv(nn.Module):" in text and "MixConv(" in text.split("class MBConv", 1)[1]
    model = nasdsl.load(out)
    x = torch.randn(2, *network.input_shape.to_list(), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = slim(x)
        assert_same(model(x), ref)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            assert_same(torch.jit.script(torch.fx.symbolic_trace(model))(x), ref)
    if HAS_ORT:
        assert json.loads((out / "config.json").read_text())["nasdsl"]["onnx"]["max_abs_diff"] <= 1e-4


def test_reexport_rebuilds_the_merged_network(exports, tmp_path):
    """`nasdsl export` of an export: the .space file (the derived network) merged again gives the
    same generated code, and the saved weights load into it as they are."""
    from nasdsl.export.exporter import export_run

    folder, name, slim, x, ref = exports["proxyless"]
    again = export_run(folder, tmp_path / "again", "nasdsl_cg_again")
    first, second = (folder / f"{name}.py").read_text(), (again / "nasdsl_cg_again.py").read_text()
    renamed = first.replace(name, "nasdsl_cg_again").replace(codegen.camel(name), "NasdslCgAgain")
    code = lambda text: [ast.dump(node) for node in ast.parse(text).body[1:]]  # noqa: E731 - no comments, docstring
    assert code(second) == code(renamed)
    with torch.no_grad():
        assert_same(nasdsl.load(again)(x), ref)


def test_unmerged_network(tmp_path):
    """Code generation needs no merge: the derived ProxylessNAS network as it is (parallel blocks,
    each at its channels) computes the slim NasNet's logits."""
    d, slim = derived("proxyless")
    assert any(len(layer.blocks) > 1 and any(b.index for b in layer.blocks) for layer in d.network.layers)
    out = exporter._write(d.network, slim.state_dict(), None, tmp_path / "raw", "nasdsl_unmerged",
                          preprocessing=prep(d.network), space_text=None, onnx=False, source=d.network)
    text = (out / "nasdsl_unmerged.py").read_text()
    assert "class ParallelMBConv(nn.Module):" in text and "add_at(" in text
    model = nasdsl.load(out)
    x = torch.randn(2, *d.network.input_shape.to_list(), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert_same(model(x), slim(x))
        assert_same(torch.fx.symbolic_trace(model)(x), slim(x))


# ---- the code itself -----------------------------------------------------------------------------
def test_proxyless_reads_like_timm(exports):
    """A derived ProxylessNAS network: merged MBConvs sharing a class, timm's op names, a small
    config.json, and imports of torch, timm and the standard library only."""
    folder, name, _, _, _ = exports["proxyless"]
    text = (folder / f"{name}.py").read_text()
    tree = ast.parse(text)
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"os", "collections", "typing", "torch", "timm"}, imported
    classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
    assert "MBConv" in classes and len(classes) <= 8, classes
    for attr in ("conv_pw", "bn1", "act1", "conv_dw", "bn2", "act2", "conv_pwl"):
        assert f"self.{attr} = " in text
    assert text.count("MBConv(") + text.count("MBConv2(") >= 15      # one class for many layers
    assert len(text.splitlines()) < 600 and (folder / "config.json").stat().st_size < 5_000
    assert not [line for line in text.splitlines() if len(line) > 120]
    top = {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    assert top - set(classes) == {name} | ({"spread_index", "place", "add_at", "_select", "_channels_last", "_index_add"} & top)


def test_op_names_follow_timm():
    net = compile_source("space t(input=3, resolution=8, classes=2)\n"
                         "layer m = mbconv(8, k=3, e=2)\nlayer r = basic(8)\nlayer f = mbconv(8, k=3, e=1)\n"
                         "layer classifier = flatten > linear(16) > relu > dropout(0.5) > linear(classes)\n")
    m, r, f, head = net.layers
    assert [n for n in codegen.op_names(m.blocks[0].ops) if n] == \
        ["conv_pw", "bn1", "act1", "conv_dw", "bn2", "act2", "conv_pwl", "bn3"]
    assert [n for n in codegen.op_names((*r.blocks[0].ops, *r.post)) if n] == \
        ["conv1", "bn1", "act1", "conv2", "bn2", "act2"]
    assert [n for n in codegen.op_names(f.blocks[0].ops) if n] == ["conv_dw", "bn1", "act1", "conv_pw", "bn2"]
    assert codegen.op_names(head.blocks[0].ops) == ["flatten", "fc1", "act1", "drop1", "fc2"]
    g = codegen.generate(net, "op_names_test", {"url": ""})
    assert g.names[(3, "block", 0, 1)] == "pre_logits.fc" and g.names[(3, "block", 0, 3)] == "head_drop"
    assert g.pretrained_cfg["first_conv"] == "stages.0.0.conv_pw" and g.pretrained_cfg["classifier"] == "classifier"


def test_literals_and_names():
    assert codegen.literal((0, 1, 2, 3, 7, 9, 10, 11, 12, 13)) == "[*range(4), 7, *range(9, 14)]"
    assert codegen.literal((1, 2, 3)) == "[1, 2, 3]" and codegen.literal(0.001) == "0.001"
    assert codegen.camel("proxyless_slim") == "ProxylessSlim"
    net = compile_source("space t(input=3, resolution=8, classes=2)\nlayer a = conv(4, k=3) > bn > relu\n"
                         "layer classifier = gap > linear(classes)\n")
    assert codegen.generate(net, "ConvBnAct", {})  .class_name == "ConvBnActModel"
    assert "class ConvBnAct2(nn.Module)" in codegen.generate(net, "ConvBnAct", {}).text
