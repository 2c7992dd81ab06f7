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
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from nasdsl.errors import NasdslError
from nasdsl.graph.ir import Network
from nasdsl.supernet.build import is_gate_param, place_gates
from nasdsl.supernet.network import NasNet

#: where a training checkpoint commonly keeps its state dict
CHECKPOINT_KEYS = ("state_dict", "model")
#: entries a file may leave out: a BN's batch counter is bookkeeping, not a trained weight (only
#: momentum=None reads it), and files written without it (safetensors exports often drop it) still fit
OPTIONAL_SUFFIXES = ("num_batches_tracked",)


@dataclass(frozen=True)
class InitWeights:
    """A checked --init file: its path, its sha256 (what the manifest records and --resume
    compares) and its state dict, keyed like the space's plain network."""
    path: Path
    sha256: str
    state: dict[str, torch.Tensor]

    def describe(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256}


def read_init(path: Path, network: Network, space: str) -> InitWeights:
    """The --init file read, translated and checked against the space's plain network; a file
    that cannot be read or does not fit is one NasdslError line naming it."""
    path = Path(path)
    state = translate(read_state_dict(path), network)
    check_fits(state, network, str(path), space)
    return InitWeights(path, file_sha256(path), state)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a `.safetensors` file or a torch file read with weights_only=True: tensors
    and plain data only, since unpickling arbitrary objects runs their code. A torch file may hold
    the tensors directly or a checkpoint dict with them under 'state_dict' or 'model'."""
    path = Path(path)
    if not path.is_file():
        raise NasdslError("no such file (--init)", file=str(path))
    if path.suffix == ".safetensors":
        from nasdsl.export.load import read_weights

        return read_weights(path)
    try:
        with warnings.catch_warnings():  # the unpickler's warnings would break the one-line error
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure is a file that cannot be used
        raise NasdslError(_refusal(exc), file=str(path)) from None
    return _tensors_of(obj, str(path))


def _refusal(exc: Exception) -> str:
    """Why torch.load(weights_only=True) refused a file, in one line."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))  # torch names the class or function it refused
    if found:
        return (f"holds a Python object ({found.group(1)}), not only tensors: reading it would run pickled "
                f"code, which nasdsl never does; save the model's state_dict() or a .safetensors file")
    text = str(exc)  # torch's reason comes after a paragraph about its defaults
    cut = text.find("WeightsUnpickler error:")
    if cut >= 0:
        text = text[cut + len("WeightsUnpickler error:"):]
    elif text.startswith("Weights only load failed"):
        text = text.split("\n\n", 1)[-1]
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    detail = f"{type(exc).__name__}: {first[:120]}" if first else type(exc).__name__
    return f"corrupt or not a torch file ({detail})"


def _tensors_of(obj, where: str) -> dict[str, torch.Tensor]:
    """The state dict in a loaded torch file: the dict itself, or the one under a checkpoint key."""
    if isinstance(obj, dict) and not _is_state_dict(obj):
        inner = next((obj[k] for k in CHECKPOINT_KEYS if isinstance(obj.get(k), dict)), None)
        obj = inner if inner is not None else obj
    if not isinstance(obj, dict) or not _is_state_dict(obj):
        raise NasdslError(f"holds no state dict: expected a dict of tensors, or a checkpoint with one under "
                          f"{' or '.join(repr(k) for k in CHECKPOINT_KEYS)}", file=where)
    return dict(obj)


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def translate(state: dict[str, torch.Tensor], network: Network) -> dict[str, torch.Tensor]:
    """The seam for files keyed by another library: maps a torchvision or timm state dict onto the
    names of `network`'s plain NasNet (nasdsl import's mapping will go here). Today the identity:
    a file must already be keyed like the space, as `nasdsl import` writes it; `check_fits` then
    says exactly which names or shapes do not fit."""
    return state


def plain_shapes(network: Network) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry of the space's plain network and its shape, in module order. Built on
    the meta device: names and shapes without allocating (or initialising) a single weight."""
    with torch.device("meta"):
        model = NasNet(network.to_config())
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_fits(state: dict[str, torch.Tensor], network: Network, where: str, space: str) -> None:
    """Every weight of the plain network present with its exact shape, and nothing else; otherwise
    one line with how many names are missing, unexpected and mis-shaped, and the first of each."""
    expected = plain_shapes(network)
    missing = [k for k in expected if k not in state and not k.endswith(OPTIONAL_SUFFIXES)]
    unexpected = [k for k in state if k not in expected]
    misshaped = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (first: {missing[0]} {list(expected[missing[0]])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]} {list(state[unexpected[0]].shape)})")
    if misshaped:
        k = misshaped[0]
        parts.append(f"{len(misshaped)} mis-shaped (first: {k} {list(state[k].shape)} in the file, "
                     f"{list(expected[k])} in the space)")
    if parts:
        raise NasdslError(f"does not fit {space}: {', '.join(parts)}", file=where)


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
    stray = [k for k in result.missing_keys if not (is_gate_param(k) or k.endswith(OPTIONAL_SUFFIXES))]
    if stray or result.unexpected_keys:
        raise RuntimeError(f"--init does not load into the supernet: {len(stray)} missing (first: "
                           f"{stray[:1]}), {len(result.unexpected_keys)} unexpected (first: "
                           f"{result.unexpected_keys[:1]})")
