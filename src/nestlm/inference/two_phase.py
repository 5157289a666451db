"""Budget control: think on one nested submodel, answer on another.

A prompt is answered in two phases. The thinking phase runs on submodel S until it writes the end-of-thinking
tag (e.g. '</think>', several tokens with a byte tokenizer) or spends `max_think_tokens`; in the latter case
the tag is appended, as standard budget control does (only the rest of it when the budget ran out while S
was writing it: `rest_of_tag`). The answer phase then runs on submodel L.

    res = generate_two_phase(model, ids, think_sub=small, answer_sub=None, max_think_tokens=64,
                             max_answer_tokens=16, end_think=tok.encode("</think>"), stop_tokens=[eos])
    res.tokens, res.think_len, res.ended_by, res.total_s

S and L are prefixes of one model, but a cache is bound to the widths that filled it, so switching needs L's
cache for prompt + trace. Two ways (`switch`):

    reprefill   L runs over prompt + trace once (exact: the same as running L on that text)
    transplant  L's cache is built from S's (`transplant_cache`): attention K/V of the blocks both keep (KV
                groups L has and S lacks are zero), Mamba conv and SSM states with S's heads in place and
                zeros for the heads S lacks. An approximation (S's states came from S's narrower residual
                stream) that costs no prefill; bench/budget_control.py measures what it costs in accuracy.

When S and L are the same submodel, the cache simply goes on ('continue'). `Standalone(model)` runs each
submodel extracted as its own Decoder (same tokens, less per-step overhead); caches stay transplantable.

One prompt at a time (ids [1, t]): rows of a batch would switch at different positions. Loop over prompts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from nestlm.arch import SubArch
from nestlm.errors import ConfigError
from nestlm.inference.detok import held_suffix
from nestlm.inference.generate import Sampling, decode, prefill
from nestlm.model import layout
from nestlm.model.decoder import Cache, Rows

__all__ = ["SWITCHES", "Standalone", "TwoPhaseResult", "generate_two_phase", "transplant_cache"]

SWITCHES = ("reprefill", "transplant")


@dataclass
class TwoPhaseResult:
    tokens: torch.Tensor  # [1, prompt + think + forced + answer]
    prompt_len: int
    think_len: int  # tokens the thinking model wrote (its end tag included when it wrote one)
    forced_len: int  # end-of-thinking tokens appended because the budget ran out (0 otherwise)
    answer_len: int
    ended_by: str  # how thinking ended: "tag" | "budget" | "stop" (a stop token: no answer phase)
    switch: str  # "reprefill" | "transplant" | "continue" (S == L) | "prefill" (no thinking) | "none"
    think_s: float  # S: prefill of the prompt + thinking steps
    switch_s: float  # until L's first logits: re-prefill, or transplant + feeding the pending tokens
    answer_s: float  # L: answer steps

    @property
    def total_s(self) -> float:
        return self.think_s + self.switch_s + self.answer_s

    @property
    def think_ids(self) -> torch.Tensor:
        """The trace as the answer model saw it (forced tag included): [think_len + forced_len]."""
        return self.tokens[0, self.prompt_len:self.prompt_len + self.think_len + self.forced_len]

    @property
    def answer_ids(self) -> torch.Tensor:
        return self.tokens[0, self.tokens.shape[1] - self.answer_len:]


# ---------------------------------------------------------------------------------------------- transplant
def transplant_cache(model, cache: Cache, sub: SubArch | None) -> Cache:
    """A cache for submodel `sub` built from `cache` (filled by another nested submodel of `model`), without
    running the model: the source cache is left as it was.

    Attention blocks keep their K/V (head_dim is shared; KV groups cut or zero-padded), Mamba blocks keep
    the conv window and SSM state of the heads both submodels have (zeros for the others). Blocks that
    `sub` keeps but the source dropped have no state to take: a ConfigError for stateful ones (attention,
    Mamba); MLP / MoE blocks hold no state. With sub == the cache's own SubArch this is an exact copy."""
    if cache.sub is None:
        raise ValueError("transplant_cache: the cache is empty (run a prefill first)")
    src, dst = cache.sub, model.resolve(sub)
    pattern = model.cfg.pattern
    lost = [i for i in dst.layers if layout.cache_tensors(model.cfg, pattern[i]) and i not in src.layers]
    if lost:
        raise ConfigError(f"cannot transplant the cache: the target SubArch.layers keeps blocks {lost} "
                          f"({''.join(pattern[i] for i in lost)}) that the source dropped; use switch='reprefill'")
    out = Cache()
    out.pos, out.sub = cache.pos, dst
    have, want = layout.axis_values(src), layout.axis_values(dst)
    for i in dst.layers:
        decl = layout.cache_tensors(model.cfg, pattern[i])  # MLP / MoE blocks hold no state
        if not decl:
            continue
        state = dict(cache.layers.get(i, {}))
        if "len" in state:  # attention: the filled part of the preallocated K/V buffers
            state |= {n: state[n][:, :, :state["len"]] for n in ("k", "v")}
        out.layers[i] = {n: layout.embed(state[n], d, segs, have, want)
                         for n, dims in decl.items() if n in state for d, segs in dims.items()}
        if "len" in state:
            out.layers[i]["len"] = state["len"]
    return out


