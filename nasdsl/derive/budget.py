"""The budget guarantee: a derived network that costs at most a target, and close to it.

A user asks for "at most X FLOPs (MACs)" or "at most X params", X absolute (`flops=5M`) or a
fraction of the supernet's cost (`flops=40%`), or for "at most X of the unpruned network's time"
(`latency=40%`): MACs plus a layer's fixed time, in MACs, for every layer that runs
(`accounting.metric_cost`; the plan measures the price, `architecture.block_cost: auto`). The
search only steers the gates towards it; the
promise is kept here, at derivation, because only derivation knows the exact cost: its repair
(a cut block closes whole, a layer that would lose every channel keeps one), its rounding to
`channel_multiple` and its vanished blocks all move the cost by more than the gates say.

`fit_to_budget` ranks every channel once (kept channels by gate value per unit of cost, closed
ones behind them, see `_scores`) and bisects over how many of the ranked channels to keep, each
step an exact `derive`, so the result costs <= the target, and >= 0.9 x the target unless a
single channel's step (a block coming back whole) is larger than that slack.

Parsing (`parse_budget`, `Budget`) imports no torch, so a plan step can check a budget cheaply.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

from nasdsl.errors import NasdslError, did_you_mean
from nasdsl.graph.accounting import gate_channel_cost, metric_cost
from nasdsl.graph.ir import Network

if TYPE_CHECKING:
    import torch

    from nasdsl.derive.derive import Derivation

METRICS = ("flops", "params", "latency")
SUFFIXES = {"k": 10 ** 3, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9}
NEAR = 0.9            # a fit lands in [NEAR x target, target] whenever a network there exists
CLOSE = 0.995         # a fit this close to the target stops searching for a closer one
FILL_ROUNDS = 4       # overshooting channels `_fill` skips before it settles below NEAR x target
_SYNTAX = "METRIC=VALUE[,VALUE...], e.g. flops=50%, flops=5M, params=1.2M or latency=50%"
_NUMBER = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*([A-Za-z%]*)$")


# ---- budgets -----------------------------------------------------------------------------------
def _human(n: float) -> str:
    """A count the way people write it (9.57M): budgets are read next to `nasdsl show` totals."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


@dataclass(frozen=True)
class Budget:
    """At most `target` of `metric`: a fraction of the supernet's cost when `relative`, else a count.
    A latency budget counts `layer_price` MACs for every layer that runs (set by the plan step)."""
    metric: str
    target: float
    relative: bool
    layer_price: float = 0.0

    def cost(self, net: Network) -> int:
        """What `net` costs in this budget's metric."""
        return metric_cost(net, self.metric, self.layer_price)

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"budget metric must be one of {METRICS}, got {self.metric!r}")
        if not self.target > 0 or (self.relative and self.target > 1):
            raise ValueError(f"budget target out of range: {self.target!r}")

    def absolute(self, supernet_cost: int) -> int:
        """The target as a count, rounded down (a budget is a ceiling). The fraction is taken
        exactly (its decimal text), so 29% of 100 is 29, not float's 28.999..."""
        if not self.relative:
            return math.floor(self.target)
        return math.floor(Fraction(repr(self.target)) * int(supernet_cost))

    def describe(self, supernet_cost: int | None = None) -> str:
        """`flops <= 50% (9.57M)` with the supernet's cost, `flops <= 50%` or `params <= 1.2M` without."""
        if not self.relative:
            return f"{self.metric} <= {_human(self.target)}"
        text = f"{self.metric} <= {float(Fraction(repr(self.target)) * 100):g}%"
        return text if supernet_cost is None else f"{text} ({_human(self.absolute(supernet_cost))})"

    def __str__(self) -> str:
        return self.describe()


def _fail(message: str) -> NasdslError:
    return NasdslError(message, file="--budget")


