"""A timm or torchvision state dict under a space's names, for `nasdsl search SPACE --init FILE`.

`nasdsl import` writes weights already keyed for its space. A user who has a torchvision or timm
checkpoint of a network a space describes (spaces/resnet50.space is torchvision's resnet50) can
give it as it is: the library model whose state dict has exactly the file's names and shapes is
found among the space's candidates, traced as the importer traces it, and its modules paired op
by op with the space's (nasdsl.importer.weights.map_weights). The pairing is then proven: the
space's plain network with the renamed weights must compute the library model's logits.
"""
from __future__ import annotations

import torch

from nasdsl.errors import NasdslError
from nasdsl.graph.ir import Network

# space name -> the library models it describes (besides timm:NAME and torchvision:NAME themselves)
CANDIDATES = {
    "mobilenetv2": ("timm:mobilenetv2_100", "torchvision:mobilenet_v2"),
    "vgg16": ("torchvision:vgg16", "torchvision:vgg16_bn"),
    "mobilenetv3_large": ("timm:mobilenetv3_large_100", "torchvision:mobilenet_v3_large"),
    "resnext50": ("torchvision:resnext50_32x4d", "timm:resnext50_32x4d"),
}


def candidates(name: str) -> list[str]:
    return list(dict.fromkeys((*CANDIDATES.get(name, ()), f"timm:{name}", f"torchvision:{name}")))


def library_model(state: dict[str, torch.Tensor], network: Network):
    """(spec, model) of the first candidate whose state dict has the file's names and shapes (built
    with the library's default classes, as trained checkpoints mostly are)."""
    from nasdsl.importer.source import build_model

    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for spec in candidates(network.name):
        model = build_model(spec)
        if model is not None and {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes:
            return spec, model
    return None, None


def translate(state: dict[str, torch.Tensor], network: Network, file: str) -> dict[str, torch.Tensor] | None:
    """The file's tensors under the space's names, or None when no candidate library model has
    exactly its names (the caller then reports what does not fit)."""
    from nasdsl.importer.structure import split_layers
    from nasdsl.importer.trace import trace
    from nasdsl.importer.weights import check_same, map_weights
    from nasdsl.supernet.network import NasNet

    spec, model = library_model(state, network)
    if model is None:
        return None
    model.load_state_dict(state)
    shape = network.input_shape
    prims, output = trace(model, spec, shape.channels, shape.height)
    plans = split_layers(prims, output, spec)
    # the file's classifier as it is: a different class count is the caller's to resolve
    net = NasNet(network.to_config(), num_classes=output.out_shape.channels)
    try:
        renamed = map_weights(plans, model, net, spec)
        net.load_state_dict(renamed)
        check_same(model.eval(), net, shape.channels, shape.height, spec)
    except NasdslError as exc:
        raise NasdslError(f"has {spec}'s names, but {network.name} is not that network ({exc.message}); "
                          f"`nasdsl import {spec} --weights {file}` writes the space that is", file=file) from None
    return renamed
