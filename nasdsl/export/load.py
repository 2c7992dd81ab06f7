"""Load a derived network from an export folder (or a run folder that holds one at `model/`).

    model = nasdsl.load("runs/cifar10")          # RUN/model/config.json + model.safetensors
    model = nasdsl.load("exports/resnet20_slim")  # an export folder itself

The folder's format (written by nasdsl.export.exporter): {name}.py, the model as generated PyTorch
code (nasdsl.export.codegen), is the architecture; config.json is timm's local-dir config whose
`nasdsl` entry marks it as an export and names the module and its model class; model.safetensors
holds the weights under the generated model's names. Loading runs the module's model part (the
text before its timm entrypoint, so timm's registry is left alone) as a private module named after
the file's path, so two exports of one name can be loaded side by side.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import types
from pathlib import Path

from nasdsl.errors import NasdslError
from nasdsl.files import load_strict, read_weights  # noqa: F401 - the exporter reads weights through here too

FORMAT = 2                 # 1: NasNet (network.py) copied with the architecture as a config literal
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
MARKER = "nasdsl"          # config.json's key that marks a nasdsl export: {"format", "version", "module", "model"}
# the generated module's line between the model (above) and its timm entrypoint (below)
REGISTRATION = "# ---- timm: the model's entrypoint and its pretrained weights"


def export_folder(path: str | Path) -> Path:
    """The export folder for `path`: `path/model` when it is a run folder, else `path` itself."""
    path = Path(path)
    if (path / "model" / CONFIG).is_file():
        return path / "model"
    if (path / CONFIG).is_file():
        return path
    if not path.exists():
        raise NasdslError("no such export or run folder", file=str(path))
    raise NasdslError(f"not a nasdsl export: no {CONFIG} here or in model/", file=str(path))


def read_config(folder: Path, formats: tuple[int, ...] = (FORMAT,)) -> dict:
    """config.json of an export folder, checked for the fields nasdsl and timm need; an export of
    another format than `formats` is refused (format 1 came from an older nasdsl)."""
    file = folder / CONFIG
    try:
        cfg = json.loads(file.read_text())
    except OSError as exc:
        raise NasdslError(f"cannot read: {exc.strerror or exc}", file=str(file)) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NasdslError(f"corrupt config (not JSON: {exc})", file=str(file)) from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get(MARKER), dict):
        raise NasdslError(f"not a nasdsl export (no '{MARKER}' entry)", file=str(file))
    fmt = cfg[MARKER].get("format")
    if fmt == 1 and fmt not in formats:
        raise NasdslError(f"exported by an older nasdsl (format 1); re-run `nasdsl export {folder} --name NAME "
                          f"--out DIR` to rewrite it as generated code", file=str(file))
    if fmt not in formats:
        raise NasdslError(f"unsupported export format {fmt!r} (this nasdsl reads format {FORMAT})", file=str(file))
    name = cfg.get("architecture")
    if not isinstance(name, str) or not name.isidentifier() or not isinstance(cfg.get("pretrained_cfg"), dict):
        raise NasdslError("corrupt config: needs 'architecture' and 'pretrained_cfg'", file=str(file))
    if fmt == 1 and not isinstance((cfg.get("model_args") or {}).get("config"), dict):
        raise NasdslError("corrupt config: a format 1 export needs 'model_args.config'", file=str(file))
    return cfg


def import_model_module(file: Path) -> types.ModuleType:
    """The model part of a generated module, run as a private module (`_nasdsl_export_<hash of the
    path>`, in sys.modules so TorchScript finds its source). The timm entrypoint after the
    REGISTRATION line is not run: loading an export does not touch timm's registry."""
    try:
        text = file.read_text()
    except OSError as exc:
        raise NasdslError(f"cannot read the model module: {exc.strerror or exc}", file=str(file)) from None
    except UnicodeDecodeError:
        raise NasdslError("corrupt model module (not UTF-8 text)", file=str(file)) from None
    cut = text.find("\n" + REGISTRATION)
    if cut < 0:
        raise NasdslError("not a nasdsl model module (no timm entrypoint section)", file=str(file))
    digest = hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:12]
    name = f"_nasdsl_export_{re.sub(r'[^0-9A-Za-z_]', '_', file.stem)}_{digest}"
    module = types.ModuleType(name)
    module.__file__ = str(file)
    previous = sys.modules.get(name)
    sys.modules[name] = module
    try:
        code = compile(text[:cut + 1], str(file), "exec", dont_inherit=True)   # no future import of ours
        exec(code, module.__dict__)  # noqa: S102 - the code nasdsl generated
    except Exception as exc:
        if previous is not None:
            sys.modules[name] = previous
        else:
            sys.modules.pop(name, None)
        raise NasdslError(f"cannot run the model module: {one_line(exc)}", file=str(file)) from None
    return module


def build(cfg: dict, where: Path):
    """The model of an export's config.json (random weights): its module's model class, built with
    the class's defaults (the searched network), carrying the export's pretrained_cfg."""
    file = where / str(cfg[MARKER].get("module") or f"{cfg['architecture']}.py")
    if not file.is_file():
        raise NasdslError("not a complete nasdsl export: the model module is missing", file=str(file))
    module = import_model_module(file)
    marker = getattr(module, "__nasdsl_export__", None)
    cls = getattr(module, marker.get("model", ""), None) if isinstance(marker, dict) else None
    if not isinstance(cls, type):
        raise NasdslError("not a nasdsl model module (no __nasdsl_export__ naming its model class)", file=str(file))
    try:
        model = cls()
    except Exception as exc:
        raise NasdslError(f"cannot build the model: {one_line(exc)}", file=str(file)) from None
    model.pretrained_cfg = dict(cfg["pretrained_cfg"])
    model.default_cfg = model.pretrained_cfg
    return model


def one_line(exc: BaseException) -> str:
    """An exception as `Type: first line of its message` (errors here are one line)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def load_weights(model, file: Path) -> None:
    load_strict(model, read_weights(file), "weights do not fit the architecture", str(file))


def load(path: str | Path):
    """The derived network (the export's generated model, timm's model API) of an export or run
    folder, with its weights, in eval mode."""
    folder = export_folder(path)
    cfg = read_config(folder)
    model = build(cfg, folder)
    load_weights(model, folder / WEIGHTS)
    return model.eval()
