"""The plan of a packed cut: nestlm.slicing.plan's runs mapped onto a ModelOpt FP8 / NVFP4 folder's tensors.

    tensors = packed_plan(src, cfg, sub, fmt)       # OutTensors: codes, block scales, scalars, as stored
    export_quantized(model, "out/nvfp4", "nvfp4", input_amax=calibrate(model, batches))   # a model, packed

`plan` gives every output tensor of a submodel as index runs on the unpacked weights. On a packed weight the
same runs apply with the input (last) dim divided by 2 (two E2M1 codes a byte) for the codes and by 16 for
the NVFP4 block scales (whole blocks only); per-tensor scales (weight_scale, weight_scale_2, input_scale,
and the FP8 KV cache's k_scale / v_scale beside k_proj / v_proj) are copied as they are; per-row FP8 scales
follow the weight's rows. A module the source keeps unquantized (NVIDIA's mixed precision: its
exclude_modules) is cut like any plain tensor. nestlm.slicing.write streams the result like a plain plan.

The packed writer: export_quantized packs a model in memory (its latent weights, the full model's scales)
and writes the ModelOpt folder, a budget cut out of the packed full tensors by the same plan.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from nestlm.arch import SubArch, sliced_config
from nestlm.convert import FAMILIES
from nestlm.errors import CheckpointError
from nestlm.io.safetensors import (
    QUANT_CONFIG,
    atomic_dir,
    copy_files,
    split_shards,
    write_shards,
    write_tensors,
)
from nestlm.io.tokenizer import TOKENIZER_FILES
from nestlm.model.config import ModelConfig
from nestlm.model.extract import sliced_state_dict
from nestlm.quant.fake import check_subarch, fake_quant_disabled
from nestlm.quant.formats import BLOCK, Format, get_format
from nestlm.quant.packed import COMPANIONS, KV_SCALES, Tensors, pack_weights, quant_configs, quantized_names
from nestlm.slicing.plan import OutTensor, Piece, plan

__all__ = ["export_quantized", "packed_plan", "slice_packed"]


class Logical:
    """A packed checkpoint's tensors seen with their unpacked shapes, for nestlm.slicing.plan."""

    def __init__(self, src, fmt: Format):
        self.src, self.fmt = src, fmt
        self.quantized = quantized_names(src.keys())

    def __contains__(self, k):
        return k in self.src

    def shape(self, k):
        s = list(self.src.shape(k))
        if k in self.quantized and self.fmt.name == "nvfp4":
            s[-1] *= 2
        return s

    def dtype(self, k):
        return torch.float32  # plan records it; packed_plan puts the file's dtypes back


