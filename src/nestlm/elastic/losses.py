"""Elastic distillation losses, as pure functions.

    kd = kd_loss(student_logits, teacher_logits, temperature)      # forward KL(teacher || student)
    rl = router_loss(cost, target, weight=lam, dead_zone=0.01)     # keep the chosen cost on its budget
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Forward KL(p_teacher || p_student) at `temperature`, mean per token, scaled by T² (so gradients keep
    their size as T changes). student, teacher: [b, t, V] logits. Computed in fp32."""
    t = temperature
    log_s = F.log_softmax(student.float() / t, dim=-1)
    log_t = F.log_softmax(teacher.float() / t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # [b, t]
    return kl.mean() * t * t


def router_loss(cost: torch.Tensor, target: float, weight: float = 1.0, dead_zone: float = 0.0) -> torch.Tensor:
    """weight * relu(|cost / target - 1| - dead_zone): the relative deviation from the budget, free inside
    the dead zone."""
    return weight * torch.relu((cost / target - 1).abs() - dead_zone)