# ---------------------------------------------------------------------------------------------- standalone
class Standalone:
    """The elastic model with every submodel it is asked for extracted once as a standalone Decoder
    (nestlm.model.extract.extract) and run as such: the same function, without the per-step slicing of the
    weights (for a small model on CPU that overhead is a good part of a decoding step). Use it in place of
    the model: `generate_two_phase(Standalone(model), ...)`.

    Caches stay in the elastic model's terms (block indices and SubArch of the elastic model), so
    `transplant_cache` works on them: an extracted model's state tensors have the widths and the head order
    of the sliced ones."""

    def __init__(self, model):
        self.model, self.cfg = model, model.cfg
        self._small: dict[SubArch, object] = {}

    def resolve(self, sub: SubArch | None) -> SubArch:
        return self.model.resolve(sub)

    def new_cache(self) -> Cache:
        return Cache()

    @property
    def layers(self):
        return self.model.layers

    @property
    def lm_head_weight(self) -> torch.Tensor:  # the submodel's head is its prefix [:, :k]
        return self.model.lm_head_weight

    def submodel(self, sub: SubArch | None):
        from nestlm.model.extract import extract

        s = self.resolve(sub)
        if s not in self._small:
            self._small[s] = extract(self.model, s).eval()
        return self._small[s]

    def __call__(self, ids: torch.Tensor, sub: SubArch | None = None, cache: Cache | None = None,
                 return_hidden: bool = False) -> torch.Tensor:
        s = self.resolve(sub)
        small = self.submodel(s)
        if cache is None:
            return small(ids, return_hidden=return_hidden)
        caches = cache.caches if isinstance(cache, Rows) else [cache]
        if any(c.sub is not None and c.sub != s for c in caches):
            raise ValueError("this cache was filled by another SubArch; start a new cache to switch models")
        inner = [self._view(c, s, small) for c in caches]
        out = small(ids, cache=Rows(inner, cache.lengths) if isinstance(cache, Rows) else inner[0],
                    return_hidden=return_hidden)
        for c, v in zip(caches, inner, strict=True):
            c.pos, c.sub = v.pos, s
        return out

    @staticmethod
    def _view(cache: Cache, s: SubArch, small) -> Cache:
        """The standalone model's view of an elastic cache: its block j is the elastic block s.layers[j]."""
        inner = Cache()
        inner.pos, inner.sub = cache.pos, (None if cache.sub is None else small.resolve(None))
        inner.layers = {j: cache.layer(i) for j, i in enumerate(s.layers)}  # the same dicts, filled in place
        return inner


# ---------------------------------------------------------------------------------------------- two phases
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def rest_of_tag(trace, tag):
    """What a budget appends to end the thinking: the end-of-thinking tag, or only its rest when the trace
    already ends with the tag's first tokens (the model was writing the tag when the budget ran out), so that
    the answer model reads one whole tag, never a half tag followed by a whole one (`4<</think>`). Token ids
    or text alike (the two-endpoint client applies it to text)."""
    return tag[held_suffix(trace, [tag]):]


def _sequences(end_think) -> list[list[int]]:
    """One tag (an id, a list or 1-D tensor of ids) or several alternative tokenizations of it (a list of
    lists); the first is the canonical one."""
    if torch.is_tensor(end_think):
        end_think = end_think.tolist()
    if isinstance(end_think, int):
        end_think = [end_think]
    seqs = [list(end_think)] if end_think and isinstance(end_think[0], int) else [list(s) for s in end_think]
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("end_think must be a non-empty token sequence (or a list of them)")
    return [[int(x) for x in s] for s in seqs]


