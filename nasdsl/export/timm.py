"""Make an export folder's model known to timm in this process.

    name = nasdsl.export.timm.register("exports/resnet20_slim")
    model = timm.create_model(name, pretrained=True)     # the folder's model.safetensors

timm has no plugin discovery: a model exists once the module that registers it is imported.
register() imports the folder's {name}.py, the model as generated code (nasdsl.export.codegen), by
file path under the module name {name}; the module's @register_model adds the entrypoint, and its
default pretrained cfg points at the model.safetensors beside it (register makes sure of that).
`timm.create_model("local-dir:FOLDER")` works after it too. (nasdsl.load runs only the module's
model part, under a private name, and leaves timm's registry alone.)
"""
from __future__ import annotations

import dataclasses
import importlib.util
import sys
import warnings
from pathlib import Path

import timm.models

from nasdsl.errors import NasdslError
from nasdsl.export.load import WEIGHTS, export_folder, read_config


def register(path: str | Path) -> str:
    """Import the model module of an export (or run) folder so timm knows it; returns its name."""
    folder = export_folder(path).resolve()
    name = read_config(folder)["architecture"]
    module_file = folder / f"{name}.py"
    if not module_file.is_file():
        raise NasdslError(f"not a complete nasdsl export: the model module {name}.py is missing", file=str(folder))
    weights = folder / WEIGHTS
    check_weights(weights)

    previous = sys.modules.get(name)
    if previous is not None and not hasattr(previous, "__nasdsl_export__"):
        raise NasdslError(f"cannot register {name!r}: a Python module of that name is already imported")
    ours = previous is not None and timm.models.is_model(name) \
        and timm.models.model_entrypoint(name).__module__ == name
    if timm.models.is_model(name) and timm.models.model_entrypoint(name).__module__.startswith("timm."):
        raise NasdslError(f"cannot register {name!r}: it is one of timm's own models")

    spec = importlib.util.spec_from_file_location(name, module_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        with warnings.catch_warnings():
            if ours:   # the same export (or another export of that name) registered before: replace it quietly
                warnings.filterwarnings("ignore", message=f"Overwriting {name} in registry")
            spec.loader.exec_module(module)
    except Exception as exc:
        if previous is not None:
            sys.modules[name] = previous
        else:
            sys.modules.pop(name, None)
        raise NasdslError(f"cannot import the model module: {type(exc).__name__}: {exc}", file=str(module_file)) \
            from None
    if not hasattr(module, "__nasdsl_export__") or not timm.models.is_model(name):
        raise NasdslError(f"not a nasdsl model module (it does not register {name!r})", file=str(module_file))

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.file or Path(cfg.file).resolve() != weights:
        # the module points at the weights beside it; a module that does not gets pointed here
        default = module.default_cfgs[name]
        default.cfgs[default.tags[0]] = dataclasses.replace(default.cfgs[default.tags[0]], file=str(weights))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=f"Overwriting {name} in registry")
            timm.models.register_model(getattr(module, name))
    return name


def check_weights(file: Path) -> None:
    """A cheap check of a safetensors file: present, and its header covers the file exactly."""
    from safetensors import safe_open

    if not file.is_file():
        raise NasdslError("missing weights file", file=str(file))
    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except Exception as exc:  # SafetensorError and OSError
        raise NasdslError(f"corrupt weights file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                          file=str(file)) from None
