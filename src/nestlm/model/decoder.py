"""The hybrid decoder: embeddings -> pre-norm residual blocks dispatched from `cfg.pattern` -> norm -> lm_head.

    logits = model(ids)                      # the full (parent) model
    logits = model(ids, sub=SubArch(...))    # a nested submodel: prefixes of every weight, less compute
    cache = model.new_cache(); model(prompt, cache=cache); model(next_token, cache=cache)   # decoding
    model(tokens [b, 1], cache=Rows([c1, ..., cb]))   # one step of b sequences, each with its own cache
    model(packed [1, T], cache=Rows(caches, lengths))  # b sequences' new tokens (prompts, steps) in one forward
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nestlm.model.config import ModelConfig
from nestlm.model.layers import (
    MLP,
    Attention,
    Mamba2,
    MoE,
    RMSNorm,
    Segments,
    init_mamba_,
    masked_rms_norm,
    prefix,
    rope_cos_sin,
)
from nestlm.model.subarch import SubArch


class Block(nn.Module):
    """x + mixer(norm(x)). `kind` is the pattern character."""

    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        if kind == "M":
            self.mixer = Mamba2(cfg)
        elif kind == "*":
            self.mixer = Attention(cfg)
        elif kind == "-":
            self.mixer = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_act, cfg.mlp_bias)
        else:
            self.mixer = MoE(cfg)

    def forward(self, x, s: SubArch, cache: dict | None, rope, masks: dict | None = None):
        if masks is not None:
            return self._forward_masked(x, s, cache, rope, masks)
        h = self.norm(x)
        if self.kind == "M":
            h = self.mixer(h, s, cache)
        elif self.kind == "*":
            h = self.mixer(h, s, cache, rope)
        elif self.kind == "-":
            h = self.mixer(h, s.ffn)
        else:
            h = self.mixer(h, s)
        return x + h

    def _forward_masked(self, x, s: SubArch, cache, rope, masks: dict):
        """Soft elastic widths: every axis in `masks` scales its channels instead of slicing them."""
        mh = masks.get("hidden")
        h = self.norm(x) if mh is None else masked_rms_norm(x, self.norm.weight, self.norm.eps, mh)
        if self.kind == "M":
            h = self.mixer(h, s, cache, masks)
        elif self.kind == "*":
            h = self.mixer(h, s, cache, rope, masks)
        elif self.kind == "-":
            h = self.mixer(h, s.ffn, masks.get("ffn"))
        else:
            h = self.mixer(h, s, masks)
        if mh is not None:
            h = h * mh[: h.shape[-1]].to(h.dtype)
        return x + h


class Cache:
    """Decoding state for one SubArch: attention K/V and Mamba conv/SSM states per block, and the position.

    A cache is bound to the SubArch it was filled with (its tensors have that submodel's widths).
    """

    def __init__(self):
        self.pos = 0
        self.layers: dict[int, dict] = {}
        self.sub: SubArch | None = None

    def layer(self, i: int) -> dict:
        return self.layers.setdefault(i, {})


class Rows:
    """b sequences' own caches (each a batch-1 Cache at its own position, all on one SubArch) run in one
    forward: `model(ids [1, T], sub, cache=Rows(caches, lengths))` takes the sequences' new tokens packed one
    after the other (`lengths[r]` tokens for row r: a prompt to prefill, or 1 to decode; T = sum) and returns
    [1, T, vocab]. `model(tokens [b, 1], cache=Rows(caches))` is one decoding step of b rows -> [b, 1, vocab].
    Every matmul runs once over all T tokens; attention reads each row's own K/V (no padding) at its own
    positions (RoPE); Mamba runs the decoding rows as one batch (their states stacked and handed back) and
    each prefill on its own. Rows join and leave between calls (continuous batching): a Rows is only a view,
    built per call from the caches still running."""

    def __init__(self, caches: list[Cache], lengths: list[int] | None = None):
        self.caches = list(caches)
        self.lengths = list(lengths) if lengths is not None else [1] * len(self.caches)
        if len(self.lengths) != len(self.caches) or any(n < 1 for n in self.lengths):
            raise ValueError("Rows: one length >= 1 per cache")

    def packed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [1, T] (the rows' tokens packed) or [b, 1] (one per row) -> [1, T]; ValueError otherwise."""
        if ids.shape[0] > 1 and ids.shape == (len(self.caches), 1) and all(n == 1 for n in self.lengths):
            return ids.view(1, -1)
        if ids.shape[0] != 1 or ids.shape[1] != sum(self.lengths):
            raise ValueError(f"Rows: ids {tuple(ids.shape)} are neither the rows' {sum(self.lengths)} tokens "
                             f"packed [1, T] nor one token per row [b, 1]")
        return ids


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        w = torch.empty(cfg.vocab_size, cfg.hidden_size)
        if w.device.type != "meta":  # torch's default N(0, 1); on meta (shapes only) normal_ imports torch._dynamo
            nn.init.normal_(w)
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=w)
        self.layers = nn.ModuleList(Block(cfg, c) for c in cfg.pattern)
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._full = SubArch.full(cfg)
        self.checkpoint_blocks = False  # training: recompute each block in the backward (activation checkpointing)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embeddings.weight if self.lm_head is None else self.lm_head.weight

    def resolve(self, sub: SubArch | None) -> SubArch:
        return self._full if sub is None else sub.resolve(self.cfg)

    def new_cache(self) -> Cache:
        return Cache()

    def forward(self, ids: torch.Tensor, sub: SubArch | None = None, cache: Cache | None = None,
                return_hidden: bool = False, masks: dict | None = None,
                gate: torch.Tensor | None = None) -> torch.Tensor:
        """ids: [b, t] -> logits [b, t, vocab] (fp32), or the final normed hidden [b, t, hidden_k].

        masks (soft elastic widths, used by elastic training): {axis: [width] float tensor} for SubArch width
        axes (hidden, ffn, moe_ffn, shared_ffn, attn_heads_per_group, mamba_heads_per_group, experts),
        multiplying that axis's channels (heads, experts) instead of slicing them. A 0/1 prefix mask gives
        the sliced submodel's logits.

        gate (a scalar, elastic hard mode: the router's straight-through weight, == 1.0) multiplies the final
        hidden state. The lm_head is linear, so the gradients equal those of multiplying the logits, at
        hidden/vocab of the cost."""
        s = self.resolve(sub)
        rows = cache if isinstance(cache, Rows) else None
        step = rows is not None and ids.shape[0] > 1  # [b, 1]: one token per row
        if rows is not None:
            ids = rows.packed(ids)  # [1, T]
        for c in rows.caches if rows is not None else [cache] if cache is not None else []:
            if c.sub is None:
                c.sub = s
            elif c.sub != s:
                raise ValueError("this cache was filled by another SubArch; start a new cache to switch models")
        k = s.hidden
        emb = prefix(self.embeddings.weight, None, k)  # [vocab, k]
        x = F.embedding(ids, emb)  # [b, t, k]
        mh = masks.get("hidden") if masks is not None else None
        if mh is not None:
            x = x * mh[:k].to(x.dtype)
        rope = None
        if self.cfg.rope_theta is not None and "*" in self.cfg.pattern:
            if rows is not None:  # each row at its own positions
                positions = torch.cat([torch.arange(c.pos, c.pos + n, device=ids.device)
                                       for c, n in zip(rows.caches, rows.lengths, strict=True)])  # [T]
            else:
                pos = cache.pos if cache is not None else 0
                positions = torch.arange(pos, pos + ids.shape[1], device=ids.device)
            rope = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, ids.device, x.dtype)
        for i in s.layers:
            if self.checkpoint_blocks and cache is None and torch.is_grad_enabled():
                x = checkpoint(self.layers[i], x, s, None, rope, masks, use_reentrant=False)
                continue
            if rows is not None:
                layer = Segments([c.layer(i) for c in rows.caches], rows.lengths)
            else:
                layer = cache.layer(i) if cache is not None else None
            x = self.layers[i](x, s, layer, rope, masks)
        x = self.norm_f(x) if mh is None else masked_rms_norm(x, self.norm_f.weight, self.norm_f.eps, mh)
        if rows is not None:
            for c, n in zip(rows.caches, rows.lengths, strict=True):
                c.pos += n
        elif cache is not None:
            cache.pos += ids.shape[1]
        if gate is not None:
            x = x * gate.to(x.dtype)
        if step:
            x = x.view(-1, 1, x.shape[-1])  # [b, 1, k]
        if return_hidden:
            return x
        head = emb if self.lm_head is None else prefix(self.lm_head.weight, None, k)  # tied: one slice
        return F.linear(x, head).float()

    # ------------------------------------------------------------------ utilities
    @torch.no_grad()
    def init_weights(self, seed: int | None = None, std: float = 0.02) -> Decoder:
        """Fresh init for training from scratch: N(0, std) matrices, residual outputs scaled by
        1/sqrt(2 * n_blocks), standard Mamba2 A/D/dt init."""
        gen_state = torch.random.get_rng_state()
        if seed is not None:
            torch.manual_seed(seed)
        out_std = std / math.sqrt(2 * self.cfg.n_blocks)
        for name, p in self.named_parameters():
            if p.dim() >= 2 and "conv1d" not in name:
                is_out = name.endswith(("o_proj.weight", "down_proj.weight", "out_proj.weight", "down_proj"))
                nn.init.normal_(p, std=out_std if is_out else std)
            elif name.endswith("bias") and "conv1d" not in name:
                nn.init.zeros_(p)
            elif name.endswith(("norm.weight", "norm_f.weight")) or "_norm." in name:
                nn.init.ones_(p)
        for block in self.layers:
            if block.kind == "M":
                init_mamba_(block.mixer)
        for m in self.modules():  # conv1d keeps torch's default init, drawn here so that `seed` fixes it too
            if isinstance(m, nn.Conv1d):
                m.reset_parameters()
        if seed is not None:
            torch.random.set_rng_state(gen_state)
        return self
