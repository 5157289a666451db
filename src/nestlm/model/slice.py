"""Cut a nested submodel's weights out of the elastic model: the same prefixes the sliced forward uses,
as a standalone state dict for `Decoder(sliced_config(cfg, sub))`."""

from __future__ import annotations

import torch

from nestlm.arch import SubArch, sliced_config


def sliced_state_dict(model, sub: SubArch | None) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    s = model.resolve(sub)
    k = s.hidden
    out: dict[str, torch.Tensor] = {"embeddings.weight": model.embeddings.weight[:, :k]}
    for new_i, i in enumerate(s.layers):
        block = model.layers[i]
        pre = f"layers.{new_i}."
        out[pre + "norm.weight"] = block.norm.weight[:k]
        for name, t in _mixer(block, s, cfg).items():
            out[pre + "mixer." + name] = t
    out["norm_f.weight"] = model.norm_f.weight[:k]
    if model.lm_head is not None:
        out["lm_head.weight"] = model.lm_head.weight[:, :k]
    return {n: t.detach().contiguous().clone() for n, t in out.items()}


def _linear(m, rows, cols, prefix=""):
    d = {prefix + "weight": m.weight[:rows, :cols]}
    if m.bias is not None:
        d[prefix + "bias"] = m.bias[:rows]
    return d


def _mixer(block, s: SubArch, cfg) -> dict[str, torch.Tensor]:
    mx, k = block.mixer, s.hidden
    if block.kind == "-":
        return _mlp(mx, s.ffn, k)
    if block.kind == "*":
        d = {}
        q = mx._q_rows
        d["q_proj.weight"] = q(mx.q_proj.weight, s)[:, :k]
        kv = s.attn_kv_heads * mx.head_dim
        d.update(_linear(mx.k_proj, kv, k, "k_proj."))
        d.update(_linear(mx.v_proj, kv, k, "v_proj."))
        d["o_proj.weight"] = q(mx.o_proj.weight.T, s).T[:k]
        if mx.q_proj.bias is not None:
            d["q_proj.bias"] = q(mx.q_proj.bias, s)
            d["o_proj.bias"] = mx.o_proj.bias[:k]
        if mx.q_norm is not None:
            d["q_norm.weight"], d["k_norm.weight"] = mx.q_norm.weight, mx.k_norm.weight
        return d
    if block.kind == "M":
        m, p = s.mamba_heads_per_group, mx.p
        d = {"in_proj.weight": mx._in_proj(mx.in_proj.weight, m)[:, :k]}
        if mx.in_proj.bias is not None:
            d["in_proj.bias"] = mx._in_proj(mx.in_proj.bias, m)
        d["conv1d.weight"] = mx._conv(mx.conv1d.weight, m)
        if mx.conv1d.bias is not None:
            d["conv1d.bias"] = mx._conv(mx.conv1d.bias, m)
        for name in ("dt_bias", "A_log", "D"):
            d[name] = mx._heads(getattr(mx, name), m, 1)
        d["norm.weight"] = mx._heads(mx.norm.weight, m, p)
        d["out_proj.weight"] = mx._heads(mx.out_proj.weight, m, p, dim=1)[:k]
        if mx.out_proj.bias is not None:
            d["out_proj.bias"] = mx.out_proj.bias[:k]
        return d
    # MoE
    e, f = s.experts, s.moe_ffn
    d = {"gate.weight": mx.gate.weight[:e, :k], "up_proj": mx.up_proj[:e, :f, :k],
         "down_proj": mx.down_proj[:e, :k, :f]}
    if mx.e_score_correction_bias is not None:  # the sigmoid router's bias follows its rows
        d["e_score_correction_bias"] = mx.e_score_correction_bias[:e]
    if mx.gate_proj is not None:  # SwiGLU experts
        d["gate_proj"] = mx.gate_proj[:e, :f, :k]
    if mx.shared is not None:
        d.update({"shared." + n: t for n, t in _mlp(mx.shared, s.shared_ffn, k).items()})
    return d


def _mlp(mx, f, k):
    d = _linear(mx.up_proj, f, k, "up_proj.")
    if mx.gate_proj is not None:
        d.update(_linear(mx.gate_proj, f, k, "gate_proj."))
    d["down_proj.weight"] = mx.down_proj.weight[:k, :f]
    if mx.down_proj.bias is not None:
        d["down_proj.bias"] = mx.down_proj.bias[:k]
    return d


def extract(model, sub: SubArch | None):
    """A standalone Decoder holding exactly the submodel `sub` (same dtype and device)."""
    from nestlm.model.decoder import Decoder

    cfg = sliced_config(model.cfg, sub)
    small = Decoder(cfg).to(device=model.embeddings.weight.device, dtype=model.embeddings.weight.dtype)
    small.load_state_dict(sliced_state_dict(model, sub))
    return small
