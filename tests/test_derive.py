"""Derivation (nasdsl/derive): for binary gates, the slim network computes exactly what the
hard-masked supernet computes, and its graph counts its parameters and FLOPs exactly, on every
space in spaces/ and on the corner cases (a block or a whole residual layer pruned away, a layer
that would lose every channel, gates after the activation), and it prints back to .space text
that compiles to the same network."""
from __future__ import annotations

import math
import re
import zlib
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from nasdsl.derive.derive import _rounded, derive, round_masks, slim_state_dict
from nasdsl.graph import accounting
from nasdsl.graph.printer import to_space
from nasdsl.language.compiler import compile_file, compile_source
from nasdsl.supernet.build import build_supernet, place_gates
from nasdsl.supernet.network import NasNet
from test_spaces import thop_macs  # conv + linear MACs only, as the graph counts them

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "spaces").glob("*.space"))
# ImageNet spaces at a low resolution, so the whole file stays fast (VGG-16 needs >= 32 px)
LOW_RES = {"vgg16": 32, "resnet50": 32, "mobilenetv2": 32, "proxyless": 32, "efficientnet_b0": 32,
           "mobilenetv3_large": 32, "mixnet_s": 32}
DENSITIES = ["0.9", "0.5", "0.1", "0.02", "mixed"]

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # thop's use of distutils
              pytest.mark.usefixtures("one_thread")]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randomize(model: nn.Module, seed: int) -> None:
    """Random BN statistics and affine parameters, biases and O(1) linear weights: a channel that
    should be gone but leaks (a BN offset, a bias) shows up in the logits. The statistics start
    from a calibration on random images, so the signal survives the depth of the network. The
    calibration runs with every BN's affine parameters at their initial (1, 0), not at what an
    earlier call drew: otherwise a test's result depended on the tests before it (EfficientNet's
    logits grew to 1e3-1e5 after some, and float32 rounding alone broke the 1e-4 tolerance)."""
    g = gen(seed)
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, 1 / math.sqrt(m.in_features), generator=g)
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.normal_(0, 0.1, generator=g)
        for m in bns:
            m.weight.fill_(1.0)   # (a gated BN's weight is computed from its parameter: untouched)
            m.bias.zero_()
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the calibration batch
        model.train()
        model(torch.randn(8, *model.config["input"], generator=g))
        model.eval()
        for m in bns:
            m.momentum = 0.1
            std = m.running_var.sqrt()
            m.running_mean.add_(0.2 * std * torch.randn(std.shape, generator=g))
            m.running_var.mul_(torch.empty_like(std).uniform_(0.6, 1.5, generator=g))
            m.weight.uniform_(0.4, 1.2, generator=g)
            m.bias.normal_(0, 0.2, generator=g)


@lru_cache(maxsize=None)
def compiled(stem: str):
    res = LOW_RES.get(stem)
    return compile_file(ROOT / "spaces" / f"{stem}.space", {"resolution": str(res)} if res else None)


@lru_cache(maxsize=None)
def supernet(stem: str, placement: str = "after_bn"):
    torch.manual_seed(0)
    return build_supernet(compiled(stem), placement).eval()


def random_masks(net, density: str, seed: int):
    """Binary gates of a given density, or `mixed`: each group all off, sparse, half or all on."""
    g = gen(seed)
    masks = {}
    for gate in net.gates():
        if density == "mixed":
            p = [0.0, 0.03, 0.5, 1.0][int(torch.randint(4, (1,), generator=g))]
        else:
            p = float(density)
        masks[gate.key] = torch.rand(gate.channels, generator=g) < p
    strength = {k: torch.randn(m.numel(), generator=g) for k, m in masks.items()}
    return masks, strength


def slim_and_masked(d, model: nn.Module, seed: int):
    """The supernet with the effective masks, hard, and freshly randomised (its BN statistics
    calibrated under these masks), and the slim module with the weights sliced from it."""
    model.gate_set.load({k: torch.where(m, 1.0, -1.0) for k, m in d.masks.items()})
    model.gate_set.set_mode("hard")
    randomize(model, seed)
    slim = NasNet(d.network.to_config()).eval()
    slim.load_state_dict(slim_state_dict(d, model, slim))
    return slim


