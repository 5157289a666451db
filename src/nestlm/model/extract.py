"""Cut a nested submodel's weights out of the elastic model: the cuts of nestlm.model.layout (the ones the
sliced forward uses), as a standalone state dict for `Decoder(sliced_config(cfg, sub))`."""

from __future__ import annotations

import torch

from nestlm.model.layout import model_cuts, take
from nestlm.model.subarch import SubArch, sliced_config


def sliced_state_dict(model, sub: SubArch | None) -> dict[str, torch.Tensor]:
    """{name: tensor} of the standalone submodel `sub` (blocks renumbered), detached copies."""
    s = model.resolve(sub)
    return {name: take(_tensor(model, src), c).detach().contiguous().clone()
            for name, (src, c) in model_cuts(model.cfg, s).items()}


def _tensor(model, name: str) -> torch.Tensor:
    """The tensor `name` as the forward sees it (through a parametrization such as fake quantization)."""
    module, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module), attr)


def extract(model, sub: SubArch | None):
    """A standalone Decoder holding exactly the submodel `sub` (same dtype and device)."""
    from nestlm.model.decoder import Decoder

    cfg = sliced_config(model.cfg, sub)
    small = Decoder(cfg).to(device=model.embeddings.weight.device, dtype=model.embeddings.weight.dtype)
    small.load_state_dict(sliced_state_dict(model, sub))
    return small
