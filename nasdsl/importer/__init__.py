"""`nasdsl import`: a trained timm or torchvision CNN as a `.space` file and its weights.

    result = import_model("timm:resnet50", out="imports/resnet50")
    # imports/resnet50/resnet50.space     the architecture, as stages and composites
    # imports/resnet50/weights.safetensors  keyed for that space (and its supernet: --init)
    # imports/resnet50/import.json        what was imported, and the check it passed

The model is traced (nasdsl.importer.trace), said as a space (structure), compiled by the
language's own compiler, given the source's weights (weights) and checked to compute the same
logits with the same parameter count before anything is written.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nasdsl.errors import NasdslError
from nasdsl.files import atomic_write, save_tensors
from nasdsl.graph import spacetext
from nasdsl.importer.source import load_source
from nasdsl.importer.structure import body_lines, split_layers
from nasdsl.importer.trace import trace
from nasdsl.importer.weights import check_same, map_weights

MARKER = "import.json"
WEIGHTS = "weights.safetensors"


@dataclass
class Imported:
    name: str
    folder: Path
    space: Path
    params: int
    flops: int
    difference: float
    weights: str
    notes: list[str]


def space_text(spec: str, name: str, plans, in_chans: int, resolution: int, classes: int, weights: str) -> str:
    from nasdsl._version import __version__

    head = [f"# {spec}, imported by `nasdsl import` (nasdsl {__version__}) from its torch.fx trace.",
            f"# Weights: {weights} (weights.safetensors beside this file, keyed for this space).",
            "# Gates after every BN (or a bare conv), never on shortcuts, the stem or the classifier.",
            f"space {name}(input={in_chans}, resolution={resolution}, classes={classes})", ""]
    return "\n".join(head + body_lines(plans)) + "\n"


def import_model(spec: str, out: str | Path | None = None, weights: str | None = None, download: bool = False,
                 resolution: int | None = None) -> Imported:
    from nasdsl.graph.accounting import summary
    from nasdsl.language.compiler import compile_source
    from nasdsl.supernet.network import NasNet

    src = load_source(spec, weights, download, resolution)
    name = spacetext.identifier(src.name)
    folder = Path(out) if out is not None else Path("imports") / name
    in_chans = _in_chans(src.model, spec)
    prims, output = trace(src.model, spec, in_chans, src.resolution)
    plans = split_layers(prims, output, spec)
    text = space_text(spec, name, plans, in_chans, src.resolution, output.out_shape.channels, src.weights)
    space_file = folder / f"{name}.space"
    network = compile_source(text, str(space_file))
    net = NasNet(network.to_config())
    state = map_weights(plans, src.model, net, spec)
    net.load_state_dict(state)
    diff = check_same(src.model, net, in_chans, src.resolution, spec)
    info = summary(network)
    _write(folder, space_file, text, state, {"format": 1, "source": spec, "space": space_file.name,
                                             "weights": WEIGHTS, "weights_from": src.weights,
                                             "max_logit_difference": diff, "params": info["params"]})
    return Imported(name, folder, space_file, info["params"], info["flops"], diff, src.weights, src.notes)


def _in_chans(model, spec: str) -> int:
    import torch.nn as nn

    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise NasdslError("no Conv2d in the model: nasdsl imports CNNs", file=spec)
    return first.in_channels


def _write(folder: Path, space_file: Path, text: str, state: dict, marker: dict) -> None:
    """The space, its weights, then the marker: a folder with a marker is complete."""
    if folder.exists() and not folder.is_dir():
        raise NasdslError("exists and is not a folder", file=str(folder))
    atomic_write(space_file, lambda f: f.write(text.encode()))
    save_tensors(folder / WEIGHTS, state)
    atomic_write(folder / MARKER, lambda f: f.write((json.dumps(marker, indent=2) + "\n").encode()))


def load_import(folder: str | Path):
    """The imported network of an import folder, plain (no gates), with its weights, in eval mode."""
    from nasdsl.files import load_strict, read_state_dict
    from nasdsl.language.compiler import compile_source
    from nasdsl.language.source import read_source
    from nasdsl.supernet.network import NasNet

    folder = Path(folder)
    try:
        marker = json.loads((folder / MARKER).read_text())
        space = folder / marker["space"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NasdslError(f"not a complete nasdsl import ({type(exc).__name__}: {exc})",
                          file=str(folder / MARKER)) from None
    net = NasNet(compile_source(read_source(space), str(space)).to_config())
    weights = folder / marker.get("weights", WEIGHTS)
    load_strict(net, read_state_dict(weights), f"does not fit {space.name}", str(weights))
    return net.eval()
