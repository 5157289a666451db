"""The ModelOpt packed layout (what vLLM's modelopt / modelopt_fp4 loaders read): packing a model's weights,
cutting a budget out of packed tensors, the quantization configs, and unpacking.

On disk, per quantized Linear (HF tensor names, as nestlm.convert writes them; one set per MoE expert):
    NVFP4: weight uint8 [out, in/2] (two E2M1 codes a byte, even index low), weight_scale float8_e4m3fn
           [out, in/16], weight_scale_2 fp32 [] (amax / (6*448)), input_scale fp32 [] (act amax / (6*448))
    FP8:   weight float8_e4m3fn [out, in], weight_scale fp32 [] (amax / 448), input_scale fp32 [] (act amax / 448)
    FP8_PER_CHANNEL_PER_TOKEN (fp8_channel): weight_scale fp32 [out], no input_scale (dynamic per token)
plus hf_quant_config.json and config.json's quantization_config (quant_method "modelopt"). Every other
tensor is written as is and listed in exclude_modules.

A budget is cut out of packed tensors by nestlm.slicing.plan's runs (the one slicing rule), halved for the
nibbles and divided by 16 for the block scales: exactly the budget quantized with the parent's per-tensor
scales (blocks are whole).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from nestlm.arch import PAIRED_FAMILIES, SubArch
from nestlm.errors import CheckpointError
from nestlm.model.config import ModelConfig
from nestlm.quant.fake import (
    quantized_weights,
    weight_scales,
)
from nestlm.quant.formats import (
    BLOCK,
    FORMATS,
    Format,
    fp8_dequantize,
    fp8_quantize,
    get_format,
    nvfp4_dequantize,
    nvfp4_quantize,
)

COMPANIONS = ("weight_scale", "weight_scale_2", "input_scale")  # tensors beside a quantized `X.weight`
KV_SCALES = ("k_scale", "v_scale")  # FP8 KV cache (kv_cache_quant_algo FP8): beside k_proj / v_proj
ALGO_FORMAT = {f.quant_algo: f.name for f in FORMATS.values()} | {"W4A16_NVFP4": "nvfp4"}


def pack_weights(model, fmt: str | Format, input_amax: dict[str, torch.Tensor] | None = None) -> dict:
    """{weight name: {"weight": packed, "weight_scale": ..., ...}} for every quantized weight of the FULL
    model, from its latent weights (fake quantization, if any, is bypassed). Stacked experts keep their
    leading [experts] dim on every tensor (scalars become [experts])."""
    fmt = get_format(fmt)
    scales = weight_scales(model, fmt)
    out = {}
    with torch.no_grad():
        for q in quantized_weights(model):
            w, s = q.latent().detach(), scales[q.name]
            if fmt.name == "nvfp4":
                packed, block = nvfp4_quantize(w, s)
                d = {"weight": packed, "weight_scale": block, "weight_scale_2": s}
            else:
                d = {"weight": fp8_quantize(w, s), "weight_scale": s}
            if fmt.act_max is not None and input_amax is not None:
                a = input_amax[q.name].to(s.device).float()
                if (a <= 0).any():
                    raise ValueError(f"calibration never reached the input of {q.name}: no input_scale")
                d["input_scale"] = a / fmt.act_max
            out[q.name] = d
    return out


def quantized_names(keys) -> set[str]:
    return {k.removesuffix("_scale") for k in keys if k.endswith(".weight_scale")}


class Tensors:
    """A dict of tensors with SafetensorsDir's reading interface."""

    def __init__(self, d: dict[str, torch.Tensor]):
        self.d = d

    def keys(self):
        return list(self.d)

    def __contains__(self, k):
        return k in self.d

    def get(self, k):
        return self.d[k]

    def shape(self, k):
        return list(self.d[k].shape)

    def read(self, k, idx):
        return self.d[k][idx]

    def dtype(self, k):
        return self.d[k].dtype


