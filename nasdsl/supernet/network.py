"""The torch network that a graph config (`Network.to_config()`) describes.

The supernet is a NasNet with gates (`gate_factory`, nasdsl.supernet.build); the plain network
and every derived network use it as it is: finetuning trains a derived network as a NasNet.
An export does not ship it: nasdsl.export.codegen generates plain PyTorch from the (merged)
graph, and copies from here only the small modules it needs (Select, Subsample, MixConv,
GlobalAvgPool, SqueezeExcite), which is why this file imports only torch and timm.

Follows timm's model API: num_classes, num_features, forward_features (the unpooled map),
forward_head(x, pre_logits), get_classifier, reset_classifier, and for `features_only=True`
feature_info, forward_intermediates and prune_intermediate_layers. Scripts with TorchScript and
traces with torch.fx: every branch below depends on attributes fixed at construction.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn


class Select(nn.Module):
    """Keeps the given input channels, in order. A channels-last map's are gathered as the columns of
    a (pixels, channels) matrix: index_select over dim 1 returns a contiguous map, which the next
    conv reorders (a select and a 1x1 conv at batch 64 on a 32-channel 16x16 map: 0.79 ms against
    0.48, and 3.2 against 2.5 ms with the backward)."""

    def __init__(self, index: List[int]):
        super().__init__()
        self.register_buffer("index", torch.tensor(index, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _select(x, self.index)


def _select(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x's channels `index`, in x's memory format (see Select)."""
    if _channels_last(x):
        n, c, h, w = x.shape
        return x.permute(0, 2, 3, 1).reshape(-1, c).index_select(1, index).view(n, h, w, -1).permute(0, 3, 1, 2)
    return x.index_select(1, index)


torch.fx.wrap("_select")  # a leaf for torch.fx: its memory-format test is not traceable control flow


class ChannelScale(nn.Conv2d):
    """A depthwise conv with one tap and no padding, computed as the per-channel multiply it is:
    what `cut_kernels` leaves of every depthwise kernel on a 1x1 map (the default search's last
    eleven layers, 72 convs of its supernet). PyTorch runs it as a conv of C groups: at batch 64 on
    2 threads a forward and backward of 1888 channels took 0.57 ms against 0.14 as a multiply, at
    batch 1 on one thread milliseconds. Still an nn.Conv2d: the same weight (C, 1, 1, 1), init,
    state dict, and what pruning criteria read."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] > 1:
            x = x[:, :, ::self.stride[0], ::self.stride[1]]
        y = x * self.weight.view(1, -1, 1, 1)
        bias = self.bias
        if bias is not None:
            y = y + bias.view(1, -1, 1, 1)
        return y


def _is_channel_scale(cfg: dict) -> bool:
    """nasdsl.graph.ops.is_one_tap_depthwise, on an op's config (this module imports no nasdsl)."""
    return cfg["groups"] == cfg["in"] == cfg["out"] and cfg["k"] == 1 and cfg["padding"] == 0


