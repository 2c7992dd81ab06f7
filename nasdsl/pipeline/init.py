"""`nasdsl search SPACE --init FILE`: start the search from a trained network's weights.

Training the supernet's weights is the most expensive part of a search; someone compressing a
network they already trained has those weights. This module reads such a file without ever running
pickled code, checks that it fits the space completely (every weight, its exact shape, nothing
extra), and loads it into the supernet. `make_plan` does the reading and checking, so a file that
does not fit is one line before anything is written; the runner only loads what was checked.

The file is keyed like the space's plain network (`nasdsl.api.build(network)`, a NasNet). The
supernet has the same names plus its gate parameters (`is_gate_param`): its gated BNs keep their
plain names through state-dict hooks (supernet/gates.py). One difference needs a rename: a gate
placement other than after_bn moves each gate op before its BN or after its activation, and the
ops of a block are numbered by position, so the ops a gate moved past change number.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from nasdsl.errors import NasdslError
from nasdsl.files import misfit, read_state_dict
from nasdsl.graph.ir import Network
from nasdsl.supernet.build import is_gate_param, place_gates
from nasdsl.supernet.network import NasNet

#: entries a file may leave out: a BN's batch counter is bookkeeping, not a trained weight (only
#: momentum=None reads it), and files written without it (safetensors exports often drop it) still fit
OPTIONAL_SUFFIXES = ("num_batches_tracked",)
#: the gate placement the language compiles (gates after their BN): a plain network's, where nothing moved
AS_COMPILED = "after_bn"


@dataclass(frozen=True)
class InitWeights:
    """A checked --init file: its path, its sha256 (what the manifest records and --resume
    compares) and its state dict, keyed like the space's plain network."""
    path: Path
    sha256: str
    state: dict[str, torch.Tensor]
    # (the file's classes, the space's) when the file's classifier was left out for a new one
    new_classifier: tuple[int, int] | None = None

    def describe(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256}


def read_init(path: Path, network: Network, space: str, cut: Network | None = None) -> InitWeights:
    """The --init file read, translated and checked against the space's plain network as written;
    a file that cannot be read or does not fit is one NasdslError line naming it. With `cut` (the
    network with its kernels cut to what each map reaches, which the run builds), its kernels are
    cut alike: the taps cut only ever met padding."""
    path = Path(path)
    expected = plain_shapes(network)
    state = translate(read_state_dict(path), network, str(path), expected)
    state, classes = without_other_classifier(state, expected)
    check_fits(state, expected, str(path), space, new_classifier=classes is not None)
    if cut is not None and cut is not network:
        state = cut_taps(state, plain_shapes(cut))
    return InitWeights(path, file_sha256(path), state, classes)


def cut_taps(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Each conv weight wider than `expected` in its last two dims cut to its centre taps."""
    out = dict(state)
    for key, shape in expected.items():
        t = state.get(key)
        if t is not None and t.dim() == 4 and tuple(t.shape) != shape:
            c = (t.shape[-1] - shape[-1]) // 2
            out[key] = t[..., c:t.shape[-2] - c, c:t.shape[-1] - c].contiguous()
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def translate(state: dict[str, torch.Tensor], network: Network, where: str,
              expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A file keyed by torchvision or timm, mapped onto the names of `network`'s plain NasNet when
    the space describes a library model with exactly the file's names (nasdsl.importer.mapping);
    any other file is returned as it is, and `check_fits` says what does not fit. `expected`: the
    plain network's `plain_shapes`."""
    if set(state) <= set(expected):
        return state
    from nasdsl.importer.mapping import translate as from_library

    renamed = from_library(state, network, where)
    return state if renamed is None else renamed


def without_other_classifier(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]):
    """The state without its classifier when that is all that differs and the classes do: a network
    trained on ImageNet, searched on a 10-class dataset, keeps everything but its last linear, and
    the supernet's own (freshly initialised) classifier takes its place. Returns (state, (file's
    classes, space's)) then, else (state, None)."""
    differ = {k for k in expected if k in state and tuple(state[k].shape) != expected[k]}
    head = {k for k in expected if k.startswith("classifier.")}
    if not differ or not differ <= head or "classifier.weight" not in differ:
        return state, None
    theirs = state["classifier.weight"].shape[0]
    if tuple(state["classifier.weight"].shape[1:]) != expected["classifier.weight"][1:]:
        return state, None        # the features it reads differ: a different network, not other classes
    return {k: v for k, v in state.items() if k not in head}, (theirs, expected["classifier.weight"][0])


def plain_shapes(network: Network) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry of the space's plain network and its shape, in module order. Built on
    the meta device: names and shapes without allocating (or initialising) a single weight."""
    with torch.device("meta"):
        model = NasNet(network.to_config())
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_fits(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], where: str, space: str,
               new_classifier: bool = False) -> None:
    """Every weight of the plain network (`expected`: its `plain_shapes`) present with its exact shape,
    and nothing else; otherwise one line with how many names are missing, unexpected and mis-shaped,
    and the first of each."""
    skip = ("classifier.",) if new_classifier else ()
    problem = misfit(expected, state, "space", optional=OPTIONAL_SUFFIXES, left_out=skip)
    if problem:
        raise NasdslError(f"does not fit {space}: {problem}", file=where)


def _block_op_names(network: Network) -> list[list[str]]:
    """Per block (the last layer's: head and classifier), the state-dict prefixes of its ops that
    are not gates, in order; NasNet's own `op_modules` names them, so the naming lives in one place."""
    with torch.device("meta"):
        model = NasNet(network.to_config())
    return [[name for (name, _), op in zip(chain, block.ops) if not op.is_gate]
            for layer, modules in zip(network.layers, model.op_modules())
            for block, chain in zip(layer.blocks, modules["blocks"])]


def supernet_renames(network: Network, placement: str) -> dict[str, str]:
    """Plain op prefix -> the supernet's, for the ops a gate placement renumbered. place_gates only
    swaps a gate with its neighbour inside a block, so the other ops keep their order there."""
    placed = place_gates(network, placement)
    if placed is network:
        return {}
    return {a: b for plain, moved in zip(_block_op_names(network), _block_op_names(placed))
            for a, b in zip(plain, moved) if a != b}


def _renamed(key: str, renames: dict[str, str]) -> str:
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in renames:
            return ".".join([renames[prefix], *parts[n:]])
    return key


def load_init(model: nn.Module, init: InitWeights, network: Network, placement: str) -> None:
    """Copy the checked weights into the supernet (on any device). What the supernet then lacks must
    be its gates and BN counters: anything else would be a naming bug, not the user's file."""
    renames = supernet_renames(network, placement)
    state = {_renamed(k, renames): v for k, v in init.state.items()}
    result = model.load_state_dict(state, strict=False)
    stray = [k for k in result.missing_keys if not (is_gate_param(k) or k.endswith(OPTIONAL_SUFFIXES)
                                                    or init.new_classifier and k.startswith("classifier."))]
    if stray or result.unexpected_keys:
        raise RuntimeError(f"--init does not load into the supernet: {len(stray)} missing (first: "
                           f"{stray[:1]}), {len(result.unexpected_keys)} unexpected (first: "
                           f"{result.unexpected_keys[:1]})")
