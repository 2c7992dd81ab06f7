"""Export a derived network as a folder that timm (and only timm + torch) can use.

    OUT/
      {name}.py           the network as generated PyTorch code (nasdsl.export.codegen): a model
                          class, default_cfgs and @register_model {name}
      model.safetensors   the weights, under the generated model's names
      config.json         timm's local-dir config: architecture, num_classes, num_features,
                          pretrained_cfg, nasdsl (the marker: format, module, model class)
      {name}.space        the derived architecture as a .space file (when given)
      {name}.onnx         with onnx=True, checked against PyTorch with onnxruntime

The code is generated from the merged network (nasdsl.derive.merge: a layer's parallel MBConv
candidates as one MBConv with a mixconv, residual adds made dense), which computes what the
derived network computes with fewer, wider ops; the .space file keeps the derived architecture,
the one the search chose. With the module imported, `timm.create_model("local-dir:OUT")` builds
the network and loads the weights; `timm.create_model("{name}", pretrained=True)` does too (the
module points its default pretrained cfg at the model.safetensors beside it;
nasdsl.export.timm.register imports it).

The folder is built next to OUT and renamed into place: an export is complete or absent.
"""
from __future__ import annotations

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
from nasdsl.export.load import CONFIG, FORMAT, MARKER, WEIGHTS, load_strict

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

    `state_dict` is the slim NasNet's (`NasNet(network.to_config())`), loaded strictly; the
    network is merged (nasdsl.derive.merge) and the module generated from the merged network.
    `preprocessing` is the data's (DataBundle.preprocessing): the pretrained_cfg in the module's
    default_cfgs and in config.json carries exactly its `to_timm_cfg()`, so timm's eval transform
    feeds the model what nasdsl measured it on. Returns `out_dir`.
    """
    out_dir = Path(out_dir)
    _check_inputs(network, out_dir, name, preprocessing, onnx)
    derived = _nasnet(network, state_dict)
    merged, merged_state = _merge(network, derived.state_dict())
    return _write(merged, merged_state, None, out_dir, name, preprocessing=preprocessing, space_text=space_text,
                  onnx=onnx, source=network, reference=derived)


def _check_inputs(network, out_dir: Path, name: str, preprocessing, onnx: bool) -> None:
    check_export_name(name)
    _check_target(out_dir)
    _check_preprocessing(preprocessing, _input_size(network))
    if onnx:
        _require_onnx()


# how merging builds the network an export holds (nasdsl.derive.merge's options of these names), as
# config.json records it; an export that does not record one was made before nasdsl did it: False
MERGING = {"folded": True, "ordered": True}


def _merge(network, state: dict, how: dict = MERGING):
    """The merged network and its NasNet state dict (nasdsl.derive.merge), merged `how` (MERGING)."""
    from nasdsl.derive.merge import merge

    try:
        return merge(network, state, fold_scales=how["folded"], ordered=how["ordered"])
    except (ValueError, KeyError, RuntimeError) as exc:
        raise NasdslError(f"cannot merge the network's parallel blocks for export: {_first_line(exc)}") from None


def _write(network, nasnet_state: dict | None, weights: dict | None, out_dir: Path, name: str, *,
           preprocessing, space_text: str | None, onnx: bool, source, reference=None, how: dict = MERGING) -> Path:
    """Generate the module for `network`, build its model with the weights (a NasNet state dict of
    `network`, renamed, or `weights` already under the generated names) and write the folder.
    With `reference` (the derived network the weights came from, in eval mode) the generated model
    must compute what it computes (`_check_equal`) before anything is written."""
    from nasdsl.export import codegen
    from nasdsl.export.load import import_model_module

    input_size = _input_size(network)
    cfg = {**preprocessing.to_timm_cfg(), "fixed_input_size": False,
           "description": f"{source.name} searched with nasdsl (DNAL) and exported by nasdsl {__version__}"}
    generated = codegen.generate(network, name, cfg, title=f"{source.name}, searched with nasdsl (DNAL)")
    if weights is None:
        weights = _rename(network, nasnet_state, generated.names)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    module_file = tmp / f"{name}.py"
    try:
        module_file.write_text(generated.text)
        module = import_model_module(module_file)
        sys.modules.pop(module.__name__, None)   # a temporary path: nothing should import it again
        model = getattr(module, generated.class_name)().eval()
        load_strict(model, weights, "the weights do not fit the generated model")
        if reference is not None:
            _check_equal(model, reference, input_size)
        weights = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
        _save_weights(weights, tmp / WEIGHTS, name)
        config = _config(name, network, source, generated, space_text, how)
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


EXPORT_TOLERANCE = 1e-4


def _check_equal(model, reference, input_size: tuple) -> None:
    """The exported model computes the derived network's function (eval mode): max |difference| of
    the logits on random inputs at most EXPORT_TOLERANCE of their scale (at least 1). Merging folds
    BNs and reorders sums, so the two agree to float rounding, not bit for bit."""
    import torch

    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference(x), model(x)
    scale = max(1.0, float(expected.abs().max()))
    diff = float((expected - got).abs().max())
    if not diff <= EXPORT_TOLERANCE * scale:
        raise NasdslError(f"internal: the generated model differs from the derived network by {diff:.3g} "
                          f"(logits up to {scale:.3g}); nothing was written")


def _config(name: str, network, source, generated, space_text: str | None, how: dict) -> dict:
    """config.json: timm's local-dir layout (no model_args: the module is the architecture).
    `merged` and `how` it merged (MERGING) say how `nasdsl export` rebuilds the generated network
    from the .space, as the weights were written for it."""
    merged = network is not source
    return {
        "architecture": name,
        "num_classes": network.num_classes,
        "num_features": generated.num_features,
        "pretrained_cfg": json.loads(json.dumps(generated.pretrained_cfg)),
        MARKER: {"format": FORMAT, "version": __version__, "module": f"{name}.py", "model": generated.class_name,
                 "network": source.name, "merged": merged, **{k: v and merged for k, v in how.items()},
                 "space": f"{name}.space" if space_text is not None else None, "onnx": None},
    }


def _rename(network, state: dict, names: dict) -> dict:
    """A NasNet state dict of `network` under the generated model's module names: NasNet.op_modules()
    lists each op's module in graph order, `names` says where the generated code holds that op."""
    from nasdsl.supernet.network import NasNet

    out = {}
    for li, entry in enumerate(NasNet(network.to_config()).op_modules()):
        chains = [((li, "block", j, k), m) for j, chain in enumerate(entry["blocks"]) for k, m in enumerate(chain)]
        chains += [((li, where, k), m) for where in ("shortcut", "post") for k, m in enumerate(entry[where])]
        for position, (nas_name, module) in chains:
            for key in module.state_dict():
                if position not in names:
                    raise NasdslError(f"internal: the generated code has no module for {nas_name}")
                out[f"{names[position]}.{key}"] = state[f"{nas_name}.{key}"]
    return out


