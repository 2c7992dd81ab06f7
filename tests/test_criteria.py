"""The baseline pruning criteria (nasdsl.derive.criteria): what they score, that they keep what
they say, and that they meet a FLOPs budget the way DNAL's fit does (at most the target)."""
from __future__ import annotations

import math

import pytest
import torch

import nasdsl
from nasdsl.derive.criteria import MIN_KEEP, channel_scores, prune_to_budget
from nasdsl.derive.derive import slim_state_dict
from nasdsl.errors import NasdslError
from nasdsl.graph.accounting import network_cost
from nasdsl.supernet.network import NasNet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def resnet20():
    net = nasdsl.compile("spaces/resnet56_cifar.space", depth=3, resolution=16)
    torch.manual_seed(0)
    model = NasNet(net.to_config()).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(-1, 1)       # distinct scales, some negative: |scale| is what counts
    return net, model


def test_scores_are_filter_norms_and_bn_scales(resnet20):
    net, model = resnet20
    l1, bn = channel_scores(net, model, "l1"), channel_scores(net, model, "bn")
    assert l1.keys() == bn.keys() == {g.key for g in net.gates()}
    first = model.layers[1].blocks[0].ops      # layer1.0: conv, bn, gate (bn1), relu, conv, bn, gate (bn2)
    key = net.layers[1].blocks[0].ops[2].attrs["key"]
    assert torch.equal(l1[key], first[0].weight.abs().sum((1, 2, 3)))
    assert torch.equal(bn[key], first[1].weight.abs())


@pytest.mark.parametrize("criterion, uniform", [("l1", True), ("bn", False), ("random", True)])
@pytest.mark.parametrize("fraction", [0.5, 0.25])
def test_pruning_meets_the_budget_closely(resnet20, criterion, uniform, fraction):
    net, model = resnet20
    full = network_cost(net).flops
    target = int(full * fraction)
    d = prune_to_budget(net, channel_scores(net, model, criterion), target, uniform=uniform)
    cost = network_cost(d.network).flops
    assert 0.9 * target <= cost <= target
    slim = NasNet(d.network.to_config())
    slim.load_state_dict(slim_state_dict(d, model, slim))   # the derived weights fit the derived network


def test_l1_keeps_each_groups_strongest_filters_in_equal_shares(resnet20):
    net, model = resnet20
    scores = channel_scores(net, model, "l1")
    d = prune_to_budget(net, scores, network_cost(net).flops // 2, uniform=True)
    shares = {key: m.float().mean().item() for key, m in d.masks.items() if m.numel() >= 16}
    assert max(shares.values()) - min(shares.values()) <= 1 / 16 + 1e-6
    for key, mask in d.masks.items():
        if 0 < mask.sum() < mask.numel():
            assert scores[key][mask].min() >= scores[key][~mask].max(), key


def test_bn_keeps_one_global_threshold(resnet20):
    """Above each group's floor (`MIN_KEEP` of its channels, its strongest), one threshold for the
    whole network: no closed channel scores above a kept one that the floor did not keep."""
    net, model = resnet20
    scores = channel_scores(net, model, "bn")
    d = prune_to_budget(net, scores, network_cost(net).flops // 4, uniform=False)
    floor = {k: s.argsort(descending=True)[:math.ceil(MIN_KEEP * s.numel())] for k, s in scores.items()}
    above = {k: d.masks[k].clone().index_fill_(0, floor[k], False) for k in scores}
    kept = torch.cat([scores[k][above[k]] for k in scores])
    dropped = torch.cat([scores[k][~d.masks[k]] for k in scores])
    assert kept.numel() and dropped.numel() and dropped.max() <= kept.min()


def test_bn_keeps_a_floor_in_every_group(resnet20):
    """BN scales of different layers are not on one scale (network slimming trains them to be, with
    an L1 penalty; these baselines prune the network DNAL starts from): one global threshold closed all
    but the one channel derive's repair keeps of a MobileNetV2's 1280-channel head, whose scales are
    small, and the pruned network trained to 38% against 82% for L1. Each group keeps its strongest
    MIN_KEEP of channels, the cap Torch-Pruning's max_pruning_ratio sets."""
    net, model = resnet20
    scores = channel_scores(net, model, "bn")
    weak = next(iter(scores))                 # the stem's channels: scales a thousand times smaller
    scores = {k: s / 1000 if k == weak else s for k, s in scores.items()}
    d = prune_to_budget(net, scores, network_cost(net).flops // 4, uniform=False)
    for key, s in scores.items():
        assert d.masks[key].sum() >= math.ceil(MIN_KEEP * s.numel()), key
    assert d.masks[weak].sum() == math.ceil(MIN_KEEP * scores[weak].numel())   # the floor, and no more


def test_an_impossible_budget_is_an_error(resnet20):
    net, model = resnet20
    with pytest.raises(NasdslError, match="no pruning reaches 10 flops"):
        prune_to_budget(net, channel_scores(net, model, "l1"), 10)
