"""Importance of every elastic component, from forward passes over calibration text (no gradients).

    scores = importance(model, batches)        # batches: iterable of LongTensor [b, t]
    scores.save("scores.safetensors"); scores = Scores.load("scores.safetensors")

Keys of `scores.tensors` (block i of the pattern):
    hidden                [d]       sum over tokens and over every pre-mixer norm of |norm(x)|
    blocks.i.heads        [g, r]    attention: L2 norm of each head's output, summed over tokens (r heads / KV group)
    blocks.i.kv           [g]       attention: sum of its heads' scores (for dropping whole KV groups)
    blocks.i.mamba_heads  [G, H/G]  Mamba: channel magnitudes of the gated output, a head scored by its top half
    blocks.i.ffn          [f]       MLP: sum |activation| of each intermediate channel (input of down_proj)
    blocks.i.experts      [E]       MoE (REAP): mean over routed tokens of gate weight * ||expert output||
    blocks.i.expert_ffn   [E, F]    MoE: sum |activation| per expert channel
    blocks.i.shared_ffn   [Fs]      MoE: the shared expert's channels
    layers                [n]       normalised MSE of the logits when block i (or its Llama layer) is bypassed
Higher is more important everywhere.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from nestlm.arch import SubArch, depth_units
from nestlm.io.safetensors import write_tensors
from nestlm.io.tokenizer import check_ids


@dataclass
class Scores:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # tokens seen, batches, depth unit, ...

    def __getitem__(self, k: str) -> torch.Tensor:
        return self.tensors[k]

    def __contains__(self, k: str) -> bool:
        return k in self.tensors

    def save(self, path: str | Path) -> None:
        write_tensors(path, {k: v.float() for k, v in self.tensors.items()}, {"nestlm_scores": json.dumps(self.meta)})

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("nestlm_scores", "{}"))
        return cls(load_file(str(path)), meta)


@torch.no_grad()
def importance(model, batches: Iterable[torch.Tensor], layer_batches: int | None = 4, progress: bool = True,
               sub: SubArch | None = None) -> Scores:
    """Score every elastic axis of `model` on `batches`. The model's weights are not changed.

    layer_batches: how many of the batches also run the depth study (one extra forward per block each);
    None uses all, 0 skips it.
    """
    if sub is not None and sub != model.resolve(None):
        raise ValueError("importance is estimated on the full model")
    cfg = model.cfg
    was_training = model.training
    model.eval()
    acc: dict[str, torch.Tensor] = {}
    recording = [True]  # off during the depth study, whose forwards must not add to the width scores

    def add(key: str, value: torch.Tensor):
        if not recording[0]:
            return
        value = value.detach().double().cpu()
        acc[key] = acc[key] + value if key in acc else value

    hooks, n_tokens = [], [0]
    for i, block in enumerate(model.layers):
        hooks.append(block.norm.register_forward_hook(
            lambda mod, inp, out: add("hidden", out.abs().sum(dim=(0, 1)))))
        mixer = block.mixer
        if block.kind == "*":
            mixer.probe = _attn_probe(i, mixer, add)
        elif block.kind == "M":
            mixer.probe = _mamba_probe(i, mixer, add)
        elif block.kind == "-":
            mixer.probe = lambda name, hmid, i=i: add(f"blocks.{i}.ffn", hmid.abs().sum(dim=(0, 1)))
        elif block.kind == "E":
            mixer.probe = _moe_probe(i, mixer, add)
            if mixer.shared is not None:
                mixer.shared.probe = lambda name, hmid, i=i: add(f"blocks.{i}.shared_ffn",
                                                                 hmid.abs().sum(dim=(0, 1)))
    units = depth_units(cfg)
    layer_err = torch.zeros(len(units), dtype=torch.float64)
    n_layer_batches = 0
    try:
        n_batches = 0
        for ids in tqdm(batches, desc="importance", disable=not progress, unit="batch"):
            _check_batch(ids, n_batches, cfg.vocab_size)
            ids = ids.to(model.embeddings.weight.device)
            logits = model(ids)
            n_tokens[0] += ids.numel()
            n_batches += 1
            if layer_batches is None or n_layer_batches < layer_batches:
                recording[0] = False
                layer_err += _depth_study(model, ids, logits, units)
                recording[0] = True
                n_layer_batches += 1
        if n_batches == 0:
            raise ValueError("importance needs at least one calibration batch")
    finally:
        for h in hooks:
            h.remove()
        for block in model.layers:
            block.mixer.probe = None
            if block.kind == "E" and block.mixer.shared is not None:
                block.mixer.shared.probe = None
        model.train(was_training)

    out = {k: v.float() for k, v in acc.items()}
    for i, block in enumerate(model.layers):
        if block.kind == "E":  # REAP: average over the tokens each expert actually saw
            cnt = out.pop(f"blocks.{i}.expert_count").clamp(min=1)
            out[f"blocks.{i}.experts"] = out[f"blocks.{i}.experts"] / cnt
        if block.kind == "*":
            out[f"blocks.{i}.kv"] = out[f"blocks.{i}.heads"].sum(-1)
    if n_layer_batches:
        per_block = torch.zeros(cfg.n_blocks)
        for u, err in zip(units, layer_err / n_layer_batches, strict=True):
            per_block[u] = float(err)
        out["layers"] = per_block
    meta = {"tokens": n_tokens[0], "batches": n_batches, "layer_batches": n_layer_batches,
            "depth_unit": "layer" if len(units[0]) == 2 else "block"}
    return Scores(out, meta)


def _check_batch(ids, i: int, vocab_size: int) -> None:
    """A calibration batch is a non-empty [batch, seq_len] tensor of this model's token ids."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.numel() == 0 or ids.is_floating_point():
        got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"calibration batch {i}: expected a non-empty [batch, seq_len] tensor of token ids, "
                         f"got {got}")
    check_ids(ids, vocab_size, f"calibration batch {i}")


