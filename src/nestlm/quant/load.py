"""Reading packed checkpoints back: a Decoder with the quantized weights dequantized (exactly the
fake-quantized model's weights), and the bytes a packed folder spends per quantized parameter."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from nestlm.convert import FAMILIES, config_from_hf, nemotron_h
from nestlm.elastic.artifact import (
    ROUTER_FILE,
)
from nestlm.errors import CheckpointError
from nestlm.io.safetensors import (
    SafetensorsDir,
    Source,
    read_config,
)
from nestlm.model.decoder import Decoder
from nestlm.quant.packed import Tensors, dequantize_state, format_of, quantized_names


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


def quantized_bytes(path: str | Path) -> dict:
    """Bytes on disk of a packed checkpoint: the quantized weights with their scales, per quantized parameter,
    and the whole safetensors payload."""
    src = Source(Path(path))
    hf = read_config(path)
    fmt, _ = format_of(hf, Path(path))
    quantized = quantized_names(src.keys())
    nbytes = {k: torch.Size(src.shape(k)).numel() * src.dtype(k).itemsize for k in src.keys()}
    q_bytes = sum(n for k, n in nbytes.items() if k in quantized or (k.rsplit(".", 1)[0] + ".weight") in quantized)
    q_params = sum(torch.Size(src.shape(k)).numel() * (2 if fmt.name == "nvfp4" else 1) for k in quantized)
    files = [p for p in Path(path).glob("*.safetensors") if p.name != ROUTER_FILE]
    return {"quantized_params": q_params, "quantized_bytes": q_bytes,
            "bytes_per_quantized_param": q_bytes / max(q_params, 1),
            "other_bytes": sum(nbytes.values()) - q_bytes, "file_bytes": sum(p.stat().st_size for p in files)}
