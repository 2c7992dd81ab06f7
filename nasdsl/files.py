"""Files every stage writes and reads the same way: atomic writes, state dicts as safetensors.

A shared module like nasdsl.errors: it imports no stage, so the importer, the pipeline and the
exporter can all use it.
"""
from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path

from nasdsl.errors import NasdslError

#: where a training checkpoint commonly keeps its state dict
CHECKPOINT_KEYS = ("state_dict", "model")


def atomic_write(path: Path, write) -> None:
    """Call write(file_object) on a temp file next to `path`, then rename it over `path`: a reader
    (or a crash) never sees half a file, and the old file stays until the new one is whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_tensors(path: Path, tensors: dict) -> None:
    """A state dict as safetensors, atomically."""
    from safetensors.torch import save

    plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda f: f.write(save(plain)))


def load_strict(model, state: dict, what: str, file: str | None = None) -> None:
    """model.load_state_dict(state, strict=True); a mismatch (a missing, unexpected or mis-shaped
    tensor) is one NasdslError line, `what: detail`."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise NasdslError(f"{what}: {detail[:300]}", file=file) from None


def read_weights(file: Path) -> dict:
    """The state dict in a safetensors file; a missing or corrupt file is a NasdslError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise NasdslError("missing weights file", file=str(file))
    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise NasdslError(f"corrupt weights file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                          file=str(file)) from None


def read_state_dict(path: Path) -> dict:
    """A state dict from a `.safetensors` file or a torch file read with weights_only=True: tensors
    and plain data only, since unpickling arbitrary objects runs their code. A torch file may hold
    the tensors directly or a checkpoint dict with them under 'state_dict' or 'model'."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise NasdslError("no such file", file=str(path))
    if path.suffix == ".safetensors":
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


def _tensors_of(obj, where: str) -> dict:
    """The state dict in a loaded torch file: the dict itself, or the one under a checkpoint key."""
    if isinstance(obj, dict) and not _is_state_dict(obj):
        inner = next((obj[k] for k in CHECKPOINT_KEYS if isinstance(obj.get(k), dict)), None)
        obj = inner if inner is not None else obj
    if not isinstance(obj, dict) or not _is_state_dict(obj):
        raise NasdslError(f"holds no state dict: expected a dict of tensors, or a checkpoint with one under "
                          f"{' or '.join(repr(k) for k in CHECKPOINT_KEYS)}", file=where)
    return dict(obj)


def _is_state_dict(obj: dict) -> bool:
    import torch

    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def misfit(expected: dict[str, tuple], state: dict, owner: str, optional: tuple[str, ...] = (),
           left_out: tuple[str, ...] = ()) -> str:
    """How a state dict fails to fit the `expected` names and shapes, in one line: how many names
    are missing, unexpected and mis-shaped, with the first of each; '' when it fits. Names ending
    in `optional` may be absent; names starting with `left_out` are not asked for."""
    missing = [k for k in expected if k not in state and not k.endswith(optional) and not k.startswith(left_out)]
    unexpected = [k for k in state if k not in expected]
    misshaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (first: {missing[0]} {list(expected[missing[0]])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]} {list(state[unexpected[0]].shape)})")
    if misshaped:
        k = misshaped[0]
        parts.append(f"{len(misshaped)} mis-shaped (first: {k} {list(state[k].shape)} in the file, "
                     f"{list(expected[k])} in the {owner})")
    return ", ".join(parts)
