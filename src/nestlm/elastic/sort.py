"""Permute weights so the most important components come first on every axis.

The full model computes the same function afterwards (RMSNorm, attention, the scan and routing are all
equivariant to these permutations); every nested submodel is then a prefix on each axis.

    perms = sort_(model, scores)       # in place; returns the permutations applied
    scores = permute_scores(scores, perms)   # the scores in the new order (sorted: a second sort_ is a no-op)
    scores = score_text(model, ids, "scores.safetensors", sort_out="sorted")  # `nestlm importance`: score, sort
"""

from __future__ import annotations

from pathlib import Path

import torch

from nestlm.elastic.importance import Scores
from nestlm.errors import ConfigError
from nestlm.model import layout


def _order(score: torch.Tensor) -> torch.Tensor:
    """Descending order, stable (ties keep their current order, so sorting sorted scores is the identity)."""
    return torch.sort(score.float(), descending=True, stable=True).indices


def _grouped_order(score: torch.Tensor) -> torch.Tensor:
    """score [groups, per_group] -> flat permutation sorting inside each group (groups keep their place)."""
    g, n = score.shape
    inner = torch.stack([_order(score[j]) for j in range(g)])  # [g, n]
    return (inner + torch.arange(g)[:, None] * n).reshape(-1)


def _take_(t: torch.Tensor, perm: torch.Tensor, dim: int) -> None:
    t.data.copy_(t.data.index_select(dim, perm.to(t.device)))


@torch.no_grad()
def sort_(model, scores: Scores, axes: tuple[str, ...] = ("hidden", "heads", "kv", "mamba", "ffn", "experts",
                                                             "expert_ffn", "shared_ffn")) -> dict:
    """Sort `model` in place by `scores` on the given axes. Returns {axis key: permutation}.

    One permutation of units per axis (hidden channels; per block: KV groups, query heads, Mamba heads, FFN
    channels, experts, each expert's channels); the tensors and dims each one moves are those that
    nestlm.model.layout declares for the axis, so sorting, slicing and the forward share one rule."""
    cfg = model.cfg
    perms: dict[str, torch.Tensor] = {}
    block_axes: dict[int, dict[str, torch.Tensor]] = {}  # block -> {layout axis: unit permutation}
    if "hidden" in axes and "hidden" in scores:
        perms["hidden"] = _order(scores["hidden"])
    for i, block in enumerate(model.layers):
        key, ax = f"blocks.{i}.", block_axes.setdefault(i, {})
        if block.kind == "*" and key + "heads" in scores:
            heads = scores[key + "heads"]  # [kv groups, heads per group]
            n_kv, r = heads.shape
            kv = _order(heads.sum(-1)) if "kv" in axes else torch.arange(n_kv)
            within = _grouped_order(heads[kv]) if "heads" in axes else torch.arange(n_kv * r)
            q_perm = (kv[:, None] * r + torch.arange(r)).reshape(-1)[within]  # groups first, then heads
            perms[key + "kv"], perms[key + "heads"] = kv, q_perm
            ax |= {"kv": kv, "q_heads": q_perm}
        elif block.kind == "M" and "mamba" in axes and key + "mamba_heads" in scores:
            ax["mamba"] = perms[key + "mamba_heads"] = _grouped_order(scores[key + "mamba_heads"])
        elif block.kind == "-" and "ffn" in axes and key + "ffn" in scores:
            ax["ffn"] = perms[key + "ffn"] = _order(scores[key + "ffn"])
        elif block.kind == "E":
            if "shared_ffn" in axes and key + "shared_ffn" in scores and block.mixer.shared is not None:
                ax["shared_ffn"] = perms[key + "shared_ffn"] = _order(scores[key + "shared_ffn"])
            if "expert_ffn" in axes and key + "expert_ffn" in scores:
                ch = scores[key + "expert_ffn"]
                ax["moe_ffn"] = perms[key + "expert_ffn"] = torch.stack([_order(ch[e]) for e in range(ch.shape[0])])
            # group-limited routing pins experts to their groups: leave their order alone
            if "experts" in axes and key + "experts" in scores and cfg.n_expert_groups == 1:
                ax["experts"] = perms[key + "experts"] = _order(scores[key + "experts"])

    decl = layout.model_tensors(cfg)
    for name, dims in decl.items():  # each expert's channels first, in the experts' current order
        ax = block_axes.get(_block(name), {})
        for d, segs in dims.items():
            if "moe_ffn" in ax and segs[0].axis == "moe_ffn":  # stacked [E, ...]: one permutation per expert
                t = _param(model, name)
                for e in range(t.shape[0]):
                    _take_(t[e], ax["moe_ffn"][e], d - 1)
    for name, dims in decl.items():
        ax = {"hidden": perms.get("hidden")} | {a: p for a, p in block_axes.get(_block(name), {}).items()
                                                 if a != "moe_ffn"}
        for d, segs in dims.items():
            p = layout.perm(segs, {a: v for a, v in ax.items() if v is not None})
            if p is not None:
                _take_(_param(model, name), p, d)
    return perms


def _block(name: str) -> int | None:
    return int(name.split(".")[1]) if name.startswith("layers.") else None


def _param(model, name: str) -> torch.Tensor:
    module, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module), attr)


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


def score_text(model, ids: torch.Tensor, out: str | Path, seq_len: int = 256, batches: int = 8,
               batch_size: int = 4, sort_out: str | Path | None = None, dtype: torch.dtype = torch.float32,
               compute: torch.dtype = torch.float32, source: str | Path | None = None,
               overwrite: bool = False) -> Scores:
    """`nestlm importance`: importance of `model` (fp32 weights, kept so: sorting is exact) on the first
    `batches` batches of `batch_size` contiguous windows of `seq_len` tokens of the stream ids [n], the
    forwards under autocast to `compute`; the scores saved to `out` (Scores.save), and with `sort_out` the
    model sorted by them (the same function) written there as an HF folder in `dtype`. `source`: the parent
    folder, recorded in the scores' meta. The outputs are the caller's to check before the model is read."""
    from nestlm.convert import to_hf
    from nestlm.device import autocast
    from nestlm.elastic.importance import importance

    n_win = (len(ids) - 1) // seq_len
    if n_win < 1:
        raise ConfigError(f"the text gives {len(ids)} tokens, too few for one window of seq_len {seq_len}")
    wins = ids[: n_win * seq_len].view(n_win, seq_len)  # [n_win, seq_len], contiguous windows
    calib = list(wins.split(batch_size))[:batches]  # [batch_size, seq_len] each
    dev = model.embeddings.weight.device
    with autocast(compute, dev):
        scores = importance(model, calib)
    scores.meta.update({"source": str(Path(source).resolve()) if source else None, "seq_len": seq_len})
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    scores.save(out)
    if sort_out is not None:
        sort_(model, scores)
        to_hf(model.to(device="cpu", dtype=dtype), sort_out, overwrite=overwrite)
    return scores
