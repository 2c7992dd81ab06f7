"""Export a derived network as a folder that timm (and only timm + torch) can use.

    OUT/
      {name}.py           nasdsl/supernet/network.py verbatim + default_cfgs + @register_model {name}
      model.safetensors   the weights (NasNet state dict)
      config.json         timm's local-dir config: architecture, num_classes, num_features,
                          pretrained_cfg, model_args.config (the architecture), nasdsl (the marker)
      {name}.space        the derived architecture as a .space file (when given)
      {name}.onnx         with onnx=True, checked against PyTorch with onnxruntime

With the module imported, `timm.create_model("local-dir:OUT")` builds the network and loads the
weights; `timm.create_model("{name}", pretrained=True)` does too (the module points its default
pretrained cfg at the model.safetensors beside it; nasdsl.export.timm.register imports it).

The folder is built next to OUT and renamed into place: an export is complete or absent.
"""
from __future__ import annotations

import ast
import contextlib
import io
import json
import keyword
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from nasdsl._version import __version__
from nasdsl.errors import NasdslError
from nasdsl.export.load import CONFIG, FORMAT, MARKER, WEIGHTS

if TYPE_CHECKING:
    from nasdsl.train.data import Preprocessing

ONNX_TOLERANCE = 1e-4
ONNX_OPSET = 18
# top-level modules an export's name must not shadow (it is imported and put in sys.modules by that name)
_PROTECTED_MODULES = {"torch", "torchvision", "timm", "nasdsl", "safetensors", "numpy", "onnx", "onnxscript",
                      "onnxruntime", "huggingface_hub", "PIL", "yaml", "lark", "networkx"}


