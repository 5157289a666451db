"""Autoregressive generation with a cache, gpt-fast style: prefill once, then one token per step.

    out = generate(model, ids, max_new_tokens=64)                       # greedy, the full model
    out = generate(model, ids, 64, sub=SubArch(hidden=256), sampling=Sampling(0.8, top_k=50, seed=0))
    out = generate(model, ids, 64, sampling=Sampling(0.7, top_p=0.9, repetition_penalty=1.2))  # transformers' rules
    new = decode(model, logits, cache, 64, stop_sequences=[end_ids])    # go on from a filled cache

Two-phase generation (think on one nested submodel, answer on another) builds on these: nestlm.inference.two_phase.

Device-agnostic: every tensor follows `ids`. The model contract is

    logits = model(ids [b, t], sub=None, cache=None)  -> fp32 [b, t, vocab]
    cache = model.new_cache()                          # advances its position on every call

Shapes: b batch, t prompt length, v vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Sampling", "decode", "decode_one_token", "generate", "prefill", "sample"]


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen, with transformers' rules and order (see `sample`): temperature 0 is
    greedy; top_k, top_p restrict sampling; repetition_penalty (> 0; 1.0 or None: off) applies to greedy
    decoding too; seed makes sampling reproducible (a private generator: the global RNG is untouched)."""
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def generator(self, device) -> torch.Generator | None:
        """A private generator seeded with `seed` on `device`, None without a seed (the global RNG)."""
        return None if self.seed is None else torch.Generator(device=device).manual_seed(int(self.seed))

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty is not None and self.repetition_penalty != 1.0


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


def sample(logits: torch.Tensor, sampling: Sampling = Sampling(), generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """logits [b, v] -> next tokens [b, 1], with transformers' rules and order:

    repetition_penalty (> 0; 1.0: off): the logit of every token in `seen` [b, s] (the prompt and what was
    generated) is divided by it when positive and multiplied by it when negative; it applies to greedy
    decoding too. temperature 0 (or below): greedy argmax; otherwise softmax sampling of logits / temperature,
    restricted to the `top_k` most likely tokens, then to the smallest set of most likely tokens whose
    probability reaches `top_p` (nucleus sampling; 1.0: off). `generator`: sampling's RNG (see
    Sampling.generator; the seed itself is not read here, so one generator serves a whole sequence)."""
    temperature, top_k, top_p = sampling.temperature, sampling.top_k, sampling.top_p
    repetition_penalty = sampling.repetition_penalty
    if sampling.penalized and seen is not None and seen.numel():
        logits = logits.float()
        old = logits.gather(1, seen)  # [b, s]
        logits = logits.scatter(1, seen, torch.where(old < 0, old * repetition_penalty, old / repetition_penalty))
    if temperature is None or temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)  # [b, 1]
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, max(int(top_k), 1), dim=-1).values[:, -1:]  # [b, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        low, order = torch.sort(logits, dim=-1)  # ascending [b, v]
        drop = low.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p  # the unlikely tail, below 1 - top_p in total
        drop[:, -1] = False  # keep at least the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [b, v]
    return torch.multinomial(probs, 1, generator=generator)  # [b, 1]


def _stop_tensor(stop_tokens, dtype: torch.dtype, device) -> torch.Tensor | None:
    """An int or ids -> a 1-D tensor of the distinct ids, None when there are none."""
    if isinstance(stop_tokens, int):
        stop_tokens = [stop_tokens]
    if not stop_tokens:
        return None
    return torch.tensor(sorted({int(s) for s in stop_tokens}), dtype=dtype, device=device)


def _ends_with(new: torch.Tensor, n: int, seq: torch.Tensor) -> torch.Tensor:
    """Rows of new[:, :n] whose last len(seq) tokens are `seq`: [b] bool."""
    L = seq.shape[0]
    if n < L:
        return torch.zeros(new.shape[0], dtype=torch.bool, device=new.device)
    return (new[:, n - L:n] == seq).all(dim=1)


