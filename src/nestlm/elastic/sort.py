"""Permute weights so the most important components come first on every axis.

The full model computes the same function afterwards (RMSNorm, attention, the scan and routing are all
equivariant to these permutations); every nested submodel is then a prefix on each axis.

    perms = sort_(model, scores)       # in place; returns the permutations applied
    scores = permute_scores(scores, perms)   # the scores in the new order (sorted: a second sort_ is a no-op)
    scores = score_text(model, ids, "scores.safetensors", sort_out="sorted")  # score a model, sort it
    scores = score_folder(open_folder("path/hf"), "scores.safetensors", kjv=True)  # `nestlm importance`
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
def sort_(model, scores: Scores, axes: tuple[str, ...] = tuple(a.name for a in layout.AXES)) -> dict:
    """Sort `model` in place by `scores` on the given axes (nestlm.model.layout.AXES names: hidden, kv,
    q_heads, mamba, ffn, moe_ffn, shared_ffn, experts). Returns {score key: permutation}.

    One permutation of units per axis (hidden channels; per block: KV groups, query heads, Mamba heads, FFN
    channels, experts, each expert's channels); the tensors and dims each one moves are those that
    nestlm.model.layout declares for the axis, so sorting, slicing and the forward share one rule."""
    cfg = model.cfg
    perms: dict[str, torch.Tensor] = {}
    block_axes: dict[int, dict[str, torch.Tensor]] = {}  # block -> {layout axis: unit permutation}
    if "hidden" in axes and "hidden" in scores:
        perms["hidden"] = _order(scores["hidden"])
    for i, block in enumerate(model.layers):
        ax = block_axes.setdefault(i, {})
        key = {a: layout.score_key(i, a) for a in layout.AXIS}  # layout axis -> this block's score key
        if block.kind == "*" and key["q_heads"] in scores:
            heads = scores[key["q_heads"]]  # [kv groups, heads per group]
            n_kv, r = heads.shape
            kv = _order(heads.sum(-1)) if "kv" in axes else torch.arange(n_kv)
            within = _grouped_order(heads[kv]) if "q_heads" in axes else torch.arange(n_kv * r)
            q_perm = (kv[:, None] * r + torch.arange(r)).reshape(-1)[within]  # groups first, then heads
            perms[key["kv"]], perms[key["q_heads"]] = kv, q_perm
            ax |= {"kv": kv, "q_heads": q_perm}
        elif block.kind == "M" and "mamba" in axes and key["mamba"] in scores:
            ax["mamba"] = perms[key["mamba"]] = _grouped_order(scores[key["mamba"]])
        elif block.kind == "-" and "ffn" in axes and key["ffn"] in scores:
            ax["ffn"] = perms[key["ffn"]] = _order(scores[key["ffn"]])
        elif block.kind == "E":
            if "shared_ffn" in axes and key["shared_ffn"] in scores and block.mixer.shared is not None:
                ax["shared_ffn"] = perms[key["shared_ffn"]] = _order(scores[key["shared_ffn"]])
            if "moe_ffn" in axes and key["moe_ffn"] in scores:
                ch = scores[key["moe_ffn"]]
                ax["moe_ffn"] = perms[key["moe_ffn"]] = torch.stack([_order(ch[e]) for e in range(ch.shape[0])])
            # group-limited routing pins experts to their groups: leave their order alone
            if "experts" in axes and key["experts"] in scores and cfg.n_expert_groups == 1:
                ax["experts"] = perms[key["experts"]] = _order(scores[key["experts"]])

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
    axis_of = {a.score: a.name for a in layout.AXES}  # score key -> layout axis
    for k, p in perms.items():
        base, _, score = k.rpartition(".")
        axis = axis_of.get(score) if base else None
        if axis == "q_heads":
            h = scores[k]
            out[k] = h.reshape(-1)[p].view_as(h)
            out[f"{base}.{layout.AXIS['kv'].score}"] = out[k].sum(-1)
        elif axis == "mamba":
            out[k] = scores[k].reshape(-1)[p].view_as(scores[k])
        elif axis in ("ffn", "shared_ffn"):
            out[k] = scores[k][p]
        elif axis == "experts":
            out[k] = scores[k][p]
            channels = f"{base}.{layout.AXIS['moe_ffn'].score}"
            if channels in out:
                out[channels] = out[channels][p]
        elif axis == "moe_ffn":
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


def score_folder(folder, out: str | Path, text: str | Path | None = None, kjv: bool = False, seq_len: int = 256,
                 batches: int = 8, batch_size: int = 4, sort_out: str | Path | None = None, overwrite: bool = False,
                 device: str | None = None, dtype: str | None = None) -> Scores:
    """`nestlm importance`: score_text on the checkpoint folder `folder` (opened by nestlm.load.open_folder) and
    the first batches * batch_size * seq_len + 1 tokens of the text file `text` (or the KJV Bible) by its
    tokenizer. Both outputs are checked (new, or overwrite; never an input) before the model is read. The
    weights stay fp32 on `device` (sorting is exact); dtype bf16 runs the scoring forwards under bf16 autocast;
    sort_out is written in the folder's stored dtype."""
    from nestlm.device import resolve
    from nestlm.io.safetensors import check_output
    from nestlm.io.tokenizer import folder_tokens

    check_output(out, folder.path, text, sort_out, overwrite=overwrite, kind="file")
    if sort_out is not None:
        check_output(sort_out, folder.path, text, out, overwrite=overwrite)
    dev, compute = resolve(device, dtype)
    model = folder.load(device=dev)  # fp32 for scoring and sorting
    ids = folder_tokens(folder.path, model.cfg.vocab_size, text, kjv, need=batches * batch_size * seq_len + 1)
    return score_text(model, ids, out, seq_len, batches, batch_size, sort_out, folder.dtype, compute,
                      source=folder.path, overwrite=overwrite)
