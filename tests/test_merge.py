"""Merging (nasdsl/derive/merge.py): a derived network's parallel blocks merged into one MBConv, and
residual blocks widened to a dense add, compute what the derived network computes (eval mode,
1e-4), on every shipped space with random gates, with fewer ops."""
from __future__ import annotations

import zlib

import pytest
import torch

from nasdsl.derive.derive import cut_kernels, derive
from nasdsl.derive.merge import merge, train_form
from nasdsl.graph.ops import is_one_tap_depthwise
from nasdsl.language.compiler import compile_source
from nasdsl.supernet.network import Layer, NasNet, Select
from cli_helpers import contiguous_maps
from test_derive import FILES, compiled, gen, random_masks, slim_and_masked, supernet

pytestmark = pytest.mark.usefixtures("one_thread")


def merged_pair(d, model, seed: int, dense_residual: bool = True, depthwise: str = "padded"):
    slim = slim_and_masked(d, model, seed)
    network, state = merge(d.network, slim.state_dict(), dense_residual=dense_residual, depthwise=depthwise)
    merged = NasNet(network.to_config()).eval()
    merged.load_state_dict(state, strict=True)
    return slim, network, merged


def assert_same(slim, merged, network, seed: int, inputs_matter: bool = True) -> None:
    x = torch.randn(3, *network.input_shape.to_list(), generator=gen(seed))
    with torch.no_grad():
        expected, got = slim(x), merged(x)
    scale = max(1.0, float(expected.abs().max()))
    err = float((expected - got).abs().max())
    assert err <= 1e-4 * scale, f"merged and derived networks differ by {err:.3g} (logits up to {scale:.3g})"
    if inputs_matter:   # (with whole gate groups closed at random, a network can lose its input)
        assert float((expected[0] - expected[1]).abs().max()) > 1e-4 * scale


def conv_count(model) -> int:
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())


@pytest.mark.parametrize("density", ["0.5", "mixed"])
@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_merged_equals_derived(path, density):
    net = compiled(path.stem)
    masks, strength = random_masks(net, density, seed=zlib.crc32(f"merge:{path.stem}:{density}".encode()))
    d = derive(net, masks, strength)
    slim, network, merged = merged_pair(d, supernet(path.stem), seed=3)
    assert_same(slim, merged, network, seed=4, inputs_matter=density == "0.5")
    if path.stem.startswith("proxyless"):   # every layer of candidates became one block of ~three convs
        assert any(len(layer.blocks) > 1 for layer in d.network.layers)
        assert all(len(layer.blocks) == 1 for layer in network.layers)
        assert conv_count(merged) < conv_count(slim) / 2
    else:   # (MobileNetV2's projection shortcut is a parallel block of another kind: left alone),
        # less the depthwise convs derivation cut to one tap on 1x1 maps, folded into their BN
        assert conv_count(merged) == conv_count(slim) - len(_pointwise_depthwise(d.network))
    assert _pointwise_depthwise(network) == []
    for layer in network.layers:   # every shortcut lands on the leading channels (order_streams)
        index = layer.shortcut.index if layer.shortcut is not None else None
        assert index is None or index == tuple(range(len(index))), layer.name


MIXED = """
space mixed(input=3, resolution=12, classes=5)
layer stem [gate=off] = conv(16, k=3) > bn > relu6
layer a = mbconv(16, k=5, e=3) | mbconv(16, k=3, e=6) | mbconv(16, k=5, e=6) | mbconv(16, k=7, e=3)
layer b [residual=off] = mbconv(24, k=3, e=3, stride=2) | mbconv(24, k=3, e=6, stride=2)
layer r = basic(24)
layer classifier = gap > linear(classes)
"""


@pytest.mark.parametrize("depthwise", ["padded", "mixed"])
def test_candidates_in_any_kernel_order_make_one_depthwise_stage_and_dense_adds(depthwise):
    net = compile_source(MIXED, "mixed.space")
    masks, strength = random_masks(net, "0.5", seed=5)
    from nasdsl.supernet.build import build_supernet

    torch.manual_seed(0)
    d = derive(net, masks, strength)
    slim, network, merged = merged_pair(d, build_supernet(net).eval(), seed=6, depthwise=depthwise)
    assert_same(slim, merged, network, seed=7)
    a, b, r = network.layers[1:4]
    dw = a.blocks[0].ops[3]
    assert [op.kind for op in a.blocks[0].ops] == ["conv", "bn", "act", dw.kind, "bn", "act", "conv"]
    if depthwise == "mixed":
        assert dw.kind == "mixconv" and dw.attrs["kernels"] == (3, 5, 7)
        assert dw.attrs["depthwise"] and dw.attrs["in_splits"] == dw.attrs["out_splits"]
        assert sum(dw.attrs["in_splits"]) == dw.in_shape.channels
    else:   # the smaller kernels zero-padded to 7x7
        assert dw.kind == "conv" and dw.attrs["k"] == 7 and dw.attrs["groups"] == dw.in_shape.channels
    assert [op.kind for op in b.blocks[0].ops][3] == "conv"          # one kernel: a plain depthwise conv
    assert a.blocks[0].index is None                                  # the add into the stream is dense