def _depth_study(model, ids, logits, units) -> torch.Tensor:
    """Normalised MSE of the logits with each depth unit bypassed through its residual."""
    full = list(range(model.cfg.n_blocks))
    ref = logits.float()
    denom = ref.pow(2).sum(dtype=torch.float64).clamp(min=1e-12)
    errs = []
    for u in units:
        kept = tuple(i for i in full if i not in u)
        if not kept:
            errs.append(float("inf"))
            continue
        out = model(ids, sub=SubArch(layers=kept))
        errs.append(float((out - ref).pow(2).sum(dtype=torch.float64) / denom))
    return torch.tensor(errs, dtype=torch.float64)


def _attn_probe(i, mixer, add):
    r = mixer.n_heads // mixer.n_kv

    def probe(name, out):  # out: [b, heads, t, hd]
        norms = out.float().norm(dim=-1).sum(dim=(0, 2))  # [heads]
        add(f"blocks.{i}.heads", norms.view(mixer.n_kv, r))
    return probe


def _mamba_probe(i, mixer, add):
    g, hg, p = mixer.g, mixer.h // mixer.g, mixer.p

    def probe(name, y):  # y: [b, t, h*p]
        ch = y.float().abs().sum(dim=(0, 1)).view(g, hg, p)  # channel magnitudes
        top = ch.topk(max(1, p // 2), dim=-1).values.sum(-1)  # a head scored by its top channels
        add(f"blocks.{i}.mamba_heads", top)
    return probe


def _moe_probe(i, mixer, add):
    n_exp, f = mixer.up_proj.shape[0], mixer.up_proj.shape[1]

    def probe(name, payload):
        e, hmid, y, w = payload  # hmid [n, f], y [n, k] (before gate weighting), w [n]
        one = torch.zeros(n_exp, dtype=torch.float64)
        one[e] = 1.0
        reap = torch.zeros(n_exp, dtype=torch.float64)
        reap[e] = float((w.float() * y.float().norm(dim=-1)).sum())
        add(f"blocks.{i}.experts", reap)
        add(f"blocks.{i}.expert_count", one * hmid.shape[0])
        ch = torch.zeros(n_exp, f, dtype=torch.float64)
        ch[e, : hmid.shape[1]] = hmid.double().abs().sum(0).cpu()
        add(f"blocks.{i}.expert_ffn", ch)
    return probe
