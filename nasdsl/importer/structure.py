"""Traced primitives -> layers -> `.space` text, written the way a person would write it.

A tensor used by two ops opens a residual layer: its two arms run to the add that joins them (the
longer is the block, the other the shortcut), and the ops after the add in the same block are the
layer's `then`. Every other op joins the layer of the block it runs in, and a conv or linear of
another block starts a new layer; from the global pooling on, everything is the classifier.

Each layer is then said as a composite where one reproduces it exactly (`mbconv`, `basic`,
`bottleneck`, with their arguments), else as a chain of primitive ops; runs of layers that say the
same thing (the first may add a stride) become a `stage` with a repeat count. The compiler and the
weight check in nasdsl.importer prove the text: a layer said wrongly fails there, not later.

Gates follow the shipped spaces: after every BN (a conv without one gets an explicit `gate`), never
on shortcuts, the stem or the classifier.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from nasdsl.errors import NasdslError
from nasdsl.graph import spacetext
from nasdsl.graph.ir import Shape
from nasdsl.graph.ops import OPS, is_depthwise, split_channels
from nasdsl.importer.trace import Prim
from nasdsl.language.builtins import BUILTINS


@dataclass
class LayerPlan:
    """One layer of the imported space: its ops, and how the .space text says them."""
    unit: str
    main: list[Prim] = field(default_factory=list)
    shortcut: list[Prim] | None = None      # None: no residual add; []: the identity
    post: list[Prim] = field(default_factory=list)
    classifier: bool = False
    name: str = ""
    text: str = ""                          # the layer's body
    options: dict = field(default_factory=dict)
    stride: int = 1                         # a composite's stride, said by its stage when it has one
    key: str = ""                           # the text without that stride: equal keys can share a stage

    @property
    def in_shape(self) -> Shape:
        return self.main[0].in_shape if self.main else self.post[0].in_shape

    @property
    def prims(self) -> list[Prim]:
        """Its ops in the compiled layer's order: block, shortcut, then the ops after the add."""
        return self.main + (self.shortcut or []) + self.post


def split_layers(prims: list[Prim], output: Prim, source: str) -> list[LayerPlan]:
    users: dict[int, list[Prim]] = defaultdict(list)
    for p in prims:
        for q in p.inputs:
            users[id(q)].append(p)
    layers: list[LayerPlan] = []
    x = prims[0]
    while x is not output:
        after = users[id(x)]
        if len(after) == 1 and after[0].kind != "add":
            _place(layers, after[0])
            x = after[0]
            continue
        main, shortcut, join = _residual(x, after, users, source)
        layers.append(LayerPlan(join.unit, main, shortcut))
        x = join
    if not layers or not layers[-1].classifier:
        raise NasdslError("no classifier: the model should end in global pooling or flatten, then linear "
                          "layers", file=source)
    return layers


def _place(layers: list[LayerPlan], p: Prim) -> None:
    """Puts an op that is not part of a residual's arms: into the classifier from the global pooling
    on, after a residual layer's add when it runs in the same block (`then`), else into the current
    layer unless it opens a new one (a conv or linear of another block, a pooling between blocks)."""
    last = layers[-1] if layers else None
    if last is not None and last.classifier:
        last.main.append(p)
    elif p.kind in ("gap", "flatten") or p.in_shape.is_flat:
        layers.append(LayerPlan(p.unit, [p], classifier=True))
    elif last is not None and last.shortcut is not None and not p.weighted and p.unit == last.unit:
        last.post.append(p)                  # ResNet's activation after the add
    elif (last is None or p.weighted and p.unit != last.unit or last.shortcut is not None
          or p.kind in ("maxpool", "avgpool") and p.unit != last.unit and len(layers) > 1):
        layers.append(LayerPlan(p.unit, [p]))   # a pooling between blocks is a layer (VGG's); the stem keeps its own
    else:
        last.main.append(p)