def assert_equivalent(d, model: nn.Module, batch: int = 2, seed: int = 2) -> torch.Tensor:
    slim = slim_and_masked(d, model, seed)
    x = torch.randn(batch, *d.network.input_shape.to_list(), generator=gen(seed + 1))
    with torch.no_grad():
        expected, got = model(x), slim(x)
    scale = max(1.0, float(expected.abs().max()))
    err = float((expected - got).abs().max())
    assert err <= 1e-4 * scale, f"slim and masked supernet differ by {err:.3g} (logits up to {scale:.3g})"
    return expected


def assert_counts(d) -> None:
    slim = NasNet(d.network.to_config())
    cost = accounting.network_cost(d.network)
    assert cost.params == sum(p.numel() for p in slim.parameters())
    assert cost.flops == thop_macs(slim, d.network.input_shape.to_list())


# ---- the invariant, on every space ------------------------------------------------------------
def test_every_space_is_covered():
    assert len(FILES) >= 8


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_slim_equals_masked_supernet(path, density):
    net = compiled(path.stem)
    model = supernet(path.stem)
    masks, strength = random_masks(net, density, seed=zlib.crc32(f"{path.stem}:{density}".encode()))
    d = derive(net, masks, strength)
    logits = assert_equivalent(d, model)
    assert logits.shape == (2, net.num_classes)
    # meaningful: the two images get different logits (unless nearly every channel is gone: a
    # layer of one channel, or VGG-16's BN-free stack at 10%, carries almost nothing of the image)
    if density in ("0.9", "0.5"):
        assert float((logits[0] - logits[1]).abs().max()) > 1e-4 * max(1.0, float(logits.abs().max()))
    assert_counts(d)
    full = accounting.network_cost(net)
    cost = accounting.network_cost(d.network)
    assert cost.flops <= full.flops and cost.params <= full.params
    if density != "0.9":
        assert cost.flops < full.flops
    # the effective masks add a channel back only where a layer would lose all of them, and say so
    kept_note = [n for n in d.notes if "kept its strongest channel" in n]
    added = sum(int((d.masks[k] & ~masks[k]).sum()) for k in masks)
    assert (added > 0) == bool(kept_note)


# ---- corner cases --------------------------------------------------------------------------------
CHOICES = """
space choices(input=3, resolution=8, classes=4)
layer stem [gate=off] = conv(8, k=3) > bn > relu
layer a = mbconv(8, k=3, e=2) | mbconv(8, k=5, e=2)
layer b = mbconv(8, k=3, e=2) | mbconv(8, k=5, e=2)
layer c [residual=off] = mbconv(8, k=3, e=2) | mbconv(8, k=5, e=2)
layer down = conv(16, k=3, stride=2) > bn > relu
layer classifier = gap > linear(classes)
"""


def _choices():
    net = compile_source(CHOICES, "choices.space")
    torch.manual_seed(0)
    model = build_supernet(net).eval()
    masks = {g.key: torch.ones(g.channels, dtype=torch.bool) for g in net.gates()}
    return net, model, masks


def test_pruned_block_and_pruned_residual_layer():
    net, model, masks = _choices()
    assert [l.shortcut is not None for l in net.layers[1:4]] == [True, True, False]
    masks["a.b0.mid"][:] = False      # a's first block: its path is cut, so the whole block goes
    masks["a.b1.out"][::2] = False    # a's second block keeps half its outputs
    for key in ("b.b0.mid", "b.b0.out", "b.b1.mid", "b.b1.out"):
        masks[key][:] = False          # every block of the residual layer b: b is the identity
    d = derive(net, masks)
    names = [l.name for l in d.network.layers]
    assert "b" not in names and names == ["stem", "a", "c", "down", "classifier"]
    assert any(re.search(r"layer b: every block was pruned; the layer is an identity and was removed", n)
               for n in d.notes)
    a = d.network.layers[1]
    assert [blk.name for blk in a.blocks] == ["a.b1"] and a.shortcut is not None
    assert a.blocks[0].index == (1, 3, 5, 7) and a.shortcut.index is None  # the residual keeps all 8
    assert not d.masks["a.b0.out"].any()  # the cut block's output gate is closed too (effective masks)
    assert_equivalent(d, model)
    assert_counts(d)


