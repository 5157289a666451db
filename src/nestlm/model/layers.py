"""The four block mixers of the hybrid decoder, in plain PyTorch, with explicit elastic widths.

Every forward takes the already-resolved `SubArch` `s` and slices its weights as prefixes: `w[:k]` for the
hidden side, the first heads of each group for attention and Mamba, the first experts / FFN channels. With
the full SubArch every slice is the whole tensor (no copy). Parameter names follow Hugging Face Nemotron-H
(Llama's gate/up/down for SwiGLU), so converters are mostly renames.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nestlm.arch import SubArch
from nestlm.model.config import ModelConfig
from nestlm.model.ssd import ssd_chunked, ssm_step


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


class _Prefix(torch.autograd.Function):
    """w[idx] whose backward builds the full-size gradient writing each element once: g into the prefix,
    zeros into the rest. (Chained slices, w[:a][:, :b], zero-fill one full-size tensor per sliced dim and
    then copy into it: a measurable share of an elastic training step.)"""

    @staticmethod
    def forward(ctx, w, idx):
        ctx.shape, ctx.idx = w.shape, idx
        return w[idx]

    @staticmethod
    def backward(ctx, g):
        gw = g.new_empty(ctx.shape)
        view = gw
        for d, (i, full) in enumerate(zip(ctx.idx, ctx.shape[: len(ctx.idx)], strict=True)):
            if i.stop is not None:  # a cut dim: zero its tail (inside the prefix of the dims before it)
                view.narrow(d, i.stop, full - i.stop).zero_()
                view = view.narrow(d, 0, i.stop)
        view.copy_(g)
        return gw, None


def prefix(w: torch.Tensor, *sizes: int | None) -> torch.Tensor:
    """w[:sizes[0], :sizes[1], ...] (None: that dim uncut). The weight itself when nothing is cut, so the
    full model's autograd graph has no slicing nodes at all."""
    idx = tuple(slice(None) if n is None or n >= full else slice(0, n)
                for n, full in zip(sizes, w.shape[: len(sizes)], strict=True))
    if all(i == slice(None) for i in idx):
        return w
    if w.requires_grad and torch.is_grad_enabled():
        return _Prefix.apply(w, idx)
    return w[idx]


def group_heads(t: torch.Tensor, n_groups: int, keep: int, dim: int = 0) -> torch.Tensor:
    """Keep the first `keep` channels of each of `n_groups` equal groups along `dim`.

    Heads are laid out group-major ([group 0 heads | group 1 heads | ...]), so "the first m heads of every
    group" is `group_heads(t, groups, m * head_width)`. Returns t itself (no copy) when nothing is cut.
    """
    per_group = t.shape[dim] // n_groups
    if keep == per_group:
        return t
    return t.unflatten(dim, (n_groups, per_group)).narrow(dim + 1, 0, keep).flatten(dim, dim + 1)


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