def _residual(x: Prim, after: list[Prim], users, source: str):
    """The block and shortcut arms from `x` to the add joining them."""
    if len(after) != 2:
        raise NasdslError(f"a tensor of block {after[0].unit or 'forward'} feeds {len(after)} ops; only a "
                          f"block and its shortcut may share one", file=source)
    arms, joins = [], []
    for p in after:
        arm = []
        while p.kind != "add":
            arm.append(p)
            nxt = users[id(p)]
            if len(nxt) != 1:
                raise NasdslError(f"block {p.unit or 'forward'} nests a residual inside another; the .space "
                                  f"language has one shortcut per layer", file=source)
            p = nxt[0]
        arms.append(arm)
        joins.append(p)
    if joins[0] is not joins[1] or len(joins[0].inputs) != 2:
        raise NasdslError(f"the two paths from block {after[0].unit or 'forward'} do not meet in one add",
                          file=source)
    arms.sort(key=lambda arm: -sum(p.weighted for p in arm))
    if not arms[0]:
        raise NasdslError(f"block {joins[0].unit or 'forward'} adds a tensor to itself", file=source)
    return arms[0], arms[1], joins[0]


# ---- composites --------------------------------------------------------------------------------
def _sig(prims: list[Prim]) -> list[str]:
    """Kinds as a composite sees them: a depthwise conv (mixed kernels too) is "dw", a split 1x1
    mixed conv (MixNet's) a "conv"."""
    def sig(p: Prim) -> str:
        if p.kind == "mixconv":
            return "dw" if p.attrs["depthwise"] else "conv"
        return "dw" if p.kind == "conv" and is_depthwise(p.op) else p.kind
    return [sig(p) for p in prims]


def _split(p: Prim) -> int | None:
    """How many equal groups (timm's split) a conv's channels come in: 1 for a plain conv, G for a
    mixed conv cut as `split=G` and `k=[...]` cut them; None for any other cut."""
    if p.kind != "mixconv":
        return 1
    a, g = p.attrs, len(p.attrs["kernels"])
    equal = (a["in_splits"] == split_channels(p.in_shape.channels, g)
             and a["out_splits"] == split_channels(p.out_shape.channels, g))
    return g if equal else None


def _kernel(p: Prim):
    """A conv's kernel: one size, or a mixed conv's list (one per group)."""
    ks = p.attrs["kernels"] if p.kind == "mixconv" else (p.attrs["k"],)
    return ks[0] if len(set(ks)) == 1 and p.kind != "mixconv" else list(ks)


def _plain_conv(p: Prim, k: int | None = None, stride: int | None = 1) -> bool:
    """No bias, padding k // 2, and (when asked) this kernel and stride; a mixed conv in timm's equal
    groups of 1x1 kernels counts as a 1x1 conv (its `split` is said by the composite)."""
    a = p.attrs
    if p.kind == "mixconv":
        return (_split(p) is not None and (stride is None or a["stride"] == stride)
                and (k is None or set(a["kernels"]) == {k}) and (a["depthwise"] or k == 1))
    return (p.kind == "conv" and a["padding"] == a["k"] // 2 and not a["bias"] and (k is None or a["k"] == k)
            and (stride is None or a["stride"] == stride))


def _bn_args(bns: list[Prim]) -> dict | None:
    """A composite's `eps` and `momentum` arguments (where not the defaults), when its BNs agree."""
    if len({(b.attrs["eps"], b.attrs["momentum"]) for b in bns}) != 1:
        return None
    eps, momentum = bns[0].attrs["eps"], bns[0].attrs["momentum"]
    return {**({"eps": eps} if eps != 1e-5 else {}), **({"momentum": momentum} if momentum != 0.1 else {})}


def _ratio(num: int, den: int):
    """num / den as the language writes a multiplier: an int when whole, else 4 decimals, as long
    as round(den * ratio) gives num back."""
    if num % den == 0:
        return num // den
    r = round(num / den, 4)
    return r if round(den * r) == num else None


def match_mbconv(plan: LayerPlan) -> tuple[dict, str] | None:
    main, cin = plan.main, plan.in_shape.channels
    sig = _sig(main)
    expand = sig[:3] == ["conv", "bn", "act"]
    body = sig[3:] if expand else sig
    if body not in (["dw", "bn", "act", "conv", "bn"], ["dw", "bn", "act", "se", "conv", "bn"]) or plan.post:
        return None
    dw, proj = main[3 if expand else 0], main[-2]
    acts = {p.attrs["fn"] for p in main if p.kind == "act"}
    bn = _bn_args([p for p in main if p.kind == "bn"])
    mid = dw.out_shape.channels
    if (len(acts) != 1 or bn is None or not _plain_conv(proj, 1) or not _plain_conv(dw, stride=None)
            or (expand and not _plain_conv(main[0], 1)) or expand == (mid == cin)):
        return None
    out, stride = proj.out_shape.channels, dw.attrs["stride"]
    splits = {"expand_split": _split(main[0]) if expand else 1, "project_split": _split(proj)}
    args: dict = {"k": _kernel(dw), **({"stride": stride} if stride != 1 else {})}
    e = _ratio(mid, cin) if expand else 1
    if e is None:
        return None
    if e != 6:
        args["e"] = e
    act = acts.pop()
    if act != "relu6":
        args["act"] = act
    args.update({k: v for k, v in splits.items() if v != 1})
    if "se" in body:
        se = se_args(main[body.index("se") + (3 if expand else 0)], cin, mid, act)
        if se is None:
            return None
        args.update(se)
    args.update(bn)
    if plan.shortcut is not None and (plan.shortcut or stride != 1 or cin != out):
        return None
    if plan.shortcut is None and stride == 1 and cin == out:
        plan.options["residual"] = False
    return {"out": out, **args}, "mbconv"