def test_residual_layer_reduced_to_its_shortcut():
    """ResNet-56's stage transition with both gate groups closed: subsample + zero-pad remain."""
    net = compiled("resnet56_cifar")
    model = supernet("resnet56_cifar")
    masks, strength = random_masks(net, "0.5", seed=4)
    masks["s2.0.bn1"][:] = False
    masks["s3.4.bn2"][:] = False   # a stride-1 block: its identity shortcut and the ReLU after the add
    d = derive(net, masks, strength)
    # the ReLU after the add acts on the previous layer's ReLU output: it changes nothing, so it goes
    assert "layer s2.0: every block was pruned; only its shortcut remains" in d.notes
    layer = next(l for l in d.network.layers if l.name == "s2.0")
    assert [op.kind for op in layer.blocks[0].ops] == ["subsample"] and layer.shortcut is None
    assert layer.blocks[0].index is None and layer.width == 16  # only the shortcut's channels
    assert "layer s3.4: every block was pruned; the layer is an identity and was removed" in d.notes
    assert "s3.4" not in [l.name for l in d.network.layers]
    assert_equivalent(d, model)
    assert_counts(d)


def test_closed_depth_gates_remove_blocks_and_the_slim_network_still_matches():
    """Depth gates (architecture.block_cost) fold into the channel gates before derivation: a closed
    one removes its block, so ResNet-56 loses residual layers, and the invariant holds as before."""
    net = compiled("resnet56_cifar")
    torch.manual_seed(0)
    model = build_supernet(net, depth_gates=True).eval()
    gs = model.gate_set
    masks, strength = random_masks(net, "0.5", seed=21)
    gs.load({k: torch.where(m, 1.0, -1.0) for k, m in masks.items()})
    with torch.no_grad():
        for d in gs.depth_gates:
            d.s.fill_(-1.0 if d.key in ("s1.3:depth", "s2.0:depth", "s3.8:depth") else 1.0)
    gs.set_mode("hard")
    randomize(model, 7)
    x = torch.randn(2, *net.input_shape.to_list(), generator=gen(8))
    with torch.no_grad():
        before = model(x)
        assert gs.fold_depth_gates() == 3
        torch.testing.assert_close(model(x), before)
    d = derive(net, {k: v > 0 for k, v in gs.values().items()}, strength)
    names = [l.name for l in d.network.layers]
    assert "s1.3" not in names and "s3.8" not in names and "s1.4" in names
    assert "layer s2.0: every block was pruned; only its shortcut remains" in d.notes
    assert_equivalent(d, model)
    assert_counts(d)


def test_a_block_that_starts_with_an_activation_leaves_the_layer_input_alone():
    """In place, that activation would overwrite what the other blocks read and what autograd saved
    (a derived layer can be a bare activation: a shortcut-only layer closed by hswish)."""
    net = compile_source("""
space t(input=3, resolution=8, classes=10)
layer stem [gate=off] = conv(8, k=3) > bn
layer a [gate=off] = hswish | conv(8, k=1)
layer b [gate=off] = relu
layer classifier = gap > linear(classes)
""", "t.space")
    torch.manual_seed(0)
    model = NasNet(net.to_config()).train()
    x = torch.randn(4, 3, 8, 8)
    stem = model.layers[0](x)
    a = model.layers[1]
    expected = torch.nn.functional.hardswish(stem) + a.blocks[1](stem)
    assert torch.allclose(a(stem.clone()), expected)
    model(x).sum().backward()  # an in-place op on a saved tensor would raise here
    assert all(p.grad is not None for p in model.parameters())


def test_emptied_layer_keeps_its_strongest_channel():
    net = compiled("vgg16_cifar")
    model = supernet("vgg16_cifar")
    masks, strength = random_masks(net, "0.5", seed=5)
    masks["conv3.1.bn"][:] = False
    strength["conv3.1.bn"] = torch.linspace(-1, 0, 256)
    strength["conv3.1.bn"][77] = 0.5          # every s <= 0, this one is the highest
    d = derive(net, masks, strength)
    kept = d.masks["conv3.1.bn"]
    assert kept.sum() == 1 and bool(kept[77])
    assert any("layer conv3.1:" in n and "kept its strongest channel" in n and "channel 77" in n for n in d.notes)
    assert next(l for l in d.network.layers if l.name == "conv3.1").width == 1
    assert_equivalent(d, model)
    assert_counts(d)


