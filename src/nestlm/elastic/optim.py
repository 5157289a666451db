"""Optimizers and the learning-rate schedule used by elastify and the recipes."""

from __future__ import annotations

import math

import torch


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW over `params` (an iterable of tensors), with the fused kernel where torch has one (CPU and
    CUDA, floating-point parameters).

    On CPU the fused step is ~7x faster than the default for-each one (5 ms vs 37 ms for the 5M parameters
    of bench/bench_elastic.py's model). That matters for elastic training: every step updates the whole
    parent even when the sampled budget is small."""
    params = list(params)
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, fused=fused, **kwargs)


def lr_at(step: int, steps: int, lr: float, warmup: int = 0, schedule: str = "cosine", floor: float = 0.1) -> float:
    """The learning rate at `step` of `steps`: linear warmup over the first `warmup` steps, then constant
    (schedule "constant") or a cosine decay towards floor * lr, reached one step after the last (schedule "cosine").
    The demo's pretraining uses it with warmup = steps // 10."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