def _nasnet(network, state_dict: dict):
    """The network's NasNet with `state_dict` loaded strictly, on the CPU: the check that the
    weights are this network's, and the state merging reads."""
    from nasdsl.supernet.network import NasNet

    try:
        model = NasNet(network.to_config())
    except (ValueError, KeyError, TypeError) as exc:
        raise NasdslError(f"cannot export this network: {_first_line(exc)}") from None
    load_strict(model, state_dict, "the state dict does not fit the network")
    return model.eval()


# ---- checks ------------------------------------------------------------------------------------
def check_export_name(name) -> None:
    """Raise a NasdslError when `name` cannot name an export (the run's plan checks it before training)."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise NasdslError(f"export name {name!r} is not a Python identifier (letters, digits, _; "
                          f"not starting with a digit): it names the model module and its timm entrypoint")
    if keyword.iskeyword(name):
        raise NasdslError(f"export name {name!r} is a Python keyword")
    from nasdsl.export.codegen import RESERVED

    if name in RESERVED:
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
    """(None, max |onnxruntime - PyTorch|) when the ONNX file computes the model, else (why, diff):
    at most ONNX_TOLERANCE of the logits' scale (at least 1), as `_check_equal` checks the generated
    model (float rounding grows with the logits: an untrained network's, in the thousands, differed
    by 0.016 and was refused under an absolute 1e-4)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    gen = torch.Generator().manual_seed(1)
    worst, scale = 0.0, 1.0
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
            scale = max(scale, float(np.abs(ref).max()))
    except Exception as exc:
        return f"onnxruntime cannot run it: {_first_line(exc)}", worst
    if not worst <= ONNX_TOLERANCE * scale:
        return f"max |onnxruntime - PyTorch| = {worst:.3g} > {ONNX_TOLERANCE} x {scale:.3g} (the logits' scale)", worst
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
    A format-1 export (an older nasdsl's) holds the derived NasNet's weights and is exported anew;
    a format-2 one holds the generated model's, of the merged network, which merging the derived
    network again rebuilds (its structure follows from the architecture alone).
    """
    from nasdsl.export.load import export_folder, read_config, read_weights
    from nasdsl.language.compiler import compile_file

    folder = export_folder(path)
    cfg = read_config(folder, formats=(1, FORMAT))
    space = folder / str(cfg[MARKER].get("space") or "")
    if not space.is_file():
        raise NasdslError("the export has no .space file to rebuild its architecture from", file=str(folder))
    network = compile_file(space)
    weights = read_weights(folder / WEIGHTS)
    prep = _saved_preprocessing(Path(path), folder, cfg["pretrained_cfg"])
    if cfg[MARKER]["format"] == 1:
        return export_model(network, weights, out_dir, name, preprocessing=prep, space_text=space.read_text(),
                            onnx=onnx)
    out_dir = Path(out_dir)
    _check_inputs(network, out_dir, name, prep, onnx)
    how = {k: cfg[MARKER].get(k, False) for k in MERGING}
    merged = _merge(network, _fresh_state(network), how)[0] \
        if cfg[MARKER].get("merged", True) else network
    try:
        return _write(merged, None, weights, out_dir, name, preprocessing=prep, space_text=space.read_text(),
                      onnx=onnx, source=network, how=how)
    except NasdslError as exc:
        if exc.file is None and "do not fit" in exc.message:
            raise NasdslError(f"{exc.message} (rebuilt from {space.name})", file=str(folder / WEIGHTS)) from None
        raise


def _fresh_state(network) -> dict:
    from nasdsl.supernet.network import NasNet

    return NasNet(network.to_config()).state_dict()


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
