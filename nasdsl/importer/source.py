"""The model to import: `timm:NAME` or `torchvision:NAME`, with the weights it should carry.

Weights, in order: the user's state dict (`--weights FILE`); else the library's pretrained weights
when this machine already has them cached (or `--download` allows fetching them); else the random
initialisation, said in a note. Nothing is downloaded unless asked.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn

from nasdsl.errors import NasdslError, did_you_mean
from nasdsl.files import misfit, read_state_dict

LIBRARIES = ("timm", "torchvision")


@dataclass
class Source:
    spec: str                  # "timm:resnet50"
    library: str
    name: str
    model: nn.Module
    resolution: int
    weights: str               # what the weights are: "random", "pretrained (timm cache)", a file path
    notes: list[str] = field(default_factory=list)


def parse_spec(spec: str) -> tuple[str, str]:
    library, sep, name = spec.partition(":")
    if not sep or library not in LIBRARIES or not name:
        raise NasdslError(f"expected timm:NAME or torchvision:NAME, like timm:resnet50{did_you_mean(library, LIBRARIES)}",
                          file=spec)
    return library, name


def load_source(spec: str, weights: str | None = None, download: bool = False,
                resolution: int | None = None) -> Source:
    library, name = parse_spec(spec)
    build = _timm if library == "timm" else _torchvision
    model, default_res, what, notes = build(spec, name, pretrained=weights is None, download=download)
    if weights is not None:
        state = read_state_dict(weights)
        classes = _other_classes(model, state)
        if classes is not None:       # a network finetuned on other data: the library's model for its classes
            model = build_model(spec, num_classes=classes)
        problem = misfit({k: tuple(v.shape) for k, v in model.state_dict().items()}, state, "model")
        if problem:
            raise NasdslError(f"does not fit {spec}: {problem}", file=weights)
        model.load_state_dict(state)
        what = str(Path(weights))
    return Source(spec, library, name, model.eval(), resolution or default_res, what, notes)


def _other_classes(model: nn.Module, state: dict) -> int | None:
    """The file's class count when its classifier (the model's last linear) has other rows."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    weight = state.get(f"{names[-1]}.weight") if names else None
    ours = model.get_submodule(names[-1]).weight if names else None
    if weight is None or weight.dim() != 2 or weight.shape[1:] != ours.shape[1:] or weight.shape[0] == ours.shape[0]:
        return None
    return int(weight.shape[0])


def build_model(spec: str, num_classes: int | None = None) -> nn.Module | None:
    """The library's model with random weights, or None when the library has no such model."""
    library, name = parse_spec(spec)
    kwargs = {"num_classes": num_classes} if num_classes else {}
    if library == "timm":
        import timm

        return timm.create_model(name, pretrained=False, **kwargs) if name in timm.list_models() else None
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        return None
    return torchvision.models.get_model(name, weights=None, **kwargs)


def _timm(spec: str, name: str, pretrained: bool, download: bool):
    import timm

    if name not in timm.list_models():
        raise NasdslError(f"timm has no model '{name}'{did_you_mean(name, timm.list_models())}", file=spec)
    cfg = timm.models.get_pretrained_cfg(name)
    resolution = int(cfg.input_size[-1]) if cfg and cfg.input_size else 224
    cached = _timm_cached(cfg) if pretrained and cfg else None
    if pretrained and (cached or download):
        overlay = {"file": cached} if cached else None
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
        return model, resolution, f"timm's pretrained weights ({cached or 'downloaded'})", []
    return build_model(spec), resolution, "random", _random_note(pretrained)


def _timm_cached(cfg) -> str | None:
    """The local file of a timm model's pretrained weights, if the Hugging Face cache has it."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo = getattr(cfg, "hf_hub_id", None)
    for file in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, file) if repo else None
        if isinstance(found, str):
            return found
    return None


def _torchvision(spec: str, name: str, pretrained: bool, download: bool):
    import torch
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise NasdslError(f"torchvision has no classification model '{name}'{did_you_mean(name, names)}",
                          file=spec)
    weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
    if weights is not None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
        if cached.is_file() or download:
            where = cached if cached.is_file() else "downloaded"
            return torchvision.models.get_model(name, weights=weights), 224, f"torchvision's {weights} ({where})", []
    return build_model(spec), 224, "random", _random_note(pretrained)


def _random_note(pretrained: bool) -> list[str]:
    if not pretrained:
        return []
    return ["no pretrained weights are cached on this machine: the import holds the random initialisation "
            "(give --weights FILE, or --download to fetch the library's)"]
