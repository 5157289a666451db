"""The plan of a packed cut: nestlm.slicing.plan's runs mapped onto a ModelOpt FP8 / NVFP4 folder's tensors.

    tensors = packed_plan(src, cfg, sub, fmt)       # OutTensors: codes, block scales, scalars, as stored

`plan` gives every output tensor of a submodel as index runs on the unpacked weights. On a packed weight the
same runs apply with the input (last) dim divided by 2 (two E2M1 codes a byte) for the codes and by 16 for
the NVFP4 block scales (whole blocks only); per-tensor scales (weight_scale, weight_scale_2, input_scale,
and the FP8 KV cache's k_scale / v_scale beside k_proj / v_proj) are copied as they are; per-row FP8 scales
follow the weight's rows. A module the source keeps unquantized (NVIDIA's mixed precision: its
exclude_modules) is cut like any plain tensor. nestlm.slicing.write streams the result like a plain plan.
"""

from __future__ import annotations

import dataclasses

import torch

from nestlm.errors import CheckpointError
from nestlm.model.config import ModelConfig
from nestlm.model.subarch import SubArch
from nestlm.quant.formats import BLOCK, Format
from nestlm.quant.packed import COMPANIONS, KV_SCALES, quantized_names
from nestlm.slicing.plan import OutTensor, Piece, plan


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