def test_emptied_multi_block_layer_reopens_the_strongest_path():
    """Non-residual layer c loses everything: the strongest output channel over both blocks is kept
    and, its block's path being cut, the strongest channel of the inner gate group reopens."""
    net, model, masks = _choices()
    for key in ("c.b0.mid", "c.b0.out", "c.b1.mid", "c.b1.out"):
        masks[key][:] = False
    strength = {k: torch.full((m.numel(),), -1.0) for k, m in masks.items()}
    strength["c.b0.out"][2] = -0.5
    strength["c.b1.out"][5] = -0.2        # the strongest output of the layer
    strength["c.b1.mid"][11] = -0.3       # the strongest inner channel of that block
    d = derive(net, masks, strength)
    assert torch.equal(d.masks["c.b1.out"].nonzero().flatten(), torch.tensor([5]))
    assert torch.equal(d.masks["c.b1.mid"].nonzero().flatten(), torch.tensor([11]))
    assert not d.masks["c.b0.out"].any() and not d.masks["c.b0.mid"].any()
    assert any("layer c:" in n and "c.b1, channel 5" in n for n in d.notes)
    c = next(l for l in d.network.layers if l.name == "c")
    assert c.width == 1 and [b.name for b in c.blocks] == ["c.b1"]
    assert_equivalent(d, model)
    assert_counts(d)


@pytest.mark.parametrize("stem", ["resnet56_cifar", "mobilenetv2_cifar", "vgg16_cifar", "proxyless_cifar",
                                  "vgg16"])
def test_gates_after_the_activation_derive_exactly(stem):
    net = compiled(stem)
    model = supernet(stem, "after_act")
    placed = place_gates(net, "after_act")
    for density in ("0.5", "mixed"):
        masks, strength = random_masks(net, density, seed=6)
        d = derive(placed, masks, strength)
        assert_equivalent(d, model)
        # the slim network is the one the default placement derives: gates are gone either way
        strip = lambda c: [[b["ops"] for b in l["blocks"]] for l in c["layers"]]  # noqa: E731
        assert strip(d.network.to_config()) == strip(derive(net, masks, strength).network.to_config())
    assert_counts(d)


def test_gates_before_the_bn_derive_the_placed_graph():
    """Conv-SS-BN: a closed channel still emits its BN's offset, which the slim network drops, so
    derivation is exact once those offsets are zero. It must derive the graph the supernet was
    built from (`place_gates`): the weight plans index that graph's ops."""
    net = compiled("resnet56_cifar")
    model = supernet("resnet56_cifar", "before_bn")
    masks, strength = random_masks(net, "0.5", seed=8)
    d = derive(place_gates(net, "before_bn"), masks, strength)
    slim = slim_and_masked(d, model, seed=9)  # loads strictly: every weight found its op
    with torch.no_grad():
        for layer in model.layers:
            for block in layer.blocks:
                ops = list(block.ops)
                for gate, bn in zip(ops, ops[1:]):
                    if hasattr(gate, "key") and isinstance(bn, nn.BatchNorm2d):
                        closed = ~d.masks[gate.key]
                        bn.bias[closed] = bn.weight[closed] * bn.running_mean[closed] / torch.sqrt(
                            bn.running_var[closed] + bn.eps)
    x = torch.randn(2, 3, 32, 32, generator=gen(10))
    with torch.no_grad():
        torch.testing.assert_close(slim(x), model(x), rtol=1e-4, atol=1e-4)


# ---- hardware-friendly widths (channel_multiple) ------------------------------------------------
@pytest.mark.parametrize("kept, width, multiple, up, expected", [
    (5, 32, 16, False, 0),     # a handful of channels costs what 16 do: nearest is none
    (8, 32, 16, False, 16),    # ties round up
    (7, 32, 16, False, 0),
    (20, 64, 16, False, 16),
    (24, 64, 16, False, 32),
    (60, 64, 16, False, 64),
    (34, 36, 16, False, 36),   # the full width is always allowed (tie with 32: up)
    (36, 36, 16, False, 36),   # already allowed: unchanged
    (3, 8, 16, False, 0),      # a group narrower than the multiple: none or all (a conv of 3 channels
    (5, 8, 16, False, 8),      # costs what one of 8, or 16, does)
    (5, 16, 16, False, 0),
    (20, 24, 16, False, 24),   # narrower than two multiples: none, one multiple or all
    (17, 31, 16, True, 31),
    (1, 64, 16, True, 16),     # up: the smallest allowed count >= kept
    (0, 64, 16, True, 0),
    (33, 36, 16, True, 36),
])
def test_rounded_counts(kept, width, multiple, up, expected):
    assert _rounded(kept, width, multiple, up) == expected


