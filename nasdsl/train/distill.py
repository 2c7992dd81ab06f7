"""Knowledge distillation while finetuning (recipe `finetune.distill`): the derived network learns
the labels and its teacher's softened outputs, as Hinton et al. (2015):

    loss = (1 - weight) * CE(student, y) + weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))

The T^2 keeps the soft term's gradients on the scale of the hard one's as T grows. The teacher is a
frozen network in eval mode (its BN statistics fixed): the stage-1 network the search started from,
or a network from a file.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nasdsl.train.loop import StageHooks


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, ce: torch.Tensor, weight: float,
                      temperature: float) -> torch.Tensor:
    soft = F.kl_div(F.log_softmax(student.float() / temperature, 1), F.log_softmax(teacher.float() / temperature, 1),
                    reduction="batchmean", log_target=True)
    return (1 - weight) * ce + weight * temperature ** 2 * soft


class Distillation(StageHooks):
    """The hooks of a finetuning stage that distils from `teacher`."""

    def __init__(self, teacher: nn.Module, weight: float, temperature: float):
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.weight, self.temperature = weight, temperature

    def loss(self, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.teacher(x)
        return distillation_loss(logits, target, ce, self.weight, self.temperature)