def generate_two_phase(model, ids: torch.Tensor, think_sub: SubArch | None, answer_sub: SubArch | None,
                       max_think_tokens: int, max_answer_tokens: int, end_think: Sequence[int] | Sequence[Sequence[int]],
                       stop_tokens: Iterable[int] | int | None = None, switch: str = "reprefill",
                       sampling: Sampling = Sampling(),
                       callback: Callable[[torch.Tensor, str], None] | None = None) -> TwoPhaseResult:
    """Think with `think_sub`, answer with `answer_sub` (None: the full model). ids: [1, t] or [t].

    Thinking ends at the first occurrence of an `end_think` sequence in the generated tokens ("tag"), after
    `max_think_tokens` tokens ("budget": the canonical tag is appended, not counted in the budget), or at a
    stop token ("stop": generation ends there, no answer). The answer phase writes at most
    `max_answer_tokens` tokens and ends at a stop token. `callback(token [1], phase)` streams every token,
    phase "think" | "forced" | "answer". `sampling` (nestlm.inference.generate.Sampling) holds for both phases,
    which draw from one private generator seeded with sampling.seed; the repetition penalty counts the prompt
    (and, answering, the trace) as seen.
    """
    if switch not in SWITCHES:
        raise ConfigError(f"switch must be one of {SWITCHES}, got {switch!r}")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.shape[0] != 1:
        raise ValueError(f"generate_two_phase takes one prompt (ids [1, t]), got batch {ids.shape[0]}; "
                         "loop over prompts (each switches at its own position)")
    if max_think_tokens < 0 or max_answer_tokens < 0:
        raise ValueError("max_think_tokens and max_answer_tokens must be >= 0")
    tags = _sequences(end_think)
    dev, t = ids.device, ids.shape[1]
    gen = sampling.generator(dev)
    stops = [int(x) for x in ([stop_tokens] if isinstance(stop_tokens, int) else stop_tokens or []) if x is not None]

    def emit(phase):
        return None if callback is None else (lambda tok: callback(tok, phase))

    with torch.inference_mode():
        # ---- phase 1: S reads the prompt and thinks until the tag, the budget or a stop token
        _sync(dev)
        t0 = time.perf_counter()
        think = ids.new_zeros(1, 0)
        cache = None
        if max_think_tokens > 0:
            cache = model.new_cache()
            logits = prefill(model, ids, cache, think_sub)  # [1, v]
            think = decode(model, logits, cache, max_think_tokens, think_sub, sampling, stop_tokens=stops,
                           stop_sequences=tags, callback=emit("think"), generator=gen, dtype=ids.dtype,
                           history=ids)  # [1, n]; the cache holds all but the last
        n = think.shape[1]
        tail = think[0].tolist()
        if any(len(tail) >= len(s) and tail[-len(s):] == s for s in tags):
            ended_by = "tag"
        elif n and tail[-1] in stops:
            ended_by = "stop"
        else:
            ended_by = "budget"
        forced = ids.new_tensor([rest_of_tag(tail, tags[0])]) if ended_by == "budget" else ids.new_zeros(1, 0)  # [1, f]
        if callback is not None:
            for j in range(forced.shape[1]):
                callback(forced[:, j], "forced")
        _sync(dev)
        t1 = time.perf_counter()
        seq = torch.cat([ids, think, forced], dim=1)  # [1, t + n + f]
        if ended_by == "stop" or max_answer_tokens == 0:
            return TwoPhaseResult(seq, t, n, forced.shape[1], 0, ended_by, "none", t1 - t0, 0.0, 0.0)

        # ---- the switch: L's cache for prompt + trace, and L's first logits
        same = model.resolve(think_sub) == model.resolve(answer_sub)
        pending = seq[:, cache.pos:] if cache is not None else seq  # tokens not in S's cache yet
        if cache is None:
            mode, cache = "prefill", model.new_cache()
        elif same:
            mode = "continue"
        elif switch == "transplant":
            mode, cache = "transplant", transplant_cache(model, cache, answer_sub)
        else:
            mode, cache, pending = "reprefill", model.new_cache(), seq
        logits = prefill(model, pending, cache, answer_sub)  # [1, v]
        _sync(dev)
        t2 = time.perf_counter()

        # ---- phase 2: L answers
        answer = decode(model, logits, cache, max_answer_tokens, answer_sub, sampling, stop_tokens=stops,
                        callback=emit("answer"), generator=gen, dtype=ids.dtype, history=seq)  # [1, a]
        _sync(dev)
        t3 = time.perf_counter()
    return TwoPhaseResult(torch.cat([seq, answer], dim=1), t, n, forced.shape[1], answer.shape[1], ended_by,
                          mode, t1 - t0, t2 - t1, t3 - t2)


# ---------------------------------------------------------------------------------------------- command line
