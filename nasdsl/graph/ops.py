"""The primitive op catalogue: everything the torch-free stages know about an op kind.

Pure data, no torch. Every stage (compiler, accounting, derivation, printer, weight slicing) asks
this table about an op instead of comparing kind strings, as torch.fx keeps one closed set of node
kinds: adding an op means adding one `OpKind` entry here, one torch builder
(nasdsl.supernet.network.build_op) and, to call it from a `.space` file, one language builtin.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from nasdsl.graph import spacetext
from nasdsl.graph.ir import Shape

if TYPE_CHECKING:
    from nasdsl.graph.ir import Op

Channels = tuple[int, ...]

# the activations a chain may hold: each maps 0 to 0, so a closed gate's zero stays zero through
# it and derivation stays exact (sigmoid and hard sigmoid map 0 to 0.5: they are only an SE's
# scale function, SE_GATES)
ACTIVATIONS = ("relu", "relu6", "hswish", "identity", "silu")
SE_GATES = ("sigmoid", "hsigmoid")


class ShapeError(ValueError):
    """An impossible shape; the compiler turns it into a located NasdslError."""


@dataclass(frozen=True)
class ChannelMap:
    """How derivation carries channel sets through an op: which output channels can be non-zero
    given the live input channels (`forward`), and which input channels the op reads to produce
    the needed output channels (`backward`, given the live inputs). Channel numbers are the op's
    own (0 .. channels-1 of its input and output tensors)."""
    forward: Callable[["Op", set[int]], set[int]]
    backward: Callable[["Op", set[int], set[int]], set[int]]
    # every output channel reads every input channel (conv, linear): a gate group's MAC share ends
    # at the first such op, and its weights are indexed by kept inputs as well as kept outputs
    dense: bool = False
    # the output channels are the input channels (same number, same order), yet each output reads
    # every live input (an SE's scale): slimmed, the op keeps as many outputs as inputs, and where
    # fewer are needed after it derivation selects them after the op (nasdsl.derive.derive._slim_ops)
    same_width: bool = False


def _flat_forward(op, live):
    hw = op.in_shape.height * op.in_shape.width
    return {c * hw + i for c in live for i in range(hw)}


def _flat_backward(op, need, live_in):
    hw = op.in_shape.height * op.in_shape.width
    return {c // hw for c in need}


CHANNELWISE = ChannelMap(lambda op, live: set(live), lambda op, need, live_in: set(need))
DENSE = ChannelMap(lambda op, live: set(range(op.out_shape.channels)) if live else set(),
                   lambda op, need, live_in: set(live_in) if need else set(), dense=True)
FLATTEN = ChannelMap(_flat_forward, _flat_backward)
SELECT = ChannelMap(lambda op, live: {j for j, c in enumerate(op.attrs["index"]) if c in live},
                    lambda op, need, live_in: {op.attrs["index"][j] for j in need})
# squeeze-and-excitation: a zero input channel gives a zero output channel (x * scale), but the
# scale of every channel reads the mean of all of them
SCALE_ALL = ChannelMap(lambda op, live: set(live), lambda op, need, live_in: set(live_in) if need else set(),
                       same_width=True)


def _zero(a, i, o) -> int:
    return 0


def _channelwise(op) -> ChannelMap:
    return CHANNELWISE


def _same_attrs(op, cin: Channels, cout: Channels) -> dict:
    return dict(op.attrs)


def _no_weights(op) -> dict[str, tuple[str, ...]]:
    return {}


def _bare(op, gated: bool) -> str:
    return op.kind


def _never_idle(attrs: dict, in_range: str | None) -> bool:
    return False


def _no(attrs: dict) -> bool:
    return False


def _yes(attrs: dict) -> bool:
    return True


def _untrimmed(op, attrs: dict) -> tuple[dict, int]:
    return attrs, 0


@dataclass(frozen=True)
class OpKind:
    """One op kind. Callables take the op's attrs and shapes, or the `Op` itself when they need both."""
    name: str
    infer: Callable[[dict, Shape], Shape]
    params: Callable[[dict, Shape, Shape], int] = _zero
    macs: Callable[[dict, Shape, Shape], int] = _zero
    # how derivation carries channel sets through the op (a conv answers per op: depthwise or dense)
    channels: Callable[["Op"], ChannelMap] = _channelwise
    # the op's attrs once derivation keeps input channels `cin` and output channels `cout`
    slim_attrs: Callable[["Op", Channels, Channels], dict] = _same_attrs
    # its weight tensors and, per dim, which kept channels index it: "out", "in", or None (kept
    # whole: an SE's reduced channels); a tensor it does not name is a vector with one entry per
    # output channel, a scalar is copied as is; dims after the listed ones are kept whole
    slice_weights: Callable[["Op"], dict[str, tuple[str, ...]]] = _no_weights
    # an op whose tensors do not cut dim by dim cuts its own (mixconv: one tensor per channel group,
    # renumbered when a group vanishes): (op, its tensors, kept inputs, kept outputs) -> the slim
    # op's tensors, by tensor indexing alone (this module imports no torch). None: `slice_weights`
    slice_state: Callable[["Op", dict, Channels, Channels], dict] | None = None
    # (the op, its slim attrs) -> (those attrs with the kernel cut to the taps that ever meet its
    # input, how many taps each side lost): exact at the op's input size, where a kernel larger than
    # the map (a 7x7 depthwise conv on a 1x1 map computes its centre tap alone) does the same work
    # as the small one at several times the cost. Derivation cuts the weights' last two dims alike.
    trim: Callable[["Op", dict], tuple[dict, int]] = _untrimmed
    # its `.space` text; `gated`: a gate follows that the op's builtin adds by default
    print: Callable[["Op", bool], str] = _bare
    # every output value is one of the input values (a view, a subset, a maximum): a tensor keeps
    # its range through the op, so a ReLU after it on a ReLU's output changes nothing
    keeps_values: bool = False
    # the activation whose output range the op's output is in, given the input's; None: the
    # input's range when keeps_values, else no known range
    out_range: Callable[[dict, str | None], str | None] | None = None
    # the op is the identity on inputs in this activation's range (relu on relu's output)
    idle_on: Callable[[dict, str | None], bool] = _never_idle
    # the op is the identity whatever its input (a select of every channel in order): derivation
    # drops it
    is_identity: Callable[["Op"], bool] = lambda op: False
    # its output is always a new tensor, never its input or a view of it: ops after it may work
    # in place (takes attrs; the torch builder's op configs carry them too)
    allocates: Callable[[dict], bool] = _no
    # the same weightless function of each value alone (activation, dropout): it can follow a
    # layer's sum at any width, so derivation rebuilds it for the kept channels
    elementwise: bool = False
    # the architecture gate derivation reads masks from; channelwise, no weights
    is_gate: bool = False
    # its builtin adds a gate after it by default (bn): the printer leaves that gate implicit
    absorbs_gate: bool = False
    # False: the kind exists only in merged networks (nasdsl.derive.merge), which are made from a
    # derived network for speed and never searched, slimmed or printed as `.space` text again
    searchable: bool = True
    # how the op merges with the ops at the same place in parallel blocks (nasdsl.derive.merge):
    # "dense" (a conv reading every input channel: the expansions concatenate their outputs, the
    # projections their inputs), "depthwise" (one depthwise stage over the concatenated channels),
    # "channelwise" (one op over the concatenated channels where the attrs agree), None (a layer
    # holding it is not merged)
    merge: Callable[["Op"], str | None] = lambda op: None
    # in eval mode the op is x -> scale * x + shift per channel; from its attrs and tensors, the
    # (scale, shift) that merging folds into the conv before it (BN). None: not such a map
    eval_affine: Callable[[dict, dict], tuple] | None = None
    # in eval mode, the op's tensors once a per-channel affine map x -> scale * x + shift before it
    # is folded into it: (attrs, tensors, scale, shift) -> tensors (merging folds a one-tap
    # depthwise conv into the BN after it). None: it cannot absorb one
    absorb_affine: Callable[[dict, dict, object, object], dict] | None = None

    def range_after(self, attrs: dict, in_range: str | None) -> str | None:
        """The activation range a tensor is in after this op (see `out_range`)."""
        if self.out_range is not None:
            return self.out_range(attrs, in_range)
        return in_range if self.keeps_values else None