def _parse_value(metric: str, text: str) -> Budget:
    """One VALUE of a budget: a positive number with an optional k/M/G suffix, or a percentage
    in (0, 100] (a budget above the supernet's cost constrains nothing, so it is a mistake)."""
    match = _NUMBER.match(text.strip())
    if not match:
        raise _fail(f"budget value {text.strip()!r} is not a number (write {_SYNTAX})")
    number, suffix = Fraction(match.group(1)), match.group(2)
    if suffix and suffix != "%" and suffix not in SUFFIXES:
        hint = did_you_mean(suffix, [*SUFFIXES, "%"]) or did_you_mean(suffix.upper(), [*SUFFIXES, "%"])
        raise _fail(f"budget value {text.strip()!r}: unknown suffix {suffix!r}{hint}; "
                    f"the suffixes are k, M, G and %")
    if number <= 0:
        raise _fail(f"budget value {text.strip()!r} must be positive")
    if metric == "latency" and suffix != "%":
        raise _fail(f"budget value {text.strip()!r}: a latency budget is a fraction of the unpruned network's "
                    f"time on the run's device (write latency=50%)")
    if suffix == "%":
        if number > 100:
            raise _fail(f"budget value {text.strip()!r} is above 100% of the supernet's {metric}")
        return Budget(metric, float(number / 100), True)
    count = number * SUFFIXES.get(suffix, 1)
    if count > 10 ** 18:
        raise _fail(f"budget value {text.strip()!r} is larger than any network's {metric}")
    if count < 1:
        raise _fail(f"budget value {text.strip()!r} is less than one {metric[:-1] if metric == 'params' else 'FLOP'}")
    return Budget(metric, float(count), False)


def parse_budget(text: str) -> list[Budget]:
    """`flops=40%`, `flops=5M`, `params=1.2M`, `flops=50%,25%,12.5%` -> one Budget per value, in
    order. Any mistake is a one-line NasdslError located at `--budget` that says what is wrong."""
    metric, eq, values = text.partition("=")
    metric = metric.strip()
    if not eq or not metric:
        raise _fail(f"budget {text.strip()!r} is not {_SYNTAX}")
    if metric not in METRICS:
        hint = did_you_mean(metric, METRICS) or did_you_mean(metric.lower(), METRICS)
        raise _fail(f"unknown budget metric {metric!r}{hint}; the metrics are {', '.join(METRICS)}")
    parts = values.split(",")
    if not values.strip() or any(not p.strip() for p in parts):
        raise _fail(f"budget {text.strip()!r} has an empty value (write {_SYNTAX})")
    return [_parse_value(metric, p) for p in parts]


# ---- costs -------------------------------------------------------------------------------------
def _cost(net: Network, metric: str, layer_price: float = 0.0) -> int:
    if metric not in METRICS:
        raise ValueError(f"budget metric must be one of {METRICS}, got {metric!r}")
    return metric_cost(net, metric, layer_price)


# ---- the smallest derivable network ------------------------------------------------------------
def _closed(net: Network) -> dict[str, "torch.Tensor"]:
    import torch
    return {g.key: torch.zeros(g.channels, dtype=torch.bool) for g in net.gates()}


def _steer(net: Network, pick: dict[str, int]) -> dict[str, "torch.Tensor"]:
    """Strengths under which derive's repair keeps a channel of block `pick[layer]` of each layer:
    its last gate group is the strongest (1), every other group 0."""
    import torch
    strength = {g.key: torch.zeros(g.channels) for g in net.gates()}
    for layer in net.layers:
        if layer.name in pick:
            keys = [op.attrs["key"] for op in layer.blocks[pick[layer.name]].ops if op.is_gate]
            strength[keys[-1]].fill_(1.0)
    return strength


def smallest_derivation(net: Network, metric: str, channel_multiple: int = 1) -> "Derivation":
    """The cheapest derivable network: every gate closed. Derive's repair still keeps one channel
    (rounded up to `channel_multiple`) in each layer that has no shortcut, in the block whose last
    gate is strongest; which block that is changes the cost (an e6 k7 MBConv path costs more than
    an e3 k3 one), so each layer gets its cheapest block. The choice in one layer does not change
    another's cost (the repaired layer's output width is the same whichever block carries it), so
    one derive per block position is enough, plus a final one with the cheapest picks."""
    from nasdsl.derive.derive import derive
    from nasdsl.graph.accounting import channel_metric, layer_cost

    _cost(net, metric)  # checks the metric
    per_layer = channel_metric(metric)   # every pick leaves the layer running: its price is the same
    repairable = {layer.name: layer for layer in net.layers if layer.shortcut is None and layer.blocks
                  and all(any(op.is_gate for op in b.ops) for b in layer.blocks)}
    best: dict[str, tuple[int, int]] = {}  # layer -> (its cost, block index)
    for j in range(max((len(layer.blocks) for layer in repairable.values()), default=1)):
        pick = {name: j for name, layer in repairable.items() if j < len(layer.blocks)}
        if j and not pick:
            break
        slim = derive(net, _closed(net), _steer(net, pick), channel_multiple).network
        for layer in slim.layers:
            if layer.name in pick:
                cost = getattr(layer_cost(layer), per_layer)
                if layer.name not in best or cost < best[layer.name][0]:
                    best[layer.name] = (cost, j)
    pick = {name: j for name, (_, j) in best.items()}
    return derive(net, _closed(net), _steer(net, pick), channel_multiple)