class MixConv(nn.Module):
    """timm's MixedConv2d (MixConv, Tan & Le 2019): the input split into channel groups of
    `in_splits`, group i convolved by its own conv (kernel kernels[i], padding k // 2, no bias)
    into out_splits[i] channels, the outputs concatenated. `depthwise`: each group's conv is
    depthwise (MixNet's mixed-kernel depthwise stage), else dense within its group (MixNet's split
    1x1 expansion and projection). The splits are explicit, not timm's equal split, because a
    derived network keeps a different number of channels in each group. `convs.{i}.weight` holds
    what timm's `{i}.weight` does."""

    def __init__(self, in_splits: List[int], out_splits: List[int], kernels: List[int], stride: int = 1,
                 depthwise: bool = False):
        super().__init__()
        self.splits = list(in_splits)
        self.convs = nn.ModuleList([nn.Conv2d(i, o, k, stride, k // 2, groups=i if depthwise else 1, bias=False)
                                    for i, o, k in zip(in_splits, out_splits, kernels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = x.split(self.splits, 1)
        out = []
        for i, conv in enumerate(self.convs):
            out.append(conv(parts[i]))
        return torch.cat(out, 1)


class GlobalAvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


class Subsample(nn.Module):
    """Option-A shortcut's spatial part: keep every stride-th pixel."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, ::self.stride, ::self.stride]


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018) as timm's EfficientNet and MobileNetV3 blocks hold it
    (timm.models._efficientnet_blocks.SqueezeExcite, with its module names, so timm's weights map
    one to one): x * gate(conv_expand(act1(conv_reduce(mean_hw(x)))))."""

    def __init__(self, channels: int, rd_channels: int, act_layer: type = nn.ReLU, gate_layer: type = nn.Sigmoid):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, rd_channels, 1, bias=True)
        self.act1 = act_layer(inplace=True)
        self.conv_expand = nn.Conv2d(rd_channels, channels, 1, bias=True)
        self.gate = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * self.gate(scale)


# the graph's activation names (nasdsl.graph.ops.ACTIVATIONS, SE_GATES) -> torch module classes
ACT_LAYERS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hswish": nn.Hardswish, "silu": nn.SiLU, "identity": nn.Identity}
GATE_LAYERS = {"sigmoid": nn.Sigmoid, "hsigmoid": nn.Hardsigmoid}


def _act(fn: str, inplace: bool) -> nn.Module:
    return ACT_LAYERS[fn](inplace=inplace)  # nn.Identity takes and ignores it


# ops whose output is always a new tensor (never their input or a view of it)
_ALLOCATING = ("conv", "mixconv", "bn", "linear", "maxpool", "avgpool", "gap", "select", "se")


def build_chain(cfgs: List[dict], gate_factory: Optional[Callable] = None, fresh: bool = False):
    """An nn.Sequential of ops, and whether its output is a tensor it allocated itself.

    An activation works in place only on a tensor the chain made (`fresh`): in place on the
    chain's input, or on a view of it, it would overwrite what the other blocks, the shortcut or
    autograd still read (a derived layer can be a bare activation on its input).
    """
    ops = []
    for cfg in cfgs:
        ops.append(build_op(cfg, gate_factory, inplace=fresh))
        fresh = fresh or cfg["kind"] in _ALLOCATING or (cfg["kind"] == "act" and cfg["fn"] != "identity")
    return nn.Sequential(*ops), fresh


def build_op(cfg: dict, gate_factory: Optional[Callable] = None, inplace: bool = False) -> nn.Module:
    kind = cfg["kind"]
    if kind == "conv":
        conv = ChannelScale if _is_channel_scale(cfg) else nn.Conv2d
        return conv(cfg["in"], cfg["out"], cfg["k"], cfg["stride"], cfg["padding"], groups=cfg["groups"],
                    bias=cfg["bias"])
    if kind == "mixconv":
        return MixConv(list(cfg["in_splits"]), list(cfg["out_splits"]), list(cfg["kernels"]), cfg["stride"],
                       cfg["depthwise"])
    if kind == "bn":
        bn = nn.BatchNorm1d if cfg["flat"] else nn.BatchNorm2d
        return bn(cfg["in"], eps=cfg["eps"], momentum=cfg["momentum"])
    if kind == "act":
        return _act(cfg["fn"], inplace)
    if kind == "se":
        return SqueezeExcite(cfg["in"], cfg["rd"], ACT_LAYERS[cfg["act"]], GATE_LAYERS[cfg["fn"]])
    if kind == "gate":
        return gate_factory(cfg["in"], cfg["key"]) if gate_factory else nn.Identity()
    if kind == "linear":
        return nn.Linear(cfg["in"], cfg["out"], bias=cfg["bias"])
    if kind == "maxpool":
        return nn.MaxPool2d(cfg["k"], cfg["stride"], cfg["padding"])
    if kind == "avgpool":
        return nn.AvgPool2d(cfg["k"], cfg["stride"], cfg["padding"])
    if kind == "gap":
        return GlobalAvgPool()
    if kind == "flatten":
        return nn.Flatten(1)
    if kind == "dropout":
        return nn.Dropout(cfg["p"])
    if kind == "subsample":
        return Subsample(cfg["stride"])
    if kind == "select":
        return Select(list(cfg["index"]))
    raise ValueError(f"unknown op kind {kind!r}")


def _index(index: Optional[List[int]]) -> torch.Tensor:
    return torch.tensor(index if index is not None else [], dtype=torch.long)


def _spread_index(index: Optional[List[int]], width: int) -> torch.Tensor:
    """Per channel of the layer's output, which channel of y lands there; len(index) (a zero
    channel padded onto y) where none does. Empty when y is not placed by index."""
    if index is None:
        return _index(None)
    spread = [len(index)] * width
    for position, channel in enumerate(index):
        spread[channel] = position
    return _index(spread)


def _spread(y: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """y's channels at their places in the layer's output, zeros elsewhere: a Pad and a Gather
    in ONNX. index_add exports as a ScatterElements over an index the size of the whole map,
    built at run time, which made a derived ResNet-56 in onnxruntime barely faster than the
    unpruned one; in eager PyTorch index_add is the faster of the two (2-3x at batch 64)."""
    return nn.functional.pad(y, [0, 0] * (y.dim() - 2) + [0, 1]).index_select(1, spread)


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _index_add(base: torch.Tensor, index: torch.Tensor, y: torch.Tensor, inplace: bool) -> torch.Tensor:
    """base with y's channels added at `index`. A channels-last map is scattered along its last
    memory dimension: index_add over dim 1 of one is several times slower and returns a contiguous
    map, which makes every following conv reorder it. Where autograd records it, the map is
    scattered as a (pixels, channels) matrix instead of a 4-d NHWC view: the backward gathers y's
    gradient with index_select, which over the last dim of a 4-d map took 1.7 ms at batch 64 on a
    28-channel 16x16 map, over a matrix's columns 0.25 ms, and a finetuning step of the ResNet-56
    that benchmarks/derived_speed.py searches took 140 ms instead of 158. Without autograd the
    reshapes only cost time (at batch 1)."""
    if not _channels_last(base):
        return base.index_add_(1, index, y) if inplace else base.index_add(1, index, y)
    n, c, h, w = base.shape
    nhwc, src, dim = base.permute(0, 2, 3, 1), y.permute(0, 2, 3, 1), 3
    if torch.is_grad_enabled() and (base.requires_grad or y.requires_grad):
        nhwc, src, dim = nhwc.reshape(-1, c), src.reshape(-1, y.size(1)), 1
    out = nhwc.index_add_(dim, index, src) if inplace else nhwc.index_add(dim, index, src)
    return out.view(n, h, w, c).permute(0, 3, 1, 2)


torch.fx.wrap("_index_add")  # a leaf for torch.fx: its memory-format test is not traceable control flow


def _add_at(base: torch.Tensor, y: torch.Tensor, index: torch.Tensor, has_index: bool) -> torch.Tensor:
    """base + y, where y's channels land on `index` of base's when the widths differ."""
    if has_index:
        return _index_add(base, index, y, False)
    return base + y


def _zeros(like: torch.Tensor, width: int, spatial: bool, layer_input: torch.Tensor) -> torch.Tensor:
    """Zeros of `width` channels, channels-last where `like` or the layer's input is (new_zeros would
    give a contiguous map, and every conv after it would pay a reorder). Both are asked because a
    one-channel map is contiguous in both formats, so a block that keeps one channel cannot say."""
    if spatial:
        fmt = torch.channels_last if _channels_last(like) or _channels_last(layer_input) else torch.contiguous_format
        return torch.empty([like.size(0), width, like.size(2), like.size(3)], dtype=like.dtype,
                           device=like.device, memory_format=fmt).zero_()
    return like.new_zeros(like.size(0), width)


torch.fx.wrap("_zeros")  # a leaf for torch.fx: its memory-format test is not traceable control flow


class Shortcut(nn.Module):
    """The residual path's ops (none: identity); the layer places its output."""

    def __init__(self, cfg: dict, gate_factory=None):
        super().__init__()
        self.ops, _ = build_chain(cfg["ops"], gate_factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops(x)


class Block(nn.Module):
    """A chain of ops; `index` places its output channels in the layer's output."""

    def __init__(self, cfg: dict, width: int, gate_factory=None):
        super().__init__()
        self.ops, self.fresh = build_chain(cfg["ops"], gate_factory)
        self.has_index = cfg["index"] is not None
        self.register_buffer("index", _index(cfg["index"]), persistent=False)
        self.register_buffer("spread", _spread_index(cfg["index"], width), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops(x)


class Layer(nn.Module):
    """post(sum of parallel blocks, each placed by index, + the shortcut placed by index)."""

    def __init__(self, cfg: dict, spatial: bool, gate_factory=None):
        super().__init__()
        self.blocks = nn.ModuleList([Block(b, cfg["width"], gate_factory) for b in cfg["blocks"]])
        self.width = cfg["width"]
        self.spatial = spatial
        self.has_shortcut = cfg["shortcut"] is not None
        self.shortcut = Shortcut(cfg["shortcut"], gate_factory) if self.has_shortcut else nn.Identity()
        self.sc_has_index = self.has_shortcut and cfg["shortcut"]["index"] is not None
        sc_index = cfg["shortcut"]["index"] if self.sc_has_index else None
        self.register_buffer("sc_index", _index(sc_index), persistent=False)
        self.register_buffer("sc_spread", _spread_index(sc_index, self.width), persistent=False)
        self.simple = len(self.blocks) == 1 and not self.has_shortcut and not cfg["blocks"][0]["index"]
        # the sum (or the scatter into zeros) is a new tensor; a lone block's output may be x itself
        self.post, _ = build_chain(cfg["post"], gate_factory, fresh=not self.simple or self.blocks[0].fresh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.simple:
            for block in self.blocks:
                x = block(x)
            return self.post(x)
        out: Optional[torch.Tensor] = None
        for block in self.blocks:
            out = self._accumulate(x, out, block(x), block.index, block.spread, block.has_index)
        if self.has_shortcut:  # a derived layer may keep its shortcut alone: depth was learned
            out = self._accumulate(x, out, self.shortcut(x), self.sc_index, self.sc_spread, self.sc_has_index)
        assert out is not None
        return self.post(out)

    def _accumulate(self, x: torch.Tensor, out: Optional[torch.Tensor], y: torch.Tensor, index: torch.Tensor,
                    spread: torch.Tensor, has_index: bool) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript skips this branch; it cannot compile the test
            if has_index and torch.onnx.is_in_onnx_export():
                y, has_index = _spread(y, spread), False
        if out is None:
            return _index_add(_zeros(y, self.width, self.spatial, x), index, y, True) if has_index else y
        return _add_at(out, y, index, has_index)


class NasNet(nn.Module):
    """A network from a nasdsl graph config, with timm's model API.

    The last layer must be a single chain ending in the classifier (a linear op); its other ops
    (pooling, flatten, dropout) form `head`, and everything before it is `layers`.
    """

    def __init__(self, config: dict, num_classes: Optional[int] = None, in_chans: Optional[int] = None,
                 gate_factory: Optional[Callable] = None, **kwargs):
        super().__init__()
        if in_chans is not None and in_chans != config["input"][0]:
            raise ValueError(f"this network takes {config['input'][0]} input channels, not {in_chans}")
        self.config = config
        *body, last = config["layers"]
        spatial = [True] + [not flat for flat in config["flat_output"][:-1]]
        self.layers = nn.ModuleList([Layer(layer, sp, gate_factory) for layer, sp in zip(body, spatial)])
        block = last["blocks"][0]
        if (len(last["blocks"]) != 1 or last["shortcut"] or last["post"] or block["index"]
                or block["ops"][-1]["kind"] != "linear"):
            raise ValueError("the last layer must be a single chain of ops ending in a linear classifier")
        self.head, _ = build_chain(block["ops"][:-1], gate_factory)
        self.classifier: nn.Module = build_op(block["ops"][-1])
        self.feature_layers = _feature_layer_count(config)
        points = feature_points(config)
        self.feature_info: List[Dict[str, Union[int, str]]] = [
            {"num_chs": config["layers"][i]["width"], "reduction": reduction, "module": f"layers.{i}"}
            for i, reduction in points]
        self._feature_layer_index = [i for i, _ in points]
        self.num_classes = config["num_classes"]
        self.num_features = block["ops"][-1]["in"]
        self.pretrained_cfg: dict = {}
        self.default_cfg = self.pretrained_cfg
        self._init_weights()
        if num_classes is not None and num_classes != self.num_classes:
            self.reset_classifier(num_classes)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def op_modules(self) -> List[dict]:
        """Per layer, the (state-dict name, module) of every op, in the config's order."""
        out = []
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            out.append({
                "blocks": [[(f"layers.{i}.blocks.{j}.ops.{k}", m) for k, m in enumerate(b.ops)]
                           for j, b in enumerate(layer.blocks)],
                "shortcut": [(f"layers.{i}.shortcut.ops.{k}", m) for k, m in enumerate(layer.shortcut.ops)]
                if layer.has_shortcut else [],
                "post": [(f"layers.{i}.post.{k}", m) for k, m in enumerate(layer.post)],
            })
        out.append({"blocks": [[(f"head.{k}", m) for k, m in enumerate(self.head)] + [("classifier", self.classifier)]],
                    "shortcut": [], "post": []})
        assert len(out) == n + 1
        return out

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            if i < self.feature_layers:
                x = layer(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            if i >= self.feature_layers:
                x = layer(x)
        x = self.head(x)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Union[int, List[int], None] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's feature API: the maps of `feature_info` picked by `indices` (None: all; n: the
        last n; a list: those, negative from the end), and unless `intermediates_only`, the
        forward_features map too (or the last picked one with `stop_early`)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt {output_fmt!r}: this network's maps are NCHW")
        take = self._take_indices(indices)
        wanted = [self._feature_layer_index[i] for i in take]
        end = max(wanted) + 1 if stop_early or intermediates_only else self.feature_layers
        intermediates = []
        for i, layer in enumerate(self.layers):
            if i >= end:
                break
            x = layer(x)
            if i in wanted:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drops the layers after the last picked feature map (and the head): what a
        features_only model keeps. Returns the picked indices, counted from the start."""
        take = self._take_indices(indices)
        self.feature_layers = self._feature_layer_index[max(take)] + 1
        self.layers = self.layers[:self.feature_layers]
        if prune_head:
            self.head = nn.Sequential()
            self.reset_classifier(0)
        return take

    def _take_indices(self, indices: Union[int, List[int], None]) -> List[int]:
        n = len(self.feature_info)
        if n == 0:
            raise ValueError("this network has no feature maps: its first layer already flattens")
        if indices is None:
            indices = n
        if isinstance(indices, int):
            if not 0 < indices <= n:
                raise ValueError(f"out_indices: the last {indices} of {n} feature maps do not exist")
            return list(range(n - indices, n))
        take = [i + n if i < 0 else i for i in indices]
        bad = [i for i, t in zip(indices, take) if not 0 <= t < n]
        if bad or not take:
            raise ValueError(f"out_indices {list(indices)}: this network has {n} feature maps "
                             f"(0 to {n - 1}, at reductions {[f['reduction'] for f in self.feature_info]})")
        return take


def feature_points(config: dict) -> List[Tuple[int, int]]:
    """(layer index, reduction) of timm's feature maps: the last feature-map layer at each
    reduction of the input size (the product of the strides so far), in order."""
    points: List[Tuple[int, int]] = []
    reduction = 1
    for i in range(_feature_layer_count(config)):
        for op in config["layers"][i]["blocks"][0]["ops"]:
            reduction *= op.get("stride", 1)
        if points and points[-1][1] == reduction:
            points[-1] = (i, reduction)
        else:
            points.append((i, reduction))
    return points


def _feature_layer_count(config: dict) -> int:
    """Layers up to the last one that still outputs a feature map; the rest is the head."""
    count = 0
    for i, flat in enumerate(config["flat_output"][:-1]):
        if not flat:
            count = i + 1
    return count