def decode(model, logits: torch.Tensor, cache, max_new_tokens: int, sub=None, sampling: Sampling = Sampling(),
           stop_tokens: Iterable[int] | int | None = None, stop_sequences: Iterable[Iterable[int]] | None = None,
           callback: Callable[[torch.Tensor], None] | None = None, generator: torch.Generator | None = None,
           dtype: torch.dtype = torch.long, history: torch.Tensor | None = None) -> torch.Tensor:
    """Continue from `logits` [b, v] (the prediction after the tokens already in `cache`): sample up to
    `max_new_tokens` tokens, feeding each one into the cache except the last. Returns the new tokens [b, n].

    A row ends when it samples one of `stop_tokens` or its new tokens end with one of `stop_sequences`
    (multi-token markers such as a byte-level '</think>'); a finished row repeats its last token as padding
    while the other rows go on, and decoding stops once every row has ended. So after the call the cache
    holds every token but the last one returned: cache.pos == tokens before + n - 1 (for n >= 1).
    sampling: see `Sampling` and `sample`; generator: the RNG to draw from (default: a fresh one from
    sampling.seed; pass one to go on drawing from it across calls); history [b, t]: the tokens before (the
    prompt), which the repetition penalty counts as seen besides the new ones."""
    if generator is None:
        generator = sampling.generator(logits.device)
    b, dev = logits.shape[0], logits.device
    stop = _stop_tensor(stop_tokens, dtype, dev)
    seqs = [torch.as_tensor(list(q), dtype=dtype, device=dev) for q in (stop_sequences or ())]
    if any(q.numel() == 0 for q in seqs):
        raise ValueError("stop_sequences must not contain an empty sequence")
    new = torch.empty(b, max(max_new_tokens, 0), dtype=dtype, device=dev)  # [b, n]
    done = torch.zeros(b, dtype=torch.bool, device=dev)  # rows that ended
    pad = torch.zeros(b, dtype=dtype, device=dev)  # the token each finished row repeats
    can_stop = stop is not None or bool(seqs)
    with torch.inference_mode():
        for i in range(max_new_tokens):
            seen = None
            if sampling.penalized:
                seen = new[:, :i] if history is None else torch.cat([history.to(dtype), new[:, :i]], dim=1)
            nxt = sample(logits, sampling, generator, seen)[:, 0].to(dtype)
            if can_stop:
                nxt = torch.where(done, pad, nxt)
            new[:, i] = nxt
            if callback is not None:
                callback(nxt)
            if can_stop:
                hit = torch.isin(nxt, stop) if stop is not None else torch.zeros_like(done)
                for q in seqs:
                    hit = hit | _ends_with(new, i + 1, q)
                hit = hit & ~done
                pad = torch.where(hit, nxt, pad)
                done = done | hit
                if bool(done.all()):
                    return new[:, : i + 1]
            if i + 1 < max_new_tokens:
                logits = decode_one_token(model, nxt[:, None], cache, sub)  # [b, 1] -> [b, v]
    return new


def generate(model, ids: torch.Tensor, max_new_tokens: int, sub=None, sampling: Sampling = Sampling(),
             stop_tokens: Iterable[int] | int | None = None, stop_sequences: Iterable[Iterable[int]] | None = None,
             callback: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """ids [b, t] -> [b, t + new] with new <= max_new_tokens. `sampling` (temperature, top_k, top_p, the
    repetition penalty, seed) follows transformers' rules (see `Sampling`, `sample`).

    A row that produced one of `stop_tokens` (or whose new tokens end with one of `stop_sequences`) keeps
    emitting that last token (as padding) while the other rows go on; generation ends early once every row
    has stopped. `callback(new_tokens [b])` is called after every step (streaming).
    """
    if ids.dim() == 1:
        ids = ids[None]
    if max_new_tokens <= 0:
        return ids.clone()
    with torch.inference_mode():
        cache = model.new_cache()
        logits = prefill(model, ids, cache, sub)  # [b, v]
        new = decode(model, logits, cache, max_new_tokens, sub, sampling, stop_tokens=stop_tokens,
                     stop_sequences=stop_sequences, callback=callback, dtype=ids.dtype, history=ids)  # [b, n]
        return torch.cat([ids, new], dim=1)
