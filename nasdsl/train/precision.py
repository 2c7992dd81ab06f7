"""Where a run computes (device, process group) and in what precision (autocast and loss scaling).

`precision: auto` is bf16 on a CUDA device that supports it (tensor cores, no loss scaling needed)
and fp32 elsewhere: on CPU, bf16 autocast is slower than fp32 for the small convolutions of these
networks, so it is never picked silently. fp16 keeps fp32 master weights and scales the loss
(torch.amp.GradScaler), since small fp16 gradients underflow. Only the forward pass and the loss run
under autocast: the DNAL gates and their penalty stay fp32, because sigmoid(delta * s) at delta up
to 1e4 needs fp32's mantissa to tell a gate at 1e-4 from one at 0.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from nasdsl.errors import NasdslError

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when there is a GPU, else cpu; anything else must name an available device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise NasdslError(f"'{name}' is not a device (use cpu, cuda, cuda:N or auto)", file="--device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NasdslError("CUDA was asked for but no GPU is available", file="--device")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """The recipe's `precision` on this device: auto picks; an impossible choice is an error now."""
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16" if cuda_bf16 else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise NasdslError("fp16 training needs a CUDA device; on CPU use precision fp32 or bf16",
                          file="precision")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise NasdslError("this GPU does not support bf16; use precision fp16 or fp32", file="precision")
    return name


@dataclass
class Precision:
    """Autocast for the forward pass and, for fp16, the loss scaler that goes with it."""
    name: str
    device_type: str

    def __post_init__(self) -> None:
        self.scaler = torch.amp.GradScaler(self.device_type) if self.name == "fp16" else None

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=_DTYPES[self.name])

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()
