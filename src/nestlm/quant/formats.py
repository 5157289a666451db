"""Number formats, in pure torch (CPU and CUDA alike): FP8 E4M3 and NVFP4 (E2M1 values in blocks of 16 with
an E4M3 scale per block and an FP32 scale per tensor). Quantize, dequantize, pack, and fake-quantize with a
straight-through gradient.

    scale2 = nvfp4_tensor_scale(w.abs().amax())              # amax / (6 * 448)
    packed, block = nvfp4_quantize(w, scale2)                # uint8 [..., n/2], float8_e4m3fn [..., n/16]
    w_q = nvfp4_dequantize(packed, block, scale2)            # == fake_nvfp4(w, scale2), bit for bit

Conventions follow NVIDIA ModelOpt's NVFP4 export (the layout vLLM loads): a block's scale is
amax_block / (6 * scale2) rounded to E4M3 (1.0 for an all-zero block); values are x / (block * scale2)
rounded to the nearest E2M1 value, ties to the even code, saturating at 6; the sign is bit 3 of a code
(set for every negative input, also when it rounds to zero); two codes per byte, the element with the even
index in the low nibble.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

E4M3_MAX = 448.0
E2M1_MAX = 6.0
BLOCK = 16  # NVFP4 elements per E4M3 scale, along the input (last) dim
# E2M1 magnitudes of the codes 0..7; code | 8 is the negative
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # midpoints between consecutive magnitudes


@dataclass(frozen=True)
class Format:
    name: str  # nestlm's name: nvfp4 | fp8 | fp8_channel
    quant_algo: str  # the ModelOpt / vLLM quant_algo written to hf_quant_config.json
    block: int  # input channels per scale (the width granularity slicing must keep); 1: none
    act_max: float | None  # input_scale = activation amax / act_max; None: dynamic activations (no input_scale)


FORMATS = {
    "nvfp4": Format("nvfp4", "NVFP4", BLOCK, E2M1_MAX * E4M3_MAX),
    "fp8": Format("fp8", "FP8", 1, E4M3_MAX),  # per-tensor weight scale, static activation scale
    "fp8_channel": Format("fp8_channel", "FP8_PER_CHANNEL_PER_TOKEN", 1, None),  # per-row weight scale
}


def get_format(fmt: str | Format) -> Format:
    if isinstance(fmt, Format):
        return fmt
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; choose one of {sorted(FORMATS)}")
    return FORMATS[fmt]


def _expand(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-tensor scale with the leading dims of a stacked weight ([e] for [e, out, in]) -> broadcastable."""
    return s.reshape(tuple(s.shape) + (1,) * (like.dim() - s.dim()))


# ---------------------------------------------------------------------------------------------- FP8 E4M3
def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E4M3 value (ties to even), saturating at +-448 (some backends give NaN past it)."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """Weight or activation scale: amax / 448 (fp32), per tensor or per channel."""
    return amax.float() / E4M3_MAX


def fp8_quantize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w [..., out, in], scale per tensor ([...]) or per row ([..., out]) -> float8_e4m3fn codes."""
    s = _expand(scale.float(), w)
    x = torch.where(s > 0, w.float() / s, torch.zeros((), device=w.device))
    return to_e4m3(x)


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.float() * _expand(scale.float(), q)).to(dtype)