def smallest_cost(net: Network, metric: str, channel_multiple: int = 1, layer_price: float = 0.0) -> int:
    """The cost of the cheapest derivable network (see `smallest_derivation`): a budget below it
    cannot be met, and the plan step refuses it before training, quoting this number."""
    return _cost(smallest_derivation(net, metric, channel_multiple).network, metric, layer_price)


# ---- fitting the gates to a budget -------------------------------------------------------------
def _scores(net: Network, values: dict[str, "torch.Tensor"], metric: str) -> tuple[list[str], "torch.Tensor"]:
    """The group keys in graph order and one score per channel (flat, in that order): a kept
    channel (s > 0) scores s / cost, what it gives per unit of cost, so the cheapest way to shed
    cost closes the lowest scores; a closed one scores s x cost (<= 0: behind every kept channel),
    so the first to reopen is nearly open (s near 0) and cheap. Costs are per channel of the group
    (`accounting.gate_channel_cost`), scaled to a mean of 1 and floored, so a free
    channel is never divided by zero."""
    import torch

    keys = [g.key for g in net.gates()]
    missing = [k for k in keys if k not in values]
    if missing:
        raise ValueError(f"no gate values for {len(missing)} group(s) of the graph, e.g. {missing[0]!r}")
    per_channel = gate_channel_cost(net, metric)
    s = torch.cat([values[k].detach().float().cpu().reshape(-1) for k in keys])
    cost = torch.cat([torch.full((values[k].numel(),), float(per_channel[k])) for k in keys])
    cost = (cost / cost.mean().clamp_min(1e-12)).clamp_min(1e-6) if cost.numel() else cost
    return keys, torch.where(s > 0, s / cost, s * cost)


class _Family:
    """The masks that keep the `k` best-ranked channels, for k = 0 .. N, and their exact derived
    cost: the one dimension the fit searches. k = the number of kept channels is s > 0 itself.
    The gate values that go with a mask are s with the sign flipped where the mask disagrees (an
    s of 0 that opens becomes a tiny positive value), so derive's strength, `settle_gates` and a
    later derive from the values all see the same decisions."""

    def __init__(self, net, values, metric, channel_multiple, layer_price=0.0):
        import torch

        self.net, self.metric, self.multiple, self.layer_price = net, metric, channel_multiple, layer_price
        self.keys, score = _scores(net, values, metric)
        self.sizes = [values[k].numel() for k in self.keys]
        self.like = {k: values[k] for k in self.keys}
        self.s = torch.cat([values[k].detach().float().cpu().reshape(-1) for k in self.keys])
        self.order = score.argsort(descending=True, stable=True)
        self.start = int((self.s > 0).sum())

    def flat_mask(self, k: int) -> "torch.Tensor":
        import torch
        mask = torch.zeros(self.s.numel(), dtype=torch.bool)
        mask[self.order[:k]] = True
        return mask

    def gate_values(self, flat_mask) -> dict[str, "torch.Tensor"]:
        """Per group: |s| where kept (at least 1e-6, so an s of 0 can open), -|s| where closed."""
        import torch
        flat = torch.where(flat_mask, self.s.abs().clamp_min(1e-6), -self.s.abs())
        return {k: v.reshape(self.like[k].shape).to(self.like[k].dtype).to(self.like[k].device)
                for k, v in zip(self.keys, flat.split(self.sizes))}

    def derive(self, flat_mask) -> tuple["Derivation", int]:
        from nasdsl.derive.derive import derive
        values = {k: v.cpu() for k, v in self.gate_values(flat_mask).items()}
        derivation = derive(self.net, {k: v > 0 for k, v in values.items()}, values, self.multiple)
        return derivation, _cost(derivation.network, self.metric, self.layer_price)

    def at(self, k: int) -> tuple["Derivation", int]:
        return self.derive(self.flat_mask(k))