def test_round_masks_opens_the_strongest_and_closes_the_weakest():
    strength = {"a": torch.arange(8, dtype=torch.float), "b": torch.arange(8, dtype=torch.float)}
    masks = {"a": torch.tensor([1, 1, 1, 0, 0, 0, 0, 0], dtype=torch.bool),   # 3 -> 4: channel 7 opens
             "b": torch.tensor([1, 1, 1, 1, 0, 0, 1, 0], dtype=torch.bool)}   # 5 -> 4: channel 0 closes
    out, opened, closed = round_masks(masks, strength, 4)
    assert out["a"].nonzero().flatten().tolist() == [0, 1, 2, 7]
    assert out["b"].nonzero().flatten().tolist() == [1, 2, 3, 6]
    assert (opened, closed) == (1, 1)
    assert masks["a"].sum() == 3  # the input is left alone


@pytest.mark.parametrize("stem", ["resnet56_cifar", "proxyless_cifar", "vgg16_cifar", "mobilenetv2_cifar"])
def test_channel_multiple_derives_rounded_widths_exactly(stem):
    net = compiled(stem)
    model = supernet(stem)
    masks, strength = random_masks(net, "mixed", seed=11)
    d = derive(net, masks, strength, channel_multiple=8)
    for key, mask in d.masks.items():
        assert int(mask.sum()) % 8 == 0 or int(mask.sum()) == mask.numel(), key
    # every conv computes a multiple of 8 channels (these spaces' full widths all are)
    assert not [(layer.name, op.out_shape.channels) for layer in d.network.layers for block in layer.blocks
                for op in block.ops if op.kind == "conv" and op.out_shape.channels % 8]
    assert any(n.startswith("kept channels rounded to multiples of 8") for n in d.notes)
    assert_equivalent(d, model)
    assert_counts(d)
    # deriving again from the rounded masks changes nothing (a resumed run derives from saved gates)
    again = derive(net, d.masks, strength, channel_multiple=8)
    assert all(torch.equal(again.masks[k], d.masks[k]) for k in d.masks)
    assert not any(n.startswith("kept channels rounded") for n in again.notes)


@pytest.mark.parametrize("stem", ["resnet56_cifar", "mobilenetv2_cifar", "proxyless_cifar"])
def test_a_block_summed_with_its_shortcut_writes_all_of_the_layers_channels(stem):
    """Each block's last gate chose its own channels, so a residual stream was as wide as the union
    of what its blocks wrote (ResNet-56's stage 2: 24, 26, 27, 28, 31) and each block wrote part of
    it: zero rows or an add by index once merged. With channel_multiple, a gated block summed with
    its shortcut (or with an ungated projection, MobileNetV2's) writes all of the layer's channels,
    a multiple wide; a layer of several gated candidates (ProxylessNAS) and channel_multiple=1 keep
    each gate's own choice."""
    net = compiled(stem)
    masks, strength = random_masks(net, "0.5", seed=3)
    d = derive(net, masks, strength, channel_multiple=8)
    full = {layer.name: layer for layer in net.layers}
    one = [layer for layer in d.network.layers if (layer.shortcut is not None or len(layer.blocks) > 1)
           and sum(any(op.is_gate for op in b.ops) for b in full[layer.name].blocks) == 1]
    several = [layer for layer in d.network.layers if layer.shortcut is not None and len(layer.blocks) > 1]
    assert one if stem != "proxyless_cifar" else several
    for layer in one:
        assert layer.width % 8 == 0 or layer.width == full[layer.name].width, (layer.name, layer.width)
        assert [(b.index, b.out_shape.channels) for b in layer.blocks] == [(None, layer.width)] * len(layer.blocks)
    assert any(b.index is not None for layer in several for b in layer.blocks) == (stem == "proxyless_cifar")
    assert any(n.startswith("a block summed with its layer's shortcut writes") for n in d.notes) == bool(one)
    assert_equivalent(d, supernet(stem))
    assert_counts(d)
    exact = derive(net, masks, strength, channel_multiple=1)
    assert any(b.index is not None for layer in exact.network.layers for b in layer.blocks)


