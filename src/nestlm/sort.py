"""Permute weights so the most important components come first on every axis.

The full model computes the same function afterwards (RMSNorm, attention, the scan and routing are all
equivariant to these permutations); every nested submodel is then a prefix on each axis.

    perms = sort_(model, scores)       # in place; returns the permutations applied
    scores = permute_scores(scores, perms)   # the scores in the new order (sorted: a second sort_ is a no-op)
"""

from __future__ import annotations

import torch

from nestlm.importance import Scores


def _order(score: torch.Tensor) -> torch.Tensor:
    """Descending order, stable (ties keep their current order, so sorting sorted scores is the identity)."""
    return torch.sort(score.float(), descending=True, stable=True).indices


def _grouped_order(score: torch.Tensor) -> torch.Tensor:
    """score [groups, per_group] -> flat permutation sorting inside each group (groups keep their place)."""
    g, n = score.shape
    inner = torch.stack([_order(score[j]) for j in range(g)])  # [g, n]
    return (inner + torch.arange(g)[:, None] * n).reshape(-1)


def _expand(perm: torch.Tensor, width: int) -> torch.Tensor:
    """A permutation of units -> the permutation of their channels (each unit `width` channels wide)."""
    return (perm[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


def _take_(t: torch.Tensor, perm: torch.Tensor, dim: int) -> None:
    t.data.copy_(t.data.index_select(dim, perm.to(t.device)))


@torch.no_grad()
def sort_(model, scores: Scores, axes: tuple[str, ...] = ("hidden", "heads", "kv", "mamba", "ffn", "experts",
                                                             "expert_ffn", "shared_ffn")) -> dict:
    """Sort `model` in place by `scores` on the given axes. Returns {axis key: permutation}."""
    cfg = model.cfg
    perms: dict[str, torch.Tensor] = {}
    if "hidden" in axes and "hidden" in scores:
        p = _order(scores["hidden"])
        perms["hidden"] = p
        _sort_hidden_(model, p)
    for i, block in enumerate(model.layers):
        mx = block.mixer
        key = f"blocks.{i}."
        if block.kind == "*":
            r = mx.n_heads // mx.n_kv
            heads = scores.tensors.get(key + "heads")
            if heads is None:
                continue
            kv = _order(heads.sum(-1)) if "kv" in axes else torch.arange(mx.n_kv)
            within = _grouped_order(heads[kv]) if "heads" in axes else torch.arange(mx.n_heads)
            q_perm = (kv[:, None] * r + torch.arange(r)).reshape(-1)[within]  # groups first, then heads
            perms[key + "kv"], perms[key + "heads"] = kv, q_perm
            _sort_attention_(mx, kv, q_perm)
        elif block.kind == "M" and "mamba" in axes and key + "mamba_heads" in scores:
            p = _grouped_order(scores[key + "mamba_heads"])
            perms[key + "mamba_heads"] = p
            _sort_mamba_(mx, p)
        elif block.kind == "-" and "ffn" in axes and key + "ffn" in scores:
            p = _order(scores[key + "ffn"])
            perms[key + "ffn"] = p
            _sort_mlp_(mx, p)
        elif block.kind == "E":
            if "shared_ffn" in axes and key + "shared_ffn" in scores and mx.shared is not None:
                p = _order(scores[key + "shared_ffn"])
                perms[key + "shared_ffn"] = p
                _sort_mlp_(mx.shared, p)
            if "expert_ffn" in axes and key + "expert_ffn" in scores:
                ch = scores[key + "expert_ffn"]
                p = torch.stack([_order(ch[e]) for e in range(ch.shape[0])])  # [E, F]
                perms[key + "expert_ffn"] = p
                for e in range(ch.shape[0]):
                    for w in _expert_in(mx):
                        _take_(w[e], p[e], 0)
                    _take_(mx.down_proj[e], p[e], 1)
            if "experts" in axes and key + "experts" in scores:
                if cfg.n_expert_groups > 1:
                    continue  # group-limited routing pins experts to their groups: leave the order alone
                p = _order(scores[key + "experts"])
                perms[key + "experts"] = p
                # the router's rows (and the sigmoid router's bias) move with their experts
                for t in (mx.gate.weight, mx.e_score_correction_bias, mx.down_proj, *_expert_in(mx)):
                    if t is not None:
                        _take_(t, p, 0)
    return perms


def _sort_hidden_(model, p):
    _take_(model.embeddings.weight, p, 1)
    if model.lm_head is not None:
        _take_(model.lm_head.weight, p, 1)
    _take_(model.norm_f.weight, p, 0)
    for block in model.layers:
        _take_(block.norm.weight, p, 0)
        mx = block.mixer
        if block.kind == "*":
            ins, outs = [mx.q_proj, mx.k_proj, mx.v_proj], [mx.o_proj]
        elif block.kind == "M":
            ins, outs = [mx.in_proj], [mx.out_proj]
        elif block.kind == "-":
            ins, outs = [m for m in (mx.up_proj, mx.gate_proj) if m is not None], [mx.down_proj]
        else:
            ins, outs = [mx.gate], []
            for w in _expert_in(mx):
                _take_(w, p, 2)
            _take_(mx.down_proj, p, 1)
            if mx.shared is not None:
                ins += [mx.shared.up_proj]
                outs += [mx.shared.down_proj]
        for m in ins:
            _take_(m.weight, p, 1)
        for m in outs:
            _take_(m.weight, p, 0)
            if m.bias is not None:
                _take_(m.bias, p, 0)


def _expert_in(mx) -> list:
    """The stacked expert weights that read the hidden state, [E, F, D]: up (and SwiGLU's gate)."""
    return [mx.up_proj] + ([mx.gate_proj] if mx.gate_proj is not None else [])


def _sort_attention_(mx, kv, q_perm):
    hd = mx.head_dim
    q_rows, kv_rows = _expand(q_perm, hd), _expand(kv, hd)
    _take_(mx.q_proj.weight, q_rows, 0)
    _take_(mx.k_proj.weight, kv_rows, 0)
    _take_(mx.v_proj.weight, kv_rows, 0)
    _take_(mx.o_proj.weight, q_rows, 1)
    if mx.q_proj.bias is not None:
        _take_(mx.q_proj.bias, q_rows, 0)
        _take_(mx.k_proj.bias, kv_rows, 0)
        _take_(mx.v_proj.bias, kv_rows, 0)


def _sort_mamba_(mx, p):
    """p permutes heads inside their groups. Coupled: in_proj z/x/dt rows, conv x channels, A_log, D,
    dt_bias, the gated norm, out_proj columns. B and C (per group) don't move."""
    hp, gn = mx.h * mx.p, mx.g * mx.n
    ch = _expand(p, mx.p)  # channel permutation for z / x / norm / out_proj
    rows = torch.cat([ch, hp + ch, 2 * hp + torch.arange(2 * gn), 2 * hp + 2 * gn + p])
    _take_(mx.in_proj.weight, rows, 0)
    if mx.in_proj.bias is not None:
        _take_(mx.in_proj.bias, rows, 0)
    conv = torch.cat([ch, hp + torch.arange(2 * gn)])
    _take_(mx.conv1d.weight, conv, 0)
    if mx.conv1d.bias is not None:
        _take_(mx.conv1d.bias, conv, 0)
    for t in (mx.A_log, mx.D, mx.dt_bias):
        _take_(t, p, 0)
    _take_(mx.norm.weight, ch, 0)
    _take_(mx.out_proj.weight, ch, 1)


def _sort_mlp_(mx, p):
    for m in (mx.up_proj, mx.gate_proj):
        if m is not None:
            _take_(m.weight, p, 0)
            if m.bias is not None:
                _take_(m.bias, p, 0)
    _take_(mx.down_proj.weight, p, 1)


def permute_scores(scores: Scores, perms: dict) -> Scores:
    """The scores re-indexed into the sorted model's order (for reuse, and to check that it is sorted)."""
    out = dict(scores.tensors)
    if "hidden" in perms:
        out["hidden"] = scores["hidden"][perms["hidden"]]
    for k, p in perms.items():
        if k.endswith(".heads"):
            base = k[: -len("heads")]
            h = scores[k]
            out[k] = h.reshape(-1)[p].view_as(h)
            out[base + "kv"] = out[k].sum(-1)
        elif k.endswith(".mamba_heads"):
            out[k] = scores[k].reshape(-1)[p].view_as(scores[k])
        elif k.endswith((".ffn", ".shared_ffn")):
            out[k] = scores[k][p]
        elif k.endswith(".experts"):
            out[k] = scores[k][p]
            base = k[: -len("experts")]
            if base + "expert_ffn" in out:
                out[base + "expert_ffn"] = out[base + "expert_ffn"][p]
        elif k.endswith(".expert_ffn"):
            out[k] = torch.gather(scores[k], 1, p)
    return Scores(out, dict(scores.meta, sorted=True))


def is_sorted(scores: Scores) -> bool:
    """True when every width axis of `scores` is already in descending order (sort_ would change nothing)."""
    def desc(t):
        return bool((t[..., :-1] >= t[..., 1:]).all()) if t.shape[-1] > 1 else True

    for k, t in scores.tensors.items():
        if k == "layers" or k.endswith(".kv"):
            continue
        if k.endswith(".heads"):
            if not desc(t.sum(-1)) or not desc(t):
                return False
        elif not desc(t):
            return False
    return True
