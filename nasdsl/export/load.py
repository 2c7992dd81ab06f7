"""Load a derived network from an export folder (or a run folder that holds one at `model/`).

    model = nasdsl.load("runs/cifar10")          # RUN/model/config.json + model.safetensors
    model = nasdsl.load("exports/resnet20_slim")  # an export folder itself

The folder's format (written by nasdsl.export.exporter): config.json in timm's local-dir layout
whose `model_args.config` is the architecture (the graph config NasNet reads) and whose `nasdsl`
entry marks it as an export; model.safetensors the weights; {name}.py the standalone timm module.
"""
from __future__ import annotations

import json
from pathlib import Path

from nasdsl.errors import NasdslError

FORMAT = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
MARKER = "nasdsl"          # config.json's key that marks a nasdsl export: {"format", "version", "module"}


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


def read_config(folder: Path) -> dict:
    """config.json of an export folder, checked for the fields nasdsl and timm need."""
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
    if fmt != FORMAT:
        raise NasdslError(f"unsupported export format {fmt!r} (this nasdsl reads format {FORMAT})", file=str(file))
    name = cfg.get("architecture")
    arch = (cfg.get("model_args") or {}).get("config")
    if not isinstance(name, str) or not name.isidentifier() or not isinstance(arch, dict) \
            or not isinstance(cfg.get("pretrained_cfg"), dict):
        raise NasdslError("corrupt config: needs 'architecture', 'pretrained_cfg' and 'model_args.config'",
                          file=str(file))
    return cfg


def read_weights(file: Path) -> dict:
    """The state dict in a safetensors file; a missing or corrupt file is a NasdslError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise NasdslError("missing weights file", file=str(file))
    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise NasdslError(f"corrupt weights file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                          file=str(file)) from None


def build(cfg: dict, where: Path):
    """NasNet for an export's config.json (random weights)."""
    from nasdsl.supernet.network import NasNet

    try:
        model = NasNet(cfg["model_args"]["config"])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise NasdslError(f"corrupt architecture in model_args.config ({type(exc).__name__}: {exc})",
                          file=str(where / CONFIG)) from None
    model.pretrained_cfg = dict(cfg["pretrained_cfg"])
    model.default_cfg = model.pretrained_cfg
    return model


def load_weights(model, file: Path) -> None:
    state = read_weights(file)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise NasdslError(f"weights do not fit the architecture: {detail[:300]}", file=str(file)) from None


def load(path: str | Path):
    """The derived network (a NasNet, timm's model API) of an export or run folder, in eval mode."""
    folder = export_folder(path)
    cfg = read_config(folder)
    model = build(cfg, folder)
    load_weights(model, folder / WEIGHTS)
    return model.eval()