@pytest.mark.parametrize("kept, dense", [(16, True), (12, True), (11, False), (4, False)])
def test_a_residual_block_goes_dense_while_its_zero_rows_at_most_double_its_macs(kept, dense):
    net = compile_source(MIXED, "mixed.space")
    masks = {g.key: torch.ones(g.channels, dtype=torch.bool) for g in net.gates()}
    last = [g.key for g in net.gates() if g.layer == "r"][-1]
    masks[last] = torch.arange(24) % 24 < kept
    from nasdsl.supernet.build import build_supernet

    d = derive(net, masks)
    slim, network, merged = merged_pair(d, build_supernet(net).eval(), seed=6)
    assert_same(slim, merged, network, seed=7)
    r = network.layers[3]
    if dense:
        assert r.blocks[0].index is None and r.blocks[0].ops[-1].attrs["bias"]
    else:
        assert r == d.network.layers[3] and r.blocks[0].index == tuple(range(kept))


def test_without_dense_residual_the_indexed_adds_stay():
    net = compile_source(MIXED, "mixed.space")
    masks, strength = random_masks(net, "0.5", seed=5)
    from nasdsl.supernet.build import build_supernet

    d = derive(net, masks, strength)
    slim, network, merged = merged_pair(d, build_supernet(net).eval(), seed=6, dense_residual=False)
    assert_same(slim, merged, network, seed=7)
    r, before = network.layers[3], d.network.layers[3]   # the lone residual block still adds its 8 channels
    assert r.blocks[0].index is not None and r.blocks[0].out_shape == before.blocks[0].out_shape  # by index
    assert r.shortcut.index == tuple(range(17)) != before.shortcut.index    # its stream renumbered


STREAM = """
space stream(input=3, resolution=6, classes=5)
layer stem = conv(16, k=3) > bn > relu
layer r1 = basic(16)
layer r2 = basic(16)
layer classifier = gap > linear(classes)
"""


def _stream_masks(net) -> dict[str, torch.Tensor]:
    """The stem keeps the even channels; r1 adds odd ones and rewrites some even ones; r2 adds more."""
    masks = {g.key: torch.ones(g.channels, dtype=torch.bool) for g in net.gates()}
    keys = {g.layer: g.key for g in net.gates()}   # each layer's last gate
    c = torch.arange(16)
    masks[keys["stem"]] = c % 2 == 0
    masks[keys["r1"]] = (c % 4 == 1) | (c < 4)
    masks[keys["r2"]] = (c == 7) | (c == 15)
    return masks


def test_a_residual_stream_is_renumbered_so_its_shortcut_adds_are_zero_pads():
    """Derivation keeps the unpruned network's channel numbers, so where a block adds channels to a
    stream the input's channels lie scattered among them and the shortcut is added by index;
    merging renumbers the stream in the order channels join it (order_streams): every shortcut is
    the leading channels (a zero pad, or the whole width), the same function. ordered=False keeps
    the old numbering (exports made before)."""
    from nasdsl.supernet.build import build_supernet

    net = compile_source(STREAM, "stream.space")
    d = derive(net, _stream_masks(net))
    scattered = [layer.shortcut.index for layer in d.network.layers if layer.shortcut is not None]
    assert scattered == [(0, 2, 4, 6, 7, 9, 10, 12), (0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13)]
    torch.manual_seed(0)
    slim, network, merged = merged_pair(d, build_supernet(net).eval(), seed=6)
    assert_same(slim, merged, network, seed=7)
    assert [layer.shortcut.index for layer in network.layers if layer.shortcut is not None] == \
        [tuple(range(8)), tuple(range(13))]
    # r1 writes 7 of 13 channels: dense, with zero rows; r2 writes its 2 new ones: the last two, a pad
    assert [layer.blocks[0].index for layer in network.layers[1:3]] == [None, (13, 14)]
    assert not any(isinstance(m, Select) for m in merged.modules())
    old, _ = merge(d.network, slim.state_dict(), ordered=False)
    assert [layer.shortcut.index for layer in old.layers if layer.shortcut is not None] == scattered