def _need_map(shape: Shape, what: str) -> None:
    if shape.is_flat:
        raise ShapeError(f"{what} needs a feature map, got a flat vector of {shape.channels}")


def _spatial(size: int, k: int, stride: int, padding: int, what: str) -> int:
    out = (size + 2 * padding - k) // stride + 1
    if out < 1:
        raise ShapeError(f"{what} with kernel {k}, stride {stride}, padding {padding} shrinks a "
                         f"{size}x{size} map below 1x1")
    return out


def _conv_infer(a: dict, s: Shape) -> Shape:
    _need_map(s, "conv")
    g = a["groups"]
    if s.channels % g or a["out"] % g:
        raise ShapeError(f"groups={g} must divide both input channels ({s.channels}) and output "
                         f"channels ({a['out']})")
    h = _spatial(s.height, a["k"], a["stride"], a["padding"], "conv")
    w = _spatial(s.width, a["k"], a["stride"], a["padding"], "conv")
    return Shape(a["out"], (h, w))


def _conv_params(a, i: Shape, o: Shape) -> int:
    return o.channels * (i.channels // a["groups"]) * a["k"] ** 2 + (o.channels if a["bias"] else 0)


def _conv_macs(a, i: Shape, o: Shape) -> int:
    return o.numel * (i.channels // a["groups"]) * a["k"] ** 2


def _pool_infer(a: dict, s: Shape) -> Shape:
    _need_map(s, "pooling")
    return Shape(s.channels, (_spatial(s.height, a["k"], a["stride"], a["padding"], "pooling"),
                              _spatial(s.width, a["k"], a["stride"], a["padding"], "pooling")))


def _gap_infer(a: dict, s: Shape) -> Shape:
    _need_map(s, "global pooling")
    return Shape(s.channels, ())


def _flatten_infer(a: dict, s: Shape) -> Shape:
    return Shape(s.numel, ())


def _linear_infer(a: dict, s: Shape) -> Shape:
    if not s.is_flat:
        raise ShapeError(f"linear needs a flat vector, got a {s} map: add `flatten` or `gap` first")
    return Shape(a["out"], ())


def _subsample_infer(a: dict, s: Shape) -> Shape:
    _need_map(s, "subsample")
    st = a["stride"]
    return Shape(s.channels, (-(-s.height // st), -(-s.width // st)))


def _same(a: dict, s: Shape) -> Shape:
    return s


def _select_infer(a: dict, s: Shape) -> Shape:
    index = a["index"]
    if not index or len(set(index)) != len(index) or min(index) < 0 or max(index) >= s.channels:
        raise ShapeError(f"select needs distinct channel indices in [0, {s.channels}), got {list(index)}")
    return Shape(len(index), s.size)


def is_depthwise(op) -> bool:
    """A conv whose every group is one channel in and one out: channelwise for derivation."""
    return op.kind == "conv" and op.attrs["groups"] == op.in_shape.channels == op.out_shape.channels


def is_one_tap_depthwise(op) -> bool:
    """A depthwise conv with one tap and no padding: x -> w * x (+ b) per channel, on every
    stride-th pixel (what `cut_kernels` leaves of any depthwise kernel on a 1x1 map; the torch
    builder makes it a ChannelScale, merging folds it into the BN after it)."""
    return is_depthwise(op) and op.attrs["k"] == 1 and op.attrs["padding"] == 0


def _conv_channels(op) -> ChannelMap:
    return CHANNELWISE if is_depthwise(op) else DENSE


def _conv_slim(op, cin: Channels, cout: Channels) -> dict:
    """Depthwise convs keep one group per kept channel; other grouped convs cannot be cut (a
    ResNeXt bottleneck leaves them ungated, so they keep every channel)."""
    attrs = dict(op.attrs, out=len(cout))
    if is_depthwise(op):
        attrs["groups"] = len(cout)
    elif op.attrs["groups"] != 1 and (len(cin), len(cout)) != (op.in_shape.channels, op.out_shape.channels):
        raise ValueError(f"cannot slim a grouped conv (groups={op.attrs['groups']}) whose channels changed")
    return attrs


def unreached_taps(size: int, k: int, stride: int, padding: int) -> int:
    """How many taps on each side of a k-tap kernel only ever meet padding, sliding over `size`
    inputs: output o reads inputs stride*o - padding + t for taps t, so tap t is reached iff some
    o in [0, out) puts that inside [0, size). Cutting that many from both ends, and as many from
    the padding, gives the same outputs at this size (same count, same reached taps)."""
    out = (size + 2 * padding - k) // stride + 1
    first = max(0, padding - stride * (out - 1))     # the smallest reached tap
    last = min(k - 1, size - 1 + padding)             # the largest
    return min(first, k - 1 - last)


def _conv_trim(op, attrs: dict) -> tuple[dict, int]:
    a = op.attrs
    cut = min(unreached_taps(n, a["k"], a["stride"], a["padding"]) for n in op.in_shape.size)
    if not cut:
        return attrs, 0
    return dict(attrs, k=a["k"] - 2 * cut, padding=a["padding"] - cut), cut


def _conv_weights(op) -> dict[str, tuple[str, ...]]:
    """A grouped conv's weight holds in / groups input channels per group: never cut (_conv_slim)."""
    weight = ("out",) if is_depthwise(op) else ("out", "in") if op.attrs["groups"] == 1 else ("out", None)
    return {"weight": weight, "bias": ("out",)}


def _conv_print(op, gated: bool) -> str:
    a = op.attrs
    extra = {}
    if a["stride"] != 1:
        extra["stride"] = a["stride"]
    if a["padding"] != a["k"] // 2:
        extra["padding"] = a["padding"]
    if a["bias"]:
        extra["bias"] = True
    if is_depthwise(op):
        return spacetext.call("dwconv", k=a["k"], **extra)
    if a["groups"] != 1:
        extra = {"groups": a["groups"], **extra}
    return spacetext.call("conv", (op.out_shape.channels,), k=a["k"], **extra)


_BN_DEFAULTS = {"eps": 1e-5, "momentum": 0.1}


def _bn_print(op, gated: bool) -> str:
    extra = {k: op.attrs[k] for k in ("eps", "momentum") if op.attrs[k] != _BN_DEFAULTS[k]}
    if not gated:
        extra["gate"] = False
    return spacetext.call("bn", **extra)


def _pool_print(op, gated: bool) -> str:
    a = op.attrs
    extra = {"padding": a["padding"]} if a["padding"] else {}
    return spacetext.call(op.kind, k=a["k"], stride=a["stride"], **extra)


def split_channels(channels: int, groups: int) -> tuple[int, ...]:
    """timm's `_split_channels`: `groups` equal shares of `channels`, the first taking the remainder
    (MixedConv2d's split, and the language's equal split of `dwconv(k=[...])`, `conv(..., split=G)`)."""
    split = [channels // groups] * groups
    split[0] += channels - sum(split)
    return tuple(split)


def _spans(splits) -> list[range]:
    """Each group's channels, as a range of the op's channel numbers."""
    out, start = [], 0
    for n in splits:
        out.append(range(start, start + n))
        start += n
    return out


def _mixconv_infer(a: dict, s: Shape) -> Shape:
    _need_map(s, "mixconv")
    kernels, ins, outs = tuple(a["kernels"]), tuple(a["in_splits"]), tuple(a["out_splits"])
    if not kernels or not len(kernels) == len(ins) == len(outs) or any(k % 2 == 0 or k < 1 for k in kernels):
        raise ShapeError(f"mixconv needs one odd kernel per channel group, got kernels {list(kernels)} for "
                         f"input groups {list(ins)} and output groups {list(outs)}")
    if min(ins + outs) < 1:
        raise ShapeError(f"mixconv groups need at least one channel each, got input groups {list(ins)} and "
                         f"output groups {list(outs)} (fewer channels than groups?)")
    if a["depthwise"] and ins != outs:
        raise ShapeError(f"a depthwise mixconv keeps each group's channels, got input groups {list(ins)} "
                         f"and output groups {list(outs)}")
    if sum(ins) != s.channels:
        raise ShapeError(f"mixconv groups {list(ins)} cover {sum(ins)} channels, the input has {s.channels}")
    st = a["stride"]
    sizes = {(_spatial(s.height, k, st, k // 2, "mixconv"), _spatial(s.width, k, st, k // 2, "mixconv"))
             for k in kernels}
    return Shape(sum(outs), sizes.pop())


def _mixconv_weights_per_position(a) -> int:
    """Weights of all groups: group i's conv reads its in_splits[i] channels (one, depthwise)."""
    return sum(o * (1 if a["depthwise"] else i) * k * k
               for k, i, o in zip(a["kernels"], a["in_splits"], a["out_splits"]))


def _grouped_forward(op, live):
    ins, outs = _spans(op.attrs["in_splits"]), _spans(op.attrs["out_splits"])
    return {c for i, o in zip(ins, outs) if live & set(i) for c in o}


def _grouped_backward(op, need, live_in):
    ins, outs = _spans(op.attrs["in_splits"]), _spans(op.attrs["out_splits"])
    return {c for i, o in zip(ins, outs) if need & set(o) for c in i if c in live_in}


# a split conv (timm's MixedConv2d, not depthwise): group g's outputs read every input of group g and
# nothing else, so they can be non-zero only while some input of group g is, and need only those
GROUPED = ChannelMap(_grouped_forward, _grouped_backward, dense=True)


def _mixconv_channels(op) -> ChannelMap:
    return CHANNELWISE if op.attrs["depthwise"] else GROUPED


def _kept_groups(op, cin: Channels, cout: Channels) -> list[tuple[int, list[int], list[int]]]:
    """(group, its kept inputs, its kept outputs), both numbered inside the group, for every group
    that keeps a channel; a group that keeps none vanishes with its kernel."""
    cin_set, cout_set = set(cin), set(cout)
    kept = []
    for g, (i, o) in enumerate(zip(_spans(op.attrs["in_splits"]), _spans(op.attrs["out_splits"]))):
        ins = [c - i.start for c in i if c in cin_set]
        outs = [c - o.start for c in o if c in cout_set]
        if bool(ins) != bool(outs):   # derivation's channel map never asks for this
            raise ValueError(f"mixconv group {g} keeps {len(ins)} inputs but {len(outs)} outputs")
        if outs:
            kept.append((g, ins, outs))
    return kept


def _mixconv_slim(op, cin: Channels, cout: Channels) -> dict:
    """The kept channels of each group are the new splits; a group left with none is dropped."""
    kept = _kept_groups(op, cin, cout)
    return dict(op.attrs, kernels=tuple(op.attrs["kernels"][g] for g, _, _ in kept),
                in_splits=tuple(len(i) for _, i, _ in kept), out_splits=tuple(len(o) for _, _, o in kept))


def _mixconv_slice(op, tensors: dict, cin: Channels, cout: Channels) -> dict:
    """Group g's tensor `convs.g.weight` (out, in or 1, k, k) cut to its kept channels, renumbered
    inside the group; kept groups are renumbered in order. List indexing copies: no torch import."""
    out = {}
    for new, (g, ins, outs) in enumerate(_kept_groups(op, cin, cout)):
        w = tensors[f"convs.{g}.weight"][outs]
        out[f"convs.{new}.weight"] = w if op.attrs["depthwise"] else w[:, ins]
    return out


def _mixconv_print(op, gated: bool) -> str:
    """The readable forms where the groups are timm's equal split (`dwconv(k=[3, 5])`, `conv(24, k=1,
    split=2)`), else the explicit `mixconv(...)` every derived mixconv prints as."""
    a = op.attrs
    kernels, groups = tuple(a["kernels"]), len(a["kernels"])
    cin, cout = op.in_shape.channels, op.out_shape.channels
    equal = tuple(a["in_splits"]) == split_channels(cin, groups) and tuple(a["out_splits"]) == split_channels(cout, groups)
    extra = {"stride": a["stride"]} if a["stride"] != 1 else {}
    if equal and a["depthwise"]:
        return spacetext.call("dwconv", k=list(kernels), **extra)
    if equal and groups > 1 and len(set(kernels)) == 1:
        return spacetext.call("conv", (cout,), k=kernels[0], split=groups, **extra)
    k = kernels[0] if len(set(kernels)) == 1 else list(kernels)
    out = {} if a["depthwise"] else {"out": list(a["out_splits"])}
    return spacetext.call("mixconv", k=k, split=list(a["in_splits"]), **out, **extra,
                          **({"depthwise": True} if a["depthwise"] else {}))


def _conv_merge(op) -> str | None:
    if is_depthwise(op):
        return "depthwise"
    return "dense" if op.attrs["groups"] == 1 else None


def _bn_affine(attrs: dict, t: dict) -> tuple:
    """BN in eval mode: gamma * (x - mean) / sqrt(var + eps) + beta (tensor arithmetic, no torch import)."""
    scale = t["weight"] / (t["running_var"] + attrs["eps"]).sqrt()
    return scale, t["bias"] - t["running_mean"] * scale


def _bn_absorb(attrs: dict, t: dict, scale, shift) -> dict:
    """BN(scale * x + shift) as one BN of x: gamma (scale x + shift - mean) / s + beta =
    (gamma scale) (x - 0) / s + (beta + gamma (shift - mean) / s), the running variance (so s) kept."""
    over_s = t["weight"] / (t["running_var"] + attrs["eps"]).sqrt()
    return dict(t, weight=t["weight"] * scale, bias=t["bias"] + over_s * (shift - t["running_mean"]),
                running_mean=t["running_mean"] * 0)


def _select_slim(op, cin: Channels, cout: Channels) -> dict:
    """The kept outputs' sources, renumbered among the kept inputs."""
    pos = {c: i for i, c in enumerate(cin)}
    return dict(op.attrs, index=tuple(pos[op.attrs["index"][j]] for j in cout))


# act -> the input ranges on which it is the identity (the activations whose output it leaves as is)
_IDLE_ON = {"relu": ("relu", "relu6"), "relu6": ("relu6",), "identity": (*ACTIVATIONS, None)}


def _se_infer(a: dict, s: Shape) -> Shape:
    _need_map(s, "se (squeeze-and-excitation)")
    if a["act"] not in ACTIVATIONS or a["fn"] not in SE_GATES:
        raise ShapeError(f"se takes act in {ACTIVATIONS} and fn in {SE_GATES}, got {a['act']!r}, {a['fn']!r}")
    if a["rd"] < 1:
        raise ShapeError(f"se needs at least one reduced channel, got rd={a['rd']}")
    return s


def _se_params(a, i: Shape, o: Shape) -> int:
    """conv_reduce (c -> rd, bias) and conv_expand (rd -> c, bias)."""
    return 2 * i.channels * a["rd"] + a["rd"] + i.channels


def _se_slim(op, cin: Channels, cout: Channels) -> dict:
    """The reduced channels are not searched: rd stays; derivation keeps cin == cout (same_width)."""
    if cin != cout:
        raise ValueError(f"an se keeps its input channels as outputs, got {len(cin)} in and {len(cout)} out")
    return dict(op.attrs)


# conv_reduce reads the kept inputs and keeps every reduced channel; conv_expand writes the kept outputs
_SE_WEIGHTS = {"conv_reduce.weight": (None, "in"), "conv_reduce.bias": (None,),
               "conv_expand.weight": ("out", None), "conv_expand.bias": ("out",)}
_SE_DEFAULTS = {"act": "relu", "fn": "sigmoid"}


def _se_print(op, gated: bool) -> str:
    return spacetext.call("se", rd=op.attrs["rd"],
                          **{k: op.attrs[k] for k, v in _SE_DEFAULTS.items() if op.attrs[k] != v})


def _act_range(attrs: dict, in_range: str | None) -> str | None:
    return in_range if attrs["fn"] == "identity" else attrs["fn"]


def _out_attr(op, cin: Channels, cout: Channels) -> dict:
    return dict(op.attrs, out=len(cout))


_BN_WEIGHTS = {name: ("out",) for name in ("weight", "bias", "running_mean", "running_var")}
_LINEAR_WEIGHTS = {"weight": ("out", "in"), "bias": ("out",)}

OPS: dict[str, OpKind] = {k.name: k for k in (
    OpKind("conv", _conv_infer, _conv_params, _conv_macs, channels=_conv_channels, slim_attrs=_conv_slim,
           slice_weights=_conv_weights, trim=_conv_trim, print=_conv_print, allocates=_yes, merge=_conv_merge),
    OpKind("bn", _same, lambda a, i, o: 2 * i.channels, slice_weights=lambda op: dict(_BN_WEIGHTS), print=_bn_print,
           absorbs_gate=True, allocates=_yes, merge=lambda op: None if op.in_shape.is_flat else "channelwise",
           eval_affine=_bn_affine, absorb_affine=_bn_absorb),
    OpKind("act", _same, print=lambda op, gated: op.attrs["fn"], out_range=_act_range,
           idle_on=lambda a, in_range: in_range in _IDLE_ON.get(a["fn"], ()), elementwise=True,
           allocates=lambda a: a["fn"] != "identity", merge=lambda op: "channelwise"),
    OpKind("gate", _same, is_gate=True),
    # at inference, where derivation's equivalence holds
    OpKind("dropout", _same, print=lambda op, gated: spacetext.call("dropout", (op.attrs["p"],)),
           keeps_values=True, elementwise=True),
    OpKind("maxpool", _pool_infer, print=_pool_print, keeps_values=True, allocates=_yes),
    OpKind("avgpool", _pool_infer, print=_pool_print, allocates=_yes),
    OpKind("gap", _gap_infer, allocates=_yes),
    OpKind("subsample", _subsample_infer, print=lambda op, gated: spacetext.call("subsample", (op.attrs["stride"],)),
           keeps_values=True),
    OpKind("flatten", _flatten_infer, channels=lambda op: FLATTEN, keeps_values=True),
    # keeps the listed input channels, in order (derivation emits it where a depthwise conv loses
    # channels of a tensor that other consumers still need)
    OpKind("select", _select_infer, channels=lambda op: SELECT, slim_attrs=_select_slim,
           print=lambda op, gated: f"select({spacetext.index(op.attrs['index'])})", keeps_values=True,
           allocates=_yes, is_identity=lambda op: tuple(op.attrs["index"]) == tuple(range(op.in_shape.channels))),
    # timm's MixedConv2d (MixConv, Tan & Le 2019): the input split into consecutive channel groups
    # (in_splits), group i a conv with kernel kernels[i], padding k // 2, the op's stride and no bias,
    # into out_splits[i] channels, the outputs concatenated. `depthwise`: each group's conv is
    # depthwise (in == out split: MixNet's mixed-kernel depthwise stage; merge.py's "mixed" one); else
    # dense within its group (MixNet's split 1x1 expansion and projection). Gating: gates work per
    # channel, as everywhere; derivation keeps each group's kept channels (the new splits: group g's
    # outputs live only while one of its inputs is, and read only those), and a group left with no
    # channel vanishes with its kernel. Weights are one tensor per group, sliced by `slice_state`.
    OpKind("mixconv", _mixconv_infer, lambda a, i, o: _mixconv_weights_per_position(a),
           lambda a, i, o: o.height * o.width * _mixconv_weights_per_position(a), channels=_mixconv_channels,
           slim_attrs=_mixconv_slim, slice_state=_mixconv_slice, print=_mixconv_print, allocates=_yes),
    # squeeze-and-excitation (timm's SqueezeExcite): x * fn(conv_expand(act(conv_reduce(mean_hw(x))))),
    # both 1x1 convs with bias. Gating: the channels it scales follow the gate before it (an MBConv's
    # depthwise BN gate: a closed channel is zero, so its mean adds nothing and its output stays
    # zero); its rd reduced channels are not searched (a small share of the block's MACs, though not
    # of its params: its convs' other dim follows the gate). Not merged (merge=None).
    OpKind("se", _se_infer, _se_params, lambda a, i, o: 2 * i.channels * a["rd"], channels=lambda op: SCALE_ALL,
           slim_attrs=_se_slim, slice_weights=lambda op: dict(_SE_WEIGHTS), print=_se_print, allocates=_yes),
    OpKind("linear", _linear_infer, lambda a, i, o: o.channels * i.channels + (o.channels if a["bias"] else 0),
           lambda a, i, o: o.channels * i.channels, channels=lambda op: DENSE, slim_attrs=_out_attr,
           slice_weights=lambda op: dict(_LINEAR_WEIGHTS), allocates=_yes,
           print=lambda op, gated: spacetext.call("linear", (op.out_shape.channels,),
                                                  **({} if op.attrs["bias"] else {"bias": False}))),
)}


def infer(kind: str, attrs: dict, shape: Shape) -> Shape:
    return OPS[kind].infer(attrs, shape)
