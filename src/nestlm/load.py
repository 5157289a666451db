"""One loader for every folder nestlm reads: a plain Hugging Face checkpoint, a packed FP8 / NVFP4 one (the
quantization enters here, at load time: the Decoder itself knows nothing of it), or an elastic checkpoint
(the full model, plus its router and manifest with `load_elastic`).

    model = nestlm.from_hf("path/hf")                        # plain or packed (dequantized)
    model, router, manifest = nestlm.load_elastic("out/elastic")
"""

from __future__ import annotations

from pathlib import Path

import torch

from nestlm import convert
from nestlm.elastic.artifact import read_manifest, read_router
from nestlm.io.safetensors import read_config
from nestlm.model.decoder import Decoder
from nestlm.quant.load import load_quantized

__all__ = ["from_hf", "load_elastic"]


def from_hf(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Decoder:
    """Load a Hugging Face checkpoint folder (config.json + safetensors) as a nestlm Decoder. A packed FP8 /
    NVFP4 folder (a `quantization_config` in config.json) is dequantized (nestlm.quant.load.load_quantized)."""
    if "quantization_config" in read_config(path):
        return load_quantized(path, dtype=dtype, device=device)
    return convert.from_hf(path, dtype=dtype, device=device)


def load_elastic(path: str | Path):
    """-> (model, router, manifest) from an elastic checkpoint folder written by `elastify` / `export` (packed
    or not). Raises CheckpointError naming the file for a missing, unreadable or mismatched manifest or router."""
    path = Path(path)
    manifest = read_manifest(path, required=True)
    model = from_hf(path)
    return model, read_router(path, model.cfg, manifest), manifest
