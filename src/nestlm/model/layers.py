"""The four block mixers of the hybrid decoder, in plain PyTorch, with explicit elastic widths.

Every forward takes the already-resolved `SubArch` `s` and cuts its weights by the one slicing rule,
declared per mixer in `nestlm.model.layout` (`self.tensors`): prefixes of the hidden side, the first heads
of each group for attention and Mamba, the first experts / FFN channels. With the full SubArch every cut is
the whole tensor (no copy, no autograd node). Parameter names follow Hugging Face Nemotron-H
(Llama's gate/up/down for SwiGLU), so converters are mostly renames.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nestlm.device import own_precision
from nestlm.model import layout
from nestlm.model.config import ModelConfig
from nestlm.model.layout import prefix, take
from nestlm.model.ssd import ssd_chunked, ssm_step
from nestlm.model.subarch import SubArch

__all__ = ["MLP", "Attention", "Mamba2", "MoE", "RMSNorm", "masked_rms_norm", "prefix", "rms_norm", "take"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x (width k), with weight[:k]; statistics in fp32."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (weight[: x.shape[-1]].float() * x).to(dtype)


def masked_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, mask: torch.Tensor) -> torch.Tensor:
    """RMSNorm of x [..., d] whose channels are scaled by `mask` [d] (soft elastic width): the mean square is
    taken over the k_eff = sum(mask) kept channels (sum / k_eff = mean_d * d / k_eff; equivalently rsqrt scaled
    by sqrt(k_eff / d) with eps * k_eff / d), so a 0/1 mask gives exactly the RMSNorm of the first k channels
    (and zeros after them)."""
    dtype, d = x.dtype, x.shape[-1]
    k_eff = mask[:d].float().sum()
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) * (d / k_eff) + eps)  # mean over the kept channels
    return (weight[:d].float() * x).to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # x: [..., k], k <= dim: the norm of the prefix uses weight[:k]
        return rms_norm(x, self.weight, self.eps)


class _Sliced(nn.Module):
    """A mixer whose weights are cut by the declared layout (nestlm.model.layout): `self.tensors` declares
    every tensor once; `cuts(key, values)` gives {tensor: Cut} at some widths, built once per key."""

    def __init__(self, tensors: dict):
        super().__init__()
        self.tensors = tensors
        self._cuts: dict = {}

    def cuts(self, key, values) -> dict:
        c = self._cuts.get(key)
        if c is None:
            v = values() if callable(values) else values
            c = self._cuts[key] = {n: layout.cut(d, v) for n, d in self.tensors.items()}
        return c

    def sub_cuts(self, s: SubArch) -> dict:
        return self.cuts(s, lambda: layout.axis_values(s))


def _linear(x, m: nn.Linear, c: dict, name: str):
    """F.linear with module m's weight and bias cut to the layout's `name.weight` / `name.bias`."""
    b = take(m.bias, c[name + ".bias"]) if m.bias is not None else None
    return F.linear(x, take(m.weight, c[name + ".weight"]), b)


# ---------------------------------------------------------------------------------------------- attention
def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, device, dtype=torch.float32):
    """positions: [t] -> cos, sin: [t, head_dim] (halves repeated, as rotate_half expects)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = positions.to(device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):  # x: [b, heads, t, d]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(_Sliced):
    """GQA self-attention. Elastic: first `attn_kv_heads` KV groups, first `attn_heads_per_group` query heads
    of each group, first `hidden` input/output channels (nestlm.model.layout.attention_tensors)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(layout.attention_tensors(cfg))
        d, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=cfg.attn_bias)
        self.probe = None  # importance estimation observes activations through this callable
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.norm_eps)
            self.k_norm = RMSNorm(hd, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, s: SubArch, cache: dict | None, rope, masks: dict | None = None):
        b, t, k = x.shape
        g, h, hd = s.attn_kv_heads, s.attn_heads_per_group, self.head_dim
        c = self.sub_cuts(s)
        q = _linear(x, self.q_proj, c, "q_proj")  # [b, t, g*h*hd]
        kk = _linear(x, self.k_proj, c, "k_proj")  # [b, t, g*hd]
        v = _linear(x, self.v_proj, c, "v_proj")
        q = q.view(b, t, g * h, hd)
        kk = kk.view(b, t, g, hd)
        if self.q_norm is not None:
            q, kk = self.q_norm(q), self.k_norm(kk)
        q, kk, v = q.transpose(1, 2), kk.transpose(1, 2), v.view(b, t, g, hd).transpose(1, 2)  # [b, heads, t, hd]
        if rope is not None:
            cos, sin = rope
            q, kk = apply_rope(q, cos, sin), apply_rope(kk, cos, sin)

        if isinstance(cache, Segments):  # packed rows (nestlm.model.decoder.Rows): each segment its own K/V
            parts, at = [], 0
            for layer, n in zip(cache.layers, cache.lengths, strict=True):
                parts.append(_attend(q[:, :, at:at + n], kk[:, :, at:at + n], v[:, :, at:at + n], layer, h > 1))
                at += n
            out = torch.cat(parts, dim=2)  # [1, g*h, T, hd]
        else:
            out = _attend(q, kk, v, cache, h > 1)
        return self._out(out, masks, b, t, g, h, hd, c)

    def _out(self, out, masks, b, t, g, h, hd, c):  # out [b, g*h, t, hd] -> [b, t, k]
        if masks is not None and "attn_heads_per_group" in masks:  # soft width: scale each head's output
            out = out * masks["attn_heads_per_group"][:h].repeat(g).to(out.dtype)[None, :, None, None]
        if self.probe is not None:
            self.probe("heads", out)  # [b, g*h, t, hd]
        out = out.transpose(1, 2).reshape(b, t, g * h * hd)
        return _linear(out, self.o_proj, c, "o_proj")  # o_proj columns follow q's head layout


def _attend(q, kk, v, cache: dict | None, gqa: bool):
    """Causal attention of q over the cache's K/V and the new kk, v ([b, heads, t, hd]; appended to the
    cache): [b, g*h, t, hd]."""
    t = q.shape[2]
    if cache is not None:
        kk, v, past = _kv_cache_append(cache, kk, v)
    else:
        past = 0
    if t == 1 or (past == 0 and t == kk.shape[2]):
        mask, causal = None, t > 1
    else:  # prefill on top of a cache: causal with an offset
        q_pos = torch.arange(past, past + t, device=q.device)[:, None]
        mask = torch.arange(kk.shape[2], device=q.device)[None, :] <= q_pos
        causal = False
    return F.scaled_dot_product_attention(q, kk, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


class Segments:
    """What a mixer gets from nestlm.model.decoder.Rows: the tokens x [1, T, k] are b sequences packed one
    after the other (`lengths`, summing to T), each with its own cache dict (`layers`) for this block."""

    def __init__(self, layers: list[dict], lengths: list[int]):
        self.layers, self.lengths = layers, lengths


def _kv_cache_append(cache: dict, k, v):
    """Append k, v ([b, g, t, hd]) to a growing preallocated cache. Returns the full k, v and the old length."""
    t = k.shape[2]
    past = cache.get("len", 0)
    buf_k = cache.get("k")
    if buf_k is None or buf_k.shape[2] < past + t:
        cap = max(past + t, 2 * (buf_k.shape[2] if buf_k is not None else 0), 64)
        new_k = k.new_zeros(k.shape[0], k.shape[1], cap, k.shape[3])
        new_v = torch.zeros_like(new_k)
        if past:
            new_k[:, :, :past] = cache["k"][:, :, :past]
            new_v[:, :, :past] = cache["v"][:, :, :past]
        cache["k"], cache["v"] = new_k, new_v
    cache["k"][:, :, past:past + t] = k
    cache["v"][:, :, past:past + t] = v
    cache["len"] = past + t
    return cache["k"][:, :, :past + t], cache["v"][:, :, :past + t], past


# ---------------------------------------------------------------------------------------------- MLP
class MLP(_Sliced):
    """ReLU² (Nemotron-H: down(relu(up x)²)) or SwiGLU (Llama: down(silu(gate x) * up x)).
    Elastic: first `width` intermediate channels (the layout's `axis`: ffn, or a MoE's shared_ffn), first
    `hidden` channels."""

    def __init__(self, d: int, f: int, act: str, bias: bool, axis: str = "ffn"):
        super().__init__(layout.mlp_tensors(d, f, act == "swiglu", bias, axis))
        self.act, self.axis = act, axis
        self.probe = None
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.gate_proj = nn.Linear(d, f, bias=bias) if act == "swiglu" else None
        self.down_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x, width: int, mask: torch.Tensor | None = None):
        k = x.shape[-1]
        c = self.cuts((width, k), {"hidden": k, self.axis: width})
        up = _linear(x, self.up_proj, c, "up_proj")  # [b, t, width]
        if self.gate_proj is not None:
            hmid = F.silu(_linear(x, self.gate_proj, c, "gate_proj")) * up
        else:
            hmid = torch.relu(up).square()
        if mask is not None:  # soft width: [f] channel mask
            hmid = hmid * mask[:width].to(hmid.dtype)
        if self.probe is not None:
            self.probe("ffn", hmid)  # [b, t, width]
        return _linear(hmid, self.down_proj, c, "down_proj")


# ---------------------------------------------------------------------------------------------- MoE
class MoE(_Sliced):
    """Top-k routed experts, no bias on the experts. Two router / expert variants (cfg.moe_router, moe_act):

    sigmoid + relu2 (Nemotron-H, DeepSeek-V3): sigmoid scores, a score-correction bias used only for the
        choice, optional group-limited routing, ReLU² experts down(relu(up x)²), optional shared expert;
    softmax + swiglu (Qwen3-MoE, Mixtral): softmax over the router logits, SwiGLU experts
        down(silu(gate x) * up x). Mixtral's softmax over the top-k logits is the same as renormalising the
        top-k of the full softmax (norm_topk_prob).

    Expert weights are stacked parameters `up_proj`, `gate_proj` (SwiGLU only) [E, F, D] and `down_proj`
    [E, D, F]. Elastic: first `experts` experts (router rows and correction bias with them: the softmax is
    over the kept experts), first `moe_ffn` channels of each expert, first `shared_ffn` channels of the
    shared expert, first `hidden` channels."""

    def __init__(self, cfg: ModelConfig):
        super().__init__({n: d for n, d in layout.moe_tensors(cfg).items() if not n.startswith("shared.")})
        d, e, f = cfg.hidden_size, cfg.n_experts, cfg.moe_intermediate_size
        self.top_k, self.n_groups, self.topk_groups = cfg.top_k, cfg.n_expert_groups, cfg.topk_groups
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling
        self.softmax = cfg.moe_router == "softmax"
        self.gate = nn.Linear(d, e, bias=False)
        self.register_buffer("e_score_correction_bias", None if self.softmax else torch.zeros(e))
        self.probe = None
        self.up_proj = nn.Parameter(torch.empty(e, f, d))  # [expert, out, in]
        self.down_proj = nn.Parameter(torch.empty(e, d, f))
        swiglu = cfg.moe_act == "swiglu"
        self.register_parameter("gate_proj", nn.Parameter(torch.empty(e, f, d)) if swiglu else None)
        self.shared = MLP(d, cfg.shared_intermediate_size, "relu2", cfg.mlp_bias, "shared_ffn") \
            if cfg.shared_intermediate_size else None

    def _cut(self, n_exp: int, f: int, k: int) -> dict:
        return self.cuts((n_exp, f, k), {"experts": n_exp, "moe_ffn": f, "hidden": k})

    @own_precision  # router logits in fp32 also under bf16 autocast (the expert choice)
    def route(self, x: torch.Tensor, n_exp: int, mask: torch.Tensor | None = None):
        """x: [n, k] -> weights [n, top_k] (fp32), expert ids [n, top_k].
        mask [n_exp] (soft experts): experts with mask 0 are never chosen, the others' weights are scaled."""
        c = self._cut(n_exp, self.up_proj.shape[1], x.shape[-1])
        logits = F.linear(x.float(), take(self.gate.weight, c["gate.weight"]).float())
        if mask is not None:
            mask = mask[:n_exp].float()
        if self.softmax:  # probabilities over the kept (unmasked) experts; the choice is by probability
            if mask is not None:
                logits = logits.masked_fill(mask == 0, float("-inf"))
            scores = logits.softmax(-1)
            choice = scores
        else:
            scores = logits.sigmoid()
            choice = scores + take(self.e_score_correction_bias, c["e_score_correction_bias"]).float()
            if mask is not None:
                choice = choice.masked_fill(mask == 0, float("-inf"))
        if mask is not None:
            scores = scores * mask
        top_k = min(self.top_k, n_exp)
        if self.n_groups > 1:  # keep the best `topk_groups` groups, scored by their two best experts
            grouped = choice.view(-1, self.n_groups, n_exp // self.n_groups)
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(self.topk_groups, -1).indices, 1)
            choice = choice.masked_fill(~keep.bool().repeat_interleave(n_exp // self.n_groups, 1), float("-inf"))
        idx = choice.topk(top_k, dim=-1).indices
        w = scores.gather(1, idx)
        if self.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * self.scaling, idx

    def expert_weights(self, n_exp: int, f: int, k: int) -> tuple[list, list, list]:
        """Per-expert weight views (up [f, k], gate [f, k] or None, down [k, f]) of the first n_exp experts.
        Each stacked parameter is cut and split once per forward (indexing it per expert would give each
        expert its own full-size zero gradient, and re-run any parametrization per expert)."""
        c = self._cut(n_exp, f, k)
        up = take(self.up_proj, c["up_proj"]).unbind(0)
        down = take(self.down_proj, c["down_proj"]).unbind(0)
        gate = take(self.gate_proj, c["gate_proj"]).unbind(0) if self.gate_proj is not None else [None] * n_exp
        return up, gate, down

    def expert(self, x: torch.Tensor, up: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """An expert's intermediate activation (the input of down_proj) for tokens x [n, k]: [n, f]."""
        u = F.linear(x, up)
        if gate is not None:
            return F.silu(F.linear(x, gate)) * u
        return torch.relu(u).square()

    def forward(self, x, s: SubArch, masks: dict | None = None):
        shape, k = x.shape, x.shape[-1]
        xf = x.reshape(-1, k)
        masks = masks or {}
        w, idx = self.route(xf, s.experts, masks.get("experts"))
        f = s.moe_ffn
        ffn_mask = masks.get("moe_ffn")
        if xf.shape[0] == 1 and ffn_mask is None and self.probe is None:  # decoding one token: no grouping
            c = self._cut(s.experts, f, k)  # views of the stacked weights (no grad while decoding)
            up, down = take(self.up_proj, c["up_proj"]), take(self.down_proj, c["down_proj"])
            gate = take(self.gate_proj, c["gate_proj"]) if self.gate_proj is not None else None
            out = sum(F.linear(self.expert(xf, up[e], gate[e] if gate is not None else None), down[e])
                      * w[:, j:j + 1].to(xf.dtype) for j, e in enumerate(idx[0].tolist()))
        else:
            out = self._grouped(xf, w, idx, s.experts, f, ffn_mask).to(x.dtype)
        out = out.view(shape)
        if self.shared is not None:
            out = out + self.shared(x, s.shared_ffn, masks.get("shared_ffn"))
        return out

    def _grouped(self, xf, w, idx, n_exp: int, f: int, ffn_mask):
        """Routed experts for many tokens: group the (token, slot) pairs by expert, then one set of matmuls per
        expert that got tokens. xf [n, k], w / idx [n, top_k] -> fp32 [n, k]."""
        k = xf.shape[-1]
        out = torch.zeros_like(xf, dtype=torch.float32)
        flat = idx.reshape(-1)
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=n_exp).tolist()
        tok = order // idx.shape[1]
        wts = w.reshape(-1)[order]
        ups, gates, downs = self.expert_weights(n_exp, f, k)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            ti = tok[start:start + n]
            hmid = self.expert(xf[ti], ups[e], gates[e])
            if ffn_mask is not None:
                hmid = hmid * ffn_mask[:f].to(hmid.dtype)
            y = F.linear(hmid, downs[e])
            if self.probe is not None:
                self.probe("expert", (e, hmid, y, wts[start:start + n]))  # [n, f], [n, k], [n]
            out.index_add_(0, ti, (y * wts[start:start + n, None]).float())
            start += n
        return out


# ---------------------------------------------------------------------------------------------- Mamba2
class Mamba2(_Sliced):
    """Mamba2 mixer (Nemotron-H layout). in_proj rows are [z | x | B | C | dt], conv1d channels [x | B | C].
    Elastic: first `mamba_heads_per_group` heads of every group (z, x, dt, A_log, D, dt_bias, the gated
    norm and out_proj follow the heads; B and C belong to groups and are kept whole), first `hidden`
    channels (nestlm.model.layout.mamba_tensors)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(layout.mamba_tensors(cfg))
        d, h, p, g, n = cfg.hidden_size, cfg.mamba_heads, cfg.mamba_head_dim, cfg.mamba_groups, cfg.ssm_state
        self.h, self.p, self.g, self.n = h, p, g, n
        self.kernel, self.chunk, self.dt_min, self.eps = cfg.conv_kernel, cfg.chunk_size, cfg.dt_min, cfg.norm_eps
        conv_dim = cfg.mamba_conv_dim
        self.in_proj = nn.Linear(d, 2 * h * p + 2 * g * n + h, bias=cfg.mamba_bias)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, cfg.conv_kernel, groups=conv_dim, bias=cfg.conv_bias,
                                padding=cfg.conv_kernel - 1)
        self.dt_bias = nn.Parameter(torch.ones(h))
        a = torch.log(torch.arange(1, h + 1, dtype=torch.float32, device="cpu"))  # on meta: imports torch._dynamo
        self.A_log = nn.Parameter(a.to(torch.get_default_device()))
        self.D = nn.Parameter(torch.ones(h))
        self.norm = RMSNorm(h * p, cfg.norm_eps)  # gated, grouped: one RMS per group of heads
        self.probe = None
        self.out_proj = nn.Linear(h * p, d, bias=cfg.mamba_bias)

    def forward(self, x, s: SubArch, cache: dict | None, masks: dict | None = None):
        b, t, k = x.shape
        m = s.mamba_heads_per_group
        hk, p, g, n = m * self.g, self.p, self.g, self.n  # hk: heads kept
        c = self.sub_cuts(s)
        zxbcdt = _linear(x, self.in_proj, c, "in_proj")  # [b, t, 2*hk*p + 2*g*n + hk]
        z, xbc, dt = zxbcdt.split([hk * p, hk * p + 2 * g * n, hk], dim=-1)

        if isinstance(cache, Segments):
            y = self._packed(xbc, dt, cache, c, hk)
        else:
            y = self._conv_ssm(xbc, dt, cache, c, hk)  # [b, t, hk*p]
        hm = masks.get("mamba_heads_per_group") if masks is not None else None

        # gated RMSNorm, grouped: statistics over each group's kept heads, never across groups
        nw = take(self.norm.weight, c["norm.weight"])
        yg = (y.float() * F.silu(z.float())).view(b, t, g, m * p)
        if hm is None:
            yg = yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + self.eps)
        else:  # soft width: scale each head's y, then re-scale the group statistics to the kept channels
            hm = hm[:m].float()
            yg = (yg.view(b, t, g, m, p) * hm[:, None]).view(b, t, g, m * p)
            k_eff = hm.sum() * p
            yg = yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) * (m * p / k_eff) + self.eps)
        y = (nw * yg.reshape(b, t, hk * p).to(x.dtype))
        if self.probe is not None:
            self.probe("heads", y)  # [b, t, hk*p]

        return _linear(y, self.out_proj, c, "out_proj")

    def _conv_ssm(self, xbc, dt, cache: dict | None, c: dict, hk: int):
        """The causal conv and the SSM scan of one batch: xbc [b, t, c], dt [b, t, hk] (raw) -> y [b, t, hk*p];
        the cache's conv window and SSM state advance."""
        b, t, _ = xbc.shape
        p, g, n = self.p, self.g, self.n
        # causal depthwise conv over [x | B | C], with the last kernel-1 inputs carried in the cache
        cw = take(self.conv1d.weight, c["conv1d.weight"])[:, 0]  # [conv_dim_k, kernel]
        cb = take(self.conv1d.bias, c["conv1d.bias"]) if self.conv1d.bias is not None else None
        xbc = xbc.transpose(1, 2)  # [b, c, t]
        K = self.kernel
        if t == 1 and cache is not None and "conv" in cache:  # decoding: one window, a multiply-and-sum
            win = torch.cat([cache["conv"], xbc], dim=-1)  # [b, c, K]
            cache["conv"] = win[:, :, 1:]
            y = (win * cw).sum(-1)  # [b, c]
            xbc = F.silu(y + cb if cb is not None else y)[:, None]  # [b, 1, c]
        else:
            if cache is not None and "conv" in cache:
                xbc_in = torch.cat([cache["conv"], xbc], dim=-1)
            else:
                xbc_in = F.pad(xbc, (K - 1, 0))
            if cache is not None:
                cache["conv"] = xbc_in[:, :, xbc_in.shape[-1] - (K - 1):].clone()
            xbc = F.silu(F.conv1d(xbc_in, cw[:, None, :], cb, groups=cw.shape[0])).transpose(1, 2)  # [b, t, c]
        xs, B, C = xbc.split([hk * p, g * n, g * n], dim=-1)

        A = -torch.exp(take(self.A_log, c["A_log"]).float())
        D = take(self.D, c["D"])
        dt = F.softplus(dt.float() + take(self.dt_bias, c["dt_bias"]).float()).clamp(min=self.dt_min)  # [b, t, hk]
        state = cache.get("ssm") if cache is not None else None
        if t == 1 and state is not None:
            y = ssm_step(state, xs.view(b, hk, p), dt[:, 0], A, B.view(b, g, n), C.view(b, g, n), D)[:, None]
        else:
            y, final = ssd_chunked(xs.view(b, t, hk, p), dt, A, B.view(b, t, g, n), C.view(b, t, g, n), D,
                                   self.chunk, state)
            if cache is not None:
                cache["ssm"] = final
        return y.reshape(b, t, hk * p)

    def _packed(self, xbc, dt, seg: Segments, c: dict, hk: int):
        """_conv_ssm over packed rows (xbc [1, T, c]): the decoding rows (one token, states filled) as one
        batch, their states stacked and handed back; every other row (a prefill) alone on its segment."""
        starts = [sum(seg.lengths[:r]) for r in range(len(seg.lengths))]
        y = xbc.new_empty(1, xbc.shape[1], hk * self.p)
        one = [r for r, n in enumerate(seg.lengths) if n == 1 and "ssm" in seg.layers[r]]
        if one:
            idx = torch.tensor([starts[r] for r in one], device=xbc.device)
            state = {"conv": torch.cat([seg.layers[r]["conv"] for r in one]),
                     "ssm": torch.cat([seg.layers[r]["ssm"] for r in one])}
            y[0, idx] = self._conv_ssm(xbc[0, idx][:, None], dt[0, idx][:, None], state, c, hk)[:, 0]
            for i, r in enumerate(one):
                seg.layers[r]["conv"], seg.layers[r]["ssm"] = state["conv"][i:i + 1], state["ssm"][i:i + 1]
        done = set(one)
        for r, (layer, n) in enumerate(zip(seg.layers, seg.lengths, strict=True)):
            if r not in done:
                a = starts[r]
                y[:, a:a + n] = self._conv_ssm(xbc[:, a:a + n], dt[:, a:a + n], layer, c, hk)
        return y


def init_mamba_(mixer: Mamba2, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> None:
    """Standard Mamba2 init for A_log, D and dt_bias (dt log-uniform in [dt_min, dt_max])."""
    h = mixer.h
    with torch.no_grad():
        mixer.A_log.copy_(torch.log(torch.arange(1, h + 1, dtype=torch.float32)))
        mixer.D.fill_(1.0)
        dt = torch.exp(torch.rand(h) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
        mixer.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
