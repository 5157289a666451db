"""What the family converters share."""

from __future__ import annotations

import torch

from nestlm.errors import UnsupportedArchitecture


def stack_experts(per_expert: dict[str, dict[int, torch.Tensor]], n_experts: int,
                  family: str) -> dict[str, torch.Tensor]:
    """{our stacked name: {expert id: tensor}} (one tensor per expert, as files hold them) -> {name: [E, ...]}.
    Every expert 0..n_experts-1 must be there."""
    out = {}
    for name, experts in per_expert.items():
        if sorted(experts) != list(range(n_experts)):
            raise UnsupportedArchitecture(f"{family} {name}: experts {sorted(experts)} present, "
                                          f"expected 0..{n_experts - 1}")
        out[name] = torch.stack([experts[e] for e in range(n_experts)])
    return out
