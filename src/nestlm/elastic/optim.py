"""Optimizers used by the recipes."""

from __future__ import annotations

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
