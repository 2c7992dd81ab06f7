"""Top-1/top-5 accuracy of a model on a dataset: the one evaluation loop (search and `nasdsl eval`)."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from nasdsl.train import distributed as dist_utils


@torch.no_grad()
def accuracy(model: nn.Module, dataset, device: torch.device, batch_size: int = 256, workers: int = 0,
             world: dist_utils.World = dist_utils.World()) -> dict:
    """Each rank scores its own exact shard (no padding); counts are summed over ranks."""
    was_training = model.training
    model.eval()
    shard = list(range(world.rank, len(dataset), world.size))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=shard, num_workers=workers,
                        pin_memory=device.type == "cuda")
    top1 = top5 = total = 0
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        logits = model(x)
        k = min(5, logits.size(1))
        best = logits.topk(k, dim=1).indices
        top1 += (best[:, 0] == y).sum().item()
        top5 += (best == y[:, None]).any(1).sum().item()
        total += y.numel()
    top1, top5, total = dist_utils.all_sum(world, top1, top5, total, device=device)
    model.train(was_training)
    n = max(total, 1)
    return {"top1": top1 / n, "top5": top5 / n, "samples": int(total)}