PROJECTED = """
space projected(input=3, resolution=6, classes=5)
layer stem = conv(16, k=3) > bn > relu
layer p = mbconv(24, k=3, e=2) | conv(24, k=1) > bn
layer classifier = gap > linear(classes)
"""


def test_a_layer_of_two_blocks_gets_each_blocks_channels_contiguous():
    """MobileNetV2's projection is a block beside its MBConv, of another kind, so merging leaves the
    two; renumbered (order_streams), each writes a contiguous range: a zero pad, not an add by index."""
    from nasdsl.supernet.build import build_supernet

    net = compile_source(PROJECTED, "projected.space")
    masks = {g.key: torch.ones(g.channels, dtype=torch.bool) for g in net.gates()}
    mbconv, proj = [g.key for g in net.gates() if g.layer == "p"][-2:]   # each block's output gate
    masks[mbconv] = torch.arange(24) % 2 == 0       # channels 0, 2, ..., 22
    masks[proj] = torch.arange(24) < 16             # channels 0 .. 15
    d = derive(net, masks)
    assert [b.index for b in d.network.layers[1].blocks] == [(*range(0, 16, 2), 16, 17, 18, 19), tuple(range(16))]
    torch.manual_seed(0)
    slim, network, merged = merged_pair(d, build_supernet(net).eval(), seed=6)
    assert_same(slim, merged, network, seed=7)
    # 16, 18, 20, 22 (the MBConv's alone), 0, 2, ..., 14 (both), 1, 3, ..., 15 (the projection's alone)
    assert [b.index for b in network.layers[1].blocks] == [tuple(range(0, 12)), tuple(range(4, 20))]


def test_a_layer_whose_blocks_differ_in_kind_is_left_alone():
    text = MIXED.replace("mbconv(16, k=7, e=3)", "mbconv(16, k=7, e=1)")   # e=1: no expansion conv
    net = compile_source(text, "mixed.space")
    masks, strength = random_masks(net, "0.9", seed=1)
    from nasdsl.supernet.build import build_supernet

    d = derive(net, masks, strength)
    slim, network, merged = merged_pair(d, build_supernet(net).eval(), seed=2)
    assert_same(slim, merged, network, seed=3)
    assert len(network.layers[1].blocks) == len(d.network.layers[1].blocks) > 1


def _pointwise_depthwise(network) -> list[str]:
    """Where a depthwise conv with a 1x1 kernel (a per-channel scale) is left in `network`."""
    return [f"{layer.name}.{j}.{k}" for layer in network.layers for j, b in enumerate(layer.blocks)
            for k, op in enumerate(b.ops) if is_one_tap_depthwise(op)]


@pytest.mark.parametrize("stride", [1, 2])
def test_a_depthwise_conv_cut_to_one_tap_is_folded_into_the_bn_after_it(stride):
    """At 16 px the default search's last stages run on 1x1 maps, where every depthwise kernel is cut
    to its centre tap: a per-channel scale, which PyTorch runs as a grouped conv (at batch 1, 0.1 ms
    each on 2 threads, 2 to 3.6 ms on 1). In eval mode it and the BN after it are one affine map."""
    text = f"""
space pointwise(input=3, resolution=6, classes=5)
layer stem [gate=off] = conv(16, k=3) > bn > relu6
layer a = mbconv(16, k=1, e=3) | mbconv(16, k=1, e=6)
layer b [residual=off] = mbconv(24, k=1, e=3, stride={stride}) | mbconv(24, k=1, e=6, stride={stride})
layer c = mbconv(24, k=5, e=3)
layer classifier = gap > linear(classes)
"""
    net, cut = cut_kernels(compile_source(text.replace("resolution=6", "resolution=1"), "pointwise.space"))
    assert cut   # at 1x1 the 5x5 kernel is its centre tap; at 6x6 (below) only the k=1 ones are 1x1
    net = compile_source(text, "pointwise.space") if stride == 2 else net
    masks, strength = random_masks(net, "0.5", seed=5)
    from nasdsl.supernet.build import build_supernet

    torch.manual_seed(0)
    d = derive(net, masks, strength)
    assert len(_pointwise_depthwise(d.network)) >= (4 if stride == 1 else 3)
    slim, network, merged = merged_pair(d, build_supernet(net).eval(), seed=6)
    assert_same(slim, merged, network, seed=7)
    assert _pointwise_depthwise(network) == []
    a, b = network.layers[1:3]
    assert [op.kind for op in a.blocks[0].ops] == ["conv", "bn", "act", "bn", "act", "conv"]
    assert [op.kind for op in b.blocks[0].ops][3] == ("subsample" if stride == 2 else "bn")