def test_channel_multiple_rounds_a_kept_strongest_channel_up():
    """An emptied VGG layer keeps its strongest channel, then grows to a whole multiple."""
    net = compiled("vgg16_cifar")
    masks, strength = random_masks(net, "0.5", seed=5)
    masks["conv3.1.bn"][:] = False
    masks["conv3.1.bn"][:3] = True                 # 3 of 256: rounds to none, the repair keeps one
    strength["conv3.1.bn"] = torch.linspace(-1, 0, 256)
    d = derive(net, masks, strength, channel_multiple=16)
    kept = d.masks["conv3.1.bn"]
    assert kept.sum() == 16 and kept[-16:].all()  # the 16 strongest
    assert next(l for l in d.network.layers if l.name == "conv3.1").width == 16
    assert_equivalent(d, supernet("vgg16_cifar"))


# ---- printing a derived network -------------------------------------------------------------------
def _normalised(config: dict) -> dict:
    """The config without block names and gate keys (the printer writes neither)."""
    for layer in config["layers"]:
        for block in layer["blocks"]:
            block.pop("name")
        for ops in [b["ops"] for b in layer["blocks"]] + [layer["post"]] + \
                ([layer["shortcut"]["ops"]] if layer["shortcut"] else []):
            for op in ops:
                op.pop("key", None)
    return config


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_derived_network_round_trips_through_space_text(path):
    net = compiled(path.stem)
    for density in ("0.3", "mixed"):
        masks, strength = random_masks(net, density, seed=7)
        d = derive(net, masks, strength)
        text = to_space(d.network)
        again = compile_source(text, f"{path.stem}_derived.space")
        assert _normalised(again.to_config()) == _normalised(d.network.to_config())
        assert accounting.network_cost(again) == accounting.network_cost(d.network)
        assert not again.gates()
    # and the supernet itself, gates included
    again = compile_source(to_space(net), f"{path.stem}.space")
    assert _normalised(again.to_config()) == _normalised(net.to_config())
    assert [(g.channels, g.layer) for g in again.gates()] == [(g.channels, g.layer) for g in net.gates()]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_deriving_a_derived_network_with_every_channel_kept_is_its_identity(path):
    """A derived network places its blocks' channels in the layer (`@ [...]`) and reads subsets
    through `select`: deriving it again (what `unpruned` and merging start from) keeps the same
    graph and the same function. It once ignored the placement, summing the blocks' channels at
    the wrong places, and stacked a second, identity select after each select."""
    net = compiled(path.stem)
    for density in ("0.3", "mixed"):
        masks, strength = random_masks(net, density, seed=7)
        derived = compile_source(to_space(derive(net, masks, strength).network), f"{path.stem}_derived.space")
        again = derive(derived, {})
        assert _normalised(again.network.to_config()) == _normalised(derived.to_config())
        torch.manual_seed(0)
        assert_equivalent(again, build_supernet(derived, "after_bn").eval())


