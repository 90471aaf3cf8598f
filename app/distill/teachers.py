"""Several teachers as one: the weighted mixture of their distributions, or the weighted sum of per-teacher losses.

``mixture_logits`` returns logits whose tempered softmax *is* the weighted mixture of the teachers' tempered
softmaxes, so every loss in ``losses.py`` (which divides by T again) distils from the mixture unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def normalised(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("teacher weights must sum to a positive number")
    return [w / total for w in weights]


def mixture_logits(
    teacher_logits: Sequence[torch.Tensor], weights: Sequence[float], temperature: float
) -> torch.Tensor:
    """[..., V] per teacher → [..., V] logits z with softmax(z / T) = Σ_i w_i softmax(t_i / T) (weights normalised).

    Computed in log space (logsumexp of log w_i + log_softmax(t_i / T)), then multiplied by T because the losses
    divide the teacher logits by T before their softmax.
    """
    if len(teacher_logits) == 1:
        return teacher_logits[0]
    log_weights = [math.log(w) for w in normalised(weights)]
    stacked = torch.stack(
        [
            F.log_softmax(logits.float() / temperature, dim=-1) + lw
            for logits, lw in zip(teacher_logits, log_weights, strict=True)
        ]
    )
    return torch.logsumexp(stacked, dim=0) * temperature


def combine_teacher_losses(
    student_logits: torch.Tensor,
    teacher_logits: Sequence[torch.Tensor],
    weights: Sequence[float],
    mode: str,
    temperature: float,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``loss(student, teacher)`` against the mixture ("mixture") or Σ w_i · loss(student, teacher_i) ("sum")."""
    if mode == "sum" and len(teacher_logits) > 1:
        return sum(
            (w * loss(student_logits, t) for w, t in zip(normalised(weights), teacher_logits, strict=True)),
            start=torch.zeros((), device=student_logits.device),
        )
    return loss(student_logits, mixture_logits(teacher_logits, weights, temperature))


class TeacherEnsemble(nn.Module):
    """Teachers behind one forward: logits of the weighted mixture at T = 1 (used for evaluation and serving
    comparisons); ``member_logits`` gives each teacher's own logits for training."""

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float]) -> None:
        super().__init__()
        if not members:
            raise ValueError("at least one teacher")
        self.members = nn.ModuleList(members)
        self.weights = normalised(weights)

    def member_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [member(x) for member in self.members]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mixture_logits(self.member_logits(x), self.weights, 1.0)