# ---- the form finetuning trains (train_form) -----------------------------------------------------
def _train_step_results(model, x, y) -> tuple[torch.Tensor, dict, dict]:
    """Logits, parameter gradients and the state after one training-mode forward and backward."""
    model.train()
    model.zero_grad()
    torch.manual_seed(0)   # the same dropout masks
    logits = model(x)
    torch.nn.functional.cross_entropy(logits, y).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    return logits.detach(), grads, {k: v.clone() for k, v in model.state_dict().items()}


def assert_close_all(got: dict, expected: dict, what: str) -> None:
    assert got.keys() == expected.keys()
    for k, e in expected.items():
        scale = max(1.0, float(e.double().abs().max())) if e.is_floating_point() else 1.0
        err = float((got[k].double() - e.double()).abs().max())
        assert err <= 1e-9 * scale, f"{what} of {k} differ by {err:.3g} (up to {scale:.3g})"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_train_form_trains_exactly_what_the_derived_network_does(path):
    """Finetuning trains train_form's network: in training mode its logits, its BN batch statistics
    and its gradients, mapped back to the derived network's tensors, are the derived network's; the
    mapping is exact both ways; and the candidates of a ProxylessNAS layer become one block."""
    net = compiled(path.stem)
    masks, strength = random_masks(net, "mixed", seed=zlib.crc32(f"train:{path.stem}".encode()))
    d = derive(net, masks, strength)
    slim = slim_and_masked(d, supernet(path.stem), seed=5)
    network, state, to_derived = train_form(d.network, slim.state_dict())
    assert all(torch.equal(v, to_derived(state)[k]) for k, v in slim.state_dict().items())
    trained = NasNet(network.to_config())
    trained.load_state_dict(state, strict=True)
    slim, trained = slim.double(), trained.double()   # exact up to float64 rounding, not float32's
    x = torch.randn(4, *net.input_shape.to_list(), generator=gen(6), dtype=torch.float64)
    y = torch.randint(0, net.num_classes, (4,), generator=gen(7))
    logits, grads, after = _train_step_results(slim, x, y)
    got_logits, got_grads, got_after = _train_step_results(trained, x, y)
    assert_close_all({"logits": got_logits}, {"logits": logits}, "training-mode outputs")
    assert_close_all(to_derived(got_after), after, "BN statistics")
    params = dict(trained.named_parameters())
    assert_close_all({k: v for k, v in to_derived({**got_after, **got_grads}).items() if k in grads}, grads,
                     "gradients")
    assert set(params) == set(got_grads)
    if path.stem.startswith("proxyless"):   # (BN count: one per merged position instead of one per candidate)
        assert any(len(layer.blocks) > 1 for layer in d.network.layers)
        assert all(len(layer.blocks) == 1 for layer in network.layers)
        assert conv_count(trained) < conv_count(slim)
        bns = [sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) for model in (trained, slim)]
        assert bns[0] < bns[1] / 2


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_channels_last_maps_stay_channels_last_and_train_what_contiguous_ones_do(path):
    """Training runs on channels-last maps, where a derived network's selects and index-placed adds
    (and those of its training form) gather and scatter a (pixels, channels) matrix: no layer or
    select turns a channels-last map contiguous (each conv after it would reorder it; float32 at
    batch 16, where every conv runs in oneDNN), and logits and gradients are those of contiguous
    maps (float64)."""
    net = compiled(path.stem)
    masks, strength = random_masks(net, "mixed", seed=zlib.crc32(f"cl:{path.stem}".encode()))
    for mask in masks.values():   # a one-channel map is both formats: a conv's output after it is contiguous
        if int(mask.sum()) == 1 and mask.numel() > 1:
            mask[int(mask.logical_not().nonzero()[0])] = True
    d = derive(net, masks, strength)
    slim = slim_and_masked(d, supernet(path.stem), seed=8)
    network, state, _ = train_form(d.network, slim.state_dict())
    trained = NasNet(network.to_config())
    trained.load_state_dict(state, strict=True)
    x = torch.randn(16, *net.input_shape.to_list(), generator=gen(9))
    y = torch.randint(0, net.num_classes, (16,), generator=gen(10))
    for model in (slim, trained):
        expected = _train_step_results(model.double(), x.double(), y)
        model.float().to(memory_format=torch.channels_last)
        watched = [n for n, m in model.named_modules() if isinstance(m, (Layer, Select))]
        x_cl = x.contiguous(memory_format=torch.channels_last)
        assert watched and contiguous_maps(model.train(), x_cl, watched) == []
        got = _train_step_results(model.double(), x_cl.double(), y)
        assert_close_all({"logits": got[0]}, {"logits": expected[0]}, "channels-last outputs")
        assert_close_all(got[1], expected[1], "channels-last gradients")
