"""The loss terms of Mutual Knowledge Distillation (FedDAT, Chen et al. AAAI 2024, Eq. 4-5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch.

    The T^2 factor keeps the gradient scale of the soft term independent of T (Hinton et al.).
    """
    student = F.log_softmax(student_logits / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = F.kl_div(student, teacher, reduction="batchmean", log_target=True)
    return temperature**2 * kl


def mkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
             temperature: float, task_weight: float, distill_weight: float) -> torch.Tensor:
    """task_weight * CE(student, labels) + distill_weight * T^2 * KL(teacher || student).

    The teacher's logits must already be detached: only the student learns from this loss.
    """
    task = F.cross_entropy(student_logits, labels)
    return task_weight * task + distill_weight * distillation_kl(student_logits, teacher_logits, temperature)
