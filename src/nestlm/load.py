"""One loader for every folder nestlm reads: a plain Hugging Face checkpoint, a packed FP8 / NVFP4 one (the
quantization enters here, at load time: the Decoder itself knows nothing of it), or an elastic checkpoint
(the full model, plus its router and manifest with `load_elastic`).

    model = nestlm.from_hf("path/hf")                        # plain or packed (dequantized)
    model, router, manifest = nestlm.load_elastic("out/elastic")
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from nestlm import convert
from nestlm.convert import FAMILIES, config_from_hf, nemotron_h
from nestlm.elastic.artifact import read_manifest, read_router
from nestlm.errors import CheckpointError
from nestlm.io.safetensors import SafetensorsDir, read_config
from nestlm.model.decoder import Decoder
from nestlm.quant.packed import Tensors, dequantize_state, format_of

__all__ = ["from_hf", "load_elastic", "load_quantized"]


def from_hf(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Decoder:
    """Load a Hugging Face checkpoint folder (config.json + safetensors) as a nestlm Decoder. A packed FP8 /
    NVFP4 folder (a `quantization_config` in config.json) is dequantized (load_quantized)."""
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


class _Ckpt(Tensors):
    """In-memory tensors with what the family converters read from a SafetensorsDir."""

    def same(self, a, b):
        return torch.equal(self.d[a], self.d[b])


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Decoder:
    """A packed checkpoint (written by export_quantized / slice_quantized / quantize) as a Decoder whose
    quantized weights are dequantized to `dtype`: exactly the fake-quantized model's weights."""
    path = Path(path)
    hf = read_config(path)
    format_of(hf, path)
    cfg = config_from_hf(hf)
    src = SafetensorsDir(path)
    ckpt = _Ckpt(dequantize_state({k: src.get(k) for k in src.keys()}, dtype))
    if cfg.family == "nemotron_h" and cfg.tie_embeddings and nemotron_h.runs_own_lm_head(ckpt):
        cfg = dataclasses.replace(cfg, tie_embeddings=False)  # as nestlm.convert.load_hf_state
    sd = FAMILIES[cfg.family].state_from_hf(ckpt, cfg)
    with torch.device("meta"):
        model = Decoder(cfg)
    try:
        model.load_state_dict(sd, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: tensors don't match config.json ({str(e).splitlines()[0]} ...)") from None
    model = model.to(device=device, dtype=dtype)
    model.source_dir = str(path)
    return model.eval()
