"""Autoregressive generation with a cache, gpt-fast style: prefill once, then one token per step.

    out = generate(model, ids, max_new_tokens=64)                       # greedy, the full model
    out = generate(model, ids, 64, sub=SubArch(hidden=256), temperature=0.8, top_k=50, seed=0)

Device-agnostic: every tensor follows `ids`. The model contract is

    logits = model(ids [b, t], sub=None, cache=None)  -> fp32 [b, t, vocab]
    cache = model.new_cache()                          # advances its position on every call

Shapes: b batch, t prompt length, v vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

__all__ = ["decode_one_token", "generate", "prefill", "sample"]


def _last_logits(model, ids: torch.Tensor, cache, sub) -> torch.Tensor:
    """Logits of the last position only: [b, v]. For a nestlm Decoder the lm_head runs on that position
    alone (the prompt's other t-1 positions would cost t-1 useless [k x v] matmuls)."""
    head = getattr(model, "lm_head_weight", None)
    if head is not None and ids.shape[1] > 1:
        h = model(ids, sub=sub, cache=cache, return_hidden=True)[:, -1]  # [b, k]
        return F.linear(h, head[:, : h.shape[-1]]).float()  # [b, v]
    return model(ids, sub=sub, cache=cache)[:, -1].float()  # [b, t, v] -> [b, v]


def prefill(model, ids: torch.Tensor, cache, sub=None) -> torch.Tensor:
    """Run the prompt ids [b, t] through the model, filling `cache`. Returns the last position's logits [b, v]."""
    with torch.inference_mode():
        return _last_logits(model, ids, cache, sub)


def decode_one_token(model, tok: torch.Tensor, cache, sub=None) -> torch.Tensor:
    """One decoding step: tok [b, 1] -> logits [b, v]; the cache advances by one position."""
    with torch.inference_mode():
        return model(tok, sub=sub, cache=cache)[:, -1].float()  # [b, 1, v] -> [b, v]


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [b, v] -> next tokens [b, 1]. temperature 0 (or below): greedy argmax; otherwise softmax
    sampling of logits / temperature, restricted to the `top_k` most likely tokens when given."""
    if temperature is None or temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)  # [b, 1]
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, max(int(top_k), 1), dim=-1).values[:, -1:]  # [b, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [b, v]
    return torch.multinomial(probs, 1, generator=generator)  # [b, 1]


def generate(model, ids: torch.Tensor, max_new_tokens: int, sub=None, temperature: float = 0.0,
             top_k: int | None = None, stop_tokens: Iterable[int] | int | None = None, seed: int | None = None,
             callback: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """ids [b, t] -> [b, t + new] with new <= max_new_tokens.

    A row that produced one of `stop_tokens` keeps emitting that token (as padding) while the other rows
    go on; generation ends early once every row has stopped. `callback(new_tokens [b])` is called after
    every step (streaming). `seed` makes sampling reproducible (a private generator; the global RNG is
    untouched).
    """
    if ids.dim() == 1:
        ids = ids[None]
    b, t = ids.shape
    dev = ids.device
    generator = torch.Generator(device=dev).manual_seed(int(seed)) if seed is not None else None
    if isinstance(stop_tokens, int):
        stop_tokens = [stop_tokens]
    stop = torch.tensor(sorted({int(s) for s in stop_tokens}), dtype=ids.dtype, device=dev) \
        if stop_tokens else None

    with torch.inference_mode():
        out = torch.empty(b, t + max_new_tokens, dtype=ids.dtype, device=dev)  # [b, t + new]
        out[:, :t] = ids
        if max_new_tokens <= 0:
            return out
        cache = model.new_cache()
        logits = prefill(model, ids, cache, sub)  # [b, v]
        done = torch.zeros(b, dtype=torch.bool, device=dev)  # rows that hit a stop token
        pad = torch.zeros(b, dtype=ids.dtype, device=dev)  # the stop token each finished row repeats
        for i in range(max_new_tokens):
            nxt = sample(logits, temperature, top_k, generator)[:, 0].to(ids.dtype)  # [b]
            if stop is not None:
                nxt = torch.where(done, pad, nxt)
                hit = torch.isin(nxt, stop) & ~done
                pad = torch.where(hit, nxt, pad)
                done = done | hit
            out[:, t + i] = nxt
            if callback is not None:
                callback(nxt)
            if stop is not None and bool(done.all()):
                return out[:, : t + i + 1]
            if i + 1 < max_new_tokens:
                logits = decode_one_token(model, nxt[:, None], cache, sub)  # [b, 1] -> [b, v]
        return out
