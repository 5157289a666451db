"""Hugging Face checkpoints <-> nestlm Decoder.

    model = from_hf("path/to/checkpoint")          # nemotron_h, llama, qwen3, qwen3_moe, mixtral
    to_hf(model, "out_dir")                         # the full model, loadable by plain transformers
    to_hf(model, "out_dir", sub=SubArch(...))       # a nested submodel, as a smaller standard checkpoint
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from nestlm.arch import SubArch, sliced_config
from nestlm.convert import llama, moe, nemotron_h
from nestlm.errors import CheckpointError, ConfigError, UnsupportedArchitecture
from nestlm.io.safetensors import SafetensorsDir, read_config, write_checkpoint
from nestlm.model import config as model_config
from nestlm.model.config import ModelConfig
from nestlm.model.decoder import Decoder
from nestlm.model.extract import sliced_state_dict

MODULES = {"nemotron_h": nemotron_h, "llama": llama, "moe": moe}
FAMILIES = {family: MODULES[module] for family, module in model_config.FAMILIES.items()}  # family -> converter

__all__ = ["CheckpointError", "UnsupportedArchitecture", "config_from_hf", "from_hf", "load_hf_state", "to_hf",
           "hf_tensors"]


def _family(hf: dict):
    mt = hf.get("model_type")
    if mt not in FAMILIES:
        raise UnsupportedArchitecture(
            f"model_type {mt!r} is not supported; nestlm converts {sorted(FAMILIES)}")
    return FAMILIES[mt]


def config_from_hf(hf: dict) -> ModelConfig:
    try:
        return _family(hf).config_from_hf(hf)
    except KeyError as e:
        raise CheckpointError(f"{hf.get('model_type')} config.json lacks the key {e}") from None


def folder_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint folder's config.json; a value it can't hold ("hidden_size": "abc") is
    one CheckpointError naming the file."""
    try:
        return config_from_hf(read_config(path))
    except ConfigError as e:
        raise CheckpointError(f"{path}/config.json: {e}") from None


def load_hf_state(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a checkpoint folder into (our config, our state dict), validating every shape."""
    hf = read_config(path)
    cfg = config_from_hf(hf)
    ckpt = SafetensorsDir(path)
    if cfg.family == "nemotron_h" and cfg.tie_embeddings and nemotron_h.runs_own_lm_head(ckpt):
        cfg = dataclasses.replace(cfg, tie_embeddings=False)  # run the file's own head, as transformers does
    sd = _family(hf).state_from_hf(ckpt, cfg)
    with torch.device("meta"):  # shapes only, no memory
        expected = {k: tuple(v.shape) for k, v in Decoder(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{path}: weights don't match config.json: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
    bad = [(k, tuple(sd[k].shape), s) for k, s in expected.items() if tuple(sd[k].shape) != s]
    if bad:
        k, got, want = bad[0]
        raise CheckpointError(f"{path}: tensor {k} has shape {got} but config.json implies {want} "
                              f"({len(bad)} mismatched tensors)")
    return cfg, sd


def from_hf(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Decoder:
    """Load a plain Hugging Face checkpoint folder (config.json + safetensors) as a nestlm Decoder. Packed
    FP8 / NVFP4 folders: nestlm.from_hf (nestlm.load), which dequantizes them."""
    if "quantization_config" in read_config(path):
        raise CheckpointError(f"{path} is a packed (quantized) checkpoint: load it with nestlm.from_hf, which "
                              "dequantizes it")
    cfg, sd = load_hf_state(path)
    with torch.device("meta"):
        model = Decoder(cfg)
    model.load_state_dict(sd, assign=True)
    model = model.to(device=device, dtype=dtype)
    model.source_dir = str(path)
    return model.eval()


def hf_tensors(model: Decoder, sub: SubArch | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(HF config dict, HF-named tensors) of the model or of its nested submodel `sub`."""
    cfg = sliced_config(model.cfg, sub)
    fam = FAMILIES[cfg.family]
    try:
        hf = fam.config_to_hf(cfg)
    except ConfigError as e:
        raise UnsupportedArchitecture(str(e)) from None
    sd = sliced_state_dict(model, sub)
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    hf["dtype"] = str(model.embeddings.weight.dtype).removeprefix("torch.")
    return hf, fam.state_to_hf(sd, cfg)


def to_hf(model: Decoder, out_dir: str | Path, sub: SubArch | None = None, overwrite: bool = False,
          tokenizer_dir: str | Path | None = None) -> Path:
    """Write the model (or the nested submodel `sub`) as a standard Hugging Face checkpoint, atomically.
    Tokenizer files are copied from `tokenizer_dir` (default: the folder the model was loaded from)."""
    hf, tensors = hf_tensors(model, sub)
    src = tokenizer_dir or getattr(model, "source_dir", None)
    return write_checkpoint(out_dir, hf, {k: v.cpu() for k, v in tensors.items()}, src_dir=src,
                            overwrite=overwrite)