# ---------------------------------------------------------------------------------------------- E2M1
def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Float -> E2M1 codes (uint8 0..15): nearest magnitude, ties to the even code, saturating at 6."""
    a = x.float().abs()
    bounds = torch.tensor(E2M1_BOUNDS, device=x.device)
    code = torch.searchsorted(bounds, a)  # number of midpoints below |x|: a tie rounds down...
    tie = (a == bounds[code.clamp(max=len(E2M1_BOUNDS) - 1)]) & (code % 2 == 1)
    code = code + tie.long()  # ...unless that lands on an odd code
    return (code + 8 * (x < 0).long()).to(torch.uint8)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8) -> float32 values."""
    lut = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), device=codes.device)
    lut[8] = 0.0  # the code of a negative number that rounds to zero
    return lut[codes.long()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[..., n] codes -> [..., n/2] uint8: element 2i in the low nibble, 2i+1 in the high one."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., n/2] uint8 -> [..., n] codes."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


# ---------------------------------------------------------------------------------------------- NVFP4
def nvfp4_tensor_scale(amax: torch.Tensor) -> torch.Tensor:
    """The FP32 per-tensor scale (ModelOpt's weight_scale_2): amax / (6 * 448)."""
    return amax.float() / (E2M1_MAX * E4M3_MAX)


def nvfp4_block_scales(w: torch.Tensor, scale2: torch.Tensor) -> torch.Tensor:
    """w [..., out, in] -> E4M3 block scales [..., out, in/16]: amax_block / (6 * scale2), 1.0 where zero."""
    if w.shape[-1] % BLOCK:
        raise ValueError(f"NVFP4 needs an input width that is a multiple of {BLOCK}, got {w.shape[-1]}")
    bamax = w.float().unflatten(-1, (-1, BLOCK)).abs().amax(-1)  # [..., out, in/16]
    s2 = _expand(scale2.float(), bamax)
    s = torch.where(s2 > 0, bamax / (E2M1_MAX * s2), torch.zeros((), device=w.device))
    return to_e4m3(torch.where(s == 0, torch.ones((), device=w.device), s))


def _nvfp4_codes(w: torch.Tensor, block: torch.Tensor, scale2: torch.Tensor) -> torch.Tensor:
    """w [..., out, in] -> E2M1 codes [..., out, in] with the given block and tensor scales."""
    denom = (block.float() * _expand(scale2.float(), block)).unsqueeze(-1)  # [..., out, in/16, 1]
    x = w.float().unflatten(-1, (-1, BLOCK))
    x = torch.where(denom > 0, x / denom, torch.zeros((), device=w.device))  # a scale that underflowed: 0
    return e2m1_codes(x).flatten(-2)


def nvfp4_quantize(w: torch.Tensor, scale2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in], scale2 [...] -> (packed uint8 [..., out, in/2], block scales e4m3 [..., out, in/16])."""
    block = nvfp4_block_scales(w, scale2)
    return pack_nibbles(_nvfp4_codes(w, block, scale2)), block


def nvfp4_dequantize(packed: torch.Tensor, block: torch.Tensor, scale2: torch.Tensor,
                     dtype=torch.float32) -> torch.Tensor:
    """Inverse of nvfp4_quantize: [..., out, in/2] uint8 -> [..., out, in] values."""
    vals = e2m1_values(unpack_nibbles(packed)).unflatten(-1, (-1, BLOCK))  # [..., out, in/16, 16]
    scale = (block.float() * _expand(scale2.float(), block)).unsqueeze(-1)
    return (vals * scale).flatten(-2).to(dtype)


# ---------------------------------------------------------------------------------------------- fake quant
def _ste(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Forward: q exactly (q + 0); backward: identity to w (straight-through)."""
    return q.to(w.dtype) + (w - w.detach())


def fake_nvfp4(w: torch.Tensor, scale2: torch.Tensor) -> torch.Tensor:
    """dequantize(quantize(w)) with a straight-through gradient; scale2 is a constant (no gradient)."""
    with torch.no_grad():
        scale2 = scale2.detach()
        block = nvfp4_block_scales(w, scale2)
        vals = e2m1_values(_nvfp4_codes(w, block, scale2)).unflatten(-1, (-1, BLOCK))
        q = (vals * (block.float() * _expand(scale2.float(), block)).unsqueeze(-1)).flatten(-2)
    return _ste(q, w)


def fake_fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        q = fp8_dequantize(fp8_quantize(w, scale.detach()), scale.detach())
    return _ste(q, w)
