"""The run folder: manifest, metrics, TensorBoard, atomic checkpoints, summary and plots.

Only rank 0 writes. Every file that a script may read is replaced atomically (write to a
temporary file, fsync, rename), so a killed run never leaves a half-written file.
"""
from __future__ import annotations

import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

from nasdsl.errors import NasdslError
from nasdsl.files import atomic_write

CHECKPOINT = "checkpoint.pt"


def load_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - missing or corrupt: the run cannot go on from it
        raise NasdslError(f"cannot read the saved tensors ({type(exc).__name__}); start the run again",
                          file=str(path)) from None


def write_json(path: Path, data) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


class RunFolder:
    """A run's folder: what rank 0 writes there and how a resumed run reads it back."""

    def __init__(self, folder: Path, is_main: bool):
        self.folder = Path(folder)
        self.is_main = is_main
        self._tb = None

    # ---- manifest and metrics ------------------------------------------------------------------
    def write_manifest(self, **info) -> None:
        if not self.is_main:
            return
        import lark
        import timm

        from nasdsl._version import __version__

        manifest = {
            "command": sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": {"nasdsl": __version__, "python": platform.python_version(),
                         "torch": torch.__version__, "timm": timm.__version__, "lark": lark.__version__},
            "host": platform.node(),
            **info,
        }
        write_json(self.folder / "manifest.json", manifest)

    def read_manifest(self) -> dict:
        try:
            return json.loads((self.folder / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise NasdslError(f"cannot read the run's manifest.json: {exc}", file=str(self.folder)) from None

    def log(self, record: dict) -> None:
        """One line of metrics.jsonl and the same scalars in TensorBoard."""
        if not self.is_main:
            return
        with open(self.folder / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        tb = self.tensorboard()
        if tb is not None:
            step = record.get("global_epoch", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "global_epoch"):
                    tb.add_scalar(f"{record.get('stage', 'run')}/{k}", v, step)
            tb.flush()

    def tensorboard(self):
        if self._tb is None and self.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional at run time
                self._tb = False
            else:
                self._tb = SummaryWriter(str(self.folder / "tensorboard"))
        return self._tb or None

    def truncate_metrics(self, keep) -> None:
        """On resume, drop metric lines of epochs that the checkpoint did not keep."""
        path = self.folder / "metrics.jsonl"
        if not self.is_main or not path.exists():
            return
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if keep(json.loads(line))]
        atomic_write(path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))

    # ---- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, state: dict) -> None:
        if self.is_main:
            atomic_write(self.folder / CHECKPOINT, lambda f: torch.save(state, f))

    def load_checkpoint(self) -> dict | None:
        path = self.folder / CHECKPOINT
        if not path.exists():
            return None
        try:
            # weights_only: tensors and plain data only; a checkpoint never runs pickled code (and
            # the unpickler's warnings about a foreign file would break the one-line error)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupt (or foreign) file
            raise NasdslError(f"corrupt checkpoint ({type(exc).__name__}: not tensors and plain data); delete it "
                              f"to start over", file=str(path)) from None

    def close(self) -> None:
        if self._tb:
            self._tb.close()