def _scaled(idx: tuple, div: int, name: str) -> tuple:
    """The input-dim (last) slice of idx divided by div (2: nibbles, 16: block scales); whole blocks only."""
    last = idx[-1]
    a, b = last.start or 0, last.stop
    if a % BLOCK or (b is not None and b % BLOCK):
        raise CheckpointError(f"{name}: input columns {a}:{b} are not whole blocks of {BLOCK}")
    return idx[:-1] + (slice(a // div, None if b is None else b // div),)


def packed_plan(src, cfg: ModelConfig, s: SubArch, fmt: Format) -> list:
    """Every tensor of the packed submodel `s`: nestlm.slicing OutTensors whose pieces read the packed `src`
    (a Source / SafetensorsDir-like object with keys, shape, dtype, read)."""
    quantized = quantized_names(src.keys())
    out = []
    for t in plan(Logical(src, fmt), cfg, s):
        name = t.pieces[0].src
        base, out_base = name.removesuffix("weight"), t.name.removesuffix("weight")
        if name not in quantized:
            cut, comps = [dataclasses.replace(t, dtype=src.dtype(name))], KV_SCALES
        else:
            cut, comps = [_divided(t, t.name, name, 2 if fmt.name == "nvfp4" else 1, src.dtype(name))], \
                COMPANIONS + KV_SCALES
            if fmt.name == "nvfp4":
                cut.append(_divided(t, out_base + "weight_scale", base + "weight_scale", BLOCK,
                                    src.dtype(base + "weight_scale")))
            elif fmt.name == "fp8_channel":  # [out]: the rows of the weight
                rows = [Piece(base + "weight_scale", pc.idx[:1]) for pc in t.pieces] if t.dim == 0 \
                    else [Piece(base + "weight_scale", t.pieces[0].idx[:1])]
                cut.append(OutTensor(out_base + "weight_scale", rows, 0, (t.shape[0],),
                                     src.dtype(base + "weight_scale")))
        have = {c.name for c in cut}
        for comp in comps:  # per-tensor scalars, copied unchanged
            if out_base + comp not in have and base + comp in src:
                shape = tuple(src.shape(base + comp))
                if shape != ():
                    raise CheckpointError(f"{base + comp}: expected a per-tensor scalar, got shape {list(shape)}")
                cut.append(OutTensor(out_base + comp, [Piece(base + comp, ())], 0, (), src.dtype(base + comp)))
        out += cut
    return out


def _divided(t, out_name: str, src_name: str, div: int, dtype: torch.dtype):
    """OutTensor t of the unpacked plan read from `src_name` with the input dim divided by div."""
    pieces = [Piece(src_name, _scaled(pc.idx, div, src_name) if div > 1 else pc.idx) for pc in t.pieces]
    return OutTensor(out_name, pieces, t.dim, t.shape[:-1] + (t.shape[-1] // div,), dtype)


def materialize(src, t) -> torch.Tensor:
    """One OutTensor read into memory (for in-memory sources; files are streamed by nestlm.slicing)."""
    parts = [src.read(pc.src, pc.idx) for pc in t.pieces]
    return (torch.cat(parts, dim=t.dim) if len(parts) > 1 else parts[0]).contiguous()


def slice_packed(src, cfg, s: SubArch, fmt: Format) -> dict[str, torch.Tensor]:
    """Every HF tensor of the submodel s cut out of the packed full tensors `src` (in memory)."""
    return {t.name: materialize(src, t) for t in packed_plan(src, cfg, s, fmt)}


# ---------------------------------------------------------------------------------------------- the packed writer
def _hf_tensors(model, packed: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF-named tensors of the full model with the packed weights and their companions in place; the other
    floating-point tensors in `dtype`."""
    cfg = model.cfg
    fam = FAMILIES[cfg.family]
    with fake_quant_disabled(model):
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sliced_state_dict(model, None).items()}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    sd.update({name: d["weight"] for name, d in packed.items()})
    out = fam.state_to_hf(sd, cfg)
    for comp in COMPANIONS:  # the converter names each companion as the weight it belongs to
        part = {name: d[comp] for name, d in packed.items() if comp in d}
        if not part:
            continue
        part["lm_head.weight"] = torch.empty(0)  # (Nemotron-H would otherwise copy the embeddings)
        for k, v in fam.state_to_hf(part, cfg).items():
            if k != "lm_head.weight":
                out[k.removesuffix("weight") + comp] = v
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def _write(out: Path, hf: dict, tensors: dict[str, torch.Tensor], fmt: Format, weight_only: bool,
           src_dir: str | Path | None, extra: dict[str, object], copy: tuple[str, ...], overwrite: bool,
           max_shard_bytes: int = 4 << 30) -> Path:
    """config.json (with quantization_config), hf_quant_config.json, safetensors shards, tokenizer files and
    `copy` copied from src_dir, and the JSON files `extra`, written atomically."""
    hq, qc = quant_configs(fmt, tensors, weight_only)
    hf = dict(hf, quantization_config=qc)
    with atomic_dir(Path(out), overwrite, inputs=(src_dir,)) as tmp:
        items = list(tensors.items())
        shards = split_shards(items, lambda kv: kv[1].nbytes, max_shard_bytes)
        write_shards(tmp, shards, lambda fp, sh: write_tensors(fp, dict(sh), {"format": "pt"}),
                     lambda sh: [k for k, _ in sh], sum(v.nbytes for _, v in items))
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        (tmp / QUANT_CONFIG).write_text(json.dumps(hq, indent=2))
        copy_files(src_dir, tmp, TOKENIZER_FILES + copy)
        for name, obj in extra.items():
            (tmp / name).write_text(json.dumps(obj, indent=2))
    return Path(out)


def export_quantized(model, out_dir: str | Path, fmt: str | Format = "nvfp4", sub: SubArch | None = None,
                     input_amax: dict[str, torch.Tensor] | None = None, tokenizer_dir: str | Path | None = None,
                     overwrite: bool = False, copy: tuple[str, ...] = (), extra: dict | None = None,
                     dtype: torch.dtype | None = None) -> Path:
    """Write the model (or its submodel `sub`) as a packed checkpoint. Per-tensor scales come from the FULL
    model's latent weights; `sub` is cut out of the packed full tensors. input_amax (from `calibrate`) gives
    input_scale; without it NVFP4 is written weight-only (W4A16_NVFP4) and FP8 (static activation scales)
    is refused. dtype: of the tensors that stay unquantized (default: the model's). Tokenizer files (and the
    file names in `copy`) are copied from tokenizer_dir (default: the folder the model was loaded from);
    `extra` {file name: JSON object} is written beside."""
    fmt = get_format(fmt)
    cfg = model.cfg
    check_subarch(cfg, None, fmt)
    if fmt.name == "fp8" and input_amax is None:
        raise ValueError("fp8 stores a static activation scale: pass input_amax from calibrate(), or use "
                         "fp8_channel (dynamic per-token activations)")
    dtype = dtype or model.embeddings.weight.dtype
    tensors = _hf_tensors(model, pack_weights(model, fmt, input_amax), dtype)
    out_cfg = cfg
    if sub is not None and sub.resolve(cfg) != SubArch.full(cfg):
        s = sub.resolve(cfg)
        check_subarch(cfg, s, fmt)
        tensors = slice_packed(Tensors(tensors), cfg, s, fmt)
        out_cfg = sliced_config(cfg, s)
    hf = FAMILIES[cfg.family].config_to_hf(out_cfg)
    hf["dtype"] = str(dtype).removeprefix("torch.")
    src = tokenizer_dir or getattr(model, "source_dir", None)
    weight_only = fmt.act_max is not None and input_amax is None
    return _write(Path(out_dir), hf, tensors, fmt, weight_only, src, extra or {}, copy, overwrite)