class Attention(nn.Module):
    """GQA self-attention. Elastic: first `attn_kv_heads` KV groups, first `attn_heads_per_group` query heads
    of each group, first `hidden` input/output channels."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
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

    def _q_rows(self, t: torch.Tensor, s: SubArch, dim: int = 0, k: int | None = None) -> torch.Tensor:
        # q rows are [kv group][head in group][head_dim]: keep the first g groups, first h heads of each
        # (along `dim`: 0 for q_proj rows, 1 for o_proj columns), and the first k channels on the other dim
        rows = s.attn_kv_heads * (self.n_heads // self.n_kv) * self.head_dim
        t = prefix(t, rows) if t.dim() == 1 else prefix(t, *((rows, k) if dim == 0 else (k, rows)))
        return group_heads(t, s.attn_kv_heads, s.attn_heads_per_group * self.head_dim, dim=dim)

    def forward(self, x, s: SubArch, cache: dict | None, rope, masks: dict | None = None):
        b, t, k = x.shape
        g, h, hd = s.attn_kv_heads, s.attn_heads_per_group, self.head_dim
        kv_rows = g * hd
        bias = self.q_proj.bias is not None
        q = F.linear(x, self._q_rows(self.q_proj.weight, s, k=k), self._q_rows(self.q_proj.bias, s) if bias else None)
        kk = F.linear(x, prefix(self.k_proj.weight, kv_rows, k), prefix(self.k_proj.bias, kv_rows) if bias else None)
        v = F.linear(x, prefix(self.v_proj.weight, kv_rows, k), prefix(self.v_proj.bias, kv_rows) if bias else None)
        q = q.view(b, t, g * h, hd)
        kk = kk.view(b, t, g, hd)
        if self.q_norm is not None:
            q, kk = self.q_norm(q), self.k_norm(kk)
        q, kk, v = q.transpose(1, 2), kk.transpose(1, 2), v.view(b, t, g, hd).transpose(1, 2)  # [b, heads, t, hd]
        if rope is not None:
            cos, sin = rope
            q, kk = apply_rope(q, cos, sin), apply_rope(kk, cos, sin)

        if cache is not None:
            kk, v, past = _kv_cache_append(cache, kk, v)
        else:
            past = 0
        if t == 1 or (past == 0 and t == kk.shape[2]):
            mask, causal = None, t > 1
        else:  # prefill on top of a cache: causal with an offset
            q_pos = torch.arange(past, past + t, device=x.device)[:, None]
            mask = torch.arange(kk.shape[2], device=x.device)[None, :] <= q_pos
            causal = False
        out = F.scaled_dot_product_attention(q, kk, v, attn_mask=mask, is_causal=causal, enable_gqa=h > 1)
        if masks is not None and "attn_heads_per_group" in masks:  # soft width: scale each head's output
            out = out * masks["attn_heads_per_group"][:h].repeat(g).to(out.dtype)[None, :, None, None]
        if self.probe is not None:
            self.probe("heads", out)  # [b, g*h, t, hd]
        out = out.transpose(1, 2).reshape(b, t, g * h * hd)
        o_w = self._q_rows(self.o_proj.weight, s, dim=1, k=k)  # o_proj columns follow q's head layout
        return F.linear(out, o_w, prefix(self.o_proj.bias, k) if bias else None)


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
class MLP(nn.Module):
    """ReLU² (Nemotron-H: down(relu(up x)²)) or SwiGLU (Llama: down(silu(gate x) * up x)).
    Elastic: first `width` intermediate channels, first `hidden` channels."""

    def __init__(self, d: int, f: int, act: str, bias: bool):
        super().__init__()
        self.act = act
        self.probe = None
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.gate_proj = nn.Linear(d, f, bias=bias) if act == "swiglu" else None
        self.down_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x, width: int, mask: torch.Tensor | None = None):
        k = x.shape[-1]

        def lin(m):  # first `width` output rows, first k input columns
            return F.linear(x, prefix(m.weight, width, k), prefix(m.bias, width) if m.bias is not None else None)

        up = lin(self.up_proj)
        if self.gate_proj is not None:
            hmid = F.silu(lin(self.gate_proj)) * up
        else:
            hmid = torch.relu(up).square()
        if mask is not None:  # soft width: [f] channel mask
            hmid = hmid * mask[:width].to(hmid.dtype)
        if self.probe is not None:
            self.probe("ffn", hmid)  # [b, t, width]
        bias = prefix(self.down_proj.bias, k) if self.down_proj.bias is not None else None
        return F.linear(hmid, prefix(self.down_proj.weight, k, width), bias)


# ---------------------------------------------------------------------------------------------- MoE
class MoE(nn.Module):
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
        super().__init__()
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
        self.shared = MLP(d, cfg.shared_intermediate_size, "relu2", cfg.mlp_bias) \
            if cfg.shared_intermediate_size else None

    def route(self, x: torch.Tensor, n_exp: int, mask: torch.Tensor | None = None):
        """x: [n, k] -> weights [n, top_k] (fp32), expert ids [n, top_k].
        mask [n_exp] (soft experts): experts with mask 0 are never chosen, the others' weights are scaled."""
        logits = F.linear(x.float(), prefix(self.gate.weight, n_exp, x.shape[-1]).float())
        if mask is not None:
            mask = mask[:n_exp].float()
        if self.softmax:  # probabilities over the kept (unmasked) experts; the choice is by probability
            if mask is not None:
                logits = logits.masked_fill(mask == 0, float("-inf"))
            scores = logits.softmax(-1)
            choice = scores
        else:
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias[:n_exp].float()
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
        up = prefix(self.up_proj, n_exp, f, k).unbind(0)
        down = prefix(self.down_proj, n_exp, k, f).unbind(0)
        gate = prefix(self.gate_proj, n_exp, f, k).unbind(0) if self.gate_proj is not None else [None] * n_exp
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
            up, gate, down = self.up_proj, self.gate_proj, self.down_proj
            out = sum(F.linear(self.expert(xf, up[e, :f, :k], gate[e, :f, :k] if gate is not None else None),
                               down[e, :k, :f]) * w[:, j:j + 1].to(xf.dtype)
                      for j, e in enumerate(idx[0].tolist()))
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
class Mamba2(nn.Module):
    """Mamba2 mixer (Nemotron-H layout). in_proj rows are [z | x | B | C | dt], conv1d channels [x | B | C].
    Elastic: first `mamba_heads_per_group` heads of every group (z, x, dt, A_log, D, dt_bias, the gated
    norm and out_proj follow the heads; B and C belong to groups and are kept whole), first `hidden`
    channels."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h, p, g, n = cfg.hidden_size, cfg.mamba_heads, cfg.mamba_head_dim, cfg.mamba_groups, cfg.ssm_state
        self.h, self.p, self.g, self.n = h, p, g, n
        self.kernel, self.chunk, self.dt_min, self.eps = cfg.conv_kernel, cfg.chunk_size, cfg.dt_min, cfg.norm_eps
        conv_dim = cfg.mamba_conv_dim
        self.in_proj = nn.Linear(d, 2 * h * p + 2 * g * n + h, bias=cfg.mamba_bias)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, cfg.conv_kernel, groups=conv_dim, bias=cfg.conv_bias,
                                padding=cfg.conv_kernel - 1)
        self.dt_bias = nn.Parameter(torch.ones(h))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, h + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(h))
        self.norm = RMSNorm(h * p, cfg.norm_eps)  # gated, grouped: one RMS per group of heads
        self.probe = None
        self.out_proj = nn.Linear(h * p, d, bias=cfg.mamba_bias)
        self._rows: dict = {}  # (m, device) -> kept row indices, see _kept_rows

    # -- elastic slicing of the head-coupled tensors (one helper per layout)
    def _heads(self, t, m, width, dim=0):
        """First m heads of every group along `dim`, where each head is `width` channels wide."""
        return group_heads(t, self.g, m * width, dim=dim) if m * self.g != self.h else t

    def _kept_rows(self, m: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of in_proj ([z | x | B | C | dt]) and of conv1d ([x | B | C]) kept at m heads per group, as
        index tensors (built once per m and device): one gather per weight, whose gradient is one index_add,
        instead of a cat of four slices whose backward fills a full-size zero tensor per slice."""
        key = (m, str(device))
        if key not in self._rows:
            hp, gn, p = self.h * self.p, self.g * self.n, self.p

            def heads(start, width):  # first m heads of every group, `width` rows each, from row `start`
                return start + group_heads(torch.arange(self.h * width, device=device), self.g, m * width)

            with torch.inference_mode(False):  # a cache made while generating must serve training too
                bc = torch.arange(2 * gn, device=device)
                self._rows[key] = (torch.cat([heads(0, p), heads(hp, p), 2 * hp + bc, heads(2 * hp + 2 * gn, 1)]),
                                   torch.cat([heads(0, p), hp + bc]))
        return self._rows[key]

    def _in_proj(self, t, m):  # rows [z | x | B | C | dt]
        return t if m * self.g == self.h else t.index_select(0, self._kept_rows(m, t.device)[0])

    def _conv(self, t, m):  # channels [x | B | C]
        return t if m * self.g == self.h else t.index_select(0, self._kept_rows(m, t.device)[1])

    def forward(self, x, s: SubArch, cache: dict | None, masks: dict | None = None):
        b, t, k = x.shape
        m = s.mamba_heads_per_group
        hk, p, g, n = m * self.g, self.p, self.g, self.n  # hk: heads kept
        bias = self.in_proj.bias
        zxbcdt = F.linear(x, self._in_proj(prefix(self.in_proj.weight, None, k), m),
                          self._in_proj(bias, m) if bias is not None else None)
        z, xbc, dt = zxbcdt.split([hk * p, hk * p + 2 * g * n, hk], dim=-1)

        # causal depthwise conv over [x | B | C], with the last kernel-1 inputs carried in the cache
        cw = self._conv(self.conv1d.weight[:, 0], m)  # [conv_dim_k, kernel]
        cb = self._conv(self.conv1d.bias, m) if self.conv1d.bias is not None else None
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

        A = -torch.exp(self._heads(self.A_log, m, 1).float())
        D = self._heads(self.D, m, 1)
        dt = F.softplus(dt.float() + self._heads(self.dt_bias, m, 1).float()).clamp(min=self.dt_min)  # [b, t, hk]
        state = cache.get("ssm") if cache is not None else None
        if t == 1 and state is not None:
            y = ssm_step(state, xs.view(b, hk, p), dt[:, 0], A, B.view(b, g, n), C.view(b, g, n), D)[:, None]
        else:
            y, final = ssd_chunked(xs.view(b, t, hk, p), dt, A, B.view(b, t, g, n), C.view(b, t, g, n), D,
                                   self.chunk, state)
            if cache is not None:
                cache["ssm"] = final
        y = y.reshape(b, t, hk * p)
        hm = masks.get("mamba_heads_per_group") if masks is not None else None

        # gated RMSNorm, grouped: statistics over each group's kept heads, never across groups
        nw = self._heads(self.norm.weight, m, p)
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

        ow = self._heads(prefix(self.out_proj.weight, k), m, p, dim=1)
        return F.linear(y, ow, prefix(self.out_proj.bias, k) if self.out_proj.bias is not None else None)


def init_mamba_(mixer: Mamba2, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> None:
    """Standard Mamba2 init for A_log, D and dt_bias (dt log-uniform in [dt_min, dt_max])."""
    h = mixer.h
    with torch.no_grad():
        mixer.A_log.copy_(torch.log(torch.arange(1, h + 1, dtype=torch.float32)))
        mixer.D.fill_(1.0)
        dt = torch.exp(torch.rand(h) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
        mixer.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