def _layer_map(cfg: ModelConfig, s: SubArch) -> dict[int, int]:
    """{source HF layer index: its index in the cut} for the kept layers (paired families: layer = 2 blocks)."""
    if cfg.family in PAIRED_FAMILIES:
        kept = sorted({i // 2 for i in s.layers})
    else:
        kept = list(s.layers)
    return {old: new for new, old in enumerate(kept)}


def renumber_modules(modules: list[str], cfg: ModelConfig, s: SubArch) -> list[str]:
    """Module names (an exclude list) for the cut `s`: names inside a dropped layer go, names inside a kept
    layer get its new index; any other entry (lm_head, a wildcard) stays as it is."""
    new = _layer_map(cfg, s)
    out = []
    for mod in modules:
        m = re.match(r"^((?:backbone|model)\.layers\.)(\d+)(\..*)?$", mod)
        if not m:
            out.append(mod)
        elif int(m[2]) in new:
            out.append(f"{m[1]}{new[int(m[2])]}{m[3] or ''}")
    return out


def cut_quant_configs(hq: dict, qc: dict, cfg: ModelConfig, s: SubArch) -> tuple[dict, dict]:
    """The source's hf_quant_config.json and config.json quantization_config for the cut `s`: every setting
    kept (producer, quant_algo, kv_cache_quant_algo, group_size, ...), the module lists renumbered."""
    hq = dict(hq)
    if isinstance(hq.get("quantization"), dict):
        q = dict(hq["quantization"])
        if isinstance(q.get("exclude_modules"), list):
            q["exclude_modules"] = renumber_modules(q["exclude_modules"], cfg, s)
        hq["quantization"] = q
    qc = dict(qc)
    for key in ("exclude_modules", "ignore"):
        if isinstance(qc.get(key), list):
            qc[key] = renumber_modules(qc[key], cfg, s)
    return hq, qc


def quant_configs(fmt: Format, tensors: dict, weight_only: bool) -> tuple[dict, dict]:
    """(hf_quant_config.json, config.json's quantization_config), as ModelOpt's HF export writes them."""
    from nestlm import __version__

    quantized = quantized_names(tensors)
    exclude = sorted(k.removesuffix(".weight") for k in tensors if k.endswith(".weight") and k not in quantized)
    algo = "W4A16_NVFP4" if fmt.name == "nvfp4" and weight_only else fmt.quant_algo
    producer = {"name": "nestlm", "version": __version__}
    quantization = {"quant_algo": algo, "kv_cache_quant_algo": None, "exclude_modules": exclude}
    bits = {"num_bits": 4 if fmt.name == "nvfp4" else 8, "type": "float"}
    weights = {"dynamic": False, **bits}
    acts = None if weight_only else {"dynamic": fmt.act_max is None, **bits}
    if fmt.name == "nvfp4":
        quantization["group_size"] = BLOCK
        weights["group_size"] = BLOCK
        acts = acts and {**acts, "group_size": BLOCK}
    if fmt.name == "fp8_channel":
        weights["strategy"], acts["strategy"] = "channel", "token"
    qc = {"quant_method": "modelopt", "quant_algo": algo, "producer": producer, "ignore": exclude,
          "kv_cache_scheme": None, "config_groups": {"group_0": {"weights": weights, "input_activations": acts}}}
    if fmt.name == "nvfp4":
        qc["group_size"] = BLOCK
    return {"producer": producer, "quantization": quantization}, qc


def format_of(hf: dict, path: Path) -> tuple[Format, bool]:
    """(format, weight only) of a packed checkpoint's config.json."""
    qc = hf.get("quantization_config")
    if not isinstance(qc, dict) or not str(qc.get("quant_method", "")).startswith("modelopt"):
        raise CheckpointError(f"{path}: config.json has no ModelOpt quantization_config (not a packed "
                              "checkpoint; load a plain one with nestlm.from_hf)")
    algo = str(qc.get("quant_algo", "")).upper()
    if algo not in ALGO_FORMAT:
        raise CheckpointError(f"{path}: quant_algo {algo!r} is not one nestlm reads ({sorted(ALGO_FORMAT)})")
    return FORMATS[ALGO_FORMAT[algo]], algo == "W4A16_NVFP4"


def dequantize_state(tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """HF-named packed tensors -> HF-named plain tensors: quantized weights dequantized, their companions
    dropped, every floating tensor in `dtype`."""
    quantized = quantized_names(tensors)
    out = {}
    for k, v in tensors.items():
        if any(k.endswith("." + c) for c in COMPANIONS) and k.rsplit(".", 1)[0] + ".weight" in quantized:
            continue
        if k.endswith(tuple("." + c for c in KV_SCALES)):  # the FP8 KV cache's scales: not used here
            continue
        if k in quantized:
            base = k.removesuffix("weight")
            if v.dtype == torch.uint8:
                v = nvfp4_dequantize(v, tensors[base + "weight_scale"], tensors[base + "weight_scale_2"], dtype)
            else:
                v = fp8_dequantize(v, tensors[base + "weight_scale"], dtype)
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return out