def _bisect(family: _Family, mask_of, lo: int, hi: int, target: int, fits, hi_cost: int) -> tuple[int, tuple]:
    """The largest k in [lo, hi) whose mask `mask_of(k)` fits, given that k = lo fits (`fits`: its
    derivation and cost) and k = hi does not (it costs `hi_cost`), or an earlier k that costs at
    least CLOSE x target. Steps alternate between interpolating the cost linearly in k (aimed a
    little below the target: the cost of a ranked prefix is nearly a sum of per-channel costs, so
    this lands close in a few derives) and halving (never worse than twice plain bisection where
    repair or rounding make the cost jump). Every k returned was derived and fits."""
    lo_cost, step = fits[1], 0
    while hi - lo > 1 and lo_cost < CLOSE * target:
        mid = (lo + hi) // 2
        if step % 2 == 0 and hi_cost > lo_cost:
            aim = (1 + CLOSE) / 2 * target
            mid = min(max(lo + round((aim - lo_cost) / (hi_cost - lo_cost) * (hi - lo)), lo + 1), hi - 1)
        step += 1
        result = family.derive(mask_of(mid))
        if result[1] <= target:
            lo, fits, lo_cost = mid, result, result[1]
        else:
            hi, hi_cost = mid, result[1]
    return lo, fits


def _fill(family: _Family, mask, fits, target: int, skipped, rounds: int = FILL_ROUNDS):
    """Reopen closed channels, best-ranked first, while the network fits, until it costs at least
    NEAR x target. Each round bisects over how many of the closed channels (in rank order) to add;
    the one whose step overshoots (a block whose path it reconnects comes back whole) is then
    skipped, and the next round tries the channels after it, for at most `rounds` rounds."""
    for _ in range(rounds):
        if fits[1] >= NEAR * target:
            break
        cands = family.order[~(mask | skipped)[family.order]]
        if not cands.numel():
            break

        def mask_of(k, base=mask, cands=cands):
            grown = base.clone()
            grown[cands[:k]] = True
            return grown

        full = family.derive(mask_of(cands.numel()))
        if full[1] <= target:
            return mask_of(cands.numel()), full
        k, fits = _bisect(family, mask_of, 0, cands.numel(), target, fits, full[1])
        mask = mask_of(k)
        skipped = skipped.clone()
        skipped[cands[k]] = True
    return mask, fits


def fit_to_budget(net: Network, values: dict[str, "torch.Tensor"], metric: str, target: int,
                  channel_multiple: int = 1, layer_price: float = 0.0
                  ) -> tuple[dict[str, "torch.Tensor"], "Derivation", int, int]:
    """Gate values whose derived network costs at most `target` (`metric`: "flops", "params" or
    "latency" with `layer_price`, an absolute count; see `Budget.absolute`), and at least NEAR x
    target when one step of the ranking allows it. `net` is the graph derivation reads (gates placed, depth gates folded).

    Starts from s > 0; too costly, it closes the lowest-ranked kept channels (`_scores`), by
    bisection over how many of the ranked channels to keep; too cheap, it reopens the best-ranked
    closed ones (`_fill`). Every decision is an exact derive, because derive's repair, rounding to
    `channel_multiple` and vanished blocks move the cost by more than the per-channel costs say.
    Returns the new values (s with its sign flipped where the fit changed it: `settle_gates` and a
    later `derive` from them agree with the returned Derivation), the Derivation, and how many
    channels it closed and reopened. A target below `smallest_cost` is a NasdslError."""
    import torch

    family = _Family(net, values, metric, channel_multiple, layer_price)
    n, start = family.s.numel(), family.start
    skipped = torch.zeros(n, dtype=torch.bool)
    mask = family.flat_mask(start)
    fits = family.derive(mask)
    if fits[1] > target:
        bottom = family.at(0)
        if bottom[1] <= target:
            k, fits = _bisect(family, family.flat_mask, 0, start, target, bottom, fits[1])
            mask = family.flat_mask(k)
            # below NEAR x target (the fill's case), the bisection ended on k + 1 overshooting
            skipped[family.order[k]] = True
        else:
            mask, fits = _smallest_mask(family, target)
    mask, fits = _fill(family, mask, fits, target, skipped)
    derivation, cost = fits
    assert cost <= target, (cost, target)
    kept = family.s > 0
    closed, reopened = int((kept & ~mask).sum()), int((~kept & mask).sum())
    return family.gate_values(mask), derivation, closed, reopened


def _smallest_mask(family: _Family, target: int):
    """The mask of the smallest derivable network, for a target that the ranked masks cannot meet
    (their all-closed end lets derive's repair keep the strongest block, not the cheapest)."""
    import torch

    smallest = smallest_derivation(family.net, family.metric, family.multiple)
    cost = _cost(smallest.network, family.metric, family.layer_price)
    if cost > target:
        raise NasdslError(f"a {family.metric} budget of {target:,} is below the smallest network this space "
                          f"can derive ({cost:,} {family.metric}: every gate closed)", file="--budget")
    mask = torch.cat([smallest.masks[k].reshape(-1).cpu() for k in family.keys])
    return mask, family.derive(mask)
