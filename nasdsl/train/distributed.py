"""Process-group plumbing: one code path for a single process and for torchrun/DDP."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init(device: torch.device) -> World:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on GPU)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(world: World, *values: float, device=None) -> list[float]:
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_(world: World, tensors) -> None:
    """Make rank 0's values everyone's (the gates, so every rank derives the same network)."""
    if world.distributed:
        for t in tensors:
            dist.broadcast(t.data, 0)


def max_divergence(world: World, tensor: torch.Tensor) -> float:
    """The largest difference between any rank's `tensor` and rank 0's (0.0 in one process)."""
    if not world.distributed:
        return 0.0
    reference = tensor.detach().clone()
    dist.broadcast(reference, 0)
    gap = (tensor.detach() - reference).abs().max() if tensor.numel() else torch.zeros((), device=tensor.device)
    dist.all_reduce(gap, op=dist.ReduceOp.MAX)
    return float(gap)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
