"""Files every stage writes and reads the same way: atomic writes, state dicts as safetensors.

A shared module like nasdsl.errors: it imports no stage, so the importer, the pipeline and the
exporter can all use it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


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


def read_state_dict(path: str | Path) -> dict:
    """The tensors of a weights file: safetensors, or a torch file read with `weights_only=True`
    (never by unpickling code). A checkpoint holding its weights under "state_dict" or "model" (as
    timm's and many training scripts' do) gives those. Errors are one line naming the file."""
    import torch

    from nasdsl.errors import NasdslError

    path = Path(path)
    if not path.is_file():
        raise NasdslError("no such weights file" if not path.exists() else "not a file", file=str(path))
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt files raise many kinds; one line names it
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NasdslError(f"cannot read weights (only tensors are read, never pickled code): {first[:200]}",
                          file=str(path)) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise NasdslError("not a state dict (a mapping of names to tensors)", file=str(path))
    return dict(state)