def export_model(network, state_dict: dict, out_dir: str | Path, name: str, *, preprocessing: Preprocessing,
                 space_text: str | None = None, onnx: bool = False) -> Path:
    """Write the export folder `out_dir` for `network` (a graph IR Network) with `state_dict`.

    `state_dict` is the slim NasNet's (`NasNet(network.to_config())`), loaded strictly.
    `preprocessing` is the data's (DataBundle.preprocessing): the pretrained_cfg in the module's
    default_cfgs and in config.json carries exactly its `to_timm_cfg()`, so timm's eval transform
    feeds the model what nasdsl measured it on. Returns `out_dir`.
    """
    out_dir = Path(out_dir)
    check_export_name(name)
    _check_target(out_dir)
    input_size = _input_size(network)
    _check_preprocessing(preprocessing, input_size)
    if onnx:
        _require_onnx()

    arch = _json_config(network)
    model = _model(arch, state_dict)
    weights = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    first_conv = _first_convs(arch)
    pretrained_cfg = {
        **preprocessing.to_timm_cfg(),
        "fixed_input_size": False,
        "num_classes": model.num_classes,
        "pool_size": _pool_size(network, model.feature_layers),
        "first_conv": first_conv[0] if len(first_conv) == 1 else (tuple(first_conv) or None),
        "classifier": "classifier",
        "description": f"{network.name} searched with nasdsl (DNAL) and exported by nasdsl {__version__}",
    }
    module_text = _module_text(name, arch, pretrained_cfg, network, sum(v.numel() for v in weights.values()))
    config = {
        "architecture": name,
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "pretrained_cfg": pretrained_cfg,
        "model_args": {"config": arch},
        MARKER: {"format": FORMAT, "version": __version__, "module": f"{name}.py", "network": network.name,
                 "space": f"{name}.space" if space_text is not None else None,
                 "onnx": None},
    }

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / f"{name}.py").write_text(module_text)
        _save_weights(weights, tmp / WEIGHTS, name)
        if onnx:
            config[MARKER]["onnx"] = {"file": f"{name}.onnx", **_export_onnx(model, tmp / f"{name}.onnx", input_size)}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if space_text is not None:
            (tmp / f"{name}.space").write_text(space_text if space_text.endswith("\n") else space_text + "\n")
        _publish_modes(tmp)
        _swap(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ---- checks ------------------------------------------------------------------------------------
def check_export_name(name) -> None:
    """Raise a NasdslError when `name` cannot name an export (the run's plan checks it before training)."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise NasdslError(f"export name {name!r} is not a Python identifier (letters, digits, _; "
                          f"not starting with a digit): it names the model module and its timm entrypoint")
    if keyword.iskeyword(name):
        raise NasdslError(f"export name {name!r} is a Python keyword")
    reserved = _module_names()
    if name in reserved:
        raise NasdslError(f"export name {name!r} clashes with a name the model module defines; pick another")
    if name in sys.stdlib_module_names or name in _PROTECTED_MODULES or \
            (name in sys.modules and not hasattr(sys.modules[name], "__nasdsl_export__")):
        raise NasdslError(f"export name {name!r} would shadow the Python module {name!r}; pick another")
    import timm.models

    if timm.models.is_model(name) and timm.models.model_entrypoint(name).__module__.startswith("timm."):
        raise NasdslError(f"export name {name!r} is one of timm's own models; pick another")


def _check_target(out_dir: Path) -> None:
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise NasdslError("export target exists and is not a folder", file=str(out_dir))
    if out_dir.is_dir() and any(out_dir.iterdir()) and not _is_export(out_dir):
        raise NasdslError("refusing to overwrite a non-empty folder that is not a nasdsl export", file=str(out_dir))


def _is_export(folder: Path) -> bool:
    try:
        cfg = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and isinstance(cfg.get(MARKER), dict)


def _input_size(network) -> tuple:
    shape = network.input_shape
    if len(shape.size) != 2:
        raise NasdslError(f"timm export needs an image input (channels x height x width), got {shape}")
    return (shape.channels, *shape.size)


def _check_preprocessing(preprocessing, input_size: tuple) -> None:
    """The preprocessing must be a Preprocessing (it checks its own values) for this network's input."""
    from nasdsl.train.data import Preprocessing

    if not isinstance(preprocessing, Preprocessing):
        raise NasdslError("preprocessing must be a nasdsl.train.data.Preprocessing, "
                          f"got {type(preprocessing).__name__}")
    if tuple(preprocessing.input_size) != tuple(input_size):
        raise NasdslError(f"preprocessing input_size {preprocessing.input_size} does not fit the network's input "
                          f"{tuple(input_size)}")


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise NasdslError(f"ONNX export needs onnx, onnxscript and onnxruntime (missing {exc.name}): "
                          f"pip install onnx onnxscript onnxruntime") from None


# ---- the pieces --------------------------------------------------------------------------------
def _json_config(network) -> dict:
    """network.to_config() as JSON has it (lists, not tuples): the literal, config.json and NasNet agree."""
    try:
        return json.loads(json.dumps(network.to_config(), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise NasdslError(f"network {network.name!r} has a setting JSON cannot hold: {exc}") from None


def _model(arch: dict, state_dict: dict):
    from nasdsl.supernet.network import NasNet

    try:
        model = NasNet(arch)
    except (ValueError, KeyError) as exc:
        raise NasdslError(f"cannot export this network: {exc}") from None
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise NasdslError(f"the state dict does not fit the network: {detail[:300]}") from None
    return model.eval()


def _first_convs(arch: dict) -> list[str]:
    """State-dict prefixes of the convs that read the input image (timm adapts them to in_chans)."""
    channels = arch["input"][0]
    for i, layer in enumerate(arch["layers"][:-1]):
        found = []
        paths = [(f"layers.{i}.blocks.{j}.ops", b["ops"]) for j, b in enumerate(layer["blocks"])]
        if layer["shortcut"]:
            paths.append((f"layers.{i}.shortcut.ops", layer["shortcut"]["ops"]))
        for prefix, ops in paths:
            for k, op in enumerate(ops):
                if op["kind"] == "conv":
                    if op["in"] == channels and op["groups"] == 1:
                        found.append(f"{prefix}.{k}")
                    break
                if op["kind"] in ("select", "flatten", "linear"):
                    break
        if found or any(op["kind"] == "conv" for _, ops in paths for op in ops):
            return found
    return []


def _pool_size(network, feature_layers: int):
    shape = network.layers[feature_layers - 1].out_shape if feature_layers else network.input_shape
    return tuple(shape.size) if len(shape.size) == 2 else None


def _source() -> str:
    """nasdsl/supernet/network.py, the one source of the torch model, read as it is now."""
    from nasdsl.supernet import network as net_module

    text = Path(net_module.__file__).read_text()
    if re.search(r"^\s*(from|import)\s+nasdsl\b", text, re.M):
        raise NasdslError("nasdsl/supernet/network.py imports nasdsl: it can no longer be shipped standalone")
    return text


def _module_names() -> set[str]:
    """Top-level names of the generated module other than the entrypoint (a name must not clash)."""
    tree = ast.parse(_source() + _GENERATED.format(name="_nasdsl_entrypoint_", version="", marker="{}",
                                                   arch="{}", cfg="{}", title="", params=""))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    names.discard("_nasdsl_entrypoint_")
    return names | {"annotations"}


_GENERATED = '''

# ----------------------------------------------------------------------------------------------
# Generated by nasdsl {version}: the timm entrypoint `{name}`. Everything above is nasdsl's torch
# builder (nasdsl/supernet/network.py) copied verbatim; this module needs only torch and timm.
#
#     import timm, {name}          # with this folder on sys.path
#     model = timm.create_model("{name}", pretrained=True)                 # model.safetensors here
#     model = timm.create_model("local-dir:THIS_FOLDER", pretrained=True)  # config.json + weights
# ----------------------------------------------------------------------------------------------
import os as _os

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

__nasdsl_export__ = {marker}

_ARCH = {arch}

_WEIGHTS = _os.path.join(_os.path.dirname(_os.path.abspath(globals().get("__file__") or ".")),
                         "model.safetensors")

_PRETRAINED_CFG = {cfg}

default_cfgs = generate_default_cfgs({{
    "{name}": {{**_PRETRAINED_CFG, "file": _WEIGHTS if _os.path.isfile(_WEIGHTS) else None}},
}})


@register_model
def {name}(pretrained=False, **kwargs):
    """{title}: {params} parameters (`config=` builds another nasdsl architecture)."""
    config = kwargs.pop("config", None) or _ARCH
    features = {{"feature_cls": "getter", "out_indices": tuple(range(len(feature_points(config))))}}
    return build_model_with_cfg(NasNet, "{name}", pretrained, config=config, feature_cfg=features, **kwargs)
'''


def _module_text(name: str, arch: dict, cfg: dict, network, params: int) -> str:
    marker = {"format": FORMAT, "version": __version__, "name": name}
    text = _source().rstrip("\n") + "\n" + _GENERATED.format(
        name=name, version=__version__, marker=repr(marker),
        arch=_literal(arch, 0, 8), cfg=_literal(cfg, 0, 18),
        title=f"{network.name} searched with nasdsl".replace('"', "'"), params=f"{params:,}")
    compile(text, f"{name}.py", "exec")   # a generated module that does not parse is our bug: fail here
    return text


def _literal(value, indent: int, lead: int = 0, width: int = 110) -> str:
    """A Python literal of JSON-like data: one line where it fits, else one item per line.

    `indent` is the indentation of the line it starts on, `lead` the columns a key takes there."""
    flat = repr(value)
    leaf = isinstance(value, dict) and not any(  # an op: one line
        isinstance(v, dict) or (isinstance(v, (list, tuple)) and any(isinstance(i, (dict, list)) for i in v))
        for v in value.values())
    if leaf or indent + lead + len(flat) + 1 <= width or not isinstance(value, (dict, list, tuple)) or not value:
        return flat
    pad = " " * (indent + 4)
    if isinstance(value, dict):
        items = [f"{pad}{k!r}: {_literal(v, indent + 4, len(repr(k)) + 2, width)}," for k, v in value.items()]
        return "{\n" + "\n".join(items) + "\n" + " " * indent + "}"
    items = [f"{pad}{_literal(v, indent + 4, 0, width)}," for v in value]
    opening, closing = ("[", "]") if isinstance(value, list) else ("(", ")")
    return opening + "\n" + "\n".join(items) + "\n" + " " * indent + closing


def _save_weights(weights: dict, file: Path, name: str) -> None:
    from safetensors.torch import save_file

    save_file(weights, str(file), metadata={"format": "pt", "nasdsl_export": name, "nasdsl_version": __version__})


def _export_onnx(model, file: Path, input_size: tuple) -> dict:
    """`file` from torch.onnx with a dynamic batch, checked against PyTorch with onnxruntime.

    The TorchScript-based exporter goes first: it is deprecated in torch 2.9+ but exports a
    ProxylessNAS-sized multi-branch network in seconds where the torch.export-based (dynamo) one
    takes minutes. When it fails or its result does not match, the dynamo exporter is tried.
    Returns {"exporter", "opset", "max_abs_diff"} of the one that passed."""
    failures = []
    for kind in ("torchscript", "dynamo"):
        file.unlink(missing_ok=True)
        Path(str(file) + ".data").unlink(missing_ok=True)
        try:
            _run_onnx_export(model, file, input_size, kind)
        except Exception as exc:  # torch.onnx raises many types; the user needs the message
            failures.append(f"{kind} exporter: {_first_line(exc)}")
            continue
        problem, worst = _check_onnx(model, file, input_size)
        if problem is None:
            return {"exporter": kind, "opset": ONNX_OPSET, "max_abs_diff": worst}
        failures.append(f"{kind} exporter: {problem}")
    file.unlink(missing_ok=True)
    raise NasdslError("ONNX export failed: " + "; ".join(failures))


def _run_onnx_export(model, file: Path, input_size: tuple, kind: str) -> None:
    import torch

    example = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    common = dict(input_names=["input"], output_names=["logits"], opset_version=ONNX_OPSET, verbose=False)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        if kind == "torchscript":
            torch.onnx.export(model, (example,), str(file), dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **common)
        else:
            big = sum(t.numel() * t.element_size() for t in model.state_dict().values()) > 1_800_000_000
            torch.onnx.export(model, (example,), str(file), dynamo=True, external_data=big,
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), **common)


def _check_onnx(model, file: Path, input_size: tuple) -> tuple[str | None, float]:
    """(None, max |onnxruntime - PyTorch|) when the ONNX file computes the model, else (why, diff)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    try:
        session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        for batch in (3, 1):   # neither is the export's example batch: the batch dim must be dynamic
            x = torch.randn(batch, *input_size, generator=gen)
            with torch.no_grad():
                ref = model(x).numpy()
            (out,) = session.run(["logits"], {"input": x.numpy()})
            if out.shape != ref.shape:
                return f"batch {batch} gives shape {tuple(out.shape)}, PyTorch {tuple(ref.shape)}", worst
            worst = max(worst, float(np.abs(out - ref).max()))
    except Exception as exc:
        return f"onnxruntime cannot run it: {_first_line(exc)}", worst
    if not worst <= ONNX_TOLERANCE:
        return f"max |onnxruntime - PyTorch| = {worst:.3g} > {ONNX_TOLERANCE}", worst
    return None, worst


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _publish_modes(folder: Path) -> None:
    """The modes a plain mkdir/open would give (mkdtemp makes 0700, safetensors writes 0600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for p in folder.iterdir():
        p.chmod(0o666 & ~umask)


def _swap(tmp: Path, out_dir: Path) -> None:
    """Put the finished folder at out_dir, replacing an empty folder or a previous export."""
    if out_dir.is_dir():
        if not any(out_dir.iterdir()):
            out_dir.rmdir()
        else:
            _check_target(out_dir)   # still an export (no one filled it meanwhile)
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "export")
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                os.replace(old / "export", out_dir)
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
            return
    os.replace(tmp, out_dir)


def export_run(path: str | Path, out_dir: str | Path, name: str, *, onnx: bool = False) -> Path:
    """Re-export the derived model of a run (or of another export) under a new name.

    The architecture comes back from the folder's .space file (the printer's round trip), the
    weights from its model.safetensors, the preprocessing from its pretrained_cfg (`_saved_preprocessing`).
    """
    from nasdsl.export.load import WEIGHTS, export_folder, read_config, read_weights
    from nasdsl.language.compiler import compile_file

    folder = export_folder(path)
    cfg = read_config(folder)
    space = folder / str(cfg[MARKER].get("space") or "")
    if not space.is_file():
        raise NasdslError("the export has no .space file to rebuild its architecture from", file=str(folder))
    network = compile_file(space)
    return export_model(network, read_weights(folder / WEIGHTS), out_dir, name,
                        preprocessing=_saved_preprocessing(Path(path), folder, cfg["pretrained_cfg"]),
                        space_text=space.read_text(), onnx=onnx)


def _saved_preprocessing(path: Path, folder: Path, pretrained_cfg: dict):
    """The Preprocessing an export saved in its pretrained_cfg.

    Exports written before nasdsl had one advertised crop_pct 0.875 for every source; digits, fake
    and CIFAR were always measured uncropped, so where a run folder's manifest.json names such data
    the crop is put right (1.0)."""
    from dataclasses import replace

    from nasdsl.train.data import Preprocessing

    prep = Preprocessing.from_timm_cfg(pretrained_cfg, where=str(folder / CONFIG))
    try:
        spec = json.loads((path / "manifest.json").read_text()).get("data") if folder != path else None
    except (OSError, ValueError, AttributeError):
        spec = None
    if isinstance(spec, str) and spec.partition(":")[0].strip().lower() in ("digits", "fake", "cifar10", "cifar100"):
        prep = replace(prep, crop_pct=1.0)
    return prep