def se_args(se: Prim, cin: int, mid: int, act: str) -> dict | None:
    """mbconv's SE arguments that give this SE's reduced width: a ratio of the block's input
    (EfficientNet) or of its mid channels, rounded or made divisible by 8 (MobileNetV3)."""
    from nasdsl.language.builtins import se_channels

    rd = se.attrs["rd"]
    usual = [(of, divisor, ratio) for ratio in (0.25, 0.125, 0.0625) for of in ("in", "mid") for divisor in (1, 8)]
    exact = [(of, 1, _ratio(rd, base)) for of, base in (("in", cin), ("mid", mid))]
    for of, divisor, ratio in usual + exact:   # the libraries' own rules first, so a stage says one rule
        if ratio is not None and se_channels({"se": ratio, "se_of": of, "se_divisor": divisor}, cin, mid) == rd:
            args = {"se": ratio}
            if of != "in":
                args["se_of"] = of
            if divisor != 1:
                args["se_divisor"] = divisor
            if se.attrs["act"] != act:
                args["se_act"] = se.attrs["act"]
            if se.attrs["fn"] != "sigmoid":
                args["se_fn"] = se.attrs["fn"]
            return args
    return None


def match_resnet(plan: LayerPlan) -> tuple[dict, str] | None:
    """torchvision's and timm's BasicBlock and Bottleneck (stride on the 3x3 conv)."""
    main, sc, cin = plan.main, plan.shortcut, plan.in_shape.channels
    if sc is None or _sig(plan.post) != ["act"]:
        return None
    sig = _sig(main)
    kind = {("conv", "bn", "act", "conv", "bn"): "basic",
            ("conv", "bn", "act", "conv", "bn", "act", "conv", "bn"): "bottleneck"}.get(tuple(sig))
    acts = {p.attrs["fn"] for p in main + plan.post if p.kind == "act"}
    bn = _bn_args([p for p in main + sc if p.kind == "bn"])
    if kind is None or len(acts) != 1 or bn is None:
        return None
    convs = [p for p in main if p.kind == "conv"]
    ks = [3, 3] if kind == "basic" else [1, 3, 1]
    strided = 0 if kind == "basic" else 1
    if any(not _plain_conv(c, k, None if i == strided else 1) for i, (c, k) in enumerate(zip(convs, ks))):
        return None
    out, mid, stride = convs[-1].out_shape.channels, convs[0].out_shape.channels, convs[strided].attrs["stride"]
    groups = convs[1].attrs["groups"] if kind == "bottleneck" else 1
    if (kind == "basic" and groups != 1) or (kind == "bottleneck" and convs[1].out_shape.channels != mid):
        return None
    auto = "identity" if stride == 1 and cin == out else "proj"
    if sc and not (_sig(sc) == ["conv", "bn"] and _plain_conv(sc[0], 1, stride)) or (not sc and auto != "identity"):
        return None
    args: dict = {"out": out}
    if stride != 1:
        args["stride"] = stride
    if mid != (out if kind == "basic" else max(1, out // 4)):
        args["mid"] = mid
    if groups != 1:
        args["groups"] = groups
    if (auto == "identity") != (not sc):
        args["shortcut"] = "proj"
    act = acts.pop()
    if act != "relu":
        args["act"] = act
    args.update(bn)
    return args, kind


# ---- text --------------------------------------------------------------------------------------
def _composite_text(kind: str, args: dict) -> tuple[str, str, int]:
    """The call, the call without its stride (the stage key), and the stride."""
    args = dict(args)
    out = args.pop("out")
    full = spacetext.call(kind, (out,), **args)
    stride = args.pop("stride", 1)
    return full, spacetext.call(kind, (out,), **args), stride


def _chain_text(prims: list[Prim], gate_convs: bool, gate_bns: bool = True, final_linear: bool = False) -> str:
    """The ops joined by `>`. `gate_convs`: a conv without a BN after it gets a `gate` (VGG);
    `gate_bns` False says `bn(gate=off)` (a shortcut's; a layer's `[gate=off]` says it for all)."""
    words = []
    for i, p in enumerate(prims):
        nxt = prims[i + 1] if i + 1 < len(prims) else None
        if final_linear and nxt is None and p.kind == "linear":
            words.append(spacetext.call("linear", ("classes",), **({} if p.attrs["bias"] else {"bias": False})))
            continue
        words.append(OPS[p.kind].print(p.op, gate_bns))
        if gate_convs and p.kind == "conv" and (nxt is None or nxt.kind != "bn"):
            words.append("gate")      # a conv without BN gates its output itself (VGG)
    return " > ".join(words)


def describe(plan: LayerPlan, first: bool) -> None:
    """Sets the layer's text, options and stage key."""
    if plan.classifier:
        plan.options["gate"] = False
        plan.text = plan.key = _chain_text(plan.main, False, final_linear=True)
        return
    if first:
        plan.options["gate"] = False
    for match in (match_mbconv, match_resnet):
        found = match(plan)
        if found:
            args, kind = found
            plan.text, plan.key, plan.stride = _composite_text(kind, args)
            if kind == "mbconv" and plan.options.get("residual") is False and plan.stride != 1:
                plan.options.pop("residual")
            return
    plan.options.pop("residual", None)
    text = _chain_text(plan.main, gate_convs=not first)
    if plan.shortcut is not None:
        sc = _chain_text(plan.shortcut, False, gate_bns=False)
        text += " residual" + (f" {sc}" if sc else "")
    if plan.post:
        text += " then " + _chain_text(plan.post, False)
    plan.text = plan.key = text


def _identifier(unit: str, taken: set[str]) -> str:
    base = re.sub(r"\W", "_", unit).strip("_") or "layer"
    if base[0].isdigit() or base in ("space", "param", "let", "def", "layer", "stage", "residual", "then",
                                     "for", "in", "input") or base in BUILTINS:
        base = "l_" + base
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def _options(opts: dict, extra: dict | None = None) -> str:
    opts = {**(extra or {}), **opts}
    return f" [{', '.join(f'{k}={spacetext.num(v)}' for k, v in opts.items())}]" if opts else ""


def _stage_prefix(unit: str) -> str:
    return unit.rsplit(".", 1)[0] if "." in unit else unit


def body_lines(plans: list[LayerPlan]) -> list[str]:
    """The layer and stage statements: runs of layers with one key, stride only on the first,
    in one block container (timm's `blocks.2`, torchvision's `layer3`), become stages."""
    for i, plan in enumerate(plans):
        describe(plan, first=i == 0)
    lines, taken, i = [], {"stem", "classifier"}, 0
    while i < len(plans):
        p, j = plans[i], i + 1
        while j < len(plans) and _same_stage(p, plans[j]):
            j += 1
        if j - i > 1:
            prefix = _stage_prefix(p.unit)
            whole = sum(_stage_prefix(q.unit) == prefix for q in plans) == j - i
            name = _identifier(prefix if whole else f"{prefix}_{p.unit.rsplit('.', 1)[-1]}", taken)
            stage_opts = {"repeat": j - i, **({"stride": p.stride} if p.stride != 1 else {})}
            lines.append(f"stage {name}{_options(stage_opts)} {{ layer{_options(p.options)} = {p.key} }}")
            for k, q in enumerate(plans[i:j]):
                q.name = f"{name}.{k}"
        else:
            p.name = "classifier" if p.classifier else ("stem" if i == 0 else _identifier(p.unit, taken))
            lines.append(f"layer {p.name}{_options(p.options)} = {p.text}")
        i = j
    return lines


def _same_stage(first: LayerPlan, later: LayerPlan) -> bool:
    """`later` repeats `first` in a stage: the same text but for the first's stride, in the same
    block container; the stem and the classifier stay layers of their own."""
    return (not first.classifier and not later.classifier and "gate" not in first.options
            and later.key == first.key and later.stride == 1 and later.options == first.options
            and _stage_prefix(later.unit) == _stage_prefix(first.unit))