# ---- kernels larger than the map they slide over ---------------------------------------------------
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_unreached_taps_are_the_taps_that_only_ever_meet_padding(k, stride):
    """Brute force: the taps some output reads inside the map; cutting `unreached_taps` from each
    end (and from the padding) gives the same outputs, and cutting one more would not."""
    from nasdsl.graph.ops import unreached_taps
    for size in range(1, 9):
        for padding in sorted({0, k // 2}):
            if size + 2 * padding < k:
                continue
            out = (size + 2 * padding - k) // stride + 1
            reached = {t for o in range(out) for t in range(k) if 0 <= stride * o - padding + t < size}
            cut = unreached_taps(size, k, stride, padding)
            assert cut == min(min(reached), k - 1 - max(reached)), (size, k, stride, padding)
            conv = nn.Conv2d(1, 1, k, stride, padding, bias=False)
            small = nn.Conv2d(1, 1, k - 2 * cut, stride, padding - cut, bias=False)
            with torch.no_grad():
                small.weight.copy_(conv.weight[..., cut:k - cut, cut:k - cut])
                x = torch.randn(2, 1, size, size, generator=gen(size))
                assert torch.allclose(conv(x), small(x), atol=1e-6)


TINY_MAPS = """
space tiny_maps(input=3, resolution=4, classes=4)
layer stem [gate=off] = conv(8, k=3, stride=2) > bn > relu
layer a = mbconv(8, k=7, e=2) | mbconv(8, k=3, e=2)
layer down = mbconv(16, k=7, e=2, stride=2)
layer b = mbconv(16, k=5, e=2) | mbconv(16, k=3, e=2)
layer classifier = gap > linear(classes)
"""


def test_kernels_are_cut_to_what_the_map_reaches_and_train_as_before():
    """On a 2x2 map a 7x7 depthwise kernel reaches its middle 3x3, with stride 2 on it a 7x7 reaches
    3x3 too, on a 1x1 map every kernel is its centre tap: the derived network holds those kernels,
    counts their MACs, says so, and computes what the masked supernet does in eval and in training
    mode (the cut taps only ever multiplied padding, so they get no gradient either)."""
    net = compile_source(TINY_MAPS, "tiny_maps.space")
    torch.manual_seed(0)
    model = build_supernet(net).eval()
    masks, strength = random_masks(net, "0.5", seed=3)
    d = derive(net, masks, strength)
    kernels = {b.name: [op.attrs["k"] for op in b.ops if op.kind == "conv" and op.attrs["k"] > 1 or
                        op.kind == "conv" and op.attrs["groups"] > 1] for l in d.network.layers for b in l.blocks}
    assert kernels["a.b0"] == [3] and kernels["a.b1"] == [3]      # 7x7 and 3x3 on a 2x2 map
    assert kernels["down"] == [3]                                 # 7x7, stride 2, on a 2x2 map
    assert kernels["b.b0"] == [1] and kernels["b.b1"] == [1]      # on a 1x1 map
    assert any("kernel(s) cut to the taps their input map reaches" in n for n in d.notes)
    assert "k=5" not in to_space(d.network) and "k=7" not in to_space(d.network)
    assert_equivalent(d, model)
    assert_counts(d)
    slim = slim_and_masked(d, model, seed=5)
    x = torch.randn(6, 3, 4, 4, generator=gen(9))
    model.train(), slim.train()
    expected, got = model(x), slim(x)
    assert torch.allclose(expected, got, atol=1e-4 * max(1.0, float(expected.detach().abs().max())))
    expected.sum().backward()
    dw = model.op_modules()[1]["blocks"][0][3][1]      # a.b0's 7x7 depthwise conv in the supernet
    assert dw.kernel_size == (7, 7)
    grad = dw.weight.grad.clone()
    assert grad[..., 2:5, 2:5].abs().sum() > 0
    grad[..., 2:5, 2:5] = 0
    assert not grad.any()      # the taps the derived network cut never learn anything


@pytest.mark.parametrize("stride, bias, channels_last", [(1, False, True), (2, True, False), (2, False, True)])
def test_a_one_tap_depthwise_conv_runs_as_the_multiply_it_is(stride, bias, channels_last):
    """What a depthwise kernel cut to its centre tap leaves is built as ChannelScale, an nn.Conv2d
    (weight, init, state dict) computed as a per-channel multiply: the same outputs and gradients
    as the grouped conv, in either memory format, scripted and traced."""
    from nasdsl.supernet.network import ChannelScale, build_op

    cfg = {"kind": "conv", "in": 12, "out": 12, "k": 1, "stride": stride, "padding": 0, "groups": 12, "bias": bias}
    scale = build_op(cfg)
    assert type(scale) is ChannelScale and isinstance(scale, nn.Conv2d)
    assert type(build_op(dict(cfg, k=3, padding=1))) is nn.Conv2d
    assert type(build_op(dict(cfg, out=24))) is nn.Conv2d       # a depthwise multiplier: a real conv
    conv = nn.Conv2d(12, 12, 1, stride, 0, groups=12, bias=bias)
    conv.load_state_dict(scale.state_dict())
    x = torch.randn(3, 12, 5, 5, generator=gen(4))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(3, 12, 3 if stride == 2 else 5, 3 if stride == 2 else 5, generator=gen(5))
    outs = []
    for module in (conv, scale, torch.jit.script(scale), torch.fx.symbolic_trace(scale)):
        xi = x.clone().requires_grad_()
        y = module(xi)
        y.backward(grad)
        outs.append((y.detach(), xi.grad, *(p.grad.clone() for p in module.parameters())))
        module.zero_grad()
    for got in outs[1:]:
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(outs[0], got, strict=True))
